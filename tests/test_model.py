"""The reference GPT (chapter 0): parameter and FLOP formulas, shapes, causality, errors,
and the pieces pipeline (embed / blocks / head) and tensor parallelism (qkv_rows) cut it into."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from course_lib.model import (
    GPT,
    CausalSelfAttention,
    GPTConfig,
    count_parameters,
    flops_per_token,
    loss_fn,
    qkv_rows,
)

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


def test_forward_returns_logits_and_loss_fn_is_the_mean_cross_entropy():
    config = CONFIGS[0]
    model = _model(config)
    idx, targets = torch.randint(0, config.vocab_size, (2, 3, 11))
    logits = model(idx)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 11, config.vocab_size)
    loss = loss_fn(logits, targets)
    assert loss.shape == ()
    assert torch.equal(loss, F.cross_entropy(logits.view(33, -1), targets.reshape(33)))
    assert torch.equal(loss, F.cross_entropy(logits.transpose(1, 2), targets))
    with pytest.raises(ValueError, match=r"targets of shape \(11, 3\) do not match logits"):
        loss_fn(logits, targets.T)


def test_the_old_two_argument_call_fails_loudly():
    model = _model(CONFIGS[0])
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match=r"loss_fn\(model\(idx\), targets\)"):
        model(idx, idx)
    with pytest.raises(TypeError, match=r"loss_fn\(model\(idx\), targets\)"):
        model(idx, targets=idx)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_embed_blocks_head_compose_to_forward_bitwise(config):
    model = _model(config)
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    x = model.embed(idx)
    assert x.shape == (2, config.block_size, config.n_embd)
    for block in model.blocks:
        x = block(x)
    assert torch.equal(model.head(x), model(idx))


def test_state_dict_keys_are_unchanged():
    model = _model(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8))
    block = [
        f"blocks.0.{name}"
        for name in (
            "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
            "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
            "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
        )
    ]  # fmt: skip
    expected = ["wte.weight", "wpe.weight", *block, "ln_f.weight", "ln_f.bias", "lm_head.weight"]
    assert list(model.state_dict()) == expected
    assert model.blocks[0].attn.c_attn.weight.shape == (96, 32)  # fused q, k, v: (3d, d)


def test_qkv_rows_are_q_then_k_then_v_of_the_chosen_heads():
    rows = qkv_rows(8, 4, range(1, 3)).tolist()  # head_dim 2: heads 1 and 2 own 2..5 in a block
    assert rows == [2, 3, 4, 5, 10, 11, 12, 13, 18, 19, 20, 21]
    assert torch.equal(qkv_rows(8, 4, slice(1, 3)), qkv_rows(8, 4, range(1, 3)))
    assert torch.equal(qkv_rows(8, 4, range(4)), torch.arange(24))  # every head: all rows
    with pytest.raises(ValueError, match="subset of range"):
        qkv_rows(8, 4, range(3, 5))


@pytest.mark.parametrize(
    ("config", "heads"),
    [
        (GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=16), range(1, 3)),
        (GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=16), range(0, 4, 2)),
        (GPTConfig(n_layer=1, n_head=3, n_embd=48, block_size=17, bias=False), range(2, 3)),
    ],
    ids=str,
)
def test_attention_on_the_qkv_rows_of_some_heads_gives_those_heads(config, heads):
    # What a tensor-parallel rank does (chapter 6): hold some heads, weight rows by qkv_rows.
    full = _model(config).blocks[0].attn
    part = CausalSelfAttention(config, n_head=len(heads))
    rows = qkv_rows(config.n_embd, config.n_head, heads)
    with torch.no_grad():
        part.c_attn.weight.copy_(full.c_attn.weight[rows])
        if config.bias:
            part.c_attn.bias.copy_(full.c_attn.bias[rows])
    B, T, hd = 3, config.block_size, config.n_embd // config.n_head
    x = torch.randn(B, T, config.n_embd, generator=torch.Generator().manual_seed(0))
    per_head = full.attend(x).view(B, T, config.n_head, hd)  # before c_proj
    expected = per_head[:, :, list(heads)]  # (B, T, len(heads), hd)
    assert torch.equal(part.attend(x).view(B, T, len(heads), hd), expected)


def test_loss_at_init_is_close_to_uniform():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
    model = _model(config)
    gen = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 256, (2, 8, 32), generator=gen)
    loss = loss_fn(model(idx), targets)  # not idx, idx: tied weights favour the input token
    assert loss.item() == pytest.approx(math.log(256), abs=0.1)


def test_a_future_token_does_not_change_earlier_logits():
    config = CONFIGS[0]
    model = _model(config).eval()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    before = model(idx)
    after = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=str)
def test_flops_per_token_matches_the_flop_counter(config):
    model = _model(config)
    B, T = 2, config.block_size
    idx = torch.randint(0, config.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = loss_fn(model(idx), idx)
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


def test_generate_appends_tokens_from_the_logits():
    config = CONFIGS[0]
    model = _model(config).eval()
    prompt = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))  # past block_size
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    greedy = model.generate(prompt, 1, temperature=0.0)  # temperature 0: the argmax
    assert torch.equal(greedy[:, -1], model(prompt)[:, -1].argmax(-1))
