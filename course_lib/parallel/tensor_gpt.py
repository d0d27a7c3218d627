"""Chapter 6: the reference GPT in its tensor-parallel form, and back.

:func:`tensor_parallelize` slices a built reference :class:`~course_lib.model.GPT` into
the form one rank of an N-rank tensor-parallel group holds (Megatron-LM's layout):

- attention split by heads: rank r keeps heads [r H/N, (r+1) H/N); its ``c_attn`` is a
  :class:`ColumnParallelLinear` whose rows are those heads' q, k and v rows
  (:func:`~course_lib.model.qkv_rows`), its ``c_proj`` a :class:`RowParallelLinear`; the
  attention code itself is the reference's, run on this rank's heads;
- the MLP as column-then-row: ``c_fc`` column-parallel (GELU on this rank's columns),
  ``c_proj`` row-parallel;
- the token embedding vocabulary-parallel, the LM head column-parallel over the same
  vocabulary rows (with tied weights they are one Parameter), the loss
  :func:`vocab_parallel_cross_entropy`;
- LayerNorms, the position embedding and the row-parallel biases replicated.

So each block talks twice in forward (one ``g`` after attention, one after the MLP) and
twice in backward (the two ``f``). With ``sequence_parallel`` (Korthikanti et al., 2022)
the activations between those regions are split along the sequence: each ``g`` becomes a
reduce-scatter, each ``f`` an all-gather, and the LayerNorms and dropouts work on T/N
positions. Parameters whose gradient is then only a partial sum over positions carry
``p.sequence_parallel = True``; :func:`sync_sequence_parallel_grads` sums them.

Parameter names are the reference's, so :func:`gather_full_state_dict` returns a state
dict the plain GPT loads, and gradients compare name by name.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn

from course_lib.model import GPT, MLP, Block, CausalSelfAttention, GPTConfig, qkv_rows
from course_lib.parallel.common import gather_object
from course_lib.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelRNG,
    TPComm,
    VocabParallelEmbedding,
    all_reduce,
    vocab_parallel_cross_entropy,
)
from course_lib.topology import Topology


def check_tensor_parallel(
    config: GPTConfig, tp: int, seq_len: int | None = None, sequence_parallel: bool = False
) -> None:
    """Chapter 6: refuse a split that cannot work, naming the valid choices, before any message."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be an integer >= 1, got {tp!r}")
    width = 4 * config.n_embd
    valid = [n for n in range(1, config.n_head + 1) if config.n_head % n == 0 and width % n == 0]
    if config.n_head % tp:
        raise ValueError(
            f"tp={tp} does not divide n_head={config.n_head}: attention is split by whole "
            f"heads; choose tp in {valid}"
        )
    if width % tp:
        raise ValueError(
            f"tp={tp} does not divide the MLP width 4 * n_embd = {width}; choose tp in {valid}"
        )
    if sequence_parallel and seq_len is not None and seq_len % tp:
        raise ValueError(
            f"sequence parallelism splits the T={seq_len} positions over tp={tp} ranks: "
            f"use a sequence length divisible by {tp}, or turn sequence parallelism off"
        )


def _mark_sequence_parallel(module: nn.Module) -> None:
    for p in module.parameters():
        p.sequence_parallel = True  # its gradient is a partial sum over this rank's positions


class TensorParallelAttention(nn.Module):
    """Chapter 6: self-attention on this rank's heads: c_attn column-, c_proj row-parallel."""

    attend = CausalSelfAttention.attend  # the reference's attention, on this rank's heads

    def __init__(
        self,
        ref: CausalSelfAttention,
        comm: TPComm,
        sequence_parallel: bool,
        rng: TensorParallelRNG,
    ) -> None:
        super().__init__()
        n = comm.size
        per_rank = ref.n_head // n
        heads = range(comm.rank * per_rank, (comm.rank + 1) * per_rank)
        d = ref.c_attn.in_features
        self.n_head, self.head_dim, self.dropout = per_rank, ref.head_dim, ref.dropout
        self.c_attn = ColumnParallelLinear.from_linear(
            ref.c_attn,
            comm,
            rows=qkv_rows(d, ref.n_head, heads),
            sequence_parallel=sequence_parallel,
        )
        self.c_proj = RowParallelLinear.from_linear(
            ref.c_proj, comm, sequence_parallel=sequence_parallel
        )
        self.resid_dropout = nn.Dropout(ref.resid_dropout.p)
        self.sequence_parallel, self.rng = sequence_parallel, rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.rng.fork():  # a split region: each rank's heads draw their own masks
            y = self.attend(x)  # (B, T, heads_per_rank * head_dim)
        y = self.c_proj(y)  # (B, T, C), or (B, T/N, C) with sequence parallelism
        with self.rng.fork() if self.sequence_parallel else contextlib.nullcontext():
            return self.resid_dropout(y)


