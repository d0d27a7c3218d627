"""Chapter 6's cost model of tensor parallelism: bytes, parameter memory and step time.

Three questions, each answered by a formula the chapter checks against a measurement:

1. How many bytes does one rank send per transformer block? (:func:`block_comm_bytes`)
   Megatron's block has one all-reduce after attention and one after the MLP in forward
   (the g operators) and the same two in backward (the f operators), each on the whole
   activation, B·T·d elements. With sequence parallelism each all-reduce becomes a
   reduce-scatter plus an all-gather: the same bytes, in two halves.
2. How many parameters does one rank hold? (:func:`parameter_count_per_rank`)
3. Why does tensor parallelism stay inside a node? (:func:`layer_time`,
   :func:`node_boundary_table`) Compute per rank falls as 1/tp, while the ring all-reduce
   sends about 2·B·T·d bytes per rank whatever tp is. Inside a node the link is fast
   enough that communication stays a small share; once the ring leaves the node it runs
   at the network's rate, ~9x slower, and communication dominates.

Units: bytes (payload, as our byte-counting collectives of chapter 1 count them), seconds,
FLOP/s. Link rates are in decimal gigabytes, ``GB = 10**9`` bytes, as vendors quote them.

Chapter 1's counts, with N = tp ranks and a tensor of n bytes: a ring all-reduce sends
2(N - 1)/N · n bytes per rank, a ring reduce-scatter or all-gather (N - 1)/N · n.

References
    [Megatron] Shoeybi, Patwary, Puri, LeGresley, Casper, Catanzaro. "Megatron-LM: Training
               Multi-Billion Parameter Language Models Using Model Parallelism".
               arXiv:1909.08053, 2019 (Sec. 3, Fig. 3).
    [SP]       Korthikanti, Casper, Lym, McAfee, Andersch, Shoeybi, Catanzaro. "Reducing
               Activation Recomputation in Large Transformer Models". MLSys 2023
               (arXiv:2205.05198), Sec. 4.2.2, Fig. 5.
    [GPT-3]    Brown et al. "Language Models are Few-Shot Learners". NeurIPS 2020,
               Table 2.1 (175B: d = 12288, 96 heads, context 2048).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from course_lib.cost import hardware
from course_lib.cost.comm_model import bytes_sent_per_rank, predict
from course_lib.cost.hardware import GB
from course_lib.model import GPTConfig

# ---------------------------------------------------------------------------------------
# Validation: clear errors that name the fix
# ---------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not ok or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _check_tp_divides(tp: int, what: str, size: int) -> None:
    if size % tp:
        raise ValueError(
            f"tp={tp} does not divide {what}={size}; choose tp in {_divisors(size)[:16]}"
        )


# ---------------------------------------------------------------------------------------
# 1. Bytes per block per pass (chapter 6)
# ---------------------------------------------------------------------------------------


def block_comm_bytes(
    batch: int,
    seq: int,
    n_embd: int,
    tp: int,
    sequence_parallel: bool = False,
    bytes_per_element: int = 4,
) -> dict[str, int]:
    """Chapter 6: payload bytes one rank SENDS for one transformer block in ONE pass.

    One pass is the forward or the backward (they send the same). Without sequence
    parallelism that is 2 ring all-reduces of the activation, B·T·d elements of
    ``bytes_per_element`` bytes (n bytes): 2 · 2(N - 1)/N · n. With it, 2 reduce-scatters
    and 2 all-gathers of the same n: 2 · (N - 1)/N · n each, the same total [SP].
    Returns ``{"all_reduce", "reduce_scatter", "all_gather", "total"}`` in bytes.

    Left out: the embedding, the head and the loss (vocabulary-parallel embedding and
    cross-entropy add their own collectives once per model, not per block). Exact for our
    ring collectives because tp divides d (it divides n_head, which divides d), so the
    ring's chunks are equal.
    """
    for name, value in (("batch", batch), ("seq", seq), ("n_embd", n_embd), ("tp", tp)):
        _check_int(name, value)
    _check_int("bytes_per_element", bytes_per_element)
    _check_tp_divides(tp, "n_embd", n_embd)
    if sequence_parallel:
        _check_tp_divides(tp, "the sequence length seq (sequence parallelism shards it)", seq)
    n = batch * seq * n_embd * bytes_per_element  # bytes of one (B, T, d) activation
    half = (tp - 1) * n // tp  # one ring reduce-scatter or all-gather, per rank
    if sequence_parallel:
        parts = {"all_reduce": 0, "reduce_scatter": 2 * half, "all_gather": 2 * half}
    else:
        parts = {"all_reduce": 2 * 2 * half, "reduce_scatter": 0, "all_gather": 0}
    return {**parts, "total": sum(parts.values())}


# ---------------------------------------------------------------------------------------
# 2. Parameters per rank (chapter 6)
# ---------------------------------------------------------------------------------------


def padded_vocab(vocab_size: int, tp: int) -> int:
    """Chapter 6: the vocabulary rounded up to a multiple of tp (256 -> 258 at tp = 3)."""
    _check_int("vocab_size", vocab_size)
    _check_int("tp", tp)
    return -(-vocab_size // tp) * tp


def parameter_count_per_rank(config: GPTConfig, tp: int) -> int:
    """Chapter 6: parameter elements that one rank of our tensor-parallel GPT holds.

    The layout, per block (d = n_embd, b = 1 with biases, else 0):

    ==================  ============================  ===============================
    tensor              shape on one rank             split
    ==================  ============================  ===============================
    attn.c_attn         (3d/tp, d) + b (3d/tp,)       column-parallel, by heads
    attn.c_proj         (d, d/tp) + b (d,)            row-parallel, bias replicated
    mlp.c_fc            (4d/tp, d) + b (4d/tp,)       column-parallel
    mlp.c_proj          (d, 4d/tp) + b (d,)           row-parallel, bias replicated
    ln_1, ln_2          (d,) + b (d,) each            replicated
    ==================  ============================  ===============================

    and once: ``wte`` (V_pad/tp, d) with V_pad = :func:`padded_vocab`, ``wpe``
    (block_size, d) and ``ln_f`` replicated, ``lm_head`` tied (nothing extra) or untied
    (V_pad/tp, d). At tp = 1 this is :func:`course_lib.model.count_parameters`. In bytes:
    times 4 for fp32 (parameters only; gradients and optimizer state scale the same way).
    """
    _check_int("tp", tp)
    _check_tp_divides(tp, "n_head", config.n_head)
    d, b = config.n_embd, 1 if config.bias else 0
    attn = 3 * d // tp * d + b * 3 * d // tp + d * (d // tp) + b * d
    mlp = 4 * d // tp * d + b * 4 * d // tp + d * (4 * d // tp) + b * d
    norms = 2 * (d + b * d)
    vocab_shard = padded_vocab(config.vocab_size, tp) // tp * d
    embeddings = vocab_shard + config.block_size * d
    head = 0 if config.tie_weights else vocab_shard
    return config.n_layer * (attn + mlp + norms) + embeddings + (d + b * d) + head


# ---------------------------------------------------------------------------------------
# 3. Links and the modelled time of one layer (chapter 6)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """Chapter 6: one link of the alpha-beta model, as one GPU sees it, each way."""

    name: str  # what the figures call it
    alpha_s: float  # latency per message, seconds (an assumption: no datasheet gives it)
    bandwidth_bytes_per_s: float  # bytes per second ONE WAY per GPU, decimal (GB = 10**9)
    source: str  # where the bandwidth comes from, and why alpha has its value

    def __post_init__(self) -> None:
        if isinstance(self.alpha_s, bool) or not self.alpha_s >= 0:
            raise ValueError(f"Link {self.name!r}: alpha_s must be >= 0 s, got {self.alpha_s}")
        _check_positive(f"Link {self.name!r}: bandwidth_bytes_per_s", self.bandwidth_bytes_per_s)

    @property
    def beta(self) -> float:
        """Seconds per byte, 1 / bandwidth (chapter 1's beta)."""
        return 1.0 / self.bandwidth_bytes_per_s


# alpha: a few microseconds per message is the order of NCCL's small-message latency on
# these fabrics; we found no datasheet figure, so the values are ASSUMPTIONS, rounded, with
# the network a few microseconds slower than NVLink (a NIC and a switch on the path). The
# conclusions do not depend on them: the messages here are ~100 MB, where beta dominates.
NVLINK_H100 = Link(
    "NVLink 4 (H100 SXM)",
    alpha_s=3e-6,  # assumption
    bandwidth_bytes_per_s=450 * GB,
    source="NVIDIA H100 Tensor Core GPU datasheet and H100 architecture whitepaper: "
    "NVLink 4, 18 links, 900 GB/s total bidirectional per GPU = 450 GB/s each way, any "
    "pair through the NVSwitches of an 8-GPU HGX/DGX H100 board. alpha = 3 us: assumption.",
)
INFINIBAND_NDR = Link(
    "InfiniBand NDR (400 Gb/s)",
    alpha_s=6e-6,  # assumption
    bandwidth_bytes_per_s=50 * GB,
    source="NVIDIA ConnectX-7 adapter and Quantum-2 (NDR) switch specifications: 400 Gb/s "
    "per port = 50 GB/s each way; DGX H100 datasheet: one such port per GPU (8 ConnectX-7 "
    "for the compute fabric). alpha = 6 us: assumption (NVLink's plus NIC and switch).",
)
PCIE4_X16 = Link(
    "PCIe 4.0 x16",
    alpha_s=5e-6,  # assumption
    bandwidth_bytes_per_s=31.5 * GB,
    source="PCI-SIG PCI Express Base Specification 4.0: 16 GT/s per lane, 128b/130b "
    "encoding, 16 lanes = 31.5 GB/s each way before packet overheads (real transfers get "
    "~25 GB/s). alpha = 5 us: assumption.",
)

H100_BF16_PEAK_FLOPS: float = hardware.peak_flops("H100 SXM", "bf16")  # type: ignore[assignment]
H100_PEAK_SOURCE: str = hardware.lookup_gpu("H100 SXM").source  # type: ignore[union-attr]


def _n_embd(config: GPTConfig | Mapping[str, Any] | int) -> int:
    """d from a GPTConfig, a mapping with "n_embd", or d itself; tp checked against heads."""
    if isinstance(config, GPTConfig):
        return config.n_embd
    if isinstance(config, Mapping):
        if "n_embd" not in config:
            raise ValueError(f"config mapping needs an 'n_embd' key, got keys {sorted(config)}")
        return config["n_embd"]
    return config


def _n_head(config: GPTConfig | Mapping[str, Any] | int) -> int | None:
    if isinstance(config, GPTConfig):
        return config.n_head
    return config.get("n_head") if isinstance(config, Mapping) else None


def layer_flops(n_embd: int, tokens: int) -> int:
    """Chapter 6: forward + backward FLOPs of one block's matmuls, 3 · 2 · 12 d² · B·T.

    12 d² weights per block (QKV 3d², projection d², MLP 8d²), 2 FLOPs per weight per token
    forward and twice that backward. Left out: attention's QK^T and AV (4 B T² d forward,
    a few percent at d = 12288, T = 2048), LayerNorm, softmax, GeLU and other elementwise
    work, and any recomputation.
    """
    return 3 * 2 * 12 * n_embd**2 * tokens


def layer_time(
    config: GPTConfig | Mapping[str, Any] | int,
    batch: int,
    seq: int,
    tp: int,
    link: Link = NVLINK_H100,
    peak_flops: float = H100_BF16_PEAK_FLOPS,
    mfu: float = 0.5,
    *,
    gpus_per_node: int = 8,
    inter_link: Link = INFINIBAND_NDR,
    bytes_per_element: int = 2,
) -> dict[str, Any]:
    """Chapter 6: modelled seconds of one block's forward + backward on one rank.

    ``config`` gives d: a GPTConfig, a mapping with ``"n_embd"`` (and optionally
    ``"n_head"``), or d itself. Compute: :func:`layer_flops` / tp FLOPs at ``peak_flops``
    (FLOP/s) x ``mfu``. Communication: 4 ring all-reduces of B·T·d x ``bytes_per_element``
    bytes (2 in forward, 2 in backward), each chapter 1's
    ``predict("ring_all_reduce", n_bytes, tp, alpha, beta)``, over ``link`` while
    tp <= ``gpus_per_node`` and over ``inter_link`` beyond.

    Assumptions: a ring that spans nodes runs at its slowest hop's rate, alpha and beta
    both (every step of a ring waits for the slowest pair); each GPU has its own NIC;
    communication does not overlap compute (Megatron's tensor-parallel all-reduces sit on
    the critical path), so total = compute + communication.
    Returns ``{"compute_s", "comm_s", "total_s", "comm_share", "link"}`` (seconds; the
    share is comm_s / total_s; link is the name of the link used, "none" at tp = 1).
    """
    d = _n_embd(config)
    for name, value in (("n_embd", d), ("batch", batch), ("seq", seq), ("tp", tp)):
        _check_int(name, value)
    _check_int("gpus_per_node", gpus_per_node)
    _check_int("bytes_per_element", bytes_per_element)
    _check_positive("peak_flops", peak_flops)
    if isinstance(mfu, bool) or not isinstance(mfu, int | float) or not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1] (a fraction of the peak), got {mfu!r}")
    heads = _n_head(config)
    _check_tp_divides(tp, "n_head" if heads else "n_embd", heads or d)
    used = link if tp <= gpus_per_node else inter_link
    compute_s = layer_flops(d, batch * seq) / tp / (peak_flops * mfu)
    n_bytes = batch * seq * d * bytes_per_element
    comm_s = 4 * predict("ring_all_reduce", n_bytes, tp, used.alpha_s, used.beta)
    total_s = compute_s + comm_s
    return {"compute_s": compute_s, "comm_s": comm_s, "total_s": total_s,
            "comm_share": comm_s / total_s, "link": used.name if tp > 1 else "none"}  # fmt: skip


