"""Benchmark chapter 6's tensor parallelism: step time, bytes and memory, beside DTensor's.

The reference GPT (4 layers, d 256, 8 heads, T 128, batch 8) on gloo, CPU, one thread per
rank. One spawn per tp in {2, 4} runs, round-robin on the same batch from the same
weights, every variant of :data:`course_lib.chapters.ch06_tensor.VARIANTS`: our layers on
our ring collectives ("ours", "ours-sp": sequence parallel), our layers on torch's
collectives ("-tc": separates "our layers" from "our ring"), and torch's own DTensor
``parallelize_module`` ("torch", "torch-sp"); tp = 1 is the reference on one process.
Columns: the median step (the slowest rank's), its ratio to DTensor's at the same tp and
sequence parallelism, the speed-up over one device, the share of the step spent inside
the collectives (ours), the bytes our counter saw rank 0 send per forward + backward
and their ratio to ``model_comm_bytes``, the parameter bytes per rank against
``parameter_count_per_rank`` x 4, and the bytes autograd saves per rank against
``tp_activation_bytes`` (ours, with and without sequence parallelism).

    python -m benchmarks.tensor_parallel           # tp = 1, 2, 4 (a few minutes on 2 cores)
    python -m benchmarks.tensor_parallel --smoke   # tp = 2, a small model, 2 steps
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch

from course_lib.chapters import ch06_tensor as ch6
from course_lib.launch import run_distributed
from course_lib.model import GPTConfig

MODEL = GPTConfig(n_layer=4, n_head=8, n_embd=256, block_size=128, vocab_size=256)
SMOKE = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=256)
RESULTS = Path(__file__).resolve().parent / "results" / "tensor_parallel.txt"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(config: GPTConfig, batch: int, seq: int, steps: int, threads: int, tps) -> str:
    """The machine, the software and the sizes the table was measured with."""
    cores = os.cpu_count() or 1
    over = [tp for tp in tps if tp * threads > cores]
    lines = [
        __doc__.splitlines()[0],
        "",
        f"date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"machine: {platform.node()}, {_cpu_name()}, {cores} cores visible; "
        f"{platform.system()} {platform.release()}",
        f"software: torch {torch.__version__}, Python {platform.python_version()}, gloo on CPU",
        f"threads per rank: {threads}"
        + (f"; tp = {over} oversubscribe the {cores} cores (timings misleading)" if over else ""),
        f"model: {config}",
        f"batch {batch} x seq {seq}; median of {steps} timed steps after 2 warm-up steps",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tp = 2, a small model, 2 steps")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="tensor-parallel sizes")
    args = parser.parse_args(argv)
    config, batch, seq = (SMOKE, 4, 32) if args.smoke else (MODEL, 8, 128)
    steps, tps = (2, [2]) if args.smoke else (args.steps, args.tp)
    text = header(config, batch, seq, steps, args.threads, tps)
    print(text, flush=True)
    single = ch6.single_device_step(config, batch, seq, steps, warmup=2, threads=args.threads)
    table, why = [ch6.single_row(config, batch, seq, single)], []
    for tp in tps:
        ranks = run_distributed(ch6.chapter_worker, tp, config, batch, seq, list(ch6.VARIANTS),
                                steps, 2, args.threads, 5 * steps, backend="gloo",
                                timeout_s=1200, threads_per_rank=args.threads)  # fmt: skip
        table += ch6.rows(config, batch, seq, [r["steps"] for r in ranks],
                          [r["memory"] for r in ranks], single)  # fmt: skip
        shape = (batch, seq, config.n_embd)
        why.append(f"tp = {tp}, rank 0:\n" + ch6.format_collectives(ranks[0]["collectives"], shape))
        print("\n" + ch6.format_table(table) + "\n\n" + why[-1], flush=True)
    text += "\n\n" + ch6.format_table(table) + "\n\n" + "\n\n".join(why)
    if not args.smoke:
        RESULTS.write_text(text + "\n")
        print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
