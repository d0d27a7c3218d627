"""Chapter 2's helpers: the notebook's timing reduction and the bucketed-hook grader."""

from __future__ import annotations

import textwrap

import pytest

from course_lib.chapters import ch02_data_parallel as chapter2
from course_lib.grading import ch02_data_parallel as grading_dp
from course_lib.model import GPT, GPTConfig

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
        bucket.work = dist.all_reduce(bucket.buffer, group=state.group, async_op=True)
        state.next_bucket += 1
"""


def test_slowest_rank_takes_the_slowest_rank_per_repeat() -> None:
    per_rank = [{"k": [1.0, 5.0, 3.0]}, {"k": [2.0, 1.0, 4.0]}]  # slowest: 2, 5, 4
    assert chapter2.slowest_rank(per_rank, "min") == {"k": 2.0}
    assert chapter2.slowest_rank(per_rank, "median") == {"k": 4.0}
    assert chapter2.slowest_rank(per_rank, "min", across="min") == {"k": 1.0}  # 1, 1, 3


def test_parameter_bytes_counts_tied_weights_once() -> None:
    model = GPT(GPTConfig())
    assert chapter2.parameter_bytes() == 4 * sum(p.numel() for p in model.parameters())


def test_hook_state_buckets_every_trainable_parameter_once() -> None:
    model = grading_dp.ToyNet()
    state = grading_dp.make_hook_state(model, bucket_cap_mb=100 / 2**20)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(state.where) == trainable
    assert id(model.frozen.weight) not in state.where
    assert len(state.buckets) > 1  # a cap below the largest parameter
    assert state.names[id(model.embed.weight)] == "embed.weight"


def _grade(tmp_path, monkeypatch, source: str) -> None:
    (tmp_path / "learner_hook.py").write_text(textwrap.dedent(source))
    monkeypatch.chdir(tmp_path)
    grading_dp.grade_bucket_hook("learner_hook", world_size=2, bucket_caps_mb=[100 / 2**20])


@pytest.mark.timeout(120)
def test_grader_passes_the_reference_hook(tmp_path, monkeypatch, capsys) -> None:
    _grade(tmp_path, monkeypatch, GOOD)
    assert "OK: learner_hook matches" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_grader_names_the_parameter_with_a_wrong_gradient(tmp_path, monkeypatch) -> None:
    bad = GOOD.replace("group=state.group,", "op=dist.ReduceOp.MAX, group=state.group,")
    with pytest.raises(AssertionError, match=r"gradient of '[a-z_.]+' differs"):
        _grade(tmp_path, monkeypatch, bad)


@pytest.mark.timeout(120)
def test_grader_refuses_a_bucket_started_before_it_is_full(tmp_path, monkeypatch) -> None:
    full_check = "        if len(bucket.ready) < len(bucket.params):\n            return\n"
    early = GOOD.replace(full_check, "")
    with pytest.raises(AssertionError, match="started before the gradient of"):
        _grade(tmp_path, monkeypatch, early)


@pytest.mark.timeout(120)
def test_grader_reports_a_stub_as_not_implemented(tmp_path, monkeypatch) -> None:
    stub = "def grad_ready(state, p):\n    raise NotImplementedError\n\n\n"
    stub += "def launch_ready_buckets(state):\n    raise NotImplementedError\n"
    with pytest.raises(NotImplementedError):
        _grade(tmp_path, monkeypatch, stub)
