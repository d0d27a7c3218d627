"""The distributed launch harness: run one function on N ranks and get N results back.

Chapter 0 introduces :func:`run_distributed`, the call every notebook makes to run real
``torch.distributed`` code on a laptop (gloo, CPU) or a GPU box (NCCL). Chapter 1 shows the
same worker running unchanged under ``torchrun`` through :func:`run_under_torchrun`.

How one run works (DESIGN.md section 4):

* The parent opens a ``TCPStore`` on a port the OS picks (port 0), so two runs never fight
  over a fixed port, and spawns ``world_size`` fresh interpreters (multiprocessing *spawn*).
* Each rank receives the worker as a *reference* ``(module, qualname)`` plus the pickled
  arguments; it imports and unpickles them inside its own error handling, so a worker
  defined in a notebook comes back as a readable error, not "exit code 1".
* A rank writes its pickled result, or its traceback, to a file in a private temp dir.
  The parent polls every 20 ms; at the first failure it kills every rank at once and
  raises one :class:`RankError` that names the rank that failed first. A rank that dies
  without a traceback (``os._exit``, a signal such as gloo's ``SIGABRT`` on a collective
  size mismatch) is reported with its exit code, its stderr tail and its crash stack.
* At the hard deadline the parent asks each live rank for its Python stack (faulthandler
  on ``SIGUSR1``), kills them all and raises :class:`DeadlineError` with the stacks.
* No rank outlives the call: every path ends in a kill, children die with the parent
  (``PR_SET_PDEATHSIG`` on Linux) and each rank leads its own process group, so helper
  processes it started (data loader workers) are killed with it.

Each rank's stderr goes to a file that the parent forwards, line by line and prefixed with
``[rank r]``, to its own ``sys.stderr``: in a notebook that is the cell, not the kernel's
terminal where it would otherwise be lost.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")
_POLL_S = 0.02  # how often the parent looks at its ranks
_STACK_WAIT_S = 1.0  # how long the parent waits for stack dumps at the deadline
_EXIT_GRACE_S = 5.0  # how long ranks that returned may take to exit before being killed
_TAIL_LINES = 25  # stderr lines quoted for a rank that died without a traceback
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_NEVER_STARTED = (
    "The rank died before the harness started in it, while Python was importing the "
    "launching script (as __mp_main__) or the harness; its error went to the terminal's "
    'stderr. A script that launches ranks must do so under `if __name__ == "__main__":`.'
)


class RankError(RuntimeError):
    """Chapter 0: one or more ranks failed; the message leads with the rank that failed first.

    ``rank`` is that rank, ``exitcode`` its exit code (1 for a Python exception, ``-N``
    for death by signal N) and ``tracebacks`` maps every failed rank to its full report.
    """

    def __init__(self, message: str, rank: int, exitcode: int, tracebacks: dict[int, str]):
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode
        self.tracebacks = tracebacks

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.rank, self.exitcode, self.tracebacks)


class DeadlineError(TimeoutError):
    """Chapter 0: the run passed its deadline; the message holds every live rank's stack.

    ``timeout_s`` is the deadline, ``running`` the ranks still running at that moment and
    ``stacks`` their Python stacks as dumped by faulthandler.
    """

    def __init__(self, message: str, timeout_s: float, running: list[int], stacks: dict[int, str]):
        super().__init__(message)
        self.timeout_s = timeout_s
        self.running = running
        self.stacks = stacks

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.timeout_s, self.running, self.stacks)


@dataclass(frozen=True)
class DistContext:
    """Chapter 0: what a worker knows about its place in the run; its first argument."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # number of ranks in the run
    local_rank: int  # rank on this machine (equals rank under run_distributed)
    device: torch.device  # where this rank's tensors live
    backend: str  # "gloo" or "nccl"

    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and saves."""
        return self.rank == 0


@dataclass(frozen=True)
class _RankSpec:
    """Everything one spawned rank needs; pickled by multiprocessing into the child."""

    rank: int
    world_size: int
    backend: str
    device: str  # resolved per rank by the parent, e.g. "cpu" or "cuda:1"
    store_port: int  # the parent's TCPStore
    pg_timeout_s: float
    threads: int  # torch.set_num_threads in the rank
    run_dir: str  # private temp dir for results, errors, stacks and stderr
    fn_module: str
    fn_qualname: str
    payload: bytes  # pickle.dumps((args, kwargs))
    parent_pid: int


def _rank_file(run_dir: str | Path, rank: int, kind: str) -> Path:
    """Path of one rank's file of the given kind: result, error, stack, fault or stderr."""
    return Path(run_dir) / f"rank{rank}.{kind}"


