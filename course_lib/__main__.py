"""Command line: ``python -m course_lib train ...`` (chapter 0) and ``... grade`` (exercises).

This is the entry point: the only module that reads the environment (torchrun's
variables). ``python -m course_lib train --help`` lists every option with its default.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from course_lib.checkpoint import MANIFEST
from course_lib.data import (
    ByteDataset,
    decode,
    encode,
    load_text,
    make_dataset,
    unigram_entropy_bits,
)
from course_lib.model import GPT, GPTConfig, count_parameters
from course_lib.train import (
    CHECKPOINT_NAME,
    STRATEGIES,
    TrainConfig,
    TrainResult,
    make_strategy,
    train,
    train_worker,
    validate_run,
)

Formatter = argparse.ArgumentDefaultsHelpFormatter
SAMPLE_PROMPT = "def "
SAMPLE_TEMPERATURE = 0.8


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g, m = parser.add_argument_group("model shape (GPTConfig)"), GPTConfig()
    g.add_argument("--n-layer", type=int, default=m.n_layer, help="transformer blocks L")
    g.add_argument("--n-head", type=int, default=m.n_head, help="attention heads per block")
    g.add_argument("--n-embd", type=int, default=m.n_embd, help="residual stream width d")
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="longest sequence the model accepts (default %(default)s: the --seq-len)",
    )
    g.add_argument("--dropout", type=float, default=m.dropout, help="dropout probability")
    g.add_argument(
        "--no-tie-weights",
        action="store_true",
        help="give the LM head its own matrix instead of sharing the token embedding",
    )


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    g, t = parser.add_argument_group("training (TrainConfig)"), TrainConfig()
    g.add_argument("--steps", type=int, default=t.steps, help="optimizer steps planned")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help="GLOBAL batch, sequences")
    g.add_argument("--seq-len", type=int, default=t.seq_len, help="tokens (bytes) per sequence")
    g.add_argument("--lr", type=float, default=t.lr, help="peak learning rate after warmup")
    g.add_argument("--min-lr", type=float, default=t.min_lr, help="learning rate at the end")
    g.add_argument("--warmup-steps", type=int, default=t.warmup_steps, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=t.weight_decay, help="AdamW decay, 2-D")
    g.add_argument("--grad-clip", type=float, default=t.grad_clip, help="max grad norm; 0 = off")
    g.add_argument("--eval-interval", type=int, default=t.eval_interval, help="steps per eval")
    g.add_argument("--eval-batches", type=int, default=t.eval_batches, help="val batches per eval")
    g.add_argument("--seed", type=int, default=t.seed, help="seed: init, dropout, batches, sample")
    g.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop (and checkpoint) after this many steps; the lr schedule still plans "
        "--steps, so a later --resume continues the same run",
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="UTF-8 text file to train on (default %(default)s: the embedded Python docs)",
    )
    g.add_argument("--val-fraction", type=float, default=0.1, help="tail held out for validation")


def _add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("pipeline (chapter 5 --strategy pp; chapter 7 --pp)")
    g.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved", "zb"], default=None,
                   help="pipeline schedule (default 1f1b; with --pp: 1f1b or gpipe)")  # fmt: skip
    g.add_argument("--microbatches", type=int, default=None,
                   help="micro-batches per step (default: 2 per stage)")  # fmt: skip
    g.add_argument("--chunks", type=int, default=None,
                   help="model chunks per rank, interleaved schedule only (default 2)")  # fmt: skip


def _add_tensor_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tensor parallel (chapter 6 --strategy tp; chapter 7 --tp)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split LayerNorm and dropout regions along the sequence "
                        "(Korthikanti et al., 2022)")  # fmt: skip


def _add_grid_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "3D parallelism (chapter 7)",
        "--dp D --pp P --tp T run D x P x T ranks (spawned, or under torchrun) with "
        "--strategy hybrid; an axis left out is 1, --world-size may be left out",
    )
    g.add_argument("--dp", type=int, default=None,
                   help="data-parallel replicas; each draws 1/D of the global batch")  # fmt: skip
    g.add_argument("--pp", type=int, default=None,
                   help="pipeline stages per replica (--schedule, --microbatches)")  # fmt: skip
    g.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks per stage; must divide --n-head; "
                        "--sequence-parallel applies")  # fmt: skip
    g.add_argument("--zero", type=int, default=None,
                   help="ZeRO stage on the dp axis: 0 all-reduce, 1 optimizer state cut D ways, "
                        "2 also the gradients (default 0)")  # fmt: skip


class _Given(argparse.Action):
    """Store the value and remember that the user gave the option (not its default)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = frozenset(getattr(namespace, "given", frozenset()) | {self.dest})


GRID = ("dp", "pp", "tp")


