"""Benchmark chapter 1's all-reduces against gloo's built-in, next to the alpha-beta model.

For every size (1 KiB .. 64 MiB, powers of 4) and world size (2 and 4), each algorithm of
course_lib.collectives and ``dist.all_reduce`` run side by side in one run, interleaved
repeat by repeat so that a busy machine slows them alike. Each timing starts after a
barrier; a repeat's time is the slowest rank's; the table shows the median over repeats,
algorithmic and bus bandwidth, the bandwidth ratio to the built-in, and the alpha-beta
prediction with (alpha, beta) fitted to the ring's own measurements.

    python benchmarks/collectives.py                  # full: 1 KiB .. 64 MiB, worlds 2, 4
    python benchmarks/collectives.py --quick          # smoke: 3 small sizes, 2 repeats
    python benchmarks/collectives.py --json out.json  # also write every row as JSON

Timings need a quiet machine: with 2 cores, world sizes above 2 oversubscribe them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from course_lib import collectives as C
from course_lib.cost import comm_model as M
from course_lib.launch import DistContext, run_distributed

KIB, MIB = 2**10, 2**20
FULL_SIZES = [KIB * 4**k for k in range(9)]  # 1 KiB, 4 KiB, ..., 64 MiB
QUICK_SIZES = [KIB, 16 * KIB, 256 * KIB]
BUILTIN = "builtin_all_reduce"
FIT_ON = "ring_all_reduce"  # alpha and beta are fitted to this algorithm's medians


def _algorithms(world_size: int) -> dict:
    """Name -> all-reduce function for this world size (halving-doubling needs 2**k ranks)."""
    algos = dict(C.ALL_REDUCES)
    if world_size & (world_size - 1):
        del algos["halving_doubling_all_reduce"]
    algos[BUILTIN] = dist.all_reduce
    return algos


def _default_repeats(n_bytes: int) -> int:
    """More repeats for small, noisy sizes; at least 5."""
    return max(5, min(30, (4 * MIB) // max(n_bytes, 1)))


def bench_worker(ctx: DistContext, sizes: list[int], repeats: int | None, warmup: int) -> dict:
    """Each rank: ``{(algorithm, n_bytes): [seconds per repeat]}`` of fp32 all-reduces."""
    torch.set_num_threads(1)
    algos = _algorithms(ctx.world_size)
    times: dict[tuple[str, int], list[float]] = {}
    for n_bytes in sizes:
        source = torch.randn(n_bytes // 4)  # (n_bytes / 4,) float32
        buffer = torch.empty_like(source)
        for i in range(warmup + (repeats or _default_repeats(n_bytes))):
            for name, fn in algos.items():  # interleaved: load drift hits all alike
                buffer.copy_(source)
                dist.barrier()
                start = time.perf_counter()
                fn(buffer)
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times.setdefault((name, n_bytes), []).append(elapsed)
    return times


def _medians(per_rank: list[dict]) -> dict[tuple[str, int], float]:
    """Per (algorithm, size): median over repeats of the slowest rank's time."""
    out = {}
    for key in per_rank[0]:
        slowest = [max(ts) for ts in zip(*(r[key] for r in per_rank), strict=True)]
        out[key] = statistics.median(slowest)
    return out


def _rows(world_size: int, medians: dict, alpha: float, beta: float) -> list[dict]:
    """One row per (size, algorithm): time, bandwidths, ratio to built-in, prediction."""
    rows = []
    for (name, n_bytes), seconds in sorted(medians.items(), key=lambda kv: kv[0][1]):
        model_name = FIT_ON if name == BUILTIN else name  # gloo's built-in is a ring on CPU
        predicted = M.predict(model_name, n_bytes, world_size, alpha, beta)
        rows.append(
            {
                "world_size": world_size,
                "algorithm": name,
                "n_bytes": n_bytes,
                "seconds": seconds,
                "algbw": M.algbw(n_bytes, seconds),
                "busbw": M.busbw(name, n_bytes, seconds, world_size),
                "vs_builtin": medians[(BUILTIN, n_bytes)] / seconds,  # bandwidth ratio
                "predicted_seconds": predicted,
            }
        )
    return rows


def _size(n_bytes: int) -> str:
    return f"{n_bytes // MIB} MiB" if n_bytes >= MIB else f"{n_bytes // KIB} KiB"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def format_table(world_size: int, rows: list[dict], alpha: float, beta: float) -> str:
    """The rows of one world size as a fixed-width text table."""
    lines = [
        f"world size {world_size} (gloo, CPU, 1 thread per rank): alpha = {alpha * 1e6:.1f} us, "
        f"beta = {beta * 1e9:.3f} ns/B (1/beta = {1 / beta / 1e9 if beta else float('inf'):.2f}"
        f" GB/s), fitted to {FIT_ON}",
        f"{'size':>8} {'algorithm':<28} {'time ms':>9} {'algbw GB/s':>10} {'busbw GB/s':>10} "
        f"{'vs builtin':>10} {'model ms':>9} {'meas/model':>10}",
    ]
    for r in rows:
        ratio = _ratio(r["seconds"], r["predicted_seconds"])
        lines.append(
            f"{_size(r['n_bytes']):>8} {r['algorithm']:<28} {r['seconds'] * 1e3:9.3f} "
            f"{r['algbw'] / 1e9:10.3f} {r['busbw'] / 1e9:10.3f} {r['vs_builtin']:10.2f} "
            f"{r['predicted_seconds'] * 1e3:9.3f} {ratio:10.2f}"
        )
    return "\n".join(lines)


def run_world(world_size: int, sizes: list[int], repeats: int | None, warmup: int) -> dict:
    """Benchmark one world size; return its rows and the fitted (alpha, beta)."""
    per_rank = run_distributed(
        bench_worker,
        world_size,
        sizes,
        repeats,
        warmup,
        backend="gloo",
        timeout_s=3600,
        threads_per_rank=1,
    )
    medians = _medians(per_rank)
    messages, factor = M.alpha_beta_terms(FIT_ON, world_size)
    ring = [medians[(FIT_ON, s)] for s in sizes]
    alpha = beta = float("nan")  # a line needs two sizes: no model with one
    if len(set(sizes)) >= 2:
        alpha, beta = M.fit_alpha_beta(sizes, ring, messages, factor)
    return {"alpha": alpha, "beta": beta, "rows": _rows(world_size, medians, alpha, beta)}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run every world size, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 small sizes, 2 repeats")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--max-bytes", type=int, default=64 * MIB, help="largest size")
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 to 30 by size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write all rows here")
    args = parser.parse_args(argv)
    sizes = [s for s in (QUICK_SIZES if args.quick else FULL_SIZES) if s <= args.max_bytes]
    repeats = 2 if args.quick and args.repeats is None else args.repeats
    report = {"cpus": os.cpu_count(), "rows": [], "fits": {}}
    for n in args.world_sizes:
        result = run_world(n, sizes, repeats, args.warmup)
        print(format_table(n, result["rows"], result["alpha"], result["beta"]))
        if n > (os.cpu_count() or 1):
            print(f"note: {n} ranks on {os.cpu_count()} cores share cores; times are pessimistic")
        print()
        report["rows"] += result["rows"]
        report["fits"][n] = {"alpha": result["alpha"], "beta": result["beta"]}
    if args.json is not None:  # NaN (no fit) is not JSON: written as null
        clean = json.loads(json.dumps(report), parse_constant=lambda _: None)
        args.json.write_text(json.dumps(clean, indent=1))


if __name__ == "__main__":
    main()
