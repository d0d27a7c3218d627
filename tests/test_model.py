"""The reference GPT (chapter 0): parameter and FLOP formulas, shapes, causality, errors."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from course_lib.model import GPT, GPTConfig, count_parameters, flops_per_token

CONFIGS = [
    GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16),
    GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False),
    GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, tie_weights=False),
    GPTConfig(n_layer=3, n_head=3, n_embd=48, block_size=17, bias=False, tie_weights=False),
    GPTConfig(),  # the course's tiny model
]


def _model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_count_parameters_matches_the_module(config):
    model = _model(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


def test_tied_weights_are_one_parameter():
    tied = _model(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8))
    assert tied.lm_head.weight is tied.wte.weight
    assert sum(p is tied.wte.weight for p in tied.parameters()) == 1
    untied = _model(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, tie_weights=False))
    assert untied.lm_head.weight is not untied.wte.weight


def test_forward_shapes_and_optional_loss():
    config = CONFIGS[0]
    model = _model(config)
    idx = torch.randint(0, config.vocab_size, (3, 11))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 11, config.vocab_size)
    assert loss.shape == ()
    logits, loss = model(idx)
    assert logits.shape == (3, 11, config.vocab_size) and loss is None


def test_loss_at_init_is_close_to_uniform():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
    model = _model(config)
    gen = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 256, (2, 8, 32), generator=gen)
    _, loss = model(idx, targets)  # not model(idx, idx): tied weights favour the input token
    assert loss.item() == pytest.approx(math.log(256), abs=0.1)


def test_a_future_token_does_not_change_earlier_logits():
    config = CONFIGS[0]
    model = _model(config).eval()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=str)
def test_flops_per_token_matches_the_flop_counter(config):
    model = _model(config)
    B, T = 2, config.block_size
    idx = torch.randint(0, config.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    assert counter.get_total_flops() == flops_per_token(config, T) * B * T


def test_bad_config_names_the_numbers():
    with pytest.raises(ValueError, match=r"n_head=3 does not divide n_embd=32"):
        GPTConfig(n_head=3, n_embd=32)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)


def test_sequence_longer_than_block_size_is_refused():
    config = CONFIGS[0]
    model = _model(config)
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
