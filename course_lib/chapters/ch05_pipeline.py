"""Chapter 5's workers: a pipeline step measured on real ranks, ours beside torch's own.

Used by ``notebooks/05_pipeline_parallel.ipynb`` and ``benchmarks/pipeline.py``. Every
rank of one spawn runs a list of configurations (schedule, micro-batches, chunks) on the
same GPT and returns, per configuration: its actions' real start and end on a clock all
ranks share (``time.perf_counter`` is the system's monotonic clock), the median step
time, the bytes autograd saved at peak, and the same schedule under
``torch.distributed.pipelining`` where torch has it. Simulated compute (``compute_s``)
is added to every action, the same amount to ours and torch's, so that the bubble shows
on a laptop whose real compute is small and noisy.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from course_lib.launch import DistContext
from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel.pipeline import PipelineParallel, SavedBytes, Stage, split_blocks
from course_lib.parallel.pipeline_sim import peak_activations, simulate
from course_lib.parallel.pipeline_strategy import SCHEDULES
from course_lib.parallel.schedules import Schedule, messages, virtual_stage
from course_lib.topology import Topology

# torch.distributed.pipelining's schedule for each of ours (ZB-H1 has no CPU twin here).
TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
                   "interleaved": "ScheduleInterleaved1F1B"}  # fmt: skip


def _model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def batch(config: GPTConfig, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 5: a fixed random batch of token ids (size, T) and its targets."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (size, config.block_size + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _activation_bytes(pp: PipelineParallel, x: torch.Tensor) -> int:
    """Bytes autograd saves for ONE micro-batch through this rank's stages (their sum)."""
    counter, total = SavedBytes(), 0
    for stage in pp.stages:
        with counter.hooks():
            h = stage(x if stage.first else torch.randn(*x.shape, pp.width, requires_grad=True))
            del h
        total += counter.peak
        counter = SavedBytes()
    return total


def _ours(ctx, config, cfg: dict, x, y, compute_s, steps: int) -> dict[str, Any]:
    topology, schedule = Topology(pp=ctx.world_size), SCHEDULES[cfg["schedule"]]
    pp = PipelineParallel(_model(config), topology, schedule, cfg["microbatches"],
                          cfg.get("chunks", 1), compute_s=compute_s)  # fmt: skip
    times = []
    for _ in range(1 + steps):  # one untimed warm-up step: first calls, buffers, connections
        for p in pp.parameters():
            p.grad = None
        pp.saved.reset_peak()
        start = time.perf_counter()
        loss = pp.run(x, y)
        times.append(time.perf_counter() - start)
    records = [(str(r.action), pp.t0 + r.start, pp.t0 + r.end) for r in pp.records]
    per_mb = _activation_bytes(pp, x[: x.shape[0] // cfg["microbatches"]])
    return {"records": records, "step_s": statistics.median(times[1:]), "loss": loss,
            "peak_saved": pp.saved.peak, "per_microbatch_bytes": per_mb,
            "bytes_sent": pp.bytes_sent}  # fmt: skip


def _delay_hooks(module: torch.nn.Module, t_f: float, t_b: float) -> None:
    """Sleep ``t_f`` in every forward and ``t_b`` in every backward of ``module``."""

    def forward_hook(_module, _inputs, output):
        time.sleep(t_f)
        if output.requires_grad:
            output.register_hook(lambda grad: time.sleep(t_b))

    module.register_forward_hook(forward_hook)


def _theirs(ctx, config, cfg: dict, x, y, compute_s, steps: int) -> dict[str, Any] | None:
    """The same stages and schedule under torch.distributed.pipelining (None without one)."""
    from torch.distributed import pipelining

    name = TORCH_SCHEDULES.get(cfg["schedule"])
    if name is None:
        return None
    p, chunks, m = ctx.world_size, cfg.get("chunks", 1), cfg["microbatches"]
    full, last = _model(config), p * chunks - 1
    ranges = split_blocks(config.n_layer, p * chunks)
    mine = [virtual_stage(ctx.rank, c, p) for c in range(chunks)]
    modules = [Stage(full, ranges[v], v == 0, v == last) for v in mine]
    t_f, t_b, t_w = compute_s
    for module in modules:
        _delay_hooks(module, t_f / chunks, (t_b + t_w) / chunks)
    cpu = torch.device("cpu")
    stages = [pipelining.PipelineStage(s, v, p * chunks, cpu)
              for s, v in zip(modules, mine, strict=True)]  # fmt: skip
    kind = getattr(pipelining, name)
    schedule = kind(stages if chunks > 1 else stages[0], m, loss_fn=loss_fn)
    times = []
    for _ in range(1 + steps):  # the same untimed warm-up step as ours
        for module in modules:
            module.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        losses: list[torch.Tensor] = []
        args = (x,) if 0 in mine else ()
        kwargs = {"target": y, "losses": losses} if last in mine else {}
        schedule.step(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:])}


