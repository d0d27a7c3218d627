"""Benchmark chapter 4's parameter server: sync vs async vs SSP vs all-reduce data parallel.

Every mode trains the same small GPT with plain SGD for the same number of applied
gradients (``--grads``), free running (a fast worker may contribute more of them), with
2 workers, without and with a straggler (worker 0's whole step 2x as long). Every worker
also sleeps ``--delay`` seconds per step, simulated compute that keeps the timings
readable when the processes share two busy cores. All parameter-server modes run in one
spawn (1 server + 2 workers), the all-reduce yardstick in another (2 ranks). Validation
losses are computed afterwards from parameter snapshots, so evaluation costs no training
time. Then the bytes per step through the server's link, against those a ring all-reduce
sends per rank, as the workers grow.

    python benchmarks/parameter_server.py            # full (5 minutes on 2 busy cores)
    python benchmarks/parameter_server.py --smoke    # under a minute: fewer grads and modes

With 2 CPU cores, 3 processes oversubscribe them: times are indicative; the ratios in one
run are comparable because every mode shares the same machine state.
"""

from __future__ import annotations

import argparse
import math

from course_lib.chapters import ch04_parameter_server as ch4
from course_lib.cost import comm_model as M
from course_lib.data import load_text, make_dataset
from course_lib.launch import run_distributed
from course_lib.model import GPTConfig
from course_lib.parallel.parameter_server import HEADER
from course_lib.train import TrainConfig

MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)
LAUNCH = dict(backend="gloo", timeout_s=600, threads_per_rank=1)


def _modes(smoke: bool) -> dict[str, dict]:
    modes = {"sync": {}, "async": {"mode": "async"}}
    for s in (2,) if smoke else (1, 2, 4):
        modes[f"ssp s={s}"] = {"mode": "ssp", "staleness": s}
    return modes


def _rows(args, train_config, dataset) -> tuple[list[tuple], dict[str, list[int]]]:
    """Run every mode with and without the straggler; one table row each."""
    modes, slowdowns = _modes(args.smoke), (1.0, 2.0)
    straggle = [{"slow_worker": 0, "slowdown": f, "delay_s": args.delay} for f in slowdowns]
    configs = [{**kw, **st} for st in straggle for kw in modes.values()]
    common = (MODEL, train_config, dataset)
    ps = run_distributed(ch4.free_run_worker, 3, *common, configs, args.grads, args.every,
                         **LAUNCH)[0]  # fmt: skip
    ar = run_distributed(ch4.allreduce_worker, 2, *common, list(slowdowns), args.grads,
                         args.every, args.delay, **LAUNCH)[0]  # fmt: skip
    names = [*modes, "all-reduce DP"]
    runs = []
    for i, f in enumerate(slowdowns):
        done = [*ps[i * len(modes) : (i + 1) * len(modes)], ar[i]]
        runs += [(n, f, r) for n, r in zip(names, done, strict=True)]
    curves = {(n, f): ch4.val_curve(*common, r["snaps"]) for n, f, r in runs}
    sync_final = curves["sync", 1.0][-1][2]  # default target: near sync's final loss
    target = args.target or math.ceil(20 * (sync_final + 0.1)) / 20
    rows, hists = [], {}
    for n, f, r in runs:
        row = ch4.summarize(curves[n, f], r.get("log"), r["wall_s"], args.grads)
        rows.append((n, f, row, ch4.time_to(curves[n, f], target), r["wall_s"]))
        if "log" in r:
            hists[f"{n}, straggler x{f:g}"] = ch4.staleness_histogram(r["log"])
    return rows, hists, target