def _wants_grid(args: argparse.Namespace) -> bool:
    """True for chapter 7's 3D strategy: a grid flag, or --strategy hybrid."""
    return args.strategy == "hybrid" or any(getattr(args, a) is not None for a in GRID)


def _check_grid_world(
    args: argparse.Namespace, grid: tuple[int, int, int], under_torchrun: bool, error: Callable
) -> None:
    """The grid's ranks against --world-size, if given, or torchrun's WORLD_SIZE."""
    given, (dp, pp, tp) = getattr(args, "given", frozenset()), grid
    world = dp * pp * tp
    launched = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun else args.world_size
    if under_torchrun and "world_size" in given:
        error(f"under torchrun the world size is torchrun's (WORLD_SIZE={launched}); "
              "drop --world-size")  # fmt: skip
    if (under_torchrun or "world_size" in given) and launched != world:
        from course_lib.topology import factorisations

        valid = ", ".join(f"--dp {a} --pp {b} --tp {c}" for a, b, c in factorisations(launched))
        what, fix = (f"torchrun started WORLD_SIZE={launched}", f"start {world} with torchrun")
        if not under_torchrun:
            what, fix = f"--world-size {launched}", "leave out --world-size (the grid sets it)"
        error(f"--dp {dp} x --pp {pp} x --tp {tp} = {world} ranks, but {what}; {fix}, or "
              f"fill {launched} ranks: {valid}")  # fmt: skip


def _check_grid(args: argparse.Namespace, under_torchrun: bool, error: Callable) -> None:
    """Chapter 7: check the grid before any rank starts; set strategy, world size, options."""
    given = getattr(args, "given", frozenset())
    flags = " ".join(f"--{a} {getattr(args, a)}" for a in GRID if getattr(args, a) is not None)
    if "strategy" in given and args.strategy != "hybrid":
        error(f"--strategy {args.strategy} contradicts {flags}: the grid flags run chapter 7's "
              f"3D strategy (--strategy hybrid); drop --strategy {args.strategy}, or drop the "
              "grid flags and give --world-size N")  # fmt: skip
    if args.chunks is not None:
        error("--chunks needs the interleaved schedule, which is not composed with --dp/--tp; "
              "drop --chunks, or use --strategy pp")  # fmt: skip
    for axis in GRID:
        if getattr(args, axis) is not None and getattr(args, axis) < 1:
            error(f"--{axis} must be >= 1 (ranks on that axis), got {getattr(args, axis)}")
    dp, pp, tp = (getattr(args, a) or 1 for a in GRID)
    _check_grid_world(args, (dp, pp, tp), under_torchrun, error)
    from course_lib.parallel.hybrid_strategy import check_hybrid_run

    options = dict(dp=dp, pp=pp, tp=tp, schedule=args.schedule or "1f1b",
                   sequence_parallel=args.sequence_parallel, zero=args.zero or 0)  # fmt: skip
    try:
        model_config, train_config = _configs(args)
        options["microbatches"] = check_hybrid_run(
            model_config, **options, microbatches=args.microbatches,
            batch_size=train_config.batch_size, seq_len=train_config.seq_len,
        )  # fmt: skip
    except ValueError as err:
        error(str(err))
    args.strategy, args.strategy_options = "hybrid", options
    args.world_size = 1 if under_torchrun else dp * pp * tp


def _tensor_options(args: argparse.Namespace, world: int, error: Callable) -> dict[str, Any]:
    """The tp strategy's options, checked before any rank starts; {} for other strategies."""
    if args.strategy != "tp":
        if args.sequence_parallel:
            error("--sequence-parallel is a tensor-parallel option: use it with --strategy tp")
        return {}
    from course_lib.parallel.tensor_gpt import check_tensor_parallel

    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    try:
        check_tensor_parallel(config, world, args.seq_len, args.sequence_parallel)
    except ValueError as err:
        error(str(err))
    return {"sequence_parallel": True} if args.sequence_parallel else {}


