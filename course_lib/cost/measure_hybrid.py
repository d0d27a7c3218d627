"""Chapter 7: a DP x PP x TP run measured per rank, and the planner's prediction beside it.

What is measured, on every rank of one :class:`~course_lib.parallel.compose.Hybrid` run:

- ``params``, ``grads``, ``optimizer``: :meth:`Hybrid.memory_bytes` after the last step
  (fp32 AdamW with :func:`~course_lib.train.optimizer_groups`' two groups; the 0-d
  ``step`` counters are left out, as :func:`~course_lib.memory.state_bytes` does);
- ``activations``: the PEAK, over one step of the schedule on this rank, of the bytes of
  the distinct storages autograd holds for backward. Every saved tensor passes through a
  ``torch.autograd.graph.saved_tensors_hooks`` pack hook (:class:`SavedStorages`, put in
  place of chapter 5's per-save counter :class:`~course_lib.parallel.pipeline.SavedBytes`);
  a storage counts once, at its full size, from its first save until the last saved
  tensor that uses it is freed by the backward. Parameter storages (the flat ZeRO
  buffers included) are model state, not activations, and are left out. This is what the
  planner's activation term predicts: one micro-batch's saved bytes on the stage
  (chapter 6's :func:`~course_lib.cost.tensor_model.tp_activation_terms`) times the
  micro-batches the schedule keeps alive (chapter 5's simulator);
- ``step_s``: the median, over the measured steps, of the slowest rank's wall-clock step
  (every step starts after a barrier), after ``warmup`` steps; one torch thread per rank.

:func:`measure_configs` runs every configuration in one spawn; :func:`compare` puts the
planner's numbers (:func:`~course_lib.cost.planner_model.memory_per_stage` for each
rank's OWN stage, :func:`~course_lib.cost.planner_model.step_time`) beside them;
:func:`calibrate` measures the constants the laptop cluster needs (FLOP/s per rank and
the ring's alpha and beta, under the same oversubscription as the runs); :func:`spearman`
compares the two rankings. The workers are module-level functions: spawned ranks
import them by name (a notebook's own functions cannot be spawned).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from course_lib import collectives as C
from course_lib.cost.clusters import Cluster, laptop_cluster
from course_lib.cost.comm_model import alpha_beta_terms, fit_alpha_beta
from course_lib.cost.planner_model import Choice, memory_per_stage, step_time
from course_lib.cost.tensor_model import Link
from course_lib.launch import run_distributed
from course_lib.model import GPT, GPTConfig, flops_per_token
from course_lib.parallel.compose import Hybrid, parallelize
from course_lib.parallel.pipeline import split_blocks
from course_lib.parallel.tensor_gpt import tensor_parallelize
from course_lib.topology import Topology
from course_lib.train import TrainConfig, optimizer_groups

TERMS = ("params", "grads", "optimizer", "activations")

# ---------------------------------------------------------------------------------------
# Activation bytes: distinct storages saved for backward, now and at peak
# ---------------------------------------------------------------------------------------


class SavedStorages:
    """Chapter 7: bytes of the distinct storages autograd holds for backward: now and peak.

    A drop-in for chapter 5's :class:`~course_lib.parallel.pipeline.SavedBytes` (same
    ``hooks()``, ``reset_peak()``, ``now``, ``peak``) that counts each storage once, at
    its full size, however many saved tensors view it (q, k and v of one qkv tensor; an
    output saved by two ops). Storages in ``exclude`` (the parameters) are not counted.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.users: dict[int, int] = {}  # storage address -> saved tensors alive on it
        self.now = self.peak = 0

    def reset_peak(self) -> None:
        """Start a new measurement: the peak from the bytes held now."""
        self.peak = self.now

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context manager that routes every saved tensor through this counter."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() in self.exclude:
            return t
        return _Use(t, storage.data_ptr(), storage.nbytes(), self)