# ----------------------------------------------------------------------------------------
# Checks made in the parent, before anything is spawned


def _visible_gpus() -> int:
    """Number of CUDA devices this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _choose_backend(backend: str, ranks_per_node: int, gpus: int) -> str:
    """Chapter 0: "auto" means NCCL when every rank on this machine gets its own GPU, else gloo.

    Two NCCL ranks on one GPU fail deep inside NCCL ("Duplicate GPU detected"), so an
    explicit ``backend="nccl"`` without one GPU per rank is refused here, before spawning.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "nccl" if 0 < ranks_per_node <= gpus else "gloo"
    if backend == "nccl" and ranks_per_node > gpus:
        raise ValueError(
            f"backend='nccl' needs one GPU per rank (two ranks on one GPU fail with NCCL's "
            f"'Duplicate GPU detected'), but {ranks_per_node} ranks were asked for and "
            f"{gpus} GPU(s) were found. Use backend='gloo' (add device='cuda' to keep the "
            f"tensors on the GPU) or at most {gpus} ranks."
        )
    return backend


def _resolve_device(device: str | None, backend: str, rank: int, local_rank: int, gpus: int) -> str:
    """Chapter 0: the device of one rank.

    ``None`` means ``cuda:local_rank`` with NCCL and ``cpu`` with gloo; ``"cuda"`` with
    gloo shares the GPUs round robin (``cuda:rank % gpus``).
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
    if backend == "nccl":
        if device == "cpu":
            raise ValueError("backend='nccl' works on CUDA tensors only; use device='cuda'")
        return f"cuda:{local_rank}"
    if device == "cuda":
        if gpus == 0:
            raise ValueError("device='cuda' was asked for but no CUDA GPU is visible")
        return f"cuda:{rank % gpus}"
    return "cpu"


def _function_reference(fn: Callable[..., Any]) -> tuple[str, str]:
    """Chapter 0: ``(module, qualname)`` by which a spawned rank imports the worker.

    Spawned ranks are fresh interpreters: they can only find a function that lives at the
    top level of an importable ``.py`` file. Notebook cells, lambdas and nested functions
    are refused here with the fix, instead of failing later inside every rank.
    """
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or module is None or qualname is None:
        raise ValueError(f"run_distributed needs a plain function, got {fn!r}")
    if "<" in qualname:  # "<lambda>", "outer.<locals>.inner"
        raise ValueError(
            f"worker {qualname!r} is a lambda or a nested function; spawned ranks import "
            f"the worker by name, so define it with `def` at the top level of a .py module"
        )
    if module == "__main__" and not hasattr(sys.modules.get("__main__"), "__file__"):
        raise ValueError(
            f"worker {qualname!r} is defined in a notebook (or an interactive session); "
            f"spawned ranks cannot import functions defined there. Move {qualname!r} into "
            f"a .py module (e.g. my_workers.py next to the notebook) and import it from there"
        )
    return module, qualname


def _pickle_arguments(args: tuple, kwargs: dict[str, Any]) -> bytes:
    """The worker's arguments as bytes, with a hint when they cannot be pickled."""
    try:
        return pickle.dumps((args, kwargs))
    except Exception as err:
        err.add_note("run_distributed pickles the worker's arguments to send them to each rank")
        raise


