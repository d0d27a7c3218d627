"""Chapter 3's sharded checkpoint: saved at one world size, loaded at any other.

Two spawns: world 2 saves the pieces of a flat buffer (shapes that don't divide evenly,
a replicated int64 tensor from rank 0 alone) and tries a gap and an overlap; world 3
loads that whole, rebuilds its own pieces and saves them again. Everything else runs
in this process at world size 1, where ``group=None`` means no communication.
"""

from __future__ import annotations

import json
import os

import checkpoint_workers as W
import pytest
import torch

from course_lib.checkpoint import (
    Piece,
    check_names,
    flat_pieces,
    flat_shard_from_full,
    load_full,
    load_manifest,
    load_range,
    save_sharded,
)
from course_lib.flat import FlatLayout
from course_lib.launch import run_distributed

pytestmark = pytest.mark.timeout(120)

NAMES = ["model/a.weight", "model/b.bias", "optimizer/c/exp_avg"]
SHAPES = [(5, 3), (7,), (2, 2, 3)]  # 34 elements: 17 per rank at 2, 12 at 3 (2 padding)


def make_tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def save_one(directory, pieces, shapes, meta=None) -> None:
    """Save at world size 1, without torch.distributed."""
    save_sharded(directory, pieces, shapes, rank=0, world_size=1, group=None, meta=meta or {})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """world 2 saves "good" (and fails twice); world 3 reshards it into "resharded"."""
    root = tmp_path_factory.mktemp("ckpt")
    (root / "w2").mkdir()
    results2 = run_distributed(W.save_flat, 2, root / "w2", NAMES, make_tensors(), timeout_s=60)
    results3 = run_distributed(
        W.reshard, 3, root / "w2" / "good", root / "resharded", NAMES, timeout_s=60
    )
    return root, results2, results3


def test_world2_loads_whole_at_world1(saved):
    root, _, _ = saved
    full = load_full(root / "w2" / "good")
    for name, tensor in zip(NAMES, make_tensors(), strict=True):
        assert full[name].shape == tensor.shape and torch.equal(full[name], tensor)
    assert torch.equal(full[W.STEP], torch.tensor([7, 8, 9]))  # int64 kept
    manifest = load_manifest(root / "w2" / "good")
    assert manifest["world_size"] == 2 and manifest["meta"] == {"world_size": 2, "step": 7}
    b = manifest["tensors"]["model/b.bias"]["pieces"]  # cut by the rank boundary at 17
    assert b == [{"rank": 0, "start": 0, "stop": 2}, {"rank": 1, "start": 2, "stop": 7}]
    assert sorted(os.listdir(root / "w2" / "good")) == [
        "manifest.json",
        "rank00000.pt",
        "rank00001.pt",
    ]


def test_replicated_tensor_from_one_rank(saved):
    root, _, _ = saved
    for directory, rank in [(root / "w2" / "good", 0), (root / "resharded", 2)]:
        pieces = load_manifest(directory)["tensors"][W.STEP]["pieces"]
        assert pieces == [{"rank": rank, "start": 0, "stop": 3}]
        assert load_manifest(directory)["tensors"][W.STEP]["dtype"] == "int64"


def test_world3_rebuilds_its_pieces(saved):
    root, _, pieces = saved
    layout = FlatLayout([torch.Size(s) for s in SHAPES], 0, 3)
    flat = layout.flatten(make_tensors(), like=torch.zeros(1))  # (36,): 34 + 2 padding
    assert [p.shape for p in pieces] == [(12,)] * 3
    assert torch.equal(torch.cat(pieces), flat)
    full = load_full(root / "resharded", NAMES[1:])  # only some names
    assert list(full) == NAMES[1:]
    assert all(torch.equal(full[n], t) for n, t in zip(NAMES[1:], make_tensors()[1:], strict=True))


def test_bad_saves_fail_on_every_rank_and_leave_nothing(saved):
    _, results, _ = saved
    gap, overlap = results[0]["gap"], results[0]["overlap"]
    assert all(r["gap"] == gap and r["overlap"] == overlap for r in results)
    assert "tensor 'optimizer/c/exp_avg': elements [0, 12) are in no piece" in gap
    assert "tensor 'optimizer/step': elements [0, 3) are in two pieces" in overlap
    assert "rank 1" in overlap
    assert all(r["left"] == [] for r in results)  # no gap/, overlap/ or .partial


def test_gap_and_overlap_at_world1(tmp_path):
    shapes = {"w": (10,)}
    x = torch.arange(10.0)
    with pytest.raises(ValueError, match=r"tensor 'w': elements \[4, 6\) are in no piece"):
        save_one(tmp_path / "c", {"w": [Piece(0, 4, x[:4]), Piece(6, 10, x[6:])]}, shapes)
    with pytest.raises(ValueError, match=r"elements \[3, 4\) are in two pieces"):
        save_one(tmp_path / "c", {"w": [Piece(0, 4, x[:4]), Piece(3, 10, x[3:])]}, shapes)
    with pytest.raises(ValueError, match=r"elements \[0, 10\) are in no piece"):
        save_one(tmp_path / "c", {}, shapes)
    with pytest.raises(ValueError, match=r"data of shape \(5,\)"):
        save_one(tmp_path / "c", {"w": [Piece(0, 10, x[:5])]}, shapes)
    with pytest.raises(ValueError, match="not in shapes"):
        save_one(tmp_path / "c", {"v": [Piece(0, 10, x)]}, shapes)
    assert os.listdir(tmp_path) == []


