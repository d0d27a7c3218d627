"""Chapter 7: the planner: every (dp, pp, tp, micro-batches, ZeRO, SP, recomputation),
its memory per GPU and its step time, ranked, with the reason each rejected one fails.

The memory and time of one configuration come from :mod:`course_lib.cost.planner_model`
(its docstring states every assumption); this module enumerates the configurations,
rejects the ones that cannot run (with the reason), and ranks the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from course_lib.cost import tensor_model as tm
from course_lib.cost.clusters import Cluster, PublishedRun
from course_lib.cost.cost_model import ModelShape
from course_lib.cost.hardware import GIB
from course_lib.cost.planner_model import (  # noqa: F401 (re-exported)
    DEFAULT_BUCKET_BYTES,
    OVERLAP,
    SCHEDULES,
    Choice,
    as_gpt_config,
    memory_per_gpu,
    memory_per_stage,
    step_time,
)
from course_lib.model import GPTConfig, flops_per_token
from course_lib.topology import factorisations


@dataclass(frozen=True)
class Plan:
    """Chapter 7: a configuration that fits, with its predicted memory and time."""

    choice: Choice
    memory: dict[str, float]  # bytes per GPU of the busiest stage: params, grads, ...
    time: dict[str, float]  # seconds: compute, tp, pp_p2p, bubble, dp_exposed, step
    tokens_per_s: float  # global tokens per second
    mfu: float  # model FLOPs (6N + 12LdT per token) / (GPUs x peak x step)
    overlap: str  # what overlaps and what does not, in words


@dataclass(frozen=True)
class Rejection:
    """Chapter 7: a configuration that cannot run, and why."""

    choice: Choice
    reason: str  # e.g. "out of memory: needs 91.2 GiB per GPU, 11.2 GiB over 80.0"
    kind: str  # "memory", "tp_node", "tp_heads", "pp_layers", "batch", "microbatches", "sp_seq"
    over_bytes: float = 0.0  # for kind "memory": bytes over the GPU's memory


@dataclass
class PlanTable:
    """Chapter 7: the ranked plans (fastest first) and the rejected configurations."""

    plans: list[Plan]
    rejected: list[Rejection]
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Plan:
        """The fastest configuration that fits (ValueError when none does: see :func:`plan`)."""
        if not self.plans:
            raise ValueError("no configuration fits; call plan() for the closest miss and why")
        return self.plans[0]

    def format(self, rows: int = 10) -> str:
        """The first ``rows`` plans as a text table (GiB, seconds)."""
        lines = [f"{'configuration':<34}{'GiB/GPU':>9}{'step s':>10}{'bubble':>8}{'MFU':>7}"]
        for p in self.plans[:rows]:
            lines.append(
                f"{p.choice.label():<34}{p.memory['total'] / GIB:>9.1f}"
                f"{p.time['step']:>10.4g}{p.time['bubble_fraction']:>8.1%}{p.mfu:>7.1%}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# One configuration, then all of them
# ---------------------------------------------------------------------------------------


def _structural_reason(
    config: GPTConfig,
    cluster: Cluster,
    c: Choice,
    batch: int,
    seq: int,
    uneven: bool,
    tp_across_nodes: bool,
) -> tuple[str, str] | None:
    """(kind, reason) of a configuration that cannot run whatever the memory, else None."""
    L, h, g = config.n_layer, config.n_head, cluster.gpus_per_node
    if c.tp > g and not tp_across_nodes:
        return (
            "tp_node",
            f"tp={c.tp} is beyond a node of {g} GPUs (its all-reduces would cross the "
            f"network); use tp <= {g}",
        )
    if h % c.tp:
        return "tp_heads", f"tp={c.tp} does not divide n_head={h}; choose tp in {tm._divisors(h)}"
    if c.pp > L or (L % c.pp and not uneven):
        return (
            "pp_layers",
            f"pp={c.pp} does not divide n_layer={L}; choose pp in {tm._divisors(L)} "
            "(or uneven_stages=True)",
        )
    if batch % (c.dp * c.microbatches):
        return (
            "batch",
            f"batch={batch} is not divisible by dp x microbatches = {c.dp} x {c.microbatches}",
        )
    if c.schedule == "1f1b" and c.microbatches < c.pp:
        return "microbatches", f"1F1B needs m >= p: m={c.microbatches} < pp={c.pp}"
    if c.sequence_parallel and seq % c.tp:
        return "sp_seq", f"sequence parallelism shards seq={seq}, which tp={c.tp} does not divide"
    return None


def evaluate(
    config: GPTConfig,
    cluster: Cluster,
    batch: int,
    seq: int,
    c: Choice,
    *,
    mfu: float | None = None,
    precision: str = "mixed",
    dp_overlap: str = "last_bucket",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    uneven_stages: bool = False,
    tp_across_nodes: bool = False,
) -> Plan | Rejection:
    """Chapter 7: the :class:`Plan` of one configuration, or the :class:`Rejection` saying why not.

    ``mfu`` defaults to the cluster's ``default_mfu``; ``precision`` is "mixed" (bf16
    weights, 2 + 2 + 12 bytes per parameter) or "fp32" (4 + 4 + 8).
    """
    why = _structural_reason(config, cluster, c, batch, seq, uneven_stages, tp_across_nodes)
    if why:
        return Rejection(c, why[1], why[0])
    b = batch // (c.dp * c.microbatches)  # sequences per micro-batch
    mem = memory_per_gpu(config, c, b, seq, precision=precision, uneven=uneven_stages)
    if mem["total"] > cluster.memory_bytes:
        over = mem["total"] - cluster.memory_bytes
        return Rejection(
            c,
            f"out of memory: needs {mem['total'] / GIB:.1f} GiB per GPU (stage "
            f"{mem['stage']}), {over / GIB:.1f} GiB over {cluster.memory_bytes / GIB:.1f}",
            "memory",
            over,
        )
    mfu = cluster.default_mfu if mfu is None else mfu
    t = step_time(
        config,
        cluster,
        c,
        b,
        seq,
        mfu=mfu,
        precision=precision,
        dp_overlap=dp_overlap,
        bucket_bytes=bucket_bytes,
        uneven=uneven_stages,
    )
    n_gpus = c.dp * c.pp * c.tp
    model_flops = flops_per_token(config, seq) * batch * seq
    return Plan(
        c,
        mem,
        t,
        batch * seq / t["step"],
        model_flops / (n_gpus * cluster.peak_flops * t["step"]),
        OVERLAP[dp_overlap],
    )


def _choices(
    n_gpus: int,
    batch: int,
    schedules: tuple[str, ...],
    zero_stages: tuple[int, ...],
    sp_options: tuple[bool, ...],
    rc_options: tuple[bool, ...],
    microbatches: list[int] | None,
) -> Iterator[Choice]:
    """Every Choice of the search space, duplicates skipped (see :func:`enumerate_plans`)."""
    for dp, pp, tp in factorisations(n_gpus):
        per_replica = batch // dp if batch % dp == 0 else 1
        ms = microbatches or [m for m in range(1, per_replica + 1) if per_replica % m == 0]
        for m in ms:
            for z in zero_stages if dp > 1 else (0,):
                for sp in sp_options if tp > 1 else (False,):
                    for rc in rc_options:
                        for sched in schedules if pp > 1 else ("1f1b",):
                            yield Choice(dp, pp, tp, m, z, sp, rc, sched)


def enumerate_plans(
    model: GPTConfig | ModelShape,
    cluster: Cluster,
    n_gpus: int,
    batch: int,
    seq: int,
    *,
    mfu: float | None = None,
    precision: str = "mixed",
    schedules: tuple[str, ...] = SCHEDULES,
    zero_stages: tuple[int, ...] = (0, 1, 2, 3),
    sequence_parallel: tuple[bool, ...] = (False, True),
    recompute: tuple[bool, ...] = (False, True),
    microbatches: list[int] | None = None,
    dp_overlap: str = "last_bucket",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    uneven_stages: bool = False,
    tp_across_nodes: bool = False,
) -> PlanTable:
    """Chapter 7: every configuration of ``n_gpus`` on ``cluster``, ranked (fastest first).

    ``batch`` is the global batch in sequences of ``seq`` tokens. The tuples restrict the
    search (``microbatches``: the m to try; default every divisor of batch / dp).
    Duplicates are skipped: ZeRO only with dp > 1, SP only with tp > 1, one schedule at
    pp = 1. Never raises for a configuration; :func:`plan` raises when nothing fits.
    """
    config = as_gpt_config(model)
    _check_inputs(config, cluster, n_gpus, batch, seq, mfu, schedules, zero_stages)
    kw = dict(
        mfu=mfu,
        precision=precision,
        dp_overlap=dp_overlap,
        bucket_bytes=bucket_bytes,
        uneven_stages=uneven_stages,
        tp_across_nodes=tp_across_nodes,
    )
    plans, rejected, seen = [], [], set()
    for c in _choices(
        n_gpus, batch, schedules, zero_stages, sequence_parallel, recompute, microbatches
    ):
        why = _structural_reason(config, cluster, c, batch, seq, uneven_stages, tp_across_nodes)
        if why and why[0] in ("tp_node", "tp_heads", "pp_layers"):  # one line per grid
            if (c.dp, c.pp, c.tp) in seen:
                continue
            seen.add((c.dp, c.pp, c.tp))
        result = evaluate(config, cluster, batch, seq, c, **kw)  # type: ignore[arg-type]
        (plans if isinstance(result, Plan) else rejected).append(result)
    plans.sort(key=lambda p: (p.time["step"], p.memory["total"]))
    return PlanTable(
        plans,
        rejected,
        {"model": config, "cluster": cluster.name, "n_gpus": n_gpus, "batch": batch, "seq": seq},
    )


def _check_inputs(
    config: GPTConfig,
    cluster: Cluster,
    n_gpus: int,
    batch: int,
    seq: int,
    mfu: float | None,
    schedules: tuple[str, ...],
    zero_stages: tuple[int, ...],
) -> None:
    if not isinstance(cluster, Cluster):
        raise ValueError(f"cluster must be a clusters.Cluster, got {type(cluster).__name__}")
    cluster.check_gpus(n_gpus)
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if seq > config.block_size:
        raise ValueError(
            f"seq={seq} exceeds the model's block_size={config.block_size}; "
            "use a shorter seq or a config with a larger block_size"
        )
    if mfu is not None and not (isinstance(mfu, int | float) and 0 < mfu <= 1):
        raise ValueError(f"mfu must be in (0, 1] (a fraction of the peak), got {mfu!r}")
    if not schedules or set(schedules) - set(SCHEDULES):
        raise ValueError(f"schedules must be a non-empty subset of {SCHEDULES}, got {schedules}")
    if not zero_stages or set(zero_stages) - {0, 1, 2, 3}:
        raise ValueError(
            f"zero_stages must be a non-empty subset of (0, 1, 2, 3), got {zero_stages}"
        )


def plan(
    model: GPTConfig | ModelShape,
    cluster: Cluster,
    n_gpus: int,
    batch: int,
    seq: int,
    **options: Any,
) -> PlanTable:
    """Chapter 7: :func:`enumerate_plans`, raising ValueError when no configuration fits.

    The message names the closest miss (the configuration least over the memory, and by
    how much) or, when nothing even reaches the memory check, why every grid fails.
    """
    table = enumerate_plans(model, cluster, n_gpus, batch, seq, **options)
    if table.plans:
        return table
    mem = [r for r in table.rejected if r.kind == "memory"]
    if mem:
        miss = min(mem, key=lambda r: r.over_bytes)
        raise ValueError(
            f"no configuration of {n_gpus} GPUs fits on {cluster.name!r}; closest "
            f"miss: {miss.choice.label()}: {miss.reason}. Use more GPUs, a smaller "
            "batch or more micro-batches, recomputation, ZeRO, or GPUs with more memory"
        )
    kinds = sorted({r.reason for r in table.rejected})[:4]
    raise ValueError(
        f"no valid configuration of {n_gpus} GPUs for this model and batch: "
        + "; ".join(kinds)
        + ". Change the GPU count or the batch to match"
    )


def compare_published(run: PublishedRun, **options: Any) -> dict[str, Any]:
    """Chapter 7: the planner's top choice for a published run beside the run's own.

    Returns ``run``, ``reported``, ``theirs`` (their dp/pp/tp), ``theirs_plan`` (the
    fastest plan with their dp, pp, tp, or None), ``theirs_reason`` (why none, else
    None) and ``ours`` (the planner's best Plan). Stages may be uneven when their pp does
    not divide the layers.
    """
    options.setdefault("uneven_stages", run.config.n_layer % run.pp != 0)
    table = plan(run.config, run.cluster, run.n_gpus, run.batch, run.seq, **options)
    grid = (run.dp, run.pp, run.tp)
    mine = [p for p in table.plans if (p.choice.dp, p.choice.pp, p.choice.tp) == grid]
    why = [r.reason for r in table.rejected if (r.choice.dp, r.choice.pp, r.choice.tp) == grid]
    return {
        "run": run.name,
        "reported": run.reported,
        "theirs": f"dp{run.dp} pp{run.pp} tp{run.tp}",
        "theirs_plan": mine[0] if mine else None,
        "theirs_reason": None if mine else (why[0] if why else "not enumerated"),
        "ours": table.best,
    }
