"""Chapter 6's cost model: bytes per block and per step, parameters and activations per rank,
and the node boundary."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from course_lib.cost import comm_model
from course_lib.cost import tensor_model as tm
from course_lib.cost.cost_model import measure_saved_activation_bytes
from course_lib.cost.hardware import GB, peak_flops
from course_lib.model import GPT, CausalSelfAttention, GPTConfig, count_parameters
from course_lib.parallel.tensor_gpt import tensor_parallelize
from course_lib.topology import Topology

# -- bytes per block per pass ------------------------------------------------------------


def test_block_bytes_by_hand():
    # B=2, T=8, d=16 in fp32: one activation is n = 2*8*16*4 = 1024 bytes.
    assert tm.block_comm_bytes(2, 8, 16, tp=2) == {
        "all_reduce": 2048,  # two ring all-reduces, 2 * (2-1)/2 * 1024 each
        "reduce_scatter": 0,
        "all_gather": 0,
        "total": 2048,
    }
    assert tm.block_comm_bytes(2, 8, 16, tp=4)["all_reduce"] == 2 * 2 * 3 * 1024 // 4  # 3072
    sp = tm.block_comm_bytes(2, 8, 16, tp=4, sequence_parallel=True)
    assert sp == {"all_reduce": 0, "reduce_scatter": 1536, "all_gather": 1536, "total": 3072}
    assert tm.block_comm_bytes(1, 4, 8, tp=1)["total"] == 0  # one rank sends nothing
    bf16 = tm.block_comm_bytes(2, 8, 16, tp=2, bytes_per_element=2)
    assert bf16["total"] == 1024


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_sequence_parallel_sends_the_same_total_and_matches_chapter_1(tp):
    batch, seq, d = 3, 24, 48
    plain = tm.block_comm_bytes(batch, seq, d, tp)
    sp = tm.block_comm_bytes(batch, seq, d, tp, sequence_parallel=True)
    assert plain["total"] == sp["total"] == plain["all_reduce"]
    assert sp["reduce_scatter"] == sp["all_gather"] == sp["total"] // 2
    n = batch * seq * d * 4
    for rank in range(tp):  # chapter 1's exact per-rank counts of our ring collectives
        count = comm_model.bytes_sent_per_rank
        assert plain["total"] == 2 * count("ring_all_reduce", n, tp, rank, element_size=4)
        assert sp["reduce_scatter"] == 2 * count("ring_reduce_scatter", n, tp, rank, element_size=4)
        assert sp["all_gather"] == 2 * count("ring_all_gather", n, tp, rank, element_size=4)


def test_block_bytes_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"tp=3 does not divide n_embd=16; choose tp in \[1, 2"):
        tm.block_comm_bytes(2, 8, 16, tp=3)
    with pytest.raises(ValueError, match="does not divide the sequence length seq"):
        tm.block_comm_bytes(2, 6, 16, tp=4, sequence_parallel=True)
    tm.block_comm_bytes(2, 6, 16, tp=4)  # without SP the sequence need not divide
    for bad in ({"tp": 0}, {"batch": 0}, {"tp": 2.0}, {"bytes_per_element": 0}):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            tm.block_comm_bytes(**{"batch": 2, "seq": 8, "n_embd": 16, "tp": 2, **bad})


# -- parameters per rank -----------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_at_tp_1_is_the_reference_count(bias, tie):
    config = GPTConfig(n_layer=3, n_head=6, n_embd=96, bias=bias, tie_weights=tie)
    assert tm.parameter_count_per_rank(config, 1) == count_parameters(config)


def _layout_by_hand(config: GPTConfig, tp: int) -> int:
    """One rank's tensors, built as modules with the shapes of the chapter's layout."""
    d, b = config.n_embd, config.bias
    v = -(-config.vocab_size // tp) * tp
    block = nn.ModuleList(
        [
            CausalSelfAttention(config, n_head=config.n_head // tp),  # heads r of tp
            nn.Linear(d, 4 * d // tp, bias=b),  # c_fc, its rows of the 4d outputs
            nn.Linear(4 * d // tp, d, bias=b),  # c_proj, its columns; the bias whole
            nn.LayerNorm(d, bias=b),
            nn.LayerNorm(d, bias=b),
        ]
    )
    once = [nn.Embedding(v // tp, d), nn.Embedding(config.block_size, d), nn.LayerNorm(d, bias=b)]
    if not config.tie_weights:
        once.append(nn.Linear(d, v // tp, bias=False))
    numel = sum(p.numel() for p in block.parameters()) * config.n_layer
    return numel + sum(p.numel() for m in once for p in m.parameters())


@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("bias, tie", [(True, True), (False, False), (True, False)])
def test_parameter_count_equals_the_layout_built_by_hand(tp, bias, tie):
    config = GPTConfig(n_layer=2, n_head=12, n_embd=48, bias=bias, tie_weights=tie)
    assert tm.parameter_count_per_rank(config, tp) == _layout_by_hand(config, tp)


def test_parameter_count_by_hand_with_vocab_padding():
    assert tm.padded_vocab(256, 3) == 258 and tm.padded_vocab(256, 4) == 256
    config = GPTConfig(n_layer=1, n_head=3, n_embd=6, vocab_size=256, block_size=4)
    d = 6  # tp = 3: c_attn 6x6+6, c_proj 6x2+6, c_fc 8x6+8, c_proj 6x8+6, two norms 2*12
    block = (36 + 6) + (12 + 6) + (48 + 8) + (48 + 6) + 24
    embeddings = 258 // 3 * d + 4 * d  # wte shard of the padded vocabulary, wpe whole
    assert tm.parameter_count_per_rank(config, 3) == block + embeddings + 2 * d
    untied = dataclasses.replace(config, tie_weights=False)
    assert tm.parameter_count_per_rank(untied, 3) == block + embeddings + 2 * d + 86 * d


def test_parameter_count_errors():
    with pytest.raises(
        ValueError, match=r"tp=3 does not divide n_head=4; choose tp in \[1, 2, 4\]"
    ):
        tm.parameter_count_per_rank(GPTConfig(), 3)
    with pytest.raises(ValueError, match="tp must be an integer >= 1"):
        tm.parameter_count_per_rank(GPTConfig(), 0)


# -- links and the modelled layer time ---------------------------------------------------


def test_links_are_sourced_decimal_rates():
    assert tm.NVLINK_H100.bandwidth_bytes_per_s == 450 * GB
    assert tm.INFINIBAND_NDR.bandwidth_bytes_per_s == 400e9 / 8
    assert tm.NVLINK_H100.beta == pytest.approx(1 / 450e9)
    for link in (tm.NVLINK_H100, tm.INFINIBAND_NDR, tm.PCIE4_X16):
        assert "assumption" in link.source and link.alpha_s > 0
    assert tm.INFINIBAND_NDR.alpha_s > tm.NVLINK_H100.alpha_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        tm.NVLINK_H100.alpha_s = 0  # type: ignore[misc]
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s must be a finite number > 0"):
        tm.Link("broken", 1e-6, 0, "none")
    with pytest.raises(ValueError, match="alpha_s must be >= 0"):
        tm.Link("broken", -1.0, 1e9, "none")


def test_layer_time_is_the_formula():
    d, batch, seq, tp, peak = 1024, 2, 512, 4, 1e15
    got = tm.layer_time(d, batch, seq, tp, tm.NVLINK_H100, peak, mfu=0.5)
    compute = 3 * 2 * 12 * d * d * batch * seq / tp / (peak * 0.5)
    link = tm.NVLINK_H100
    comm = 4 * comm_model.predict(
        "ring_all_reduce", batch * seq * d * 2, tp, link.alpha_s, link.beta
    )
    assert got["compute_s"] == pytest.approx(compute)
    assert got["comm_s"] == pytest.approx(comm)
    assert got["total_s"] == pytest.approx(compute + comm)
    assert got["comm_share"] == pytest.approx(comm / (compute + comm))
    assert got["link"] == link.name
    same = tm.layer_time({"n_embd": d, "n_head": 16}, batch, seq, tp, link, peak, mfu=0.5)
    assert same == got
    config = GPTConfig(n_embd=d, n_head=16)
    assert tm.layer_time(config, batch, seq, tp, link, peak, mfu=0.5) == got


def test_layer_time_crosses_to_the_inter_node_link_beyond_the_node():
    kwargs = {"gpus_per_node": 8, "inter_link": tm.INFINIBAND_NDR}
    inside = tm.layer_time(12288, 2, 2048, 8, tm.NVLINK_H100, **kwargs)
    across = tm.layer_time(12288, 2, 2048, 16, tm.NVLINK_H100, **kwargs)
    assert inside["link"] == tm.NVLINK_H100.name and across["link"] == tm.INFINIBAND_NDR.name
    assert across["comm_s"] > 5 * inside["comm_s"]  # 450 vs 50 GB/s each way
    assert tm.layer_time(12288, 2, 2048, 1)["comm_s"] == 0


def test_node_boundary_table_share_grows_and_jumps_at_the_boundary():
    rows = tm.node_boundary_table()
    assert [r["tp"] for r in rows] == [1, 2, 4, 8, 16, 32]
    assert rows[0]["comm_share"] == 0 and rows[0]["link"] == "none"
    shares = [r["comm_share"] for r in rows]
    assert all(a < b for a, b in zip(shares, shares[1:], strict=False))
    jumps = [b - a for a, b in zip(shares, shares[1:], strict=False)]
    assert max(jumps) == jumps[3]  # from tp = 8 to tp = 16: the ring leaves the node
    assert [r["inside_node"] for r in rows] == [True] * 4 + [False] * 2
    for r in rows:
        assert r["compute_s"] == pytest.approx(rows[0]["compute_s"] / r["tp"])
        assert r["comm_s"] == (r["comm_intra_s"] if r["inside_node"] else r["comm_inter_s"])
        assert r["comm_inter_s"] >= r["comm_intra_s"]
    assert rows[3]["comm_share"] < 0.25 < 0.5 < rows[4]["comm_share"]  # 8: small, 16: most
    assert tm.H100_BF16_PEAK_FLOPS == peak_flops("H100 SXM", "bf16")
    assert "whitepaper" in tm.H100_PEAK_SOURCE


def test_layer_time_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"mfu must be in \(0, 1\]"):
        tm.layer_time(1024, 1, 8, 2, mfu=1.5)
    with pytest.raises(ValueError, match="peak_flops must be a finite number > 0"):
        tm.layer_time(1024, 1, 8, 2, peak_flops=0)
    with pytest.raises(ValueError, match=r"tp=5 does not divide n_head=16; choose tp in"):
        tm.layer_time(GPTConfig(n_embd=1024, n_head=16), 1, 8, 5)
    with pytest.raises(ValueError, match="needs an 'n_embd' key"):
        tm.layer_time({"d": 1024}, 1, 8, 2)
    with pytest.raises(ValueError, match="gpus_per_node must be an integer >= 1"):
        tm.layer_time(1024, 1, 8, 2, gpus_per_node=0)


# -- bytes of one whole training step (model_comm_bytes) ---------------------------------


def test_model_bytes_by_hand():
    # L=1, d=8, B=2, T=4 at tp=2 in fp32: an activation is n = 2*4*8 = 64 elements, 256 bytes;
    # a ring all-reduce sends 2 * (1/2) * 256 = 256 bytes from each rank.
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4)
    got = tm.model_comm_bytes(config, 2, 4, tp=2)
    assert got == {
        "embedding": 256,  # g after the vocabulary-parallel lookup
        "blocks": 4 * 256,  # 2 g forward + 2 f backward
        "lm_head": 256,  # f backward
        "cross_entropy": 8 * 4 + 64,  # all-gather of 2 x 8 row maxima; all-reduce of 2 x 8
        "sequence_parallel_grads": 0,
        "total": 1632,
    }
    sp = tm.model_comm_bytes(config, 2, 4, tp=2, sequence_parallel=True)
    # the same activations as reduce-scatter + all-gather pairs; plus the sum of the
    # sequence-parallel gradients: ln_1, ln_2 (4 * 8), two row biases (16), wpe (4 * 8), ln_f (16)
    assert {k: sp[k] for k in ("embedding", "blocks", "lm_head", "cross_entropy")} == {
        k: got[k] for k in ("embedding", "blocks", "lm_head", "cross_entropy")
    }
    assert tm.sequence_parallel_grad_numel(config) == 32 + 16 + 32 + 16
    assert sp["sequence_parallel_grads"] == 96 * 4  # 2 * (1/2) * 96 elements * 4 bytes
    assert sp["total"] == got["total"] + 384


def test_model_bytes_at_tp_1_are_zero_and_bf16_halves_all_but_the_loss():
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16)
    assert tm.model_comm_bytes(config, 3, 5, tp=1)["total"] == 0
    assert tm.model_comm_bytes(config, 4, 16, tp=1, sequence_parallel=True)["total"] == 0
    fp32 = tm.model_comm_bytes(config, 4, 16, tp=4)
    bf16 = tm.model_comm_bytes(config, 4, 16, tp=4, bytes_per_element=2)
    for key in ("embedding", "blocks", "lm_head"):
        assert bf16[key] * 2 == fp32[key]
    assert bf16["cross_entropy"] == fp32["cross_entropy"]  # the softmax works in fp32
    untied = dataclasses.replace(config, tie_weights=False, bias=False)
    assert tm.model_comm_bytes(untied, 4, 16, tp=4)["total"] == fp32["total"]


def test_model_bytes_uneven_ring_chunks_differ_by_rank_and_sum_to_the_ring_total():
    config = GPTConfig(n_layer=1, n_head=4, n_embd=16, block_size=8)
    per_rank = [tm.model_comm_bytes(config, 3, 5, tp=4, rank=r) for r in range(4)]
    ce = [r["cross_entropy"] for r in per_rank]
    assert len(set(ce)) > 1  # 2M = 30 elements do not split into 4 equal chunks
    m = 3 * 5  # over the ring every element is sent (N - 1) times per half
    assert sum(ce) == 4 * (3 * 4 * m) + 4 * (2 * 3 * 2 * m)  # all-gather of 4M, all-reduce 2M
    assert len({r["blocks"] for r in per_rank}) == 1  # d divides: blocks are even


def test_model_bytes_errors_name_the_fix():
    config = GPTConfig(n_layer=1, n_head=4, n_embd=16, block_size=8)
    with pytest.raises(ValueError, match=r"rank=4 is not a rank of a group of tp=4; use 0 \.\. 3"):
        tm.model_comm_bytes(config, 2, 8, tp=4, rank=4)
    with pytest.raises(ValueError, match="does not divide the sequence length seq"):
        tm.model_comm_bytes(config, 2, 6, tp=4, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"tp=3 does not divide n_head=4"):
        tm.model_comm_bytes(config, 2, 6, tp=3)


# -- activation bytes of one tensor-parallel rank (tp_activation_terms) ------------------


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("bias, tie", [(True, True), (False, False)])
def test_tp_activation_formula_equals_the_measurement_at_tp_1(sp, bias, tie):
    """In one process (no group: every operator the identity); tp = 2 and 4 run in
    tests/test_chapter6.py on spawned ranks."""
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=8, vocab_size=250,
                       bias=bias, tie_weights=tie)  # fmt: skip
    torch.manual_seed(0)
    model = tensor_parallelize(GPT(config), Topology.single(), sp)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (3, 7), generator=gen)
    got = measure_saved_activation_bytes(model, tokens[:, :-1], tokens[:, 1:], model.loss)
    assert got == tm.tp_activation_bytes(config, 3, 6, 1, sp)


def test_tp_activation_terms_divide_as_korthikanti_says():
    config = GPTConfig(n_layer=2, n_head=8, n_embd=64, block_size=32)
    B, T, d, L = 4, 32, 64, 2
    one = tm.tp_activation_terms(config, B, T, 1)
    for tp in (2, 4, 8):
        plain = tm.tp_activation_terms(config, B, T, tp)
        sp = tm.tp_activation_terms(config, B, T, tp, sequence_parallel=True)
        megatron = tm.tp_activation_terms(config, B, T, tp, True, recompute_all_gather=True)
        for key, value in one.items():
            if "(/N)" in key:  # inside the tensor-parallel regions: always / tp
                assert plain[key] == sp[key] == megatron[key] == value // tp, key
            elif "(/N with SP)" in key:  # the LayerNorm region: / tp only with SP
                assert plain[key] == value and sp[key] == megatron[key] == value // tp, key
            elif "recomputing the gather" in key:  # column inputs: / tp only when regathered
                assert plain[key] == sp[key] == value and megatron[key] == value // tp, key
            else:  # whole on every rank
                assert plain[key] == sp[key] == megatron[key] == value, key
        key = "blocks: attention and MLP inputs (whole; /N recomputing the gather)"
        assert plain[key] == L * 2 * B * T * d * 4
        assert tm.tp_activation_bytes(config, B, T, tp, True) < tm.tp_activation_bytes(
            config, B, T, tp
        )


def test_tp_activation_errors():
    config = GPTConfig(n_layer=1, n_head=4, n_embd=16, block_size=8)
    with pytest.raises(ValueError, match="assumes dropout=0"):
        tm.tp_activation_terms(dataclasses.replace(config, dropout=0.1), 2, 8, 2)
    with pytest.raises(ValueError, match="seq=9 exceeds block_size=8"):
        tm.tp_activation_terms(config, 2, 9, 2)
    with pytest.raises(ValueError, match="does not divide the sequence length seq"):
        tm.tp_activation_terms(config, 2, 6, 4, sequence_parallel=True)
