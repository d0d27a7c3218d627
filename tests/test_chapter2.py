"""Chapter 2's helpers: timing reduction, compute fit, simulated link, the source's scheme.

The grader's wrong attempts and valid variants are in tests/test_grader_ch02.py.
"""

from __future__ import annotations

import dp_workers as W
import pytest
import torch

from course_lib.chapters import ch02_data_parallel as chapter2
from course_lib.cost import comm_model as M
from course_lib.grading import ch02_data_parallel as grading_dp
from course_lib.launch import run_distributed
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


def test_fit_compute_line_keeps_a_nonnegative_intercept_and_says_so() -> None:
    line = chapter2.fit_compute_line([1, 2, 4], [0.003, 0.005, 0.009])  # 1 ms + 2 ms x b
    assert line["c0"] == pytest.approx(1e-3) and line["c1"] == pytest.approx(2e-3)
    assert line["note"] == "least-squares line"
    line = chapter2.fit_compute_line([1, 2, 4], [0.001, 0.004, 0.0085])  # free c0 < 0
    assert line["free_c0"] < 0 and line["c0"] == 0.0
    assert line["c1"] == pytest.approx((0.001 + 0.008 + 0.034) / 21)  # through the origin
    assert "< 0" in line["note"] and "c0 = 0" in line["note"]


def test_simulated_step_model_adds_or_overlaps_the_link() -> None:
    sim = chapter2.Simulation(0.002, 0.005, 50e-6, 1 / 125e6)
    assert sim.compute_s(4) == pytest.approx(0.022)
    assert sim.all_reduce_s(1000, 2) == M.predict("ring_all_reduce", 1000, 2, 50e-6, 1 / 125e6)
    assert sim.all_reduce_s(1000, 1) == 0.0
    buckets = [10**6, 2 * 10**6]
    model = chapter2.simulated_step_s(sim, 4, 2, buckets)
    comm = sum(sim.all_reduce_s(n, 2) for n in buckets)
    assert model["serial"] == pytest.approx(0.022 + comm)
    assert model["overlap_bound"] == pytest.approx(0.022 / 3 + max(0.022 * 2 / 3, comm))


@pytest.mark.timeout(120)
def test_simulated_link_averages_like_data_parallel_and_source_scheme_runs() -> None:
    out = run_distributed(W.chapter2_simulation, 2, backend="gloo", timeout_s=90)
    for rank in out:
        for mode in ("bucketed", "overlapped"):
            assert torch.equal(rank["grads"][("plain", mode)], rank["grads"][("simulated", mode)])
            assert not rank["grads"][("alive", mode)]  # close() stopped the link thread
        assert rank["info"][("overlapped", 0.5)]["calls"] == len(
            rank["info"][("overlapped", 0.5)]["buckets"]
        )
    rows = out[0]["source"]["rows"]
    assert out[1]["source"] is None and len(rows) == 4
    assert all(r["spread_dp"] == 0.0 for r in rows)  # DP replicas stay bitwise equal
    assert rows[-1]["spread_local"] > 0  # the source's local models drift apart
    assert all(abs(r["dp"] - r["one"]) < 1e-4 for r in rows)  # DP is one device's run
    # the source's global model moves only at an epoch's end (after batches 2 and 4)
    assert rows[1]["global"] != rows[0]["global"] and rows[2]["global"] == rows[1]["global"]
