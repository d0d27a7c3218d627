"""Chapter 6: tensor parallelism from scratch, Megatron-style: the operators and the layers.

Tensor parallelism splits every layer's matrices over the ``N`` ranks of a tensor-parallel
group (Shoeybi et al., 2019, "Megatron-LM"). Each rank holds a slice of every layer, so the
ranks talk inside every layer. The whole scheme rests on four conjugate operators, each a
``torch.autograd.Function`` whose backward is the forward's mirror image:

    operator                         forward           backward          name
    CopyToTensorParallel             identity          all-reduce        Megatron's f
    ReduceFromTensorParallel         all-reduce        identity          Megatron's g
    GatherFromSequenceParallel       all-gather (T)    reduce-scatter    SP's f: the paper's g
    ReduceScatterToSequenceParallel  reduce-scatter    all-gather (T)    SP's g: the paper's g-bar

((T): along the sequence, for sequence parallelism, SP.)

and two that cut or join the last dimension (:class:`ScatterToTensorParallel`,
:class:`GatherFromTensorParallel`) for layers whose neighbours are not parallel.

A :class:`ColumnParallelLinear` (``f`` before it) splits the weight by output features;
a :class:`RowParallelLinear` (``g`` after it) by input features. Column-then-row needs ONE
all-reduce: the column layer's output is split exactly along the dimension the row layer
sums over. :class:`VocabParallelEmbedding` and :func:`vocab_parallel_cross_entropy` split
the vocabulary so that no rank ever holds the full logits.

Every collective is chapter 1's ring (bytes counted by a
:class:`~course_lib.collectives.CommCounter`) or, with ``collectives="torch"``, torch's
built-in one: the :class:`TPComm` a layer holds says which. A group of one rank makes
every operator the identity.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib import collectives as C
from course_lib.cost.tensor_model import padded_vocab

COLLECTIVES = ("ours", "torch")  # chapter 1's counted ring, or torch.distributed's own


@dataclass
class CommClock:
    """Chapter 6: seconds this rank spent inside the tensor-parallel collectives, and calls.

    Wall-clock time from entering a collective to leaving it: the transfer plus any wait
    for a slower rank to arrive. ``seconds / step time`` is the communication share.
    """

    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


@dataclass(frozen=True)
class TPComm:
    """Chapter 6: how a tensor-parallel layer talks: its group, whose collectives, what counts.

    ``group`` None means the default group (every rank). ``collectives`` is "ours" (chapter
    1's ring, whose bytes ``counter`` adds up) or "torch" (torch's; nothing is counted).
    ``alone=True`` is a group of just this process, even inside a launched world
    (``Topology.single()``): every operator is then the identity. ``clock`` (a
    :class:`CommClock`) adds up the time spent in the collectives.
    """

    group: dist.ProcessGroup | None = None
    counter: C.CommCounter | None = None
    collectives: str = "ours"
    alone: bool = False
    clock: CommClock | None = None

    def __post_init__(self) -> None:
        if self.collectives not in COLLECTIVES:
            raise ValueError(
                f"collectives={self.collectives!r}: choose one of {COLLECTIVES} "
                "(chapter 1's counted ring, or torch.distributed's built-ins)"
            )

    @property
    def size(self) -> int:
        """N, the ranks of the tensor-parallel group (1 without a process group)."""
        return 1 if self.alone or not dist.is_initialized() else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        """This rank's index in the group: which slice of every layer it holds."""
        return 0 if self.alone or not dist.is_initialized() else dist.get_rank(self.group)


# ---------------------------------------------------------------------------------------
# The collectives, on any dimension (each returns a new tensor; the input is not touched)
# ---------------------------------------------------------------------------------------


