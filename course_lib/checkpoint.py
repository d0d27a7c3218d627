"""Sharded checkpoints: every rank saves its pieces, any world size loads them (chapter 3).

Chapter 3 introduces this format for ZeRO and FSDP, whose ranks each hold a piece of every
flat buffer; every later chapter saves through it. A checkpoint is a directory::

    manifest.json    written last by rank 0: meta, and each tensor's shape, dtype, pieces
    rank00000.pt     rank 0's pieces: {name: [(start, stop, (stop - start,) tensor)]}
    rank00001.pt     ...

A piece is a range ``[start, stop)`` of the tensor's row-major flattening, so a checkpoint
written at N ranks loads at M ranks (or one device): read the whole tensors, re-cut them.
A save is staged in ``<directory>.partial`` and renamed over ``<directory>`` once complete,
so an interrupted save leaves the previous checkpoint whole and a resume never mixes two.
Every rank must see the same file system: one machine, or a shared one across nodes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from course_lib.flat import FlatLayout

FORMAT = 1  # manifest["format"]; bump when the layout of the files changes
MANIFEST = "manifest.json"


@dataclass
class Piece:
    """Chapter 3: elements [start, stop) of a tensor's row-major flattening, (stop - start,)."""

    start: int
    stop: int
    data: torch.Tensor


Pieces = dict[str, list["Piece"]]  # checkpoint name -> this rank's pieces of that tensor
Shapes = dict[str, tuple[int, ...]]  # checkpoint name -> the whole tensor's shape


