"""Cost models: what training costs in bytes, FLOPs and seconds, predicted and measured.

Chapter 0 asks "why is one device not enough?" and answers with three budgets:

1. Memory of the training state: parameters, gradients and AdamW's moments, the
   16-bytes-per-parameter rule of the ZeRO paper.
2. Memory of the activations that autograd saves for the backward pass: an exact
   formula for the course's GPT, checked against what autograd really saves, and the
   Korthikanti et al. rule of thumb for large models.
3. Time: FLOPs per token times tokens, divided by what a device achieves.

Every formula here has a ``measure_*`` twin, so a chapter can print the prediction next
to the measurement. The numbered sections below stand alone; the cost of communication
(chapter 1's alpha-beta model) can follow as a section of its own.

Units: every count here is in bytes; printed and plotted memory is in binary units,
MiB = 2**20 and GiB = 2**30 bytes (``MIB``, ``GIB``), as PyTorch and nvidia-smi report
memory. Device capacities (``GPU_MEMORY``) follow the same rule: a vendor's "80 GB" of HBM
is 80 GiB; see cost/hardware.py for the reasons and the nvidia-smi figures. Decimal
``GB`` = 10**9 bytes is for rates (GB/s) only.

References
    [ZeRO]  Rajbhandari, Rasley, Ruwase, He. "ZeRO: Memory Optimizations Toward Training
            Trillion Parameter Models". SC 2020 (arXiv:1910.02054).
    [Act]   Korthikanti, Casper, Lym, McAfee, Andersch, Shoeybi, Catanzaro. "Reducing
            Activation Recomputation in Large Transformer Models". MLSys 2023
            (arXiv:2205.05198).
    [Chin]  Hoffmann et al. "Training Compute-Optimal Large Language Models" (Chinchilla).
            NeurIPS 2022 (arXiv:2203.15556).
    [Llama2] Touvron et al. "Llama 2: Open Foundation and Fine-Tuned Chat Models".
            arXiv:2307.09288, 2023.
    [OPT]   Zhang et al. "OPT: Open Pre-trained Transformer Language Models".
            arXiv:2205.01068, 2022.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

# Chapter 1's alpha-beta (latency-bandwidth) communication model lives in comm_model;
# re-exported so every cost of the course is reachable from cost_model.
from course_lib.cost.comm_model import (  # noqa: F401
    alpha_beta_terms,
    bytes_sent_per_rank,
    fit_alpha_beta,
    predict,
)

# Every GPU number (peak FLOP/s, memory sizes) lives in the one table of hardware.py;
# re-exported here under the names chapter 0's notebook uses (cm.GPU_MEMORY, ...).
from course_lib.cost.hardware import (  # noqa: F401
    A100_PEAK_BF16_FLOPS,
    CONSUMER_GPU_BYTES,
    GB,
    GIB,
    GPU_MEMORY,
    H100_BYTES,
    H100_PEAK_BF16_FLOPS,
    H200_BYTES,
    MIB,
    NVIDIA_SMI_TOTAL_MIB,
)
from course_lib.memory import held_bytes, state_bytes
from course_lib.model import GPTConfig, loss_fn

SECONDS_PER_DAY = 86_400


def _check_nonnegative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


# ---------------------------------------------------------------------------------------
# 1. Memory of the training state: parameters, gradients, optimizer (chapter 0)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of one training replica, by kind (chapter 0).

    ``optimizer`` holds everything the optimizer keeps between steps: AdamW's two
    moments and, in mixed precision, the fp32 master copy of the weights ([ZeRO]'s K).
    """

    params: int  # bytes of the weights the forward pass reads
    grads: int  # bytes of the .grad tensors
    optimizer: int  # bytes of optimizer state (Adam m, v; fp32 master weights if mixed)
    activations: int = 0  # bytes saved by autograd for the backward pass

    @property
    def total(self) -> int:
        """Sum of the four parts, in bytes."""
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer: [ZeRO]'s "model states", in bytes."""
        return self.params + self.grads + self.optimizer

    def as_gib(self) -> dict[str, float]:
        """The parts and the total in GiB (2**30 bytes)."""
        parts = ("params", "grads", "optimizer", "activations", "total")
        return {name: getattr(self, name) / GIB for name in parts}

    def format_gib(self, digits: int = 2) -> str:
        """One line, e.g. ``params 0.23 GiB + grads 0.23 + optimizer 0.46 + ... = 0.93 GiB``."""
        g = self.as_gib()
        return (
            f"params {g['params']:.{digits}f} GiB + grads {g['grads']:.{digits}f} + "
            f"optimizer {g['optimizer']:.{digits}f} + activations {g['activations']:.{digits}f}"
            f" = {g['total']:.{digits}f} GiB"
        )


