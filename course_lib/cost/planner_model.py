"""Chapter 7: the planner's model: memory per GPU and step time of one configuration.

The planner (:mod:`course_lib.cost.planner`) enumerates configurations and ranks them; this
module says what one configuration costs.
Everything is reused from earlier chapters, put together on one GPU of the grid
``arange(world).view(dp, pp, tp)`` (:mod:`course_lib.topology`: tp innermost, then pp,
dp outermost):

Memory of the busiest pipeline stage (the max over stages):
  - parameters of the stage at this tp (chapter 6's
    :func:`~course_lib.cost.tensor_model.parameter_count_per_rank`, cut into stages as
    chapter 5's :func:`~course_lib.parallel.pipeline.split_blocks` does: the embedding on
    the first stage, final norm and head on the last; with tied weights the last stage
    keeps a copy of the embedding), times the bytes per parameter of
    :data:`~course_lib.cost.cost_model.PRECISIONS`, cut over dp by ZeRO as chapter 3's
    :func:`~course_lib.parallel.zero.zero_memory_formula`, with each of AdamW's two
    groups (matrices decayed, vectors not) padded to a multiple of dp as chapter 7's flat
    ZeRO buffers are. ZeRO-3 also holds two gathered blocks (the running one and the
    prefetched next), chapter 3's working buffers. For fp32 AdamW this equals, to the
    byte, what every rank of :class:`~course_lib.parallel.compose.Hybrid` holds
    (:func:`memory_per_stage` gives each stage; tests/test_planner_measured.py);
  - activations: one micro-batch's bytes on the stage (chapter 6's
    :func:`~course_lib.cost.tensor_model.tp_activation_terms`, flash attention: no
    s x s scores are kept, so Korthikanti's 5·a·s²·b term is absent) times the
    micro-batches in flight on that stage (chapter 5's
    :func:`~course_lib.parallel.pipeline_sim.peak_activations`: 1F1B holds p - r on stage r,
    GPipe m). With full recomputation a block keeps only its input, (b, T, d) (/tp with
    SP), plus one block's full activations while it is recomputed. Without
    recomputation this equals the measured peak of saved storages on every rank of
    every world-4 configuration (:mod:`course_lib.cost.measure_hybrid`).
Step time (stated assumptions, in every :class:`Plan`'s ``overlap``):
  - compute: ``model.flops_per_token`` (6N + 12·L·d·T; x 4/3 with recomputation, one
    more forward) at ``peak x mfu``; each stage computes its own blocks (+ the head);
  - tensor parallel: chapter 6's :func:`~course_lib.cost.tensor_model.model_comm_bytes`
    per micro-batch at beta plus alpha per ring message, on the critical path (no
    overlap); intra-node link (tp across nodes is rejected unless allowed);
  - pipeline: ``(m + p - 1) x`` the slowest stage's micro-batch time (F + B + TP + two
    point-to-point sends of a (b, T, d) activation, /tp with SP), i.e. the bubble
    ``(p - 1)/(m + p - 1)`` of chapter 5's formula, which its simulator reproduces for
    equal stages and free messages. Charging every send is an upper bound (the simulator
    overlaps sends with other stages' work). Inter-node link when the stages span nodes;
  - data parallel: ring all-reduce of the stage's gradients (ZeRO-1/2: reduce-scatter +
    all-gather, the same bytes; ZeRO-3: one more all-gather) by chapter 1's
    :func:`~course_lib.cost.comm_model.predict`, on the inter-node link when the run spans
    nodes. ``dp_overlap="last_bucket"``: it hides under the last micro-batch's backward
    except the last bucket; ``"none"``: all of it is exposed;
  - the optimizer step: ``cluster.optimizer_s_per_param`` per parameter this rank updates
    (the stage's, or its 1/dp piece under ZeRO), after everything else: 0 on the GPU
    clusters (memory-bound, negligible), measured on the laptop.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from course_lib.cost import tensor_model as tm
from course_lib.cost.clusters import Cluster
from course_lib.cost.comm_model import predict
from course_lib.cost.cost_model import PRECISIONS, ModelShape
from course_lib.model import GPTConfig, flops_per_token
from course_lib.parallel.pipeline import split_blocks
from course_lib.parallel.pipeline_sim import peak_activations
from course_lib.parallel.schedules import gpipe, one_f_one_b
from course_lib.parallel.zero import zero_memory_formula

SCHEDULES = ("1f1b", "gpipe")
DEFAULT_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb = 25


@dataclass(frozen=True)
class Choice:
    """Chapter 7: one parallel configuration of a step (all sizes in ranks or counts)."""

    dp: int  # data-parallel replicas
    pp: int  # pipeline stages
    tp: int  # tensor-parallel ranks
    microbatches: int  # m, micro-batches per step per replica
    zero: int = 0  # ZeRO stage 0-3 on the dp axis
    sequence_parallel: bool = False  # Megatron's SP (needs tp > 1)
    recompute: bool = False  # full activation recomputation
    schedule: str = "1f1b"  # "1f1b" or "gpipe"

    def label(self) -> str:
        """``dp4 pp2 tp8 m16 z1 sp rc 1f1b``: a short name for tables."""
        extra = (" sp" if self.sequence_parallel else "") + (" rc" if self.recompute else "")
        return (
            f"dp{self.dp} pp{self.pp} tp{self.tp} m{self.microbatches} z{self.zero}"
            f"{extra} {self.schedule}"
        )


def as_gpt_config(model: GPTConfig | ModelShape, vocab_size: int = 51200) -> GPTConfig:
    """Chapter 7: a GPTConfig from a GPTConfig or a cost_model ``ModelShape`` preset.

    A ModelShape has no vocabulary: ``vocab_size`` (default Megatron's 51,200) fills it,
    with GPT-2 blocks, biases and tied weights; the parameter count is then our GPT's, not
    the preset's nominal ``n_params``.
    """
    if isinstance(model, GPTConfig):
        return model
    if isinstance(model, ModelShape):
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=model.seq_len,
            n_layer=model.n_layer,
            n_head=model.n_heads,
            n_embd=model.hidden,
        )
    raise ValueError(f"model must be a GPTConfig or a cost_model.ModelShape, got {type(model)}")


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------


def stage_group_counts(
    config: GPTConfig, tp: int, pp: int, *, uneven: bool = False
) -> list[tuple[int, int]]:
    """Chapter 7: (matrix, vector) parameter elements one rank of each stage holds at ``tp``.

    AdamW's two groups (:func:`course_lib.train.optimizer_groups`): the >= 2-D weights,
    decayed (the blocks' four linear weights, ``wte``'s (V_pad/tp, d) shard, ``wpe``, the
    last stage's head or tied copy) and the rest, not decayed (biases, LayerNorms).
    Stages as :func:`stage_parameter_counts`, whose counts are these pairs summed. ZeRO
    lays each group out flat and pads it to a multiple of dp, so the split matters.
    """
    totals = stage_parameter_counts(config, tp, pp, uneven=uneven)
    d = config.n_embd
    block = 3 * d // tp * d + d * (d // tp) + 4 * d // tp * d + d * (4 * d // tp)
    vocab_shard = tm.padded_vocab(config.vocab_size, tp) // tp * d
    head = vocab_shard if (not config.tie_weights or pp > 1) else 0
    out = []
    for r, blocks in enumerate(split_blocks(config.n_layer, pp)):
        matrices = len(blocks) * block
        matrices += (vocab_shard + config.block_size * d) * (r == 0) + head * (r == pp - 1)
        out.append((matrices, totals[r] - matrices))
    return out


def stage_parameter_counts(
    config: GPTConfig, tp: int, pp: int, *, uneven: bool = False
) -> list[int]:
    """Chapter 7: parameter elements one rank of each pipeline stage holds at ``tp``.

    Blocks split as :func:`~course_lib.parallel.pipeline.split_blocks`; the embedding
    (token shard + positions) on stage 0; ``ln_f`` and the head on the last; with tied
    weights and pp > 1 the last stage holds its own copy of the token embedding shard (so
    the stages sum to :func:`~course_lib.cost.tensor_model.parameter_count_per_rank` plus
    that copy). ``uneven`` allows pp not dividing n_layer.
    """
    L = config.n_layer
    if L % pp and not uneven:
        raise ValueError(
            f"pp={pp} does not divide n_layer={L}; choose pp in "
            f"{tm._divisors(L)} or pass uneven=True"
        )
    one = tm.parameter_count_per_rank(dataclasses.replace(config, n_layer=1), tp)
    block = tm.parameter_count_per_rank(dataclasses.replace(config, n_layer=2), tp) - one
    d, b = config.n_embd, 1 if config.bias else 0
    vocab_shard = tm.padded_vocab(config.vocab_size, tp) // tp * d
    embedding, final_norm = vocab_shard + config.block_size * d, d + b * d
    head = vocab_shard if (not config.tie_weights or pp > 1) else 0
    counts = [len(r) * block for r in split_blocks(L, pp)]
    counts[0] += embedding
    counts[-1] += final_norm + head
    return counts


def state_bytes(
    psi: float,
    dp: int,
    zero: int,
    precision: str = "mixed",
    *,
    groups: tuple[int, ...] | None = None,
) -> dict[str, float]:
    """Chapter 7: params, grads and optimizer bytes of ``psi`` parameters under ZeRO.

    Chapter 3's :func:`~course_lib.parallel.zero.zero_memory_formula` (fp32, K bytes of
    optimizer state) with the bytes of ``PRECISIONS[precision]``: "fp32" 4 + 4 + 8,
    "mixed" 2 + 2 + 12 (master weights counted as optimizer state).

    ``groups`` (the element count of each optimizer group, summing to ``psi``) makes it
    the bytes chapter 7's :class:`~course_lib.parallel.compose.Hybrid` really holds:
    under ZeRO each group is one flat buffer padded to a multiple of dp
    (:class:`~course_lib.flat.FlatLayout`). The parameters live in the padded buffers;
    ZeRO-1 keeps the reduced gradients in a padded buffer too; the optimizer state (and
    ZeRO-2's gradient, ZeRO-3's parameters) is one 1/dp piece of each. Exact, to the
    byte, for fp32 AdamW (tests/test_planner_measured.py).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    b = PRECISIONS[precision]
    if groups is None:
        z = zero_memory_formula(psi, dp, zero, k=b.optimizer + b.master)  # type: ignore[arg-type]
        return {
            "params": z["params"] * b.param / 4,
            "grads": z["grads"] * b.grad / 4,
            "optimizer": z["optimizer"],
        }
    if sum(groups) != psi:
        raise ValueError(f"the groups {groups} must sum to psi={psi}")
    whole = sum(-(-n // dp) * dp for n in groups) if zero else psi  # padded flat buffers
    piece = whole / dp if zero else psi  # this replica's 1/dp of each
    return {
        "params": b.param * (piece if zero >= 3 else whole),
        "grads": b.grad * (piece if zero >= 2 else whole),
        "optimizer": (b.optimizer + b.master) * piece,
    }


@functools.lru_cache(maxsize=1024)
def _in_flight(schedule: str, pp: int, microbatches: int) -> tuple[int, ...]:
    if schedule == "1f1b":
        return tuple(peak_activations(one_f_one_b(pp, pp)))
    if schedule == "gpipe":
        return tuple(peak_activations(gpipe(1, microbatches)) * pp)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def in_flight(schedule: str, pp: int, microbatches: int) -> list[int]:
    """Chapter 7: micro-batches alive at once on each stage, from chapter 5's simulator.

    :func:`~course_lib.parallel.pipeline_sim.peak_activations` of the schedule: 1F1B's
    stage r holds p - r whatever m >= p is (so it is computed at m = p, cheaply); GPipe
    holds all m on every stage. Cached: the planner asks for the same few again and again.
    """
    return list(_in_flight(schedule, pp, microbatches))


def _activation_split(
    config: GPTConfig, b: int, seq: int, c: Choice, s: int
) -> tuple[float, float, float, float]:
    """(per block, first-stage extra, last-stage extra, kept per block with recompute) bytes."""
    terms = tm.tp_activation_terms(config, b, seq, c.tp, c.sequence_parallel, s)
    blocks = sum(v for k, v in terms.items() if k.startswith("blocks:")) / config.n_layer
    first = sum(v for k, v in terms.items() if k.startswith(("embedding", "positions")))
    last = sum(terms.values()) - blocks * config.n_layer - first
    kept = b * seq * config.n_embd * s / (c.tp if c.sequence_parallel else 1)
    return blocks, first, last, kept


def memory_per_stage(
    config: GPTConfig,
    c: Choice,
    micro_batch: int,
    seq: int,
    *,
    precision: str = "mixed",
    uneven: bool = False,
) -> list[dict[str, float]]:
    """Chapter 7: bytes on one GPU of each pipeline stage, by kind (see the module docstring).

    One dict per stage: ``params, grads, optimizer`` (:func:`state_bytes` of the stage's
    two AdamW groups, ZeRO padding included), ``zero3_buffers``, ``activations`` (one
    micro-batch's saved bytes on the stage, :func:`~course_lib.cost.tensor_model.
    tp_activation_terms` cut as the stages are, times the micro-batches the schedule keeps
    alive there, :func:`in_flight`), ``total`` and ``stage``. Every rank of a stage holds
    the same (tp slices are equal; dp pieces are equal, padding included).
    """
    s = PRECISIONS[precision].param  # activations in the weights' dtype
    groups = stage_group_counts(config, c.tp, c.pp, uneven=uneven)
    block_params = tm.parameter_count_per_rank(
        dataclasses.replace(config, n_layer=2), c.tp
    ) - tm.parameter_count_per_rank(dataclasses.replace(config, n_layer=1), c.tp)
    per_block, first, last, kept = _activation_split(config, micro_batch, seq, c, s)
    alive = in_flight(c.schedule, c.pp, c.microbatches)
    out = []
    for r, (pair, blocks) in enumerate(
        zip(groups, split_blocks(config.n_layer, c.pp), strict=True)
    ):
        mem = state_bytes(sum(pair), c.dp, c.zero, precision, groups=pair)
        mem["zero3_buffers"] = 2 * block_params * s if c.zero == 3 and c.dp > 1 else 0
        one = (kept if c.recompute else per_block) * len(blocks)
        one += first * (r == 0) + last * (r == c.pp - 1)
        mem["activations"] = one * alive[r] + (per_block if c.recompute else 0)
        mem["total"] = sum(mem.values())
        out.append({**mem, "stage": r})
    return out


def memory_per_gpu(
    config: GPTConfig,
    c: Choice,
    micro_batch: int,
    seq: int,
    *,
    precision: str = "mixed",
    uneven: bool = False,
) -> dict[str, float]:
    """Chapter 7: bytes on one GPU of the busiest stage, by kind (see the module docstring).

    The stage of :func:`memory_per_stage` with the largest total. Returns ``params, grads,
    optimizer, zero3_buffers, activations, total`` and ``stage`` (its index).
    """
    stages = memory_per_stage(config, c, micro_batch, seq, precision=precision, uneven=uneven)
    return max(stages, key=lambda m: m["total"])


# ---------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------


def _link_seconds(link: tm.Link, n_bytes: float, messages: float) -> float:
    return messages * link.alpha_s + n_bytes * link.beta


def step_time(
    config: GPTConfig,
    cluster: Cluster,
    c: Choice,
    micro_batch: int,
    seq: int,
    *,
    mfu: float,
    precision: str = "mixed",
    dp_overlap: str = "last_bucket",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    uneven: bool = False,
) -> dict[str, float]:
    """Chapter 7: predicted seconds of one training step (see the module docstring).

    Returns ``compute`` (the slowest stage's F + B over all its micro-batches), ``tp``
    and ``pp_p2p`` (the same stage's, on the critical path), ``bubble`` (idle fill and
    drain), ``bubble_fraction``, ``dp`` (the whole data-parallel collective),
    ``dp_exposed`` (what is not hidden), ``optimizer`` (the update) and ``step``.
    """
    if dp_overlap not in ("last_bucket", "none"):
        raise ValueError(f"dp_overlap must be 'last_bucket' or 'none', got {dp_overlap!r}")
    s, d, L, T = PRECISIONS[precision].param, config.n_embd, config.n_layer, seq
    rate = cluster.peak_flops * mfu
    layer_fpt = (flops_per_token(config, T) - 6 * config.vocab_size * d) / L  # 72d² + 12dT
    head_fpt = 6 * config.vocab_size * d
    redo = 4 / 3 if c.recompute else 1  # one more forward: 8N instead of 6N
    tokens = micro_batch * T
    comm = (
        tm.model_comm_bytes(config, micro_batch, T, c.tp, c.sequence_parallel, s)
        if c.tp > 1
        else None
    )
    intra = c.tp <= cluster.gpus_per_node
    tp_link = cluster.intra if intra else cluster.inter
    hops = 2 * (c.tp - 1)  # messages of one ring all-reduce (or of an RS + AG pair)
    p2p_bytes = tokens * d * s / (c.tp if c.sequence_parallel else 1)
    pp_link = cluster.inter if c.tp * c.pp > cluster.gpus_per_node else cluster.intra
    p2p = 2 * _link_seconds(pp_link, p2p_bytes, 1) if c.pp > 1 else 0.0
    compute_mb = tp_mb = 0.0  # of the slowest stage, per micro-batch
    for r, blocks in enumerate(split_blocks(L, c.pp)):
        last = r == c.pp - 1
        flops = (len(blocks) * layer_fpt + head_fpt * last) * tokens * redo / c.tp
        tp_s = 0.0
        if comm is not None:
            n = comm["blocks"] * len(blocks) / L + comm["embedding"] * (r == 0)
            n += (comm["lm_head"] + comm["cross_entropy"]) * last
            msgs = hops * (4 * len(blocks) + (r == 0) + 2 * last)
            tp_s = _link_seconds(tp_link, n, msgs)
        if flops / rate + tp_s > compute_mb + tp_mb:
            compute_mb, tp_mb = flops / rate, tp_s
    m, p = c.microbatches, c.pp
    per_mb = compute_mb + tp_mb + p2p
    out = {
        "compute": compute_mb * m,
        "tp": tp_mb * m,
        "pp_p2p": p2p * m,
        "bubble": per_mb * (p - 1),
        "bubble_fraction": (p - 1) / (m + p - 1),
    }
    out.update(
        _dp_seconds(config, cluster, c, compute_mb, dp_overlap, bucket_bytes, precision, uneven)
    )
    out["optimizer"] = cluster.optimizer_s_per_param * _updated_params(config, c, uneven)
    out["step"] = per_mb * (m + p - 1) + out["dp_exposed"] + out["optimizer"]
    return out


def _updated_params(config: GPTConfig, c: Choice, uneven: bool) -> float:
    """Parameters the optimizer updates on a rank of the largest stage (1/dp under ZeRO)."""
    stages = stage_group_counts(config, c.tp, c.pp, uneven=uneven)
    if not c.zero:
        return max(sum(pair) for pair in stages)
    return max(sum(-(-n // c.dp) for n in pair) for pair in stages)  # padded pieces


def _dp_seconds(
    config: GPTConfig,
    cluster: Cluster,
    c: Choice,
    compute_mb: float,
    dp_overlap: str,
    bucket_bytes: int,
    precision: str,
    uneven: bool,
) -> dict[str, float]:
    """The dp collective of the largest stage's gradients, and the part not hidden."""
    if c.dp == 1:
        return {"dp": 0.0, "dp_exposed": 0.0}
    link = cluster.inter if c.dp * c.pp * c.tp > cluster.gpus_per_node else cluster.intra
    grad = (
        max(stage_parameter_counts(config, c.tp, c.pp, uneven=uneven)) * PRECISIONS[precision].grad
    )

    def ring(algorithm: str, n: float) -> float:
        return predict(algorithm, n, c.dp, link.alpha_s, link.beta)

    if c.zero == 0:
        total = ring("ring_all_reduce", grad)
    else:  # reduce-scatter the gradients, all-gather the parameters (twice with ZeRO-3)
        gathers = 2 if c.zero == 3 else 1
        total = ring("ring_reduce_scatter", grad) + gathers * ring("ring_all_gather", grad)
    if dp_overlap == "none":
        return {"dp": total, "dp_exposed": total}
    backward = compute_mb * 2 / 3  # the last micro-batch's backward hides the rest
    last = ring("ring_all_reduce", min(bucket_bytes, grad))
    return {"dp": total, "dp_exposed": max(last, total - backward)}


_BUBBLE = (
    "; bubble by chapter 5's formula (p - 1)/(m + p - 1) on the slowest stage's "
    "micro-batch time (what its simulator gives for equal stages and free messages)"
)
OVERLAP = {
    "last_bucket": "TP and PP communication on the critical path (not overlapped); DP "
    "gradients overlapped with the last micro-batch's backward except the last bucket" + _BUBBLE,
    "none": "nothing overlaps: TP, PP and DP communication all on the critical path" + _BUBBLE,
}
