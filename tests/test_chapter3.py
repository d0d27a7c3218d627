"""Chapter 3's helpers: the bytes formulas, the explorer widget, the figures, one real run.

The ZeRO-1 step grader's attempts and variants are in tests/test_grader_ch03.py."""

import matplotlib
import pytest
import torch
from torch import nn

from course_lib.chapters import ch03_zero as chapter3
from course_lib.launch import run_distributed
from course_lib.model import GPTConfig
from course_lib.parallel.zero import ZeroRedundancyOptimizer
from course_lib.viz import widgets

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


def test_replicated_floors_fp32_and_mixed_precision():
    # Issue 12 item 3: as N grows, ZeRO-1 tends to 1/2 of DP in fp32 but 1/4 in mixed
    # precision, ZeRO-2 to 1/4 and 1/8; and every stage fits 7B's states on two 80 GiB GPUs.
    def share(stage, precision):
        per_rank = widgets.zero_bytes_per_rank(1e9, 2**40, stage, precision)
        return sum(per_rank.values()) / 16e9

    assert [round(share(s, "fp32"), 6) for s in range(4)] == [1, 0.5, 0.25, 0]
    assert [round(share(s, "mixed"), 6) for s in range(4)] == [1, 0.25, 0.125, 0]
    for stage in (1, 2, 3):
        assert sum(widgets.zero_bytes_per_rank(7e9, 2, stage, "mixed").values()) <= 80 * 2**30
    assert sum(widgets.zero_bytes_per_rank(7e9, 2, 0, "mixed").values()) > 80 * 2**30


def test_figures_draw():
    assert len(chapter3.plot_who_holds_what(3).axes) == 4
    assert len(widgets.plot_zero_memory(7e9, (1, 8)).axes) == 2
    assert len(widgets.plot_zero_memory(7e9, (1,)).axes) == 1


@pytest.mark.timeout(120)
def test_zero3_gathers_every_block_again_before_its_backward():
    config = GPTConfig(block_size=8, n_layer=2, n_head=2, n_embd=14)
    (record,) = run_distributed(chapter3.zero3_events_worker, 1, config, 2, 8, timeout_s=100)
    events = record["events"]
    seen = [(e["phase"], e["unit"], e["event"]) for e in events]
    for block in ("block 0", "block 1"):
        gathers = [p for p, u, ev in seen if u == block and ev == "all-gather"]
        assert gathers == ["forward", "backward"], seen  # gathered, freed, gathered again
        regather = seen.index(("backward", block, "all-gather"))
        assert seen.index(("backward", block, "reduce-scatter")) > regather
    assert [ev for _, u, ev in seen if u == "root"] == ["all-gather", "reduce-scatter"]
    assert events[-1]["gathered_bytes"] == 0 and all(e["bytes_sent"] == 0 for e in events)
    assert max(e["gathered_bytes"] for e in events) == (
        record["unit_bytes"]["root"] + record["unit_bytes"]["block 0"]
    )
    assert len(chapter3.plot_zero3_timeline(record).axes) == 1


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


def test_stage_2_refuses_another_reduce_scatter():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="use stage=1"):
        ZeroRedundancyOptimizer(model.parameters(), torch.optim.SGD, stage=2,
                                reduce_scatter_gradients=lambda zero: None, lr=0.1)  # fmt: skip
