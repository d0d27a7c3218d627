"""GPT-2 small on one GPU: tokens/s and MFU, eager against torch.compile (chapter 0).

Trains the course's reference GPT at GPT-2-small size (12 layers, 12 heads, d=768,
sequence 1024) for a few dozen AdamW steps in bf16 autocast, once eagerly and once under
``torch.compile``, and prints a table with a compiled / eager ratio column: step time,
tokens/s, MFU against the card's dense bf16 peak (``course_lib.cost.hardware``), peak memory,
and the memory held after a step next to the 16 bytes/param AdamW formula.

Data: the vocabulary is 50304, GPT-2's 50257 padded to a multiple of 128 as nanoGPT does
(that size is what makes the model "124M parameters"; with the byte corpus' 256 tokens it
would be 86M). No GPT-2 tokenizer is shipped, so the tokens are uniform random ids: the
loss stays near ln(50304) = 10.8, and the speed is what it is on real text, since every
FLOP of a dense transformer is independent of which tokens come in.

Run it on a CUDA machine from the repository root (needs only torch):

    python -m benchmarks.gpu --json gpu.json

``--dry-run`` (same as ``--device cpu --smoke``) runs a tiny model on the CPU in a few
seconds so that this file's code path is tested without a GPU. Without CUDA and without
``--device cpu``, it prints "needs a CUDA GPU" and exits with code 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from course_lib.cost.cost_model import PRECISIONS
from course_lib.cost.hardware import GIB, lookup_gpu, mfu, peak_flops
from course_lib.model import GPT, GPTConfig, count_parameters, flops_per_token, loss_fn

# fp32 param 4 + grad 4 + Adam m, v 8 = 16 (autocast keeps fp32 params): chapter 0's rule
ADAMW_BYTES_PER_PARAM = PRECISIONS["fp32"].total


def gpt2_small() -> GPTConfig:
    """GPT-2 small (124M parameters) with nanoGPT's padded vocabulary."""
    return GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def smoke_model() -> GPTConfig:
    """A tiny model for the CPU smoke run: the same code path in a few seconds."""
    return GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)


@dataclass
class RunResult:
    """What one training run (eager or compiled) measured."""

    mode: str  # "eager" or "compiled"
    optimizer: str  # "AdamW (fused)" or "AdamW (foreach)"
    steps: int  # measured steps, warmup excluded
    step_ms: float  # median time of one optimizer step
    tokens_per_s: float  # tokens of the measured steps / their total time
    mfu: float | None  # model FLOPs utilisation; None when the peak is unknown
    first_step_s: float  # wall time of the first step (compilation, cuBLAS/kernel set-up)
    compile_s: float | None  # compiled only: first step less one steady step
    peak_mem_bytes: int | None  # torch.cuda.max_memory_allocated over the run (CUDA only)
    state_mem_bytes: int | None  # allocated after optimizer.step(): params, grads, m, v
    final_loss: float  # loss of the last step (about ln(vocab) on random tokens)


class StepClock:
    """Per-step timings: CUDA events on a GPU (no host sync inside the loop), else wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        """Record a point in time; step i lasts from mark i to mark i + 1."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        """Duration of each step in milliseconds (synchronises the GPU once)."""
        if self.cuda:
            torch.cuda.synchronize()
            pairs = zip(self.marks, self.marks[1:], strict=False)
            return [a.elapsed_time(b) for a, b in pairs]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(
    config: GPTConfig, batch_size: int, n: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of uniform random token ids, inputs and next-token targets, (B, T) each."""
    g = torch.Generator().manual_seed(0)
    shape = (n, batch_size, config.block_size + 1)
    tokens = torch.randint(config.vocab_size, shape, generator=g).to(device)  # (n, B, T + 1)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW as nanoGPT trains GPT-2, fused into one kernel per step where torch has it."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device or version
        return torch.optim.AdamW(params, **kwargs)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """One step: forward and loss in bf16 autocast, backward, AdamW. Returns the loss."""
    x, y = batch
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def build(
    config: GPTConfig, device: torch.device, compile_backend: str | None
) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    """A freshly initialised model (compiled if a backend is given) and its optimizer."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model)
    if compile_backend is not None:
        model = torch.compile(model, backend=compile_backend)
    return model, optimizer


def time_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    device: torch.device,
) -> tuple[list[float], float]:
    """Train ``steps`` steps; returns each step's milliseconds and the last loss."""
    clock = StepClock(device)
    clock.mark()
    for i in range(steps):
        loss = train_step(model, optimizer, batches[i % len(batches)], device)
        clock.mark()
    return clock.step_ms(), loss.item()


