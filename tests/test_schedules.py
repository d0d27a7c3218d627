"""Pipeline schedules and their simulator (chapter 5): pure Python, no model, no processes.

Properties are checked independently of ``check_schedule`` where it matters: the test
counts actions itself and derives each action's dependency from the stage map
(``virtual stage = chunk * p + rank``) to compare against simulated start and end times.
Exact formulas use ``Fraction`` costs, so bubbles compare with ``==``.
"""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

import pytest

from course_lib.parallel.pipeline_sim import Simulation, peak_activations, render, simulate
from course_lib.parallel.schedules import (
    Action,
    Message,
    check_schedule,
    gpipe,
    interleaved_1f1b,
    messages,
    one_f_one_b,
    virtual_stage,
    zero_bubble_h1,
)

ONE, TWO = Fraction(1), Fraction(2)


def random_cases(count: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``count`` random (p, m, v) with m >= p (1F1B, ZB-H1) and a multiple of p half the time."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        p, v = rng.randint(1, 6), rng.randint(1, 4)
        m = p * rng.randint(1, 3) if rng.random() < 0.5 else rng.randint(p, 2 * p + 3)
        cases.append((p, m, v))
    return cases


def generated(p: int, m: int, v: int) -> list[tuple[str, list, int]]:
    """Every generator that accepts (p, m, v), with the chunks its schedule uses."""
    out = [("gpipe", gpipe(p, m), 1), ("1f1b", one_f_one_b(p, m), 1)]
    out.append(("zb-h1", zero_bubble_h1(p, m), 1))
    if m % p == 0:
        out.append(("interleaved", interleaved_1f1b(p, m, v), v))
    return out


def producer(action: Action, rank: int, p: int, v: int) -> tuple[int, Action] | None:
    """Independent of the library: (rank, action) that must finish before ``action`` starts."""
    stage, last = virtual_stage(rank, action.chunk, p), p * v - 1
    if action.op == "F" and stage > 0:
        return (stage - 1) % p, Action("F", action.microbatch, (stage - 1) // p)
    if action.op == "B" and stage < last:
        return (stage + 1) % p, Action("B", action.microbatch, (stage + 1) // p)
    return None


def test_virtual_stage_is_megatrons_map() -> None:
    assert [virtual_stage(1, c, 4) for c in range(3)] == [1, 5, 9]
    assert virtual_stage(0, 0, 1) == 0


def test_action_text_round_trips() -> None:
    assert str(Action("F", 3)) == "F3" and str(Action("B", 3, 1)) == "B3.1"
    for text in ("F3", "B3.1", "W0", "F12.3"):
        assert str(Action.parse(text)) == text
    with pytest.raises(ValueError, match="cannot read 'X1'"):
        Action.parse("X1")


@pytest.mark.parametrize("p, m, v", random_cases(300))
def test_every_generator_passes_the_checks(p: int, m: int, v: int) -> None:
    for name, schedule, chunks in generated(p, m, v):
        check_schedule(schedule, m, chunks)
        assert len(schedule) == p, name
        ops = "FBW" if name == "zb-h1" else "FB"
        want = Counter(Action(o, i, c) for o in ops for i in range(m) for c in range(chunks))
        for rank, actions in enumerate(schedule):
            assert Counter(actions) == want, (name, rank)
        sim = simulate(schedule, [1 + r / 2 for r in range(p)], 2.0, 1.0, 0.25, chunks)
        ends = {(r, a): (s, e) for r, row in enumerate(sim.timeline) for a, s, e in row}
        for (rank, action), (start, _) in ends.items():
            need = producer(action, rank, p, chunks)
            if need is not None:  # the simulator adds t_comm to the same float: exact
                comm = 0.25 if need[0] != rank else 0
                assert ends[need][1] + comm <= start, (name, rank, action)
            local = {"B": "F", "W": "B"}.get(action.op)
            if local:
                before = Action(local, action.microbatch, action.chunk)
                assert ends[(rank, before)][1] <= start, (name, rank, action)


@pytest.mark.parametrize("p, m", [(1, 1), (2, 2), (3, 5), (4, 8), (5, 7), (4, 16)])
def test_gpipe_and_1f1b_bubble_is_exact(p: int, m: int) -> None:
    for schedule in (gpipe(p, m), one_f_one_b(p, m)):
        sim = simulate(schedule, ONE, TWO)
        assert sim.bubble_fraction == Fraction(p - 1, m + p - 1)
        assert sim.makespan == (m + p - 1) * 3
        assert sim.busy == [m * 3] * p


@pytest.mark.parametrize("p, m", [(1, 3), (2, 4), (4, 8), (3, 9)])
def test_1f1b_memory_is_bounded_by_p_gpipe_holds_all(p: int, m: int) -> None:
    assert simulate(one_f_one_b(p, m), ONE, TWO).peak_activations == [p - r for r in range(p)]
    assert simulate(gpipe(p, m), ONE, TWO).peak_activations == [m] * p
    assert peak_activations(one_f_one_b(p, m)) == [p - r for r in range(p)]


@pytest.mark.parametrize("p, m, v", [(2, 4, 2), (4, 8, 2), (4, 8, 3), (3, 9, 4), (1, 3, 2)])
def test_interleaving_divides_the_bubble_by_v(p: int, m: int, v: int) -> None:
    sim = simulate(interleaved_1f1b(p, m, v), ONE, TWO, chunks=v)
    assert sim.bubble_fraction == Fraction(p - 1, v * m + p - 1)  # idle share of rank-time
    ideal = m * 3  # Megatron's definition: bubble time / ideal time = (1/v)(p - 1)/m
    assert (sim.makespan - ideal) / ideal == Fraction(p - 1, v * m)
    assert sim.bubble_fraction < simulate(one_f_one_b(p, m), ONE, TWO).bubble_fraction or p == 1


@pytest.mark.parametrize("p, m", [(2, 2), (3, 6), (4, 8), (6, 12)])
def test_zero_bubble_h1_beats_1f1b_without_more_memory(p: int, m: int) -> None:
    zb = simulate(zero_bubble_h1(p, m), ONE, ONE, ONE)  # B and W each cost 1
    plain = simulate(one_f_one_b(p, m), ONE, ONE, ONE)  # its B costs t_b + t_w = 2
    assert zb.bubble_fraction < plain.bubble_fraction
    assert zb.busy == plain.busy  # same work, less idle time
    idle = (p * zb.makespan - sum(zb.busy)) / p  # the paper: (p - 1)(t_F + t_B - t_W)
    assert idle == (p - 1) * (1 + 1 - 1)
    assert max(zb.peak_activations) <= max(plain.peak_activations) == p
    assert zb.peak_activations == [p] * p  # every rank reaches rank 0's 1F1B peak, none more


def test_interleaved_with_one_chunk_is_1f1b() -> None:
    assert interleaved_1f1b(3, 4, 1) == one_f_one_b(3, 4)  # Megatron does the same


def test_without_w_the_simulator_charges_the_whole_backward_to_b() -> None:
    sim = simulate(one_f_one_b(2, 2), ONE, ONE, TWO)
    assert [e - s for a, s, e in sim.timeline[0] if a.op == "B"] == [3, 3]


@pytest.mark.parametrize("p, m", [(2, 3), (4, 4), (3, 7)])
def test_message_latency_lengthens_gpipe(p: int, m: int) -> None:
    free = simulate(gpipe(p, m), ONE, TWO).makespan
    slow = simulate(gpipe(p, m), ONE, TWO, t_comm=Fraction(1, 2)).makespan
    assert slow >= free + 2 * (p - 1) * Fraction(1, 2)


def test_the_slowest_stage_sets_the_pace() -> None:
    p, m = 4, 16
    sim = simulate(one_f_one_b(p, m), [1, 1, 2, 1], [2, 2, 4, 2])
    for row in sim.timeline:  # steady state: one F and one B per slowest F + B = 6
        starts = [start for action, start, _ in row if action.op == "B"][p : m - p]
        assert {b - a for a, b in zip(starts, starts[1:], strict=False)} == {6}
    assert sim.makespan >= m * 6
    with pytest.raises(ValueError, match="t_f has 3 per-rank costs but the schedule has p=4"):
        simulate(one_f_one_b(p, m), [1, 1, 2], 1)


def test_messages_are_derived_from_the_stage_map() -> None:
    steps = messages(one_f_one_b(2, 2))
    first, last = steps[0][0], steps[1][0]  # F0 on each rank
    assert first.recv is None and first.send == Message("send", "activation", 0, 0, 1)
    assert last.recv == Message("recv", "activation", 0, 0, 0) and last.send is None
    backward = steps[1][1]  # rank 1's B0: last stage, so no gradient to wait for
    assert backward.recv is None and backward.send == Message("send", "gradient", 0, 1, 0)
    assert first.send.key == last.recv.key  # the same tag on both ends
    assert str(last.recv) == "recv activation 0 of stage 0 from rank 0"
    steps = messages(interleaved_1f1b(2, 2, 2), chunks=2)  # rank 1, chunk 0 -> rank 0, chunk 1
    (f01,) = [s for s in steps[1] if s.action == Action("F", 0, 0)]
    assert f01.send == Message("send", "activation", 0, 1, 0)
    assert all(s.recv is None and s.send is None for s in messages(gpipe(1, 3))[0])


def error(schedule: list, m: int, chunks: int = 1) -> str:
    with pytest.raises(ValueError) as caught:
        check_schedule(schedule, m, chunks)
    return str(caught.value)


def test_check_finds_a_missing_action() -> None:
    schedule = one_f_one_b(3, 4)
    schedule[1].remove(Action("B", 2))
    assert error(schedule, 4).startswith("rank 1 never runs B2")


def test_check_finds_a_duplicate() -> None:
    schedule = one_f_one_b(3, 4)
    schedule[0].append(Action("F", 1))
    assert error(schedule, 4).startswith("rank 0 runs F1 twice")


def test_check_finds_a_backward_before_its_forward() -> None:
    schedule = one_f_one_b(3, 4)
    schedule[2][0], schedule[2][1] = schedule[2][1], schedule[2][0]  # B0 F0 on the last rank
    assert error(schedule, 4).startswith("rank 2 runs B0 (position 0) before F0 (position 1)")


def test_check_finds_a_w_missing_or_before_its_b() -> None:
    schedule = zero_bubble_h1(3, 3)
    schedule[1].remove(Action("W", 2))
    assert error(schedule, 3).startswith("rank 1 never runs W2")
    schedule = zero_bubble_h1(3, 3)
    schedule[0].remove(Action("W", 0))
    schedule[0].insert(0, Action("W", 0))
    assert error(schedule, 3).startswith("rank 0 runs W0 (position 0) before B0")


def test_check_finds_a_cross_rank_deadlock() -> None:
    schedule = one_f_one_b(3, 4)  # rank 0: F0 F1 F2 B0 ...; swap F1 and B0
    schedule[0][1], schedule[0][3] = schedule[0][3], schedule[0][1]
    text = error(schedule, 4)
    assert text.startswith("deadlock: rank 0 waits at B0 for the gradient of micro-batch 0")
    assert "rank 1 waits at F1 for the activation of micro-batch 1 from rank 0" in text


def test_check_finds_out_of_range_actions() -> None:
    assert "micro-batch 4, but there are m=4" in error([[Action("F", 4)]], 4)
    assert "chunk 2, but each rank holds 2" in error([[Action("F", 0, 2)]], 1, chunks=2)
    assert "op 'X'" in error([[Action("X", 0)]], 1)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: one_f_one_b(3, 2),
            r"1F1B needs at least as many micro-batches as stages: got "
            r"m=2 < p=3; use m >= 3",
        ),
        (lambda: zero_bubble_h1(4, 3), r"ZB-H1 needs .* m=3 < p=4; use m >= 4"),
        (lambda: interleaved_1f1b(4, 6, 2), r"multiple of the stages .* use m = 8 or 4"),
        (lambda: interleaved_1f1b(2, 4, 0), r"chunks must be an integer >= 1"),
        (lambda: gpipe(0, 3), r"stages must be an integer >= 1"),
        (lambda: gpipe(2, 0), r"microbatches must be an integer >= 1"),
    ],
)
def test_bad_sizes_are_refused_with_the_fix(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_render_rows_and_timeline() -> None:
    assert render(one_f_one_b(2, 2)) == "rank 0: F0 F1 B0 B1\nrank 1: F0 B0 F1 B1"
    sim = simulate(gpipe(2, 2), ONE, ONE)
    assert isinstance(sim, Simulation)
    assert render(sim).splitlines() == ["rank 0: F0 F1 .  .  B1 B0", "rank 1: .  F0 F1 B1 B0 ."]