def default_pg_timeout(timeout_s: float, pg_timeout_s: float | None) -> float:
    """Chapter 0: the process-group timeout used when the caller gives none.

    ``min(timeout_s, 60)``. The harness deadline runs from the spawn, the process group's
    clock only from its rendezvous (a second or more later), so with a short ``timeout_s``
    the deadline fires first and reports every live rank's stack. With the default
    ``timeout_s=120`` a stuck collective instead fails after 60 s with gloo's own error
    ("Timed out waiting 60000ms for recv operation"), and the deadline is the backstop.
    """
    if pg_timeout_s is not None:
        return pg_timeout_s
    return min(timeout_s, 60.0)


def _check_numbers(
    world_size: int, timeout_s: float, pg_timeout_s: float | None, threads_per_rank: int | None
) -> None:
    """Refuse impossible sizes and timeouts before anything is spawned."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if pg_timeout_s is not None and not pg_timeout_s > 0:
        raise ValueError(f"pg_timeout_s must be > 0 seconds, got {pg_timeout_s!r}")
    if threads_per_rank is not None and threads_per_rank < 1:
        raise ValueError(f"threads_per_rank must be >= 1, got {threads_per_rank!r}")


# ----------------------------------------------------------------------------------------
# Code that runs inside each spawned rank


def _die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGKILL when the parent dies, so a killed kernel leaves no ranks behind.

    The signal follows the parent *thread* that spawned us; run_distributed never returns
    before its ranks are gone, so that thread outlives them. A parent killed while the rank
    was still importing torch (before this runs) is caught by the ``getppid`` check.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    os.setpgrp()  # lead a process group, so the parent can kill our helpers with us


def _redirect_stderr(path: Path) -> None:
    """Send fd 2 (Python's and C++'s stderr) to ``path``, which the parent forwards."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see the whole file or none of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _report_error(spec: _RankSpec) -> None:
    """Write the exception being handled, with a time stamp, as this rank's error file.

    The first report wins: an error re-raised after cleanup does not overwrite it.
    """
    path = _rank_file(spec.run_dir, spec.rank, "error")
    if path.exists():
        return
    report = {"traceback": traceback.format_exc(), "time": time.time()}
    _write_atomic(path, pickle.dumps(report))


def _resolve_function(module_name: str, qualname: str) -> Callable[..., Any]:
    """Import the worker by name, as the parent described it."""
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise AttributeError(
                f"Can't get attribute {qualname!r} on module {module_name!r} "
                f"({getattr(module, '__file__', 'no file')}): spawned ranks import the worker "
                f"by name, so it must be defined at the top level of an importable .py file"
            )
        obj = getattr(obj, part)
    return obj


def _run_rank(spec: _RankSpec) -> Any:
    """Chapter 0: set up one rank, join the process group, call the worker, tear down."""
    torch.set_num_threads(spec.threads)
    fn = _resolve_function(spec.fn_module, spec.fn_qualname)
    args, kwargs = pickle.loads(spec.payload)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=spec.pg_timeout_s)
    store = dist.TCPStore("127.0.0.1", spec.store_port, is_master=False, timeout=timeout)
    dist.init_process_group(
        spec.backend, store=store, rank=spec.rank, world_size=spec.world_size, timeout=timeout
    )
    ctx = DistContext(spec.rank, spec.world_size, spec.rank, device, spec.backend)
    try:
        return fn(ctx, *args, **kwargs)
    except BaseException:
        _report_error(spec)  # tell the parent now: the teardown below may block
        raise
    finally:
        dist.destroy_process_group()


