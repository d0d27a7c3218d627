"""Chapter 5: pipeline schedules as data, their messages, and a checker.

A pipeline splits the model's layers over ``p`` ranks (stages) and the batch into ``m``
micro-batches. A *schedule* is, per rank, the ordered list of what that rank computes:
``F`` (forward of one micro-batch through its layers), ``B`` (backward) and, for the zero
bubble schedules, ``W``. Nothing here runs a model: the schedules are plain lists, the
sends and receives are *derived* from them (:func:`messages`), :func:`check_schedule`
proves one correct before anything runs, and ``pipeline_sim.simulate`` times it.

- **The bubble** (GPipe, Huang et al. 2019): stage ``r`` waits for the first micro-batch
  to reach it and for the last gradient to come back, so with equal stages and free
  communication a share ``(p - 1) / (m + p - 1)`` of every rank's time is idle.
  :func:`gpipe` runs all forwards, then all backwards: it holds all ``m`` micro-batches'
  activations at once.
- **1F1B** (PipeDream-Flush, Narayanan et al. 2021 "Memory-Efficient Pipeline-Parallel DNN
  Training"): after ``p - r - 1`` warm-up forwards, rank ``r`` alternates one forward and
  one backward. Same bubble as GPipe, but at most ``p - r`` micro-batches are alive on
  rank ``r``: memory is bounded by ``p``, not ``m``.
- **Interleaving** (Megatron-LM, Narayanan et al. 2021 "Efficient Large-Scale Language
  Model Training on GPU Clusters"): each rank holds ``v`` chunks of layers, virtual
  stages ``r, r + p, r + 2p, ...``. Each action is ``v`` times shorter, so the fill and
  drain shrink ``v``-fold: the bubble becomes ``(1/v) (p - 1) / m`` of the ideal time,
  for ``v`` times more messages.
- **Zero bubble** (Qi et al. 2023 "Zero Bubble Pipeline Parallelism"): the backward splits
  into ``B`` (the input gradient, which the previous stage waits for) and ``W`` (the weight
  gradient, which nobody waits for). Deferring ``W`` into the idle slots gives ZB-H1:
  bubble ``(p - 1)(t_F + t_B - t_W)`` instead of ``(p - 1)(t_F + t_B + t_W)``, with a peak
  activation count (the most on any rank) no higher than 1F1B's ``p``.

Names: an :class:`Action` prints as ``F3`` (forward of micro-batch 3, chunk 0) or
``F3.1`` (chunk 1); the chunk is shown only when it is not 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

OPS = ("F", "B", "W")  # forward, backward (input gradient when W is split off), weight grad


@dataclass(frozen=True)
class Action:
    """Chapter 5: one unit of work on one rank: ``op`` of ``microbatch`` on its ``chunk``."""

    op: str  # "F" forward, "B" backward (input-gradient half if W is split off), "W" weights
    microbatch: int  # 0 .. m - 1
    chunk: int = 0  # the virtual stage index on this rank (0 without interleaving)

    def __str__(self) -> str:
        return f"{self.op}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")

    @classmethod
    def parse(cls, text: str) -> Action:
        """Chapter 5: the action written ``F3`` or ``B3.1`` (the inverse of ``str``)."""
        number, _, chunk = text[1:].partition(".")
        if text[:1] not in OPS or not number.isdigit() or not (chunk or "0").isdigit():
            raise ValueError(f"cannot read {text!r} as an action; write e.g. 'F3', 'B3.1', 'W0'")
        return cls(text[0], int(number), int(chunk or 0))


Schedule = list[list[Action]]  # one ordered list of actions per pipeline rank


def virtual_stage(rank: int, chunk: int, stages: int) -> int:
    """Chapter 5: Megatron's interleaving: rank ``r`` holds virtual stages r, r + p, r + 2p..."""
    return chunk * stages + rank


