"""Chapter 4's grader: the learner's synchronous server round, on real ranks, by the protocol.

The learner writes ``sync_round(shard, workers, lr)`` in ``my_ps.py``; :func:`grade_sync_round`
plugs it into :class:`course_lib.parallel.parameter_server.ParameterServer` (global ranks, no
subgroup) and trains the tiny GPT for three steps in each setup of servers and workers (by
default 1 server + 2 workers, then 2 servers + 2 workers: two servers own different shards).
It checks, with :mod:`course_lib.grading.core` turning every failure into a hint:

- the calls, on the server, while the learner's round runs: ``dist.irecv`` and ``dist.isend``
  are wrapped (``dist.recv`` / ``dist.send`` go through them), installed before the
  learner's module is imported. A receive must be a PUSH (tag ``PUSH``) from a worker's
  global rank (``src`` in ``workers``, or ``None``), once per worker, into ``HEADER + n``
  float32; a send must be a PARAMS reply (tag ``PARAMS``) of ``HEADER + n`` floats to a
  worker, once per worker, and only after every worker's push has arrived. Collectives
  and barriers raise (the workers are in none). A wrong call fails at once, naming it,
  instead of hanging;
- the round's result, on the server, after it returns: every worker got its reply; the
  return value is the pushes, a ``(W, HEADER + n)`` tensor whose row i is ``workers[i]``'s
  header; ``shard`` changed in place; every reply's header is ``[c + 1, c + 1, c + 1, mean
  loss]`` (``c`` the pushes' clock) and its payload is the updated shard;
- the training, in the parent: every worker's parameters and loss after every step against
  single-device SGD on the global batch (:class:`~course_lib.parallel.parameter_server.
  SGDReference`), within :data:`~course_lib.grading.core.RTOL` / ``ATOL``; a wrong update is
  told by its ratio to the right one (0: not in place, W: the sum, -1: the sign, k/W: only
  k workers' gradients, 1/lr: no learning rate);
- hangs: a rank that waits more than ``HANG_S`` for a message is a hint (every recv needs
  a matching send), whichever words the waiting rank's error uses.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from course_lib.data import get_batch, load_text, make_dataset
from course_lib.grading.core import ATOL, COLLECTIVES, RTOL, Case, forbid, grade, import_learner
from course_lib.model import GPTConfig
from course_lib.parallel.parameter_server import (
    HEADER,
    PARAMS,
    PUSH,
    ParameterServer,
    PSConfig,
    SGDReference,
)
from course_lib.train import TrainConfig, lr_at

MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
CONFIG = TrainConfig(steps=3, batch_size=12, seq_len=16, lr=0.3, min_lr=0.1, warmup_steps=0,
                     weight_decay=0.0, grad_clip=0.0)  # fmt: skip

# (servers, workers) graded by default: one world size each (one spawn each).
SETUPS = ((1, 2), (2, 2))

FIELDS = ("clock", "version", "updates", "loss")  # a message's header, field by field

HANG_HINT = (
    "every recv needs a matching send. In sync_round, receive exactly one PUSH from every "
    "worker (src = its global rank from `workers`, tag=PUSH) and wait for all of them, then "
    "send every worker exactly one PARAMS reply (dst = its rank, tag=PARAMS), wait for the "
    "sends and return: each worker waits for its reply before its next step."
)

ALLOWED = (
    "the workers wait for your PARAMS reply, they join no collective: use point-to-point "
    "calls (dist.irecv/dist.recv from each worker, dist.isend/dist.send to each worker)"
)


# ----------------------------------------------------------------------------------------
# On the server: the learner's calls, checked as they are made


class _Round:
    """What the learner's round did so far: one server, one step (filled by the wrappers)."""

    def __init__(self, shard: torch.Tensor, workers: list[int], where: str) -> None:
        self.numel, self.workers, self.where = HEADER + shard.numel(), list(workers), where
        self.posted: list[int | None] = []  # the src of every PUSH receive posted
        self.pushes: list[tuple[int | None, torch.Tensor]] = []  # (sender, push) received
        self.pending: list[_RecvWork] = []  # irecvs not yet seen complete
        self.replies: list[tuple[int, torch.Tensor]] = []  # (dst, reply) sent

    def fail(self, message: str) -> AssertionError:
        return AssertionError(f"{self.where}: {message}")

    def index_note(self, rank: int) -> str:
        if rank in range(len(self.workers)) and rank not in self.workers:
            return f" (that is worker index {rank}: use the rank, workers[{rank}])"
        return ""

    def check_buffer(self, tensor: torch.Tensor, what: str) -> None:
        if tensor.dtype != torch.float32 or tensor.numel() != self.numel:
            raise self.fail(
                f"{what} must be a float32 tensor of HEADER + n = {self.numel} elements "
                f"([clock, version, updates, loss, *shard]), got {tensor.dtype} with "
                f"{tensor.numel()} elements"
            )

    def check_recv(self, tensor: torch.Tensor, src: int | None, tag: int) -> None:
        if tag != PUSH:
            kind = " (PARAMS is the tag of your replies)" if tag == PARAMS else ""
            raise self.fail(
                f"a receive with tag={tag}{kind}: the workers' gradients come with tag=PUSH "
                f"(={PUSH}); a receive with another tag never matches and waits forever"
            )
        if src is not None and src not in self.workers:
            raise self.fail(
                f"a receive from src={src}, which is not a worker{self.index_note(src)}: "
                f"the workers are global ranks {self.workers}"
            )
        if src is not None and src in self.posted:
            raise self.fail(
                f"a second PUSH receive from worker rank {src} in one round: every worker "
                "pushes once per step, so receive once from each rank in `workers`"
            )
        if len(self.posted) == len(self.workers):
            raise self.fail(
                f"more than {len(self.workers)} PUSH receives in one round: receive exactly "
                "one push from each worker"
            )
        self.check_buffer(tensor, "the buffer of a PUSH receive")
        self.posted.append(src)

    def received(self, sender: int | None, tensor: torch.Tensor) -> None:
        self.pushes.append((sender, tensor.detach().clone()))

    def arrived(self) -> int:
        """Pushes received so far (irecvs that completed count, even if not waited)."""
        for work in list(self.pending):
            work.poll()
        return len(self.pushes)

    def check_send(self, tensor: torch.Tensor, dst: int | None, tag: int) -> None:
        if tag != PARAMS:
            kind = " (PUSH is the tag of the workers' pushes)" if tag == PUSH else ""
            raise self.fail(
                f"a send with tag={tag}{kind}: the workers receive their reply with "
                f"tag=PARAMS (={PARAMS}); a message with another tag is never received"
            )
        if dst not in self.workers:
            raise self.fail(
                f"a reply to dst={dst}, which is not a worker{self.index_note(dst)}: the "
                f"workers are global ranks {self.workers}"
            )
        if any(d == dst for d, _ in self.replies):
            raise self.fail(
                f"a second PARAMS reply to worker rank {dst} in one round: send each worker "
                "exactly one"
            )
        got = self.arrived()
        if got < len(self.workers):
            raise self.fail(
                f"a PARAMS reply sent when only {got} of the {len(self.workers)} workers' "
                "pushes had arrived: a synchronous round waits for every push (wait on every "
                "irecv request) before it averages, updates and replies"
            )
        self.check_buffer(tensor, "a PARAMS reply")
        self.replies.append((dst, tensor.detach().clone()))