def _rank_main(spec: _RankSpec) -> None:
    """Entry point of a spawned rank: run it, then leave a result file or an error file."""
    _die_with_parent(spec.parent_pid)
    _redirect_stderr(_rank_file(spec.run_dir, spec.rank, "stderr"))
    stack_path = _rank_file(spec.run_dir, spec.rank, "stack")
    fault_path = _rank_file(spec.run_dir, spec.rank, "fault")
    with open(stack_path, "w") as stack_file, open(fault_path, "w") as fault_file:
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
        faulthandler.enable(file=fault_file, all_threads=True)
        try:
            result = _run_rank(spec)
            _write_atomic(_rank_file(spec.run_dir, spec.rank, "result"), pickle.dumps(result))
        except BaseException:
            _report_error(spec)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # skip interpreter shutdown: the parent is killing the run anyway


# ----------------------------------------------------------------------------------------
# The parent: watch the ranks, forward their stderr, collect results or failures


@dataclass
class _Ranks:
    """The parent's view of one run's processes (local to one run_distributed call)."""

    procs: list[BaseProcess]
    run_dir: str
    last_alive: list[float] = field(init=False)  # wall time each rank was last seen running
    stderr_pos: list[int] = field(init=False)  # bytes of each rank's stderr forwarded so far
    stderr_rest: list[bytes] = field(init=False)  # each rank's unfinished last stderr line

    def __post_init__(self) -> None:
        n = len(self.procs)
        self.last_alive, self.stderr_pos, self.stderr_rest = [time.time()] * n, [0] * n, [b""] * n

    def has(self, rank: int, kind: str) -> bool:
        """Whether rank ``rank`` has written its file of this kind."""
        return _rank_file(self.run_dir, rank, kind).exists()


def _spawn(specs: list[_RankSpec]) -> _Ranks:
    """Start one spawned process per rank spec."""
    ctx = get_context("spawn")
    procs: list[BaseProcess] = []
    try:
        for spec in specs:
            proc = ctx.Process(target=_rank_main, args=(spec,), name=f"rank{spec.rank}")
            procs.append(proc)  # before start: an interrupt in between still kills it
            proc.start()
    except BaseException:
        _kill_all(_Ranks(procs, specs[0].run_dir))
        raise
    return _Ranks(procs, specs[0].run_dir)


def _kill_all(ranks: _Ranks) -> None:
    """SIGKILL every rank (and its process group) still running, then reap them all."""
    for proc in ranks.procs:
        if proc.pid is None or proc.exitcode is not None:
            continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the rank and any helpers it started
        except (ProcessLookupError, PermissionError):
            pass  # the rank had not made its own group yet
        proc.kill()
    for proc in ranks.procs:
        if proc.pid is not None:
            proc.join(timeout=10)


def _forward_stderr(ranks: _Ranks, final: bool = False) -> None:
    """Copy new complete lines of each rank's stderr to ours, prefixed with the rank."""
    for rank in range(len(ranks.procs)):
        path = _rank_file(ranks.run_dir, rank, "stderr")
        if not path.exists():
            continue
        with open(path, "rb") as f:
            f.seek(ranks.stderr_pos[rank])
            data = ranks.stderr_rest[rank] + f.read()
            ranks.stderr_pos[rank] = f.tell()
        lines = data.split(b"\n")
        ranks.stderr_rest[rank] = lines.pop()  # b"" when the data ends with a newline
        if final and ranks.stderr_rest[rank]:
            lines.append(ranks.stderr_rest[rank])
        for line in lines:
            sys.stderr.write(f"[rank {rank}] {line.decode(errors='replace')}\n")
    sys.stderr.flush()


def _failed_ranks(ranks: _Ranks) -> dict[int, int | None]:
    """Ranks that failed so far, mapped to their exit code (None while still exiting)."""
    failed: dict[int, int | None] = {}
    for rank, proc in enumerate(ranks.procs):
        code = proc.exitcode
        if ranks.has(rank, "result"):
            continue  # it returned; how its interpreter exits no longer matters
        if ranks.has(rank, "error") or (code is not None and code != 0):
            failed[rank] = code
        elif code == 0:
            failed[rank] = 0  # exited "successfully" without returning (os._exit(0))
    return failed


