"""Benchmark chapter 7's planner: predicted vs measured memory and step time, and at scale.

At world size 4 on this machine (gloo, CPU, one thread per rank) every configuration
(dp2 x pp2, dp2 x tp2, pp2 x tp2, dp4, pp4, tp4, and variants with ZeRO-1/2 and sequence
parallelism) runs a few fp32 AdamW steps of one GPT in one spawn
(:mod:`course_lib.cost.measure_hybrid`). Columns:

- memory per rank: the planner's bytes for the rank's own stage over the measured ones,
  for parameters + gradients + optimizer state ("state", exact = 1.000 on every rank) and
  for the peak saved activations (min and max over the 4 ranks);
- step time: the planner's (:func:`~course_lib.cost.planner_model.step_time`, MFU 1,
  nothing overlapped, as the Hybrid does) with the constants calibrated in this run
  (FLOP/s per rank while all 4 ranks compute, the ring's alpha and beta) over the
  measured median step; the prediction's parts; and the prediction with the stored
  ``clusters.laptop_cluster(4)`` constants;
- Spearman's rank correlation of predicted and measured step times.

The raw CPU hides the pipeline bubble (4 ranks share 2 cores: a rank that waits lends
its core to the others), so a second run adds SIMULATED compute: each pipeline action
sleeps the planner's FLOPs of its stage at a slow simulated rate, on a tiny model, and
the planner is fed that rate. Labelled "simulated" in the table.

Beside ours, torch's own 2-D composition at dp2 x tp2 (DTensor tensor parallelism on the
mesh's "tp" dimension, FSDP2 ``fully_shard`` on "dp": :mod:`course_lib.parallel.torch_hybrid`)
on the same model and batches: same losses, then the ratio of step times.

Then "on paper, at scale": the planner's choice for the published runs of
``clusters.PUBLISHED_RUNS`` beside the configuration they chose and what they reported,
with the source and whether it was checked.

    python -m benchmarks.hybrid           # about 3-4 minutes on 2 cores; writes results/
    python -m benchmarks.hybrid --smoke   # fewer configurations and steps; writes nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from course_lib.cost import clusters as C
from course_lib.cost import measure_hybrid as MH
from course_lib.cost import planner as P
from course_lib.cost.measure_hybrid import build_hybrid
from course_lib.cost.planner_model import Choice
from course_lib.launch import DistContext, run_distributed
from course_lib.model import GPT, GPTConfig
from course_lib.parallel.torch_hybrid import torch_parallelize
from course_lib.train import TrainConfig, optimizer_groups

MODEL = GPTConfig(n_layer=4, n_head=8, n_embd=256, block_size=64, vocab_size=256, dropout=0.0)
TINY = GPTConfig(n_layer=4, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
GLOBAL_BATCH, SEQ = 16, 64
SIM_FLOP_S = 2e7  # simulated FLOP/s per rank: the tiny model's real compute is ~1/10 of it
NOTES = """What the raw CPU hides or adds, beside the planner's model:
- 4 ranks share 2 cores: a rank idle in the pipeline bubble lends its core to the
  others, so stages run faster than "peak / 4" then and the bubble costs less than the
  planner's (p - 1)/(m + p - 1) says (the simulated run below shows the bubble);
- the planner charges ZeRO's reduce-scatter + all-gather what it charges the all-reduce
  (the same bytes); the Hybrid runs them on chapter 1's Python ring with flat-buffer
  copies, plain dp on gloo's built-in all_reduce, so ZeRO's measured steps are slower;
