"""Chapter 2's helpers: the notebook's timing reduction and the bucketed-hook grader."""

from __future__ import annotations

import textwrap

import pytest

from course_lib.chapters import ch02_data_parallel as chapter2
from course_lib.grading import ch02_data_parallel as grading_dp
from course_lib.model import GPT, GPTConfig

# The library's grad_ready / launch_ready_buckets (course_lib/parallel/data_parallel.py),
# written as a learner would: ``state`` is the DataParallel that runs them.
GOOD = """
import torch.distributed as dist


def grad_ready(state, p):
    b, i = state.where[id(p)]
    bucket = state.buckets[b]
    start = bucket.offsets[i]
    bucket.buffer[start : start + p.numel()].copy_(p.grad.reshape(-1))
    bucket.ready.add(i)
    launch_ready_buckets(state)


def launch_ready_buckets(state):
    while state.next_bucket < len(state.buckets):
        bucket = state.buckets[state.next_bucket]
        if len(bucket.ready) < len(bucket.params):
            return
        bucket.work = state.all_reduce(bucket.buffer, async_op=True)
        state.next_bucket += 1
"""
START = "bucket.work = state.all_reduce(bucket.buffer, async_op=True)"
# The same, starting torch's all-reduce directly (also right: DataParallel's is torch's).
GOOD_TORCH = GOOD.replace(
    START, "bucket.work = dist.all_reduce(bucket.buffer, group=state.group, async_op=True)"
)


def test_slowest_rank_takes_the_slowest_rank_per_repeat() -> None:
    per_rank = [{"k": [1.0, 5.0, 3.0]}, {"k": [2.0, 1.0, 4.0]}]  # slowest: 2, 5, 4
    assert chapter2.slowest_rank(per_rank, "min") == {"k": 2.0}
    assert chapter2.slowest_rank(per_rank, "median") == {"k": 4.0}
    assert chapter2.slowest_rank(per_rank, "min", across="min") == {"k": 1.0}  # 1, 1, 3


def test_parameter_bytes_counts_tied_weights_once() -> None:
    model = GPT(GPTConfig())
    assert chapter2.parameter_bytes() == 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.timeout(60)
def test_toy_buckets_hold_every_trainable_parameter_once() -> None:
    rows = grading_dp.toy_buckets(bucket_cap_mb=100 / 2**20)
    names = [n for row in rows for n in row["names"]]
    model = grading_dp.ToyNet()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)  # the tied embedding once, never the frozen layer
    assert "frozen.weight" not in names
    assert len(rows) > 1  # a cap below the largest parameter
    assert [row["bucket"] for row in rows] == list(range(len(rows)))


def _grade(tmp_path, monkeypatch, source: str) -> None:
    (tmp_path / "learner_hook.py").write_text(textwrap.dedent(source))
    monkeypatch.chdir(tmp_path)
    grading_dp.grade_bucket_hook("learner_hook", world_size=2, bucket_caps_mb=[100 / 2**20])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", [GOOD, GOOD_TORCH], ids=["dp_all_reduce", "dist_all_reduce"])
def test_grader_passes_the_reference_hook(tmp_path, monkeypatch, capsys, source) -> None:
    _grade(tmp_path, monkeypatch, source)
    assert "OK: learner_hook matches" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_grader_names_the_parameter_with_a_wrong_gradient(tmp_path, monkeypatch) -> None:
    bad = GOOD_TORCH.replace("group=state.group,", "op=dist.ReduceOp.MAX, group=state.group,")
    with pytest.raises(AssertionError, match=r"gradient of '[a-z_.]+' differs"):
        _grade(tmp_path, monkeypatch, bad)


@pytest.mark.timeout(120)
def test_grader_refuses_a_bucket_started_before_it_is_full(tmp_path, monkeypatch) -> None:
    full_check = "        if len(bucket.ready) < len(bucket.params):\n            return\n"
    early = GOOD.replace(full_check, "")
    assert early != GOOD
    with pytest.raises(AssertionError, match="started before the gradient of"):
        _grade(tmp_path, monkeypatch, early)


@pytest.mark.timeout(120)
def test_grader_refuses_a_blocking_all_reduce(tmp_path, monkeypatch) -> None:
    blocking = GOOD.replace(", async_op=True)", ")")
    with pytest.raises(AssertionError, match="async_op=True"):
        _grade(tmp_path, monkeypatch, blocking)


@pytest.mark.timeout(120)
def test_grader_names_a_hook_that_never_starts_a_bucket(tmp_path, monkeypatch) -> None:
    no_overlap = GOOD.replace("    bucket.ready.add(i)\n    launch_ready_buckets(state)\n",
                              "    bucket.ready.add(i)\n")  # fmt: skip
    assert no_overlap != GOOD
    with pytest.raises(AssertionError, match=r"were full during backward but only 0 started"):
        _grade(tmp_path, monkeypatch, no_overlap)


@pytest.mark.timeout(120)
def test_grader_names_a_bucket_started_twice(tmp_path, monkeypatch) -> None:
    again = GOOD.replace("        state.next_bucket += 1\n", "        return\n")
    assert again != GOOD
    with pytest.raises(AssertionError, match="started twice in one step"):
        _grade(tmp_path, monkeypatch, again)


@pytest.mark.timeout(120)
def test_grader_names_a_work_that_was_not_kept(tmp_path, monkeypatch) -> None:
    dropped = GOOD.replace(START, "state.all_reduce(bucket.buffer, async_op=True)")
    with pytest.raises(AssertionError, match=r"store the Work .* in bucket.work"):
        _grade(tmp_path, monkeypatch, dropped)


@pytest.mark.timeout(120)
def test_grader_reports_a_stub_as_not_implemented(tmp_path, monkeypatch) -> None:
    stub = "def grad_ready(state, p):\n    raise NotImplementedError\n\n\n"
    stub += "def launch_ready_buckets(state):\n    raise NotImplementedError\n"
    with pytest.raises(NotImplementedError):
        _grade(tmp_path, monkeypatch, stub)
