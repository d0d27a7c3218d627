"""The parameter server: synchronous, asynchronous and bounded-staleness SGD (chapter 4).

Roles on one process group: ranks ``0 .. S-1`` are servers, each owning whole parameter
tensors (:func:`partition`); ranks ``S .. S+W-1`` are workers holding a full copy of the
model. Every step a worker computes the gradient of its slice of the global batch, PUSHES
shard ``j`` of it to server ``j`` and waits for server ``j``'s reply: the shard's new
parameters (the PULL). The server's update is plain SGD, the chapter's maths:

* ``sync``:  wait for all W pushes, then ``theta <- theta - lr * mean_i(g_i)`` (one update);
* ``async``: apply each push as it arrives, first come first served,
  ``theta <- theta - (lr / W) * g_i``, and reply at once (W arrivals = one sync step);
* ``ssp``:   like async, but the reply (the worker's next step) is held back while the
  worker is more than ``s`` steps ahead of the slowest (stale synchronous parallel).

Messages are float32 tensors ``[clock, version, updates, loss, *payload]`` on
``torch.distributed`` point-to-point calls, one tag per kind (never ``torch.distributed.rpc``):

=========  ===================  ==============================================================
tag        direction            meaning
=========  ===================  ==============================================================
PUSH       worker -> server j   clock c (the worker's step), version and update count of the
                                parameters it computed on, its loss; payload: shard j of g
PARAMS     server j -> worker   the reply: version, updates, loss; payload: shard j of theta;
                                clock -1 means STOP (free running, :meth:`~ParameterServer.run_for`)
PULL       worker -> server j   "send me your shard now" (before evaluating, async modes)
LOSS       worker <-> server 0  evaluation losses in, their mean back out
SHARD      server j -> 0        the server's shard, to assemble the full model
=========  ===================  ==============================================================

Versions are counted in clocks (SSP's unit): parameters sent while the slowest worker has
pushed m times are version m. A gradient of step c computed on version m has *staleness*
``c - m`` (0 in sync, at most s in SSP, unbounded in async); its *delay* is the number of
server updates applied between its pull and its own update (Hogwild's measure).

Plugging into :func:`course_lib.train.train`: every rank runs the loop, so every rank
calls ``train_step`` once per step. On a worker it is one push and pull; on a server it
serves one round of W pushes (in async modes any W, from whichever workers come first).
No STOP is needed there: both sides know the number of steps. Evaluations are barriers
(each worker pulls fresh parameters, then server 0 averages the losses). A failed worker
is stopped by the launcher (which names its rank); under torchrun the process group's
timeout bounds every wait. ``lr`` follows the loop's schedule; AdamW's settings
(weight decay, betas, clipping) do not apply: the server runs plain SGD.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from course_lib.checkpoint import Piece, load_replicated, replicated_pieces, whole_piece
from course_lib.collectives import CommCounter
from course_lib.data import check_batch_shape, get_batch
from course_lib.flat import FlatLayout
from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.train import (
    SingleDevice,
    Strategy,
    TrainConfig,
    build_model,
    lr_at,
    train_step,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from course_lib.launch import DistContext

MODES = ("sync", "async", "ssp")
HEADER = 4  # floats before every payload: clock, version, updates, loss
PUSH, PARAMS, PULL, LOSS, SHARD = 1, 2, 3, 4, 5  # message tags, one per kind


@dataclass(frozen=True)
class PSConfig:
    """How the parameter server runs (chapter 4)."""

    mode: str = "sync"  # "sync", "async" or "ssp"
    n_servers: int = 1  # ranks 0 .. n_servers-1 hold the parameters; the others are workers
    staleness: int = 0  # SSP's bound s: a worker may run at most s steps ahead of the slowest
    slow_worker: int | None = None  # index (0-based among workers) of a simulated straggler
    slowdown: float = 1.0  # the straggler's step takes this many times the others'
    delay_s: float = 0.0  # simulated compute: every worker sleeps this long per step

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        if self.n_servers < 1:
            raise ValueError(f"n_servers={self.n_servers} must be >= 1")
        if self.staleness < 0:
            raise ValueError(f"staleness={self.staleness} must be >= 0 (0 = synchronous)")
        if self.slowdown < 1 or self.delay_s < 0:
            raise ValueError(f"slowdown={self.slowdown} must be >= 1 (2 = twice as slow) and "
                             f"delay_s={self.delay_s} >= 0")  # fmt: skip


def partition(sizes: list[int], n_servers: int) -> list[list[int]]:
    """Chapter 4: which parameters (indices into ``sizes``) each server owns.

    Largest tensor first, to the least loaded server (ties: lowest index); each list sorted.
    """
    if n_servers > len(sizes):
        raise ValueError(
            f"{n_servers} servers but only {len(sizes)} parameter tensors: every server must "
            f"own at least one; use at most {len(sizes)} servers"
        )
    loads, owned = [0] * n_servers, [[] for _ in range(n_servers)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        j = min(range(n_servers), key=lambda j: (loads[j], j))
        owned[j].append(i)
        loads[j] += sizes[i]
    return [sorted(o) for o in owned]


def _layout(tensors: list[torch.Tensor]) -> FlatLayout:
    """The tensors end to end, in one piece (world size 1: no padding)."""
    return FlatLayout([t.shape for t in tensors], rank=0, world_size=1)


def flat_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Chapter 4: the tensors as one flat float32 CPU vector, in order (a message payload).

    The layout is chapter 3's :class:`~course_lib.flat.FlatLayout`, in one piece.
    """
    with torch.no_grad():  # (sum numel,)
        return _layout(tensors).flatten(tensors, like=torch.empty(0, dtype=torch.float32))