class _RecvWork:
    """An irecv's request: records the push once it has arrived (wait, or is_completed)."""

    def __init__(self, work: Any, tensor: torch.Tensor, src: int | None, rnd: _Round) -> None:
        self._work, self._tensor, self._src, self._round = work, tensor, src, rnd
        self._done = False
        rnd.pending.append(self)

    def _record(self) -> None:
        if not self._done:
            self._done = True
            self._round.pending.remove(self)
            sender = self._src
            if sender is None:
                with contextlib.suppress(Exception):
                    sender = int(self._work._source_rank())
            self._round.received(sender, self._tensor)

    def poll(self) -> None:
        if self._work.is_completed():
            self._record()

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        result = self._work.wait(*args, **kwargs)
        self._record()
        return result

    def is_completed(self) -> bool:
        done = self._work.is_completed()
        if done:
            self._record()
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class _Watch:
    """``dist.isend`` / ``dist.irecv`` wrapped for the whole run (``send``/``recv`` call them);
    they check and record while a round is on (``self.round``), else pass through."""

    def __init__(self) -> None:
        self.round: _Round | None = None
        self.isend, self.irecv = c10d.isend, c10d.irecv
        self._isend_sig = inspect.signature(self.isend)
        self._irecv_sig = inspect.signature(self.irecv)

    @staticmethod
    def _peer(args: dict, name: str) -> int | None:
        peer, group_peer, group = args.get(name), args.get(f"group_{name}"), args.get("group")
        if peer is None and group_peer is not None:
            peer = group_peer if group is None else dist.get_global_rank(group, group_peer)
        return peer

    def wrapped_isend(self, *args: Any, **kwargs: Any) -> Any:
        rnd = self.round
        if rnd is not None:
            bound = self._isend_sig.bind(*args, **kwargs).arguments
            rnd.check_send(bound["tensor"], self._peer(bound, "dst"), bound.get("tag", 0))
        return self.isend(*args, **kwargs)

    def wrapped_irecv(self, *args: Any, **kwargs: Any) -> Any:
        rnd = self.round
        if rnd is None:
            return self.irecv(*args, **kwargs)
        bound = self._irecv_sig.bind(*args, **kwargs).arguments
        src = self._peer(bound, "src")
        rnd.check_recv(bound["tensor"], src, bound.get("tag", 0))
        work = self.irecv(*args, **kwargs)
        return None if work is None else _RecvWork(work, bound["tensor"], src, rnd)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        names = {"isend": self.wrapped_isend, "irecv": self.wrapped_irecv}
        saved = [(m, n, getattr(m, n)) for m in (dist, c10d) for n in names]
        for module, name, _ in saved:
            setattr(module, name, names[name])
        try:
            yield
        finally:
            for module, name, original in saved:
                setattr(module, name, original)


