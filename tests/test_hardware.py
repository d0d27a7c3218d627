"""Peak FLOP/s table and MFU (chapter 0)."""

import re

import pytest
import torch

from course_lib.cost import cost_model, hardware
from course_lib.cost.hardware import lookup_gpu, mfu, peak_flops
from course_lib.model import GPTConfig, flops_per_token


@pytest.mark.parametrize(
    "device_name, canonical, bf16_tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", "GH200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA A10", "A10", 125.0),
        ("NVIDIA L4", "L4", 121.0),
        ("NVIDIA L40S", "L40S", 362.05),
        ("NVIDIA L40", "L40", 181.0),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
        ("NVIDIA GeForce RTX 3090", "RTX 3090", 71.0),
        ("nvidia h100 80gb hbm3", "H100 SXM", 989.4),  # case does not matter
    ],
)
def test_device_names_match_their_dense_bf16_peak(device_name, canonical, bf16_tflops):
    assert lookup_gpu(device_name).name == canonical
    assert peak_flops(device_name, torch.bfloat16) == pytest.approx(bf16_tflops * 1e12)


def test_a100_is_not_an_a10_and_l40s_is_not_an_l40():
    assert lookup_gpu("NVIDIA A10").name == "A10"
    assert lookup_gpu("NVIDIA A100-SXM4-40GB").name == "A100"
    assert lookup_gpu("NVIDIA L40S").name == "L40S"
    assert lookup_gpu("NVIDIA L4").name == "L4"


@pytest.mark.parametrize("name", ["CPU", "NVIDIA A10G", "AMD Instinct MI300X", "", "NVIDIA H1000"])
def test_unknown_device_has_no_peak(name):
    assert lookup_gpu(name) is None
    assert peak_flops(name, torch.bfloat16) is None


def test_dtypes_select_the_right_column():
    h100 = "NVIDIA H100 80GB HBM3"
    assert peak_flops(h100, "bf16") == peak_flops(h100, torch.bfloat16) == 989.4e12
    assert peak_flops(h100, torch.float16) == 989.4e12
    assert peak_flops(h100, "tf32") == pytest.approx(494.7e12)
    assert peak_flops(h100, torch.float32) == pytest.approx(66.9e12)
    assert peak_flops(h100) == 989.4e12  # bf16 by default
    # Volta has no bf16 tensor cores: no peak rather than a wrong one.
    assert peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None
    assert peak_flops("Tesla V100-SXM2-16GB", torch.float16) == 125e12


def test_tensor_core_peaks_exceed_cuda_core_fp32_where_both_exist():
    for name in ["NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "NVIDIA H200"]:
        assert peak_flops(name, "bf16") > peak_flops(name, "tf32") >= peak_flops(name, "fp32")


def test_unsupported_dtype_is_refused():
    with pytest.raises(ValueError, match="no peak for dtype"):
        peak_flops("NVIDIA H100 PCIe", torch.int8)


def test_mfu_arithmetic():
    assert mfu(1e9, 1e5, 1e15) == pytest.approx(0.1)
    assert mfu(0, 1e5, 1e15) == 0.0
    # GPT-2 small at T=1024 is ~854 MFLOP/token: 500k tokens/s on an H100 SXM is ~43%.
    fpt = flops_per_token(
        GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    )
    peak = peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert mfu(fpt, 500_000, peak) == pytest.approx(fpt * 500_000 / 989.4e12)
    assert 0.42 < mfu(fpt, 500_000, peak) < 0.44


def test_mfu_refuses_bad_inputs():
    with pytest.raises(ValueError, match="peak must be > 0"):
        mfu(1e9, 1e5, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        mfu(1e9, -1.0, 1e15)


def test_h100_sxm_peak_is_the_whitepapers_unrounded_figure():
    # 132 SMs x 4 tensor cores x 1024 bf16 FLOP/clock x 1.83 GHz; the datasheet's
    # "1,979 teraFLOPS" with sparsity is twice this, rounded.
    assert round(132 * 4 * 1024 * 1.83e9 / 1e12, 1) == lookup_gpu("NVIDIA H100 80GB HBM3").bf16
    assert round(2 * lookup_gpu("NVIDIA H100 80GB HBM3").bf16) == 1979


def test_named_constants_are_read_from_the_one_table():
    assert cost_model.H100_PEAK_BF16_FLOPS == peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert cost_model.A100_PEAK_BF16_FLOPS == peak_flops("NVIDIA A100-SXM4-80GB", "bf16")
    assert cost_model.GPU_MEMORY is hardware.GPU_MEMORY
    assert cost_model.H100_BYTES == hardware.GPU_MEMORY["H100 (80 GiB)"] == 80 * 2**30
    assert cost_model.GIB == hardware.GIB == 2**30


def test_device_capacities_are_in_the_binary_unit_their_label_shows():
    # The course's one convention (hardware.py): memory in GiB = 2**30 bytes, never "GB".
    assert hardware.MIB == 2**20 and hardware.GB == 10**9
    for label, nbytes in hardware.GPU_MEMORY.items():
        shown = re.search(r"(\d+) GiB", label)
        assert shown, f"{label!r} does not state its capacity in GiB"
        assert nbytes == int(shown[1]) * hardware.GIB, label
        assert not re.search(r"\bGB\b", label), label


def test_nominal_gib_is_within_half_a_percent_of_what_nvidia_smi_shows():
    # Read as GiB, the vendors' "80 GB" / "141 GB" are what nvidia-smi reports, less a
    # reserve under 0.5%; read as decimal GB, the H200 would be 7% short of its real size.
    for label, mib in hardware.NVIDIA_SMI_TOTAL_MIB.items():
        visible = mib * hardware.MIB
        nominal = hardware.GPU_MEMORY[label]
        assert 0.995 < visible / nominal < 1.0, label
    h200_smi = hardware.NVIDIA_SMI_TOTAL_MIB["H200 (141 GiB)"] * hardware.MIB
    assert 141 * hardware.GB / h200_smi < 0.94
