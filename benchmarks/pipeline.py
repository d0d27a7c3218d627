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
        rows += ch5.table(configs, ranks, p, MODEL, args.batch, compute_s)
        print(ch5.format_table([r for r in rows if r["p"] == p]), flush=True)
    text = ch5.format_table(rows)
    if not args.smoke:
        RESULTS.write_text(f"{__doc__.splitlines()[0]}\n\n{text}\n")
        print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