def run(
    config: GPTConfig,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    compile_backend: str | None,
    peak: float | None,
) -> RunResult:
    """Build a fresh model, train ``warmup + steps`` steps, time the last ``steps``."""
    cuda = device.type == "cuda"
    batches = random_batches(config, batch_size, 4, device)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0  # the batches
    model, optimizer = build(config, device, compile_backend)

    synchronize(device)
    t0 = time.perf_counter()
    train_step(model, optimizer, batches[0], device)  # compiles, if compiled
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    for i in range(1, warmup):
        train_step(model, optimizer, batches[i % len(batches)], device)
    times, final_loss = time_steps(model, optimizer, batches, steps, device)
    # Right after optimizer.step(): weights, grads, Adam m and v are all allocated.
    state = torch.cuda.memory_allocated(device) - base if cuda else None
    peak_mem = torch.cuda.max_memory_allocated(device) - base if cuda else None

    tokens_per_s = steps * batch_size * config.block_size / (sum(times) / 1e3)
    step_ms = statistics.median(times)
    return RunResult(
        mode="eager" if compile_backend is None else "compiled",
        optimizer="AdamW (fused)" if optimizer.defaults.get("fused") else "AdamW (foreach)",
        steps=steps,
        step_ms=step_ms,
        tokens_per_s=tokens_per_s,
        mfu=None if peak is None else mfu(flops_per_token(config), tokens_per_s, peak),
        first_step_s=first_step_s,
        compile_s=None if compile_backend is None else max(first_step_s - step_ms / 1e3, 0.0),
        peak_mem_bytes=peak_mem,
        state_mem_bytes=state,
        final_loss=final_loss,
    )