GPT3_175B = {"n_embd": 12288, "n_head": 96}  # [GPT-3] Table 2.1


def node_boundary_table(
    config: GPTConfig | Mapping[str, Any] | int = GPT3_175B,
    batch: int = 2,
    seq: int = 2048,
    tps: Sequence[int] = (1, 2, 4, 8, 16, 32),
    *,
    intra_link: Link = NVLINK_H100,
    inter_link: Link = INFINIBAND_NDR,
    peak_flops: float = H100_BF16_PEAK_FLOPS,
    mfu: float = 0.5,
    gpus_per_node: int = 8,
    bytes_per_element: int = 2,
) -> list[dict[str, Any]]:
    """Chapter 6: why tensor parallelism stays inside a node, as one row per tp.

    Defaults: a GPT-3 175B layer (d = 12288, 96 heads), B·T = 2 x 2048 = 4096 tokens, bf16
    (2 bytes), on H100 SXM (989.4 TFLOP/s bf16 dense, from :mod:`course_lib.cost.hardware`:
    ``H100_PEAK_SOURCE``) at 50% MFU, 8 GPUs per node on NVLink, InfiniBand NDR between.
    Each row (seconds): ``tp``, ``compute_s``; ``comm_intra_s`` and ``comm_inter_s``, the
    communication if every hop of the ring were the intra-node link (a node as large as
    tp) or the inter-node one; ``comm_s`` the one that applies (intra while tp <=
    ``gpus_per_node``); ``total_s``, ``comm_share`` (= comm_s / total_s), ``link``,
    ``inside_node`` and ``gpus_per_node``. Modelled (alpha-beta), not measured.
    """
    common = dict(peak_flops=peak_flops, mfu=mfu, bytes_per_element=bytes_per_element)
    rows = []
    for tp in tps:
        intra = layer_time(config, batch, seq, tp, intra_link, gpus_per_node=tp, **common)
        inter = layer_time(config, batch, seq, tp, inter_link, gpus_per_node=tp, **common)
        used = layer_time(config, batch, seq, tp, intra_link, gpus_per_node=gpus_per_node,
                          inter_link=inter_link, **common)  # fmt: skip
        rows.append({"tp": tp, "compute_s": used["compute_s"], "comm_intra_s": intra["comm_s"],
                     "comm_inter_s": inter["comm_s"], "comm_s": used["comm_s"],
                     "total_s": used["total_s"], "comm_share": used["comm_share"],
                     "link": used["link"], "inside_node": tp <= gpus_per_node,
                     "gpus_per_node": gpus_per_node})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------