def _graded_round(fn: Callable, watch: _Watch, rank: int, setup: str) -> Callable:
    """The learner's ``sync_round``, checked: calls while it runs, its result after."""
    state = {"step": 0}
    forbidden = [(dist, name) for name in (*COLLECTIVES, "barrier", "monitored_barrier")]

    def server_round(shard: torch.Tensor, workers: list[int], lr: float) -> torch.Tensor:
        step = state["step"]
        rnd = _Round(shard, workers, f"step {step}, server rank {rank} ({setup})")
        before = shard.clone()
        watch.round = rnd
        try:
            with forbid(forbidden, ALLOWED):
                pushes = fn(shard, workers, lr)
        finally:
            watch.round = None
        _check_round(rnd, pushes, shard, before, lr)
        state["step"] += 1
        return pushes

    return server_round


def _check_round(
    rnd: _Round, pushes: Any, shard: torch.Tensor, before: torch.Tensor, lr: float
) -> None:
    """After the learner's round: replies, return value, in-place update, reply contents."""
    workers, n_rows = rnd.workers, len(rnd.workers)
    missing = [w for w in workers if w not in {d for d, _ in rnd.replies}]
    if missing:
        raise rnd.fail(
            f"worker rank(s) {missing} got no PARAMS reply (replies went to "
            f"{[d for d, _ in rnd.replies]}): send every worker in `workers` one reply"
        )
    shape = (n_rows, rnd.numel)
    if not isinstance(pushes, torch.Tensor) or tuple(pushes.shape) != shape:
        got = type(pushes).__name__
        if isinstance(pushes, torch.Tensor):
            got = f"a tensor of shape {tuple(pushes.shape)}"
        raise rnd.fail(
            f"sync_round returned {got}: return the pushes as received, one tensor of shape "
            f"(W, HEADER + n) = {shape}, row i from workers[i] (the server logs their headers)"
        )
    by_sender = {s: p for s, p in rnd.pushes}
    for i, w in enumerate(workers):
        if w in by_sender and not torch.equal(pushes[i, :HEADER], by_sender[w][:HEADER]):
            raise rnd.fail(
                f"row {i} of the returned pushes has the header {pushes[i, :HEADER].tolist()}, "
                f"but worker rank {w}'s push (workers[{i}]) has {by_sender[w][:HEADER].tolist()}"
                ": return the pushes unchanged, row i from workers[i]"
            )
    if torch.equal(shard, before):
        raise rnd.fail(
            "`shard` did not change: update it in place (shard.add_(grad, alpha=-lr) or "
            "shard -= lr * grad); `shard = shard - ...` only rebinds your local name, the "
            "server keeps the old parameters"
        )
    received = torch.stack([p for _, p in rnd.pushes])  # (W, HEADER + n)
    _check_update(rnd, received, shard, before, lr)
    clock = float(received[0, 0])
    mean_loss = float(received[:, 3].sum() / n_rows)
    for dst, reply in rnd.replies:
        _check_reply(rnd, dst, reply, clock, mean_loss, received, shard, before)


