"""The one table of GPU facts the course quotes: peak FLOP/s, memory, and MFU.

Every GPU number in the course comes from here (``cost_model`` re-exports the ones
chapter 0's notebook uses by name): peak FLOP/s per dtype (:func:`peak_flops`) and
memory sizes (:data:`GPU_MEMORY`). Chapter 0 turns a measured tokens/s into MFU: the
fraction of the card's peak that the model's useful FLOPs (``model.flops_per_token``)
reach,

    MFU = flops_per_token * tokens_per_s / peak_flops.

Every number below is the *dense* peak from NVIDIA's datasheet (or architecture
whitepaper for GeForce cards), in TFLOP/s. Datasheets print the tensor-core figures
"with sparsity" (2:4 structured sparsity, which dense training never uses); those are
exactly twice the dense ones and are halved here. bf16/fp16 are with fp32 accumulation,
which is what PyTorch's matmuls use. "tf32" is the tensor-core rate that fp32 matmuls get
under ``torch.set_float32_matmul_precision('high')``; "fp32" is the plain CUDA-core rate.
SXM/NVL/PCIe parts of one chip differ in clocks and power, hence in peak.

The H100 SXM row (and its same-die, same-clock siblings H200 SXM, H800 SXM, GH200) is
the Hopper whitepaper's unrounded figure, 989.4 TFLOP/s bf16 dense = 132 SMs x 4 tensor
cores x 1024 FLOP/clock x 1.83 GHz; the datasheet's "1,979 teraFLOPS" with sparsity is
twice that, rounded (halving it would give 989.5, a rounding artefact).

Units: memory (device capacities, tensor bytes) is in binary units, MiB = 2**20 and
GiB = 2**30 bytes, as PyTorch and nvidia-smi count it; a vendor's nominal "80 GB" of HBM
is taken as 80 GiB (the reasons and the nvidia-smi figures are in the Memory section).
Rates are decimal: ``GB`` = 10**9 bytes, used only for GB/s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPUPeak:
    """Dense peak throughput of one GPU model, in TFLOP/s (None: no such tensor-core mode)."""

    name: str  # canonical product name, e.g. "H100 SXM"
    bf16: float | None  # bf16 tensor cores, fp32 accumulate
    fp16: float | None  # fp16 tensor cores, fp32 accumulate
    tf32: float | None  # tf32 tensor cores (fp32 matmuls with TF32 allowed)
    fp32: float  # fp32 on CUDA cores, no tensor cores
    source: str  # where the numbers come from


_DS = "NVIDIA datasheet, sparse figures halved"
# H100 SXM5 dense, NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), Table 3:
# bf16 = fp16 = 989.4 (datasheet: 1,979 with sparsity), tf32 494.7, fp32 66.9 TFLOP/s.
_HOPPER_WP = "NVIDIA H100 whitepaper Table 3 (H100 SXM5), dense"
# Ordered: the first pattern that matches the normalised device name wins, so the more
# specific variants (PCIe, NVL) come before the bare chip name (which means SXM).
_TABLE: tuple[tuple[str, GPUPeak], ...] = (
    (r"\bb200\b", GPUPeak("B200", 2250.0, 2250.0, 1100.0, 75.0, "HGX B200 datasheet, per GPU")),
    (r"\bgh200\b", GPUPeak("GH200", 989.4, 989.4, 494.7, 66.9, _HOPPER_WP)),
    (r"\bh200\b.*\bnvl\b", GPUPeak("H200 NVL", 835.5, 835.5, 417.5, 60.0, _DS)),
    (r"\bh200\b", GPUPeak("H200 SXM", 989.4, 989.4, 494.7, 66.9, _HOPPER_WP)),  # H100 SXM's die
    (r"\bh100\b.*\bnvl\b", GPUPeak("H100 NVL", 835.5, 835.5, 417.5, 60.0, _DS)),
    (r"\bh100\b.*\bpcie\b", GPUPeak("H100 PCIe", 756.5, 756.5, 378.0, 51.0, _DS)),
    (r"\bh100\b", GPUPeak("H100 SXM", 989.4, 989.4, 494.7, 66.9, _HOPPER_WP)),  # "H100 80GB HBM3"
    (r"\bh800\b.*\bpcie\b", GPUPeak("H800 PCIe", 756.5, 756.5, 378.0, 51.0, _DS)),
    (r"\bh800\b", GPUPeak("H800 SXM", 989.4, 989.4, 494.7, 66.9, _HOPPER_WP)),
    (r"\ba100\b", GPUPeak("A100", 312.0, 312.0, 156.0, 19.5, _DS)),  # SXM and PCIe alike
    (r"\ba40\b", GPUPeak("A40", 149.7, 149.7, 74.8, 37.4, _DS)),
    (r"\ba30\b", GPUPeak("A30", 165.0, 165.0, 82.0, 10.3, _DS)),
    (r"\ba10\b", GPUPeak("A10", 125.0, 125.0, 62.5, 31.2, _DS)),  # not "A10G" (AWS part)
    (r"\bl40s\b", GPUPeak("L40S", 362.05, 362.05, 183.0, 91.6, _DS)),
    (r"\bl40\b", GPUPeak("L40", 181.0, 181.0, 90.5, 90.5, _DS)),
    (r"\bl4\b", GPUPeak("L4", 121.0, 121.0, 60.0, 30.3, _DS)),
    (r"\brtx 4090\b", GPUPeak("RTX 4090", 165.2, 165.2, 82.6, 82.6, "Ada whitepaper")),
    (r"\brtx 3090\b", GPUPeak("RTX 3090", 71.0, 71.0, 35.6, 35.6, "Ampere GA102 whitepaper")),
    # Volta and Turing have fp16 tensor cores but no bf16 (autocast to bf16 is emulated).
    (r"\bv100\b.*\bpcie\b", GPUPeak("V100 PCIe", None, 112.0, None, 14.0, _DS)),
    (r"\bv100\b", GPUPeak("V100 SXM2", None, 125.0, None, 15.7, _DS)),
    (r"\bt4\b", GPUPeak("T4", None, 65.0, None, 8.1, _DS)),
)

_DTYPE_KEYS = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "tf32": "tf32",
    "fp32": "fp32",
    "float32": "fp32",
}


def _normalise(device_name: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'nvidia a100 sxm4 80gb': lower case, one space between words."""
    return " ".join(re.sub(r"[-_/()]", " ", device_name.lower()).split())


