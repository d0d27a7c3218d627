"""Bytes in, batches out: the embedded corpus, the byte tokenizer and deterministic batches.

Chapter 0 introduces the data; chapter 2 relies on the contract of :func:`get_batch`:
a batch is a pure function of ``(seed, step, rank, world_size)``, and the ``world_size``
per-rank slices of a step, stacked in rank order, are exactly the global batch that one
device sees at that step. That is what lets every strategy be compared bit for bit
with the single-device reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 256  # one token per byte value


def default_corpus() -> str:
    """The English text of Python's own documentation, shipped with every CPython.

    ``pydoc_data.topics`` (~465 KB) is what ``help('for')`` prints; the course needs no
    download. Topics are joined in sorted key order so the text is the same everywhere.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(path: str | Path | None = None) -> str:
    """The corpus: the embedded default when ``path`` is None, else a UTF-8 text file."""
    if path is None:
        return default_corpus()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist; pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus file {str(path)!r} is not valid UTF-8 ({err})") from err
    if not text:
        raise ValueError(f"corpus file {str(path)!r} is empty; pass a file with some text")
    return text


def encode(text: str) -> torch.Tensor:
    """Byte tokenizer: UTF-8 bytes of ``text`` as a uint8 tensor of token ids."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(ids: torch.Tensor | list[int]) -> str:
    """Inverse of :func:`encode`; bytes that do not form valid UTF-8 become U+FFFD."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(ids).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ByteDataset:
    """A tokenized corpus split into a training part and a validation part (its tail)."""

    train: torch.Tensor  # uint8 token ids, the first (1 - val_fraction) of the corpus
    val: torch.Tensor  # uint8 token ids, the rest

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val


def make_dataset(text: str, val_fraction: float = 0.1) -> ByteDataset:
    """Tokenize ``text`` and hold out its last ``val_fraction`` for validation."""
    if not text:
        raise ValueError("the corpus is empty; pass some text")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = encode(text)
    n_val = max(1, int(len(ids) * val_fraction))
    if len(ids) - n_val < 2:
        raise ValueError(f"the corpus has {len(ids)} bytes; it needs at least a few hundred")
    return ByteDataset(train=ids[:-n_val], val=ids[-n_val:])


def check_batch_shape(n_tokens: int, batch_size: int, seq_len: int, world_size: int) -> None:
    """Raise ValueError, naming the numbers and the fix, for a batch that cannot be drawn."""
    if batch_size < 1 or seq_len < 1 or world_size < 1:
        raise ValueError(
            f"batch_size, seq_len and world_size must be >= 1, got "
            f"{batch_size}, {seq_len}, {world_size}"
        )
    if batch_size % world_size != 0:
        raise ValueError(
            f"global batch_size={batch_size} is not divisible by world_size={world_size}; "
            f"use a multiple of {world_size}, e.g. {world_size * max(1, batch_size // world_size)}"
        )
    if seq_len + 1 > n_tokens:
        raise ValueError(
            f"seq_len={seq_len} needs {seq_len + 1} tokens per sample but the split has only "
            f"{n_tokens}; use a shorter seq_len or a bigger corpus"
        )


def batch_offsets(
    n_tokens: int, batch_size: int, seq_len: int, seed: int, step: int
) -> torch.Tensor:
    """Start positions of the global batch at ``step``: a pure function of its arguments."""
    # One stream per (seed, step). torch's CPU generator keeps only the low 32 bits of a
    # seed, so mix both into them (an odd multiplier spreads nearby seeds far apart).
    gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + step) % 2**32)
    return torch.randint(0, n_tokens - seq_len, (batch_size,), generator=gen)


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    seq_len: int,
    seed: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch at ``step`` (chapters 0 and 2).

    ``batch_size`` is the GLOBAL batch; rank ``r`` gets rows
    ``[r * b, (r + 1) * b)`` with ``b = batch_size // world_size``. Returns inputs and
    next-token targets, both int64 of shape (b, seq_len).
    """
    check_batch_shape(len(data), batch_size, seq_len, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    b = batch_size // world_size
    starts = batch_offsets(len(data), batch_size, seq_len, seed, step)[rank * b : (rank + 1) * b]
    rows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()  # (b, T+1)
    x, y = rows[:, :-1], rows[:, 1:]  # (b, T) each
    return x.to(device), y.to(device)


def batch_for(
    data: torch.Tensor,
    batch_size: int,
    seq_len: int,
    seed: int,
    step: int,
    topology: Any,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """This data-parallel rank's slice of the global batch at ``step`` (chapters 2-7).

    The one place a rank's slice is chosen: data rank ``topology.dp_rank`` of
    ``topology.dp`` (a :class:`~course_lib.topology.Topology`). Ranks that differ only in
    their pipeline or tensor coordinate draw the same slice.
    """
    return get_batch(data, batch_size, seq_len, seed, step, topology.dp_rank, topology.dp, device)


def unigram_entropy_bits(data: torch.Tensor) -> float:
    """Entropy of the byte frequencies, in bits per byte (chapter 0's loss yardstick).

    A model that ignores context and predicts each byte's frequency reaches exactly this
    cross-entropy; a model that learned anything about context goes below it.
    """
    counts = torch.bincount(data.long(), minlength=VOCAB_SIZE).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())