def _check_update(
    rnd: _Round, received: torch.Tensor, shard: torch.Tensor, before: torch.Tensor, lr: float
) -> None:
    """Wrong updates that only the pushes tell apart (the parent judges the rest by ratio):
    some workers' gradients left out, the header taken for gradient, no learning rate."""

    def is_update(grad: torch.Tensor, step: float = lr) -> bool:
        return torch.allclose(shard, before - step * grad, rtol=RTOL, atol=ATOL)

    grads, n_rows = received[:, HEADER:], len(rnd.workers)
    if is_update(grads.sum(0) / n_rows):
        return
    ranks = [s for s, _ in rnd.pushes]
    for size in range(1, n_rows):
        for rows in itertools.combinations(range(n_rows), size):
            part = grads[list(rows)].sum(0)
            if is_update(part / n_rows) or is_update(part / size):
                used = [ranks[i] for i in rows]
                raise rnd.fail(
                    f"the update holds the gradients of only {size} of the {n_rows} workers "
                    f"(ranks {used}): average the gradients of every push, all W rows of the "
                    "pushes, each after its receive has completed"
                )
    if is_update(received[:, : shard.numel()].sum(0) / n_rows):
        raise rnd.fail(
            "the update averages the first n floats of each push, header included: the "
            "gradient is the payload after the HEADER fields, pushes[:, HEADER:]"
        )
    if is_update(grads.sum(0) / n_rows, 1.0):
        raise rnd.fail(
            "the update is the mean gradient without the learning rate: "
            "theta <- theta - lr * mean(g)"
        )