def unflat_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Chapter 4: copy ``flat`` back into ``tensors`` (inverse of :func:`flat_of`)."""
    with torch.no_grad():
        for t, piece in zip(tensors, _layout(tensors).views(flat), strict=True):
            t.copy_(piece)


def message(header: list[float], payload: torch.Tensor | None = None) -> torch.Tensor:
    """Chapter 4: ``[clock, version, updates, loss, *payload]`` as one float32 tensor."""
    head = torch.tensor(header, dtype=torch.float32)  # (HEADER,)
    return head if payload is None else torch.cat([head, payload])


def sync_round(shard: torch.Tensor, workers: list[int], lr: float) -> torch.Tensor:
    """Chapter 4: the synchronous server's step, the graded exercise.

    Receive one PUSH from every worker, update ``shard`` in place with
    ``theta <- theta - lr * mean(g)`` (gradients summed in worker order), send every worker
    a PARAMS reply ``[c + 1, c + 1, c + 1, mean loss, *shard]``. Returns the pushes (W, HEADER+n).
    """
    pushes = torch.empty(len(workers), HEADER + shard.numel())  # (W, HEADER + n)
    for req in [dist.irecv(pushes[i], src=w, tag=PUSH) for i, w in enumerate(workers)]:
        req.wait()
    grad = pushes[0, HEADER:].clone()
    for i in range(1, len(workers)):
        grad += pushes[i, HEADER:]
    grad /= len(workers)  # mean over workers = gradient of the global batch
    shard.add_(grad, alpha=-lr)
    loss = pushes[:, 3].sum() / len(workers)  # float32, the same bits on every rank
    clock = float(pushes[0, 0]) + 1
    reply = message([clock, clock, clock, float(loss)], shard)  # one update per clock
    for req in [dist.isend(reply, dst=w, tag=PARAMS) for w in workers]:
        req.wait()
    return pushes


class ParameterServer(Strategy):
    """Chapter 4: the parameter server as a training-loop strategy (protocol: module doc).

    ``server_round`` replaces :func:`sync_round` (the exercise's grader passes yours).
    ``staleness_log`` holds, on servers, one ``(worker, clock, staleness, delay)`` per push.
    """

    def __init__(
        self,
        ctx: DistContext | None,
        config: PSConfig = PSConfig(),
        server_round: Callable[..., torch.Tensor] = sync_round,
    ) -> None:
        world = 1 if ctx is None else ctx.world_size
        if world - config.n_servers < 1:
            raise ValueError(
                f"ps-{config.mode}: world_size={world} with n_servers={config.n_servers} "
                f"leaves no workers; use world_size >= {config.n_servers + 1}"
            )
        n_workers = world - config.n_servers
        if config.slow_worker is not None and not 0 <= config.slow_worker < n_workers:
            raise ValueError(f"slow_worker={config.slow_worker} is not in [0, {n_workers})")
        if ctx.backend != "gloo":
            raise ValueError(
                "the parameter server receives from any source, which NCCL cannot; "
                "launch with backend='gloo' (device='cuda' still works)"
            )
        super().__init__(ctx)
        self.name = f"ps-{config.mode}"
        self.config, self.server_round = config, server_round
        self.servers = list(range(config.n_servers))
        self.workers = list(range(config.n_servers, world))
        self.is_server = ctx.rank < config.n_servers
        self.bound = {"sync": 0, "ssp": config.staleness, "async": None}[config.mode]
        self.counter = CommCounter()  # payload bytes this rank sent and received
        self.staleness_log: list[tuple[int, int, int, int]] = []
        self.clocks = [0] * n_workers  # server: pushes received from each worker
        self.updates = 0  # server: updates applied to its shard
        self.pushed = 0  # worker: steps pushed so far (its clock)
        self.seen = [(0, 0)] * config.n_servers  # worker: (version, updates) of each shard
        self.waiting: set[int] = set()  # server (SSP): workers whose reply is held back
        self.fresh = True  # does this worker hold the server's latest parameters?
        self.stop, self.stopped = False, 0  # run_for: worker told STOP; server: workers told

    @property
    def data_rank(self) -> int:  # workers split the global batch; servers draw worker 0's
        return 0 if self.is_server else self.ctx.rank - len(self.servers)

    @property
    def data_world_size(self) -> int:
        return len(self.workers)

    def batch(self, data: torch.Tensor, cfg: TrainConfig, step: int) -> tuple:
        """Workers split the global batch in worker order; servers draw worker 0's slice."""
        return get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step, self.data_rank,
                         self.data_world_size, self.device)  # fmt: skip

    def setup(self, model_config: GPTConfig, train_config: TrainConfig, device: Any) -> None:
        self.device, self.train_config = torch.device(device), train_config
        self.model_config = model_config
        self.model = build_model(model_config, train_config.seed, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        owners = partition([p.numel() for p in self.params], len(self.servers))
        self.shards = [[self.params[i] for i in owned] for owned in owners]
        self.shard = flat_of(self.shards[self.ctx.rank]) if self.is_server else None
        if self.is_main and (train_config.weight_decay > 0 or train_config.grad_clip > 0):
            note = "weight_decay and grad_clip are not used; SGD wants a larger lr, e.g. 0.3"
            warnings.warn(f"{self.name} runs plain SGD: {note}", stacklevel=2)

    # --- messages, counted ---------------------------------------------------------------

    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> dist.Work:
        self.counter.record_send(f"tag{tag}", tensor.numel() * 4)
        return dist.isend(tensor, dst=dst, tag=tag)

    def _recv(self, numel: int, src: int | None, tag: int) -> tuple[torch.Tensor, int]:
        buf = torch.empty(numel)  # (numel,) float32
        sender = dist.recv(buf, src=src, tag=tag)  # src=None: whoever comes first
        self.counter.record_recv(numel * 4)
        return buf, sender

    # --- worker side ---------------------------------------------------------------------

    def _straggle(self, compute_s: float) -> None:
        """Sleep ``delay_s``; the straggler ``slowdown`` x (compute + delay) in all."""
        cfg, worker = self.config, self.ctx.rank - len(self.servers)
        slow = worker == cfg.slow_worker
        time.sleep(cfg.delay_s + (cfg.slowdown - 1) * (compute_s + cfg.delay_s) * slow)

    def _exchange(self, pushes: list[torch.Tensor], tag: int) -> torch.Tensor:
        """Send message j to server j, install each PARAMS reply (servers in order: no
        cycle of waits); returns the last reply."""
        reqs = [self._send(m, j, tag) for j, m in zip(self.servers, pushes, strict=True)]
        for j, params in zip(self.servers, self.shards, strict=True):
            reply, _ = self._recv(HEADER + sum(p.numel() for p in params), j, PARAMS)
            unflat_into(reply[HEADER:], params)
            self.seen[j] = (int(reply[1]), int(reply[2]))
            self.stop = self.stop or int(reply[0]) < 0
        for req in reqs:
            req.wait()
        return reply

    def _worker_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        self.model.train()
        loss = loss_fn(self.model(x), y)
        self.model.zero_grad(set_to_none=False)
        loss.backward()
        self._straggle(time.perf_counter() - start)
        grads = [[p.grad if p.grad is not None else torch.zeros_like(p) for p in s]
                 for s in self.shards]  # fmt: skip
        heads = [[self.pushed, v, u, loss.item()] for v, u in self.seen]
        pushes = [message(h, flat_of(g)) for h, g in zip(heads, grads, strict=True)]
        reply = self._exchange(pushes, PUSH)
        self.pushed += 1
        self.fresh = self.config.mode == "sync"
        return float(reply[3]) if self.fresh else loss.item()  # sync: the global batch's

    # --- server side ---------------------------------------------------------------------

    def _reply(self, worker: int, stop: bool = False) -> None:
        head = [-1 if stop else self.clocks[worker], min(self.clocks), self.updates, 0.0]
        self._send(message(head, self.shard), self.workers[worker], PARAMS).wait()

    def _serve_push(self, budget: float = float("inf")) -> float:
        """Apply one push, first come first served; reply to whoever the gate lets go on.
        Once ``budget`` gradients are applied, every worker is answered STOP instead."""
        push, src = self._recv(HEADER + self.shard.numel(), None, PUSH)
        w, c, m, u = src - len(self.servers), int(push[0]), int(push[1]), int(push[2])
        if self.updates < budget:
            lr = lr_at(c, self.train_config)  # the lr of the step the gradient belongs to
            self.shard.add_(push[HEADER:], alpha=-lr / len(self.workers))
            self.staleness_log.append((w, c, c - m, self.updates - u))
            self.updates, self.clocks[w] = self.updates + 1, c + 1
        self.waiting.add(w)
        stop = self.updates >= budget
        for v in sorted(self.waiting):  # the SSP gate: at most `bound` steps ahead
            if stop or self.bound is None or self.clocks[v] - min(self.clocks) <= self.bound:
                self.waiting.remove(v)
                self._reply(v, stop)
                self.stopped += stop
        return float(push[3])

    def _async_round(self) -> float:
        """Serve W pushes (from whichever workers come first): one loop step of the server."""
        return sum(self._serve_push() for _ in self.workers) / len(self.workers)

    def _sync_step(self, lr: float) -> float:
        pushes = self.server_round(self.shard, self.workers, lr)
        numel = len(self.workers) * (HEADER + self.shard.numel()) * 4
        self.counter.record_recv(numel)  # counted here: server_round may be the learner's
        self.counter.record_send("tag2", numel)
        for w, push in enumerate(pushes):
            c, m, u = int(push[0]), int(push[1]), int(push[2])
            self.staleness_log.append((w, c, c - m, self.updates - u))
            self.clocks[w] = c + 1
        self.updates += 1
        return float(pushes[:, 3].sum() / len(self.workers))

    # --- the Strategy interface ----------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        """Worker: one push and pull. Server: one round (sync: the global batch's loss)."""
        if not self.is_server:
            return self._worker_step(x, y)
        self.fresh = self.config.mode == "sync"
        return self._sync_step(lr) if self.config.mode == "sync" else self._async_round()

    def _serve_pulls(self) -> None:
        for w in range(len(self.workers)):
            self._recv(HEADER, self.workers[w], PULL)
            self._reply(w)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """A barrier: workers pull fresh parameters if stale, server 0 averages their losses."""
        if not self.fresh:  # same decision on both sides: after an async train_step
            if self.is_server:
                self._serve_pulls()
            else:
                self._exchange([message([0, 0, 0, 0]) for _ in self.servers], PULL)
            self.fresh = True
        if self.ctx.rank == 0:
            got = [self._recv(HEADER, w, LOSS)[0][3] for w in self.workers]
            mean = message([0, 0, 0, float(torch.stack(got).sum() / len(got))])
            for req in [self._send(mean, r, LOSS) for r in range(1, self.ctx.world_size)]:
                req.wait()
            return float(mean[3])
        if not self.is_server:
            self.model.eval()
            loss = loss_fn(self.model(x), y)
            self._send(message([0, 0, 0, loss.item()]), 0, LOSS).wait()
        return float(self._recv(HEADER, 0, LOSS)[0][3])

    def _gather_model(self) -> GPT:
        """Servers: assemble the full model on server 0 (the others send their shards)."""
        if self.ctx.rank == 0:
            unflat_into(self.shard, self.shards[0])
            for j in self.servers[1:]:
                n = sum(p.numel() for p in self.shards[j])
                unflat_into(self._recv(n, j, SHARD)[0], self.shards[j])
        elif self.is_server:
            self._send(self.shard, 0, SHARD).wait()
        return self.model

    def state_pieces(self) -> tuple[dict[str, list[Piece]], dict[str, tuple[int, ...]]]:
        """Server 0 writes the whole model (gathered from the servers) and the update count."""
        model = self._gather_model() if self.is_server else self.model
        main = self.ctx.rank == 0
        pieces, shapes = replicated_pieces(model, None, write=main)
        shapes["ps/updates"] = ()
        if main:
            pieces["ps/updates"] = [whole_piece(torch.tensor(self.updates))]
        return pieces, shapes

    def load_state_pieces(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if "ps/updates" not in tensors:
            raise ValueError(
                f"this checkpoint was written by strategy {meta.get('strategy')!r}, not by a "
                "parameter server: resume a ps-* run from a ps-* checkpoint (it needs the "
                "server's update count), or start without resume"
            )
        load_replicated(self.model, None, tensors)
        step, self.updates = meta["step"], int(tensors["ps/updates"])
        self.clocks, self.pushed = [step] * len(self.clocks), step
        self.seen = [(step, self.updates)] * len(self.servers)
        if self.is_server:
            self.shard = flat_of(self.shards[self.ctx.rank])

    def full_model(self) -> GPT:
        """The trained model on server 0 (main); workers return their last pulled copy."""
        return self._gather_model() if self.is_server else self.model

    def run_for(self, n_grads: int, data: torch.Tensor, every: int) -> list[tuple]:
        """Chapter 4, free running (one server, after ``setup``): workers step until the
        server has applied ``n_grads`` gradients, a fast worker contributing more of them;
        async modes then answer each worker STOP (clock -1), sync runs n_grads / W rounds.
        The server returns ``(seconds, gradients applied, parameters)`` every ``every``
        gradients; workers return []."""
        if len(self.servers) != 1:
            raise ValueError(f"run_for needs n_servers=1, got {len(self.servers)}")
        cfg, n, sync = self.train_config, len(self.workers), self.config.mode == "sync"
        check_batch_shape(len(data), cfg.batch_size, cfg.seq_len, n)  # before any message
        if not self.is_server:
            while not self.stop and not (sync and self.pushed * n >= n_grads):
                x, y = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, self.pushed,
                                 self.data_rank, n)  # fmt: skip
                self._worker_step(x, y)
            return []
        start, snaps, grads = time.perf_counter(), [(0.0, 0, self.shard.clone())], 0
        while (grads < n_grads) if sync else (self.stopped < n):
            if sync:
                self._sync_step(lr_at(self.updates, cfg))
            else:
                self._serve_push(budget=n_grads)
            if (grads := self.updates * (n if sync else 1)) % every == 0 and grads > snaps[-1][1]:
                snaps.append((time.perf_counter() - start, grads, self.shard.clone()))
        return snaps


def ps_sync(ctx: DistContext | None) -> ParameterServer:
    """Chapter 4, CLI ``--strategy ps-sync``: one server, the other ranks workers."""
    return ParameterServer(ctx, PSConfig(mode="sync"))


def ps_async(ctx: DistContext | None) -> ParameterServer:
    """Chapter 4, CLI ``--strategy ps-async``: one server, first come first served."""
    return ParameterServer(ctx, PSConfig(mode="async"))


def ps_ssp(ctx: DistContext | None) -> ParameterServer:
    """Chapter 4, CLI ``--strategy ps-ssp``: one server, staleness bound s = 2."""
    return ParameterServer(ctx, PSConfig(mode="ssp", staleness=2))


class SGDReference(SingleDevice):
    """Chapter 4: the single-device reference for the parameter server: plain SGD,
    ``theta <- theta - lr * g`` on the global batch (no clipping, no weight decay)."""

    name = "sgd"

    def setup(self, model_config: GPTConfig, train_config: TrainConfig, device: Any) -> None:
        super().setup(model_config, train_config, device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=train_config.lr, foreach=False)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        """The one train_step template with plain SGD and no clipping."""
        return train_step(self.model, self.optimizer, self.sync, x, y, lr, 0.0).item()
