"""Chapter 6's workers and tables: tensor parallelism measured, ours beside torch's DTensor.

Used by ``notebooks/06_tensor_parallel.ipynb`` and ``benchmarks/tensor_parallel.py`` (and
``tests/test_chapter6.py``). Every rank of one spawn builds the same reference GPT (same
seed) once per variant, splits it, and times training steps on the same batch: forward,
loss, backward, AdamW step, zero_grad. The variants (:data:`VARIANTS`) run round-robin,
one step of each in turn, so that a slow moment of a shared machine hits them all alike.
Each worker returns plain data; :func:`rows` puts the measurements beside the formulas of
:mod:`course_lib.cost.tensor_model` and :func:`format_table` prints them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from course_lib import collectives as C
from course_lib.cost import cost_model
from course_lib.cost import tensor_model as tm
from course_lib.launch import DistContext
from course_lib.memory import held_bytes
from course_lib.model import GPT, GPTConfig, count_parameters, loss_fn
from course_lib.parallel import tensor_parallel as T
from course_lib.parallel.tensor_gpt import (
    check_tensor_parallel,
    sync_sequence_parallel_grads,
    tensor_parallelize,
)
from course_lib.topology import Topology

# name -> (whose layers, sequence parallel, whose collectives)
VARIANTS: dict[str, tuple[str, bool, str]] = {
    "ours": ("ours", False, "ours"),  # our layers on chapter 1's ring (bytes counted)
    "ours-sp": ("ours", True, "ours"),  # the same with sequence parallelism
    "ours-tc": ("ours", False, "torch"),  # our layers on torch.distributed's collectives
    "ours-sp-tc": ("ours", True, "torch"),
    "torch": ("torch", False, "torch"),  # DTensor's parallelize_module (dtensor_tp.py)
    "torch-sp": ("torch", True, "torch"),
    # SP as Megatron-LM runs it: column-parallel layers keep their input's sequence shard
    # and all-gather it again in backward (recompute_all_gather)
    "ours-sp-rg": ("ours", True, "ours"),
}
RECOMPUTE = {"ours-sp-rg"}  # the variants with recompute_all_gather
LR = 3e-4  # AdamW's learning rate: the same for every variant
MIB = 2**20


def batch(config: GPTConfig, size: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Chapter 6: a fixed random batch of token ids (size, seq) and its targets."""
    if seq > config.block_size:
        raise ValueError(f"seq={seq} exceeds block_size={config.block_size}")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (size, seq + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def reference(config: GPTConfig, seed: int = 0) -> GPT:
    """Chapter 6: the single-device GPT every variant starts from (the same on every rank)."""
    torch.manual_seed(seed)
    return GPT(config)


def local_param_bytes(model: nn.Module) -> int:
    """Chapter 6: bytes of the parameters this rank holds (a DTensor's local shard; tied once)."""
    return held_bytes(p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())


# ---------------------------------------------------------------------------------------
# One training step of each variant, as a closure: () -> (loss, bytes sent, comm seconds)
# ---------------------------------------------------------------------------------------

Step = Callable[[], tuple[float, int | None, float | None]]


def _ours_step(variant: str, config: GPTConfig, topology: Topology, x, y) -> tuple[Step, int]:
    _, sp, collectives = VARIANTS[variant]
    counter, clock = C.CommCounter(), T.CommClock()
    model = tensor_parallelize(reference(config).to(x.device), topology, sp,
                               collectives=collectives, counter=counter, clock=clock,
                               recompute_all_gather=variant in RECOMPUTE)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    counted = collectives == "ours"

    def step() -> tuple[float, int | None, float | None]:
        counter.reset()
        clock.reset()
        loss = model.loss(model(x), y)
        loss.backward()
        if sp:
            sync_sequence_parallel_grads(model, model.comm)
        sent, comm_s = counter.bytes_sent, clock.seconds  # forward + backward, no optimizer
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), (sent if counted else None), comm_s

    return step, local_param_bytes(model)


