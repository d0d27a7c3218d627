"""Chapter 7's yardstick: torch's own 2-D composition, DTensor TP x FSDP2 on one DeviceMesh.

Chapter 7 composes data, pipeline and tensor parallelism from scratch
(:mod:`course_lib.parallel.compose`). This file gives the same GPT the 2-D split that
torchtitan's ``parallelize_llama`` applies, with PyTorch's own building blocks, so that
the chapter and ``benchmarks/hybrid.py`` can put the two side by side (same losses, same
parameters, step times). It is the yardstick only: nothing in the course's strategies
calls it.

1. One ``DeviceMesh`` of shape (dp, tp), dimensions named ("dp", "tp"): ranks
   ``arange(world).view(dp, tp)``, tp innermost, the grid of ``Topology(dp, 1, tp)``.
2. **Tensor parallel** on the "tp" sub-mesh: chapter 6's DTensor plan
   (:func:`~course_lib.parallel.dtensor_tp.tp_plan`: the fused ``c_attn`` rows permuted so
   a contiguous shard is whole heads, vocabulary-parallel embedding and head, optionally
   sequence parallel, the loss under ``loss_parallel``).
3. **FSDP2** (``fully_shard``) on the "dp" sub-mesh: each block, then the root. Each
   parameter (a tp slice, or a whole replicated tensor) is cut once more along its first
   dimension across the dp replicas: ZeRO-3 on the dp axis. Forward and backward
   all-gather a block's parameters; backward reduce-scatters its gradients, averaged over
   dp. FSDP2 requires both meshes to be sub-meshes of one root mesh, so the tp split
   is applied on ``mesh["tp"]`` here rather than on a process group.

The gradients then live on two kinds of mesh (the tp slices on the 2-D (dp, tp) one, the
replicated tensors on "dp" alone), so ``torch.nn.utils.clip_grad_norm_`` over all of them
at once fails ("All operands in aten.stack.default must have the same mesh", torch 2.13):
the global norm for clipping is taken per kind and added (:meth:`TorchHybrid.grad_norm`).
Clipping then scales as ``clip_grad_norm_`` does, and as chapter 7's Hybrid does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel.common import check_same_model
from course_lib.parallel.dtensor_tp import check_torch_tp, head_permutation, split_on_mesh
from course_lib.train import set_lr


def check_torch_hybrid(
    config: GPTConfig,
    dp: int,
    tp: int,
    world_size: int,
    seq_len: int | None = None,
    sequence_parallel: bool = False,
) -> None:
    """Chapter 7: raise ValueError, naming the fix, if dp x tp cannot split ``config``."""
    if dp < 1 or dp * tp != world_size:
        raise ValueError(
            f"dp={dp} x tp={tp} = {dp * tp} ranks, but the run has {world_size}; "
            f"choose dp x tp = {world_size}"
        )
    check_torch_tp(config, tp, seq_len=seq_len, sequence_parallel=sequence_parallel)


class TorchHybrid:
    """Chapter 7's yardstick: a GPT split dp x tp by DTensor and FSDP2 (torchtitan's 2-D).

    Built by :func:`torch_parallelize`; the interface mirrors chapter 7's
    :class:`~course_lib.parallel.compose.Hybrid`: :meth:`build_optimizer`, then
    :meth:`step` on this replica's rows, :meth:`full_state_dict`.
    """

    def __init__(self, model: GPT, mesh: DeviceMesh, sequence_parallel: bool) -> None:
        self.model, self.mesh, self.sequence_parallel = model, mesh, sequence_parallel
        self.tp = mesh["tp"].size()
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_grad_norm = float("nan")  # the norm before clipping, of the last step

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's FSDP shards (DTensors), each once: what the optimizer steps."""
        return self.model.parameters()

    def build_optimizer(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        param_groups: list[dict] | None = None,
        **defaults,
    ) -> torch.optim.Optimizer:
        """The optimizer over this rank's FSDP shards (``param_groups`` over ``model``'s)."""
        if self.optimizer is not None:
            raise RuntimeError("build_optimizer() was already called for this TorchHybrid")
        groups = param_groups or [{"params": list(self.model.parameters())}]
        self.optimizer = optimizer_class(groups, **defaults)
        return self.optimizer

    @torch.no_grad()
    def grad_norm(self) -> float:
        """The global gradient norm: each kind of DTensor gradient's norm, then combined.

        ``get_total_norm`` of one kind is a DTensor whose pending sums (over dp, and over
        tp for the slices) ``full_tensor`` resolves; the tied matrix appears once.
        """
        kinds: dict[tuple, list[torch.Tensor]] = {}
        for p in self.model.parameters():  # each Parameter once (tied weight included)
            if p.grad is not None:
                kinds.setdefault((p.grad.device_mesh, p.grad.placements), []).append(p.grad)
        squares = torch.zeros(())
        for grads in kinds.values():
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            squares += norm.cpu() ** 2
        return float(squares.sqrt())

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, grad_clip: float) -> float:
        """One step on this replica's (B / dp, T) rows; every rank returns the global mean loss.

        Every tp rank of a replica must pass the same rows. ``grad_clip`` <= 0: no clipping.
        """
        if self.optimizer is None:
            raise RuntimeError("call build_optimizer(torch.optim.AdamW, ...) before step()")
        check_torch_tp(self.model.config, self.tp, x.shape[1], self.sequence_parallel)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        with loss_parallel():  # logits (B, T, V) sharded along V: vocab-parallel CE
            loss = loss_fn(self.model(x), y)
            loss.backward()  # FSDP2 reduce-scatters each block's gradient, mean over dp
        self.last_grad_norm = self.grad_norm()
        if grad_clip > 0:
            scale = min(1.0, grad_clip / (self.last_grad_norm + 1e-6))  # as clip_grad_norm_
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        local = loss.detach().full_tensor().reshape(1).to(torch.float64)  # this replica's mean
        dist.all_reduce(local, group=self.mesh["dp"].get_group())
        return local.item() / self.mesh["dp"].size()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, on the CPU, under the reference GPT's names (a collective).

        The tied weight appears once, as ``wte.weight``; ``c_attn``'s rows are put back in
        the reference order [q | k | v].
        """
        config = self.model.config
        perm = head_permutation(config.n_embd, config.n_head, self.tp)
        out = {}
        for name, p in self.model.named_parameters():
            whole = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            if ".attn.c_attn." in name:
                ref = torch.empty_like(whole)
                ref[perm] = whole  # permuted row i is reference row perm[i]
                whole = ref
            out[name] = whole
        return out


def torch_parallelize(
    model: GPT, dp: int, tp: int, *, sequence_parallel: bool = False, seq_len: int | None = None
) -> TorchHybrid:
    """Chapter 7's yardstick: split a freshly built GPT dp x tp with DTensor TP and FSDP2.

    Every rank must pass the same weights (build the GPT from the same seed). Rank r is
    replica ``r // tp``, tp rank ``r % tp`` (``Topology(dp, 1, tp)``'s grid). The mesh's
    device type is the model's ("cpu" with gloo, "cuda" with NCCL). Raises ValueError
    before any communication when dp x tp is not the world or tp cannot split the model.
    """
    if not dist.is_initialized():
        raise ValueError("torch_parallelize needs a process group: call it inside a rank")
    if not isinstance(model, GPT) or any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("torch_parallelize takes a freshly built course_lib.model.GPT")
    # torch's init_device_mesh lays its (dp, tp) mesh over the whole world, so the world is
    # this yardstick's group by construction (Topology(dp, 1, tp)'s ranks, in the same order)
    world = dist.group.WORLD
    check_torch_hybrid(model.config, dp, tp, dist.get_world_size(world), seq_len,
                       sequence_parallel)  # fmt: skip
    check_same_model(model, world)  # one small all-gather: same config everywhere
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    split_on_mesh(model, mesh["tp"], sequence_parallel)
    for block in model.blocks:  # as torchtitan: each block, then the root
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return TorchHybrid(model, mesh, sequence_parallel)