def _pipeline_options(args: argparse.Namespace, world: int, error: Callable) -> dict[str, Any]:
    """The pp strategy's options, checked before any rank starts; {} for other strategies."""
    given = {k: getattr(args, k) for k in ("schedule", "microbatches", "chunks")}
    given = {k: v for k, v in given.items() if v is not None}
    if args.strategy != "pp":
        if given:
            error(f"--{next(iter(given))} is a pipeline option: use it with --strategy pp")
        return {}
    from course_lib.parallel.pipeline_strategy import PipelineStrategy, check_pipeline

    strategy = PipelineStrategy(None, **given)
    m, chunks = strategy.options(world)
    try:
        check_pipeline(world, args.n_layer, args.batch_size, strategy.schedule, m, chunks)
    except ValueError as err:
        error(str(err))
    return given


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint/ (any strategy or world size wrote it)",
    )
    g.add_argument(
        "--checkpoint-interval", type=int, default=0, help="steps per checkpoint; 0 = at the end"
    )
    g.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="auto",
        help="where to train; auto = cuda when torch sees a GPU, else cpu",
    )
    g.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default="single",
        action=_Given,
        help="how a training step runs (course_lib.train.STRATEGIES); --dp/--pp/--tp imply "
        "'hybrid' (chapter 7)",
    )
    g.add_argument(
        "--world-size",
        type=int,
        default=1,
        action=_Given,
        help="processes to spawn, for strategies that run several ranks; with --dp/--pp/--tp "
        "their product (leave it out)",
    )
    g.add_argument(
        "--timeout-s", type=float, default=24 * 3600.0, help="hard deadline of spawned ranks"
    )
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument(
        "--sample-tokens", type=int, default=200, help="bytes to sample at the end; 0 = none"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m course_lib`` parser (chapter 0): one subcommand per verb."""
    parser = argparse.ArgumentParser(prog="python -m course_lib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parser = commands.add_parser(
        "train",
        help="train the GPT on bytes and report loss against the unigram entropy",
        description="Train the course's GPT on a byte corpus; write metrics.json, "
        "checkpoint/ and loss.png to --out, then print a summary and a sample.",
        formatter_class=Formatter,
    )
    for add in (
        _add_model_args,
        _add_train_args,
        _add_data_args,
        _add_run_args,
        _add_pipeline_args,
        _add_tensor_args,
        _add_grid_args,
    ):
        add(train_parser)
    train_parser.set_defaults(func=cmd_train, error=train_parser.error)
    grade_parser = commands.add_parser(
        "grade",
        help="run your exercise notebooks under nbval and print a score table",
        description="Grade exercise notebooks: run each under nbval, then print, per "
        "notebook, the grader cells passed out of all and each failure's hint. Exit status "
        "1 while any grader cell fails. Save your notebook before grading it.",
        formatter_class=Formatter,
    )
    grade_parser.add_argument(
        "notebooks", nargs="*", type=Path, metavar="NOTEBOOK",
        help="exercise notebooks to grade (default: every notebook in exercises/)",
    )  # fmt: skip
    grade_parser.add_argument(
        "--cell-timeout", type=int, default=600, help="seconds one cell may run"
    )
    grade_parser.set_defaults(func=cmd_grade, error=grade_parser.error)
    return parser


def cmd_grade(args: argparse.Namespace) -> int:
    """``python -m course_lib grade``: the student's score table (course_lib.grading.report)."""
    from course_lib.grading import report  # pytest and nbval load only for this command

    return report.main(args.notebooks, args.cell_timeout)


def _configs(args: argparse.Namespace) -> tuple[GPTConfig, TrainConfig]:
    model_config = GPTConfig(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block_size or args.seq_len,
        dropout=args.dropout,
        tie_weights=not args.no_tie_weights,
    )
    names = ("steps", "batch_size", "seq_len", "lr", "min_lr", "warmup_steps", "weight_decay")
    names += ("grad_clip", "eval_interval", "eval_batches", "seed", "checkpoint_interval")
    train_config = TrainConfig(**{k: getattr(args, k) for k in names}, stop_at=args.stop_at)
    return model_config, train_config


def _check_launch(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> bool:
    """Refuse impossible launches before any work; True when running under torchrun."""
    if args.world_size < 1:
        error(f"--world-size must be >= 1, got {args.world_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        error("--device cuda but torch sees no CUDA GPU; use --device cpu or auto")
    if args.resume and not (args.out / CHECKPOINT_NAME / MANIFEST).is_file():
        error(f"--resume but there is no checkpoint in {args.out / CHECKPOINT_NAME}; "
              "run without --resume")  # fmt: skip
    under_torchrun = _torchrun_env_present()
    if _wants_grid(args):
        _check_grid(args, under_torchrun, error)
        return under_torchrun
    if args.zero is not None:
        error("--zero is the ZeRO stage of the 3D strategy's dp axis: give the grid with --dp "
              "D (and --pp, --tp); for ZeRO alone use --strategy zero1|zero2|zero3")  # fmt: skip
    if under_torchrun:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.world_size != 1:
            error(f"under torchrun the world size is torchrun's (WORLD_SIZE={world}); "
                  "drop --world-size")  # fmt: skip
        if args.strategy == "single" and world > 1:
            error(f"strategy 'single' runs one process but torchrun started WORLD_SIZE={world}; "
                  "use --nproc-per-node 1, or a data-parallel strategy (chapter 2)")  # fmt: skip
    elif args.strategy == "single" and args.world_size != 1:
        error(f"--world-size {args.world_size} needs a strategy that runs several processes; "
              "'single' runs one. Data-parallel strategies come in chapter 2.")  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun else args.world_size
    if args.strategy.startswith("ps-") and world < 2:  # chapter 4: one server + workers
        error(f"--strategy {args.strategy} needs a server and at least one worker, but the "
              f"world size is {world}; use --world-size 3 (1 server, 2 workers)")  # fmt: skip
    args.strategy_options = {**_pipeline_options(args, world, error),
                             **_tensor_options(args, world, error)}  # fmt: skip
    return under_torchrun


def _torchrun_env_present() -> bool:
    try:
        from course_lib.launch import torchrun_env_present
    except ModuleNotFoundError as err:  # no launch module yet: nothing can run under torchrun
        if err.name != "course_lib.launch":
            raise
        return False
    return torchrun_env_present()


def _launch(args: argparse.Namespace, under_torchrun: bool, **kwargs: Any) -> Any:
    """Run training here, under torchrun, or on spawned ranks; rank 0's result or None."""
    kwargs["progress"] = not args.no_progress
    if under_torchrun:
        from course_lib.launch import run_under_torchrun

        return run_under_torchrun(train_worker, args.strategy, args.strategy_options, **kwargs)
    if args.strategy != "single":
        from course_lib.launch import run_distributed

        device = None if args.device == "auto" else args.device
        ranks = run_distributed(
            train_worker, args.world_size, args.strategy, args.strategy_options,
            device=device, timeout_s=args.timeout_s, **kwargs,
        )  # fmt: skip
        return ranks[0]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return train(**kwargs, strategy=make_strategy(args.strategy), device=device)


def sample_text(model: GPT, n_tokens: int, seed: int, prompt: str = SAMPLE_PROMPT) -> str:
    """``n_tokens`` bytes sampled after ``prompt`` with a fixed seed (chapter 0)."""
    device = next(model.parameters()).device
    idx = encode(prompt).long().unsqueeze(0).to(device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = model.generate(idx, n_tokens, temperature=SAMPLE_TEMPERATURE, generator=generator)
    return decode(out[0])


def _summary(
    result: TrainResult, dataset: ByteDataset, entropy_bits: float, wall_s: float
) -> list[str]:
    """The numbers a run ends with: losses in nats and bits/byte against the unigram entropy."""
    n_params = count_parameters(result.model.config)
    rows = result.metrics
    last = rows[-20:]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    lines = [
        f"model                 GPT, {n_params:,} parameters; "
        f"{len(dataset.train):,} train / {len(dataset.val):,} val bytes",
        f"steps run             {len(rows)}   wall time {wall_s:.1f} s   "
        f"throughput {tokens / sum(r['step_time_s'] for r in rows):,.0f} tokens/s",
        f"train loss            {sum(r['loss'] for r in last) / len(last):.4f} nats "
        f"(mean of the last {len(last)} steps)",
    ]
    val = result.final_val_loss
    if val is not None:
        lines.append(f"validation loss       {val:.4f} nats = {val / math.log(2):.3f} bits/byte")
    lines.append(
        f"unigram entropy       {entropy_bits * math.log(2):.4f} nats = {entropy_bits:.3f} "
        "bits/byte (loss of a model that ignores context)"
    )
    return lines


def _report(args: argparse.Namespace, result: TrainResult, dataset: ByteDataset, t0: float) -> None:
    """Print the summary, save loss.png and print a sample (main process only)."""
    from course_lib.viz.plots import save_loss_plot

    entropy_bits = unigram_entropy_bits(torch.cat([dataset.train, dataset.val]))
    for line in _summary(result, dataset, entropy_bits, time.perf_counter() - t0):
        print(line)
    plot = save_loss_plot(result.metrics, args.out / "loss.png", entropy_bits)
    print(f"wrote {result.metrics_path}, {args.out / CHECKPOINT_NAME}, {plot}")
    if args.sample_tokens > 0:
        text = sample_text(result.model, args.sample_tokens, args.seed)
        print(f"--- sample (prompt {SAMPLE_PROMPT!r}, seed {args.seed}, "
              f"temperature {SAMPLE_TEMPERATURE}) ---\n{text}\n---")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    """``python -m course_lib train``: train, then summarize, plot and sample (chapter 0)."""
    t0 = time.perf_counter()
    under_torchrun = _check_launch(args, args.error)
    try:
        model_config, train_config = _configs(args)
        dataset = make_dataset(load_text(args.corpus), args.val_fraction)
        validate_run(model_config, train_config, dataset)
    except (ValueError, FileNotFoundError) as err:
        args.error(str(err))
    kwargs = dict(model_config=model_config, train_config=train_config, dataset=dataset)
    result = _launch(args, under_torchrun, **kwargs, out_dir=args.out, resume=args.resume)
    if result is not None:  # None on ranks other than 0
        _report(args, result, dataset, t0)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m course_lib`` and the ``course`` script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