def _torch_step(variant: str, config: GPTConfig, topology: Topology, x, y) -> tuple[Step, int]:
    from course_lib.parallel.dtensor_tp import torch_tensor_parallelize, torch_tp_step

    _, sp, _ = VARIANTS[variant]
    group = topology.tp_group if topology.tp_group is not None else dist.group.WORLD
    model = torch_tensor_parallelize(reference(config).to(x.device), group, sequence_parallel=sp)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step() -> tuple[float, int | None, float | None]:
        loss = torch_tp_step(model, x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, None, None

    return step, local_param_bytes(model)


def _check_steps(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 (timed) and warmup >= 0, got {steps} and {warmup}")


def check_variants(variants: list[str], config: GPTConfig, seq: int, tp: int) -> None:
    """Chapter 6: ValueError, naming the choices, for an unknown variant or a split that
    cannot work (:func:`check_tensor_parallel`), before any message."""
    if isinstance(variants, str):
        raise ValueError(f"variants must be a list of names, got the string {variants!r}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown}; choose among {list(VARIANTS)}")
    for v in variants:
        check_tensor_parallel(config, tp, seq, VARIANTS[v][1])


def measure_worker(
    ctx: DistContext,
    config: GPTConfig,
    batch_size: int,
    seq: int,
    variants: list[str],
    steps: int,
    warmup: int = 1,
    *,
    threads: int = 1,
    topology: Topology | None = None,
) -> dict[str, dict[str, Any]]:
    """Chapter 6: on the tp = world ranks, time ``steps`` training steps of each variant.

    Every variant starts from the same reference GPT and trains on the same batch with
    AdamW; ``warmup`` untimed steps come first; one step of each variant in turn. Each
    rank uses ``threads`` torch threads. Returns, per variant: ``step_s`` (median of the
    timed steps) and ``step_times``; ``comm_s`` (median seconds per step inside the
    tensor-parallel collectives, from :class:`CommClock`; ours only, else None);
    ``bytes_per_step`` (what our counter saw this rank send in one forward + backward,
    the sequence-parallel gradient sum included, the optimizer excluded; "ours" and
    "ours-sp" only); ``losses`` (every step's loss, warm-up included: the first is the
    same for every variant); ``param_bytes`` (parameters held on this rank).
    ``topology`` reuses a :class:`Topology` built by the caller (its groups).
    """
    _check_steps(steps, warmup)
    torch.set_num_threads(threads)
    topology = topology or Topology(tp=ctx.world_size)
    check_variants(variants, config, seq, topology.tp)
    x, y = (t.to(ctx.device) for t in batch(config, batch_size, seq))
    runs = {}
    for v in variants:
        build = _ours_step if VARIANTS[v][0] == "ours" else _torch_step
        runs[v] = build(v, config, topology, x, y)
    log: dict[str, dict[str, list]] = {v: {"t": [], "loss": [], "bytes": [], "comm": []}
                                       for v in variants}  # fmt: skip
    for i in range(warmup + steps):
        for v in variants:
            dist.barrier(group=topology.tp_group)  # every rank starts the step together
            start = time.perf_counter()
            loss, sent, comm_s = runs[v][0]()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            elapsed = time.perf_counter() - start
            entry = log[v]
            entry["loss"].append(loss)
            if i >= warmup:
                entry["t"].append(elapsed)
                entry["bytes"].append(sent)
                entry["comm"].append(comm_s)
    return {v: _summary(log[v], runs[v][1]) for v in variants}


def _summary(entry: dict[str, list], param_bytes: int) -> dict[str, Any]:
    comm = entry["comm"]
    return {
        "step_s": statistics.median(entry["t"]),
        "step_times": entry["t"],
        "comm_s": None if comm[0] is None else statistics.median(comm),
        "bytes_per_step": entry["bytes"][0],
        "losses": entry["loss"],
        "param_bytes": param_bytes,
    }


def single_device_step(
    config: GPTConfig, batch_size: int, seq: int, steps: int, warmup: int = 1, threads: int = 1
) -> dict[str, Any]:
    """Chapter 6: the baseline, the reference GPT on one process (tp = 1), same batch.

    The same step as :func:`measure_worker`'s (forward, loss, backward, AdamW, zero_grad).
    Returns ``step_s`` (median), ``losses``, ``param_bytes`` and ``activation_bytes``
    (saved by autograd, measured as chapter 0 does).
    """
    _check_steps(steps, warmup)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, (x, y) = reference(config), batch(config, batch_size, seq)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        times, losses = [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if i >= warmup:
                times.append(time.perf_counter() - start)
        saved = cost_model.measure_saved_activation_bytes(model, x, y)
    finally:
        torch.set_num_threads(previous)  # the caller's (a notebook's) threads, back
    return {
        "step_s": statistics.median(times),
        "losses": losses,
        "param_bytes": local_param_bytes(model),
        "activation_bytes": saved,
    }


SP_MODES = {"plain": (False, False), "sp": (True, False), "sp-rg": (True, True)}


def gradients_worker(
    ctx: DistContext,
    config: GPTConfig,
    batch_size: int,
    seq: int,
    modes: tuple[str, ...] = tuple(SP_MODES),
) -> dict[str, dict[str, float]]:
    """Chapter 6: one forward + backward, ours against one device, gradient by gradient.

    For each mode of :data:`SP_MODES` (plain tensor parallelism, sequence parallelism, and
    sequence parallelism re-gathering the column-parallel inputs), the largest absolute
    difference between every parameter's gradient on this rank and the matching slice of
    the single-device GPT's gradient (computed on every rank, from the same weights and
    batch), by parameter name; and ``"loss"``. Every rank of the group must call it.
    """
    torch.set_num_threads(1)
    topology = Topology(tp=ctx.world_size)
    x, y = (t.to(ctx.device) for t in batch(config, batch_size, seq))
    one = reference(config).to(ctx.device)
    ref_loss = loss_fn(one(x), y)
    ref_loss.backward()
    ref = dict(one.named_parameters())
    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        sp, regather = SP_MODES[mode]
        model = tensor_parallelize(reference(config).to(ctx.device), topology, sp,
                                   recompute_all_gather=regather)  # fmt: skip
        loss = model.loss(model(x), y)
        loss.backward()
        if sp:
            sync_sequence_parallel_grads(model, model.comm)
        errors = {"loss": abs(loss.item() - ref_loss.item())}
        for name, p in model.named_parameters():
            want = ref[name].grad
            want = p.tp_shard.take(want) if hasattr(p, "tp_shard") else want
            errors[name] = float((p.grad - want).abs().max())
        out[mode] = errors
    return out


def bytes_worker(
    ctx: DistContext,
    config: GPTConfig,
    batch_size: int,
    seq: int,
    *,
    sequence_parallel: tuple[bool, ...] = (False, True),
    topology: Topology | None = None,
    recompute_all_gather: bool = False,
) -> dict[bool | str, dict[str, Any]]:
    """Chapter 6: bytes this rank sends in ONE forward + backward, counted, beside the formula.

    The cheap twin of :func:`measure_worker`'s ``bytes_per_step`` (no optimizer, no
    timing), for the chapter's "predict the bytes, then count them" cells. For each
    ``sequence_parallel``: ``bytes_sent`` (our counter, the sequence-parallel gradient sum
    included), ``by_collective`` (the counter's split by ring collective) and ``formula``
    (:func:`~course_lib.cost.tensor_model.model_comm_bytes` for this rank, by origin).
    With ``recompute_all_gather`` one more entry, ``"recompute"``: sequence parallelism as
    Megatron-LM runs it (the column-parallel inputs gathered again in backward).
    """
    torch.set_num_threads(1)
    topology = topology or Topology(tp=ctx.world_size)
    x, y = (t.to(ctx.device) for t in batch(config, batch_size, seq))
    modes = [(sp, sp, False) for sp in sequence_parallel]
    modes += [("recompute", True, True)] if recompute_all_gather else []
    out: dict[bool | str, dict[str, Any]] = {}
    for key, sp, regather in modes:
        check_tensor_parallel(config, topology.tp, seq, sp)
        counter = C.CommCounter()
        model = tensor_parallelize(reference(config).to(ctx.device), topology, sp,
                                   counter=counter, recompute_all_gather=regather)  # fmt: skip
        model.loss(model(x), y).backward()
        if sp:
            sync_sequence_parallel_grads(model, model.comm)
        out[key] = {
            "bytes_sent": counter.bytes_sent,
            "by_collective": dict(counter.bytes_sent_by_op),
            "formula": tm.model_comm_bytes(config, batch_size, seq, topology.tp, sp,
                                           rank=topology.tp_rank,
                                           recompute_all_gather=regather),
        }  # fmt: skip
    return out


def memory_worker(
    ctx: DistContext,
    config: GPTConfig,
    batch_size: int,
    seq: int,
    *,
    sequence_parallel: tuple[bool, ...] = (False, True),
    topology: Topology | None = None,
    recompute_all_gather: bool = False,
) -> dict[bool | str, dict[str, Any]]:
    """Chapter 6: activation and parameter bytes on this rank, measured beside the formulas.

    For each ``sequence_parallel`` (both by default): ``activation_bytes`` (what autograd saves in
    one forward + vocabulary-parallel loss, measured by
    :func:`~course_lib.cost.cost_model.measure_saved_activation_bytes`),
    ``activation_formula`` and its ``activation_terms``
    (:func:`~course_lib.cost.tensor_model.tp_activation_terms`), ``param_bytes`` and
    ``param_formula`` (``parameter_count_per_rank`` x 4, fp32). Every rank of the group
    must call it (the forward talks). With ``recompute_all_gather`` one more entry,
    ``"recompute"``: sequence parallelism as Megatron-LM runs it.
    """
    torch.set_num_threads(1)
    topology = topology or Topology(tp=ctx.world_size)
    tp = topology.tp
    x, y = (t.to(ctx.device) for t in batch(config, batch_size, seq))
    modes = [(sp, sp, False) for sp in sequence_parallel]
    modes += [("recompute", True, True)] if recompute_all_gather else []
    out: dict[bool | str, dict[str, Any]] = {}
    for key, sp, regather in modes:
        check_tensor_parallel(config, tp, seq, sp)
        model = tensor_parallelize(reference(config).to(ctx.device), topology, sp,
                                   recompute_all_gather=regather)  # fmt: skip
        terms = tm.tp_activation_terms(config, batch_size, seq, tp, sp,
                                       recompute_all_gather=regather)  # fmt: skip
        out[key] = {
            "activation_bytes": cost_model.measure_saved_activation_bytes(model, x, y, model.loss),
            "activation_formula": sum(terms.values()),
            "activation_terms": terms,
            "param_bytes": local_param_bytes(model),
            "param_formula": 4 * tm.parameter_count_per_rank(config, tp),
        }
    return out


def collectives_worker(
    ctx: DistContext, shape: tuple[int, ...], iters: int, *, threads: int = 1
) -> dict[str, dict[str, float]]:
    """Chapter 6: why "ours" and "ours-tc" differ: one activation's collectives, alone.

    On a (B, T, d) activation of ``shape``, the median seconds of the tensor-parallel
    layers' collectives (:mod:`course_lib.parallel.tensor_parallel`'s ``all_reduce`` and a
    sequence-parallel ``reduce_scatter`` + ``all_gather`` along T) on our ring and on
    torch's, and of the bare ``clone`` each of them starts with. ``iters`` rounds, each
    timing every one in turn after a barrier. Returns ``{name: {"ours": s, "torch": s}}``.
    """
    torch.set_num_threads(threads)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(ctx.rank)).to(ctx.device)
    comms = {
        "ours": T.TPComm(None, C.CommCounter(), "ours"),
        "torch": T.TPComm(None, None, "torch"),
    }
    ops: dict[str, Callable[[T.TPComm], object]] = {
        "all_reduce (g, f)": lambda c: T.all_reduce(x, c),
        "reduce_scatter + all_gather (SP)": lambda c: T.all_gather(
            T.reduce_scatter(x, c, 1), c, 1
        ),  # fmt: skip
        "clone (in both)": lambda c: x.clone(),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"ours": [], "torch": []} for k in ops}
    for _ in range(iters):
        for name, op in ops.items():
            for whose, comm in comms.items():
                dist.barrier()
                start = time.perf_counter()
                op(comm)
                times[name][whose].append(time.perf_counter() - start)
    return {k: {w: statistics.median(t) for w, t in v.items()} for k, v in times.items()}


def chapter_worker(
    ctx: DistContext,
    config: GPTConfig,
    batch_size: int,
    seq: int,
    variants: list[str],
    steps: int,
    warmup: int = 1,
    threads: int = 1,
    collective_iters: int = 0,
) -> dict[str, Any]:
    """Chapter 6: :func:`measure_worker`, :func:`memory_worker` and (with
    ``collective_iters``) :func:`collectives_worker` on one activation, in one spawn:
    ``{"steps": ..., "memory": ..., "collectives": ... or None}``, what :func:`rows` and
    :func:`format_collectives` take for one tp."""
    topology = Topology(tp=ctx.world_size)
    sp_ok = seq % topology.tp == 0
    out = {
        "steps": measure_worker(ctx, config, batch_size, seq, variants, steps, warmup,
                                threads=threads, topology=topology),
        "memory": memory_worker(ctx, config, batch_size, seq, topology=topology,
                                sequence_parallel=(False, True) if sp_ok else (False,),
                                recompute_all_gather=sp_ok and topology.tp > 1),
        "collectives": None,
    }  # fmt: skip
    if collective_iters and sp_ok:
        shape = (batch_size, seq, config.n_embd)
        out["collectives"] = collectives_worker(ctx, shape, collective_iters, threads=threads)
    return out


# ---------------------------------------------------------------------------------------
# The table: one row per (tp, variant)
# ---------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _variant_row(
    v: str, config: GPTConfig, batch_size: int, seq: int, ranks: list[dict], memory, single_s
) -> dict[str, Any]:
    tp, (whose, sp, _) = len(ranks), VARIANTS[v]
    step = max(r[v]["step_s"] for r in ranks)  # the step ends when the slowest rank's does
    yardstick = "torch-sp" if sp else "torch"
    torch_step = max(r[yardstick]["step_s"] for r in ranks) if yardstick in ranks[0] else None
    comm = [r[v]["comm_s"] / r[v]["step_s"] for r in ranks if r[v]["comm_s"] is not None]
    sent = [r[v]["bytes_per_step"] for r in ranks]
    regather = v in RECOMPUTE
    want = [tm.model_comm_bytes(config, batch_size, seq, tp, sp, rank=k,
                                recompute_all_gather=regather)["total"]
            for k in range(tp)]  # fmt: skip
    act = memory[0].get("recompute" if regather else sp) if memory and whose == "ours" else None
    return {
        "tp": tp, "variant": v, "sp": sp, "step_s": step, "torch_step_s": torch_step,
        "vs_torch": _ratio(step, torch_step), "speedup": _ratio(single_s, step),
        "comm_share": statistics.mean(comm) if comm else None,
        "bytes": sent[0], "bytes_ratio": _ratio(sum(sent), sum(want)) if sent[0] else None,
        "param_bytes": ranks[0][v]["param_bytes"],
        "param_ratio": ranks[0][v]["param_bytes"] / (4 * tm.parameter_count_per_rank(config, tp)),
        "act_bytes": act["activation_bytes"] if act else None,
        "act_ratio": act["activation_bytes"] / act["activation_formula"] if act else None,
        "first_loss": ranks[0][v]["losses"][0],
    }  # fmt: skip