# 4. Bytes of one whole training step, by origin (chapter 6)
# ---------------------------------------------------------------------------------------

FP32_BYTES = 4  # vocab_parallel_cross_entropy works in fp32 (or wider) whatever the logits


def _ring_bytes(algorithm: str, numel: int, tp: int, rank: int, element_bytes: int) -> int:
    """Chapter 1's exact count of one ring collective of ``numel`` elements, for ``rank``."""
    if numel == 0 or tp == 1:
        return 0
    n_bytes = numel * element_bytes
    return bytes_sent_per_rank(algorithm, n_bytes, tp, rank, element_size=element_bytes)


def sequence_parallel_grad_numel(config: GPTConfig) -> int:
    """Chapter 6: elements :func:`~course_lib.parallel.tensor_gpt.sync_sequence_parallel_grads`
    all-reduces: every parameter marked ``sequence_parallel``.

    Those are the replicated parameters that see only this rank's positions: ``ln_1`` and
    ``ln_2`` (weight, and bias with ``config.bias``) and the two row-parallel biases of
    every block, the position embedding (its whole (block_size, d) gradient, dense), and
    ``ln_f``.
    """
    d, b = config.n_embd, 1 if config.bias else 0
    per_block = 2 * (d + b * d) + 2 * b * d  # two LayerNorms, attn.c_proj and mlp.c_proj biases
    return config.n_layer * per_block + config.block_size * d + (d + b * d)