- the constants are calibrated in the same run but on a shared machine: two runs a few
  minutes apart differ by up to ~30 % (compare the two rows of constants above)."""
RESULTS = Path(__file__).resolve().parent / "results" / "hybrid.txt"
MIB = 2**20


def choices(smoke: bool) -> list[Choice]:
    """The six world-4 grids (m = 2p with stages, else 1), then ZeRO and SP variants."""
    base = [(2, 2, 1), (2, 1, 2), (1, 2, 2), (4, 1, 1), (1, 4, 1), (1, 1, 4)]
    out = [Choice(dp, pp, tp, 2 * pp if pp > 1 else 1) for dp, pp, tp in base]
    if not smoke:
        out += [Choice(2, 2, 1, 4, zero=1), Choice(2, 1, 2, 1, sequence_parallel=True),
                Choice(1, 2, 2, 4, sequence_parallel=True), Choice(4, 1, 1, 1, zero=1),
                Choice(4, 1, 1, 1, zero=2), Choice(1, 1, 4, 1, sequence_parallel=True)]  # fmt: skip
    return out


def by_config(compared: list[dict]) -> list[list[dict]]:
    """The compared rows grouped per configuration (4 ranks each, in order)."""
    return [compared[i : i + 4] for i in range(0, len(compared), 4)]


def time_table(title: str, groups: list[list[dict]], stored: list[list[dict]] | None) -> str:
    head = (f"{'configuration':<28}| state  act min  act max | meas ms  pred ms pred/meas |"
            f" compute      tp  pp p2p  bubble      dp   optim")  # fmt: skip
    if stored:
        head += " | stored-constants pred/meas"
    lines = [title, head, "-" * len(head)]
    for i, g in enumerate(groups):
        state = [
            sum(r[f"{k}_pred"] for k in ("params", "grads", "optimizer"))
            / sum(r[f"{k}_meas"] for k in ("params", "grads", "optimizer"))
            for r in g
        ]
        acts = [r["activations_ratio"] for r in g]
        state_s = f"{min(state):.3f}" if min(state) == max(state) else f"{min(state):.3f}*"
        t, r0 = g[0]["time"], g[0]
        line = (f"{r0['label']:<28}| {state_s:>5} {min(acts):>8.3f} {max(acts):>8.3f} |"
                f" {r0['step_meas'] * 1e3:>7.0f} {r0['step_pred'] * 1e3:>8.0f}"
                f" {r0['step_ratio']:>9.2f} | {t['compute'] * 1e3:>7.0f} {t['tp'] * 1e3:>7.0f}"
                f" {t['pp_p2p'] * 1e3:>7.0f} {t['bubble'] * 1e3:>7.0f}"
                f" {t['dp_exposed'] * 1e3:>7.0f} {t['optimizer'] * 1e3:>7.0f}")  # fmt: skip
        if stored:
            line += f" | {stored[i][0]['step_ratio']:>26.2f}"
        lines.append(line)
    pred = [g[0]["step_pred"] for g in groups]
    meas = [g[0]["step_meas"] for g in groups]
    within = sum(abs(g[0]["step_ratio"] - 1) <= 0.25 for g in groups)
    best_pred = groups[pred.index(min(pred))][0]["label"]
    best_meas = groups[meas.index(min(meas))][0]["label"]
    lines += [
        f"Spearman rank correlation, predicted vs measured step time: "
        f"{MH.spearman(pred, meas):+.2f} over {len(groups)} configurations",
        f"within 25 %: {within} of {len(groups)}; median |pred/meas - 1|: "
        f"{statistics.median(abs(g[0]['step_ratio'] - 1) for g in groups):.0%}",
        f"fastest predicted: {best_pred}; fastest measured: {best_meas}",
    ]
    if stored:
        sp = MH.spearman([g[0]["step_pred"] for g in stored], meas)
        ok = sum(abs(g[0]["step_ratio"] - 1) <= 0.25 for g in stored)
        lines.append(f"with the stored laptop_cluster(4) constants: Spearman {sp:+.2f}; "
                     f"within 25 %: {ok} of {len(stored)}")  # fmt: skip
    return "\n".join(lines)


def memory_detail(groups: list[list[dict]]) -> str:
    """Busiest rank's bytes per configuration, predicted and measured (MiB)."""
    head = (f"{'configuration':<28}| rank stage | params  grads  optim (MiB, pred = meas) |"
            f" act pred  act meas MiB")  # fmt: skip
    lines = [head, "-" * len(head)]
    for g in groups:
        r = max(g, key=lambda x: x["params_meas"] + x["grads_meas"] + x["optimizer_meas"]
                + x["activations_meas"])  # fmt: skip
        same = all(r[f"{k}_pred"] == r[f"{k}_meas"] for k in ("params", "grads", "optimizer"))
        lines.append(
            f"{r['label']:<28}| {r['rank']:>4} {r['stage']:>5} | {r['params_meas'] / MIB:>6.2f}"
            f" {r['grads_meas'] / MIB:>6.2f} {r['optimizer_meas'] / MIB:>6.2f}"
            f" {'(exact)' if same else '(DIFFERS)':>18} | {r['activations_pred'] / MIB:>8.2f}"
            f" {r['activations_meas'] / MIB:>9.2f}"
        )
    return "\n".join(lines)


