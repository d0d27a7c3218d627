"""The launch harness (chapter 0): results, clear failures, deadlines, no orphans, torchrun."""

from __future__ import annotations

import _thread
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import dist_workers as workers
import pytest
import torch

from course_lib.launch import (
    DeadlineError,
    DistContext,
    RankError,
    _choose_backend,
    _resolve_device,
    default_pg_timeout,
    run_distributed,
    run_under_torchrun,
    torchrun_env_present,
)

pytestmark = pytest.mark.timeout(60)

TESTS_DIR = Path(__file__).parent
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def spawned_children(parent: int | None = None) -> list[int]:
    """Pids of live multiprocessing-spawned children of ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:  # a zombie's cmdline is empty
            pids.append(int(name))
    return pids


@pytest.fixture(autouse=True)
def no_orphans():
    """Every test must leave exactly the spawned children it found (none, in practice)."""
    if not Path("/proc").is_dir():
        pytest.skip("counting child processes needs Linux /proc")
    before = spawned_children()
    yield
    assert spawned_children() == before


def ghost(ctx: DistContext) -> None:
    """Stands for a worker the ranks cannot import (its name points nowhere)."""


ghost.__module__ = "dist_workers"
ghost.__qualname__ = "no_such_worker"


# ---- results --------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_same_worker_same_sum_at_every_world_size(world_size):
    results = run_distributed(workers.sum_of_ranks, world_size, backend="gloo", timeout_s=50)
    expected_threads = max(1, os.cpu_count() // world_size)
    assert [r["rank"] for r in results] == list(range(world_size))
    for r in results:
        assert r["total"] == world_size * (world_size + 1) / 2
        assert r["world_size"] == world_size and r["dist_rank"] == r["rank"] == r["local_rank"]
        assert (r["device"], r["backend"], r["threads"]) == ("cpu", "gloo", expected_threads)
        assert r["is_main"] == (r["rank"] == 0)


def test_two_runs_at_once_rendezvous_on_their_own_ports():
    results: dict[str, object] = {}

    def launch(name: str) -> None:
        try:
            results[name] = run_distributed(workers.sum_of_ranks, 2, threads_per_rank=1)
        except BaseException as err:  # reported below, in the test's thread
            results[name] = err

    threads = [threading.Thread(target=launch, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    for name in "ab":
        assert isinstance(results[name], list), results[name]
        assert [(r["total"], r["threads"]) for r in results[name]] == [(3.0, 1), (3.0, 1)]


def test_arguments_travel_by_pickle():
    tensor = torch.arange(3.0)
    [(rank, args, kwargs)] = run_distributed(workers.echo, 1, "a", tensor, scale=2.5)
    assert rank == 0 and args[0] == "a" and torch.equal(args[1], tensor)
    assert kwargs == {"scale": 2.5}


# ---- refused before spawning ----------------------------------------------------------


def test_notebook_worker_refused_with_the_fix(monkeypatch):
    def cell_worker(ctx):
        return ctx.rank

    cell_worker.__module__ = "__main__"
    cell_worker.__qualname__ = "cell_worker"
    monkeypatch.delattr(sys.modules["__main__"], "__file__", raising=False)
    with pytest.raises(ValueError, match=r"notebook.*cell_worker.*\.py module"):
        run_distributed(cell_worker, 2)


def test_lambdas_and_nested_functions_refused():
    def nested(ctx):
        return ctx.rank

    with pytest.raises(ValueError, match="lambda or a nested function"):
        run_distributed(lambda ctx: ctx.rank, 1)
    with pytest.raises(ValueError, match="nested"):
        run_distributed(nested, 1)


def test_bad_sizes_backends_and_devices_refused():
    for world_size in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="world_size"):
            run_distributed(workers.sum_of_ranks, world_size)
    with pytest.raises(ValueError, match="backend must be one of"):
        run_distributed(workers.sum_of_ranks, 1, backend="mpi")
    with pytest.raises(ValueError, match="device must be"):
        run_distributed(workers.sum_of_ranks, 1, device="tpu")
    with pytest.raises(ValueError, match="timeout_s"):
        run_distributed(workers.sum_of_ranks, 1, timeout_s=0)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has 2 GPUs")
def test_nccl_without_a_gpu_per_rank_refused_before_spawning():
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match="one GPU per rank") as info:
        run_distributed(workers.sum_of_ranks, 2, backend="nccl")
    message = str(info.value)
    assert "Duplicate GPU detected" in message and f"{gpus} GPU(s)" in message
    assert "backend='gloo'" in message and "device='cuda'" in message


def test_auto_backend_and_devices():
    assert _choose_backend("auto", 2, gpus=0) == "gloo"
    assert _choose_backend("auto", 2, gpus=1) == "gloo"
    assert _choose_backend("auto", 2, gpus=2) == "nccl"
    assert _choose_backend("gloo", 4, gpus=8) == "gloo"
    assert _choose_backend("nccl", 2, gpus=2) == "nccl"
    assert _resolve_device(None, "nccl", rank=5, local_rank=1, gpus=2) == "cuda:1"
    assert _resolve_device(None, "gloo", rank=5, local_rank=1, gpus=2) == "cpu"
    assert _resolve_device("cuda", "gloo", rank=5, local_rank=1, gpus=2) == "cuda:1"
    assert _resolve_device("cuda", "gloo", rank=2, local_rank=2, gpus=1) == "cuda:0"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        _resolve_device("cuda", "gloo", rank=0, local_rank=0, gpus=0)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        _resolve_device("cpu", "nccl", rank=0, local_rank=0, gpus=1)


def test_default_pg_timeout_lets_a_short_deadline_fire_first():
    assert default_pg_timeout(120.0, None) == 60.0  # gloo's own error comes before the kill
    assert default_pg_timeout(8.0, None) == 8.0  # starts after rendezvous: the deadline wins
    assert default_pg_timeout(8.0, 30.0) == 30.0


# ---- failures come back as one clear error --------------------------------------------


def test_rank_exception_comes_back_fast_with_its_traceback():
    # Timed from the failure (its message carries time.time()), not from the call:
    # spawning is slow on a loaded machine, but rank 0 would otherwise wait forever.
    with pytest.raises(RankError) as info:
        run_distributed(workers.raise_on_rank_1, 2, timeout_s=50)
    raised_at = time.time()
    err = info.value
    assert isinstance(err, RuntimeError)
    assert (err.rank, err.exitcode) == (1, 1)
    message = str(err)
    assert message.startswith("rank 1 (of 2) failed first: ValueError: rank 1 refuses to send")
    failed_at = float(re.search(r"refuses to send at t=([0-9.]+)", message).group(1))
    assert raised_at - failed_at < 5
    assert 'raise ValueError(f"rank 1 refuses to send at' in message  # the traceback's line
    assert "ValueError" in err.tracebacks[1]


def test_unimportable_worker_reported_not_exit_code_1():
    with pytest.raises(RankError) as info:
        run_distributed(ghost, 1)
    message = str(info.value)
    assert "rank 0" in message and "Can't get attribute 'no_such_worker'" in message
    assert "top level of an importable .py file" in message


def test_rank_exiting_without_traceback_reported_with_exit_code():
    with pytest.raises(RankError) as info:
        run_distributed(workers.exit_on_rank_1, 2, 3, timeout_s=50)
    assert (info.value.rank, info.value.exitcode) == (1, 3)
    assert str(info.value).startswith("rank 1 (of 2) failed first")
    assert "exit code 3" in str(info.value)


def test_rank_exiting_zero_before_returning_reported():
    with pytest.raises(RankError, match="before its worker returned") as info:
        run_distributed(workers.return_without_result, 1)
    assert (info.value.rank, info.value.exitcode) == (0, 0)


def test_rank_killed_by_sigabrt_reported_with_its_stack():
    with pytest.raises(RankError) as info:
        run_distributed(workers.abort_on_rank_1, 2, timeout_s=50)
    assert (info.value.rank, info.value.exitcode) == (1, -6)
    message = str(info.value)
    assert message.startswith("rank 1 (of 2) failed first") and "SIGABRT" in message
    assert "in abort_on_rank_1" in message  # faulthandler's stack at the crash


def test_collective_size_mismatch_reported():
    # gloo (torch 2.13): the rank that receives more bytes than it posted aborts (SIGABRT)
    # with "Received data size doesn't match expected size"; its peer then raises
    # "Connection reset by peer". The harness blames the aborting rank.
    with pytest.raises(RankError) as info:
        run_distributed(workers.mismatched_all_reduce, 2, timeout_s=50, pg_timeout_s=10)
    message = str(info.value)
    assert message.startswith(f"rank {info.value.rank} (of 2) failed first")
    assert "SIGABRT" in message or "mismatch" in message
    assert "collective mismatch" in message  # gloo's own words, from the rank's stderr


def hang_until_deadline(timeout_s: float) -> DeadlineError:
    """Run the hanging worker at world size 2; return the DeadlineError it must raise."""
    start = time.monotonic()
    with pytest.raises(DeadlineError) as info:
        run_distributed(workers.hang_in_recv, 2, timeout_s=timeout_s, pg_timeout_s=60)
    assert time.monotonic() - start < timeout_s + 10  # stack dumps and kills take ~1 s
    return info.value


def test_deadline_dumps_each_hung_rank_stack():
    err = hang_until_deadline(6)
    if "still starting up" in str(err):  # machine so loaded that 6 s did not start 2 ranks
        err = hang_until_deadline(40)
    assert isinstance(err, TimeoutError)
    assert err.running == [0, 1]
    message = str(err)
    assert f"deadline of timeout_s={err.timeout_s:g} s" in message
    assert "ranks 0, 1 (of 2)" in message
    assert "in hang_in_recv" in err.stacks[0] and "in hang_in_recv" in err.stacks[1]
    assert "in hang_in_recv" in message


def test_keyboard_interrupt_kills_every_rank():
    timer = threading.Timer(2.5, _thread.interrupt_main)  # Ctrl-C, as a kernel interrupt
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_distributed(workers.hang_in_recv, 2, timeout_s=50)
    finally:
        timer.cancel()
    assert spawned_children() == []


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    stat = proc_stat(pid)
    return bool(stat) and stat[0] != "Z"


def armed(pid: int) -> bool:
    """Whether a rank ran the harness's set-up: PR_SET_PDEATHSIG, then its own process group."""
    stat = proc_stat(pid)
    return bool(stat) and stat[2] == str(pid)