def _print_modes(rows, target: float) -> None:
    print(f"\n## updates/s (gradients applied per second); time to val loss <= {target:.2f}")
    print(f"{'mode':<14} {'straggler':>9} {'grads/s':>8} {'vs sync':>8} {'t->target s':>11} "
          f"{'wall s':>7} {'final val':>9} {'max stale':>9} {'mean stale':>10}")  # fmt: skip
    base = {f: row["grads_per_s"] for n, f, row, _, _ in rows if n == "sync"}
    for n, f, row, t, wall in rows:
        reach = f"{t:11.2f}" if t is not None else f"{'never':>11}"
        print(f"{n:<14} {'x' + format(f, 'g'):>9} {row['grads_per_s']:8.1f} "
              f"{row['grads_per_s'] / base[f]:8.2f} {reach} {wall:7.2f} {row['final_val']:9.3f} "
              f"{row['max_stale']:9d} {row['mean_stale']:10.2f}")  # fmt: skip


def _print_hists(hists: dict[str, list[int]]) -> None:
    print("\n## staleness histogram (gradients with staleness 0, 1, ..., >=8 clocks)")
    print(f"{'run':<30} " + " ".join(f"{s:>5}" for s in [*range(8), ">=8"]))
    for name, counts in hists.items():
        print(f"{name:<30} " + " ".join(f"{c:5d}" for c in counts))


def _print_bytes(args, train_config, dataset) -> None:
    print("\n## bytes per step, each direction: the server's link vs one rank of a ring all-reduce")
    print(f"{'workers':>7} {'server in':>11} {'server out':>11} {'server pred':>12} "
          f"{'ring sent':>10} {'ring recv':>10} {'ring pred':>10} {'server/ring':>11} "
          f"{'W^2/2(W-1)':>10}")  # fmt: skip
    for n in (2,) if args.smoke else (1, 2, 3, 4, 6):
        cfg = TrainConfig(**{**train_config.__dict__, "batch_size": 4 * n})  # W divides it
        r = run_distributed(ch4.bytes_worker, n + 1, MODEL, cfg, dataset, 2, **LAUNCH)
        p = r[0]["n_params"]
        server_pred = n * (p + HEADER) * 4  # each direction: W pushes in, W replies out, fp32
        ring_pred = (
            M.bytes_sent_per_rank("ring_all_reduce", 4 * p, n, 0, element_size=4) if n > 1 else 0
        )
        sent, received = r[1]["rank_sent"], r[1]["rank_received"]
        # Like with like: the busier direction of the server's link vs the ring rank's.
        server = max(r[0]["server_in"], r[0]["server_out"])
        ratio = f"{server / max(sent, received):11.2f}" if sent else f"{'-':>11}"
        model = f"{n * n / (2 * (n - 1)):10.2f}" if n > 1 else f"{'-':>10}"
        print(f"{n:7d} {r[0]['server_in']:11,d} {r[0]['server_out']:11,d} {server_pred:12,d} "
              f"{sent:10,d} {received:10,d} {ring_pred:10,d} {ratio} {model}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run, under a minute")
    parser.add_argument("--grads", type=int, default=None, help="gradients applied per run")
    parser.add_argument("--every", type=int, default=None, help="snapshot every N gradients")
    parser.add_argument("--delay", type=float, default=None, help="simulated compute, s/step")
    parser.add_argument(
        "--target", type=float, default=None, help="val loss to reach (default: sync's + 0.1)"
    )
    args = parser.parse_args()
    args.grads = args.grads or (24 if args.smoke else 240)
    args.every = args.every or (8 if args.smoke else 20)
    args.delay = args.delay if args.delay is not None else (0.01 if args.smoke else 0.04)
    train_config = TrainConfig(steps=args.grads // 2, batch_size=16, seq_len=32, lr=0.5,
                               min_lr=0.5, warmup_steps=0, weight_decay=0.0,
                               grad_clip=0.0, eval_batches=4)  # fmt: skip
    dataset = make_dataset(load_text())
    print(f"GPT {MODEL.n_layer} layers, d={MODEL.n_embd}; SGD lr {train_config.lr}; "
          f"global batch {train_config.batch_size}x{train_config.seq_len}; "
          f"{args.grads} gradients per run; {args.delay * 1e3:g} ms simulated compute "
          "per step")  # fmt: skip
    rows, hists, target = _rows(args, train_config, dataset)
    _print_modes(rows, target)
    _print_hists(hists)
    _print_bytes(args, train_config, dataset)


if __name__ == "__main__":
    main()
