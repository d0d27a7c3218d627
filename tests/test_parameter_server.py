"""Chapter 4: the parameter server equals single-device SGD, keeps its staleness bound, fails
cleanly, refuses bad input, and runs from the CLI and the benchmark.

One spawn per world size (2, 3, 4) runs every step-by-step case (tests/ps_workers.py);
the parent computes the SGD reference (course_lib.parallel.parameter_server.SGDReference) on the
global batch and compares after every step. Tolerances: DESIGN.md's fp32 ones where the
order of additions differs (a mean of worker gradients vs one full-batch gradient);
``torch.equal`` with one worker, whose single gradient is the reference's, bit for bit.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ps_workers as W
import pytest
import torch

from course_lib.chapters import ch04_parameter_server as ch4
from course_lib.data import get_batch
from course_lib.launch import DistContext, RankError, run_distributed
from course_lib.parallel.parameter_server import (
    ParameterServer,
    PSConfig,
    SGDReference,
    flat_of,
    partition,
)
from course_lib.train import lr_at, train

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1.3e-6, 1e-5
MODES = {"sync": {}, "async": {"mode": "async"}, "ssp0": {"mode": "ssp", "staleness": 0}}
MODES["ssp2"] = {"mode": "ssp", "staleness": 2}
STRAGGLER = {"mode": "ssp", "staleness": 1, "slowdown": 3.0}
CASES = {  # world size -> {case name: PSConfig kwargs}; "-sN" = N servers
    2: {f"{m}-s1": kw for m, kw in MODES.items()},
    3: {f"{m}-s1": kw for m, kw in MODES.items()}
    | {f"{m}-s2": {**kw, "n_servers": 2} for m, kw in MODES.items()}
    | {"ssp1-s1": {**STRAGGLER, "slow_worker": 1}},
    4: {f"{m}-s1": kw for m, kw in MODES.items()}
    | {f"{m}-s2": {**kw, "n_servers": 2} for m, kw in MODES.items()}
    | {"ssp1-s1": {**STRAGGLER, "slow_worker": 0}},
}
BOUND = {"sync": 0, "ssp0": 0, "ssp1": 1, "ssp2": 2, "async": math.inf}
LAUNCH = dict(backend="gloo", timeout_s=150, pg_timeout_s=30, threads_per_rank=1)


@functools.cache
def world(n: int) -> list[dict]:
    """Per-rank results of every case at world size ``n``: one spawn per world size."""
    out = tempfile.mkdtemp(prefix=f"ps_world{n}_")
    return run_distributed(W.run_world, n, list(CASES[n].items()), out, **LAUNCH)


def case(n: int, name: str) -> tuple[int, int, list[dict]]:
    """(servers, workers, per-rank results) of one case."""
    servers = CASES[n][name].get("n_servers", 1)
    return servers, n - servers, [r["cases"][name] for r in world(n)]


@functools.cache
def reference() -> tuple[list[float], list[list[torch.Tensor]]]:
    """Per step: the SGD reference's loss and its parameters (in model order).

    One thread, as on the ranks: a matmul split over 2 threads adds in another order."""
    torch.set_num_threads(1)
    strategy, data, cfg = SGDReference(), W.dataset().train, W.TRAIN
    strategy.setup(W.MODEL, cfg, "cpu")
    losses, params = [], []
    for step in range(W.STEPS):
        x, y = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step)
        losses.append(strategy.train_step(x, y, lr_at(step, cfg)))
        params.append([p.detach().clone() for p in strategy.model.parameters()])
    return losses, params


def check_against_reference(ranks: list[dict], n_servers: int, exact: bool) -> None:
    """Every worker, after every step, holds the reference's parameters; workers agree bit
    for bit with each other and with the servers' shards."""
    workers = [r for r in ranks if not r["server"]]
    for step, ref in enumerate(reference()[1]):
        owners = partition([p.numel() for p in ref], n_servers)
        expected = [flat_of([ref[i] for i in owned]) for owned in owners]
        for w, r in enumerate(workers):
            for j, (got, want) in enumerate(zip(r["shards"][step], expected, strict=True)):
                where = f"step {step}, worker {w}, shard {j}"
                if exact:
                    assert torch.equal(got, want), where
                else:
                    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=where)
                assert torch.equal(got, workers[0]["shards"][step][j]), f"{where} vs worker 0"
        for j in range(n_servers):
            assert torch.equal(ranks[j]["shards"][step][0], workers[0]["shards"][step][j])


SYNC = [(n, name) for n in CASES for name in CASES[n] if name.startswith("sync")]
ONE_WORKER = [(n, name) for n in CASES for name, kw in CASES[n].items()
              if n - kw.get("n_servers", 1) == 1]  # fmt: skip