def _supervise(ranks: _Ranks, timeout_s: float) -> None:
    """Chapter 0: poll the ranks until all returned; raise at the first failure or the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = time.time()  # taken before looking, so "alive at now" is a true statement
        _forward_stderr(ranks)
        failed = _failed_ranks(ranks)
        if failed:
            raise _rank_error(ranks, failed)
        if all(ranks.has(rank, "result") for rank in range(len(ranks.procs))):
            return
        if time.monotonic() >= deadline:
            raise _deadline_error(ranks, timeout_s)
        for rank, proc in enumerate(ranks.procs):
            if proc.exitcode is None:
                ranks.last_alive[rank] = now
        time.sleep(_POLL_S)


def _await_exit(ranks: _Ranks) -> None:
    """Give ranks that returned a moment to exit cleanly, then kill what is left."""
    end = time.monotonic() + _EXIT_GRACE_S
    for proc in ranks.procs:
        proc.join(timeout=max(0.0, end - time.monotonic()))
    _kill_all(ranks)


# ----------------------------------------------------------------------------------------
# Turning what the ranks left behind into one readable exception


@dataclass(frozen=True)
class _Failure:
    """One failed rank as the parent reports it."""

    rank: int
    when: float  # wall time of the failure (error stamp, crash dump, or last seen alive)
    exitcode: int
    report: str  # full text: the traceback, or how it died plus its stderr tail
    summary: str  # one line for the "other ranks" list


def _last_line(text: str, width: int = 200) -> str:
    """The last non-empty line of ``text``, shortened to ``width`` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else "(no output)"
    return line if len(line) <= width else line[: width - 3] + "..."


def _stderr_tail(run_dir: str, rank: int) -> str:
    """The last lines this rank wrote to stderr (C++ abort messages land here)."""
    path = _rank_file(run_dir, rank, "stderr")
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-_TAIL_LINES:])


def _rank_list(ranks: list[int]) -> str:
    """ "rank 0" or "ranks 0, 2"."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _describe_exit(exitcode: int) -> str:
    """Chapter 0: "exit code 3" or "signal SIGABRT (exit code -6)"."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"signal {name} (exit code {exitcode})"
    return f"exit code {exitcode}"


def _traceback_failure(run_dir: str, rank: int, exitcode: int | None) -> _Failure:
    """A rank that raised: its own traceback and time stamp."""
    report = pickle.loads(_rank_file(run_dir, rank, "error").read_bytes())
    text = report["traceback"]
    code = 1 if exitcode is None or exitcode == -signal.SIGKILL else exitcode
    return _Failure(rank, report["time"], code, text, _last_line(text))


def _death_failure(ranks: _Ranks, rank: int, exitcode: int) -> _Failure:
    """A rank that died without a Python traceback: exit code, crash stack, stderr tail.

    Its time is the crash dump's, or else the last poll that saw it alive: errors that
    peers raise after it died ("Connection reset by peer") then sort after it.
    """
    how = _describe_exit(exitcode)
    head = f"rank {rank} died from {how} without a Python traceback"
    if exitcode == 0:
        head = f"rank {rank} exited (exit code 0) before its worker returned"
    parts, when = [head], ranks.last_alive[rank]
    fault = _rank_file(ranks.run_dir, rank, "fault")
    if fault.exists() and fault.stat().st_size > 0:
        dump = fault.read_text(errors="replace").split("\nExtension modules:")[0]
        parts.append("Python stack at the crash:\n" + dump.strip())
        when = fault.stat().st_mtime
    tail = _stderr_tail(ranks.run_dir, rank)
    if tail:
        parts.append(f"last lines of rank {rank}'s stderr:\n{tail}")
    if not _rank_file(ranks.run_dir, rank, "stderr").exists():
        parts.append(_NEVER_STARTED)
    return _Failure(rank, when, exitcode, "\n".join(parts), head)