def constants_table(stored: C.Cluster, cal: dict) -> str:
    """The stored laptop constants beside the ones calibrated in this run."""
    rows = [("stored laptop_cluster(4)", stored.peak_flops, stored.optimizer_s_per_param,
             stored.intra.alpha_s, stored.intra.beta)]  # fmt: skip
    for key, what in (("pairs", "pairs side by side"), ("world", "all 4 ranks")):
        fit = cal[key]
        rows.append((f"calibrated now, ring over {what}", cal["flop_s"],
                     cal["optimizer_s_per_param"], fit["alpha_s"], fit["beta"]))  # fmt: skip
    title = "constants, per rank at world 4"
    lines = [f"{title:<46}{'FLOP/s':>10}{'optim ns/param':>15}{'alpha us':>10}{'beta ns/B':>11}"]
    for name, flops, opt, alpha, beta in rows:
        lines.append(f"{name:<46}{flops:>10.3g}{opt * 1e9:>15.1f}{alpha * 1e6:>10.0f}"
                     f"{beta * 1e9:>11.3f}")  # fmt: skip
    lines.append(
        "FLOP/s: the GPT's forward + backward on 4 sequences (the tensor-parallel GPT's code "
        "at tp 1), all 4 ranks at once, one thread each;\n"
        "optim: gradient clipping + AdamW step, per parameter, likewise;\n"
        "ring: chapter 1's ring all-reduce of 4 KiB to 16 MiB, fitted (fit_alpha_beta); "
        "the planner below uses the pairs' fit"
    )
    return "\n".join(lines)


def published() -> str:
    head = (f"{'run':<32}{'theirs':<18}{'planner on theirs':<22}{'planner best':<42}"
            f"{'reported':<40}checked")  # fmt: skip
    lines = [head, "-" * len(head)]
    for run in C.PUBLISHED_RUNS:
        out = P.compare_published(run)
        th, ours = out["theirs_plan"], out["ours"]
        theirs = (f"{th.time['step']:.1f} s, MFU {th.mfu:.0%}" if th
                  else (out["theirs_reason"] or "")[:20])  # fmt: skip
        best = f"{ours.choice.label()} MFU {ours.mfu:.0%}"
        lines.append(f"{run.name:<32}{out['theirs']:<18}{theirs:<22}{best:<42}"
                     f"{run.reported[:38]:<40}{'yes' if run.checked else 'UNCHECKED'}")  # fmt: skip
    lines.append("planner: mixed precision (2 + 2 + 12 bytes), MFU 0.4 assumed for compute, "
                 "dp overlapped except the last bucket")  # fmt: skip
    lines.append("sources:")
    for run in C.PUBLISHED_RUNS:
        lines.append(f"  {run.name}: {run.source}. {run.note}")
    return "\n".join(lines)


def _timed_step(step) -> tuple[float, float]:
    """(seconds on the slowest rank, loss) of one step, every rank started after a barrier."""
    dist.barrier()
    start = time.perf_counter()
    loss = step()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item(), loss


def torch_vs_ours_worker(
    ctx: DistContext, config: GPTConfig, global_batch: int, seq_len: int, steps: int, warmup: int
) -> dict:
    """Each rank: ours (Topology(2, 1, 2)) and torch's (DTensor TP + FSDP2) at dp2 x tp2,
    with and without sequence parallelism, interleaved step by step on the same batches."""
    torch.set_num_threads(1)
    cfg, runs = TrainConfig(), {}
    for sp in (False, True):
        ours, topology = build_hybrid(config, Choice(2, 1, 2, 1, sequence_parallel=sp),
                                      global_batch, seq_len)  # fmt: skip
        torch.manual_seed(0)  # the weights build_hybrid's GPT starts from
        theirs = torch_parallelize(GPT(config), 2, 2, sequence_parallel=sp, seq_len=seq_len)
        theirs.build_optimizer(torch.optim.AdamW, optimizer_groups(list(theirs.parameters()), cfg),
                               lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))  # fmt: skip
        runs[f"ours{' sp' * sp}"], runs[f"torch{' sp' * sp}"] = ours, theirs
    rows = global_batch // 2
    mine = slice(topology.dp_rank * rows, (topology.dp_rank + 1) * rows)  # this replica's rows
    out = {name: {"times": [], "losses": []} for name in runs}
    for step in range(warmup + steps):
        gen = torch.Generator().manual_seed(1000 + step)
        tokens = torch.randint(0, config.vocab_size, (global_batch, seq_len + 1), generator=gen)
        x, y = tokens[mine, :-1], tokens[mine, 1:]  # (B / dp, T) each
        for name, run in runs.items():
            step_fn = functools.partial(run.step, x, y, lr=1e-3, grad_clip=1.0)
            seconds, loss = _timed_step(step_fn)
            out[name]["losses"].append(loss)
            if step >= warmup:
                out[name]["times"].append(seconds)
    return out