SSP0 = [(n, name) for n in CASES for name in CASES[n] if name.startswith("ssp0")]
ALL = [(n, name) for n in CASES for name in CASES[n]]


@pytest.mark.parametrize(("n", "name"), SYNC, ids=[f"world{n}-{c}" for n, c in SYNC])
def test_sync_equals_sgd_reference_every_step_every_rank(n, name):
    n_servers, n_workers, ranks = case(n, name)
    check_against_reference(ranks, n_servers, exact=n_workers == 1)
    for r in ranks:  # the global batch's loss, the same bits on every rank
        assert r["losses"] == ranks[0]["losses"]
    torch.testing.assert_close(ranks[0]["losses"], reference()[0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("n", "name"), ONE_WORKER, ids=[f"world{n}-{c}" for n, c in ONE_WORKER])
def test_with_one_worker_every_mode_is_plain_sgd_bit_for_bit(n, name):
    n_servers, _, ranks = case(n, name)
    check_against_reference(ranks, n_servers, exact=True)
    assert ranks[-1]["losses"] == reference()[0]


@pytest.mark.parametrize(("n", "name"), SSP0, ids=[f"world{n}-{c}" for n, c in SSP0])
def test_ssp_with_staleness_0_equals_sync(n, name):
    n_servers, n_workers, ranks = case(n, name)
    check_against_reference(ranks, n_servers, exact=n_workers == 1)
    sync = case(n, name.replace("ssp0", "sync"))[2]
    for a, b in zip(ranks[n_servers:], sync[n_servers:], strict=True):
        torch.testing.assert_close(a["shards"], b["shards"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("n", "name"), ALL, ids=[f"world{n}-{c}" for n, c in ALL])
def test_recorded_staleness_is_complete_and_within_the_bound(n, name):
    n_servers, n_workers, ranks = case(n, name)
    for server in ranks[:n_servers]:
        log = server["log"]
        pushes = [(w, c) for w in range(n_workers) for c in range(W.STEPS)]
        assert sorted((w, c) for w, c, _, _ in log) == pushes, "every push recorded once"
        staleness = [s for _, _, s, _ in log]
        assert 0 <= min(staleness) and max(staleness) <= BOUND[name.split("-")[0]], log
        if name.startswith("sync"):
            assert all(d == 0 for *_, d in log), f"sync pushes are never delayed: {log}"


def test_async_trains_the_gpt_through_the_loop():
    metrics = world(3)[0]["async"]["metrics"]  # 24 steps, evaluated after 8, 16 and 24
    vals = [m["val_loss"] for m in metrics if m["val_loss"] is not None]
    first = metrics[0]["loss"]  # about ln(256) = 5.55 nats: uniform over bytes
    assert len(vals) == 3 and vals[2] < vals[1] < vals[0] < first - 1.5, (first, vals)


def test_sync_through_the_loop_with_eval_checkpoint_and_resume_equals_reference():
    got = world(3)[0]["resumed"]  # stopped after 2 steps, resumed from the checkpoint
    torch.set_num_threads(1)
    ref = train(W.MODEL, W.TRAIN, W.dataset(), strategy=SGDReference(), progress=False)
    for key in ("loss", "val_loss"):
        want = [m[key] for m in ref.metrics]
        have = [m[key] for m in got["metrics"]]
        assert [v is None for v in want] == [v is None for v in have], key
        want, have = [v for v in want if v is not None], [v for v in have if v is not None]
        torch.testing.assert_close(have, want, rtol=RTOL, atol=ATOL, msg=key)
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(got["params"][k], v, rtol=RTOL, atol=ATOL, msg=k)


def test_gradient_bytes_are_parameters_times_element_size():
    assert ch4.gradient_bytes(1e9, torch.bfloat16) == 2e9  # 1B bf16 parameters: 2 GB, not 4
    assert ch4.gradient_bytes(1e9, torch.float32) == 4e9
    assert ch4.gradient_bytes(118_528) == 2 * 118_528  # bf16 by default


@pytest.mark.parametrize("name", ["sync-s1", "sync-s2"])
def test_server_link_bytes_per_direction_are_what_a_sync_run_counts(name):
    n_servers, n_workers, ranks = case(3, name)  # the spawn the equivalence tests use
    for server in ranks[:n_servers]:
        want = ch4.server_link_bytes(4 * server["shards"][0][0].numel(), n_workers)
        assert server["bytes_received"] == W.STEPS * want["in"], "pushes in"
        assert server["bytes_sent"] == W.STEPS * want["out"], "replies out"
    # the workers count on the wire what the servers count per round
    workers, servers = ranks[n_servers:], ranks[:n_servers]
    assert sum(r["bytes_sent"] for r in workers) == sum(r["bytes_received"] for r in servers)
    assert sum(r["bytes_received"] for r in workers) == sum(r["bytes_sent"] for r in servers)


def test_chapter4_bytes_worker_counts_each_direction_as_the_formulas_say():
    ranks = world(4)  # 1 server + 3 workers; the ring runs among the 3 workers
    server, ring = ranks[0]["bytes"], ranks[1]["bytes"]
    n_bytes, n_workers = 4 * server["n_params"], 3
    link = ch4.server_link_bytes(n_bytes, n_workers)
    assert (server["server_in"], server["server_out"]) == (link["in"], link["out"])
    rank = ch4.ring_rank_bytes(n_bytes, n_workers)
    assert (ring["rank_received"], ring["rank_sent"]) == (rank["in"], rank["out"])
    # like with like, per direction: W^2 / (2 (W - 1)) = 2.25 at W = 3 (headers, uneven chunks)
    assert server["server_in"] / ring["rank_received"] == pytest.approx(2.25, rel=1e-3)
    assert server["server_out"] / ring["rank_sent"] == pytest.approx(2.25, rel=1e-3)


def test_a_failed_worker_ends_the_run_fast_naming_its_rank():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_distributed(W.run_case, 3, PSConfig(), 6, 2, **LAUNCH)
    assert info.value.rank == 2 and "injected failure on rank 2" in str(info.value)
    assert time.monotonic() - start < 30


def _ctx(world_size: int, backend: str = "gloo") -> DistContext:
    return DistContext(0, world_size, 0, torch.device("cpu"), backend)  # no process group


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PSConfig(mode="ssp", staleness=-1), "staleness=-1 must be >= 0"),
        (lambda: PSConfig(n_servers=0), "n_servers=0 must be >= 1"),
        (lambda: PSConfig(mode="hogwild"), "mode='hogwild' is not one of"),
        (lambda: ParameterServer(_ctx(2), PSConfig(n_servers=2)), "leaves no workers; use wor"),
        (lambda: ParameterServer(None), "world_size=1 with n_servers=1 leaves no workers"),
        (lambda: ParameterServer(_ctx(3), PSConfig(slow_worker=2)), "slow_worker=2 is not in"),
        (lambda: ParameterServer(_ctx(3, "nccl")), "backend='gloo'"),
        (lambda: partition([3, 4], 3), "3 servers but only 2 parameter tensors"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_numbers(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make()


def test_more_servers_than_parameter_tensors_fails_in_setup_before_any_message():
    strategy = ParameterServer(_ctx(60), PSConfig(n_servers=59))
    with pytest.raises(ValueError, match="59 servers but only .* use at most"):
        strategy.setup(W.MODEL, W.TRAIN, "cpu")  # no process group: a message would fail


def test_cli_trains_with_ps_sync_on_three_ranks(tmp_path):
    args = ["train", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
            "--batch-size", "4", "--steps", "4", "--eval-interval", "2", "--eval-batches", "1",
            "--no-progress", "--sample-tokens", "0", "--device", "cpu", "--lr", "0.3",
            "--strategy", "ps-sync", "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "course_lib", *args, "--world-size", "3"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "validation loss" in run.stdout and (tmp_path / "checkpoint" / "manifest.json").is_file()


def test_cli_refuses_a_parameter_server_without_workers(tmp_path, capsys):
    from course_lib.__main__ import main

    with pytest.raises(SystemExit) as info:  # an argparse error, before anything is spawned
        main(["train", "--strategy", "ps-async", "--world-size", "1", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "needs a server and at least one worker" in capsys.readouterr().err


def test_benchmark_smoke_prints_its_tables():
    run = subprocess.run([sys.executable, "benchmarks/parameter_server.py", "--smoke"],
                         capture_output=True, text=True, timeout=170, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for heading in ("updates/s", "staleness histogram", "bytes per step"):
        assert heading in run.stdout, heading


def test_grader_names_step_rank_parameter_and_the_likely_mistake(tmp_path, monkeypatch):
    from course_lib.grading.ch04_parameter_server import grade_sync_round

    (tmp_path / "too_far.py").write_text(
        "from course_lib.parallel import parameter_server as P\n\n\n"
        "def sync_round(shard, workers, lr):  # sums instead of averaging\n"
        "    return P.sync_round(shard, workers, lr * len(workers))\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match=r"step 0, worker rank 1: parameter .* 2x too large"):
        grade_sync_round("too_far", world_size=3)