def whole_piece(tensor: torch.Tensor) -> Piece:
    """Chapter 3: all of ``tensor`` as one piece (what a rank holding it whole writes)."""
    return Piece(0, tensor.numel(), tensor.detach().reshape(-1))


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def _few(items: Iterable[str], k: int = 3) -> str:
    """The first ``k`` items, for an error message: 'a, b, c, ...'."""
    items = list(items)
    return ", ".join(items[:k]) + (", ..." if len(items) > k else "")


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same folder, then rename (chapter 0).

    A crash mid-write leaves the old file whole: ``os.replace`` is atomic.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; make it like any other output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_pieces(pieces: dict[str, list[Piece]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Rank-local checks: known names, ranges inside the tensor, data of shape (stop - start,)."""
    for name, plist in pieces.items():
        if name not in shapes:
            raise ValueError(f"piece of {name!r}, which is not in shapes; add its global shape")
        numel = math.prod(shapes[name])
        for p in plist:
            if not 0 <= p.start <= p.stop <= numel or p.data.shape != (p.stop - p.start,):
                raise ValueError(
                    f"bad piece [{p.start}, {p.stop}) of {name!r} with data of shape "
                    f"{tuple(p.data.shape)}: need 0 <= start <= stop <= numel={numel} and data "
                    "of shape (stop - start,); flatten it with .reshape(-1)"
                )


def _check_target(directory: Path, group: Any, rank: int, world_size: int, meta: dict) -> None:
    """Refuse, before any communication, a wrong group, non-JSON meta, a foreign directory."""
    if group is None and (world_size != 1 or dist.is_initialized()):
        raise ValueError("save_sharded needs group= (e.g. dist.group.WORLD) when distributed")
    told = None if group is None else (dist.get_rank(group), dist.get_world_size(group))
    if told not in (None, (rank, world_size)):
        raise ValueError(f"rank={rank}, world_size={world_size}, but the group says {told}")
    json.dumps(meta)  # a TypeError here, not on rank 0 after every rank has written
    names = [f.name for f in directory.iterdir()] if directory.is_dir() else []
    if foreign := [n for n in names if n != MANIFEST and not re.fullmatch(r"rank\d+\.pt", n)]:
        raise ValueError(
            f"{str(directory)!r} holds {foreign[:3]}, so it is no checkpoint, and a save "
            "replaces the whole directory; save into a directory of its own"
        )


def _all_gather(obj: Any, world_size: int, group: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order; no communication at world size 1 without a group."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def _check_cover(name: str, spans: list[tuple[int, int, int]], numel: int) -> None:
    """ValueError unless the (start, stop, rank) spans cover [0, numel) exactly once."""
    fix, end = f"each element of [0, {numel}) must be saved by exactly one rank", 0
    ends = sorted(s for s in spans if s[0] < s[1]) + [(numel, numel, -1)]  # -1: the end mark
    for start, stop, rank in ends:
        if start > end:
            raise ValueError(f"tensor {name!r}: elements [{end}, {start}) are in no piece; {fix}")
        if start < end:
            raise ValueError(
                f"tensor {name!r}: elements [{start}, {min(end, stop)}) are in two pieces "
                f"(the second from rank {rank}); {fix}"
            )
        end = stop


def _tensor_table(indexes: list[list[tuple]], shapes: dict[str, tuple[int, ...]]) -> dict:
    """The manifest's "tensors", from every rank's index of (name, start, stop, dtype)."""
    found: dict[str, list[tuple[int, int, int, str]]] = {name: [] for name in shapes}
    for rank, index in enumerate(indexes):
        for name, start, stop, dtype in index:
            found[name].append((start, stop, rank, dtype))
    table = {}
    for name, plist in found.items():
        _check_cover(name, [p[:3] for p in plist], math.prod(shapes[name]))
        if len(dtypes := {p[3] for p in plist}) != 1:
            raise ValueError(f"tensor {name!r}: pieces have dtypes {sorted(dtypes)}; need one")
        pieces = [{"rank": r, "start": a, "stop": b} for a, b, r, _ in sorted(plist)]
        table[name] = {"shape": list(shapes[name]), "dtype": dtypes.pop(), "pieces": pieces}
    return table


def _commit(directory: Path, staging: Path, manifest: dict) -> None:
    """Rank 0: drop stale rank files, write the manifest last, rename staging over directory."""
    keep = {_rank_file(r) for r in range(manifest["world_size"])}
    for f in staging.glob("rank*.pt"):
        if f.name not in keep:  # left by an interrupted save at a larger world size
            f.unlink()
    atomic_write(staging / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    old = _sibling(directory, ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(staging, directory)  # the new checkpoint is complete from here
    shutil.rmtree(old, ignore_errors=True)


def _attempt(step: Callable[[], None]) -> Exception | None:
    """Run ``step``; return its exception instead of raising it, to tell the other ranks first."""
    try:
        step()
    except Exception as e:
        return e
    return None


def _write_pieces(path: Path, pieces: dict[str, list[Piece]]) -> None:
    """One rank's file: {name: [(start, stop, (stop - start,) CPU tensor)]}, atomically."""
    # Copies: torch.save of a view would save the whole flat buffer beneath it.
    stored = {n: [(p.start, p.stop, p.data.detach().to("cpu", copy=True)) for p in ps]
              for n, ps in pieces.items()}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, partial(torch.save, stored))


def save_sharded(
    directory: str | Path,
    pieces: dict[str, list[Piece]],
    shapes: dict[str, tuple[int, ...]],
    *,
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None,
    meta: dict[str, Any],
) -> None:
    """Chapter 3: save this rank's ``pieces`` of the tensors ``shapes`` describes; collective.

    Every rank of ``group`` calls it (``group=None`` only for one process without
    ``torch.distributed``). Each rank writes its file into ``<directory>.partial``; an
    all-gather of the indexes lets every rank check that the pieces of each tensor cover it
    exactly once (else the same ValueError on every rank); rank 0 writes the manifest, with
    ``meta`` (JSON data: topology, step, configs), and renames the directory into place; a
    last all-gather makes every rank return after that, or raise if rank 0 failed.
    """
    directory = Path(directory)
    _check_target(directory, group, rank, world_size, meta)
    staging = _sibling(directory, ".partial")
    # 1. Every rank checks and writes its own file; a failure is reported to all ranks
    # through the all-gather below, never raised alone while the others wait in it.
    error = _attempt(lambda: _check_pieces(pieces, shapes)) or _attempt(
        lambda: _write_pieces(staging / _rank_file(rank), pieces)
    )
    index = [(n, p.start, p.stop, str(p.data.dtype).removeprefix("torch."))
             for n, ps in pieces.items() for p in ps]  # fmt: skip
    gathered = _all_gather((index, repr(error) if error else None), world_size, group)

    # 2. Every rank checks the whole index (same data, same verdict); rank 0 commits.
    def check_and_commit() -> None:
        if failed := [f"rank {r}: {e}" for r, (_, e) in enumerate(gathered) if e]:
            raise RuntimeError(f"the checkpoint at {str(directory)!r} was not saved: {failed}")
        tensors = _tensor_table([i for i, _ in gathered], shapes)
        if rank == 0:
            head = {"format": FORMAT, "world_size": world_size, "meta": meta}
            _commit(directory, staging, {**head, "tensors": tensors})

    error = error or _attempt(check_and_commit)
    if error and rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    # 3. No rank returns before the checkpoint is in place (or all know it is not).
    rank0_error = _all_gather(repr(error) if error else None, world_size, group)[0]
    if error:
        raise error
    if rank0_error:
        raise RuntimeError(f"rank 0 failed to save {str(directory)!r}: {rank0_error}")


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Chapter 3: the manifest of the checkpoint in ``directory``, checked for its format."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        staged = _sibling(Path(directory), ".partial") / MANIFEST
        hint = f" ({staged.parent} is complete: rename it)" if staged.is_file() else ""
        raise FileNotFoundError(f"no checkpoint at {str(directory)!r}{hint}; start without resume")
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(
            f"{str(path)!r} has format {found!r}, not {FORMAT}: it was not written by this "
            "course_lib's save_sharded; save it again with this version or start without resume"
        )
    return manifest


def _entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """The manifest's record of tensor ``name``, or a ValueError listing what there is."""
    if name not in manifest["tensors"]:
        raise ValueError(
            f"no tensor {name!r} in the checkpoint; it has {_few(manifest['tensors'])}"
        )
    return manifest["tensors"][name]


def _assemble(directory: Path, manifest: dict, wants: dict[str, tuple[int, int]]) -> dict:
    """Elements [a, b) of each wanted tensor, (b - a,); each rank file is read at most once."""
    dtype = {n: getattr(torch, _entry(manifest, n)["dtype"]) for n in wants}
    out = {n: torch.empty(b - a, dtype=dtype[n]) for n, (a, b) in wants.items()}
    by_rank = defaultdict(list)
    for n, (a, b) in wants.items():
        for p in _entry(manifest, n)["pieces"]:
            if p["start"] < b and a < p["stop"]:  # the piece overlaps [a, b)
                by_rank[p["rank"]].append((n, p["start"], p["stop"]))
    for rank, needed in sorted(by_rank.items()):
        path = directory / _rank_file(rank)  # mmap: only the pieces used are read from disk
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for n, start, stop in needed:
            data = next((t for s, e, t in stored.get(n, []) if (s, e) == (start, stop)), None)
            if data is None:
                raise ValueError(f"{path} lacks piece [{start}, {stop}) of {n!r}: damaged")
            (a, b), lo, hi = wants[n], max(wants[n][0], start), min(wants[n][1], stop)
            out[n][lo - a : hi - a] = data[lo - start : hi - start]
    return out


def load_full(directory: str | Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Chapter 3: whole tensors ``names`` (default: all), global shape, on CPU; any world size.

    Needs no communication, so every rank may call it: the course's models are small. At
    scale each rank would read only the ranges it owns, with :func:`load_range`.
    """
    manifest = load_manifest(directory)
    names = list(manifest["tensors"] if names is None else names)
    shapes = {n: _entry(manifest, n)["shape"] for n in names}
    flat = _assemble(Path(directory), manifest, {n: (0, math.prod(shapes[n])) for n in names})
    return {n: flat[n].view(shapes[n]) for n in names}


def load_range(directory: str | Path, name: str, start: int, stop: int) -> torch.Tensor:
    """Chapter 3: elements [start, stop) of tensor ``name``'s flattening, (stop - start,).

    Reads only the rank files that hold a piece overlapping the range.
    """
    manifest = load_manifest(directory)
    numel = math.prod(_entry(manifest, name)["shape"])
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"range [{start}, {stop}) of {name!r} is outside [0, {numel})")
    return _assemble(Path(directory), manifest, {name: (start, stop)})[name]


def check_names(manifest: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    """Chapter 3: ValueError unless the checkpoint holds exactly ``expected`` (name: shape)."""
    saved = {n: tuple(t["shape"]) for n, t in manifest["tensors"].items()}
    expected = {n: tuple(s) for n, s in expected.items()}
    problems = {
        "missing": [n for n in expected if n not in saved],
        "unexpected": [n for n in saved if n not in expected],
        "with another shape": [f"{n} saved {saved[n]}, now {s}" for n, s in expected.items()
                               if n in saved and saved[n] != s],
    }  # fmt: skip
    if found := [f"{len(v)} {k} ({_few(v)})" for k, v in problems.items() if v]:
        raise ValueError(
            f"the checkpoint does not fit: {'; '.join(found)}. It was written for another "
            f"model or strategy (its meta: {str(manifest.get('meta'))[:200]}); resume with "
            "the model config and strategy it was saved with, or start without resume"
        )


def flat_pieces(
    layout: FlatLayout, names: list[str], piece: torch.Tensor
) -> dict[str, list[Piece]]:
    """Chapter 3: this rank's (shard_numel,) ``piece`` of a flat buffer, cut into tensor Pieces.

    Tensor ``i`` of ``layout`` is ``names[i]``; the padding is dropped. The data are views
    of ``piece`` (``save_sharded`` copies them).
    """
    if len(names) != len(layout.numels) or piece.shape != (layout.shard_numel,):
        raise ValueError(
            f"{len(names)} names and a piece of shape {tuple(piece.shape)} for a layout of "
            f"{len(layout.numels)} tensors and ({layout.shard_numel},) pieces; pass one name "
            "per tensor and layout.shard(flat)"
        )
    out = {}
    for name, offset, numel in zip(names, layout.offsets, layout.numels, strict=True):
        lo = max(offset, layout.start)  # the overlap of the tensor and the piece, in the buffer
        hi = min(offset + numel, layout.start + layout.shard_numel)
        if lo < hi:
            data = piece[lo - layout.start : hi - layout.start]  # (hi - lo,)
            out[name] = [Piece(lo - offset, hi - offset, data)]
    return out


def flat_shard_from_full(layout: FlatLayout, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Chapter 3: this rank's (shard_numel,) piece of the flat buffer of whole ``tensors``.

    The inverse of :func:`flat_pieces`: the padding is zero, the device is the tensors'.
    """
    have, want = [tuple(t.shape) for t in tensors], [tuple(s) for s in layout.shapes]
    if have != want:
        raise ValueError(
            f"tensors of shapes {have[:4]} for a layout of {want[:4]}; pass the layout's "
            "tensors in its order (check_names first catches a checkpoint of another model)"
        )
    flat = layout.flatten(tensors, like=tensors[0])  # (padded,), zeros in the padding
    return layout.shard(flat).clone()


# ---------------------------------------------------------------------------------------
# Canonical names: what every strategy writes and reads, so a checkpoint moves between them
#   model/<parameter or buffer name>            the plain model's tensors, whole shapes
#   optimizer/<parameter name>/<state key>      e.g. Adam's exp_avg, exp_avg_sq, step
# ---------------------------------------------------------------------------------------


def replicated_pieces(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, write: bool
) -> tuple[Pieces, Shapes]:
    """Chapter 3: checkpoint pieces of a model every rank holds whole (one writer suffices).

    Only the rank with ``write`` contributes pieces; every rank returns the shapes.
    """
    tensors = {f"model/{n}": t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    for name, p in module.named_parameters():
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{name}/{key}"] = value
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    pieces = {n: [whole_piece(t)] for n, t in tensors.items()} if write else {}
    return pieces, shapes


@torch.no_grad()
def load_replicated(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    tensors: dict[str, torch.Tensor],
) -> None:
    """Chapter 3: the inverse of :func:`replicated_pieces`, from whole checkpoint tensors."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        t.copy_(tensors[f"model/{name}"])
    for name, p in module.named_parameters():
        prefix = f"optimizer/{name}/"
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state and optimizer is not None:  # a 0-d step counter stays on the CPU, as torch's
            optimizer.state[p] = {
                k: v.to(p.device) if v.dim() else v.clone() for k, v in state.items()
            }


def flat_state_pieces(
    layout: FlatLayout,
    names: list[str],
    shard: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    write_replicated: bool,
) -> tuple[dict[str, list[Piece]], dict[str, tuple[int, ...]]]:
    """Chapter 3: this rank's checkpoint pieces of one flat group (tensor ``i`` = ``names[i]``).

    ``shard`` is this rank's fp32 piece of the parameters; the optimizer's state for it
    (Adam's m and v) is cut the same way. A 0-d state such as Adam's ``step`` is the same
    for every parameter of the group: written whole, once, by ``write_replicated``.
    """
    shapes = {f"model/{n}": tuple(s) for n, s in zip(names, layout.shapes, strict=True)}
    pieces = flat_pieces(layout, [f"model/{n}" for n in names], shard.detach())
    for key, value in optimizer.state.get(shard, {}).items():
        keyed = [f"optimizer/{n}/{key}" for n in names]
        if value.dim() == 0:
            shapes.update({k: () for k in keyed})
            pieces.update({k: [whole_piece(value)] for k in keyed} if write_replicated else {})
        else:
            shapes.update({k: tuple(s) for k, s in zip(keyed, layout.shapes, strict=True)})
            pieces.update(flat_pieces(layout, keyed, value))
    return pieces, shapes


def load_flat_optimizer_state(
    layout: FlatLayout,
    names: list[str],
    shard: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
) -> None:
    """Chapter 3: the inverse of :func:`flat_state_pieces` for the optimizer's state."""
    prefix = f"optimizer/{names[0]}/"
    keys = sorted(k[len(prefix) :] for k in tensors if k.startswith(prefix))
    state = {}
    for key in keys:
        whole = [tensors[f"optimizer/{n}/{key}"] for n in names]
        if whole[0].dim() == 0:
            state[key] = whole[0].clone()
        else:
            state[key] = flat_shard_from_full(layout, whole).to(shard.device)
    if state:
        optimizer.state[shard] = state
