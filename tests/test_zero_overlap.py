"""Chapter 3: ZeRO-3's prefetch and asynchronous reduce-scatter (``prefetch=True``).

One spawn at world size 2 trains a 3-block GPT with and without prefetch
(tests/zero_overlap_workers.py). Equality with the single device, at world sizes 1-4 and
with every option, is in tests/test_data_parallel.py; here: what prefetch changes and
what it must not. No test asserts a time: only the order of the timeline's events.
"""

from __future__ import annotations

import pytest
import torch
import zero_overlap_workers as W

from course_lib.launch import run_distributed
from course_lib.parallel.zero import zero3_params_formula, zero_memory_formula


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_distributed(W.both_variants, 2, backend="gloo", timeout_s=120, pg_timeout_s=30,
                           threads_per_rank=1)  # fmt: skip


def test_prefetch_changes_neither_the_losses_nor_the_parameters(runs):
    for rank, got in enumerate(runs):
        assert got[True]["losses"] == got[False]["losses"], f"rank {rank}"
        assert torch.equal(got[True]["params"], got[False]["params"]), f"rank {rank}"


def test_prefetch_sends_the_same_bytes(runs):
    """Every unit is gathered as often, and a reduce-scatter sent as an all-to-all sends
    (N-1)/N of the gradient, as the ring does."""
    for got in runs:
        assert got[True]["sent"] == got[False]["sent"]


def test_held_bytes_equal_the_formula_with_its_prefetch_term(runs):
    for got in runs:
        for prefetch in (False, True):
            held = got[prefetch]["held"]
            assert len(held) == got[prefetch]["n_blocks"]
            for block, (measured, formula) in enumerate(held):
                assert measured == formula, f"prefetch={prefetch}, block {block}"
            measured, formula = got[prefetch]["held_between"]
            assert measured == formula
        # Prefetch holds one more unit in every block's forward but the last.
        more = [a[0] - b[0] for a, b in zip(got[True]["held"], got[False]["held"], strict=True)]
        assert all(m > 0 for m in more[:-1]) and more[-1] == 0


def test_the_formula_names_its_terms_and_keeps_zero_memory_formula():
    terms = zero3_params_formula([100, 100, 60], 2, running=1, prefetch=True, root_numel=40)
    assert terms == {"pieces": 4 * 300 / 2, "root": 160, "running": 400, "prefetch": 240}
    assert zero3_params_formula([100, 60], 2, 1, prefetch=True)["prefetch"] == 0  # the last
    assert zero3_params_formula([100, 60], 2, 0, prefetch=False)["prefetch"] == 0
    between = zero3_params_formula([100, 60], 4, None, prefetch=True, root_numel=40)
    assert sum(between.values()) == zero_memory_formula(200, 4, 3)["params"]
    with pytest.raises(ValueError, match="running=2: a unit index in 0..1"):
        zero3_params_formula([100, 60], 2, 2, prefetch=True)


def _events(got: dict) -> dict[tuple[str, str], list[tuple[float, float]]]:
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for unit, kind, start, end in got["events"]:
        assert start <= end, (unit, kind)
        out.setdefault((unit, kind), []).append((start, end))
    return out


def test_the_timeline_records_every_unit_and_the_prefetch_order(runs):
    n = runs[0][True]["n_blocks"]
    for got in runs:
        for prefetch in (False, True):
            ev = _events(got[prefetch])
            for i in range(n):
                block = f"block {i}"
                assert len(ev[block, "all-gather"]) == 2  # forward and backward
                assert len(ev[block, "forward"]) == len(ev[block, "backward"]) == 1
                assert len(ev[block, "reduce-scatter"]) == 1
            assert len(ev["root", "all-gather"]) == len(ev["root", "reduce-scatter"]) == 1
        plain, early = _events(got[False]), _events(got[True])
        for i in range(n - 1):  # forward: block i+1's all-gather is posted while block i runs
            nxt, cur = f"block {i + 1}", f"block {i}"
            assert early[nxt, "all-gather"][0][0] < early[cur, "forward"][0][1]
            assert plain[nxt, "all-gather"][0][0] >= plain[cur, "forward"][0][1]
        for i in range(1, n):  # backward: block i-1's all-gather is posted while block i runs
            prv, cur = f"block {i - 1}", f"block {i}"
            assert early[prv, "all-gather"][1][0] < early[cur, "backward"][0][1]
            assert plain[prv, "all-gather"][1][0] >= plain[cur, "backward"][0][1]


def test_the_timeline_figure_draws_both_runs_one_row_per_stream(runs, tmp_path):
    from course_lib.viz.plots_zero import STREAMS, plot_prefetch_timeline

    got = runs[0]
    fig = plot_prefetch_timeline(
        {"no prefetch": got[False]["events"], "prefetch": got[True]["events"]}
    )
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(STREAMS)
    boxes = sum(len(ax.collections) for ax in fig.axes)
    assert boxes == len(got[False]["events"]) + len(got[True]["events"])
    fig.savefig(tmp_path / "timeline.png")
    with pytest.raises(ValueError, match="unknown event kind 'idle'"):
        plot_prefetch_timeline({"x": [("block 0", "idle", 0.0, 1.0)]})
