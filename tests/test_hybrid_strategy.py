"""Chapter 7 in the training loop: 3D checkpoints move between grids and strategies.

One spawn at world size 4 (tests/hybrid_strategy_workers.py): dp 2 x pp 2 trains 3 of 6
AdamW steps and checkpoints; the checkpoint is re-cut for six other grids (ZeRO-1 and -2
pieces, tp slices, one stage per block) and written again, bitwise the same tensors; it
resumes on 1 x 2 x 2, with chapter 6's tp and chapter 3's zero1, and here on one device;
a dp 2 x tp 2 ZeRO-1 checkpoint resumes on one device; a single-device checkpoint
resumes on dp 2 x tp 2 with ZeRO-2. Every resumed run continues with the losses of the
uninterrupted single-device run.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import hybrid_strategy_workers as W
import pytest
import torch

from course_lib.checkpoint import load_full, load_manifest
from course_lib.data import load_text, make_dataset
from course_lib.launch import run_distributed
from course_lib.parallel.hybrid_strategy import (
    HybridStrategy,
    check_hybrid_run,
    gather_positions,
    runs,
    whole_positions,
)
from course_lib.parallel.tensor_parallel import TPShard
from course_lib.train import CHECKPOINT_NAME, TrainConfig, make_strategy, train

pytestmark = pytest.mark.timeout(300)
RTOL, ATOL = 1.3e-6, 1e-5  # fp32, the order of a sum changed (as tests/test_compose.py)


@functools.cache
def dataset():
    return make_dataset(load_text(None), 0.1)


def _single(out: Path | None = None, stop_at: int | None = None, resume: bool = False):
    cfg = TrainConfig(**{**W.CONFIG.__dict__, "stop_at": stop_at})
    return train(W.MODEL, cfg, dataset(), out_dir=out, resume=resume, progress=False)


@functools.cache
def world4(root: Path) -> dict:
    """The single-device reference and checkpoint, then every 3D job in one spawn."""
    reference = _single()
    _single(root / "single", stop_at=W.STOP)
    result = run_distributed(W.every_run, 4, root, dataset(), timeout_s=240, threads_per_rank=1)
    losses = [m["loss"] for m in reference.metrics]
    return {"reference": losses, "final": reference.model.state_dict(), **result[0]}


@pytest.fixture(scope="module")
def runs4(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hybrid")
    return root, world4(root)


def _close(got, want, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _same_model(got: dict, want: dict, what: str) -> None:
    """The final weights; AdamW's g / sqrt(v) amplifies rounding: test_strategies' tolerance."""
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")  # fmt: skip


def test_every_rank_of_a_replica_draws_the_same_rows(runs4):
    _, out = runs4
    by_replica: dict[int, list[torch.Tensor]] = {}
    for dp_rank, _, _, x in out["batches"]:
        by_replica.setdefault(dp_rank, []).append(x)
    assert sorted(by_replica) == [0, 1] and all(len(xs) == 2 for xs in by_replica.values())
    for xs in by_replica.values():
        assert all(torch.equal(x, xs[0]) for x in xs)
        assert xs[0].shape == (W.CONFIG.batch_size // 2, W.CONFIG.seq_len)
    assert not torch.equal(by_replica[0][0], by_replica[1][0])


@pytest.mark.parametrize("options", W.ROUND_TRIPS, ids=[str(o) for o in W.ROUND_TRIPS])
def test_a_checkpoint_recut_for_another_grid_is_written_back_unchanged(runs4, options):
    root, _ = runs4
    written = load_full(root / "a" / CHECKPOINT_NAME)
    again = load_full(root / f"trip{options[:4]}")
    assert sorted(again) == sorted(written)
    assert {"model/wte.weight", "optimizer/wte.weight/exp_avg", "optimizer/wte.weight/step"} <= set(
        written
    )
    assert "model/lm_head.weight" not in written  # tied: it is wte.weight
    for name, tensor in written.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name


def test_only_one_rank_writes_each_replicated_tensor(runs4):
    root, _ = runs4
    tensors = load_manifest(root / "a" / CHECKPOINT_NAME)["tensors"]
    # dp 2 x pp 2: ranks 0 and 1 are replica 0's stages; replica 1 (ranks 2, 3) writes nothing
    assert {p["rank"] for t in tensors.values() for p in t["pieces"]} == {0, 1}
    assert [p["rank"] for p in tensors["model/wte.weight"]["pieces"]] == [0]
    assert [p["rank"] for p in tensors["model/ln_f.weight"]["pieces"]] == [1]
    zero1 = load_manifest(root / "trip(2, 1, 2, 1)")["tensors"]  # both replicas write halves
    assert {p["rank"] for t in zero1.values() for p in t["pieces"]} == {0, 1, 2, 3}
    assert [p["rank"] for p in zero1["optimizer/wte.weight/step"]["pieces"]] == [0]


@pytest.mark.parametrize("name", ["1x2x2", "tp", "zero1", "from-single"])
def test_a_run_resumed_on_another_grid_or_strategy_continues_the_same(runs4, name):
    _, out = runs4
    got, want = out["losses"][name], out["reference"]
    assert len(got) == W.CONFIG.steps
    _close(got, want, name)
    _same_model(out["models"][name], out["final"], name)


@pytest.mark.parametrize("written_by", ["a", "z"])  # dp 2 x pp 2; dp 2 x tp 2 with ZeRO-1
def test_a_3d_checkpoint_resumes_on_one_device(runs4, tmp_path, written_by):
    root, out = runs4
    shutil.copytree(root / written_by, tmp_path, dirs_exist_ok=True)
    resumed = _single(tmp_path, resume=True)
    _close([m["loss"] for m in resumed.metrics], out["reference"], written_by)
    _same_model(resumed.model.state_dict(), out["final"], written_by)


def test_positions_of_a_column_slice_cut_into_runs_and_back():
    shard = TPShard(1, torch.tensor([2, 3, -1]), (2, 4))  # columns 2, 3 and a padding column
    where = whole_positions((2, 3), shard)
    assert where.tolist() == [2, 3, -1, 6, 7, -1]
    local = torch.tensor([[10.0, 11.0, 0.0], [12.0, 13.0, 0.0]])
    pieces = runs(where, local)
    assert [(p.start, p.stop, p.data.tolist()) for p in pieces] == [
        (2, 4, [10.0, 11.0]),
        (6, 8, [12.0, 13.0]),
    ]
    whole = torch.arange(8.0).view(2, 4)
    assert gather_positions(whole, where).tolist() == [2.0, 3.0, 0.0, 6.0, 7.0, 0.0]


@pytest.mark.parametrize(
    "grid, options, message",
    [
        ((2, 2, 1), {"schedule": "zb"}, "schedule 'zb' is not composed"),
        ((1, 1, 3), {}, "tp=3"),
        ((1, 1, 1), {"zero": 3}, "zero_stage=3"),
        ((2, 1, 1), {"microbatches": 3}, "divisible by 6"),
    ],
)
def test_bad_grids_are_refused_before_any_rank_starts(grid, options, message):
    with pytest.raises(ValueError, match=message):
        check_hybrid_run(W.MODEL, *grid, batch_size=8, seq_len=16, **options)


def test_the_grid_must_fill_the_world():
    with pytest.raises(ValueError, match=r"dp=2 x pp=1 x tp=1 = 2 ranks, but the world has 1"):
        HybridStrategy(None, dp=2)
    assert make_strategy("hybrid", None).name == "hybrid"
