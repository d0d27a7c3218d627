"""The training loop (chapter 0): learning, metrics, the lr schedule, bitwise resume."""

import json
import math
from dataclasses import replace

import pytest
import torch

import course_lib.checkpoint as checkpoint_mod
import course_lib.train as train_mod
from course_lib.checkpoint import load_manifest
from course_lib.data import make_dataset
from course_lib.model import GPTConfig
from course_lib.train import (
    SingleDevice,
    Strategy,
    TrainConfig,
    build_model,
    lr_at,
    make_optimizer,
    train,
)

MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
TINY = dict(steps=12, batch_size=4, seq_len=32, lr=1e-2, min_lr=1e-3, warmup_steps=3)
TINY.update(eval_interval=5, eval_batches=2, seed=7)


@pytest.fixture(scope="module")
def dataset():
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
    return make_dataset(text, val_fraction=0.1)


def _losses(result) -> list[float]:
    return [m["loss"] for m in result.metrics]


def test_loss_decreases_on_a_tiny_run(dataset):
    cfg = TrainConfig(**{**TINY, "steps": 40, "eval_interval": 40})
    result = train(MODEL, cfg, dataset, progress=False)
    losses = _losses(result)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert result.final_val_loss < math.log(256) - 1.0
    assert result.metrics_path is None


