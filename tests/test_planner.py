"""Chapter 7's planner: its terms equal the earlier chapters' formulas, its table is ranked,
each rejection reason shows, bad inputs say what to fix. Pure computation, well under 5 s."""

from __future__ import annotations

import dataclasses

import pytest

from course_lib.cost import clusters as C
from course_lib.cost import planner as P
from course_lib.cost import planner_model as PM
from course_lib.cost.cost_model import MODEL_SHAPES
from course_lib.cost.hardware import GIB
from course_lib.cost.tensor_model import Link, parameter_count_per_rank, tp_activation_bytes
from course_lib.model import GPTConfig, count_parameters
from course_lib.parallel.pipeline_sim import peak_activations, simulate
from course_lib.parallel.schedules import gpipe, one_f_one_b
from course_lib.parallel.zero import zero_memory_formula

TINY = GPTConfig()  # 4 layers, d 128, 4 heads, tied
UNTIED = GPTConfig(vocab_size=257, n_layer=6, tie_weights=False)  # vocab not divisible by tp
FAST = Link("free", alpha_s=0.0, bandwidth_bytes_per_s=1e30, source="test: free messages")


def _cluster(**changes) -> C.Cluster:
    base = dict(name="test", gpus_per_node=8, memory_bytes=64 * GIB, peak_flops=1e12,
                intra=FAST, inter=FAST, default_mfu=1.0, max_nodes=None, source="test")  # fmt: skip
    return C.Cluster(**{**base, **changes})


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_dp_only_state_is_zero_memory_formula(zero):
    c = P.Choice(dp=4, pp=1, tp=1, microbatches=1, zero=zero)
    mem = P.memory_per_gpu(TINY, c, 2, 64, precision="fp32")
    expected = zero_memory_formula(count_parameters(TINY), 4, zero)
    assert {k: mem[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("config", [TINY, UNTIED])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_only_parameters_are_parameter_count_per_rank(config, tp):
    assert PM.stage_parameter_counts(config, tp, 1) == [parameter_count_per_rank(config, tp)]


@pytest.mark.parametrize("config", [TINY, UNTIED])
@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2), (1, 4), (4, 2)])
def test_pipeline_stages_sum_to_the_model(config, tp, pp):
    stages = PM.stage_parameter_counts(config, tp, pp, uneven=True)
    d = config.n_embd
    vocab_shard = -(-config.vocab_size // tp) * d
    tied_copy = vocab_shard if config.tie_weights else 0  # the last stage's copy
    assert len(stages) == pp
    assert sum(stages) == parameter_count_per_rank(config, tp) + tied_copy


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_the_busiest_stage_is_the_max_of_memory_per_stage(zero):
    c = P.Choice(dp=2, pp=4, tp=1, microbatches=4, zero=zero)
    stages = P.memory_per_stage(UNTIED, c, 2, 64, precision="fp32", uneven=True)
    assert len(stages) == 4 and [s["stage"] for s in stages] == [0, 1, 2, 3]
    busiest = P.memory_per_gpu(UNTIED, c, 2, 64, precision="fp32", uneven=True)
    assert busiest == max(stages, key=lambda s: s["total"])
    pairs = PM.stage_group_counts(UNTIED, 1, 4, uneven=True)
    for s, pair in zip(stages, pairs, strict=True):
        padded = sum(-(-n // 2) * 2 for n in pair)  # each group's flat buffer, to a multiple of 2
        assert s["params"] == 4 * (padded if zero else sum(pair))


def test_pp_not_dividing_layers_is_refused_unless_uneven():
    with pytest.raises(ValueError, match="pp=3 does not divide n_layer=4"):
        PM.stage_parameter_counts(TINY, 1, 3)
    assert len(PM.stage_parameter_counts(TINY, 1, 3, uneven=True)) == 3


@pytest.mark.parametrize(("tp", "sp"), [(1, False), (2, False), (2, True), (4, True)])
def test_activations_equal_tp_activation_bytes(tp, sp):
    c = P.Choice(dp=1, pp=1, tp=tp, microbatches=1, sequence_parallel=sp)
    mem = P.memory_per_gpu(TINY, c, 3, 64, precision="fp32")
    assert mem["activations"] == tp_activation_bytes(TINY, 3, 64, tp, sp, 4)


def test_recomputation_keeps_layer_inputs_and_one_layer():
    full = P.memory_per_gpu(TINY, P.Choice(1, 1, 2, 1, sequence_parallel=True), 2, 64)
    rc = P.memory_per_gpu(TINY, P.Choice(1, 1, 2, 1, sequence_parallel=True, recompute=True), 2, 64)
    whole = tp_activation_bytes(TINY, 2, 64, 2, True, 2)
    per_block, first, last, kept = PM._activation_split(
        TINY, 2, 64, P.Choice(1, 1, 2, 1, 0, True), 2
    )
    assert kept == 2 * 64 * 128 * 2 / 2  # the block input, (b, T, d) bf16, /tp with SP
    assert full["activations"] == whole
    assert rc["activations"] == 4 * kept + first + last + per_block < whole


@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 5), (4, 4), (4, 9)])
def test_in_flight_is_chapter5_peak_activations(p, m):
    assert PM.in_flight("1f1b", p, m) == peak_activations(one_f_one_b(p, m))
    assert PM.in_flight("gpipe", p, m) == peak_activations(gpipe(p, m))