class _Use:
    """One saved tensor on a counted storage; the storage is released with its last user."""

    def __init__(self, tensor: torch.Tensor, ptr: int, nbytes: int, owner: SavedStorages) -> None:
        self.tensor, self.ptr, self.nbytes, self.owner = tensor, ptr, nbytes, owner
        users = owner.users.get(ptr, 0)
        if users == 0:
            owner.now += nbytes
            owner.peak = max(owner.peak, owner.now)
        owner.users[ptr] = users + 1

    def __del__(self) -> None:
        users = self.owner.users[self.ptr] - 1
        if users == 0:
            del self.owner.users[self.ptr]
            self.owner.now -= self.nbytes
        else:
            self.owner.users[self.ptr] = users


def _unpack(held: Any) -> torch.Tensor:
    return held.tensor if isinstance(held, _Use) else held


# ---------------------------------------------------------------------------------------
# The workers (spawned ranks import them by name)
# ---------------------------------------------------------------------------------------


def _batch(config: GPTConfig, rows: int, seq_len: int, step: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, config.vocab_size, (rows, seq_len + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]  # (B, T) each


def build_hybrid(
    config: GPTConfig, c: Choice, global_batch: int, seq_len: int, seed: int = 0
) -> tuple[Hybrid, Topology]:
    """Chapter 7: the Hybrid of ``c`` with fp32 AdamW over training's two groups."""
    if c.zero and c.dp == 1:
        raise ValueError(f"{c.label()}: ZeRO shards over dp; with dp=1 use zero=0")
    if c.recompute:
        raise ValueError(f"{c.label()}: the Hybrid has no activation recomputation")
    topology = Topology(c.dp, c.pp, c.tp)
    torch.manual_seed(seed)
    hybrid = parallelize(GPT(config), topology, schedule=c.schedule,
                         microbatches=c.microbatches, sequence_parallel=c.sequence_parallel,
                         zero_stage=c.zero, global_batch=global_batch,
                         seq_len=seq_len)  # fmt: skip
    cfg = TrainConfig()
    groups = optimizer_groups(list(hybrid.parameters()), cfg)
    hybrid.build_optimizer(torch.optim.AdamW, groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return hybrid, topology


def simulated_compute_s(
    config: GPTConfig, c: Choice, stage: int, micro_batch: int, seq_len: int, flop_s: float
) -> tuple[float, float, float]:
    """Chapter 7: (F, B, W) seconds of simulated compute per micro-batch on ``stage``.

    The planner's FLOPs of the stage (its blocks, + the head on the last stage; 6N + 12LdT
    per token, / tp) at ``flop_s`` FLOP/s per rank: one third forward, two thirds backward
    (W is inside B). Chapter 5's pipeline sleeps that long in each action, so the
    measured step is this known compute plus the real (small) one, the messages and the
    bubble.
    """
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    layer = (flops_per_token(config, seq_len) - 6 * V * d) / L  # 72 d^2 + 12 d T per token
    blocks = split_blocks(L, c.pp)[stage]
    flops = (len(blocks) * layer + 6 * V * d * (stage == c.pp - 1)) * micro_batch * seq_len
    seconds = flops / c.tp / flop_s
    return seconds / 3, 2 * seconds / 3, 0.0


def measure_one(
    config: GPTConfig, c: Choice, global_batch: int, seq_len: int, steps: int, warmup: int,
    sim_flop_s: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Chapter 7: this rank's bytes and step times for configuration ``c`` (in a spawned rank).

    ``sim_flop_s``: add :func:`simulated_compute_s` at that rate to every action.
    """
    hybrid, topology = build_hybrid(config, c, global_batch, seq_len)
    if sim_flop_s:
        b = global_batch // (c.dp * c.microbatches)
        hybrid.pipeline.compute_s = simulated_compute_s(
            config, c, topology.pp_rank, b, seq_len, sim_flop_s
        )
    params = {p.untyped_storage().data_ptr() for p in hybrid.parameters()}
    counter = SavedStorages(params)
    hybrid.pipeline.saved = counter  # the pipeline wraps every forward in counter.hooks()
    rows = global_batch // c.dp  # this replica's rows
    mine = slice(topology.dp_rank * rows, (topology.dp_rank + 1) * rows)
    times, peaks = [], []
    for step in range(warmup + steps):
        x, y = _batch(config, global_batch, seq_len, step)
        dist.barrier()
        counter.reset_peak()
        start = time.perf_counter()
        hybrid.step(x[mine], y[mine], lr=1e-3, grad_clip=1.0)
        times.append(time.perf_counter() - start)
        peaks.append(counter.peak)
    return {
        "coords": (topology.dp_rank, topology.pp_rank, topology.tp_rank),
        **hybrid.memory_bytes(),
        "activations": max(peaks),
        "times": times[warmup:],
    }


def measure_worker(
    ctx: Any, jobs: list[tuple[GPTConfig, Choice]], global_batch: int, seq_len: int,
    steps: int, warmup: int, sim_flop_s: float | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Chapter 7 (spawned): every (config, choice) of ``jobs`` in turn; one result each."""
    torch.set_num_threads(1)
    out = [measure_one(cfg, c, global_batch, seq_len, steps, warmup, sim_flop_s)
           for cfg, c in jobs]  # fmt: skip
    dist.barrier()
    return out


def measure_jobs(
    jobs: list[tuple[GPTConfig, Choice]],
    global_batch: int,
    seq_len: int,
    *,
    steps: int = 3,
    warmup: int = 1,
    timeout_s: float = 300.0,
    sim_flop_s: float | None = None,
) -> list[dict[str, Any]]:
    """Chapter 7: :func:`measure_configs` for jobs that may differ in model config.

    ``sim_flop_s`` adds simulated compute (:func:`simulated_compute_s`) to every action.
    """
    worlds = {c.dp * c.pp * c.tp for _, c in jobs}
    if len(worlds) != 1:
        raise ValueError(f"every choice must use the same number of ranks, got {sorted(worlds)}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    world = worlds.pop()
    ranks = run_distributed(measure_worker, world, jobs, global_batch, seq_len, steps, warmup,
                            sim_flop_s, backend="gloo", timeout_s=timeout_s,
                            threads_per_rank=1)  # fmt: skip
    rows = []
    for j, (cfg, c) in enumerate(jobs):
        per_rank = [ranks[r][j] for r in range(world)]
        slowest = [max(t) for t in zip(*(r["times"] for r in per_rank), strict=True)]
        for rank, r in enumerate(per_rank):
            rows.append({
                "config": cfg, "choice": c, "label": c.label(), "rank": rank,
                "coords": r["coords"], "stage": r["coords"][1],
                "global_batch": global_batch, "seq_len": seq_len,
                **{k: r[k] for k in TERMS},
                "step_s": statistics.median(slowest), "step_times": slowest,
            })  # fmt: skip
    return rows


def measure_configs(
    config: GPTConfig,
    choices: list[Choice],
    global_batch: int,
    seq_len: int,
    steps: int = 3,
    timeout_s: float = 300.0,
    *,
    warmup: int = 1,
    sim_flop_s: float | None = None,
) -> list[dict[str, Any]]:
    """Chapter 7: measure every choice (same world size) of ``config`` in ONE spawn.

    Returns one row per (choice, rank): ``config, choice, label, rank, coords`` (dp, pp,
    tp rank), ``stage``, ``global_batch, seq_len``, the measured bytes ``params, grads,
    optimizer, activations`` (see the module docstring) and ``step_s`` (the median of the
    slowest rank's steps after ``warmup``; the same on every rank of a choice) with
    ``step_times``. ``timeout_s`` is the whole spawn's deadline. ``sim_flop_s`` adds
    simulated compute at that many FLOP/s per rank (:func:`simulated_compute_s`).
    """
    return measure_jobs([(config, c) for c in choices], global_batch, seq_len, steps=steps,
                        warmup=warmup, timeout_s=timeout_s, sim_flop_s=sim_flop_s)  # fmt: skip


# ---------------------------------------------------------------------------------------
# Predicted beside measured
# ---------------------------------------------------------------------------------------


def _ratio(pred: float, meas: float) -> float:
    return pred / meas if meas else (1.0 if pred == meas else float("inf"))


def compare(
    rows: list[dict[str, Any]], cluster: Cluster, *, dp_overlap: str = "none"
) -> list[dict[str, Any]]:
    """Chapter 7: the planner's fp32 prediction beside each measured row of :func:`measure_configs`.

    Memory: :func:`~course_lib.cost.planner_model.memory_per_stage` of the rank's own
    stage. Time: :func:`~course_lib.cost.planner_model.step_time` on ``cluster`` at MFU 1
    (a measured cluster's FLOP/s are already achieved ones) with ``dp_overlap="none"``:
    the Hybrid all-reduces the gradients after the whole backward, so nothing overlaps.
    Each output row: ``label, rank, stage``, for each of ``params, grads, optimizer,
    activations, step``: ``<term>_pred``, ``<term>_meas`` and ``<term>_ratio``
    (predicted / measured), and ``time`` (the predicted breakdown).
    """
    out = []
    for r in rows:
        cfg, c = r["config"], r["choice"]
        b = r["global_batch"] // (c.dp * c.microbatches)  # sequences per micro-batch
        stage = memory_per_stage(cfg, c, b, r["seq_len"], precision="fp32")[r["stage"]]
        t = step_time(cfg, cluster, c, b, r["seq_len"], mfu=1.0, precision="fp32",
                      dp_overlap=dp_overlap)  # fmt: skip
        row: dict[str, Any] = {"label": r["label"], "rank": r["rank"], "stage": r["stage"],
                               "time": t}  # fmt: skip
        pairs = {k: (stage[k], r[k]) for k in TERMS} | {"step": (t["step"], r["step_s"])}
        for k, (pred, meas) in pairs.items():
            row |= {f"{k}_pred": pred, f"{k}_meas": meas, f"{k}_ratio": _ratio(pred, meas)}
        out.append(row)
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Chapter 7: Spearman's rank correlation of two equally long lists (ties: mean rank).

    The Pearson correlation of the ranks: 1 when both order the items the same way, -1
    when one reverses the other.
    """
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need two lists of the same length >= 2, got {len(xs)} and {len(ys)}")

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2  # ties share their mean rank
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


# ---------------------------------------------------------------------------------------
# The laptop's constants, measured the way the runs are timed
# ---------------------------------------------------------------------------------------


def _median_seconds(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate_worker(
    ctx: Any, config: GPTConfig, rows: int, seq_len: int, sizes: list[int], repeats: int
) -> dict[str, Any]:
    """Chapter 7 (spawned): FLOP/s of one rank while every rank computes, and ring times.

    Every rank trains the GPT on (``rows``, ``seq_len``) at once (forward, backward, no
    optimizer) with one thread, through the code the runs use (chapter 6's
    tensor-parallel GPT and its loss, on a group of one): ``flops_per_token x tokens /
    median seconds``; then
    clips the gradients and steps AdamW (training's two groups): seconds per parameter. Then
    chapter 1's ring all-reduce of each of ``sizes`` bytes (fp32) over all ranks, and over
    pairs (ranks 2i, 2i + 1) running side by side: the median seconds of each.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tensor_parallelize(GPT(config), Topology.single())  # the runs' code, at tp = 1
    x = torch.randint(0, config.vocab_size, (rows, seq_len))

    def train() -> None:
        model.zero_grad(set_to_none=True)
        model.loss(model(x), x).backward()

    train()  # warm-up
    seconds = _median_seconds(train, repeats)
    flops = flops_per_token(config, seq_len) * rows * seq_len
    params = list(model.parameters())
    cfg = TrainConfig()
    adamw = torch.optim.AdamW(optimizer_groups(params, cfg), lr=cfg.lr)

    def update() -> None:  # what a step does after the gradients: clip, then AdamW
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        adamw.step()

    update()  # warm-up (creates AdamW's state)
    update_s = _median_seconds(update, repeats)
    pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(ctx.world_size // 2)]
    pair = pairs[ctx.rank // 2] if ctx.rank < 2 * len(pairs) else None
    ring: dict[str, list[float]] = {"world": [], "pairs": []}
    for n_bytes in sizes:
        buf = torch.ones(n_bytes // 4)
        for key, group in (("world", None), ("pairs", pair)):
            if key == "pairs" and pair is None:
                continue
            C.ring_all_reduce(buf, group)  # warm-up
            run = functools.partial(C.ring_all_reduce, buf, group)
            ring[key].append(_median_seconds(run, repeats))
    dist.barrier()
    n_params = sum(p.numel() for p in params)
    return {"flop_s": flops / seconds, "train_s": seconds, "ring": ring,
            "optimizer_s_per_param": update_s / n_params}  # fmt: skip


def calibrate(
    config: GPTConfig,
    rows: int,
    seq_len: int,
    world_size: int = 4,
    *,
    sizes: tuple[int, ...] = (4096, 65536, 1 << 20, 4 << 20, 16 << 20),
    repeats: int = 5,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Chapter 7: this machine's constants as the runs see them (one spawn of ``world_size``).

    Returns ``flop_s`` (per rank: the slowest rank's :func:`calibrate_worker` rate, while
    all ranks compute; world 4 shares 2 cores, and a step waits for its slowest rank),
    ``optimizer_s_per_param`` (gradient clipping + AdamW's step, seconds per parameter,
    the slowest rank's), and the ring
    all-reduce's
    ``alpha_s`` and ``beta`` fitted (chapter 1's :func:`~course_lib.cost.comm_model.
    fit_alpha_beta`) over all ranks (``world``) and over side-by-side pairs (``pairs``),
    with the raw ``sizes`` and ``seconds``.
    """
    ranks = run_distributed(calibrate_worker, world_size, config, rows, seq_len, list(sizes),
                            repeats, backend="gloo", timeout_s=timeout_s,
                            threads_per_rank=1)  # fmt: skip
    out: dict[str, Any] = {
        "flop_s": min(r["flop_s"] for r in ranks),  # the slowest rank sets the step
        "optimizer_s_per_param": max(r["optimizer_s_per_param"] for r in ranks),
        "sizes": list(sizes),
    }
    for key, n in (("world", world_size), ("pairs", 2)):
        seconds = [max(r["ring"][key][i] for r in ranks if r["ring"][key])
                   for i in range(len(sizes))]  # fmt: skip
        messages, factor = alpha_beta_terms("ring_all_reduce", n)
        alpha, beta = fit_alpha_beta(list(sizes), seconds, messages, factor)
        out[key] = {"alpha_s": alpha, "beta": beta, "seconds": seconds}
    return out


def calibrated_cluster(
    constants: dict[str, Any], world_size: int = 4, fit: str = "pairs"
) -> Cluster:
    """Chapter 7: this machine as the planner sees it, from :func:`calibrate`'s constants.

    FLOP/s per rank, the optimizer's seconds per parameter and the ring's alpha and beta
    replace :func:`~course_lib.cost.clusters.laptop_cluster`'s stored ones. ``fit`` picks
    the ring fit: ``"pairs"`` (groups of two side by side, as most world-4 configurations'
    groups run) or ``"world"`` (one ring over all ranks). A fit whose beta is not
    positive (too few or too noisy sizes) keeps the stored beta and says so in the link's
    name.
    """
    if fit not in ("pairs", "world"):
        raise ValueError(f"fit must be 'pairs' or 'world', got {fit!r}")
    ring = constants[fit]
    stored = laptop_cluster(world_size)
    beta, name = ring["beta"], f"gloo ring on this machine ({fit} fit)"
    if beta <= 0:  # too few or too noisy sizes to resolve a bandwidth term (smoke runs)
        beta = 1 / stored.intra.bandwidth_bytes_per_s
        name += f": beta unresolved ({ring['beta']:.1e} s/B), the stored beta used"
    link = Link(name, alpha_s=max(ring["alpha_s"], 0.0), bandwidth_bytes_per_s=1 / beta,
                source="measured by measure_hybrid.calibrate in this run")  # fmt: skip
    return dataclasses.replace(
        stored,
        peak_flops=constants["flop_s"],
        optimizer_s_per_param=constants.get(
            "optimizer_s_per_param", stored.optimizer_s_per_param
        ),  # fmt: skip
        intra=link,
        inter=link,
        name=f"this machine ({world_size} ranks, calibrated)",
        source="measured by measure_hybrid.calibrate in this run",
    )