def lookup_gpu(device_name: str) -> GPUPeak | None:
    """The table entry for a ``torch.cuda.get_device_name()`` string, or None (chapter 0).

    Matching is on whole words of the lower-cased name, so "NVIDIA H100 80GB HBM3" is the
    SXM part, "NVIDIA H100 PCIe" the PCIe one, and "NVIDIA A100-SXM4-40GB" an A100 (never
    an A10). A MIG slice reports its parent's name; its peak is a fraction of the table's.
    """
    name = _normalise(device_name)
    for pattern, peak in _TABLE:
        if re.search(pattern, name):
            return peak
    return None


def peak_flops(device_name: str, dtype: torch.dtype | str = torch.bfloat16) -> float | None:
    """Dense peak FLOP/s (not TFLOP/s) of a GPU for a dtype; None if unknown (chapter 0).

    ``dtype`` is a torch dtype (bfloat16, float16, float32) or one of the strings "bf16",
    "fp16", "tf32", "fp32". ``torch.float32`` means plain fp32 on CUDA cores; pass "tf32"
    for fp32 matmuls run with TF32 allowed. None when the device is not in the table or
    has no tensor cores for that dtype (bf16 on a V100).
    """
    key = _DTYPE_KEYS.get(dtype)
    if key is None:
        raise ValueError(
            f"no peak for dtype {dtype!r}; use torch.bfloat16, torch.float16, torch.float32 "
            "or one of 'bf16', 'fp16', 'tf32', 'fp32'"
        )
    peak = lookup_gpu(device_name)
    if peak is None:
        return None
    tflops = getattr(peak, key)
    return None if tflops is None else tflops * 1e12


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak FLOP/s (chapter 0).

    ``flops_per_token`` counts forward + backward (``model.flops_per_token``, 6N + 12LdT),
    ``peak`` is in FLOP/s (``peak_flops``). Recomputation, if any, is not counted: MFU
    measures useful work, unlike hardware FLOPs utilisation (HFU).
    """
    if peak <= 0:
        raise ValueError(f"peak must be > 0 FLOP/s, got {peak}")
    if flops_per_token < 0 or tokens_per_s < 0:
        raise ValueError(
            f"flops_per_token and tokens_per_s must be >= 0, got {flops_per_token}, {tokens_per_s}"
        )
    return flops_per_token * tokens_per_s / peak


# ---------------------------------------------------------------------------------------
# Memory: the device sizes chapters 0 and 3 compare the training state with
# ---------------------------------------------------------------------------------------
#
# The course's units. Bytes held in memory (tensor bytes, training state, device
# capacities) are counted in BINARY units, as PyTorch (``total_memory``,
# ``memory_allocated``) and nvidia-smi (MiB) count them: 1 MiB = 2**20 bytes,
# 1 GiB = 2**30 bytes, and figures label them "MiB"/"GiB". Rates (link bandwidth) are
# DECIMAL, GB/s = 10**9 bytes/s, as vendors and nccl-tests quote them: ``GB`` is for rates
# only, never for a capacity.
#
# A vendor's "80 GB" of HBM is binary in practice: memory chips come in powers of two, and
# an A100 80GB reports exactly 81,920 MiB = 80 GiB. We therefore take each nominal
# capacity as GiB. Where some memory is reserved, nvidia-smi shows a little less: public
# nvidia-smi outputs show 81,559 MiB (79.6 GiB) on an H100 80GB HBM3 and 143,771 MiB
# (140.4 GiB) on an H200, both within 0.5% of the nominal GiB. Read as decimal GB, the
# H200's "141 GB" would be 131.3 GiB, 7% less than the card really has. These nvidia-smi
# figures are an assumption taken from public reports, not measured by this course.

MIB = 2**20  # bytes in a mebibyte
GIB = 2**30  # bytes in a gibibyte; every "GiB" in the course is 2**30 bytes
GB = 10**9  # bytes in a decimal gigabyte: for rates (GB/s) only, as vendors quote links

CONSUMER_GPU_BYTES = 24 * GIB  # RTX 3090 / 4090 class: 24 GiB of GDDR6X
H100_BYTES = 80 * GIB  # H100 SXM "80 GB" HBM3: 80 GiB (nvidia-smi: 81,559 MiB = 79.6 GiB)
H200_BYTES = 141 * GIB  # H200 "141 GB" HBM3e: 141 GiB (nvidia-smi: 143,771 MiB = 140.4 GiB)


# Figure labels carry the capacity in the course's unit; tests check label == bytes / GIB.
GPU_MEMORY: dict[str, int] = {
    "24 GiB consumer GPU": CONSUMER_GPU_BYTES,
    "H100 (80 GiB)": H100_BYTES,
    "H200 (141 GiB)": H200_BYTES,
}

# What nvidia-smi's memory.total reports (MiB), from public nvidia-smi outputs (assumed).
NVIDIA_SMI_TOTAL_MIB: dict[str, int] = {
    "H100 (80 GiB)": 81_559,
    "H200 (141 GiB)": 143_771,
}

# The two peaks chapter 0 quotes by name, read from the table above (FLOP/s).
H100_PEAK_BF16_FLOPS = peak_flops("H100 SXM", "bf16")  # 989.4e12
A100_PEAK_BF16_FLOPS = peak_flops("A100", "bf16")  # 312e12
