"""Chapter 6: ``--strategy tp`` in the training loop: the same run as one device, and resumable."""

import subprocess
import sys

import pytest
import torch
from cli_runs import cli_losses

from course_lib.data import load_text, make_dataset
from course_lib.launch import run_distributed
from course_lib.model import GPTConfig
from course_lib.train import TrainConfig, train, train_worker

MODEL = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16)
LAUNCH = dict(timeout_s=200, threads_per_rank=1)


@pytest.mark.timeout(300)
def test_training_loop_with_sequence_parallelism_reproduces_single_device():
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=1, eval_interval=2,
                      eval_batches=1, grad_clip=0.5)  # fmt: skip  (clipping active)
    data = make_dataset(load_text(None), 0.1)
    single = train(MODEL, cfg, data, progress=False)
    ours = run_distributed(train_worker, 2, "tp", {"sequence_parallel": True}, model_config=MODEL,
                           train_config=cfg, dataset=data, progress=False, **LAUNCH)  # fmt: skip
    for key in ("loss", "val_loss"):
        got = [r[key] for r in ours[0].metrics if r[key] is not None]
        want = [r[key] for r in single.metrics if r[key] is not None]
        assert len(got) == len(want) > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want = single.model.state_dict()
    for name, value in ours[0].model.state_dict().items():  # gathered whole at the end
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.timeout(300)
def test_cli_tp_reproduces_single_device_losses(tmp_path):
    common = ["train", "--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--seq-len", "16",
              "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--eval-interval",
              "3", "--eval-batches", "1", "--no-progress", "--sample-tokens", "0",
              "--device", "cpu"]  # fmt: skip
    runs = {"single": [], "tp": ["--strategy", "tp", "--world-size", "2"]}
    losses = cli_losses(tmp_path, common, runs)
    assert len(losses["tp"]) == 3
    torch.testing.assert_close(losses["tp"], losses["single"], rtol=1e-5, atol=1e-5)


def test_cli_refuses_a_split_that_cannot_work_before_starting_ranks():
    cmd = [sys.executable, "-m", "course_lib", "train", "--strategy", "tp", "--world-size", "3",
           "--n-head", "4", "--steps", "1", "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tp=3 does not divide n_head=4" in done.stderr
    assert "choose tp in [1, 2, 4]" in done.stderr
    cmd = [sys.executable, "-m", "course_lib", "train", "--sequence-parallel", "--steps", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "use it with --strategy tp" in done.stderr


@pytest.mark.timeout(300)
def test_a_tp_checkpoint_resumes_on_one_device_and_at_another_tp(tmp_path):
    """tp=2 -> one device -> tp=4 with sequence parallelism: the losses of one whole run."""
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, warmup_steps=1, eval_interval=3,
                      eval_batches=1)  # fmt: skip
    data = make_dataset(load_text(None), 0.1)
    whole = train(MODEL, cfg, data, progress=False)
    kwargs = dict(model_config=MODEL, dataset=data, progress=False, out_dir=tmp_path)
    stop = lambda k: TrainConfig(**{**cfg.__dict__, "stop_at": k})  # noqa: E731
    run_distributed(train_worker, 2, "tp", {}, train_config=stop(2), **kwargs, **LAUNCH)
    train(MODEL, stop(4), data, progress=False, out_dir=tmp_path, resume=True)
    resumed = run_distributed(train_worker, 4, "tp", {"sequence_parallel": True},
                              train_config=cfg, resume=True, **kwargs, **LAUNCH)[0]  # fmt: skip
    got = [m["loss"] for m in resumed.metrics]
    want = [m["loss"] for m in whole.metrics]
    assert len(got) == 6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