def _check_count(name: str, value: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 ({meaning}), got {value!r}")


def _check_sizes(stages: int, microbatches: int, chunks: int = 1) -> None:
    _check_count("stages", stages, "pipeline ranks")
    _check_count("microbatches", microbatches, "micro-batches per step")
    _check_count("chunks", chunks, "model chunks per rank")


def _check_enough_microbatches(name: str, stages: int, microbatches: int) -> None:
    if microbatches < stages:
        raise ValueError(
            f"{name} needs at least as many micro-batches as stages: got m={microbatches} < "
            f"p={stages}; use m >= {stages}"
        )


def gpipe(stages: int, microbatches: int) -> Schedule:
    """Chapter 5: GPipe: every forward, then every backward, last micro-batch first.

    Backwards in reverse order, as drawn in the GPipe paper (Huang et al. 2019, fig. 2):
    the last stage finishes ``F(m-1)`` last and turns straight round into ``B(m-1)``, and
    activations are freed as a stack. (torch's ``ScheduleGPipe`` uses forward order; with
    equal stages both take the same time and both hold all ``m`` micro-batches.)
    """
    _check_sizes(stages, microbatches)
    forwards = [Action("F", i) for i in range(microbatches)]
    backwards = [Action("B", i) for i in reversed(range(microbatches))]
    return [forwards + backwards for _ in range(stages)]


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """Chapter 5: 1F1B (PipeDream-Flush): warm-up, one forward one backward, cool-down.

    Rank ``r`` runs ``p - r - 1`` warm-up forwards, then alternates ``F(i + p - r - 1)``,
    ``B(i)``, then runs the backwards left: at most ``p - r`` micro-batches alive.
    """
    _check_sizes(stages, microbatches)
    _check_enough_microbatches("1F1B", stages, microbatches)
    schedule = []
    for rank in range(stages):
        warmup = stages - rank - 1
        actions = [Action("F", i) for i in range(warmup)]
        for i in range(microbatches - warmup):
            actions += [Action("F", warmup + i), Action("B", i)]
        actions += [Action("B", i) for i in range(microbatches - warmup, microbatches)]
        schedule.append(actions)
    return schedule


def _interleaved_action(op: str, k: int, stages: int, chunks: int) -> Action:
    """The k-th forward (or backward) on a rank in Megatron's interleaved order."""
    group, within = divmod(k, stages * chunks)  # groups of p micro-batches x v chunks
    chunk = within // stages
    if op == "B":  # backwards walk the chunks from the last virtual stage down
        chunk = chunks - 1 - chunk
    return Action(op, group * stages + within % stages, chunk)


def interleaved_1f1b(stages: int, microbatches: int, chunks: int) -> Schedule:
    """Chapter 5: Megatron-LM's interleaved 1F1B (Narayanan et al. 2021), ``v = chunks``.

    Forwards run in groups of ``p`` micro-batches through chunk 0, then chunk 1, ...;
    backwards likewise from the last chunk down. Rank ``r`` warms up with Megatron's
    ``2 (p - r - 1) + (v - 1) p`` forwards, then alternates. Megatron needs ``m`` to be a
    multiple of ``p``; with one chunk it runs plain 1F1B, and so does this function.
    """
    _check_sizes(stages, microbatches, chunks)
    if chunks == 1:
        return one_f_one_b(stages, microbatches)
    if microbatches % stages:
        lower = microbatches // stages * stages
        raise ValueError(
            f"interleaved 1F1B needs the micro-batches to be a multiple of the stages (as in "
            f"Megatron-LM): got m={microbatches}, p={stages}; use m = "
            f"{lower + stages}" + (f" or {lower}" if lower else "")
        )
    total = microbatches * chunks
    schedule = []
    for rank in range(stages):
        warmup = min(2 * (stages - rank - 1) + (chunks - 1) * stages, total)
        forward = [_interleaved_action("F", k, stages, chunks) for k in range(total)]
        backward = [_interleaved_action("B", k, stages, chunks) for k in range(total)]
        actions = forward[:warmup]
        for k in range(total - warmup):
            actions += [forward[warmup + k], backward[k]]
        schedule.append(actions + backward[total - warmup :])
    return schedule


def zero_bubble_h1(stages: int, microbatches: int) -> Schedule:
    """Chapter 5: ZB-H1 (Qi et al. 2023): 1F1B's order with each W deferred on later ranks.

    Rank ``r`` runs 1F1B's forwards and backwards (``B`` is now only the input gradient,
    which the previous rank waits for) and runs ``W(i)`` only once ``r`` newer backwards
    are done; the deferred ``W``s fill the drain. Rank ``r`` holds at most ``(p - r) + r =
    p`` micro-batches: every rank reaches 1F1B's peak (rank 0's), none exceeds it.
    """
    _check_sizes(stages, microbatches)
    _check_enough_microbatches("ZB-H1", stages, microbatches)
    schedule = []
    for rank in range(stages):
        warmup = stages - rank - 1
        actions = [Action("F", i) for i in range(warmup)]
        deferred: deque[int] = deque()  # micro-batches whose B ran and W did not
        for i in range(microbatches):
            if warmup + i < microbatches:
                actions.append(Action("F", warmup + i))
            actions.append(Action("B", i))
            deferred.append(i)
            if len(deferred) > rank:
                actions.append(Action("W", deferred.popleft()))
        schedule.append(actions + [Action("W", i) for i in deferred])
    return schedule


@dataclass(frozen=True)
class Message:
    """Chapter 5: one point-to-point transfer, seen from one end.

    ``(what, microbatch, stage)`` names the tensor and is the same on both ends (a p2p
    tag): ``stage`` is the virtual stage that *produced* it (its output activation, or the
    gradient with respect to its input).
    """

    kind: str  # "send" or "recv"
    what: str  # "activation" (forward, to stage + 1) or "gradient" (backward, to stage - 1)
    microbatch: int  # 0 .. m - 1
    stage: int  # the producing virtual stage
    peer: int  # the rank at the other end

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.what, self.microbatch, self.stage)

    def __str__(self) -> str:
        to = "to" if self.kind == "send" else "from"
        return (
            f"{self.kind} {self.what} {self.microbatch} of stage {self.stage} {to} rank {self.peer}"
        )