@dataclass(frozen=True)
class BytesPerParam:
    """Bytes each parameter costs in AdamW training, by kind (chapter 0)."""

    param: int  # the weight the forward pass reads (4 in fp32, 2 in bf16/fp16)
    grad: int  # its gradient, in the same dtype as the weight
    optimizer: int  # Adam's first and second moments m and v, fp32: 4 + 4
    master: int  # fp32 master copy of the weight in mixed precision, else 0

    @property
    def total(self) -> int:
        return self.param + self.grad + self.optimizer + self.master


# [ZeRO] section 3.1: mixed-precision Adam keeps fp16 params and grads (2 + 2 bytes) and
# K = 12 bytes of fp32 state (master weights, momentum, variance): 16 bytes per parameter.
# Plain fp32 training needs no master copy and lands on the same 16 bytes: 4 + 4 + 8.
PRECISIONS: dict[str, BytesPerParam] = {
    "fp32": BytesPerParam(param=4, grad=4, optimizer=8, master=0),
    "mixed": BytesPerParam(param=2, grad=2, optimizer=8, master=4),
}


def training_memory(
    n_params: int,
    *,
    param_bytes: int = 4,
    grad_bytes: int = 4,
    optimizer_bytes_per_param: int = 8,
    master_bytes: int = 0,
    activations: int = 0,
) -> MemoryBreakdown:
    """Bytes to train a model of ``n_params`` parameters with AdamW (chapter 0).

    The AdamW rule, as in [ZeRO] section 3.1: every parameter carries its weight
    (``param_bytes``), its gradient (``grad_bytes``), Adam's two moments
    (``optimizer_bytes_per_param``, fp32 m and v: 8) and, in mixed precision, an fp32
    master copy (``master_bytes``: 4). The master copy is reported as optimizer state,
    so that ``optimizer`` is [ZeRO]'s ``K * n_params``. The defaults are fp32 training,
    4 + 4 + 8 = 16 bytes per parameter; mixed precision is 2 + 2 + (4 + 8) = 16 too.
    ``activations`` (bytes) is added as given; see :func:`activation_bytes`.
    """
    for name, value in (
        ("n_params", n_params),
        ("param_bytes", param_bytes),
        ("grad_bytes", grad_bytes),
        ("optimizer_bytes_per_param", optimizer_bytes_per_param),
        ("master_bytes", master_bytes),
        ("activations", activations),
    ):
        _check_nonnegative_int(name, value)
    return MemoryBreakdown(
        params=n_params * param_bytes,
        grads=n_params * grad_bytes,
        optimizer=n_params * (optimizer_bytes_per_param + master_bytes),
        activations=activations,
    )


