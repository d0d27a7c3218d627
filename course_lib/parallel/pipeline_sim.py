"""Chapter 5: time a pipeline schedule without a model: makespan, bubble, live activations.

Every action gets a cost; a rank runs its actions in order, and an action also waits for
the message it receives (the sender's end + ``t_comm``). From the resulting timeline:

- ``bubble_fraction`` = idle share of rank-time = ``1 - total busy / (p * makespan)``.
  With equal stages and free messages this is ``(p - 1) / (m + p - 1)`` for GPipe and
  1F1B, and ``(p - 1) / (v m + p - 1)`` for interleaved 1F1B: the same thing as
  Megatron's "bubble time / ideal time = (1/v)(p - 1)/m", over a different denominator.
- ``peak_activations``: per rank, the most (micro-batch, chunk) pairs alive at once; one
  is alive from the start of its ``F`` until its backward completes (``W`` if the
  schedule splits the backward, else ``B``). With chunks, each pair is 1/v of a
  micro-batch's activations on that rank.

Costs are for one micro-batch through a rank's whole share of layers: with ``chunks = v``
each action costs ``cost / v``, so interleaved and plain schedules compare directly.
Pass ``fractions.Fraction`` costs for exact arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from course_lib.parallel.schedules import Action, Schedule, Timeline, check_schedule, replay

Cost = float | Sequence[float]  # one value for every rank, or one per rank (length p)


@dataclass(frozen=True)
class Simulation:
    """Chapter 5: the timed run of a schedule (see the module docstring for definitions)."""

    timeline: Timeline  # per rank: (action, start, end), in the rank's order
    makespan: float  # when the last action ends
    bubble_fraction: float  # 1 - sum(busy) / (p * makespan)
    peak_activations: list[int]  # per rank: most (micro-batch, chunk) pairs alive at once
    busy: list[float]  # per rank: total time spent computing


def _per_rank(cost: Cost, name: str, stages: int) -> list[float]:
    values = list(cost) if isinstance(cost, Sequence) else [cost] * stages
    if len(values) != stages:
        raise ValueError(
            f"{name} has {len(values)} per-rank costs but the schedule has p={stages} ranks; "
            f"give one number or a list of {stages}"
        )
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0 (a time), got {list(values)}")
    return values


def peak_activations(schedule: Schedule) -> list[int]:
    """Chapter 5: per rank, the most (micro-batch, chunk) pairs alive at once.

    Alive from the ``F`` until the backward completes: ``W`` where the rank has one for
    that pair, else ``B``. A rank runs one action at a time, so walking its order suffices.
    """
    peaks = []
    for actions in schedule:
        split = {(a.microbatch, a.chunk) for a in actions if a.op == "W"}
        alive = peak = 0
        for a in actions:
            if a.op == "F":
                alive += 1
                peak = max(peak, alive)
            elif (a.op == "W") or (a.op == "B" and (a.microbatch, a.chunk) not in split):
                alive -= 1
        peaks.append(peak)
    return peaks


def simulate(
    schedule: Schedule,
    t_f: Cost,
    t_b: Cost,
    t_w: Cost = 0,
    t_comm: float = 0,
    chunks: int = 1,
) -> Simulation:
    """Chapter 5: time ``schedule`` (checked first) with per-micro-batch costs per rank.

    ``t_b`` is the input-gradient half of the backward and ``t_w`` the weight-gradient
    half. A schedule without ``W`` actions computes both halves in ``B``, so there ``B``
    costs ``t_b + t_w``: the same arguments time 1F1B and ZB-H1 fairly. ``t_comm`` is the
    latency of every message between ranks.
    """
    stages = len(schedule) if isinstance(schedule, list) else 0
    numbers = [getattr(a, "microbatch", 0) for row in schedule for a in row]
    microbatches = 1 + max((n for n in numbers if isinstance(n, int)), default=0)
    check_schedule(schedule, microbatches, chunks)
    if t_comm < 0:
        raise ValueError(f"t_comm must be >= 0 (a latency), got {t_comm}")
    f, b, w = (_per_rank(c, n, stages) for c, n in ((t_f, "t_f"), (t_b, "t_b"), (t_w, "t_w")))
    split = any(a.op == "W" for row in schedule for a in row)
    cost = {"F": f, "B": b if split else [x + y for x, y in zip(b, w, strict=True)], "W": w}

    def duration(rank: int, action: Action) -> float:
        return cost[action.op][rank] / chunks

    timeline, _ = replay(schedule, duration, t_comm, chunks)
    makespan = max((end for row in timeline for _, _, end in row), default=0)
    busy = [sum(end - start for _, start, end in row) for row in timeline]
    bubble = 1 - sum(busy) / (stages * makespan) if makespan else 0
    return Simulation(timeline, makespan, bubble, peak_activations(schedule), busy)


def _render_timeline(simulation: Simulation) -> str:
    """One row per rank on a time grid: a cell per shortest action, '.' where idle."""
    rows = simulation.timeline
    durations = [end - start for row in rows for _, start, end in row if end > start]
    if not durations:
        return render([[a for a, _, _ in row] for row in rows])
    unit = min(durations)
    width = 1 + max(len(str(a)) for row in rows for a, _, _ in row)
    cells = round(simulation.makespan / unit)
    lines = []
    for rank, row in enumerate(rows):
        line = ["." for _ in range(cells)]
        for action, start, end in row:
            first, last = round(start / unit), max(round(end / unit), round(start / unit) + 1)
            line[first:last] = [str(action)] + [""] * (last - first - 1)
        lines.append(f"rank {rank}: " + "".join(c.ljust(width) for c in line).rstrip())
    return "\n".join(lines)


def render(item: Schedule | Simulation) -> str:
    """Chapter 5: a schedule as text, one row per rank: ``rank 0: F0 F1 B0 F2 B1 ...``.

    A :class:`Simulation` is drawn on a time grid (one cell per shortest action, ``.``
    where the rank is idle; approximate when costs are not multiples of each other).
    """
    if isinstance(item, Simulation):
        return _render_timeline(item)
    width = max((len(str(a)) for row in item for a in row), default=0)
    return "\n".join(
        f"rank {r}: " + " ".join(str(a).ljust(width) for a in row).rstrip()
        for r, row in enumerate(item)
    )
