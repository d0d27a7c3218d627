"""Chapter 3's helpers: the bytes formulas, the explorer widget, the figures, one real run;
and the ZeRO-1 step grader (the reference passes, wrong attempts are named with a hint)."""

import textwrap
from pathlib import Path

import matplotlib
import pytest
import torch
from torch import nn

from course_lib.chapters import ch03_zero as chapter3
from course_lib.grading import ch03_zero as grading_zero
from course_lib.launch import run_distributed
from course_lib.model import GPTConfig
from course_lib.parallel.zero import ZeroRedundancyOptimizer
from course_lib.viz import widgets

ROOT = Path(__file__).resolve().parent.parent

matplotlib.use("Agg")


def test_mixed_precision_matches_the_zero_paper_figure_1():
    # 7.5B parameters, 64 GPUs, K = 12: the paper prints 120, 31.4, 16.6 and 1.9 GB.
    totals = [
        sum(widgets.zero_bytes_per_rank(7.5e9, 64, s, "mixed").values()) / 1e9 for s in range(4)
    ]
    assert [round(t, 1) for t in totals] == [120.0, 31.4, 16.6, 1.9]


def test_fp32_is_4_4_8_bytes_per_parameter_cut_by_n():
    assert widgets.zero_bytes_per_rank(1, 1, 0, "fp32") == {"params": 4, "grads": 4, "optimizer": 8}
    assert widgets.zero_bytes_per_rank(8, 4, 2, "fp32") == {
        "params": 32,
        "grads": 8,
        "optimizer": 16,
    }
    assert widgets.zero_bytes_per_rank(8, 4, 3, "fp32") == {
        "params": 8,
        "grads": 8,
        "optimizer": 16,
    }


@pytest.mark.parametrize("args", [(1, 1, 4, "fp32"), (1, 1, 0, "fp8"), (1, 0, 0, "fp32")])
def test_bad_arguments_are_refused(args):
    with pytest.raises(ValueError):
        widgets.zero_bytes_per_rank(*args)


def test_predicted_bytes_sent_counts_passes_per_unit():
    flat = [("flat", 0, 100), ("flat", 1, 20)]
    assert chapter3.predicted_bytes_sent(flat, 4, "zero1") == 2 * 0.75 * 4 * 120
    units = [("block", 0, 100), ("block", 1, 100), ("root", 2, 40)]
    assert chapter3.predicted_bytes_sent(units, 2, "zero3") == 0.5 * 4 * (3 * 200 + 2 * 40)
    assert chapter3.predicted_in_forward(units, 2) == 4 * 240 / 2 + 4 * (100 + 40)


def test_explorer_updates_its_verdict():
    explorer = widgets.zero_memory_explorer(70e9)
    size, world, stage, precision, gpu, text, image = explorer.children
    world.value = 1
    assert "does NOT fit" in text.value and image.value[:4] == b"\x89PNG"
    world.value, stage.value = 64, 3
    assert "GiB per rank</b>" in text.value and "does NOT" not in text.value
    assert "interactive in JupyterLab" in repr(explorer)


def test_figures_draw():
    assert len(chapter3.plot_who_holds_what(3).axes) == 4
    assert len(widgets.plot_zero_memory(7e9, (1, 8)).axes) == 2


@pytest.mark.timeout(240)
def test_worker_memory_and_bytes_match_the_predictions():
    config = GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=14)  # odd sizes: padding
    results = {n: run_distributed(chapter3.zero_worker, n, config, 2, 4, 8, timeout_s=200)
               for n in (1, 2)}  # fmt: skip
    for stage in chapter3.STAGES:
        for n, per_rank in results.items():
            for r in per_rank:
                res = r[stage]
                assert all(res["within_tolerance"]) and res["identical_across_ranks"]
                assert res["bytes_sent"] == round(
                    chapter3.predicted_bytes_sent(res["units"], n, stage)
                )
                want = chapter3.predicted_memory(res["psi"], n, stage)
                got = res["memory"]["after step"]
                for kind in chapter3.KINDS:  # padding: fewer than N elements per flat buffer
                    slack = 4 * (n - 1) * len(res["units"]) * (2 if kind == "optimizer" else 1)
                    assert want[kind] <= got[kind] <= want[kind] + slack, (stage, n, kind)


# -- the graded exercise: the learner's ZeRO-1 step inside ZeroRedundancyOptimizer --------