def training_memory_preset(
    n_params: int, precision: str = "fp32", *, activations: int = 0
) -> MemoryBreakdown:
    """:func:`training_memory` with the bytes of a named precision from ``PRECISIONS``.

    Chapter 0. ``"fp32"``: 4 + 4 + 8 bytes per parameter. ``"mixed"``: bf16 weights and
    gradients, fp32 master weights and Adam moments, 2 + 2 + 12 ([ZeRO]'s K = 12).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    b = PRECISIONS[precision]
    return training_memory(
        n_params,
        param_bytes=b.param,
        grad_bytes=b.grad,
        optimizer_bytes_per_param=b.optimizer,
        master_bytes=b.master,
        activations=activations,
    )


def max_params_that_fit(device_bytes: int, bytes_per_param: int = 16) -> int:
    """Largest parameter count whose model states fit in ``device_bytes`` (chapter 0)."""
    _check_nonnegative_int("device_bytes", device_bytes)
    _check_positive("bytes_per_param", bytes_per_param)
    return int(device_bytes // bytes_per_param)


# ---------------------------------------------------------------------------------------
# 2. Activation memory: what autograd saves for the backward pass (chapter 0)
# ---------------------------------------------------------------------------------------

INDEX_BYTES = 8  # token ids and positions are int64
LSE_BYTES = 4  # the flash kernel's logsumexp is fp32 whatever the activation dtype


def activation_terms(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    dtype_bytes: int = 4,
    *,
    attention: str = "flash",
) -> dict[str, int]:
    """Bytes autograd saves in a training forward of ``GPT(config)``, by origin (chapter 0).

    Derived op by op from what each backward needs, for dropout 0 (the course's models).
    With B = ``batch_size``, T = ``seq_len``, d = n_embd, h = n_head, s = ``dtype_bytes``:

    per block (x L), 16 B T d s in all plus small terms:
      - ``ln_1``/``ln_2`` save their input (2 BTd s) and mean and 1/std (2 x 2 BT s;
        in the activation dtype on CPU; CUDA keeps these two in fp32);
      - ``c_attn`` saves its input, the output of ``ln_1`` (BTd s);
      - q, k, v are views of one qkv tensor; attention saves all three: 3 BTd s;
      - attention saves its output (BTd s). ``attention="flash"`` (the CPU default,
        ``_scaled_dot_product_flash_attention_for_cpu``) also saves the fp32 logsumexp
        (4 BhT) and lays the output out as (B, T, h, d/h), so the attention projection's
        input is the same storage, not a copy. ``attention="math"`` (forced with
        ``sdpa_kernel(SDPBackend.MATH)``) saves the T x T attention probabilities,
        B h T^2 s, instead of the logsumexp; its q, k, v are scaled copies and its output
        is copied by ``.contiguous()``, which leaves the count of BTd terms the same,
        except at B = 1, where v is a view of the whole qkv tensor and keeps it alive
        next to the copies of q and k (2 BTd s more). The math terms are for fp32: on
        CPU the math backend computes bf16 attention in fp32;
      - MLP: ``c_fc`` input (BTd s), GELU input (4 BTd s), second ``c_proj`` input (4 BTd s).
    outside the blocks:
      - token ids, positions and targets (int64): 8 BT + 8 T + 8 BT, counting inputs and
        targets as two contiguous tensors (``get_batch`` returns two views of one
        (B, T+1) buffer, which a storage count sees as 8 B(T+1) plus a copy of the targets);
      - ``ln_f`` (BTd s + 2 BT s), the LM head's input (BTd s);
      - cross-entropy: log-softmax output (B T V s) and a scalar total weight (s).
    Residual adds, views, transposes and zero-probability dropout save nothing.
    :func:`measure_saved_activation_bytes` checks every byte of this.
    """
    if attention not in ("flash", "math"):
        raise ValueError(f"attention must be 'flash' or 'math', got {attention!r}")
    if config.dropout != 0.0:
        raise ValueError(
            f"the formula assumes dropout=0 (dropout saves masks); got {config.dropout}"
        )
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if seq_len > config.block_size:
        raise ValueError(f"seq_len={seq_len} exceeds block_size={config.block_size}")
    _check_positive("dtype_bytes", dtype_bytes)
    B, T, s = batch_size, seq_len, dtype_bytes
    d, h, L, V = config.n_embd, config.n_head, config.n_layer, config.vocab_size
    BT = B * T
    if attention == "flash":
        attn_extra = LSE_BYTES * B * h * T  # logsumexp, (B, h, T) fp32
    else:
        attn_extra = B * h * T * T * s  # softmax probabilities, (B, h, T, T)
    qkv = 5 if (attention == "math" and B == 1) else 3  # see the docstring
    per_block = {
        "layernorm inputs": 2 * BT * d * s,
        "layernorm mean/rstd": 2 * 2 * BT * s,
        "attention input, q, k, v": (1 + qkv) * BT * d * s,
        "attention output": BT * d * s,
        "attention softmax (lse or T x T)": attn_extra,
        "MLP input, GELU in/out": (1 + 4 + 4) * BT * d * s,
    }
    terms = {f"blocks: {k}": L * v for k, v in per_block.items()}
    terms["token ids, positions, targets"] = INDEX_BYTES * (BT + T + BT)
    terms["final layernorm + LM head input"] = 2 * BT * d * s + 2 * BT * s
    terms["cross-entropy log-probs"] = BT * V * s + s
    return terms


def activation_bytes(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    dtype_bytes: int = 4,
    *,
    attention: str = "flash",
) -> int:
    """Bytes autograd saves for one forward of ``GPT(config)`` on (B, T) tokens (chapter 0).

    About ``L * 16 * B * T * d * dtype_bytes`` plus the logits' log-softmax; the full
    derivation is in :func:`activation_terms`. ``attention="math"`` adds the
    ``B * n_head * T^2`` attention probabilities that the math SDPA backend keeps.
    """
    return sum(
        activation_terms(config, batch_size, seq_len, dtype_bytes, attention=attention).values()
    )


def korthikanti_activation_bytes(
    n_layer: int,
    seq_len: int,
    batch_size: int,
    hidden: int,
    n_heads: int,
    *,
    selective_recompute: bool = False,
) -> int:
    """The rule of thumb of [Act] (eq. 1): ``L * s b h (34 + 5 a s / h)`` bytes, 16-bit.

    Chapter 0. The paper's estimate for a GPT layer trained in 16-bit without
    recomputation or parallelism: 34 s b h for the matmul inputs, LayerNorms, GELU and
    dropout masks, plus 5 a s^2 b for the attention scores, softmax and its dropout
    mask (a = heads, s = sequence, b = micro-batch, h = hidden). With
    ``selective_recompute`` the attention core is recomputed and the 5 a s / h term goes
    (the paper's section 5), which is also what a flash-attention kernel saves.
    Embeddings, the LM head and the loss are not in it.
    """
    sizes = {"n_layer": n_layer, "seq_len": seq_len, "batch_size": batch_size}
    sizes |= {"hidden": hidden, "n_heads": n_heads}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    sbh = seq_len * batch_size * hidden
    scores = 0 if selective_recompute else 5 * n_heads * seq_len * seq_len * batch_size
    return n_layer * (34 * sbh + scores)


def growth_exponents(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """The exponent k of ``y ~ x**k`` between each pair of neighbouring points (chapter 0).

    ``log(y[i+1] / y[i]) / log(x[i+1] / x[i])``: the slope of the curve on log-log axes.
    Chapter 0 reads it off the activation sweep: about 1 for the flash kernel, tending
    to 2 for the math kernel's T x T term.
    """
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need two or more (x, y) points of equal count, got {len(xs)}, {len(ys)}")
    if any(not v > 0 for v in (*xs, *ys)):
        raise ValueError("growth exponents need positive x and y (they are logarithms)")
    pairs = zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False)
    return [math.log(y1 / y0) / math.log(x1 / x0) for (x0, y0), (x1, y1) in pairs]


# ---------------------------------------------------------------------------------------
# 3. Measuring memory: bytes the tensors really hold (chapter 0)
# ---------------------------------------------------------------------------------------


def measure_saved_activation_bytes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = loss_fn,
) -> int:
    """Bytes of the distinct storages autograd saves in ``criterion(model(x), y)`` (chapter 0).

    ``criterion`` is :func:`~course_lib.model.loss_fn`, or chapter 6's vocabulary-parallel
    loss (``tp_model.loss``) for a tensor-parallel model, where the call is a collective.

    Runs the forward under ``torch.autograd.graph.saved_tensors_hooks``; every tensor
    an op saves for backward passes through the pack hook. Several saved tensors can be
    views of one storage (q, k and v of one qkv tensor), so the count is
    :func:`course_lib.memory.held_bytes`'s: each storage once, at its full size. Storages
    of the model's parameters are left out: they are model state, not activations. The
    saved tensors are kept referenced until the count is done so no address is reused.
    No backward runs; the graph is freed on return.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = criterion(model(x), y)  # the loss is part of the measured graph
    del loss
    total = held_bytes(saved)
    saved.clear()
    return total


def measure_model_state_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, include_step: bool = False
) -> MemoryBreakdown:
    """Bytes the parameters, their gradients and the optimizer's state really hold (chapter 0).

    The course's one way to measure (:mod:`course_lib.memory`, as every strategy's
    ``memory_bytes``): :func:`~course_lib.memory.held_bytes` of the parameters (a tied
    weight is one storage, counted once) and of the gradients that exist, and
    :func:`~course_lib.memory.state_bytes` of the optimizer: after one step AdamW holds
    ``exp_avg`` and ``exp_avg_sq`` (the m and v of :func:`training_memory`). AdamW also
    keeps a ``step`` counter per parameter tensor, a 0-d fp32 tensor on CPU: 4 bytes per
    tensor (200 bytes for a 4-layer GPT), which does not grow with the model. Such 0-d
    counters are left out unless ``include_step``, so that the measurement can equal the
    per-parameter formula exactly.
    """
    params = list(model.parameters())
    optimizer_bytes = 0
    if optimizer is not None:
        optimizer_bytes = state_bytes(optimizer)
        if include_step:  # state_bytes leaves out the 0-d per-tensor counters
            counters = [t for s in optimizer.state.values() for t in s.values()]
            optimizer_bytes += sum(
                t.element_size() for t in counters if torch.is_tensor(t) and t.dim() == 0
            )
    return MemoryBreakdown(
        params=held_bytes(params),
        grads=held_bytes(p.grad for p in params),
        optimizer=optimizer_bytes,
    )


# ---------------------------------------------------------------------------------------
# 4. Presets: models and devices (chapter 0)
# ---------------------------------------------------------------------------------------


def tiny_gpt_config() -> GPTConfig:
    """The course's tiny GPT: 4 layers, d 128, 4 heads, context 64, byte vocabulary."""
    return GPTConfig()


def gpt2_small_config() -> GPTConfig:
    """GPT-2 small (Radford et al. 2019): 12 layers, d 768, 12 heads, context 1024,
    50257 BPE tokens, tied embeddings: 124,439,808 parameters in our GPT."""
    return GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


@dataclass(frozen=True)
class ModelShape:
    """A published model, by size and shape, for the chapter 0 tables (chapter 0)."""

    name: str  # what the chapter calls it
    n_params: int  # nominal parameter count, N
    n_layer: int  # transformer layers, L
    hidden: int  # width of the residual stream, h (d)
    n_heads: int  # attention heads, a
    seq_len: int  # training context length, s
    source: str  # where the shape is published

    def activation_bytes(self, batch_size: int = 1, *, selective_recompute: bool = False) -> int:
        """16-bit activations by the rule of thumb of [Act], at the full context length."""
        shape = (self.n_layer, self.seq_len, batch_size, self.hidden, self.n_heads)
        return korthikanti_activation_bytes(*shape, selective_recompute=selective_recompute)


# Nominal sizes (the names say 1.3B, 7B, ...); the shapes are the published ones. Llama-2
# uses SwiGLU MLPs and (70B) grouped-query attention, so the GPT-layer activation rule of
# [Act] is an estimate for it, as it is for any model.
MODEL_SHAPES: tuple[ModelShape, ...] = (
    ModelShape("1.3B (OPT-1.3B)", 1_300_000_000, 24, 2048, 32, 2048, "[OPT] Table 1"),
    ModelShape("7B (Llama-2-7B)", 7_000_000_000, 32, 4096, 32, 4096, "[Llama2] Table 1, A.2"),
    ModelShape("13B (Llama-2-13B)", 13_000_000_000, 40, 5120, 40, 4096, "[Llama2]"),
    ModelShape("70B (Llama-2-70B)", 70_000_000_000, 80, 8192, 64, 4096, "[Llama2]"),
)

# Devices (GPU_MEMORY, H100_BYTES, peak FLOP/s): imported above from cost/hardware.py.


# ---------------------------------------------------------------------------------------
# 5. Time: FLOPs over FLOP/s (chapter 0)
# ---------------------------------------------------------------------------------------


def flops_per_token_6n(n_params: int) -> int:
    """6N FLOPs per token (forward 2N + backward 4N), for models known only by size.

    Chapter 0. :func:`course_lib.model.flops_per_token` adds the attention term
    12 L d T when the shape is known.
    """
    _check_nonnegative_int("n_params", n_params)
    return 6 * n_params


def chinchilla_tokens(n_params: int) -> int:
    """Compute-optimal training tokens: about 20 per parameter, as Chinchilla's own
    70B parameters on 1.4T tokens ([Chin])."""
    _check_nonnegative_int("n_params", n_params)
    return 20 * n_params


def training_time_seconds(
    total_tokens: float,
    flops_per_token: float,
    peak_flops: float,
    mfu: float = 1.0,
    n_devices: int = 1,
) -> float:
    """Wall-clock seconds to train on ``total_tokens`` (chapter 0).

    ``time = total_tokens * flops_per_token / (peak_flops * mfu * n_devices)``.
    ``mfu`` (model FLOPs utilisation) is the fraction of the peak the model's FLOPs
    actually run at; pass a measured FLOP/s as ``peak_flops`` with ``mfu=1``. Devices
    are assumed to scale perfectly (no communication, no bubbles): a lower bound that
    later chapters measure against.
    """
    _check_positive("total_tokens", total_tokens)
    _check_positive("flops_per_token", flops_per_token)
    _check_positive("peak_flops", peak_flops)
    _check_positive("mfu", mfu)
    if mfu > 1:
        raise ValueError(f"mfu is a fraction of the peak, in (0, 1]; got {mfu}")
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be an integer >= 1, got {n_devices!r}")
    return total_tokens * flops_per_token / (peak_flops * mfu * n_devices)


def training_time_days(
    total_tokens: float,
    flops_per_token: float,
    peak_flops: float,
    mfu: float = 1.0,
    n_devices: int = 1,
) -> float:
    """:func:`training_time_seconds` in days (chapter 0)."""
    return training_time_seconds(total_tokens, flops_per_token, peak_flops, mfu, n_devices) / (
        SECONDS_PER_DAY
    )


def format_days(days: float) -> str:
    """A duration in days as a short human unit: "17 s", "5.2 h", "16.8 days", "47 years"."""
    if not days >= 0:
        raise ValueError(f"days must be >= 0, got {days!r}")
    seconds = days * SECONDS_PER_DAY
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if days < 1:
        return f"{days * 24:.1f} h"
    if days < 2 * 365:
        return f"{days:,.1f} days"
    years = days / 365
    return f"{years:.1f} years" if years < 10 else f"{years:,.0f} years"


def measure_step_seconds(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    n_steps: int = 5,
    warmup: int = 1,
) -> list[float]:
    """Wall-clock seconds of ``n_steps`` training steps on one batch (chapter 0).

    A step is forward, backward and ``optimizer.step()``; ``warmup`` untimed steps come
    first (allocator and kernel warm-up). Divide ``flops_per_token * x.numel()`` by a
    step time for the achieved FLOP/s.
    """
    if n_steps < 1 or warmup < 0:
        raise ValueError(f"need n_steps >= 1 and warmup >= 0, got {n_steps}, {warmup}")
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + n_steps):
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times