def _rank_error(ranks: _Ranks, failed: dict[int, int | None]) -> RankError:
    """Chapter 0: kill the run and build one RankError, the first failure leading."""
    _kill_all(ranks)
    _forward_stderr(ranks, final=True)
    failures = []
    for rank in range(len(ranks.procs)):
        if ranks.has(rank, "error"):
            failures.append(_traceback_failure(ranks.run_dir, rank, failed.get(rank)))
        elif rank in failed:
            failures.append(_death_failure(ranks, rank, failed[rank] or 0))
    failures.sort(key=lambda f: (f.when, f.rank))
    first = failures[0]
    body = first.report.removeprefix(first.summary).strip("\n")
    lines = [
        f"rank {first.rank} (of {len(ranks.procs)}) failed first: {first.summary}",
        "",
        body.rstrip(),
    ]
    if len(failures) > 1:
        lines += ["", "Other ranks that failed after it (usually as a consequence):"]
        lines += [f"  rank {f.rank}: {f.summary}" for f in failures[1:]]
    stopped = sorted(set(range(len(ranks.procs))) - {f.rank for f in failures})
    if stopped:
        lines += ["", f"Stopped by the harness: {_rank_list(stopped)}."]
    tracebacks = {f.rank: f.report for f in failures}
    return RankError("\n".join(lines), first.rank, first.exitcode, tracebacks)


def _dump_stacks(ranks: _Ranks, running: list[int]) -> dict[int, str]:
    """Ask each running rank for its Python stack (SIGUSR1) and read what they wrote."""
    for rank in running:
        try:
            os.kill(ranks.procs[rank].pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    paths = {rank: _rank_file(ranks.run_dir, rank, "stack") for rank in running}
    end = time.monotonic() + _STACK_WAIT_S
    while time.monotonic() < end:
        if all(p.exists() and p.stat().st_size > 0 for p in paths.values()):
            time.sleep(0.1)  # let the last threads' frames land
            break
        time.sleep(_POLL_S)
    return {rank: _read_stack(path) for rank, path in paths.items()}


def _read_stack(path: Path) -> str:
    """One rank's faulthandler dump, or why there is none."""
    stack = path.read_text(errors="replace").strip() if path.exists() else ""
    return stack or (
        "(no stack: the rank was still starting up; spawning and importing torch take "
        "seconds per rank on a busy machine, so the deadline may be too short)"
    )


def _deadline_error(ranks: _Ranks, timeout_s: float) -> DeadlineError:
    """Chapter 0: dump the live ranks' stacks, kill the run, build one DeadlineError."""
    n = len(ranks.procs)
    running = [
        r
        for r, proc in enumerate(ranks.procs)
        if proc.exitcode is None and not ranks.has(r, "result")
    ]
    stacks = _dump_stacks(ranks, running)
    _kill_all(ranks)
    _forward_stderr(ranks, final=True)
    lines = [
        f"run_distributed passed its deadline of timeout_s={timeout_s:g} s; "
        f"still running: {_rank_list(running)} (of {n}). "
        f"All ranks were killed. Their Python stacks at the deadline:"
    ]
    for rank, stack in stacks.items():
        lines += ["", f"--- rank {rank} ---", stack]
    return DeadlineError("\n".join(lines), timeout_s, running, stacks)


def _collect_results(run_dir: str, world_size: int) -> list:
    """Every rank's return value, in rank order."""
    return [
        pickle.loads(_rank_file(run_dir, rank, "result").read_bytes()) for rank in range(world_size)
    ]


# ----------------------------------------------------------------------------------------
# The public entry points


def _rank_specs(
    fn: Callable[..., Any],
    world_size: int,
    payload: bytes,
    backend: str,
    device: str | None,
    pg_timeout_s: float,
    threads: int,
    run_dir: str,
    port: int,
) -> list[_RankSpec]:
    """One spec per rank; raises ValueError on a bad backend or device, before spawning."""
    gpus = _visible_gpus()
    chosen = _choose_backend(backend, world_size, gpus)
    module, qualname = _function_reference(fn)
    return [
        _RankSpec(
            rank=rank,
            world_size=world_size,
            backend=chosen,
            device=_resolve_device(device, chosen, rank, rank, gpus),
            store_port=port,
            pg_timeout_s=pg_timeout_s,
            threads=threads,
            run_dir=run_dir,
            fn_module=module,
            fn_qualname=qualname,
            payload=payload,
            parent_pid=os.getpid(),
        )
        for rank in range(world_size)
    ]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "auto",
    device: str | None = None,
    timeout_s: float = 120.0,
    pg_timeout_s: float | None = None,
    threads_per_rank: int | None = None,
    **kwargs: Any,
) -> list:
    """Chapter 0: run ``fn(ctx, *args, **kwargs)`` on ``world_size`` ranks; return their results.

    ``fn`` must be a top-level function of an importable ``.py`` module. Results come back
    in rank order (pickled, so return CPU tensors or plain values). ``backend="auto"``
    picks NCCL when every rank gets its own GPU, else gloo; ``device`` is None, "cpu" or
    "cuda". ``timeout_s`` is a hard deadline for the whole call; ``pg_timeout_s`` is the
    process group's timeout (see :func:`default_pg_timeout`). Each rank uses
    ``threads_per_rank`` torch threads (default: the cores shared out evenly).

    Raises :class:`RankError` when a rank fails and :class:`DeadlineError` at the deadline;
    in every case no rank outlives the call.
    """
    _check_numbers(world_size, timeout_s, pg_timeout_s, threads_per_rank)
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    payload = _pickle_arguments(args, kwargs)
    pg_timeout = default_pg_timeout(timeout_s, pg_timeout_s)
    with tempfile.TemporaryDirectory(prefix="course_launch_") as run_dir:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        specs = _rank_specs(
            fn, world_size, payload, backend, device, pg_timeout, threads, run_dir, store.port
        )
        ranks = _spawn(specs)
        try:
            _supervise(ranks, timeout_s)
            _await_exit(ranks)
        finally:
            _kill_all(ranks)  # also on KeyboardInterrupt
        return _collect_results(run_dir, world_size)