def single_row(config: GPTConfig, batch_size: int, seq: int, single: dict[str, Any]) -> dict:
    """Chapter 6: the table's row of the reference on one process (:func:`single_device_step`),
    its parameters against ``count_parameters`` x 4 and its saved activations against
    chapter 0's ``activation_bytes``."""
    act_want = cost_model.activation_bytes(config, batch_size, seq)
    return {
        "tp": 1, "variant": "1 device", "sp": False, "step_s": single["step_s"],
        "torch_step_s": None, "vs_torch": None, "speedup": 1.0, "comm_share": None,
        "bytes": 0, "bytes_ratio": None, "param_bytes": single["param_bytes"],
        "param_ratio": single["param_bytes"] / (4 * count_parameters(config)),
        "act_bytes": single["activation_bytes"], "act_ratio": single["activation_bytes"] / act_want,
        "first_loss": single["losses"][0],
    }  # fmt: skip


def rows(
    config: GPTConfig,
    batch_size: int,
    seq: int,
    ranks: list[dict[str, dict]],
    memory: list[dict[bool, dict]] | None = None,
    single: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Chapter 6: one row per variant of one tp: ``ranks`` are :func:`measure_worker`'s
    results in rank order, ``memory`` :func:`memory_worker`'s (same tp), ``single``
    :func:`single_device_step`'s (for the speed-up; its own row is :func:`single_row`).

    Each row: ``step_s`` (the slowest rank's median), ``vs_torch`` (over DTensor's step at
    the same tp and sequence parallelism), ``speedup`` (one device's step over this one),
    ``comm_share`` (time in collectives / step, mean over ranks), ``bytes`` (rank 0's
    bytes per forward + backward) and ``bytes_ratio`` (all ranks' over
    :func:`tm.model_comm_bytes`'s), ``param_bytes`` and ``param_ratio`` (over
    ``parameter_count_per_rank`` x 4), ``act_bytes`` and ``act_ratio`` (over
    :func:`tm.tp_activation_bytes`, ours only, at the row's sequence parallelism),
    ``first_loss``.
    """
    single_s = single["step_s"] if single else None
    return [_variant_row(v, config, batch_size, seq, ranks, memory, single_s) for v in ranks[0]]


def _cell(value: float | None, fmt: str, width: int, suffix: str = "") -> str:
    text = "-" if value is None else f"{value:{fmt}}{suffix}"
    return f"{text:>{width}}"


def format_collectives(results: dict[str, dict[str, float]], shape: tuple[int, ...]) -> str:
    """Chapter 6: :func:`collectives_worker`'s medians as text, ours over torch's."""
    nbytes = 4 * int(torch.Size(shape).numel())
    what = f"one (B, T, d) activation, {nbytes / MIB:.2f} MiB"
    head = f"{what:<36}{'ours ms':>9}{'torch ms':>9}{'ratio':>8}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<36}{r['ours'] * 1e3:9.3f}{r['torch'] * 1e3:9.3f}"
                     f"{r['ours'] / r['torch']:7.2f}x")  # fmt: skip
    return "\n".join(lines)


def format_table(table: list[dict[str, Any]]) -> str:
    """Chapter 6: the rows of :func:`rows` as text, one line per (tp, variant).

    Measured beside predicted: "meas/formula" is 1.000 when the formula is exact.
    """
    head = (f"{'tp':>2} {'variant':<11}| {'step ms':>8}{'/DTensor':>9}{'vs 1 dev':>9}"
            f"{'comm %':>7} | {'KiB sent':>9}{'meas/frm':>9} | {'param MiB':>9}{'meas/frm':>9}"
            f" | {'act MiB':>8}{'meas/frm':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in table:
        share = None if r["comm_share"] is None else 100 * r["comm_share"]
        sent = r["bytes"] / 1024 if r["bytes"] else None
        act = r["act_bytes"] / MIB if r["act_bytes"] else None
        lines.append(
            f"{r['tp']:>2} {r['variant']:<11}| {r['step_s'] * 1e3:8.1f}"
            f"{_cell(r['vs_torch'], '.2f', 9, 'x')}{_cell(r['speedup'], '.2f', 9, 'x')}"
            f"{_cell(share, '.1f', 7)} | {_cell(sent, '.1f', 9)}{_cell(r['bytes_ratio'], '.3f', 9)}"
            f" | {r['param_bytes'] / MIB:9.2f}{_cell(r['param_ratio'], '.3f', 9)}"
            f" | {_cell(act, '.2f', 8)}{_cell(r['act_ratio'], '.3f', 9)}"
        )
    return "\n".join(lines)