class TensorParallelMLP(nn.Module):
    """Chapter 6: the MLP as column-then-row: one all-reduce (g) per pass, none in between."""

    def __init__(
        self, ref: MLP, comm: TPComm, sequence_parallel: bool, rng: TensorParallelRNG
    ) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear.from_linear(
            ref.c_fc, comm, sequence_parallel=sequence_parallel
        )
        self.gelu = nn.GELU()
        self.c_proj = RowParallelLinear.from_linear(
            ref.c_proj, comm, sequence_parallel=sequence_parallel
        )
        self.dropout = nn.Dropout(ref.dropout.p)
        self.sequence_parallel, self.rng = sequence_parallel, rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(self.gelu(self.c_fc(x)))  # GELU on this rank's 4d/N columns
        with self.rng.fork() if self.sequence_parallel else contextlib.nullcontext():
            return self.dropout(y)


class TensorParallelBlock(nn.Module):
    """Chapter 6: a pre-LayerNorm block whose attention and MLP are tensor-parallel."""

    forward = Block.forward  # x + attn(ln_1(x)), then x + mlp(ln_2(x)): the reference's

    def __init__(
        self, ref: Block, comm: TPComm, sequence_parallel: bool, rng: TensorParallelRNG
    ) -> None:
        super().__init__()
        self.ln_1 = copy.deepcopy(ref.ln_1)
        self.attn = TensorParallelAttention(ref.attn, comm, sequence_parallel, rng)
        self.ln_2 = copy.deepcopy(ref.ln_2)
        self.mlp = TensorParallelMLP(ref.mlp, comm, sequence_parallel, rng)
        if sequence_parallel:
            _mark_sequence_parallel(self.ln_1)
            _mark_sequence_parallel(self.ln_2)


class TensorParallelGPT(nn.Module):
    """Chapter 6: one tensor-parallel rank's GPT; ``forward`` returns ITS vocabulary shard.

    ``forward(idx)`` -> logits (B, T, V_pad / N) for this rank's vocabulary rows; the loss
    is :meth:`loss` (vocabulary-parallel cross-entropy), the same on every rank. Like the
    reference it is ``head(blocks(embed(idx)))``, so a pipeline stage can hold a slice of
    it (chapter 7).
    """

    def __init__(
        self,
        model: GPT,
        comm: TPComm,
        sequence_parallel: bool = False,
        seed: int = 0,
        recompute_all_gather: bool = False,
    ) -> None:
        super().__init__()
        config = model.config
        check_tensor_parallel(config, comm.size)
        if recompute_all_gather and not sequence_parallel:
            raise ValueError(
                "recompute_all_gather needs sequence_parallel=True (it keeps the sequence "
                "shard of each column-parallel layer's input instead of the gathered input)"
            )
        self.config, self.comm, self.sequence_parallel = config, comm, sequence_parallel
        device = model.wte.weight.device
        self.rng = TensorParallelRNG(seed, comm.rank, device)
        sp = sequence_parallel
        self.wte = VocabParallelEmbedding.from_embedding(model.wte, comm, sequence_parallel=sp)
        self.wpe = copy.deepcopy(model.wpe)
        self.drop = nn.Dropout(model.drop.p)
        self.blocks = nn.ModuleList(
            TensorParallelBlock(b, comm, sp, self.rng) for b in model.blocks
        )
        self.ln_f = copy.deepcopy(model.ln_f)
        if config.tie_weights:  # the head uses the embedding's shard: one Parameter
            self.lm_head = ColumnParallelLinear(self.wte.weight, None, comm, sequence_parallel=sp)
        else:
            rows = self.wte.weight.tp_shard.index  # the same vocabulary rows, padding included
            self.lm_head = ColumnParallelLinear.from_linear(
                model.lm_head, comm, rows=rows, sequence_parallel=sp
            )
        if sp:
            for module in (self.wpe, self.ln_f):
                _mark_sequence_parallel(module)
        self.recompute_all_gather = recompute_all_gather
        for module in self.modules():  # c_attn, c_fc and the LM head
            if isinstance(module, ColumnParallelLinear):
                module.recompute_all_gather = recompute_all_gather

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> residual stream (B, T, C); (B, T/N, C) with sequence parallelism."""
        T, n = idx.shape[1], self.comm.size
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        check_tensor_parallel(self.config, n, T, self.sequence_parallel)
        if self.sequence_parallel:  # this rank's positions only
            pos = torch.arange(self.comm.rank * T // n, (self.comm.rank + 1) * T // n)
        else:
            pos = torch.arange(T)
        x = self.wte(idx) + self.wpe(pos.to(idx.device))
        with self.rng.fork() if self.sequence_parallel else contextlib.nullcontext():
            return self.drop(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream -> this rank's logits (B, T, V_pad / N)."""
        return self.lm_head(self.ln_f(x))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the whole vocabulary, from this rank's shard of logits."""
        return vocab_parallel_cross_entropy(logits, targets, self.comm, self.config.vocab_size)


