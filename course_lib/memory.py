"""Measured memory: the bytes a rank really holds (chapters 0 and 3).

One way to measure, used by every strategy's ``memory_bytes`` and the notebooks: count
the distinct storages behind the tensors (a view costs nothing extra; a freed FSDP
buffer counts 0).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def held_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Chapter 3: bytes of the distinct storages behind ``tensors`` (views counted once)."""
    storages = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (m, v, momentum, ...)."""
    tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)


def replicated_memory(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Chapters 0-3: bytes held by a whole (replicated) model, its gradients and ``optimizer``."""
    params = list(module.parameters())
    return {
        "params": held_bytes(params),
        "grads": held_bytes(p.grad for p in params),
        "optimizer": state_bytes(optimizer),
    }