def measure_worker(
    ctx: DistContext,
    config: GPTConfig,
    configs: list[dict],
    batch_size: int,
    compute_s: tuple[float, float, float],
    steps: int = 3,
    with_torch: bool = True,
) -> list[dict[str, Any]]:
    """Chapter 5: each configuration's measurements on this rank (see the module doc)."""
    torch.set_num_threads(1)
    x, y = batch(config, batch_size)
    out = []
    for cfg in configs:
        row = {"ours": _ours(ctx, config, cfg, x, y, compute_s, steps)}
        row["torch"] = _theirs(ctx, config, cfg, x, y, compute_s, steps) if with_torch else None
        out.append(row)
    return out


def single_device_step(
    config: GPTConfig, batch_size: int, compute_s: tuple[float, float, float], stages: int,
    microbatches: int, steps: int = 3,
) -> float:  # fmt: skip
    """Chapter 5: one device's step time on the same batch, with all the simulated compute
    (every micro-batch through every stage's F, B and W, back to back)."""
    torch.set_num_threads(1)
    model, (x, y) = _model(config), batch(config, batch_size)
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_fn(model(x), y).backward()
        time.sleep(sum(compute_s) * stages * microbatches)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timeline(ranks: list[list[tuple[str, float, float]]]) -> list[list[tuple[str, float, float]]]:
    """Chapter 5: every rank's records on one clock that starts at 0 (the earliest start)."""
    t0 = min(start for records in ranks for _, start, _ in records)
    return [[(a, s - t0, e - t0) for a, s, e in records] for records in ranks]


def measured_bubble(ranks: list[list[tuple[str, float, float]]]) -> float:
    """Chapter 5: the idle share of rank-time, from the real start and end of every action."""
    lines = timeline(ranks)
    makespan = max(e for records in lines for _, _, e in records)
    busy = sum(e - s for records in lines for _, s, e in records)
    return 1.0 - busy / (len(lines) * makespan)


def mean_costs(ranks: list[list[tuple[str, float, float]]], chunks: int = 1) -> dict[str, list]:
    """Chapter 5: each rank's mean F, B and W time, per whole stage (chunk costs x chunks),
    to feed the simulator with what the run really took."""
    costs: dict[str, list[float]] = {"F": [], "B": [], "W": []}
    for records in ranks:
        for op in costs:
            spans = [e - s for a, s, e in records if a.startswith(op)]
            costs[op].append(statistics.mean(spans) * chunks if spans else 0.0)
    return costs


def gaps(
    ranks: list[list[tuple[str, float, float]]], schedule: Schedule, chunks: int = 1
) -> tuple[float, float]:
    """Chapter 5: ``(t_comm, overhead)`` of a real run, to feed the simulator.

    ``t_comm``: the mean delay from a sender's action end to the start of the receiver's
    action that sat waiting for it. ``overhead``: the mean gap between two actions of one
    rank when nothing was waited for (posting messages, recording, Python).
    """
    p = len(ranks)
    ends = {(r, a): e for r, records in enumerate(ranks) for a, _, e in records}
    latency, overhead = [], []
    for r, steps in enumerate(messages(schedule, chunks)):
        previous_end = None
        for step, (_, start, end) in zip(steps, ranks[r], strict=True):
            if previous_end is not None:
                sent = None
                if step.recv is not None:
                    msg = step.recv
                    op, chunk = ("F" if msg.what == "activation" else "B"), msg.stage // p
                    sent = ends[
                        (msg.peer, f"{op}{msg.microbatch}" + (f".{chunk}" if chunk else ""))
                    ]
                if sent is not None and sent > previous_end:  # idle, waiting for the message
                    latency.append(start - sent)
                else:
                    overhead.append(start - previous_end)
            previous_end = end
    mean = statistics.mean
    return (mean(latency) if latency else 0.0), (mean(overhead) if overhead else 0.0)


def gradients_worker(
    ctx: DistContext, config: GPTConfig, configs: list[dict], batch_size: int
) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """Chapter 5: one step of each configuration; the loss and this rank's gradients by name."""
    torch.set_num_threads(1)
    x, y = batch(config, batch_size)
    out = []
    for cfg in configs:
        pp = PipelineParallel(_model(config), Topology(pp=ctx.world_size),
                              SCHEDULES[cfg["schedule"]], cfg["microbatches"],
                              cfg.get("chunks", 1))  # fmt: skip
        loss = pp.run(x, y)
        out.append((loss, {n: p.grad.clone() for n, p in pp.named_parameters()}))
    return out