def test_ranks_die_with_a_killed_parent(tmp_path):
    # A notebook kernel killed with SIGKILL runs no finally: PR_SET_PDEATHSIG must act.
    code = "import dist_workers as w, course_lib.launch as l; l.run_distributed(w.hang_in_recv, 2)"
    # TMPDIR: a SIGKILLed parent cannot remove its run directory; leave it in tmp_path.
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), TMPDIR=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        end = time.monotonic() + 40
        ranks: list[int] = []
        while not (len(ranks) == 2 and all(map(armed, ranks))) and time.monotonic() < end:
            time.sleep(0.1)
            ranks = spawned_children(parent.pid)
        assert len(ranks) == 2 and all(map(armed, ranks)), "the ranks did not start"
    finally:
        parent.kill()
        parent.wait()
    end = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in ranks)


# ---- torchrun -------------------------------------------------------------------------


def test_run_under_torchrun_needs_its_environment(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not torchrun_env_present()
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        run_under_torchrun(workers.torchrun_sum)


def test_same_worker_under_torchrun(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(TESTS_DIR / "torchrun_worker.py"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [(tmp_path / f"rank{r}.txt").read_text().strip() for r in range(2)] == ["3", "3"]


# ---- every failure mode at every world size ------------------------------------------

EXPECTED_FAILURE = {
    "raise": ("RuntimeError: rank {last} fails on purpose", 1),
    "exit": ("exit code 3", 3),
    "abort": ("SIGABRT", -6),
}


@pytest.mark.parametrize("mode", ["raise", "exit", "abort"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_failure_modes_at_every_world_size(world_size, mode):
    last = world_size - 1
    with pytest.raises(RankError) as info:
        run_distributed(workers.fail_on_last_rank, world_size, mode, timeout_s=50)
    words, exitcode = EXPECTED_FAILURE[mode]
    assert (info.value.rank, info.value.exitcode) == (last, exitcode)
    message = str(info.value)
    assert message.startswith(f"rank {last} (of {world_size}) failed first")
    assert words.format(last=last) in message


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_deadline_at_other_world_sizes(world_size):
    with pytest.raises(DeadlineError) as info:
        run_distributed(workers.hang_at_any_size, world_size, timeout_s=12, pg_timeout_s=60)
    if "still starting up" not in str(info.value):  # a loaded machine may not start them
        assert info.value.running == list(range(world_size))
        assert all("in hang_at_any_size" in info.value.stacks[r] for r in range(world_size))