def test_group_none_only_alone(tmp_path):
    with pytest.raises(ValueError, match="needs group="):
        save_sharded(tmp_path / "c", {}, {}, rank=0, world_size=2, group=None, meta={})


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*; start without resume"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()  # rank files but no manifest: an unfinished save
    torch.save({}, tmp_path / "half" / "rank00000.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_full(tmp_path / "half")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"format": 0}))
    with pytest.raises(ValueError, match="has format 0, not 1"):
        load_manifest(tmp_path / "old")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\], so it is no checkpoint"):
        save_one(tmp_path / "mine", {"w": [Piece(0, 1, torch.ones(1))]}, {"w": (1,)})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_check_names_says_what_differs(saved):
    root, _, _ = saved
    manifest = load_manifest(root / "w2" / "good")
    expected = {n: s for n, s in zip(NAMES, SHAPES, strict=True)}
    check_names(manifest, {**expected, W.STEP: (3,)})  # fits
    expected["model/a.weight"] = (3, 5)
    expected["model/new"] = (4,)
    del expected["model/b.bias"]
    with pytest.raises(ValueError) as err:
        check_names(manifest, expected)
    msg = str(err.value)
    assert "1 missing (model/new)" in msg
    assert "2 unexpected (model/b.bias, optimizer/step)" in msg
    assert "model/a.weight saved (5, 3), now (3, 5)" in msg
    assert "another model or strategy" in msg and "'step': 7" in msg


def test_smaller_world_overwrites_without_stale_files(saved, tmp_path):
    root, _, _ = saved
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for name in os.listdir(root / "resharded"):  # a copy of the world-3 checkpoint
        (directory / name).write_bytes((root / "resharded" / name).read_bytes())
    stale = tmp_path / "ckpt.partial"  # left by an interrupted save at world size 8
    stale.mkdir()
    torch.save({"w": [(0, 1, torch.ones(1))]}, stale / "rank00007.pt")
    w = torch.arange(6.0).view(2, 3)
    save_one(directory, {"w": [Piece(0, 6, w.reshape(-1))]}, {"w": (2, 3)}, {"run": 2})
    assert sorted(os.listdir(directory)) == ["manifest.json", "rank00000.pt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .partial, no .old
    full = load_full(directory)
    assert list(full) == ["w"] and torch.equal(full["w"], w)
    assert load_manifest(directory)["meta"] == {"run": 2}


def test_load_range_reads_only_overlapping_rank_files(saved, tmp_path):
    root, _, _ = saved
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for name in ["manifest.json", "rank00000.pt"]:  # rank 1's file is gone
        (directory / name).write_bytes((root / "w2" / "good" / name).read_bytes())
    b = make_tensors()[1]
    assert torch.equal(load_range(directory, "model/b.bias", 0, 2), b[:2])  # on rank 0
    assert torch.equal(load_range(root / "w2" / "good", "model/b.bias", 1, 6), b[1:6])
    with pytest.raises(FileNotFoundError):
        load_range(directory, "model/b.bias", 1, 3)  # needs rank 1
    with pytest.raises(ValueError, match=r"outside \[0, 7\)"):
        load_range(directory, "model/b.bias", 3, 8)
    with pytest.raises(ValueError, match="no tensor 'model/x'"):
        load_full(directory, ["model/x"])


def test_flat_pieces_cut_every_rank(tmp_path):
    """At world 3, pieces span several tensors or part of one; together they cover all."""
    tensors, shapes = make_tensors(), [torch.Size(s) for s in SHAPES]
    for rank in range(3):
        layout = FlatLayout(shapes, rank, 3)
        piece = layout.shard(layout.flatten(tensors, like=tensors[0]))
        cut = flat_pieces(layout, NAMES, piece)
        for name, ps in cut.items():
            t = tensors[NAMES.index(name)].reshape(-1)
            assert all(torch.equal(p.data, t[p.start : p.stop]) for p in ps)
        assert sum(p.stop - p.start for ps in cut.values() for p in ps) == (12, 12, 10)[rank]
        assert torch.equal(flat_shard_from_full(layout, tensors), piece)
    with pytest.raises(ValueError, match="pass one name per tensor"):
        flat_pieces(layout, NAMES[:2], piece)
    with pytest.raises(ValueError, match=r"tensors of shapes \[\(3, 5\)"):
        flat_shard_from_full(layout, [tensors[0].T, *tensors[1:]])


def test_views_save_only_their_elements(tmp_path):
    """A piece that views a big flat buffer must not drag the buffer into the file."""
    flat = torch.arange(1000.0)
    save_one(tmp_path / "c", {"w": [Piece(0, 10, flat[5:15])]}, {"w": (10,)})
    stored = torch.load(tmp_path / "c" / "rank00000.pt", weights_only=True)
    ((start, stop, data),) = stored["w"]
    assert (start, stop) == (0, 10) and data.untyped_storage().nbytes() == 10 * 4
    assert torch.equal(load_full(tmp_path / "c")["w"], flat[5:15])
