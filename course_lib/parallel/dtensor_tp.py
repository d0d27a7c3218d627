"""Chapter 6's yardstick: the reference GPT tensor-parallelized by PyTorch's own DTensor.

Chapter 6 builds Megatron-style tensor parallelism from scratch; this file gives the same
model the same split with ``torch.distributed.tensor.parallel`` so that the chapter and
its benchmark can put the two side by side (same losses, same gradients, step times).
It is the yardstick only: nothing in the course's own strategies calls it.

Each DTensor "parallel style" is one of Megatron's pieces (Shoeybi et al., 2019;
Korthikanti et al., 2022):

* ``ColwiseParallel``: a column-parallel linear layer. The weight's output rows are
  split, each rank computes its slice of the output; the ``f`` operator sits before it
  (identity forward, all-reduce of the input gradient backward).
* ``RowwiseParallel``: a row-parallel linear layer. The weight's input columns are split,
  each rank computes a partial sum; the ``g`` operator sits after it (all-reduce forward,
  identity backward). On an ``nn.Embedding`` it is the vocabulary-parallel embedding:
  each rank owns V / tp rows, looks up only its tokens, and the all-reduce adds the rows.
* ``SequenceParallel``: the LayerNorm (and dropout) regions sharded along the sequence;
  ``g`` becomes a reduce-scatter after the row-parallel layer and ``f`` an all-gather
  before the column-parallel one.
* ``loss_parallel``: vocabulary-parallel cross-entropy: the logits stay sharded along the
  vocabulary; max and sum-exp are reduced across ranks, the full logits never exist.

The plans follow torchtitan's ``parallelize_llama``. What the GPT needs beyond them:

* the fused ``c_attn`` holds rows [q | k | v], so a contiguous shard would mix q, k and
  v. Its rows are permuted BEFORE sharding (:func:`head_permutation`) so that rank r's
  contiguous shard is the q, k and v rows of its heads; :func:`full_state_dict` undoes it.
* with sequence parallelism the residual stream is a DTensor sharded along the sequence,
  and the position embedding ``wpe(pos)`` of shape (T, C) must be added to it. ``wpe``
  stays an ordinary replicated parameter; a ``PrepareModuleOutput`` marks its output as a
  replicated DTensor, so the addition takes this rank's T / tp positions of it and,
  backward, DTensor turns the positions' gradients back into the replicated (T, C) one.
* with tied weights, the embedding (``RowwiseParallel``: Shard(0)) and the head
  (``ColwiseParallel``: Shard(0)) shard the same (V, C) matrix the same way; each style
  makes its own DTensor parameter, so the two are tied again afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from course_lib.model import GPT, GPTConfig, loss_fn, qkv_rows
from course_lib.parallel.common import check_same_model, require_member


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_torch_tp(
    config: GPTConfig, tp: int, seq_len: int | None = None, sequence_parallel: bool = False
) -> None:
    """Chapter 6: raise ValueError, naming the fix, if DTensor cannot split ``config`` over tp.

    tp must divide the heads (each rank holds whole heads; the MLP width 4d then divides
    too) and the vocabulary (the embedding and head are split by vocabulary rows); with
    sequence parallelism it must also divide the sequence length ``seq_len``, when given.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    good = [k for k in _divisors(config.n_head) if config.vocab_size % k == 0]
    if config.n_head % tp != 0:
        raise ValueError(
            f"tp={tp} does not divide n_head={config.n_head}; choose tp in {good} "
            "(or a GPTConfig whose n_head tp divides)"
        )
    if config.vocab_size % tp != 0:
        raise ValueError(
            f"tp={tp} does not divide vocab_size={config.vocab_size}; choose tp in {good} "
            f"or pad the vocabulary to a multiple of {tp}"
        )
    if sequence_parallel and seq_len is not None and seq_len % tp != 0:
        raise ValueError(
            f"sequence parallelism needs tp={tp} to divide the sequence length T={seq_len}; "
            f"use T a multiple of {tp} or sequence_parallel=False"
        )