# The library's reduce_scatter_gradients / step_and_all_gather (course_lib/parallel/zero.py),
# written as a learner would: ``zero`` is the ZeroRedundancyOptimizer that runs them.
GOOD = """
from course_lib import collectives as C


def reduce_scatter_gradients(zero):
    for fg in zero.flat_groups:
        piece = C.ring_reduce_scatter(fg.grad_flat, zero.group, zero.counter)
        fg.shard.grad = piece.div_(zero.world_size)


def step_and_all_gather(zero):
    zero.optimizer.step()
    for fg in zero.flat_groups:
        C.ring_all_gather(fg.flat, zero.group, zero.counter)
"""
DIVIDE = "piece.div_(zero.world_size)"
REDUCE = "piece = C.ring_reduce_scatter(fg.grad_flat, zero.group, zero.counter)"
GATHER = "        C.ring_all_gather(fg.flat, zero.group, zero.counter)\n"


def _grade(tmp_path, monkeypatch, source: str, optim: str = "sgd", world_size: int = 2) -> None:
    (tmp_path / "learner_zero.py").write_text(textwrap.dedent(source))
    monkeypatch.chdir(tmp_path)
    grading_zero.grade_zero1_step("learner_zero", world_size=world_size, optim=optim, steps=2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_grader_passes_the_reference_step(tmp_path, monkeypatch, capsys, optim):
    _grade(tmp_path, monkeypatch, GOOD, optim)
    assert "OK: learner_zero inside ZeroRedundancyOptimizer" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_the_library_passes_its_own_grader(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the exercise and the library are the same code
    grading_zero.grade_zero1_step("course_lib.parallel.zero", world_size=3, steps=2)
    assert "OK: course_lib.parallel.zero" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_grader_names_a_missing_division_by_n(tmp_path, monkeypatch):
    bad = GOOD.replace(DIVIDE, "piece")
    with pytest.raises(AssertionError, match=r"sum over the N = 2 ranks, not the mean"):
        _grade(tmp_path, monkeypatch, bad)


@pytest.mark.timeout(120)
def test_grader_names_an_all_reduce_in_place_of_the_reduce_scatter(tmp_path, monkeypatch):
    all_reduce = "C.ring_all_reduce(fg.grad_flat, zero.group, zero.counter)\n"
    all_reduce += "        piece = fg.layout.shard(fg.grad_flat)"
    bad = GOOD.replace(REDUCE, all_reduce)
    with pytest.raises(AssertionError, match="an all-reduce in place of the reduce-scatter"):
        _grade(tmp_path, monkeypatch, bad)


@pytest.mark.timeout(120)
def test_grader_names_a_missing_all_gather(tmp_path, monkeypatch):
    bad = GOOD.replace(GATHER, "        pass\n")
    assert bad != GOOD
    with pytest.raises(AssertionError, match=r"did every rank all-gather\?"):
        _grade(tmp_path, monkeypatch, bad)


@pytest.mark.timeout(120)
def test_grader_names_an_uncounted_step(tmp_path, monkeypatch):
    bad = GOOD.replace("zero.counter)", "None)")
    with pytest.raises(AssertionError, match="nothing was counted: pass zero.counter"):
        _grade(tmp_path, monkeypatch, bad)


@pytest.mark.timeout(120)
def test_grader_names_a_step_that_does_not_move(tmp_path, monkeypatch):
    bad = GOOD.replace("    zero.optimizer.step()\n", "")
    assert bad != GOOD
    with pytest.raises(AssertionError, match="did not move"):
        _grade(tmp_path, monkeypatch, bad)


@pytest.mark.timeout(120)
def test_grader_reports_a_stub_as_not_implemented(tmp_path, monkeypatch):
    stub = "def reduce_scatter_gradients(zero):\n    raise NotImplementedError\n\n\n"
    stub += "def step_and_all_gather(zero):\n    raise NotImplementedError\n"
    with pytest.raises(NotImplementedError, match="the ZeRO-1 step is not implemented"):
        _grade(tmp_path, monkeypatch, stub)


def test_stage_2_refuses_another_reduce_scatter():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="use stage=1"):
        ZeroRedundancyOptimizer(model.parameters(), torch.optim.SGD, stage=2,
                                reduce_scatter_gradients=lambda zero: None, lr=0.1)  # fmt: skip
