"""``python -m course_lib train`` (chapter 0): help, a tiny run, clear refusals."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from course_lib.__main__ import _check_launch, build_parser, main

TINY_ARGS = [
    "train", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
    "--batch-size", "4", "--steps", "6", "--warmup-steps", "2", "--eval-interval", "3",
    "--eval-batches", "1", "--no-progress", "--sample-tokens", "40", "--device", "cpu",
]  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "course_lib", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _train_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return subparsers.choices["train"]


def test_help_documents_every_option():
    result = _run("train", "--help")
    assert result.returncode == 0
    expected = (
        "--n-layer --n-head --n-embd --block-size --dropout --no-tie-weights --steps "
        "--batch-size --seq-len --lr --warmup-steps --weight-decay --grad-clip "
        "--eval-interval --eval-batches --seed --corpus --val-fraction --out --resume "
        "--checkpoint-interval --device --strategy --world-size --no-progress --sample-tokens"
    ).split()
    options = [a for a in _train_parser()._actions if a.option_strings != ["-h", "--help"]]
    documented = {s for a in options for s in a.option_strings}
    assert set(expected) <= documented
    for action in options:
        assert action.help, f"{action.option_strings} has no help"
        assert action.option_strings[0] in result.stdout
    assert "(default: 64)" in result.stdout  # defaults are shown


def test_tiny_run_writes_outputs_and_prints_summary_and_sample(tmp_path):
    result = _run(*TINY_ARGS, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("metrics.json", "loss.png", "checkpoint/manifest.json"):
        assert (tmp_path / name).is_file(), name
    assert len(json.loads((tmp_path / "metrics.json").read_text())["metrics"]) == 6
    out = result.stdout
    assert "unigram entropy" in out and "bits/byte" in out and "tokens/s" in out
    assert "validation loss" in out
    assert "--- sample (prompt 'def '" in out


def test_resume_in_process_continues_the_run(tmp_path, capsys):
    args = [*TINY_ARGS, "--out", str(tmp_path), "--sample-tokens", "0"]
    assert main([*args, "--stop-at", "3"]) == 0
    assert main([*args, "--resume"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert [m["step"] for m in metrics] == list(range(6))
    assert "sample" not in capsys.readouterr().out


def test_single_strategy_refuses_several_ranks_without_a_traceback():
    result = _run("train", "--strategy", "single", "--world-size", "2")
    assert result.returncode == 2
    assert "error:" in result.stderr and "chapter 2" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-head", "3"], "n_head=3 does not divide n_embd=32"),
        (["--seq-len", "64", "--block-size", "32"], "seq_len=64 exceeds"),
        (["--resume"], "no "),
        (["--corpus", "/nonexistent/corpus.txt"], "does not exist"),
    ],
)
def test_bad_arguments_are_argparse_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_ARGS, "--out", str(tmp_path / "run"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# Chapter 7: the grid flags --dp --pp --tp (--strategy hybrid), checked before any rank starts
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dp", "2", "--tp", "2", "--world-size", "3"],
         "--dp 2 x --pp 1 x --tp 2 = 4 ranks, but --world-size 3"),
        (["--strategy", "hybrid", "--world-size", "2"], "fill 2 ranks: --dp 2 --pp 1 --tp 1"),
        (["--tp", "3"], "tp=3 does not divide n_head=2"),
        (["--dp", "2", "--zero", "3"], "zero_stage=3"),
        (["--dp", "2", "--pp", "0"], "--pp must be >= 1"),
        (["--pp", "2", "--schedule", "zb"], "schedule 'zb' is not composed"),
        (["--pp", "2", "--chunks", "2"], "--chunks needs the interleaved schedule"),
        (["--dp", "2", "--microbatches", "4"], "divisible by 8"),
        (["--strategy", "tp", "--tp", "2"], "--strategy tp contradicts --tp 2"),
        (["--strategy", "dp", "--dp", "2", "--world-size", "2"], "--strategy dp contradicts"),
        (["--strategy", "zero1", "--zero", "1", "--world-size", "2"], "--zero is the ZeRO stage"),
    ],
)  # fmt: skip
def test_bad_grids_are_argparse_errors_before_any_rank_starts(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_ARGS, "--out", str(tmp_path / "run"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_grid_flags_run_the_3d_strategy_with_the_single_device_losses(tmp_path):
    args = [*TINY_ARGS, "--sample-tokens", "0", "--steps", "3", "--eval-interval", "3",
            "--timeout-s", "120"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert main([*args, "--dp", "2", "--pp", "1", "--tp", "2", "--out", str(tmp_path / "3d")]) == 0
    single, hybrid = (
        json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "3d")
    )
    assert hybrid["strategy"] == "hybrid"
    losses = [[m["loss"] for m in run["metrics"]] for run in (hybrid, single)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(*losses, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize(
    "extra, world, options",
    [
        (["--dp", "2", "--pp", "2", "--tp", "2", "--zero", "1"], 8,
         dict(dp=2, pp=2, tp=2, zero=1, microbatches=4, schedule="1f1b")),
        (["--strategy", "hybrid", "--tp", "2", "--world-size", "2", "--sequence-parallel"], 2,
         dict(dp=1, pp=1, tp=2, zero=0, microbatches=2, sequence_parallel=True)),
        (["--pp", "2", "--schedule", "gpipe", "--microbatches", "4"], 2,
         dict(dp=1, pp=2, tp=1, microbatches=4, schedule="gpipe")),
    ],
)  # fmt: skip
def test_grid_flags_choose_the_3d_strategy_and_its_world(tmp_path, extra, world, options):
    shape = ["--n-layer", "2", "--batch-size", "8"]  # two blocks for two stages
    args = _train_parser().parse_args([*TINY_ARGS[1:], *shape, "--out", str(tmp_path), *extra])
    assert _check_launch(args, args.error) is False  # not under torchrun
    assert args.strategy == "hybrid" and args.world_size == world
    assert options.items() <= args.strategy_options.items()