def torch_vs_ours(steps: int, warmup: int) -> str:
    """Ours against torch's own 2-D composition at dp2 x tp2 (RAW CPU model and batch)."""
    result = run_distributed(torch_vs_ours_worker, 4, MODEL, GLOBAL_BATCH, SEQ, steps, warmup,
                             timeout_s=900)[0]  # fmt: skip
    head = f"{'dp2 x tp2':<12}| median ms | ours / torch's | max |loss - torch's|"
    lines = ["OURS vs TORCH'S OWN 2-D (DTensor TP on mesh['tp'] + FSDP2 fully_shard on "
             "mesh['dp']), raw CPU, same model and batches", head, "-" * len(head)]  # fmt: skip
    for sp in ("", " sp"):
        ours, theirs = result[f"ours{sp}"], result[f"torch{sp}"]
        ms = {k: 1e3 * statistics.median(r["times"]) for k, r in (("o", ours), ("t", theirs))}
        diff = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=True))
        lines.append(f"{'ours' + sp:<12}| {ms['o']:>9.0f} | {ms['o'] / ms['t']:>14.2f} |"
                     f" {diff:.1e}")  # fmt: skip
        lines.append(f"{'torch' + sp:<12}| {ms['t']:>9.0f} |")
    lines.append("torch's dp axis is FSDP2 (ZeRO-3: parameters all-gathered per block, gradients "
                 "reduce-scattered); ours is a plain all-reduce (zero_stage=0)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="6 grids, 1 measured step")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per config")
    args = parser.parse_args(argv)
    steps, warmup = (1, 1) if args.smoke else (args.steps, 2)
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cal = MH.calibrate(MODEL, GLOBAL_BATCH // 4, SEQ, repeats=3 if args.smoke else 7)
    cs = choices(args.smoke)
    raw = MH.measure_configs(MODEL, cs, GLOBAL_BATCH, SEQ, steps, 900, warmup=warmup)
    sim = MH.measure_configs(TINY, cs, GLOBAL_BATCH, TINY.block_size, steps, 900,
                             warmup=warmup, sim_flop_s=SIM_FLOP_S)  # fmt: skip
    load1 = os.getloadavg()
    stored = C.laptop_cluster(4)
    cluster = MH.calibrated_cluster(cal, 4, "pairs")
    sim_cluster = dataclasses.replace(cluster, name="simulated", peak_flops=SIM_FLOP_S)
    text = "\n\n".join([
        f"{__doc__.splitlines()[0]}\n\nrun {started}; {os.cpu_count()} cores; load average "
        f"(1, 5, 15 min) {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} before, "
        f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} after; {steps} steps after "
        f"{warmup} warm-up; global batch {GLOBAL_BATCH}",
        constants_table(stored, cal),
        time_table(f"RAW CPU: {MODEL.n_layer} layers, d {MODEL.n_embd}, seq {SEQ} "
                   "(state, act: planner / measured per rank; * = differs between ranks)",
                   by_config(MH.compare(raw, cluster)),
                   by_config(MH.compare(raw, stored))),  # fmt: skip
        memory_detail(by_config(MH.compare(raw, cluster))),
        NOTES,
        torch_vs_ours(steps, warmup),
        time_table(f"SIMULATED compute ({SIM_FLOP_S:.0e} FLOP/s per rank, slept in each "
                   f"action) on a tiny model (d {TINY.n_embd}, seq {TINY.block_size})",
                   by_config(MH.compare(sim, sim_cluster)), None),  # fmt: skip
        "ON PAPER, AT SCALE: the planner's choice for published runs\n" + published(),
    ])  # fmt: skip
    print(text, flush=True)
    if not args.smoke:
        RESULTS.write_text(text + "\n")
        print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