def max_gradient_error(
    ranks: list[tuple[float, dict[str, torch.Tensor]]], config: GPTConfig, batch_size: int
) -> tuple[float, float, int]:
    """Chapter 5: (loss error, largest gradient error, parameters compared) against one device
    on the same batch; every parameter must be held by some stage."""
    torch.set_num_threads(1)
    model, (x, y) = _model(config), batch(config, batch_size)
    loss = loss_fn(model(x), y)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    worst, seen = 0.0, set()
    for _, grads in ranks:
        for name, grad in grads.items():
            key = "wte.weight" if config.tie_weights and name == "lm_head.weight" else name
            worst = max(worst, float((grad - ref[key]).abs().max()))
            seen.add(key)
    if seen != set(ref):
        raise AssertionError(f"no stage holds {sorted(set(ref) - seen)}")
    return abs(ranks[-1][0] - float(loss.detach())), worst, len(seen)


def schedule_of(cfg: dict, p: int) -> Schedule:
    """Chapter 5: the schedule a configuration names, for p stages."""
    chunks = cfg.get("chunks", 1)
    fn = SCHEDULES[cfg["schedule"]]
    return fn(p, cfg["microbatches"], chunks) if chunks > 1 else fn(p, cfg["microbatches"])


def formula(cfg: dict, p: int, compute_s: tuple[float, float, float]) -> float:
    """Chapter 5: the bubble the paper's formula gives (ZB-H1: the simulator, nominal costs)."""
    m, v = cfg["microbatches"], cfg.get("chunks", 1)
    if cfg["schedule"] == "zb":  # the simulator with the nominal costs (B and W split)
        return simulate(schedule_of(cfg, p), *compute_s).bubble_fraction
    return (p - 1) / (v * m + p - 1)


def row(cfg: dict, p: int, ranks: list[dict], single_s: float, compute_s) -> dict:
    """Chapter 5: one configuration's measurements against the simulator and the formula."""
    ours = [r["ours"] for r in ranks]
    records = [o["records"] for o in ours]
    chunks = cfg.get("chunks", 1)
    schedule = schedule_of(cfg, p)
    costs = mean_costs(records, chunks)
    # The simulator, fed with what this run really took: each rank's mean action times plus
    # the per-action overhead, and the message latency; it predicts the makespan, and the
    # bubble follows from the measured busy time.
    t_comm, overhead = gaps(records, schedule, chunks)
    extra = overhead * chunks  # simulate() divides a stage's cost by the chunks
    cost = {op: [c + extra if c else 0.0 for c in costs[op]] for op in costs}
    predicted = simulate(schedule, cost["F"], cost["B"], cost["W"], t_comm, chunks=chunks)
    busy = sum(e - s for records_r in records for _, s, e in records_r)
    step = max(o["step_s"] for o in ours)
    theirs = ranks[0]["torch"]
    torch_step = max(r["torch"]["step_s"] for r in ranks) if theirs else None
    peaks = peak_activations(schedule)
    busiest = max(range(p), key=lambda r: ours[r]["peak_saved"])
    want = peaks[busiest] * ours[busiest]["per_microbatch_bytes"] / chunks  # per (mb, chunk)
    return {
        "schedule": cfg["schedule"] + (f" v={chunks}" if chunks > 1 else ""), "p": p,
        "m": cfg["microbatches"], "measured": measured_bubble(records),
        "simulated": 1 - busy / (p * predicted.makespan), "formula": formula(cfg, p, compute_s),
        "step": step, "torch": torch_step, "speedup": single_s / step,
        "peak_ratio": ours[busiest]["peak_saved"] / want,
    }  # fmt: skip


def format_table(rows: list[dict]) -> str:
    """Chapter 5: the rows of :func:`table` as text, one line per configuration."""
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


def table(
    configs: list[dict], ranks: list[list[dict]], p: int, config: GPTConfig, batch_size: int,
    compute_s: tuple[float, float, float],
) -> list[dict]:  # fmt: skip
    """Chapter 5: :func:`row` for every configuration :func:`measure_worker` ran on p ranks,
    with one device's step time on the same batch and compute (measured here)."""
    out = []
    for i, cfg in enumerate(configs):
        single = single_device_step(config, batch_size, compute_s, p, cfg["microbatches"])
        out.append(row(cfg, p, [r[i] for r in ranks], single, compute_s))
    return out