def head_permutation(n_embd: int, n_head: int, tp: int) -> torch.Tensor:
    """Chapter 6: the row order of ``c_attn`` that makes rank r's contiguous shard its heads.

    Rows [q | k | v] become [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], where rank r's block holds
    the q, k and v rows of heads r*H/tp .. (r+1)*H/tp - 1 (:func:`qkv_rows`). Row i of
    the permuted weight is row ``perm[i]`` of the reference one.
    """
    per_rank = n_head // tp
    return torch.cat(
        [qkv_rows(n_embd, n_head, range(r * per_rank, (r + 1) * per_rank)) for r in range(tp)]
    )


def tp_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Chapter 6: the ``parallelize_module`` plan for the reference GPT, by module name.

    Without sequence parallelism the residual stream is an ordinary tensor, the same on
    every rank; with it, a DTensor sharded along the sequence, Shard(1), from the
    embedding's reduce-scatter to the head's all-gather (torchtitan's llama plan).
    """
    if not sequence_parallel:
        return {
            "wte": RowwiseParallel(input_layouts=Replicate()),  # vocab-parallel embedding
            "blocks.*.attn.c_attn": ColwiseParallel(),  # f, then q k v of my heads
            "blocks.*.attn.c_proj": RowwiseParallel(),  # then g (all-reduce)
            "blocks.*.mlp.c_fc": ColwiseParallel(),
            "blocks.*.mlp.c_proj": RowwiseParallel(),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        }
    seq = Shard(1)  # (B, T, C) sharded along T
    return {
        # the embedding's all-reduce becomes a reduce-scatter along the sequence
        "wte": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=seq, use_local_output=False
        ),
        # glue: wpe(pos), (T, C), as a replicated DTensor, so it adds to the Shard(1) stream
        "wpe": PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Replicate(), use_local_output=False
        ),
        "drop": SequenceParallel(),
        "blocks.*.ln_1": SequenceParallel(),  # LayerNorm on T / tp positions
        # f becomes an all-gather along T before c_attn, g a reduce-scatter along T after c_proj
        "blocks.*.attn.c_attn": ColwiseParallel(input_layouts=seq),
        "blocks.*.attn.c_proj": RowwiseParallel(output_layouts=seq, use_local_output=False),
        "blocks.*.ln_2": SequenceParallel(),  # c_proj's reduce-scatter fed the stream: Shard(1)
        "blocks.*.mlp.c_fc": ColwiseParallel(input_layouts=seq),
        "blocks.*.mlp.c_proj": RowwiseParallel(output_layouts=seq, use_local_output=False),
        "ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(
            input_layouts=seq, output_layouts=Shard(-1), use_local_output=False
        ),
    }


def _check_sequence_hook(tp: int, config: GPTConfig) -> Callable[[nn.Module, tuple], None]:
    """A forward pre-hook: refuse a sequence length tp does not divide, before any message."""

    def hook(module: nn.Module, args: tuple) -> None:
        check_torch_tp(config, tp, seq_len=args[0].shape[1], sequence_parallel=True)

    return hook


def split_on_mesh(model: GPT, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Chapters 6 and 7: the DTensor split of ``model`` on the 1-D ``mesh``, in place.

    The rows of every fused ``c_attn`` are regrouped by head first (:func:`head_permutation`),
    then :func:`tp_plan` is applied and the tied embedding/head made one Parameter again.
    Chapter 6 calls it on a mesh of a whole group; chapter 7's yardstick on the "tp"
    sub-mesh of a 2-D (dp, tp) mesh, which FSDP2 then shards over "dp".
    """
    config, tp = model.config, mesh.size()
    perm = head_permutation(config.n_embd, config.n_head, tp)
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            attn.c_attn.weight.copy_(attn.c_attn.weight[perm])  # (3C, C) rows regrouped
            if attn.c_attn.bias is not None:
                attn.c_attn.bias.copy_(attn.c_attn.bias[perm])
            attn.n_head = config.n_head // tp
    parallelize_module(model, mesh, tp_plan(sequence_parallel))
    if config.tie_weights:  # each style made its own DTensor Parameter: tie them again
        wte, head = model.wte.weight, model.lm_head.weight
        if wte.placements != head.placements or wte.shape != head.shape:
            raise RuntimeError(f"tied weight split two ways: {wte.placements} vs {head.placements}")
        model.lm_head.weight = wte  # one Parameter, Shard(0): V / tp vocabulary rows per rank


def torch_tensor_parallelize(
    model: GPT, group: dist.ProcessGroup | None = None, sequence_parallel: bool = False
) -> nn.Module:
    """Chapter 6: split a freshly built reference GPT over ``group`` with DTensor, in place.

    Every rank must pass the same weights (build the GPT from the same seed); the split
    ones are scattered from the group's first rank (``parallelize_module``'s default). The
    attention is split by heads (each ``attn`` then holds ``n_head // tp`` heads), the MLP
    column-then-row, the embedding and the head by vocabulary rows; the logits come out as
    a DTensor sharded along the vocabulary, for :func:`torch_tp_step` to take the loss
    under ``loss_parallel``. ``sequence_parallel`` adds Korthikanti et al.'s sequence
    split of the LayerNorm regions (:func:`tp_plan`). ``group`` None means the whole
    world; the mesh's device type is the model's ("cpu" or "cuda").

    Raises ValueError before any communication when tp does not divide the heads or the
    vocabulary; with sequence parallelism, a forward whose sequence length tp does not
    divide raises it too, before its first message.
    """
    if not dist.is_initialized():
        raise ValueError("torch_tensor_parallelize needs a process group: call it inside a rank")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("this model is already parallelized; build a fresh GPT")
    group = dist.group.WORLD if group is None else group
    require_member(group, "torch_tensor_parallelize")
    tp, config = dist.get_world_size(group), model.config
    check_torch_tp(config, tp)
    check_same_model(model, group)  # one small all-gather: same config on every rank
    mesh = DeviceMesh.from_group(group, next(model.parameters()).device.type)
    split_on_mesh(model, mesh, sequence_parallel)
    if sequence_parallel:
        model.register_forward_pre_hook(_check_sequence_hook(tp, config))
    return model


def torch_tp_loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> float:
    """Chapter 6: the mean cross-entropy of a DTensor-parallel GPT, forward only."""
    with torch.no_grad(), loss_parallel():
        loss = loss_fn(model(idx), targets)  # logits (B, T, V) sharded along V
    return float(loss.full_tensor())


def torch_tp_step(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> float:
    """Chapter 6: forward, vocabulary-parallel mean cross-entropy, backward; the loss.

    The backward must run under ``loss_parallel`` too. Gradients accumulate into the
    parameters' ``.grad`` (DTensors, sharded like their parameters), ready for an
    optimizer; the returned loss is the same on every rank.
    """
    with loss_parallel():
        loss = loss_fn(model(idx), targets)  # replicated DTensor scalar
        loss.backward()
    return float(loss.detach().full_tensor())


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank must call it), on the CPU."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach().cpu().clone()


def _unpermute(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put the ``c_attn`` rows back in the reference order [q | k | v]."""
    config = model.config
    perm = head_permutation(config.n_embd, config.n_head, model.wte.weight.device_mesh.size())
    for name, t in tensors.items():
        if ".attn.c_attn." in name:
            ref = torch.empty_like(t)
            ref[perm] = t  # permuted row i is reference row perm[i]
            tensors[name] = ref
    return tensors


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Chapter 6: every parameter whole, on the CPU, under the reference GPT's names.

    A collective: every rank calls it and every rank gets the same answer. The tied
    weight appears once, as ``wte.weight``.
    """
    return _unpermute(model, {n: _whole(p) for n, p in model.named_parameters()})


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Chapter 6: every parameter's gradient whole, on the CPU, under the reference names.

    A collective like :func:`full_state_dict`; parameters without a gradient are left out.
    """
    grads = {n: _whole(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    return _unpermute(model, grads)
