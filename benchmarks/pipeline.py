"""Benchmark chapter 5's pipeline: bubble, step time and activation memory, beside torch's own.

For each schedule (GPipe, 1F1B, interleaved 1F1B with v = 2, ZB-H1) and m in {p, 2p, 4p}
micro-batches, on p ranks (gloo, CPU), one spawn runs our executor and, in the same run,
``torch.distributed.pipelining`` on the same stages and schedule. Every action carries the
same simulated compute (``--compute-ms`` per stage and micro-batch for F, B and W) so the
bubble is visible over the small, noisy real compute of 2 cores. Columns:

- bubble measured (idle share of rank-time, from every action's real start and end), the
  simulator's prediction fed with the measured mean cost of each rank's F, B and W, and
  and the measured median message latency (``t_comm``); the formula ((p - 1)/(m + p - 1);
  interleaved (p - 1)/(vm + p - 1); ZB-H1 the simulator with the nominal costs);
- step time of ours, of torch's (same run), their ratio, and the speed-up over one device
  doing all the work (the real model plus all the simulated compute);
- peak bytes autograd saved on the busiest rank, measured with saved-tensor hooks, over
  the prediction: the schedule's peak live micro-batches x one micro-batch's bytes.

    python -m benchmarks.pipeline            # p = 2 and p = 4 (about 3 minutes on 2 cores)
    python -m benchmarks.pipeline --smoke    # p = 2, m in {2, 4}: under a minute
"""

from __future__ import annotations

import argparse
from pathlib import Path

from course_lib.chapters import ch05_pipeline as ch5
from course_lib.launch import run_distributed
from course_lib.model import GPTConfig
from course_lib.parallel import schedules as S
from course_lib.parallel.pipeline_sim import peak_activations, simulate
from course_lib.parallel.pipeline_strategy import SCHEDULES

# Untied: torch.distributed.pipelining has no tied embedding across stages.
MODEL = GPTConfig(n_layer=8, n_head=2, n_embd=64, block_size=32, tie_weights=False)
RESULTS = Path(__file__).resolve().parent / "results" / "pipeline.txt"


def _configs(p: int, ms: list[int]) -> list[dict]:
    out = []
    for m in ms:
        out += [{"schedule": "gpipe", "microbatches": m}, {"schedule": "1f1b", "microbatches": m},
                {"schedule": "zb", "microbatches": m}]  # fmt: skip
        if m % p == 0 and MODEL.n_layer >= 2 * p:
            out.append({"schedule": "interleaved", "microbatches": m, "chunks": 2})
    return out


def _schedule(cfg: dict, p: int) -> S.Schedule:
    chunks = cfg.get("chunks", 1)
    fn = SCHEDULES[cfg["schedule"]]
    return fn(p, cfg["microbatches"], chunks) if chunks > 1 else fn(p, cfg["microbatches"])


def _formula(cfg: dict, p: int, compute_s: tuple[float, float, float]) -> float:
    m, v = cfg["microbatches"], cfg.get("chunks", 1)
    if cfg["schedule"] == "zb":  # the simulator with the nominal costs (B and W split)
        return simulate(_schedule(cfg, p), *compute_s).bubble_fraction
    return (p - 1) / (v * m + p - 1)


def _row(cfg: dict, p: int, ranks: list[dict], single_s: float, compute_s) -> dict:
    ours = [r["ours"] for r in ranks]
    records = [o["records"] for o in ours]
    chunks = cfg.get("chunks", 1)
    schedule = _schedule(cfg, p)
    costs = ch5.mean_costs(records, chunks)
    t_comm = ch5.message_latency(records, schedule, chunks)
    predicted = simulate(schedule, costs["F"], costs["B"], costs["W"], t_comm, chunks=chunks)
    step = max(o["step_s"] for o in ours)
    theirs = ranks[0]["torch"]
    torch_step = max(r["torch"]["step_s"] for r in ranks) if theirs else None
    peaks = peak_activations(schedule)
    busiest = max(range(p), key=lambda r: ours[r]["peak_saved"])
    want = peaks[busiest] * ours[busiest]["per_microbatch_bytes"] / chunks  # per (mb, chunk)
    return {
        "schedule": cfg["schedule"] + (f" v={chunks}" if chunks > 1 else ""), "p": p,
        "m": cfg["microbatches"], "measured": ch5.measured_bubble(records),
        "simulated": predicted.bubble_fraction, "formula": _formula(cfg, p, compute_s),
        "step": step, "torch": torch_step, "speedup": single_s / step,
        "peak_ratio": ours[busiest]["peak_saved"] / want,
    }  # fmt: skip


def _table(rows: list[dict]) -> str:
    head = (f"{'schedule':<15}{'p':>3}{'m':>4} | {'bubble: meas':>12}{'sim':>7}{'formula':>8}"
            f"{'meas/sim':>9} | {'step ms':>8}{'torch ms':>9}{'ours/torch':>11}"
            f"{'vs 1 dev':>9} | {'peak act meas/pred':>18}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        torch_ms = f"{r['torch'] * 1e3:9.0f}" if r["torch"] else f"{'-':>9}"
        ratio = f"{r['step'] / r['torch']:10.2f}x" if r["torch"] else f"{'-':>11}"
        lines.append(
            f"{r['schedule']:<15}{r['p']:>3}{r['m']:>4} | {r['measured']:12.3f}"
            f"{r['simulated']:7.3f}{r['formula']:8.3f}{r['measured'] / r['simulated']:9.2f} | "
            f"{r['step'] * 1e3:8.0f}{torch_ms}{ratio}{r['speedup']:8.2f}x | "
            f"{r['peak_ratio']:18.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="p = 2, m in {2, 4}")
    parser.add_argument(
        "--compute-ms",
        type=float,
        default=20.0,
        help="simulated compute per stage and micro-batch, for each of F, B, W",
    )
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    args = parser.parse_args(argv)  # fmt: skip
    compute_s = (args.compute_ms / 1e3,) * 3
    sizes = [2] if args.smoke else [2, 4]
    rows = []
    for p in sizes:
        ms = [p, 2 * p] if args.smoke else [p, 2 * p, 4 * p]
        configs = _configs(p, ms)
        ranks = run_distributed(ch5.measure_worker, p, MODEL, configs, args.batch, compute_s,
                                backend="gloo", timeout_s=900, threads_per_rank=1)  # fmt: skip
        for i, cfg in enumerate(configs):
            single = ch5.single_device_step(MODEL, args.batch, compute_s, p, cfg["microbatches"])
            rows.append(_row(cfg, p, [r[i] for r in ranks], single, compute_s))
        print(_table([r for r in rows if r["p"] == p]), flush=True)
    text = _table(rows)
    if not args.smoke:
        RESULTS.write_text(f"{__doc__.splitlines()[0]}\n\n{text}\n")
        print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
