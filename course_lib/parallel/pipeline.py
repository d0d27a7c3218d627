"""Chapter 5: pipeline parallelism on real ranks: the GPT cut into stages, any schedule run.

- :func:`split_blocks` cuts ``n_layer`` blocks into ``p * v`` virtual stages (evenly, or
  by a given split); :class:`Stage` is one of them: the embedding on the first, some
  blocks, the final norm and LM head on the last. Parameter names stay the full model's
  (``blocks.3.attn.c_attn.weight``), so a stage compares with the single device by name.
- :class:`PipelineParallel` holds this rank's stages and runs any schedule of
  ``course_lib.parallel.schedules`` over point-to-point messages of the ``pp`` group:
  before an action it waits for the one tensor it needs (an activation, or an output
  gradient), after it posts the one it produced. Sends are non-blocking and every
  receive is posted just before its action, in the order the schedule derives, so two
  ranks that exchange both ways (1F1B's steady state) never wait on each other.
  Gradients accumulate over the micro-batches; each micro-batch's loss is divided by
  ``m`` so the sum is the gradient of the mean loss of the whole batch, as on one device.
- **Tied embedding.** With ``tie_weights`` the token embedding (first stage) and the LM
  head (last stage) are one matrix. Each of the two ranks keeps its own copy, and after
  the schedule their gradients are summed over a point-to-point exchange (Megatron-LM's
  embedding all-reduce) so both copies take the same step and stay equal.
- Each action's real start and end are recorded (:class:`Record`) and, for a laptop
  where the bubble would drown in noise, ``compute_s`` adds a simulated compute time per
  action, like chapter 4's ``delay_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from course_lib.model import GPT, loss_fn
from course_lib.parallel.schedules import Action, Message, Schedule, messages, virtual_stage
from course_lib.topology import Topology


def split_blocks(n_layer: int, n_stages: int, split: list[int] | None = None) -> list[range]:
    """Chapter 5: the blocks of each of ``n_stages`` (virtual) stages, in order.

    Evenly by default (earlier stages take the remainder: the last one also runs the LM
    head); ``split`` gives each stage's block count explicitly.
    """
    if n_stages < 1:
        raise ValueError(f"need at least one stage, got {n_stages}")
    if split is None:
        if n_stages > n_layer:
            raise ValueError(
                f"{n_stages} stages but only {n_layer} blocks: every stage needs a block; "
                f"use at most {n_layer} stages (pp x chunks) or a deeper model"
            )
        base, extra = divmod(n_layer, n_stages)
        split = [base + (s < extra) for s in range(n_stages)]
    if len(split) != n_stages or sum(split) != n_layer or min(split) < 1:
        raise ValueError(
            f"split {split} must give each of the {n_stages} stages at least one block "
            f"and {n_layer} blocks in all"
        )
    starts = [sum(split[:s]) for s in range(n_stages)]
    return [range(a, a + n) for a, n in zip(starts, split, strict=True)]


class Stage(nn.Module):
    """Chapter 5: one virtual stage of the GPT: [embed] -> blocks -> [norm + LM head]."""

    def __init__(self, model: GPT, blocks: range, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last, self.block_ids = first, last, blocks
        if first:
            self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
            self.embed = model.embed  # the GPT's own method, on the same modules
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        if last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head
            self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, else the stream (B, T, C) -> stream or logits."""
        if self.first:
            x = self.embed(x)  # (B, T, C)
        for block in self.blocks.values():
            x = block(x)
        return self.head(x) if self.last else x  # (B, T, V) on the last stage


@dataclass(frozen=True)
class Record:
    """Chapter 5: one action as it really ran: seconds since the step began, on this rank."""

    action: Action
    start: float
    end: float


class SavedBytes:
    """Chapter 5: bytes autograd keeps for backward (saved-tensor hooks): now and at peak.

    Counts each saved tensor once per save, so views of one storage are counted twice:
    an upper bound, the same one for every schedule.
    """

    def __init__(self) -> None:
        self.now = self.peak = 0

    def reset_peak(self) -> None:
        """Start a new measurement: the peak from the bytes held now."""
        self.peak = self.now

    def _pack(self, t: torch.Tensor) -> _Held:
        return _Held(t, self)

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Held:
    def __init__(self, tensor: torch.Tensor, counter: SavedBytes) -> None:
        self.tensor, self.counter = tensor, counter
        self.nbytes = tensor.numel() * tensor.element_size()
        counter.now += self.nbytes
        counter.peak = max(counter.peak, counter.now)

    def __del__(self) -> None:
        self.counter.now -= self.nbytes


