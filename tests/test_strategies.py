"""Chapters 2-3 in the training loop: ``--strategy dp|zero1|zero2|zero3`` match ``single``.

The loop (course_lib.train) draws each rank's slice of the global batch; the strategies
must reproduce the single-device losses, checkpoint and resume exactly, and run the same
from ``--world-size N`` (our spawner) and from ``torchrun``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from course_lib.data import load_text, make_dataset
from course_lib.launch import RankError, run_distributed
from course_lib.model import GPTConfig
from course_lib.train import STRATEGIES, TrainConfig, make_strategy, train, train_worker

MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
CONFIG = TrainConfig(
    steps=6, batch_size=12, seq_len=16, warmup_steps=2, eval_interval=3, eval_batches=2
)
DP_STRATEGIES = ["dp", "zero1", "zero2", "zero3"]
CLI_ARGS = [
    "train",
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--steps",
    "4",
    "--warmup-steps",
    "1",
    "--eval-interval",
    "2",
    "--eval-batches",
    "1",
    "--no-progress",
    "--sample-tokens",
    "0",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(load_text(None), 0.1)


@pytest.fixture(scope="module")
def single(dataset):
    return train(MODEL, CONFIG, dataset, progress=False)


def _losses(metrics) -> tuple[list[float], list[float]]:
    return [m["loss"] for m in metrics], [m["val_loss"] for m in metrics if m["val_loss"]]


def test_every_strategy_is_registered_and_importable():
    for name in ["single", *DP_STRATEGIES]:
        assert make_strategy(name, None).name == name
    with pytest.raises(ValueError, match="unknown strategy 'fsdp'; choose one of"):
        make_strategy("fsdp")
    assert set(DP_STRATEGIES) <= set(STRATEGIES)


# Every strategy at 2 or 3 ranks (tests/test_data_parallel.py covers 1-4 case by case).
LOOP_CASES = [("dp", 2), ("dp", 3), ("zero1", 3), ("zero2", 2), ("zero3", 2), ("zero3", 3)]


@pytest.mark.parametrize("strategy, world_size", LOOP_CASES)
def test_strategy_reproduces_single_device_losses(dataset, single, strategy, world_size):
    ranks = run_distributed(
        train_worker,
        world_size,
        strategy,
        model_config=MODEL,
        train_config=CONFIG,
        dataset=dataset,
        progress=False,
        backend="gloo",
        timeout_s=120,
        threads_per_rank=1,
    )
    result = ranks[0]
    assert all(r is None for r in ranks[1:]), "only the main rank returns the result"
    train_ours, val_ours = _losses(result.metrics)
    train_ref, val_ref = _losses(single.metrics)
    torch.testing.assert_close(train_ours, train_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(val_ours, val_ref, rtol=1e-5, atol=1e-5)
    ours, ref = result.model.state_dict(), single.model.state_dict()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", ["zero1", "zero3"])
def test_sharded_checkpoint_resumes_bitwise(dataset, tmp_path, strategy):
    kwargs = dict(model_config=MODEL, dataset=dataset, progress=False)
    launch = dict(backend="gloo", timeout_s=120, threads_per_rank=1)
    whole = run_distributed(train_worker, 2, strategy, train_config=CONFIG, **kwargs, **launch)
    stopped = TrainConfig(**{**CONFIG.__dict__, "stop_at": 3})
    run_distributed(
        train_worker, 2, strategy, train_config=stopped, out_dir=tmp_path, **kwargs, **launch
    )
    resumed = run_distributed(
        train_worker,
        2,
        strategy,
        train_config=CONFIG,
        out_dir=tmp_path,
        resume=True,
        **kwargs,
        **launch,
    )
    assert _losses(resumed[0].metrics) == _losses(whole[0].metrics)


@pytest.fixture(scope="module")
def zero3_stopped(dataset, tmp_path_factory):
    """ZeRO-3 at world size 2: the uninterrupted run, and a checkpoint written at step 3."""
    out = tmp_path_factory.mktemp("zero3_w2")
    kwargs = dict(model_config=MODEL, dataset=dataset, progress=False, backend="gloo",
                  timeout_s=120, threads_per_rank=1)  # fmt: skip
    whole = run_distributed(train_worker, 2, "zero3", train_config=CONFIG, **kwargs)[0]
    stopped = TrainConfig(**{**CONFIG.__dict__, "stop_at": 3})
    run_distributed(train_worker, 2, "zero3", train_config=stopped, out_dir=out, **kwargs)
    return whole, out


@pytest.mark.parametrize(
    "strategy, world_size", [("zero3", 1), ("zero3", 3), ("single", 1), ("zero1", 3), ("dp", 2)]
)
def test_zero3_checkpoint_from_world_2_resumes_on_another_topology(
    dataset, zero3_stopped, tmp_path, strategy, world_size
):
    """Each rank re-cuts the whole tensors for its new place: the run continues as if
    never stopped (fp32 tolerance: the sums now run over another number of ranks)."""
    whole, checkpoint = zero3_stopped
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    kwargs = dict(model_config=MODEL, train_config=CONFIG, dataset=dataset, out_dir=tmp_path,
                  resume=True, progress=False)  # fmt: skip
    if strategy == "single":
        resumed = train(**kwargs)
    else:
        resumed = run_distributed(train_worker, world_size, strategy, backend="gloo",
                                  timeout_s=120, threads_per_rank=1, **kwargs)[0]  # fmt: skip
    ours, ref = _losses(resumed.metrics), _losses(whole.metrics)
    assert ours[0][:3] == ref[0][:3]  # the first 3 steps come from the checkpoint's metrics
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    final, ref_final = resumed.model.state_dict(), whole.model.state_dict()
    for name in ref_final:
        torch.testing.assert_close(final[name], ref_final[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_checkpoint_that_does_not_match_the_model_is_refused_by_name(dataset, zero3_stopped,
                                                                       tmp_path):  # fmt: skip
    _, checkpoint = zero3_stopped
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    manifest = json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())
    del manifest["tensors"]["model/wte.weight"]
    (tmp_path / "checkpoint" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="model/wte.weight"):
        train(MODEL, CONFIG, dataset, out_dir=tmp_path, resume=True, progress=False)


def _cli(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [sys.executable, *(launcher if torchrun else []), "-m", "course_lib", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def test_cli_dp_under_spawn_and_torchrun_gives_the_same_losses(tmp_path):
    spawned = _cli(*CLI_ARGS, "--strategy", "dp", "--world-size", "2", "--out", str(tmp_path / "a"))
    assert spawned.returncode == 0, spawned.stderr
    assert "validation loss" in spawned.stdout
    torchrun = _cli(*CLI_ARGS, "--strategy", "dp", "--out", str(tmp_path / "b"), torchrun=True)
    assert torchrun.returncode == 0, torchrun.stderr
    read = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab"]
    assert read[0]["strategy"] == read[1]["strategy"] == "dp"
    assert _losses(read[0]["metrics"]) == _losses(read[1]["metrics"])


def test_cli_zero3_runs(tmp_path):
    done = _cli(*CLI_ARGS, "--strategy", "zero3", "--world-size", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["strategy"] == "zero3"


def test_benchmark_smoke_memory_equals_the_formula():
    """The benchmark runs; the bytes each of our modes holds equal ZeRO's formula; torch's
    FSDP2 and ZeroRedundancyOptimizer rows train to the same losses as ours."""
    from benchmarks.data_parallel import main as bench

    modes = ["overlapped", "torch_zero1", "zero1", "zero2", "torch_fsdp2", "zero3",
             "zero3_prefetch"]  # fmt: skip
    table = bench(["--quick", "--world-sizes", "2", "--modes", *modes])
    assert [r["mode"] for r in table] == ["torch_ddp", *modes]
    for row in table:
        if not row["mode"].startswith("torch"):  # torch's own shards are cut differently
            assert row["held_mb"] == pytest.approx(row["formula_held_mb"], rel=1e-3), row["mode"]
        assert row["step_ms"] > 0
        assert row["max_loss_diff"] < 1e-5, row["mode"]  # the same training, every mode
    zero12 = [r for r in table if r["mode"] in ("zero1", "zero2")]
    assert all(r["sent_mb"] == pytest.approx(r["formula_sent_mb"], rel=1e-3) for r in zero12)
    zero3 = {r["mode"]: r for r in table if r["mode"] in ("zero3", "zero3_prefetch")}
    assert zero3["zero3"]["sent_mb"] == zero3["zero3_prefetch"]["sent_mb"]
    assert zero3["zero3_prefetch"]["vs_torch"] is not None


def test_a_parameter_server_refuses_a_data_parallel_checkpoint(dataset, zero3_stopped, tmp_path):
    _, checkpoint = zero3_stopped
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    with pytest.raises(RankError, match="not by a parameter server"):
        run_distributed(train_worker, 2, "ps-sync", model_config=MODEL, train_config=CONFIG,
                        dataset=dataset, out_dir=tmp_path, resume=True, progress=False,
                        backend="gloo", timeout_s=120, threads_per_rank=1)  # fmt: skip
