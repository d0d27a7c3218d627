"""The shared grading helper: cases, the forbidden-call guard, failures turned into hints."""

import grading_workers as W
import pytest
import torch.distributed as dist

from course_lib.grading import core
from course_lib.launch import DeadlineError, RankError


def test_cases_describe_themselves():
    assert core.Case(3).describe() == "on 3 ranks"
    sub = core.Case(4, (2, 1, 3))
    assert sub.members() == (1, 2, 3)
    assert "global ranks (1, 2, 3) of 4" in sub.describe()


def test_a_case_outside_its_world_is_refused_before_spawning():
    with pytest.raises(ValueError, match="ranks must lie in 0..1"):
        core.run_cases(W.sum_of_ranks, [core.Case(2, (1, 2))])


@pytest.mark.timeout(120)
def test_run_cases_runs_each_case_on_its_members_in_group_rank_order():
    cases = [core.Case(2), core.Case(4, (1, 2, 3)), core.Case(4, (0, 2))]
    out = dict(core.run_cases(W.sum_of_ranks, cases))
    assert out[cases[0]] == [(0, 1.0), (1, 1.0)]
    assert out[cases[1]] == [(0, 6.0), (1, 6.0), (2, 6.0)]
    assert out[cases[2]] == [(0, 2.0), (1, 2.0)]


def test_forbid_refuses_inside_and_restores_after():
    real = dist.all_reduce
    with core.forbid_collectives("use dist.isend / dist.irecv"):
        with pytest.raises(core.ForbiddenCall, match="dist.all_reduce is not allowed.*isend"):
            dist.all_reduce(None)
        from torch.distributed import broadcast  # a late import is caught too

        with pytest.raises(core.ForbiddenCall, match="dist.broadcast"):
            broadcast(None, 0)
        assert dist.isend is not None  # point-to-point stays
    assert dist.all_reduce is real and dist.distributed_c10d.all_reduce is real


def _rank_error(**tracebacks: str) -> RankError:
    reports = {int(k[1:]): v for k, v in tracebacks.items()}
    return RankError("failed", next(iter(reports)), 1, reports)


KW = dict(what="the ring", module_name="my_ring", hang_hint="post every irecv")


def test_a_stub_is_not_implemented_yet():
    err = core.learner_error(_rank_error(r0="...\nNotImplementedError: Your code here"), **KW)
    assert isinstance(err, NotImplementedError)
    assert str(err) == "the ring is not implemented yet: replace the stub in my_ring.py"


def test_a_check_is_quoted_with_rank_case_and_the_learners_line():
    tb = (
        'Traceback (most recent call last):\n  File "/x/my_ring.py", line 14, in ring\n'
        "    ...\ncourse_lib.grading.core.CaseFailed: on 3 ranks: AssertionError: chunk 2 wrong"
    )
    hang = "course_lib.grading.core.CaseFailed: on 3 ranks: RuntimeError: Connection closed by peer"
    err = core.learner_error(_rank_error(r2=hang, r1=tb), **KW)
    assert str(err) == (
        "rank 1: on 3 ranks: AssertionError: chunk 2 wrong (my_ring.py, line 14, in ring)"
    )


@pytest.mark.parametrize(
    "words", ["Timed out waiting 10000ms for recv", "Connection closed by peer [127.0.0.1]:1"]
)
def test_every_form_of_a_wait_that_never_ended_is_the_hang_hint(words):
    tb = f"course_lib.grading.core.CaseFailed: on 4 ranks: RuntimeError: {words}"
    err = core.learner_error(_rank_error(r3=tb), **KW)
    assert "never came (on 4 ranks): post every irecv" in str(err)


def test_the_deadline_is_the_hang_hint_too():
    err = core.learner_error(DeadlineError("late", 25.0, [0, 1], {}), **KW)
    assert "no rank finished within 25 s" in str(err) and "post every irecv" in str(err)


@pytest.mark.timeout(120)
def test_a_real_deadlock_becomes_the_hint_from_the_process_group_timeout():
    # gloo's timeout (HANG_S) ends the wait, long before the spawn's deadline would.
    hang = r"waited more than 10 s for a message that never came \(on 2 ranks\): post every"
    with pytest.raises(AssertionError, match=hang):
        core.grade(W.first_waits_forever, [core.Case(2)], **KW)
