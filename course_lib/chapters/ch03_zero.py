"""Chapter 3: worker functions and figures for the ZeRO notebook.

The notebook ``notebooks/03_zero.ipynb`` runs :func:`zero_worker` through
:func:`course_lib.launch.run_distributed` (spawned ranks need importable top-level
functions) and draws the figures below from what the workers return.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from course_lib import collectives as C
from course_lib.data import batch_for, get_batch, load_text, make_dataset
from course_lib.launch import DistContext
from course_lib.model import GPTConfig, loss_fn
from course_lib.parallel.data_parallel import DataParallel
from course_lib.parallel.fsdp import FullyShardedDataParallel, Timeline, decay_groups
from course_lib.parallel.zero import (
    ZeroRedundancyOptimizer,
    zero3_params_formula,
    zero_memory_formula,
)
from course_lib.topology import Topology
from course_lib.train import (
    TrainConfig,
    adamw_settings,
    build_model,
    optimizer_groups,
    train_step,
)
from course_lib.viz.palette import PALETTE  # plain strings: no matplotlib on the ranks

if TYPE_CHECKING:  # the spawned ranks never import matplotlib
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STAGES = ("dp", "zero1", "zero2", "zero3")  # plain data parallelism, then ZeRO stages 1-3
STAGE_NUMBER = {"dp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
KINDS = ("params", "grads", "optimizer")  # coloured by PALETTE[kind], as in every chapter
LR = 1e-4  # AdamW learning rate of the equivalence runs (constant: no warmup, no decay)


# ---------------------------------------------------------------------------------------
# One stage on one rank: train beside the single-device reference, measure, count bytes
# ---------------------------------------------------------------------------------------


def _wrap(stage: str, model: torch.nn.Module, cfg: TrainConfig, counter: C.CommCounter, group):
    """(module to call, optimizer, gradient sync) for ``stage``; AdamW everywhere.

    The only place the stages differ: from here on, every stage runs through the same
    GradientSync interface (``course_lib.train``).
    """
    adamw = adamw_settings(cfg)
    groups = optimizer_groups(list(model.parameters()), cfg)
    if stage == "dp":  # chapter 2's bucketed data parallelism on chapter 1's ring
        dp = DataParallel(model, mode="bucketed", group=group, ring=True, counter=counter)
        return dp, torch.optim.AdamW(groups, **adamw), dp
    if stage in ("zero1", "zero2"):
        zero = ZeroRedundancyOptimizer(groups, torch.optim.AdamW, group=group,
                                       stage=STAGE_NUMBER[stage], counter=counter,
                                       module=model, **adamw)  # fmt: skip
        return model, zero, zero
    fsdp = FullyShardedDataParallel(
        model, group=group, group_of=lambda p: int(p.dim() >= 2), counter=counter
    )
    return fsdp, torch.optim.AdamW(decay_groups(fsdp, cfg.weight_decay), **adamw), fsdp


def _same_on_every_rank(params: dict[str, torch.Tensor], group) -> bool:
    """True when every rank of ``group`` holds bitwise the same parameters."""
    flat = torch.cat([t.reshape(-1) for t in params.values()])  # (Psi,)
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(copies, flat, group=group)
    return all(torch.equal(c, copies[0]) for c in copies)


def _unit_sizes(stage: str, model: Any, opt: Any) -> list[tuple[str, int, int]]:
    """(kind, unit index, padded elements) of each flat buffer: what the collectives move."""
    if stage == "zero3":
        units = [("block", i, u) for i, u in enumerate(model.units)]
        units += [("root", len(units), model.root)] if model.root is not None else []
        return [(k, i, st.layout.padded) for k, i, u in units for st in u.sharded.values()]
    if stage in ("zero1", "zero2"):
        return [("flat", i, fg.layout.padded) for i, fg in enumerate(opt.flat_groups)]
    return [("bucket", i, sum(p.numel() for p in b.params)) for i, b in enumerate(model.buckets)]


def step_and_measure(
    wrapped: Any, opt: Any, sync: Any, x: torch.Tensor, y: torch.Tensor, memory: dict
) -> None:
    """Chapter 3: one training step of any stage, recording the bytes held after each move.

    The same four lines for every stage (``wrapped``, ``opt`` and ``sync`` come from
    ``_wrap``); ``memory[moment]`` is ``sync.memory_bytes(opt)`` at that moment.
    """
    loss_fn(wrapped(x), y).backward()  # ZeRO-3: gathers and frees each unit on the way
    memory["after backward"] = sync.memory_bytes(opt)
    sync.finish_gradient_synchronization()  # DP: all-reduce; ZeRO-1/2: reduce-scatter
    memory["after grad sync"] = sync.memory_bytes(opt)
    opt.step()  # ZeRO-1/2: step our piece, then all-gather the parameters
    memory["after step"] = sync.memory_bytes(opt)
    opt.zero_grad(set_to_none=True)


def run_stage(
    ctx: DistContext, stage: str, model_config: GPTConfig, cfg: TrainConfig, data: torch.Tensor
) -> dict[str, Any]:
    """Chapter 3: ``cfg.steps`` AdamW steps of ``stage`` beside the single-device reference.

    Returns the largest difference from the reference after each step (and whether it
    is within fp32 tolerance, ``rtol=1.3e-6, atol=1e-5``), whether all ranks
    hold identical parameters, this rank's memory at several moments of the last step,
    the bytes it sent in the last step, and the sizes of the flat buffers.
    """
    counter = C.CommCounter()
    topology = Topology(dp=ctx.world_size)
    model = build_model(model_config, cfg.seed, "cpu")
    ref = build_model(model_config, cfg.seed, "cpu")
    ref_opt = torch.optim.AdamW(
        optimizer_groups(list(ref.parameters()), cfg), **adamw_settings(cfg)
    )
    wrapped, opt, sync = _wrap(stage, model, cfg, counter, topology.dp_group)
    memory: dict[str, dict[str, int]] = {}
    if stage == "zero3":  # inside the last block's forward: its parameters are gathered

        def record(module: torch.nn.Module, args: Any) -> None:
            memory["in forward"] = sync.memory_bytes(opt)

        model.blocks[-1].register_forward_pre_hook(record)
    max_diff, close = [], []
    for step in range(cfg.steps):
        memory.clear()  # keep the last step's
        x, y = batch_for(data, cfg.batch_size, cfg.seq_len, cfg.seed, step, topology)  # (B/N, T)
        counter.reset()
        step_and_measure(wrapped, opt, sync, x, y, memory)
        sent = counter.bytes_sent
        xr, yr = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step)  # global batch
        ref_opt.zero_grad()
        loss_fn(ref(xr), yr).backward()
        ref_opt.step()
        ours = sync.full_state_dict()  # a collective for ZeRO-3
        pairs = [(ours[name], p.detach()) for name, p in ref.named_parameters()]
        max_diff.append(max((a - b).abs().max().item() for a, b in pairs))
        close.append(all(torch.allclose(a, b, rtol=1.3e-6, atol=1e-5) for a, b in pairs))
    return {
        "max_diff": max_diff,
        "within_tolerance": close,  # torch.allclose(rtol=1.3e-6, atol=1e-5) per step
        "identical_across_ranks": _same_on_every_rank(ours, topology.dp_group),
        "memory": memory,
        "bytes_sent": sent,
        "bytes_by_op": dict(counter.bytes_sent_by_op),
        "psi": sum(p.numel() for p in ref.parameters()),
        "units": _unit_sizes(stage, wrapped, opt),
    }


def zero_worker(
    ctx: DistContext, model_config: GPTConfig, steps: int, batch_size: int, seq_len: int
) -> dict[str, dict[str, Any]]:
    """Chapter 3: :func:`run_stage` for plain DP and ZeRO-1, 2, 3, one after the other."""
    torch.set_num_threads(1)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=LR,
        min_lr=LR,
        warmup_steps=0,
        grad_clip=0,
    )
    data = make_dataset(load_text()).train
    return {stage: run_stage(ctx, stage, model_config, cfg, data) for stage in STAGES}


# ---------------------------------------------------------------------------------------
# ZeRO-3 step by step: when is each unit gathered, freed, reduce-scattered?
# ---------------------------------------------------------------------------------------


def _gathered_bytes(fsdp: FullyShardedDataParallel) -> int:
    """Bytes of gathered (whole) parameters this rank holds now: 0 for a freed unit."""
    return sum(st.buffer.untyped_storage().nbytes() for u in fsdp.all_units()
               for st in u.sharded.values())  # fmt: skip


def _record_unit_events(fsdp, unit, name: str, events: list, phase: list, counter) -> None:
    """Wrap this unit's gather / free / reduce (on the instance only) to log what they do.

    A gather or free that changes nothing (already gathered, already freed) is not logged;
    a reduce-scatter is logged once, including the free it ends with.
    """
    in_reduce = [False]

    def logged(what: str, original):
        def run(*args: Any, **kwargs: Any) -> Any:
            before, sent = _gathered_bytes(fsdp), counter.bytes_sent
            in_reduce[0] = in_reduce[0] or what == "reduce-scatter"
            try:
                out = original(*args, **kwargs)
            finally:
                in_reduce[0] = in_reduce[0] and what != "reduce-scatter"
            after = _gathered_bytes(fsdp)
            if what == "reduce-scatter" or (after != before and not in_reduce[0]):
                sent = counter.bytes_sent - sent
                events.append({"phase": phase[0], "unit": name, "event": what,
                               "gathered_bytes": after, "bytes_sent": sent})  # fmt: skip
            return out

        return run

    unit.gather = logged("all-gather", unit.gather)
    unit.free = logged("free", unit.free)
    unit.reduce = logged("reduce-scatter", unit.reduce)


def zero3_events_worker(
    ctx: DistContext, model_config: GPTConfig, batch_size: int, seq_len: int
) -> dict[str, Any]:
    """Chapter 3: one ZeRO-3 forward and backward, logging every gather, free, reduce-scatter.

    Returns the events in order (phase, unit, event, gathered bytes after it, bytes it
    sent), this rank's pieces in bytes, and each unit's gathered size in bytes.
    """
    torch.set_num_threads(1)
    counter = C.CommCounter()
    model = build_model(model_config, 0, "cpu")
    fsdp = FullyShardedDataParallel(model, counter=counter)
    names = [f"block {i}" for i in range(len(fsdp.units))] + ["root"] * (fsdp.root is not None)
    events: list[dict[str, Any]] = []
    phase = ["forward"]
    for unit, name in zip(fsdp.all_units(), names, strict=True):
        _record_unit_events(fsdp, unit, name, events, phase, counter)
    x = torch.randint(0, model_config.vocab_size, (batch_size, seq_len))  # (B, T)
    loss = loss_fn(fsdp(x), x)
    phase[0] = "backward"
    loss.backward()
    phase[0] = "after backward"
    fsdp.finish_gradient_synchronization()
    sizes = {name: sum(st.nbytes for st in u.sharded.values())
             for u, name in zip(fsdp.all_units(), names, strict=True)}  # fmt: skip
    pieces = sum(s.numel() * s.element_size() for _, s in fsdp.shard_parameters())
    return {"events": events, "pieces_bytes": pieces, "unit_bytes": sizes}


def _prefetch_run(
    ctx: DistContext, model_config: GPTConfig, batch_size: int, seq_len: int, steps: int,
    prefetch: bool,
) -> dict[str, Any]:  # fmt: skip
    """One variant of :func:`prefetch_worker`: ``steps`` AdamW steps of ZeRO-3, timed."""
    counter, timeline = C.CommCounter(), Timeline()
    module = build_model(model_config, 0, "cpu")
    fsdp = FullyShardedDataParallel(module, counter=counter, prefetch=prefetch, timeline=timeline)
    opt = torch.optim.AdamW(fsdp.parameters(), lr=LR)
    numels = [sum(st.layout.padded for st in u.sharded.values()) for u in fsdp.units]
    root = sum(st.layout.padded for st in fsdp.root.sharded.values()) if fsdp.root else 0
    held: dict[str, Any] = {}

    def probe(module, args) -> None:  # registered after FSDP's hook: block 0 is gathered
        formula = zero3_params_formula(numels, ctx.world_size, 0, prefetch, root)
        held.update(measured=fsdp.memory_bytes(opt)["params"], formula=formula)

    module.blocks[0].register_forward_pre_hook(probe)
    seconds, sent, losses = [], [], []
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 * step + ctx.rank)  # each rank its own batch
        data = torch.randint(0, model_config.vocab_size, (batch_size, seq_len + 1), generator=gen)
        counter.reset()
        timeline.reset()
        dist.barrier(group=fsdp.group)  # start the clock together
        start = time.perf_counter()
        loss = train_step(fsdp, opt, fsdp, data[:, :-1], data[:, 1:], lr=LR, grad_clip=0.0)
        seconds.append(time.perf_counter() - start)
        sent.append(counter.bytes_sent)
        losses.append(loss.item())
    return {
        "step_s": float(np.median(seconds[1:] or seconds)),  # step 0 also records the order
        "events": [(e.unit, e.kind, e.start, e.end) for e in timeline.events],
        "bytes_sent": sent[-1],
        "held_in_first_block": held,
        "losses": losses,
        "pieces": torch.cat([p.detach().flatten() for _, p in fsdp.shard_parameters()]),
    }


def prefetch_worker(
    ctx: DistContext, model_config: GPTConfig, batch_size: int, seq_len: int, steps: int
) -> dict[str, Any]:
    """Chapter 3: ZeRO-3 without and with prefetch, same model, same batches, same steps.

    For each variant ("no prefetch", "prefetch"): the median step time (forward, backward,
    gradient sync, AdamW), the last step's timeline (events as plain tuples), the bytes
    sent per step, the parameter bytes held inside the first block's forward (measured, and
    ``zero3_params_formula``'s terms: with prefetch, block 1 is already arriving), the
    losses, and the final pieces (to compare the variants).
    """
    torch.set_num_threads(1)
    return {
        name: _prefetch_run(ctx, model_config, batch_size, seq_len, steps, prefetch)
        for name, prefetch in (("no prefetch", False), ("prefetch", True))
    }


# ---------------------------------------------------------------------------------------
# Predictions: bytes held and bytes sent per rank
# ---------------------------------------------------------------------------------------


def predicted_memory(psi: int, world_size: int, stage: str) -> dict[str, float]:
    """Chapter 3: the fp32 + AdamW formula (4 + 4 + 8 bytes per parameter, cut by N)."""
    return zero_memory_formula(psi, world_size, STAGE_NUMBER[stage])


def predicted_bytes_sent(units: list[tuple[str, int, int]], world_size: int, stage: str) -> float:
    """Chapter 3: bytes one rank sends per step, from the flat buffers' padded sizes (fp32).

    DP all-reduces (2 (N-1)/N), ZeRO-1/2 reduce-scatter + all-gather (2 (N-1)/N); ZeRO-3
    all-gathers every block in forward AND backward and reduce-scatters it (3 (N-1)/N),
    but its root (embeddings, final LayerNorm) stays gathered from forward to the end of
    backward: gathered once, so 2 (N-1)/N for the root.
    """
    n = world_size
    passes = {"bucket": 2, "flat": 2, "block": 3, "root": 2}
    return sum(passes[kind] * (n - 1) / n * 4 * numel for kind, _, numel in units)


def predicted_in_forward(units: list[tuple[str, int, int]], world_size: int) -> float:
    """Chapter 3: ZeRO-3 parameter bytes inside the last block's forward (fp32).

    This rank's pieces of everything (4 Psi / N, padded) plus two gathered units: the
    root, gathered for the whole step, and the block that is running.
    """
    pieces = sum(4 * numel / world_size for _, _, numel in units)
    last_block = max(i for kind, i, _ in units if kind == "block")
    gathered = [numel for kind, i, numel in units if kind == "root" or i == last_block]
    return pieces + 4 * sum(gathered)


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def plot_who_holds_what(world_size: int = 4) -> Figure:
    """Chapter 3: the ZeRO paper's picture: per rank, which parts of each state it keeps.

    Each row is a rank; the three bands are parameters (4 bytes/param), gradients (4) and
    Adam's m and v (8), each cut into N pieces. Coloured: held by that rank; grey: not.
    """
    import matplotlib.pyplot as plt

    n = world_size
    widths = {"params": 4, "grads": 4, "optimizer": 8}
    fig, axes = plt.subplots(1, len(STAGES), figsize=(3.2 * len(STAGES), 0.55 * n + 1.2))
    for ax, stage in zip(axes, STAGES, strict=True):
        s = STAGE_NUMBER[stage]
        sharded = {"params": s >= 3, "grads": s >= 2, "optimizer": s >= 1}
        for r in range(n):
            x0 = 0.0
            for kind in KINDS:
                w = widths[kind] / n
                for piece in range(n):
                    held = not sharded[kind] or piece == r
                    color = PALETTE[kind] if held else PALETTE["absent"]
                    ax.add_patch(plt.Rectangle((x0 + piece * w, r), w, 0.8, color=color, ec="w"))
                x0 += widths[kind] + 0.4
        held = sum(widths[k] / (n if sharded[k] else 1) for k in KINDS)
        ax.set_title(f"{stage}: {held:g} bytes/param per rank", fontsize=9)
        ax.set_xlim(0, x0)
        ax.set_ylim(n, -0.2)
        ax.set_yticks(np.arange(n) + 0.4, [f"rank {r}" for r in range(n)], fontsize=8)
        ax.set_xticks([2, 6.4, 12.8], ["params", "grads", "Adam m, v"], fontsize=8)
    fig.suptitle(f"Who holds what, N = {n} (fp32 + AdamW: 4 + 4 + 8 bytes per parameter)")
    fig.tight_layout()
    return fig


def plot_measured_memory(results: dict[int, list[dict]], moment: str = "after step") -> Figure:
    """Chapter 3: rank 0's measured bytes (stacked bars) and the formula (black frames).

    ``results`` maps world size to :func:`zero_worker`'s per-rank results.
    """
    import matplotlib.pyplot as plt

    worlds = sorted(results)
    fig, axes = plt.subplots(1, len(STAGES), figsize=(3.2 * len(STAGES), 3.6), sharey=True)
    for ax, stage in zip(axes, STAGES, strict=True):
        for i, n in enumerate(worlds):
            r0 = results[n][0][stage]
            bottom, total = 0.0, 0.0
            for kind in KINDS:
                mib = r0["memory"][moment][kind] / 2**20
                label = kind if i == 0 else None
                ax.bar(i, mib, bottom=bottom, color=PALETTE[kind], label=label)
                bottom += mib
            total = sum(predicted_memory(r0["psi"], n, stage).values()) / 2**20
            formula = "formula" if i == 0 else None
            ax.bar(i, total, fill=False, ec=PALETTE["predicted"], lw=1.5, label=formula)
        ax.set_xticks(range(len(worlds)), [f"N={n}" for n in worlds])
        ax.set_title(stage)
    axes[0].set_ylabel(f"MiB held by rank 0 ({moment})")
    axes[-1].legend(fontsize=8)
    fig.suptitle("Measured bytes per rank (bars) vs the formula (frames), tiny GPT, fp32 AdamW")
    fig.tight_layout()
    return fig


def plot_bytes_sent(results: dict[int, list[dict]], ax: Axes | None = None) -> Figure:
    """Chapter 3: bytes sent per rank per step / 4 Psi, measured (markers) vs formula (lines).

    DP, ZeRO-1 and ZeRO-2 send exactly the same bytes, so their markers are drawn side by
    side (a small horizontal offset, one shape each) and a note says that they coincide.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4))
    worlds = sorted(results)
    shapes = {"dp": "o", "zero1": "s", "zero2": "^", "zero3": "D"}
    for i, stage in enumerate(STAGES):
        psi = results[worlds[0]][0][stage]["psi"]
        sent = [max(r[stage]["bytes_sent"] for r in results[n]) / (4 * psi) for n in worlds]
        x = [n + 0.09 * (i - 1.5) for n in worlds]  # side by side, not on top of each other
        filled = PALETTE[stage] if stage == "zero3" else "none"
        ax.plot(x, sent, shapes[stage], color=PALETTE[stage], mfc=filled, mew=1.6, ms=8,
                label=f"{stage} (measured)")  # fmt: skip
    nn = np.linspace(1, max(worlds), 50)
    formula = dict(color=PALETTE["predicted"], lw=1)
    ax.plot(nn, 2 * (nn - 1) / nn, "--", label="2(N-1)/N", **formula)
    ax.plot(nn, 3 * (nn - 1) / nn, ":", label="3(N-1)/N", **formula)
    top = max(worlds)
    arrow = dict(arrowstyle="->", lw=0.8)
    ax.annotate("dp, zero1, zero2: the same bytes\n(drawn side by side)",
                (top - 0.1, 2 * (top - 1) / top), xytext=(0.52, 0.22),
                textcoords="axes fraction", fontsize=9, arrowprops=arrow)  # fmt: skip
    ax.set_xticks(worlds)
    ax.set_xlabel("ranks N")
    ax.set_ylabel("bytes sent per rank per step / (4 Psi)")
    ax.set_title("The communication price of each stage")
    ax.legend(fontsize=8, loc="upper left")
    return ax.figure


