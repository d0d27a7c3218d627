"""Chapter 2's helpers: the notebook's timing reduction and the grader's toy buckets.

The grader's wrong attempts and valid variants are in tests/test_grader_ch02.py.
"""

from __future__ import annotations

import pytest

from course_lib.chapters import ch02_data_parallel as chapter2
from course_lib.grading import ch02_data_parallel as grading_dp
from course_lib.model import GPT, GPTConfig


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