def _fmt(value: float | int | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "-" if value is None else format(value / scale, spec)


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    return None if a is None or b is None or a == 0 else b / a


def ratios(eager: RunResult, compiled: RunResult | None) -> dict[str, float | None]:
    """compiled / eager for every numeric field the table shows."""
    fields = ("step_ms", "tokens_per_s", "mfu", "peak_mem_bytes", "state_mem_bytes")
    if compiled is None:
        return {f: None for f in fields}
    return {f: _ratio(getattr(eager, f), getattr(compiled, f)) for f in fields}


def format_table(eager: RunResult, compiled: RunResult | None, formula_bytes: int) -> str:
    """The results as a fixed-width table: metric | eager | compiled | compiled/eager."""
    rows = [  # (label, field, scale, format)
        ("step time (ms, median)", "step_ms", 1.0, ".1f"),
        ("tokens/s", "tokens_per_s", 1.0, ",.0f"),
        ("MFU", "mfu", 0.01, ".1f"),
        ("first step (s)", "first_step_s", 1.0, ".2f"),
        ("compile time (s)", "compile_s", 1.0, ".2f"),
        ("peak memory (GiB)", "peak_mem_bytes", GIB, ".2f"),
        ("held after step (GiB)", "state_mem_bytes", GIB, ".3f"),
    ]
    r = ratios(eager, compiled)
    lines = [f"{'metric':<24}{'eager':>12}{'compiled':>12}{'compiled/eager':>16}"]
    for label, field, scale, spec in rows:
        label = label.replace("MFU", "MFU (%)")
        e = _fmt(getattr(eager, field), scale, spec)
        c = "-" if compiled is None else _fmt(getattr(compiled, field), scale, spec)
        ratio = _fmt(r.get(field), 1.0, ".2f")
        lines.append(f"{label:<24}{e:>12}{c:>12}{ratio:>16}")
    formula = f"{formula_bytes / GIB:.3f}"
    lines.append(f"{'AdamW 16 B/param (GiB)':<24}{formula:>12}{formula:>12}{'':>16}")
    lines.append(
        "(compiled/eager: < 1 on time and memory, > 1 on tokens/s and MFU, means compile helps;"
        "\n 16 B/param = fp32 weight, grad, Adam m and v; 'held after step' measures them)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 30; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; smoke 1)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="micro-batch B (default 16; smoke 2)"
    )
    p.add_argument("--no-compile", action="store_true", help="eager run only")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; aot_eager for the CPU smoke run)",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny model (2 layers, d=64, T=64)")
    p.add_argument("--dry-run", action="store_true", help="same as --device cpu --smoke")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.smoke = "cpu", True
    args.steps = args.steps if args.steps is not None else (3 if args.smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.batch_size = args.batch_size or (2 if args.smoke else 16)
    if args.compile_backend is None:  # inductor's C++ build of CPU kernels takes a minute
        cpu_smoke = args.smoke and args.device == "cpu"
        args.compile_backend = "aot_eager" if cpu_smoke else "inductor"
    for name in ("steps", "warmup", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def describe(args: argparse.Namespace, config: GPTConfig, name: str, peak: float | None) -> str:
    """The lines above the table: what runs where, and what MFU is measured against."""
    gpu = lookup_gpu(name)
    peak_text = "unknown (MFU not shown; pass --peak-tflops)"
    if peak is not None:
        peak_text = f"{peak / 1e12:.1f} TFLOP/s dense" + (f" ({gpu.name})" if gpu else "")
    return (
        f"{'smoke model' if args.smoke else 'GPT-2 small'} on {name}, torch {torch.__version__}\n"
        f"  {count_parameters(config) / 1e6:.2f}M params, vocab {config.vocab_size} "
        f"(uniform random tokens), B={args.batch_size} x T={config.block_size}, bf16 autocast\n"
        f"  peak bf16: {peak_text}\n"
        f"  model FLOPs/token 6N + 12LdT = {flops_per_token(config) / 1e6:.1f}M; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps\n"
        f"  torch.compile backend: {args.compile_backend}"
    )


def write_json(
    path: str,
    args: argparse.Namespace,
    config: GPTConfig,
    name: str,
    peak: float | None,
    runs: tuple[RunResult, RunResult | None],
    error: str | None,
) -> None:
    """Everything the table shows, unrounded, plus the configuration."""
    result = {
        "device": name,
        "torch": torch.__version__,
        "model": asdict(config),
        "n_params": count_parameters(config),
        "batch_size": args.batch_size,
        "seq_len": config.block_size,
        "flops_per_token": flops_per_token(config),
        "peak_flops": peak,
        "adamw_formula_bytes": ADAMW_BYTES_PER_PARAM * count_parameters(config),
        "runs": [asdict(r) for r in runs if r is not None],
        "compiled_over_eager": ratios(*runs),
        "error": error,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 2 without a CUDA GPU, 1 if compile or the loss failed."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks.gpu needs a CUDA GPU (torch.cuda.is_available() is False); "
            "use --dry-run to check the script on the CPU",
            file=sys.stderr,
        )
        return 2
    torch.set_float32_matmul_precision("high")  # TF32 for any matmul left in fp32
    device = torch.device(args.device)
    config = smoke_model() if args.smoke else gpt2_small()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name, torch.bfloat16)
    print(describe(args, config, name, peak), flush=True)

    common = dict(config=config, batch_size=args.batch_size, steps=args.steps)
    common.update(warmup=args.warmup, device=device, peak=peak)
    eager = run(compile_backend=None, **common)
    compiled, error = None, None
    if not args.no_compile:
        try:
            compiled = run(compile_backend=args.compile_backend, **common)
        except Exception as err:  # report it, and keep the eager numbers
            error = f"torch.compile failed: {type(err).__name__}: {err}"
    print(f"  optimizer: {eager.optimizer}\n")
    print(format_table(eager, compiled, ADAMW_BYTES_PER_PARAM * count_parameters(config)))
    for r in (eager, compiled):
        if r is not None and not math.isfinite(r.final_loss):
            error = error or f"{r.mode} loss is {r.final_loss}"
    if error:
        print(f"\n{error}", file=sys.stderr)
    if args.json:
        write_json(args.json, args, config, name, peak, (eager, compiled), error)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