def _check_reply(
    rnd: _Round,
    dst: int,
    reply: torch.Tensor,
    clock: float,
    mean_loss: float,
    received: torch.Tensor,
    shard: torch.Tensor,
    before: torch.Tensor,
) -> None:
    """One PARAMS reply: header ``[c + 1, c + 1, c + 1, mean loss]``, payload the new shard."""
    to = f"the PARAMS reply to worker rank {dst}"
    for field in range(3):
        if float(reply[field]) != clock + 1:
            note = " (the pushes' clock itself: add one)" if float(reply[field]) == clock else ""
            raise rnd.fail(
                f"header field {field} ({FIELDS[field]}) of {to} is {float(reply[field]):g}, "
                f"expected c + 1 = {clock + 1:g}{note}: c is the pushes' clock (field 0), and "
                "clock, version and updates all become c + 1 after this round's one update"
            )
    loss, n = float(reply[3]), len(rnd.workers)
    if abs(loss - mean_loss) > ATOL + RTOL * abs(mean_loss):
        losses = received[:, 3]
        total = float(losses.sum())
        if n > 1 and abs(loss - total) <= ATOL + RTOL * abs(total):
            why = "you sent the sum of the workers' losses: divide by W"
        elif any(abs(loss - float(v)) <= ATOL for v in losses):
            why = "you sent one worker's loss: average field 3 over all the pushes"
        else:
            why = "the mean of field 3 over the pushes is the global batch's loss"
        raise rnd.fail(
            f"header field 3 (loss) of {to} is {loss:.6f}, expected the mean of the "
            f"{n} pushed losses, {mean_loss:.6f}: {why}"
        )
    payload = reply[HEADER:]
    if not torch.equal(payload, shard):
        if torch.equal(payload, before):
            raise rnd.fail(
                f"the payload of {to} is the shard from before the update: build the reply "
                "(message([...], shard)) after updating shard"
            )
        raise rnd.fail(
            f"the payload of {to} is not your updated `shard` (differs by up to "
            f"{(payload - shard).abs().max():.3g}): reply with message([c + 1, c + 1, c + 1, "
            "mean_loss], shard) after the update"
        )


# ----------------------------------------------------------------------------------------
# On every rank: the training run