def _tag(message: Message, microbatches: int) -> int:
    """The same integer on both ends of one message: (stage, micro-batch, kind)."""
    return (message.stage * microbatches + message.microbatch) * 2 + (message.what == "gradient")


class PipelineParallel:
    """Chapter 5: this rank's stages of the GPT, and :meth:`run` for any schedule.

    ``schedule`` is a generator of ``course_lib.parallel.schedules`` called as
    ``schedule(p, m)`` (or ``schedule(p, m, chunks)`` when ``chunks > 1``); it is checked
    once here, before any message. ``compute_s = (t_f, t_b, t_w)`` adds simulated compute
    per action (per chunk divided by ``chunks``).

    Chapter 7 hands it a tensor-parallel GPT (the same ``embed``/``blocks``/``head``
    pieces): ``criterion(logits, targets)`` is then the last stage's vocabulary-parallel
    loss (default :func:`~course_lib.model.loss_fn`), and with sequence parallelism the
    stream between stages holds ``T / sequence_shards`` positions of each sequence.
    """

    def __init__(
        self,
        model: GPT,
        topology: Topology,
        schedule: Callable[..., Schedule],
        microbatches: int,
        chunks: int = 1,
        split: list[int] | None = None,
        compute_s: tuple[float, float, float] = (0.0, 0.0, 0.0),
        *,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = loss_fn,
        sequence_shards: int = 1,
    ) -> None:
        p, self.rank = topology.pp, topology.pp_rank
        self.criterion, self.sequence_shards = criterion, sequence_shards
        self.width = model.config.n_embd
        self.p, self.m, self.chunks = p, microbatches, chunks
        self.group, self.compute_s = topology.pp_group, compute_s
        full = schedule(p, microbatches, chunks) if chunks > 1 else schedule(p, microbatches)
        self.steps = messages(full, chunks)[self.rank]
        self.split_backward = any(s.action.op == "W" for s in self.steps)
        ranges = split_blocks(model.config.n_layer, p * chunks, split)
        last = p * chunks - 1
        self.stages = [
            Stage(model, ranges[v], v == 0, v == last)
            for v in (virtual_stage(self.rank, c, p) for c in range(chunks))
        ]
        self.tied = model.config.tie_weights and p > 1 and self.rank in (0, p - 1)
        self.saved = SavedBytes()
        self.records: list[Record] = []
        self.t0 = 0.0  # when the last run() began (time.perf_counter) on this rank
        self.bytes_sent = 0  # by this rank in the last run(): activations, gradients, tie

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (a tied matrix is one Parameter here too)."""
        seen: dict[int, nn.Parameter] = {}
        for stage in self.stages:
            for param in stage.parameters():
                seen.setdefault(id(param), param)
        return list(seen.values())

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Names as in the full GPT (``blocks.3.mlp.c_fc.weight``), each Parameter once."""
        seen: dict[int, tuple[str, nn.Parameter]] = {}
        for stage in self.stages:
            for name, param in stage.named_parameters():
                seen.setdefault(id(param), (name, param))
        return list(seen.values())

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.shape[0] % self.m:
            raise ValueError(
                f"a batch of {x.shape[0]} sequences does not split into {self.m} equal "
                f"micro-batches; use a batch size divisible by {self.m}"
            )

    def run(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward of the batch ``(x, y)`` through the schedule; the mean loss.

        Gradients accumulate into the stages' ``.grad`` (zero them before, step after).
        Every rank of the pipeline returns the loss (the last stage computes it).
        """
        self._check_batch(x)
        xs, ys = x.chunk(self.m), y.chunk(self.m)
        shape, dtype = self._activation(xs[0])
        inputs: dict[tuple[int, int], torch.Tensor] = {}  # (mb, chunk) -> stage input
        outputs: dict[tuple[int, int], torch.Tensor] = {}  # (mb, chunk) -> output or loss
        grads: dict[tuple[int, int], torch.Tensor | None] = {}  # output gradients
        sends: list[dist.Work] = []
        loss = torch.zeros((), dtype=torch.float32)
        self.records, self.bytes_sent = [], 0
        dist.barrier(group=self.group)
        self.t0 = t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the ranks
        for step in self.steps:
            a = step.action
            key, stage = (a.microbatch, a.chunk), self.stages[a.chunk]
            received = self._recv(step.recv, shape, dtype) if step.recv else None
            start = time.perf_counter() - t0
            if a.op == "F":
                inp = xs[a.microbatch] if stage.first else received.requires_grad_(True)
                with self.saved.hooks():
                    out = stage(inp)
                    if stage.last:
                        out = self.criterion(out, ys[a.microbatch]) / self.m
                        loss += out.detach()
                inputs[key], outputs[key] = inp, out
                produced = None if stage.last else out.detach()
            elif a.op == "B":
                grads[key] = received  # None on the last stage: d(loss)/d(loss) = 1
                produced = self._backward_input(stage, inputs[key], outputs[key], received)
            else:  # "W": the weight-gradient half, deferred by zero-bubble schedules
                self._backward_weights(stage, outputs.pop(key), grads.pop(key))
                inputs.pop(key)
                produced = None
            self._simulate_compute(a.op)
            self.records.append(Record(a, start, time.perf_counter() - t0))
            if step.send is not None:
                sends.append(self._send(step.send, produced))
            if a.op == "B" and not self.split_backward:
                inputs.pop(key), outputs.pop(key), grads.pop(key)
        for work in sends:
            work.wait()
        if self.tied:
            self._sum_tied_gradient()
        return self._share_loss(loss)

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, loss: Callable[..., torch.Tensor] | None = None
    ) -> float:
        """The mean loss of ``(x, y)``, forwards only (each rank's F actions, in order)."""
        loss = self.criterion if loss is None else loss
        self._check_batch(x)
        xs, ys = x.chunk(self.m), y.chunk(self.m)
        shape, dtype = self._activation(xs[0])
        total, sends = torch.zeros((), dtype=torch.float32), []
        for step in (s for s in self.steps if s.action.op == "F"):
            a, stage = step.action, self.stages[step.action.chunk]
            out = stage(xs[a.microbatch] if stage.first else self._recv(step.recv, shape, dtype))
            if stage.last:
                total += loss(out, ys[a.microbatch]) / self.m
            if step.send is not None:
                sends.append(self._send(step.send, out))
        for work in sends:
            work.wait()
        return self._share_loss(total)

    def _activation(self, x: torch.Tensor) -> tuple[tuple[int, int, int], torch.dtype]:
        """Shape and dtype of the stream between stages for a micro-batch of token ids."""
        param = next(iter(self.parameters()))
        positions = x.shape[1] // self.sequence_shards  # this rank's share with sequence parallel
        return (x.shape[0], positions, self.width), param.dtype  # (B_mb, T / shards, C)

    def _recv(self, message: Message, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype)
        dist.irecv(buffer, group=self.group, group_src=message.peer,
                   tag=_tag(message, self.m)).wait()  # fmt: skip
        return buffer

    def _send(self, message: Message, tensor: torch.Tensor) -> dist.Work:
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return dist.isend(tensor.contiguous(), group=self.group, group_dst=message.peer,
                          tag=_tag(message, self.m))  # fmt: skip

    def _backward_input(
        self, stage: Stage, inp: torch.Tensor, out: torch.Tensor, grad: torch.Tensor | None
    ) -> torch.Tensor | None:
        """B: the gradient for the previous stage (and, without W, the weights' too)."""
        if not self.split_backward:
            torch.autograd.backward(out, grad)
            return None if stage.first else inp.grad
        if stage.first:  # token ids need no gradient: W does the whole backward
            return None
        (g,) = torch.autograd.grad(out, inp, grad, retain_graph=True)
        return g

    def _backward_weights(self, stage: Stage, out: torch.Tensor, grad: torch.Tensor | None) -> None:
        """W: accumulate the weights' gradients (the graph kept by B is freed here)."""
        params = [p for p in stage.parameters() if p.requires_grad]
        torch.autograd.backward(out, grad, inputs=params)

    def _simulate_compute(self, op: str) -> None:
        seconds = self.compute_s["FBW".index(op)] / self.chunks
        if op == "B" and not self.split_backward:
            seconds += self.compute_s[2] / self.chunks  # B does W's work too
        if seconds > 0:
            time.sleep(seconds)

    def _sum_tied_gradient(self) -> None:
        """First and last stage: each adds the other's gradient of the tied matrix."""
        weight = (self.stages[0].wte if self.rank == 0 else self.stages[-1].lm_head).weight
        mine = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        theirs = torch.empty_like(mine)
        peer = self.p - 1 if self.rank == 0 else 0
        self.bytes_sent += mine.numel() * mine.element_size()
        works = [dist.isend(mine, group=self.group, group_dst=peer),
                 dist.irecv(theirs, group=self.group, group_src=peer)]  # fmt: skip
        for work in works:
            work.wait()
        # embedding's part + head's part, in that order on both ranks: bitwise equal copies
        first, last = (mine, theirs) if self.rank == 0 else (theirs, mine)
        weight.grad = first + last

    def _share_loss(self, loss: torch.Tensor) -> float:
        dist.broadcast(loss, group=self.group, group_src=self.p - 1)
        return float(loss)