@dataclass(frozen=True)
class Step:
    """Chapter 5: an action with its receive (wait before it) and its send (post after it)."""

    action: Action
    recv: Message | None  # None on the first stage's F, the last stage's B, every W
    send: Message | None  # None on the last stage's F, the first stage's B, every W


def _step(action: Action, rank: int, stages: int, chunks: int) -> Step:
    """Derive an action's messages from the stage map; with p = 1 nothing crosses ranks."""
    v, last = virtual_stage(rank, action.chunk, stages), stages * chunks - 1
    prev, after = (v - 1) % stages, (v + 1) % stages  # ranks of stages v - 1 and v + 1
    recv = send = None
    if stages > 1 and action.op == "F":
        if v > 0:
            recv = Message("recv", "activation", action.microbatch, v - 1, prev)
        if v < last:
            send = Message("send", "activation", action.microbatch, v, after)
    elif stages > 1 and action.op == "B":
        if v < last:
            recv = Message("recv", "gradient", action.microbatch, v + 1, after)
        if v > 0:
            send = Message("send", "gradient", action.microbatch, v, prev)
    return Step(action, recv, send)


def messages(schedule: Schedule, chunks: int = 1) -> list[list[Step]]:
    """Chapter 5: per rank, each action as a :class:`Step` with the p2p calls around it.

    An executor walks ``messages(schedule)[rank]`` in order: receive ``step.recv`` (if any),
    run ``step.action``, post ``step.send`` (if any) without waiting for it (``isend``).
    """
    stages = len(schedule)
    return [
        [_step(a, rank, stages, chunks) for a in actions] for rank, actions in enumerate(schedule)
    ]


Timeline = list[list[tuple[Action, float, float]]]  # per rank: (action, start, end)


def replay(
    schedule: Schedule, duration: Callable[[int, Action], float], t_comm: float = 0, chunks: int = 1
) -> tuple[Timeline, list[tuple[int, Step]]]:
    """Chapter 5: run a schedule in time; return the timeline and the ranks left waiting.

    Each rank runs its actions in order; an action starts when its rank is free and its
    message has arrived (the sender's end + ``t_comm``). If every unfinished rank waits on
    a message that is never sent, that is a deadlock: the second value lists each waiting
    rank and the step it is stuck at (empty when every rank finished).
    """
    steps = messages(schedule, chunks)
    arrival: dict[tuple[str, int, int], float] = {}  # message key -> when it is received
    timeline: Timeline = [[] for _ in schedule]
    clock = [0] * len(schedule)
    moved = True
    while moved:
        moved = False
        for rank, todo in enumerate(steps):
            row = timeline[rank]
            while len(row) < len(todo):
                step, start = todo[len(row)], clock[rank]
                if step.recv is not None:
                    ready = arrival.get(step.recv.key)
                    if ready is None:
                        break  # wait for another rank
                    start = max(start, ready)
                clock[rank] = start + duration(rank, step.action)
                row.append((step.action, start, clock[rank]))
                if step.send is not None:
                    arrival[step.send.key] = clock[rank] + t_comm
                moved = True
    waiting = [
        (r, todo[len(timeline[r])]) for r, todo in enumerate(steps) if len(timeline[r]) < len(todo)
    ]
    return timeline, waiting


def _row(actions: list[Action]) -> str:
    return " ".join(str(a) for a in actions) or "(nothing)"


def _check_ranges(schedule: Schedule, microbatches: int, chunks: int) -> None:
    for rank, actions in enumerate(schedule):
        for i, a in enumerate(actions):
            where = f"rank {rank}, position {i}"
            if not isinstance(a, Action):
                raise ValueError(f"{where}: {a!r} is not an Action; write Action('F', 0)")
            if a.op not in OPS:
                raise ValueError(f"{where}: {a} has op {a.op!r}; use 'F', 'B' or 'W'")
            if not 0 <= a.microbatch < microbatches:
                raise ValueError(
                    f"{where}: {a} has micro-batch {a.microbatch}, but there are m="
                    f"{microbatches} (0..{microbatches - 1})"
                )
            if not 0 <= a.chunk < chunks:
                raise ValueError(
                    f"{where}: {a} has chunk {a.chunk}, but each rank holds {chunks} "
                    f"chunk(s) (0..{chunks - 1})"
                )