@dataclass(frozen=True)
class _TorchrunEnv:
    """The variables torchrun sets for each worker process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _torchrun_env() -> _TorchrunEnv | None:
    """Read torchrun's variables; None when this process was not started by torchrun."""
    env = os.environ
    needed = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if not all(name in env for name in needed):
        return None
    local_world = env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])
    return _TorchrunEnv(
        int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), int(local_world)
    )


def torchrun_env_present() -> bool:
    """Chapter 1: True when this process is a worker started by ``torchrun``."""
    return _torchrun_env() is not None


def run_under_torchrun(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Chapter 1: run ``fn(ctx, *args, **kwargs)`` as this torchrun worker; return its result.

    The same worker code as under :func:`run_distributed`: rank, world size and local rank
    come from torchrun's environment, the rendezvous from ``MASTER_ADDR``/``MASTER_PORT``
    (``init_method="env://"``), the backend as ``"auto"`` (NCCL on ``cuda:LOCAL_RANK`` when
    this node has a GPU per local rank, else gloo on CPU). torch's default process-group
    timeout applies; torchrun itself watches the workers.
    """
    env = _torchrun_env()
    if env is None:
        raise RuntimeError(
            "run_under_torchrun needs torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR, MASTER_PORT): launch with `torchrun --nproc-per-node N script.py`, "
            "or call run_distributed(fn, N) from a notebook or script instead"
        )
    gpus = _visible_gpus()
    backend = _choose_backend("auto", env.local_world_size, gpus)
    device = torch.device(_resolve_device(None, backend, env.rank, env.local_rank, gpus))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    ctx = DistContext(env.rank, env.world_size, env.local_rank, device, backend)
    try:
        return fn(ctx, *args, **kwargs)
    finally:
        dist.destroy_process_group()
