"""Chapter 0's cost model: every memory formula equals what the tensors really hold."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from course_lib.cost.cost_model import (
    GIB,
    H100_BYTES,
    H100_PEAK_BF16_FLOPS,
    PRECISIONS,
    MemoryBreakdown,
    activation_bytes,
    activation_terms,
    chinchilla_tokens,
    flops_per_token_6n,
    format_days,
    growth_exponents,
    korthikanti_activation_bytes,
    max_params_that_fit,
    measure_model_state_bytes,
    measure_saved_activation_bytes,
    training_memory,
    training_memory_preset,
    training_time_days,
    training_time_seconds,
)
from course_lib.model import GPT, GPTConfig, count_parameters, loss_fn


def _one_adamw_step(model: GPT, batch: int, seq: int) -> torch.optim.AdamW:
    gen = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    x = torch.randint(0, V, (batch, seq), generator=gen)
    y = torch.randint(0, V, (batch, seq), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return opt


def _random_batch(config: GPTConfig, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    y = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    return x, y


# -- model states: params, grads, AdamW --------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig(),  # the tiny GPT, tied weights
        GPTConfig(n_layer=3, n_head=3, n_embd=96, block_size=40, vocab_size=100),  # tied
        GPTConfig(n_layer=2, n_head=2, n_embd=64, bias=False, tie_weights=False),
    ],
)
def test_state_formula_equals_measured_bytes_fp32_adamw(config: GPTConfig) -> None:
    torch.manual_seed(0)
    model = GPT(config)
    opt = _one_adamw_step(model, batch=2, seq=16)
    measured = measure_model_state_bytes(model, opt)
    predicted = training_memory(count_parameters(config))
    assert measured == predicted  # params, grads, optimizer and activations=0, exactly
    assert measured.total == 16 * count_parameters(config)


def test_tied_weight_is_counted_once() -> None:
    config = GPTConfig(n_layer=1, n_embd=32, n_head=2)
    model = GPT(config)
    assert model.lm_head.weight is model.wte.weight
    opt = _one_adamw_step(model, batch=1, seq=8)
    assert measure_model_state_bytes(model, opt).params == 4 * count_parameters(config)


def test_step_counters_are_optional_and_tiny() -> None:
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2))
    opt = _one_adamw_step(model, batch=1, seq=8)
    without = measure_model_state_bytes(model, opt)
    with_step = measure_model_state_bytes(model, opt, include_step=True)
    n_tensors = len(list(model.parameters()))
    assert with_step.optimizer - without.optimizer == 4 * n_tensors  # one fp32 scalar each


def test_before_any_step_there_is_no_grad_or_optimizer_state() -> None:
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2))
    opt = torch.optim.AdamW(model.parameters())
    m = measure_model_state_bytes(model, opt)
    assert m.grads == 0 and m.optimizer == 0 and m.params > 0


def test_sixteen_bytes_per_param_for_fp32_and_mixed() -> None:
    n = 7_000_000_000
    fp32 = training_memory_preset(n, "fp32")
    mixed = training_memory_preset(n, "mixed")
    assert fp32.total == mixed.total == 16 * n
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * n, 4 * n, 8 * n)
    assert (mixed.params, mixed.grads, mixed.optimizer) == (2 * n, 2 * n, 12 * n)  # ZeRO K=12
    assert PRECISIONS["fp32"].total == PRECISIONS["mixed"].total == 16
    explicit = training_memory(n, param_bytes=2, grad_bytes=2, master_bytes=4)
    assert explicit == mixed


def test_memory_breakdown_total_and_gib() -> None:
    m = MemoryBreakdown(params=GIB, grads=GIB, optimizer=2 * GIB, activations=GIB // 2)
    assert m.total == 4.5 * GIB and m.model_states == 4 * GIB
    assert m.as_gib()["total"] == pytest.approx(4.5)
    assert "= 4.50 GiB" in m.format_gib()
    assert training_memory(10, activations=5).total == 165


def test_max_params_that_fit() -> None:
    assert max_params_that_fit(H100_BYTES) == 80 * GIB // 16  # about 5.4 billion
    assert training_memory(max_params_that_fit(H100_BYTES)).total <= H100_BYTES


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_params": -1},
        {"n_params": 1.5},
        {"n_params": 10, "param_bytes": -2},
        {"n_params": 10, "activations": -1},
        {"n_params": True},
    ],
)
def test_training_memory_rejects_nonsense(kwargs: dict) -> None:
    n = kwargs.pop("n_params")
    with pytest.raises(ValueError):
        training_memory(n, **kwargs)


def test_unknown_precision_is_rejected() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        training_memory_preset(10, "fp8")


# -- activations: the formula against what autograd saves --------------------------------

_UNEVEN = GPTConfig(
    n_layer=3, n_head=3, n_embd=96, block_size=40, vocab_size=100, bias=False, tie_weights=False
)
ACTIVATION_CASES = [
    (GPTConfig(), 8, 64, torch.float32),  # the tiny GPT at its full context
    (_UNEVEN, 3, 17, torch.float32),  # no biases, untied head, odd sizes
    (GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32), 5, 31, torch.bfloat16),
]


@pytest.mark.parametrize(("config", "batch", "seq", "dtype"), ACTIVATION_CASES)
def test_activation_formula_equals_saved_tensors_flash(
    config: GPTConfig, batch: int, seq: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    model = GPT(config).to(dtype)
    x, y = _random_batch(config, batch, seq)
    measured = measure_saved_activation_bytes(model, x, y)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    assert measured == activation_bytes(config, batch, seq, dtype_bytes)


@pytest.mark.parametrize(("batch", "seq"), [(4, 32), (1, 16), (3, 7)])
def test_activation_formula_equals_saved_tensors_math_backend(batch: int, seq: int) -> None:
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32)
    model = GPT(config)
    x, y = _random_batch(config, batch, seq)
    with sdpa_kernel(SDPBackend.MATH):
        measured = measure_saved_activation_bytes(model, x, y)
    assert measured == activation_bytes(config, batch, seq, attention="math")
    # the math backend keeps the (B, h, T, T) probabilities; flash keeps a (B, h, T) lse
    extra = activation_bytes(config, batch, seq, attention="math") - activation_bytes(
        config, batch, seq
    )
    assert extra > 0 or seq == 1


def test_activation_terms_sum_and_leading_term() -> None:
    config = GPTConfig(n_layer=6, n_head=8, n_embd=512, block_size=256)
    B, T = 4, 256
    terms = activation_terms(config, B, T)
    assert sum(terms.values()) == activation_bytes(config, B, T)
    block_bytes = sum(v for k, v in terms.items() if k.startswith("blocks:"))
    leading = 16 * config.n_layer * B * T * config.n_embd * 4  # 16 BTd s per layer
    assert leading <= block_bytes < 1.05 * leading


def test_measurement_ignores_parameters_and_frees_graph() -> None:
    config = GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=8)
    model = GPT(config)
    x, y = _random_batch(config, 2, 8)
    first = measure_saved_activation_bytes(model, x, y)
    assert first == measure_saved_activation_bytes(model, x, y)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert first == activation_bytes(config, 2, 8) and first != param_bytes


def test_activation_bytes_rejects_nonsense() -> None:
    config = GPTConfig()
    with pytest.raises(ValueError, match="exceeds block_size"):
        activation_bytes(config, 1, config.block_size + 1)
    with pytest.raises(ValueError, match="batch_size"):
        activation_bytes(config, 0, 8)
    with pytest.raises(ValueError, match="attention"):
        activation_bytes(config, 1, 8, attention="sparse")
    with pytest.raises(ValueError, match="dropout"):
        activation_bytes(GPTConfig(dropout=0.1), 1, 8)


def test_korthikanti_rule_of_thumb() -> None:
    # one GPT-3 175B layer, s=2048, b=1, h=12288, a=96: sbh(34 + 5as/h)
    s, b, h, a = 2048, 1, 12288, 96
    one_layer = korthikanti_activation_bytes(1, s, b, h, a)
    assert one_layer == s * b * h * (34 + 5 * a * s // h)
    assert korthikanti_activation_bytes(96, s, b, h, a) == 96 * one_layer
    assert korthikanti_activation_bytes(1, s, b, h, a, selective_recompute=True) == 34 * s * b * h
    with pytest.raises(ValueError):
        korthikanti_activation_bytes(0, s, b, h, a)


# -- time ---------------------------------------------------------------------------------


def test_training_time_scales_linearly_with_tokens_and_inversely_with_devices() -> None:
    base = training_time_seconds(1e9, 6e9, 1e15, mfu=0.5, n_devices=1)
    assert base == pytest.approx(1e9 * 6e9 / 5e14)
    assert training_time_seconds(2e9, 6e9, 1e15, 0.5, 1) == pytest.approx(2 * base)
    assert training_time_seconds(1e9, 6e9, 1e15, 0.5, 8) == pytest.approx(base / 8)
    assert training_time_days(1e9, 6e9, 1e15, 0.5, 1) == pytest.approx(base / 86_400)


def test_chinchilla_70b_on_h100s() -> None:
    n = 70_000_000_000
    tokens = chinchilla_tokens(n)
    assert tokens == 1_400_000_000_000
    peak = H100_PEAK_BF16_FLOPS  # hardware.py's table: 989.4 TFLOP/s dense bf16
    one = training_time_days(tokens, flops_per_token_6n(n), peak, mfu=0.4)
    many = training_time_days(tokens, flops_per_token_6n(n), peak, mfu=0.4, n_devices=1024)
    assert 16_000 < one < 18_000  # about 47 years
    assert 16 < many < 18 and one / many == pytest.approx(1024)


@pytest.mark.parametrize(
    "args",
    [
        (0, 1e9, 1e12, 0.4, 1),
        (-1e9, 1e9, 1e12, 0.4, 1),
        (1e9, 1e9, 0, 0.4, 1),
        (1e9, 1e9, 1e12, 0.0, 1),
        (1e9, 1e9, 1e12, 1.5, 1),
        (1e9, 1e9, 1e12, 0.4, 0),
        (1e9, 1e9, 1e12, 0.4, 2.5),
        (float("inf"), 1e9, 1e12, 0.4, 1),
    ],
)
def test_training_time_rejects_nonsense(args: tuple) -> None:
    with pytest.raises(ValueError):
        training_time_seconds(*args)


def test_format_days_picks_a_readable_unit() -> None:
    assert format_days(17 / 86_400) == "17 s"
    assert format_days(0.2) == "4.8 h"
    assert format_days(16.8) == "16.8 days"
    assert format_days(365 * 47) == "47 years"
    assert format_days(2457.6) == "6.7 years"
    with pytest.raises(ValueError):
        format_days(-1)


def test_growth_exponents_read_the_power_law_between_neighbours() -> None:
    assert growth_exponents([1, 2, 4], [3, 6, 24]) == pytest.approx([1.0, 2.0])
    config = GPTConfig(block_size=512)  # the math kernel's extra bytes: B h T^2 s - 4 B h T
    ts = [64, 128, 256, 512]
    extra = [
        activation_bytes(config, 4, t, attention="math") - activation_bytes(config, 4, t)
        for t in ts
    ]
    assert all(1.99 < k < 2.03 for k in growth_exponents(ts, extra))
    assert growth_exponents(ts, [activation_bytes(config, 4, t) for t in ts]) == pytest.approx(
        [1.0] * 3
    )
    with pytest.raises(ValueError, match="two or more"):
        growth_exponents([1], [1])
    with pytest.raises(ValueError, match="positive"):
        growth_exponents([1, 2], [0, 1])