def model_comm_bytes(
    config: GPTConfig,
    batch: int,
    seq: int,
    tp: int,
    sequence_parallel: bool = False,
    bytes_per_element: int = 4,
    *,
    rank: int = 0,
    recompute_all_gather: bool = False,
) -> dict[str, int]:
    """Chapter 6: payload bytes group rank ``rank`` SENDS in one training forward + backward
    of the whole TensorParallelGPT with our ring collectives, by origin.

    Read off the code, operator by operator (n = B·T·d elements, M = B·T positions;
    "AR", "RS", "AG": ring all-reduce, reduce-scatter, all-gather):

    - ``embedding``: the ``g`` after the vocabulary-parallel lookup, AR(n) forward; with
      sequence parallelism RS(n) forward and AG(n) backward;
    - ``blocks`` (x L): two ``g`` in forward (after attention, after the MLP) and two
      ``f`` in backward (before c_attn, before c_fc), each AR(n); with SP each ``g`` is
      RS(n) forward + AG(n) backward, each ``f`` AG(n) forward + RS(n) backward;
    - ``lm_head``: its ``f``, AR(n) backward; with SP AG(n) forward + RS(n) backward;
    - ``cross_entropy`` (forward only): AG of the N x M row maxima and AR of 2M numbers
      (sum of exponentials, target logit), both fp32, with or without SP;
    - ``sequence_parallel_grads`` (SP only): one AR of
      :func:`sequence_parallel_grad_numel` elements;
    - with ``recompute_all_gather`` (SP only, Megatron-LM's way): every column-parallel
      layer (c_attn and c_fc of each block, the LM head) all-gathers its input AGAIN in
      backward, AG(n) each: 2 per block, 1 for the head.

    The backward of the embedding's ``g`` and of the cross-entropy is local. Each collective
    is chapter 1's exact per-rank count (:func:`~course_lib.cost.comm_model.bytes_sent_per_rank`):
    a ring all-reduce sends every chunk but its own in the reduce-scatter half and every
    chunk but its right neighbour's in the all-gather half, so when N does not divide the
    element count (the cross-entropy's 2M) ranks send different amounts; hence ``rank``.
    The cross-entropy's collectives run in fp32 (its softmax is computed in
    ``promote_types(dtype, float32)``), the rest in ``bytes_per_element``. Returns
    ``{"embedding", "blocks", "lm_head", "cross_entropy", "sequence_parallel_grads",
    "total"}`` in bytes; all zero at tp = 1. The optimizer step sends nothing.
    """
    for name, value in (("batch", batch), ("seq", seq), ("tp", tp)):
        _check_int(name, value)
    _check_int("bytes_per_element", bytes_per_element)
    _check_int("rank", rank, minimum=0)
    if rank >= tp:
        raise ValueError(f"rank={rank} is not a rank of a group of tp={tp}; use 0 .. {tp - 1}")
    _check_tp_divides(tp, "n_head", config.n_head)
    if sequence_parallel:
        _check_tp_divides(tp, "the sequence length seq (sequence parallelism shards it)", seq)
    elif recompute_all_gather:
        raise ValueError("recompute_all_gather needs sequence_parallel=True")
    n, m, s = batch * seq * config.n_embd, batch * seq, bytes_per_element

    def ring(algorithm: str, numel: int, element_bytes: int = s) -> int:
        return _ring_bytes(algorithm, numel, tp, rank, element_bytes)

    all_reduce = ring("ring_all_reduce", n)  # g or f on a (B, T, d) activation
    rs_ag = ring("ring_reduce_scatter", n) + ring("ring_all_gather", n)  # SP's pair
    again = ring("ring_all_gather", n) if recompute_all_gather else 0  # per column layer
    ce_bytes = max(s, FP32_BYTES)
    out = {
        "embedding": rs_ag if sequence_parallel else all_reduce,
        "blocks": config.n_layer
        * (2 * (2 * rs_ag if sequence_parallel else 2 * all_reduce) + 2 * again),
        "lm_head": (rs_ag if sequence_parallel else all_reduce) + again,
        "cross_entropy": ring("ring_all_gather", tp * m, ce_bytes)
        + ring("ring_all_reduce", 2 * m, ce_bytes),
        "sequence_parallel_grads": (
            ring("ring_all_reduce", sequence_parallel_grad_numel(config))
            if sequence_parallel
            else 0
        ),
    }
    return {**out, "total": sum(out.values())}