def test_metrics_json_is_written_and_well_formed(dataset, tmp_path):
    cfg = TrainConfig(**TINY)
    result = train(MODEL, cfg, dataset, out_dir=tmp_path, progress=False)
    assert result.metrics_path == tmp_path / "metrics.json"
    doc = json.loads(result.metrics_path.read_text())
    assert doc["strategy"] == "single"
    assert doc["train_config"]["steps"] == 12 and doc["model_config"]["n_embd"] == 32
    rows = doc["metrics"]
    assert [r["step"] for r in rows] == list(range(12))
    keys = {"step", "loss", "lr", "step_time_s", "tokens_per_s", "val_loss"}
    assert all(set(r) == keys for r in rows)
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [4, 9, 11]
    assert all(r["loss"] > 0 and r["step_time_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows == result.metrics
    assert (tmp_path / "checkpoint" / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # atomic writes cleaned up


def _interrupted_then_resumed(dataset, tmp_path, cfg, stop_at):
    train(MODEL, replace(cfg, stop_at=stop_at), dataset, out_dir=tmp_path, progress=False)
    return train(MODEL, cfg, dataset, out_dir=tmp_path, resume=True, progress=False)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(dataset, tmp_path):
    model = replace(MODEL, dropout=0.1)  # dropout draws random numbers: RNG restore matters
    cfg = TrainConfig(**TINY)
    full = train(model, cfg, dataset, out_dir=tmp_path / "full", progress=False)
    for k in (1, 5, 11):
        out = tmp_path / f"stop{k}"
        train(model, replace(cfg, stop_at=k), dataset, out_dir=out, progress=False)
        resumed = train(model, cfg, dataset, out_dir=out, resume=True, progress=False)
        assert _losses(resumed) == _losses(full)  # exact float equality
        assert [m["val_loss"] for m in resumed.metrics] == [m["val_loss"] for m in full.metrics]
        for a, b in zip(resumed.model.parameters(), full.model.parameters(), strict=True):
            assert torch.equal(a, b)


def test_resume_without_restoring_the_rng_differs(dataset, tmp_path, monkeypatch):
    """The test above is sensitive: skipping the RNG restore changes the dropout masks."""
    model = replace(MODEL, dropout=0.1)
    cfg = TrainConfig(**TINY)
    full = train(model, cfg, dataset, progress=False)
    monkeypatch.setattr(train_mod, "restore_rng", lambda state, device: None)
    train(model, replace(cfg, stop_at=5), dataset, out_dir=tmp_path, progress=False)
    resumed = train(model, cfg, dataset, out_dir=tmp_path, resume=True, progress=False)
    assert _losses(resumed)[:5] == _losses(full)[:5]
    assert _losses(resumed)[5:] != _losses(full)[5:]


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(dataset, tmp_path):
    cfg = TrainConfig(**TINY)
    train(MODEL, replace(cfg, stop_at=2), dataset, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"lr=0.01 \(now 0.02\)"):
        train(MODEL, replace(cfg, lr=0.02), dataset, out_dir=tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(MODEL, cfg, dataset, out_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="out_dir"):
        train(MODEL, cfg, dataset, resume=True)


def test_checkpoint_interval_saves_mid_run(dataset, tmp_path, monkeypatch):
    cfg = TrainConfig(**{**TINY, "checkpoint_interval": 4})
    train(MODEL, replace(cfg, stop_at=6), dataset, out_dir=tmp_path, progress=False)
    assert load_manifest(tmp_path / "checkpoint")["meta"]["step"] == 6
    saved, atomic_write = [], checkpoint_mod.atomic_write
    monkeypatch.setattr(
        checkpoint_mod,
        "atomic_write",
        lambda path, write: saved.append(path.name) or atomic_write(path, write),
    )
    train(MODEL, cfg, dataset, out_dir=tmp_path / "b", progress=False)
    assert saved.count("manifest.json") == 3  # after steps 4, 8 and 12


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))  # linear warmup
    assert lrs[9] == lrs[10] == pytest.approx(1e-3)  # the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # cosine decay
    assert lrs[-1] == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2, rel=0.05)  # half-way down the cosine
    no_warmup = TrainConfig(steps=5, lr=1.0, min_lr=0.0, warmup_steps=0)
    assert [lr_at(s, no_warmup) for s in (0, 4)] == [1.0, 0.0]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps=0 must be >= 1"),
        ("batch_size", -1, "batch_size=-1"),
        ("lr", 0.0, "lr=0.0 must be > 0"),
        ("min_lr", 1.0, r"min_lr=1.0 must be in \[0, lr="),
        ("warmup_steps", -1, "warmup_steps=-1"),
        ("beta2", 1.0, r"beta2=1.0 must be in \[0, 1\)"),
        ("grad_clip", -1.0, "grad_clip=-1.0"),
        ("eval_interval", 0, "eval_interval=0"),
        ("checkpoint_interval", -2, "checkpoint_interval=-2"),
        ("stop_at", 5000, r"stop_at=5000 must be None or in \[1, steps="),
    ],
)
def test_bad_train_config_names_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_run_shape_errors_come_before_any_work(dataset):
    with pytest.raises(ValueError, match=r"seq_len=64 exceeds the model's block_size=32"):
        train(MODEL, TrainConfig(**{**TINY, "seq_len": 64}), dataset, progress=False)
    with pytest.raises(ValueError, match="world_size=2"):
        SingleDevice(ctx=type("Ctx", (), {"world_size": 2, "rank": 0})())
    with pytest.raises(NotImplementedError):
        Strategy().wrap(build_model(MODEL, 0, "cpu"), TrainConfig())


def test_same_seed_same_model_and_optimizer_skips_frozen_and_1d():
    a, b = build_model(MODEL, 3, "cpu"), build_model(MODEL, 3, "cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    a.wpe.weight.requires_grad_(False)  # a frozen parameter is left out of the optimizer
    decay, no_decay = make_optimizer(a, TrainConfig()).param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_trainable = sum(p.numel() for p in a.parameters() if p.requires_grad)
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_trainable


def test_train_worker_runs_the_named_strategy_on_a_launched_rank(dataset):
    """The CLI's path for launched runs: the same losses as calling train() here."""
    launch = pytest.importorskip("course_lib.launch")
    cfg = TrainConfig(**{**TINY, "steps": 4})
    threads = torch.get_num_threads()  # the spawned rank gets as many: matmuls split across
    here = train(MODEL, cfg, dataset, progress=False)  # another count round otherwise
    kwargs = dict(model_config=MODEL, train_config=cfg, dataset=dataset, progress=False)
    [spawned] = launch.run_distributed(
        train_mod.train_worker, 1, "single", device="cpu", timeout_s=60,
        threads_per_rank=threads, **kwargs,
    )  # fmt: skip
    assert _losses(spawned) == _losses(here)