def plot_zero3_timeline(record: dict[str, Any], ax: Axes | None = None) -> Figure:
    """Chapter 3: ZeRO-3 parameter bytes held by one rank, event by event, in one step.

    ``record`` is :func:`zero3_events_worker`'s result for that rank: its own pieces stay
    the whole step; each all-gather adds a unit's whole parameters, each free or
    reduce-scatter removes them. Forward is shaded apart from backward.
    """
    import matplotlib.pyplot as plt

    events, mib = record["events"], 2**20
    if ax is None:  # wide enough that the two-line labels of neighbouring events never touch
        _, ax = plt.subplots(figsize=(max(8.0, 0.8 * len(events)), 4))
    held = [record["pieces_bytes"] / mib]  # before the forward: our pieces only
    held += [(record["pieces_bytes"] + e["gathered_bytes"]) / mib for e in events]
    ax.step(range(len(held)), held, where="post", color=PALETTE["params"], lw=2)
    ax.axhline(record["pieces_bytes"] / mib, color=PALETTE["predicted"], ls="--", lw=1)
    short = {"all-gather": "gather", "free": "free", "reduce-scatter": "reduce-\nscatter"}
    for i, e in enumerate(events, start=1):
        again = e["phase"] == "backward" and e["event"] == "all-gather"
        label = f"{'re-gather' if again else short[e['event']]}\n{e['unit']}"
        ax.text(i + 0.5, held[i], label, ha="center", va="bottom", fontsize=8)
    n_fwd = sum(e["phase"] == "forward" for e in events)
    ax.axvspan(0, n_fwd + 1, color=PALETTE["absent"], lw=0, zorder=0)
    ax.text(0.2, 0.97, "forward", transform=ax.get_xaxis_transform(), va="top")
    ax.text(n_fwd + 1.2, 0.97, "backward", transform=ax.get_xaxis_transform(), va="top")
    ax.set_xlim(0, len(held))
    ax.set_ylim(0, max(held) * 1.35)
    ax.set_xticks(range(len(held)))
    ax.set_xlabel("event (in the order they happened)")
    ax.set_ylabel("parameter MiB held by this rank")
    ax.set_title("ZeRO-3 in one step: own pieces (dashed) + gathered units")
    return ax.figure