def _timed(collective: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Add the collective's wall-clock time to ``comm.clock`` when there is one."""

    @functools.wraps(collective)
    def run(x: torch.Tensor, comm: TPComm, *args: int) -> torch.Tensor:
        if comm.clock is None or comm.size == 1:
            return collective(x, comm, *args)
        start = time.perf_counter()
        try:
            return collective(x, comm, *args)
        finally:
            comm.clock.seconds += time.perf_counter() - start
            comm.clock.calls += 1

    return run


@_timed
def all_reduce(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Chapter 6: the sum of ``x`` over the group, on every rank."""
    out = x.detach().clone(memory_format=torch.contiguous_format)
    if comm.size == 1:
        return out
    if comm.collectives == "torch":
        dist.all_reduce(out, group=comm.group)
    else:
        C.ring_all_reduce(out, comm.group, comm.counter)
    return out


def _check_divisible(x: torch.Tensor, dim: int, n: int, what: str) -> None:
    if x.shape[dim] % n:
        raise ValueError(
            f"{what}: dimension {dim} of a tensor of shape {tuple(x.shape)} does not split "
            f"into {n} equal pieces; use a size divisible by the tensor-parallel size {n}"
        )


def split(x: torch.Tensor, comm: TPComm, dim: int) -> torch.Tensor:
    """Chapter 6: this rank's piece of ``x`` along ``dim`` (no communication)."""
    if comm.size == 1:
        return x
    _check_divisible(x, dim, comm.size, "split")
    return x.chunk(comm.size, dim)[comm.rank].contiguous()


@_timed
def all_gather(x: torch.Tensor, comm: TPComm, dim: int) -> torch.Tensor:
    """Chapter 6: every rank's ``x`` joined along ``dim`` in group-rank order, on every rank."""
    n = comm.size
    if n == 1:
        return x.detach().clone()
    piece = x.detach().movedim(dim, 0).contiguous()  # the pieces are rows of dim 0
    full = torch.empty((n * piece.shape[0], *piece.shape[1:]), dtype=x.dtype, device=x.device)
    if comm.collectives == "torch":
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(full, piece, group=comm.group)
    else:
        full.narrow(0, comm.rank * piece.shape[0], piece.shape[0]).copy_(piece)
        C.ring_all_gather(full, comm.group, comm.counter)  # chunk r of the flat view = rank r's
    return full.movedim(0, dim)


@_timed
def reduce_scatter(x: torch.Tensor, comm: TPComm, dim: int) -> torch.Tensor:
    """Chapter 6: this rank's piece along ``dim`` of the sum of ``x`` over the group."""
    n = comm.size
    if n == 1:
        return x.detach().clone()
    _check_divisible(x, dim, n, "reduce_scatter")
    full = x.detach().movedim(dim, 0).contiguous()  # (n * k, ...): piece r = rows of rank r
    if comm.collectives == "torch":
        piece = torch.empty((full.shape[0] // n, *full.shape[1:]), dtype=x.dtype, device=x.device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        scatter(piece, full, group=comm.group)
    else:
        chunk = C.ring_reduce_scatter(full, comm.group, comm.counter)  # 1-D view into full
        piece = chunk.view(full.shape[0] // n, *full.shape[1:]).clone()
    return piece.movedim(0, dim)


# ---------------------------------------------------------------------------------------
# The operators: autograd Functions whose backward is their forward's mirror
# ---------------------------------------------------------------------------------------


class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's ``f``: forward identity, backward all-reduce (before a column-parallel layer).

    Every rank feeds the same ``x`` to its slice of the next layer; each slice sends back
    a different part of dL/dx, so the full gradient is their sum.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad, ctx.comm), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's ``g``: forward all-reduce, backward identity (after a row-parallel layer).

    Each rank holds a partial sum of the output; the all-reduce completes it. The output
    is the same on every rank, so its gradient already is too: nothing to send back.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        return all_reduce(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ScatterToTensorParallel(torch.autograd.Function):
    """Forward: keep this rank's piece of the last dimension; backward: all-gather it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return split(x, comm, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather(grad, ctx.comm, -1), None


class GatherFromTensorParallel(torch.autograd.Function):
    """Forward: all-gather the last dimension; backward: keep this rank's piece of it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return all_gather(x, comm, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return split(grad, ctx.comm, -1), None


class GatherFromSequenceParallel(torch.autograd.Function):
    """Sequence parallelism's ``f``: all-gather along the sequence (dim 1), reduce-scatter back.

    Korthikanti et al. (2022): it replaces ``f`` in front of a column-parallel layer when
    the activations between blocks are split along the sequence.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return all_gather(x, comm, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter(grad, ctx.comm, 1), None


class ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Sequence parallelism's ``g``: reduce-scatter along the sequence (dim 1), all-gather back.

    It replaces ``g`` after a row-parallel layer: each rank keeps the completed sum of its
    own positions only. A reduce-scatter plus an all-gather send what one all-reduce sends.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return reduce_scatter(x, comm, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather(grad, ctx.comm, 1), None


def copy_to_tensor_parallel(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Chapter 6: ``f`` (:class:`CopyToTensorParallel`)."""
    return CopyToTensorParallel.apply(x, comm)


def reduce_from_tensor_parallel(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Chapter 6: ``g`` (:class:`ReduceFromTensorParallel`)."""
    return ReduceFromTensorParallel.apply(x, comm)


def scatter_to_tensor_parallel(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Chapter 6: :class:`ScatterToTensorParallel`."""
    return ScatterToTensorParallel.apply(x, comm)


def gather_from_tensor_parallel(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Chapter 6: :class:`GatherFromTensorParallel`."""
    return GatherFromTensorParallel.apply(x, comm)


def gather_from_sequence_parallel(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Chapter 6: :class:`GatherFromSequenceParallel`."""
    return GatherFromSequenceParallel.apply(x, comm)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Chapter 6: :class:`ReduceScatterToSequenceParallel`."""
    return ReduceScatterToSequenceParallel.apply(x, comm)


# ---------------------------------------------------------------------------------------
# Which slice a rank holds: recorded on each sharded parameter
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TPShard:
    """Chapter 6: where a sharded parameter's slice sits in the whole tensor.

    ``index[i]`` is the position, along ``dim`` of the whole tensor (shape ``full_shape``),
    of the slice's i-th entry along ``dim``; -1 marks a padding entry (zeros that belong
    to no real row, e.g. the vocabulary padded to a multiple of N). Set as ``p.tp_shard``
    on every sharded parameter; a parameter without it is replicated.
    """

    dim: int
    index: torch.Tensor  # int64, (slice.shape[dim],)
    full_shape: tuple[int, ...]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the whole tensor ``full``, padding zeroed."""
        idx = self.index.to(full.device)
        piece = full.index_select(self.dim, idx.clamp(min=0))
        pad = (idx < 0).view([-1 if d == self.dim else 1 for d in range(full.dim())])
        return piece.masked_fill(pad, 0)

    def put(self, full: torch.Tensor, piece: torch.Tensor) -> None:
        """Write the slice ``piece`` (padding skipped) into its place in ``full``, in place."""
        real = (self.index >= 0).nonzero().flatten().to(piece.device)
        full.index_copy_(
            self.dim, self.index[real.cpu()].to(full.device), piece.index_select(self.dim, real)
        )


def _shard_parameter(full: torch.Tensor, dim: int, index: torch.Tensor) -> nn.Parameter:
    """A new Parameter holding ``full``'s entries ``index`` along ``dim``, tagged ``tp_shard``."""
    shard = TPShard(dim, index.to(torch.int64).cpu(), tuple(full.shape))
    param = nn.Parameter(shard.take(full.detach()).clone())
    param.tp_shard = shard
    return param


def _blocks_of(n: int, comm: TPComm) -> torch.Tensor:
    """The contiguous block of ``n`` entries this rank holds (n divisible by N)."""
    size = n // comm.size
    return torch.arange(comm.rank * size, (comm.rank + 1) * size)


# ---------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------


class ColumnParallelLinear(nn.Module):
    """Chapter 6: Y = X W^T with W split by its rows (output features): Y comes out split.

    ``weight`` holds this rank's rows of the whole (out, in) matrix, ``bias`` its entries.
    Forward: ``f`` on the input (:func:`copy_to_tensor_parallel`; with sequence
    parallelism an all-gather along the sequence instead), then the local matmul. With
    ``gather_output`` the pieces of Y are all-gathered (for a layer whose consumer needs
    all of Y); by default Y stays split, ready for a :class:`RowParallelLinear`.

    ``recompute_all_gather`` (with sequence parallelism only) is Megatron-LM's trade
    (Korthikanti et al., 2022, section 4.2.2): autograd would keep the all-gathered input,
    the whole (B, T, in), for the weight gradient; instead the layer keeps its T/N shard
    and all-gathers it again in backward (:class:`AllGatherLinear`). Memory: 1/N of that
    input. Cost: one more all-gather per layer per backward.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        comm: TPComm,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        recompute_all_gather: bool = False,
    ) -> None:
        super().__init__()
        if recompute_all_gather and not sequence_parallel:
            raise ValueError(
                "recompute_all_gather needs sequence_parallel=True: without sequence "
                "parallelism the input is whole on every rank and nothing is gathered"
            )
        self.weight, self.bias, self.comm = weight, bias, comm
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.recompute_all_gather = recompute_all_gather

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group: dist.ProcessGroup | TPComm | None,
        gather_output: bool = False,
        *,
        rows: torch.Tensor | None = None,
        sequence_parallel: bool = False,
        recompute_all_gather: bool = False,
    ) -> ColumnParallelLinear:
        """This rank's slice of ``linear``, so both compute the same from the start.

        ``rows`` (default: block ``rank`` of N equal blocks) are the output features this
        rank takes, in order; -1 is a padding row of zeros.
        """
        comm = group if isinstance(group, TPComm) else TPComm(group)
        if rows is None:
            _check_divisible(linear.weight, 0, comm.size, "ColumnParallelLinear out_features")
            rows = _blocks_of(linear.out_features, comm)
        weight = _shard_parameter(linear.weight, 0, rows)
        bias = None if linear.bias is None else _shard_parameter(linear.bias, 0, rows)
        return cls(weight, bias, comm, gather_output, sequence_parallel, recompute_all_gather)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_all_gather:  # (B, T/N, in) -> (B, T, out/N), keeping the shard
            y = AllGatherLinear.apply(x, self.weight, self.bias, self.comm)
        else:
            if self.sequence_parallel:
                x = gather_from_sequence_parallel(x, self.comm)  # (B, T/N, in) -> (B, T, in)
            else:
                x = copy_to_tensor_parallel(x, self.comm)
            y = F.linear(x, self.weight, self.bias)  # (B, T, out/N)
        return gather_from_tensor_parallel(y, self.comm) if self.gather_output else y


class AllGatherLinear(torch.autograd.Function):
    """Chapter 6: all-gather the sequence, then the local matmul; backward gathers AGAIN.

    Megatron-LM's sequence-parallel linear: it saves this rank's (B, T/N, in) shard, not
    the all-gathered (B, T, in) input; backward all-gathers the shard again for the weight
    gradient, and reduce-scatters the input gradient (the conjugate of the forward's
    all-gather, as in :class:`GatherFromSequenceParallel`).
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                comm: TPComm) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(shard, weight)
        ctx.comm, ctx.has_bias = comm, bias is not None
        return F.linear(all_gather(shard, comm, 1), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard, weight = ctx.saved_tensors
        x = all_gather(shard, ctx.comm, 1)  # the second all-gather: memory bought with bytes
        grad_x = reduce_scatter(grad @ weight, ctx.comm, 1)  # (B, T/N, in)
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = g2.t() @ x2  # (out/N, in)
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class RowParallelLinear(nn.Module):
    """Chapter 6: Y = X W^T with W split by its columns (input features): partial sums, then g.

    ``weight`` holds this rank's columns of the whole (out, in) matrix; ``bias`` is whole
    (replicated) and added once, after the sum. Forward: the local matmul of this rank's
    slice of X gives a full-size partial Y, ``g`` (:func:`reduce_from_tensor_parallel`)
    sums the partials; with sequence parallelism a reduce-scatter along the sequence
    instead. ``input_is_parallel=False`` first cuts a whole X into this rank's slice.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        comm: TPComm,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.weight, self.bias, self.comm = weight, bias, comm
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        if bias is not None and sequence_parallel:
            bias.sequence_parallel = True  # each rank adds it to its positions only

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group: dist.ProcessGroup | TPComm | None,
        input_is_parallel: bool = True,
        *,
        sequence_parallel: bool = False,
    ) -> RowParallelLinear:
        """This rank's columns of ``linear`` (block ``rank`` of N), and its whole bias."""
        comm = group if isinstance(group, TPComm) else TPComm(group)
        _check_divisible(linear.weight, 1, comm.size, "RowParallelLinear in_features")
        weight = _shard_parameter(linear.weight, 1, _blocks_of(linear.in_features, comm))
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        return cls(weight, bias, comm, input_is_parallel, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel(x, self.comm)
        partial = F.linear(x, self.weight)  # (B, T, out): this rank's share of the sum
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel(partial, self.comm)  # (B, T/N, out)
        else:
            y = reduce_from_tensor_parallel(partial, self.comm)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Chapter 6: the token embedding split by vocabulary rows: rank r holds one block of ids.

    The vocabulary is padded with zero rows to a multiple of N (:func:`padded_vocab`). A
    rank looks up the ids in its block and writes zeros for the others; the sum over
    ranks (``g``, or a reduce-scatter along the sequence with sequence parallelism) is
    the embedding. ``weight`` is (V_pad / N, d); ``vocab_start`` its first id.
    """

    def __init__(
        self, weight: nn.Parameter, vocab_start: int, comm: TPComm, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.weight, self.vocab_start, self.comm = weight, vocab_start, comm
        self.sequence_parallel = sequence_parallel

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        group: dist.ProcessGroup | TPComm | None,
        *,
        sequence_parallel: bool = False,
    ) -> VocabParallelEmbedding:
        comm = group if isinstance(group, TPComm) else TPComm(group)
        vocab = embedding.num_embeddings
        rows = _blocks_of(padded_vocab(vocab, comm.size), comm)
        rows = torch.where(rows < vocab, rows, -1)  # ids past the vocabulary: padding
        weight = _shard_parameter(embedding.weight, 0, rows)
        return cls(weight, int(rows[0]) if rows[0] >= 0 else vocab, comm, sequence_parallel)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])  # another rank's ids
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, d): this rank's share
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(out, self.comm)
        return reduce_from_tensor_parallel(out, self.comm)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy from vocabulary-sharded logits; the full row is never built."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, comm: TPComm, vocab_size: int | None
    ) -> torch.Tensor:
        n_local, in_shape, in_dtype = logits.shape[-1], logits.shape, logits.dtype
        work = torch.promote_types(in_dtype, torch.float32)  # bf16 logits: softmax in fp32
        logits = logits.detach().reshape(-1, n_local).to(work)  # (M, V/N)
        targets = targets.reshape(-1)
        start = comm.rank * n_local
        if vocab_size is not None and start + n_local > vocab_size:  # padding columns
            padding = torch.arange(start, start + n_local, device=logits.device) >= vocab_size
            logits = logits.masked_fill(padding, float("-inf"))
        # 1. the row maximum over every rank (for a stable exp): all-gather the local maxima
        local_max = logits.max(dim=-1).values  # (M,)
        row_max = all_gather(local_max.unsqueeze(0), comm, 0).max(dim=0).values
        shifted = logits - row_max.unsqueeze(-1)
        # 2. one all-reduce of two numbers per row: sum of exp, and the target's logit
        exp = shifted.exp()
        mine = (targets >= start) & (targets < start + n_local)  # the target is in my block
        local_t = (targets - start).clamp(0, n_local - 1)
        target_logit = shifted.gather(1, local_t.unsqueeze(1)).squeeze(1) * mine
        sums = all_reduce(torch.stack([exp.sum(dim=-1), target_logit]), comm)  # (2, M)
        sum_exp, target_logit = sums[0], sums[1]
        loss = (sum_exp.log() - target_logit).mean().to(in_dtype)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), mine, local_t)  # softmax
        ctx.in_shape, ctx.in_dtype = in_shape, in_dtype
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, mine, local_t = ctx.saved_tensors
        g = softmax.clone()  # d loss / d logit = softmax - one_hot(target), per row
        rows = mine.nonzero().flatten()
        g[rows, local_t[rows]] -= 1.0
        g.mul_(grad / softmax.shape[0])  # the mean over the M rows
        return g.view(ctx.in_shape).to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | TPComm | None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Chapter 6: ``F.cross_entropy(full_logits, targets)`` from this rank's vocabulary shard.

    ``logits_shard`` (..., V_pad / N) are this rank's columns of the logits (group rank r
    holds ids [r V_pad/N, (r+1) V_pad/N)); ``targets`` (...) are whole. Columns at ids
    >= ``vocab_size`` are padding and left out of the softmax. Three small collectives
    replace the full row: the row maxima (all-gather of one number per row and rank),
    then the sum of exponentials and the target's logit (one all-reduce of two numbers
    per row). The gradient, softmax minus one-hot, is computed locally. Returns the mean
    over every position, the same on every rank.
    """
    comm = group if isinstance(group, TPComm) else TPComm(group)
    if targets.shape != logits_shard.shape[:-1]:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match the logits' "
            f"{tuple(logits_shard.shape[:-1])}"
        )
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, comm, vocab_size)


# ---------------------------------------------------------------------------------------
# Dropout randomness, as in Megatron
# ---------------------------------------------------------------------------------------


class TensorParallelRNG:
    """Chapter 6: a second random stream, different on each tensor-parallel rank.

    Outside the split regions (the residual stream, replicated on every rank) dropout
    must draw the SAME mask on every rank, or the copies drift apart: it uses torch's
    default generator, seeded alike everywhere. Inside a split region (attention heads,
    or the sequence shards of sequence parallelism) each rank holds different data, so it
    must draw DIFFERENT masks: those dropouts run inside :meth:`fork`, which swaps in this
    rank's own stream (seeded ``seed + 2718 + rank``, as Megatron's model-parallel seed)
    and puts the default one back after. Megatron calls this the CUDA RNG tracker.
    """

    OFFSET = 2718  # Megatron's offset of the model-parallel seed

    def __init__(self, seed: int, rank: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(seed + self.OFFSET + rank)
            self.state = self._get()

    def _devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    def _get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Draw from this rank's own stream inside the block; the default stream is kept."""
        default = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(default)