def test_memory_uses_the_in_flight_count_of_the_first_stage():
    one = P.memory_per_gpu(TINY, P.Choice(1, 2, 1, 4), 1, 64)["activations"]
    gp = P.memory_per_gpu(TINY, P.Choice(1, 2, 1, 4, schedule="gpipe"), 1, 64)["activations"]
    assert one < gp  # 1F1B holds p = 2 micro-batches on stage 0, GPipe m = 4


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8)])
def test_bubble_is_the_simulators(p, m):
    t = P.step_time(TINY, _cluster(), P.Choice(1, p, 1, m), 1, 64, mfu=1.0)
    assert t["bubble_fraction"] == pytest.approx(simulate(one_f_one_b(p, m), 1, 2).bubble_fraction)
    assert t["pp_p2p"] == pytest.approx(0, abs=1e-12) and t["step"] == pytest.approx(
        (m + p - 1) * t["compute"] / m
    )


def test_overlap_argument_and_statement():
    c = P.Choice(4, 1, 1, 1)
    slow = _cluster(intra=C.LAPTOP_RING, inter=C.LAPTOP_RING)
    hid = P.evaluate(TINY, slow, 8, 64, c, dp_overlap="last_bucket")
    none = P.evaluate(TINY, slow, 8, 64, c, dp_overlap="none")
    assert none.time["dp_exposed"] == none.time["dp"] >= hid.time["dp_exposed"] > 0
    assert "critical path" in hid.overlap and "last bucket" in hid.overlap
    with pytest.raises(ValueError, match="dp_overlap"):
        P.evaluate(TINY, slow, 8, 64, c, dp_overlap="sometimes")


def test_every_rejection_reason_appears():
    config = GPTConfig(n_layer=4, n_head=6, n_embd=96, block_size=64)  # pp 8 > 4 layers
    table = P.enumerate_plans(config, _cluster(gpus_per_node=4), 8, 6, 63, schedules=("1f1b",))
    kinds = {r.kind for r in table.rejected}
    assert {"tp_node", "tp_heads", "pp_layers", "batch", "microbatches", "sp_seq"} <= kinds
    small = _cluster(memory_bytes=2 * 2**20)
    kinds = {r.kind for r in P.enumerate_plans(TINY, small, 2, 4, 64).rejected}
    assert "memory" in kinds
    oom = next(r for r in P.enumerate_plans(TINY, small, 2, 4, 64).rejected if r.kind == "memory")
    assert "out of memory" in oom.reason and "GiB over" in oom.reason and oom.over_bytes > 0


def test_ranking_is_sorted_and_every_plan_fits():
    table = P.plan(TINY, C.LAPTOP, 4, 8, 64)
    steps = [p.time["step"] for p in table.plans]
    assert steps == sorted(steps) and table.best is table.plans[0]
    assert all(p.memory["total"] <= C.LAPTOP.memory_bytes for p in table.plans)
    assert "configuration" in table.format(3)


def test_model_shape_presets_are_accepted():
    table = P.plan(
        MODEL_SHAPES[0], C.H100_NODE, 8, 16, 2048, schedules=("1f1b",), zero_stages=(0, 1)
    )
    assert table.best.memory["total"] <= C.H100_NODE.memory_bytes


def test_bad_clusters_are_refused():
    with pytest.raises(ValueError, match="has no memory"):
        _cluster(memory_bytes=0)
    with pytest.raises(ValueError, match="peak_flops"):
        _cluster(peak_flops=-1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        Link("bad", alpha_s=1e-6, bandwidth_bytes_per_s=0, source="test")
    with pytest.raises(ValueError, match="not a multiple of 8; use 8 or 16"):
        P.plan(TINY, C.H100_CLUSTER, 12, 12, 64)
    with pytest.raises(ValueError, match="1 node"):
        P.plan(TINY, C.H100_NODE, 16, 16, 64)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        P.plan(TINY, C.LAPTOP, 2, 2, 128)
    with pytest.raises(ValueError, match="mfu"):
        P.plan(TINY, C.LAPTOP, 2, 2, 64, mfu=1.5)
    with pytest.raises(ValueError, match="GPTConfig or a cost_model.ModelShape"):
        P.plan({"n_embd": 128}, C.LAPTOP, 2, 2, 64)


def test_nothing_fits_names_the_closest_miss():
    small = _cluster(memory_bytes=2 * 2**20)
    with pytest.raises(ValueError, match=r"closest miss: dp\d.*out of memory.*more GPUs"):
        P.plan(TINY, small, 2, 4, 64)
    with pytest.raises(ValueError, match="no valid configuration of 3 GPUs"):
        P.plan(TINY, _cluster(), 3, 1, 64)  # batch 1 over dp 3; pp 3 or tp 3 do not divide


def test_published_run_is_valid_and_the_top_choice_fits():
    run = next(r for r in C.PUBLISHED_RUNS if r.name.startswith("Korthikanti 22B"))
    out = P.compare_published(run)
    assert out["theirs_plan"] is not None and out["theirs_reason"] is None
    assert out["ours"].memory["total"] <= run.cluster.memory_bytes
    assert out["ours"].time["step"] <= out["theirs_plan"].time["step"]
    assert len(C.PUBLISHED_RUNS) >= 3 and all(
        r.dp * r.pp * r.tp == r.n_gpus for r in C.PUBLISHED_RUNS
    )


def test_published_runs_cite_sources():
    for run in C.PUBLISHED_RUNS:
        assert run.source and run.reported
        assert run.checked or "unchecked" in run.note or "from memory" in run.note


def test_clusters_carry_sources():
    for cluster in C.CLUSTERS.values():
        assert cluster.source and cluster.intra.source and cluster.inter.source
    assert C.laptop_cluster(2).peak_flops == C.LAPTOP_FLOPS / 2
    assert dataclasses.replace(C.H100_NODE, max_nodes=2).max_nodes == 2