def _run(strategy, data, steps: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Losses and named parameters after every step (the same loop on ranks and here)."""
    losses, params, cfg = [], [], CONFIG
    for step in range(steps):
        x, y = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step,
                         strategy.data_rank, strategy.data_world_size)  # fmt: skip
        losses.append(strategy.train_step(x, y, lr_at(step, cfg)))
        params.append({k: v.detach().clone() for k, v in strategy.model.named_parameters()})
    return losses, params


def _describe(n_servers: int, n_workers: int) -> str:
    servers = "1 server" if n_servers == 1 else f"{n_servers} servers"
    return f"{servers} + {n_workers} worker{'s' * (n_workers != 1)}"


def _grade_worker(
    ctx,
    case: Case,
    group,
    cwd: str,
    module_name: str,
    fn_name: str,
    servers_by_size: dict[int, int],
) -> dict | None:
    """On each rank: the parameter server with the learner's ``sync_round`` on the servers."""
    torch.set_num_threads(1)
    n_servers = servers_by_size[case.world_size]
    setup = _describe(n_servers, case.world_size - n_servers)
    watch = _Watch()
    with watch.installed():  # before the import: `from torch.distributed import isend` too
        fn = getattr(import_learner(cwd, module_name), fn_name)
        graded = _graded_round(fn, watch, ctx.rank, setup)
        strategy = ParameterServer(ctx, PSConfig(n_servers=n_servers), server_round=graded)
        strategy.setup(MODEL, CONFIG, "cpu")
        losses, params = _run(strategy, make_dataset(load_text()).train, CONFIG.steps)
    return None if strategy.is_server else {"losses": losses, "params": params}


# ----------------------------------------------------------------------------------------
# In the parent: the training against single-device SGD


@functools.cache
def _reference() -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """SGD's losses and parameters; parameters[0] is the initial model, then every step."""
    torch.set_num_threads(1)  # as on the ranks: matmuls then add in the same order
    strategy = SGDReference()
    strategy.setup(MODEL, CONFIG, "cpu")
    start = {k: v.detach().clone() for k, v in strategy.model.named_parameters()}
    losses, params = _run(strategy, make_dataset(load_text()).train, CONFIG.steps)
    return losses, [start, *params]


def _hint(
    got: torch.Tensor, want: torch.Tensor, before: torch.Tensor, n_workers: int, lr: float
) -> str:
    """What a wrong update looks like, from its ratio to the right one."""
    moved, should = (got - before).flatten(), (want - before).flatten()
    ratio = float(moved @ should / (should @ should).clamp_min(1e-30))

    def near(value: float) -> bool:
        return abs(ratio - value) < 0.05 * max(abs(value), 0.2)

    if moved.abs().max() == 0:
        return "the parameters did not move: update `shard` in place (shard.add_ / shard -= ...)"
    if n_workers > 1 and near(n_workers):
        return f"the update is {n_workers}x too large: divide the summed gradients by W"
    if near(-1):
        return "the update has the wrong sign: theta <- theta - lr * mean(g)"
    for k in range(1, n_workers):
        if near(k / n_workers):
            return (
                f"the update is {ratio:.3f} times the expected one, about {k}/{n_workers}: it "
                f"holds only {k} of the {n_workers} workers' gradients (summed over too few "
                "pushes, or averaged before every push had arrived; or divided by W twice)"
            )
    if near(1 / lr):
        return (
            f"the update is {ratio:.3f} times the expected one, about 1/lr: multiply the mean "
            "gradient by lr"
        )
    return (
        f"the update is {ratio:.3f} times the expected one (1 is right; {n_workers}: the sum "
        f"instead of the mean; about k/{n_workers}: the gradients of only k of the "
        f"{n_workers} workers, e.g. averaged before every push had arrived; -1: the sign): "
        "theta <- theta - lr * mean(g), g = pushes[:, HEADER:] after every receive completed"
    )


def _compare(results: list[dict], n_servers: int) -> None:
    ref_losses, ref_params = _reference()
    n_workers = len(results)
    setup = _describe(n_servers, n_workers)
    for step in range(CONFIG.steps):
        for w, r in enumerate(results):
            rank = n_servers + w
            for name, want in ref_params[step + 1].items():
                got = r["params"][step][name]
                if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                    hint = _hint(got, want, ref_params[step][name], n_workers,
                                 lr_at(step, CONFIG))  # fmt: skip
                    raise AssertionError(
                        f"with {setup}: step {step}, worker rank {rank}: parameter {name!r} "
                        f"differs from single-device SGD by up to {(got - want).abs().max():.3g}"
                        f". {hint}"
                    )
            if abs(r["losses"][step] - ref_losses[step]) > ATOL + RTOL * abs(ref_losses[step]):
                raise AssertionError(
                    f"with {setup}: step {step}, worker rank {rank}: the loss in your reply is "
                    f"{r['losses'][step]:.6f}, expected the mean of the workers' losses, "
                    f"{ref_losses[step]:.6f} (header field 3 of every PARAMS reply)"
                )


def grade_sync_round(
    module_name: str = "my_ps",
    fn_name: str = "sync_round",
    setups: Sequence[tuple[int, int]] = SETUPS,
    world_size: int | None = None,
    n_servers: int = 1,
) -> None:
    """Chapter 4's graded exercise: train through the learner's ``sync_round`` with every
    ``(servers, workers)`` of ``setups`` and check calls, replies and every step against SGD.

    ``world_size`` (with ``n_servers``) grades that one setup instead. One spawn per setup;
    setups must differ in world size. Raises ``NotImplementedError`` for the stub and an
    ``AssertionError`` naming the mistake otherwise; prints one OK line per setup.
    """
    if world_size is not None:
        setups = ((n_servers, world_size - n_servers),)
    servers_by_size: dict[int, int] = {}
    for servers, workers in setups:
        if servers < 1 or workers < 1 or servers + workers in servers_by_size:
            raise ValueError(f"setups={setups!r}: each needs >= 1 server and >= 1 worker, and "
                             "a world size of its own")  # fmt: skip
        servers_by_size[servers + workers] = servers
    cases = [Case(size) for size in servers_by_size]
    results = grade(_grade_worker, cases, os.getcwd(), module_name, fn_name, servers_by_size,
                    what=fn_name, module_name=module_name, hang_hint=HANG_HINT)  # fmt: skip
    for case, ranks in results:
        servers = servers_by_size[case.world_size]
        _compare([r for r in ranks if r is not None], servers)
        setup = _describe(servers, case.world_size - servers)
        print(f"OK: {fn_name} trains like single-device SGD for {CONFIG.steps} steps ({setup})")