# ---------------------------------------------------------------------------------------
# 5. Activation memory of one tensor-parallel rank (chapter 6)
# ---------------------------------------------------------------------------------------

INDEX_BYTES = 8  # token ids and positions are int64
LSE_BYTES = 4  # the flash kernel's logsumexp is fp32 whatever the activation dtype
BOOL_BYTES = 1  # the embedding's and the loss's masks


def tp_activation_terms(
    config: GPTConfig,
    batch: int,
    seq: int,
    tp: int,
    sequence_parallel: bool = False,
    dtype_bytes: int = 4,
    *,
    recompute_all_gather: bool = False,
) -> dict[str, int]:
    """Chapter 6: bytes autograd saves on ONE rank of the TensorParallelGPT, by origin.

    The tensor-parallel twin of :func:`course_lib.cost.cost_model.activation_terms` (read
    it first): dropout 0, the CPU flash attention kernel, LayerNorm statistics in the
    activation dtype, distinct storages, parameters excluded. B = ``batch``, T = ``seq``,
    d = n_embd, h = n_head, N = ``tp``, s = ``dtype_bytes``; "/N (SP)" divides by N only
    with ``sequence_parallel``. Derived op by op from the code:

    per block (x L):
      - ``ln_1``, ``ln_2``: their inputs (2 BTd s) and mean and 1/std (4 BT s): the
        LayerNorm region, /N (SP), as in Korthikanti et al. (2022);
      - the inputs of ``c_attn`` and ``c_fc`` (2 BTd s), the LayerNorms' outputs, are
        NEVER divided: without SP every rank holds the whole (B, T, d); with SP the
        column-parallel layer all-gathers the sequence and ``F.linear`` saves the gathered
        input. With ``recompute_all_gather`` they keep the T/N shard instead and gather
        it again in backward, as Megatron-LM does: /N, and with it every term of the
        paper's sbh·34/t divides by N;
      - inside the tensor-parallel regions, /N always: q, k, v of this rank's heads
        (3 BTd s / N), the attention output (BTd s / N, also the row-parallel ``c_proj``'s
        input), the fp32 logsumexp (4 B (h/N) T), the GELU's input and output
        (8 BTd s / N, the second also ``c_proj``'s input).
    outside the blocks:
      - the vocabulary-parallel embedding saves its masked local ids (int64, 8 BT) and the
        mask of ids outside its block (bool, BT); the position embedding its positions
        (8 T, /N (SP)). Unlike the reference, the input ids themselves are not saved;
      - ``ln_f``: input and statistics, BTd s + 2 BT s, /N (SP); the LM head's input, BTd s,
        whole (all-gathered with SP, as ``c_attn``'s; /N with ``recompute_all_gather``);
      - the vocabulary-parallel cross-entropy saves this rank's softmax, (BT, V_pad/N) in
        fp32 (or wider), whether each row's target is in this rank's block (bool, BT) and
        its local column (int64, 8 BT). The targets themselves are not saved.
    Residual adds, views, the f/g operators and zero-probability dropout save nothing.
    Exact (to the byte) against
    :func:`~course_lib.cost.cost_model.measure_saved_activation_bytes` at tp = 1, 2, 4,
    with and without SP (and with ``recompute_all_gather``), for
    fp32 on CPU (tests/test_chapter6.py). On CUDA the LayerNorm statistics are fp32 and
    the attention kernel differs, as in ``activation_terms``.
    """
    if config.dropout != 0.0:
        raise ValueError(
            f"the formula assumes dropout=0 (dropout saves masks); got {config.dropout}"
        )
    for name, value in (("batch", batch), ("seq", seq), ("tp", tp)):
        _check_int(name, value)
    _check_int("dtype_bytes", dtype_bytes)
    if seq > config.block_size:
        raise ValueError(f"seq={seq} exceeds block_size={config.block_size}")
    _check_tp_divides(tp, "n_head", config.n_head)
    if sequence_parallel:
        _check_tp_divides(tp, "the sequence length seq (sequence parallelism shards it)", seq)
    elif recompute_all_gather:
        raise ValueError("recompute_all_gather needs sequence_parallel=True")
    B, T, s, N = batch, seq, dtype_bytes, tp
    d, h, L = config.n_embd, config.n_head, config.n_layer
    BT, sp = B * T, N if sequence_parallel else 1  # sp: what the LayerNorm region divides by
    kept = N if recompute_all_gather else 1  # what the column-parallel inputs divide by
    per_block = {
        "layernorm inputs (/N with SP)": 2 * BT * d * s // sp,
        "layernorm mean/rstd (/N with SP)": 2 * 2 * BT * s // sp,
        "attention and MLP inputs (whole; /N recomputing the gather)": 2 * BT * d * s // kept,
        "q, k, v (/N)": 3 * BT * d * s // N,
        "attention output (/N)": BT * d * s // N,
        "attention logsumexp (/N)": LSE_BYTES * B * (h // N) * T,
        "GELU in/out (/N)": 2 * 4 * BT * d * s // N,
    }
    terms = {f"blocks: {k}": L * v for k, v in per_block.items()}
    terms["embedding: local ids, mask"] = INDEX_BYTES * BT + BOOL_BYTES * BT
    terms["positions (/N with SP)"] = INDEX_BYTES * T // sp
    terms["final layernorm (/N with SP)"] = (BT * d * s + 2 * BT * s) // sp
    terms["LM head input (whole; /N recomputing the gather)"] = BT * d * s // kept
    vocab_shard = padded_vocab(config.vocab_size, N) // N
    terms["cross-entropy softmax shard (/N)"] = BT * vocab_shard * max(s, FP32_BYTES)
    terms["cross-entropy target mask, local ids"] = BOOL_BYTES * BT + INDEX_BYTES * BT
    return terms


def tp_activation_bytes(
    config: GPTConfig,
    batch: int,
    seq: int,
    tp: int,
    sequence_parallel: bool = False,
    dtype_bytes: int = 4,
    *,
    recompute_all_gather: bool = False,
) -> int:
    """Chapter 6: the total of :func:`tp_activation_terms`, bytes saved on one rank."""
    terms = tp_activation_terms(config, batch, seq, tp, sequence_parallel, dtype_bytes,
                                recompute_all_gather=recompute_all_gather)  # fmt: skip
    return sum(terms.values())