def _check_each_once(schedule: Schedule, microbatches: int, chunks: int) -> None:
    split = any(a.op == "W" for actions in schedule for a in actions)
    ops = OPS if split else OPS[:2]
    for rank, actions in enumerate(schedule):
        seen: dict[Action, int] = {}
        for i, a in enumerate(actions):
            if a in seen:
                raise ValueError(
                    f"rank {rank} runs {a} twice (positions {seen[a]} and {i}); each action "
                    "runs exactly once per rank"
                )
            seen[a] = i
        for mb in range(microbatches):
            for chunk in range(chunks):
                for op in ops:
                    if Action(op, mb, chunk) not in seen:
                        why = " (the schedule splits the backward, so every B needs its W)"
                        raise ValueError(
                            f"rank {rank} never runs {Action(op, mb, chunk)}; every rank runs "
                            f"{', '.join(ops)} once per micro-batch and chunk"
                            + (why if op == "W" else "")
                        )


def _local_needs(a: Action, stages: int, chunks: int) -> list[tuple[Action, str]]:
    """What ``a`` needs from its own rank, and why (with p = 1 neighbouring chunks too)."""
    needs = []
    if a.op == "F" and stages == 1 and a.chunk > 0:
        needs.append((Action("F", a.microbatch, a.chunk - 1), "the previous stage's output"))
    if a.op == "B":
        needs.append((Action("F", a.microbatch, a.chunk), "the activations its forward saved"))
        if stages == 1 and a.chunk < chunks - 1:
            needs.append((Action("B", a.microbatch, a.chunk + 1), "the next stage's gradient"))
    if a.op == "W":
        needs.append((Action("B", a.microbatch, a.chunk), "the output gradient its B received"))
    return needs


def _check_local_order(schedule: Schedule, chunks: int) -> None:
    for rank, actions in enumerate(schedule):
        position = {a: i for i, a in enumerate(actions)}
        for i, a in enumerate(actions):
            for need, why in _local_needs(a, len(schedule), chunks):
                if position[need] > i:
                    raise ValueError(
                        f"rank {rank} runs {a} (position {i}) before {need} (position "
                        f"{position[need]}), but {a} needs {why}; move {need} before {a}"
                    )


def _deadlock_message(schedule: Schedule, chunks: int) -> str | None:
    timeline, waiting = replay(schedule, lambda rank, action: 1, 0, chunks)
    if not waiting:
        return None
    stages = len(schedule)
    parts = []
    for rank, step in waiting:
        message = step.recv
        assert message is not None  # only a receive can block
        op = "F" if message.what == "activation" else "B"
        producer = Action(op, message.microbatch, message.stage // stages)
        parts.append(
            f"rank {rank} waits at {step.action} for the {message.what} of micro-batch "
            f"{message.microbatch} from rank {message.peer} (its {producer})"
        )
    ran = "; ".join(
        f"rank {r} ran: {_row([a for a, _, _ in row])}" for r, row in enumerate(timeline)
    )
    return (
        f"deadlock: {', '.join(parts)}; each waits on a message that a waiting rank sends "
        f"only later in its own order, so reorder them. Before that, {ran}"
    )


def check_schedule(schedule: Schedule, microbatches: int, chunks: int = 1) -> None:
    """Chapter 5: raise ValueError naming the first wrong action (and its rank), else None.

    Checks, in order: every action's op / micro-batch / chunk is in range; every rank runs
    each ``F`` and ``B`` (and ``W``, if any rank has one) exactly once per micro-batch and
    chunk; on each rank a ``B`` comes after its ``F`` and a ``W`` after its ``B``; and,
    by replaying the schedule, that no set of ranks waits on each other forever.
    """
    _check_count("microbatches", microbatches, "micro-batches per step")
    _check_count("chunks", chunks, "model chunks per rank")
    if not isinstance(schedule, list) or not schedule:
        raise ValueError(f"a schedule is a non-empty list with one list per rank, got {schedule!r}")
    _check_ranges(schedule, microbatches, chunks)
    _check_each_once(schedule, microbatches, chunks)
    _check_local_order(schedule, chunks)
    problem = _deadlock_message(schedule, chunks)
    if problem is not None:
        raise ValueError(problem)