def tensor_parallelize(
    model: GPT,
    topology: Topology,
    sequence_parallel: bool = False,
    *,
    collectives: str = "ours",
    counter: Any = None,
    clock: Any = None,
    seed: int = 0,
    recompute_all_gather: bool = False,
) -> TensorParallelGPT:
    """Chapter 6: the reference ``model`` sliced for this rank of ``topology``'s tp group.

    ``model`` must hold the same weights on every rank (build it with the same seed); it
    is not modified. ``collectives`` "ours" (chapter 1's ring, bytes counted in
    ``counter``, a :class:`~course_lib.collectives.CommCounter`) or "torch"; ``clock`` (a
    :class:`~course_lib.parallel.tensor_parallel.CommClock`) adds up their time. ``seed``
    seeds the per-rank dropout stream (:class:`TensorParallelRNG`). With
    ``sequence_parallel``, ``recompute_all_gather`` makes every column-parallel layer keep
    its input's sequence shard and gather it again in backward, as Megatron-LM does
    (:class:`~course_lib.parallel.tensor_parallel.AllGatherLinear`): less activation
    memory, one more all-gather per layer in backward.
    """
    alone = topology.tp_group is None
    comm = TPComm(topology.tp_group, counter, collectives, alone=alone, clock=clock)
    return TensorParallelGPT(model, comm, sequence_parallel, seed, recompute_all_gather)


def sync_sequence_parallel_grads(model: nn.Module, comm: TPComm) -> None:
    """Chapter 6: sum, over the group, the gradients of parameters marked ``sequence_parallel``.

    With sequence parallelism a replicated parameter used on this rank's positions only
    (LayerNorms, the row-parallel biases, the position embedding) gets a partial
    gradient; the sum over ranks is its gradient. One all-reduce of them all, flattened.
    """
    grads = [
        p.grad
        for p in model.parameters()
        if getattr(p, "sequence_parallel", False) and p.grad is not None
    ]
    if not grads or comm.size == 1:
        return
    total = all_reduce(torch.cat([g.reshape(-1) for g in grads]), comm)
    for g, piece in zip(grads, total.split([g.numel() for g in grads]), strict=True):
        g.copy_(piece.view_as(g))


def squared_grad_norms(params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 6 (and 7's clipping): this rank's squared gradient norms, (sliced, replicated).

    A parameter with a ``tp_shard`` is this rank's slice: its square must be summed over
    the tensor-parallel group. Any other is whole and equal on every rank of the group:
    count it once. Both are float64 tensors of shape (1,); parameters without a gradient
    count 0.
    """
    device = params[0].device if params else torch.device("cpu")
    sliced = torch.zeros(1, dtype=torch.float64, device=device)
    replicated = torch.zeros_like(sliced)
    for p in params:
        if p.grad is not None:
            square = p.grad.detach().double().pow(2).sum()
            if hasattr(p, "tp_shard"):
                sliced += square
            else:
                replicated += square
    return sliced, replicated


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every name of every parameter (a tied one under both names), as in state_dict()."""
    return list(model.named_parameters(remove_duplicate=False))


def _gather_whole(model: TensorParallelGPT, pick: Any) -> dict[str, torch.Tensor]:
    """``pick(p)`` of every parameter, whole, from every rank's slices (a collective)."""
    named = [(n, p) for n, p in _named_parameters(model) if pick(p) is not None]
    mine = {n: (pick(p).detach().cpu(), p.tp_shard) for n, p in named if hasattr(p, "tp_shard")}
    comm = model.comm
    everyone = [mine] if comm.size == 1 else gather_object(mine, comm.group)
    full: dict[str, torch.Tensor] = {}
    for name, p in named:
        if not hasattr(p, "tp_shard"):
            full[name] = pick(p).detach().cpu().clone()
            continue
        whole = torch.zeros(p.tp_shard.full_shape, dtype=p.dtype)
        for part in everyone:
            data, shard = part[name]
            shard.put(whole, data)
        full[name] = whole
    return full


def gather_full_state_dict(model: TensorParallelGPT) -> dict[str, torch.Tensor]:
    """Chapter 6: the reference GPT's state dict, whole, from every rank's slices (a collective).

    Each rank sends its slices with their :class:`~course_lib.parallel.tensor_parallel.TPShard`
    index (one ``all_gather_object`` over the group); every rank puts them in place.
    """
    return _gather_whole(model, lambda p: p)


def gather_full_gradients(model: TensorParallelGPT) -> dict[str, torch.Tensor]:
    """Chapter 6: every gradient, whole, under the reference GPT's names (a collective)."""
    return _gather_whole(model, lambda p: p.grad)


@torch.no_grad()
def load_full_state_dict(model: TensorParallelGPT, state: dict[str, torch.Tensor]) -> None:
    """Chapter 6: each rank takes its slices out of a whole state dict (no communication)."""
    for name, p in _named_parameters(model):
        if name not in state:
            raise KeyError(f"the state dict has no {name!r}; it must be the plain GPT's")
        whole = state[name].to(p.device, p.dtype)
        p.copy_(p.tp_shard.take(whole) if hasattr(p, "tp_shard") else whole)
