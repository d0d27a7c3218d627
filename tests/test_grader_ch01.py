"""Chapter 1's grader (grade_ring) on attempts: wrong ones fail with their hint, valid ones pass.

Each attempt is a ``my_ring.py`` written into a temporary folder, the notebook's folder as
the grader sees it; most are the reference solution with one small edit.
"""

import numpy as np
import pytest
import torch

from course_lib.cost import comm_model as M
from course_lib.grading.ch01_collectives import (
    GIVEN_SIZES,
    GIVEN_TIMES,
    _check_bytes,
    grade_deviation,
    grade_fit,
    grade_ring,
)
from course_lib.grading.core import DEFAULT_CASES, Case

REFERENCE = """\
import torch
import torch.distributed as dist


def ring_all_reduce(tensor, group=None):
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    right, left = (rank + 1) % n, (rank - 1) % n
    chunks = torch.tensor_split(tensor.view(-1), n)

    def exchange(send_idx, recv_buf):
        reqs = [
            dist.isend(chunks[send_idx].contiguous(), group=group, group_dst=right),
            dist.irecv(recv_buf, group=group, group_src=left),
        ]
        for req in reqs:
            req.wait()

    for step in range(n - 1):  # reduce-scatter
        s, r = (rank - step) % n, (rank - step - 1) % n
        buf = torch.empty_like(chunks[r])
        exchange(s, buf)
        chunks[r].add_(buf)
    for step in range(n - 1):  # all-gather
        s, r = (rank + 1 - step) % n, (rank - step) % n
        buf = torch.empty_like(chunks[r])
        exchange(s, buf)
        chunks[r].copy_(buf)
    return tensor


def ring_all_gather(tensor, group=None):
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    right, left = (rank + 1) % n, (rank - 1) % n
    chunks = torch.tensor_split(tensor.view(-1), n)
    for step in range(n - 1):
        s, r = (rank - step) % n, (rank - step - 1) % n
        buf = torch.empty_like(chunks[r])
        reqs = [
            dist.isend(chunks[s].contiguous(), group=group, group_dst=right),
            dist.irecv(buf, group=group, group_src=left),
        ]
        for req in reqs:
            req.wait()
        chunks[r].copy_(buf)
    return tensor
"""

# The reduce-scatter loop of ring_all_reduce and the all-gather loop, as written above.
RS_LOOP = "    for step in range(n - 1):  # reduce-scatter\n"
AG_LOOP = "    for step in range(n - 1):  # all-gather\n"
AR_EXCHANGE = """\
        reqs = [
            dist.isend(chunks[send_idx].contiguous(), group=group, group_dst=right),
            dist.irecv(recv_buf, group=group, group_src=left),
        ]
        for req in reqs:
            req.wait()
"""
AR_HEAD = "def ring_all_reduce(tensor, group=None):\n"
AG_HEAD = "def ring_all_gather(tensor, group=None):\n"


def edit(*pairs: str, src: str = REFERENCE) -> str:
    """The reference with each ``old -> new`` pair replaced (each ``old`` must be there)."""
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in src, old
        src = src.replace(old, new)
    return src


def replace_body(head: str, body: str, src: str = REFERENCE) -> str:
    """The reference with the function starting at ``head`` replaced by ``head + body``."""
    start = src.index(head)
    end = src.find("\n\n\ndef ", start)
    end = len(src) if end < 0 else end + 1
    return src[:start] + head + body + ("\n\n" if end < len(src) else "") + src[end:]


GATHER_RANKS = "    n, rank = dist.get_world_size(group), dist.get_rank(group)\n"

NAIVE_GATHER_BROADCAST = """\
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    if rank == 0:
        for r in range(1, n):
            buf = torch.empty_like(tensor)
            dist.recv(buf, peer(r), group=group)
            tensor.add_(buf)
        for r in range(1, n):
            dist.send(tensor, peer(r), group=group)
    else:
        dist.send(tensor, peer(0), group=group)
        dist.recv(tensor, peer(0), group=group)
    return tensor
"""

SEND_EVERYTHING = """\
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    others = [r for r in range(n) if r != rank]
    bufs = [torch.empty_like(tensor) for _ in others]
    reqs = [dist.isend(tensor.clone(), group=group, group_dst=r) for r in others]
    reqs += [dist.irecv(b, group=group, group_src=r) for b, r in zip(bufs, others)]
    for req in reqs:
        req.wait()
    for b in bufs:
        tensor.add_(b)
    return tensor
"""

WRONG = {
    # Issue item 1: built-in collectives and the library's ring are ruled out.
    "all_reduce_builtin": (
        "ring_all_reduce",
        replace_body(AR_HEAD, "    dist.all_reduce(tensor, group=group)\n    return tensor\n"),
        r"dist\.all_reduce is not allowed.*point-to-point",
    ),
    "all_gather_by_all_reduce_imported_by_name": (
        "ring_all_gather",
        "from torch.distributed import all_reduce\n"
        + replace_body(AG_HEAD, "    all_reduce(tensor, group=group)\n    return tensor\n"),
        r"dist\.all_reduce is not allowed.*isend",
    ),
    "library_ring": (
        "ring_all_reduce",
        "from course_lib.collectives import ring_all_reduce as library_ring\n"
        + replace_body(AR_HEAD, "    return library_ring(tensor, group)\n"),
        r"course_lib\.collectives\.ring_all_reduce is not allowed",
    ),
    # Issue item 2: adding instead of overwriting in the all-gather.
    "all_gather_adds": (
        "ring_all_gather",
        edit(
            "        chunks[r].copy_(buf)\n    return tensor\n",
            "        chunks[r].add_(buf)\n    return tensor\n",
        ),
        r"overwrite \(copy_\), do not add",
    ),  # fmt: skip
    # Issue item 10: group ranks passed where global ranks are needed (the old solution).
    "group_ranks_as_dst_src": (
        "ring_all_reduce",
        edit(
            "group=group, group_dst=right",
            "right, group=group",
            "group=group, group_src=left",
            "left, group=group",
        ),
        r"GLOBAL ranks.*group_dst=/group_src=.*get_global_rank",
    ),  # fmt: skip
    "world_size_without_group": (
        "ring_all_reduce",
        edit(
            "    n, rank = dist.get_world_size(group), dist.get_rank(group)\n    right",
            "    n, rank = dist.get_world_size(), dist.get_rank(group)\n    right",
        ),
        r"get_world_size\(\).*without group.*dist\.get_world_size\(group\)",
    ),  # fmt: skip
    "rank_without_group": (
        "ring_all_reduce",
        edit(
            "    n, rank = dist.get_world_size(group), dist.get_rank(group)\n    right",
            "    n, rank = dist.get_world_size(group), dist.get_rank()\n    right",
        ),
        r"without group.*dist\.get_rank\(group\)",
    ),  # fmt: skip
    # The byte check: right values, but no ring.
    # At 2 ranks both send what a ring sends; at 3 the per-rank count against comm_model
    # (issue 12, teaching: the exercise's byte-count check) names the bytes.
    "gather_at_rank_0_then_broadcast": (
        "ring_all_reduce",
        replace_body(AR_HEAD, NAIVE_GATHER_BROADCAST),
        r"group rank 0 sent 192 bytes where comm_model\.bytes_sent_per_rank\('ring_all_reduce'"
        r".* = 128 bytes.*ONE chunk",
    ),
    "whole_tensor_to_everyone": (
        "ring_all_reduce",
        replace_body(AR_HEAD, SEND_EVERYTHING),
        r"sent 192 bytes where comm_model.* = 128 bytes.*never the whole tensor",
    ),
    # More typical mistakes.
    "off_by_one_chunk_index": (
        "ring_all_reduce",
        edit(
            "s, r = (rank - step) % n, (rank - step - 1) % n",
            "s, r = (rank - step) % n, (rank - step) % n",
        ),
        r"chunk \d \(elements .*\) is wrong.*(chunk index|own input|misses the input)",
    ),  # fmt: skip
    "no_all_gather_phase": (
        "ring_all_reduce",
        edit(AG_LOOP, "    for step in range(0):  # (all-gather phase forgotten)\n"),
        r"(misses the input of group rank|only this rank's own input).*all around the ring",
    ),
    "only_n_minus_2_steps": (
        "ring_all_reduce",
        edit(RS_LOOP, "    for step in range(n - 2):  # reduce-scatter\n"),
        r"(misses the input of group rank|only this rank's own input).*n-1 reduce-scatter",
    ),
    "adds_in_all_gather_phase": (
        "ring_all_reduce",
        edit(
            "        chunks[r].copy_(buf)\n    return tensor\n\n\ndef ring_all_gather",
            "        chunks[r].add_(buf)\n    return tensor\n\n\ndef ring_all_gather",
        ),
        r"counts the input of group rank.*times.*copy_\), do not add",
    ),  # fmt: skip
    "result_returned_not_in_place": (
        "ring_all_reduce",
        edit(
            "    chunks = torch.tensor_split(tensor.view(-1), n)\n\n    def exchange",
            "    flat = tensor.view(-1).clone()\n    chunks = torch.tensor_split(flat, n)\n\n"
            "    def exchange",
            "        chunks[r].copy_(buf)\n    return tensor\n\n\ndef ring_all_gather",
            "        chunks[r].copy_(buf)\n    return flat.view_as(tensor)\n\n\n"
            "def ring_all_gather",
        ),
        r"returned the right values but `tensor` is unchanged.*in place",
    ),  # fmt: skip
    "all_gather_splits_rows_not_flat": (
        "ring_all_gather",
        edit(
            "    chunks = torch.tensor_split(tensor.view(-1), n)\n    for step",
            "    chunks = torch.tensor_split(tensor, n)\n    for step",
        ),
        r"boundaries are wrong.*tensor_split\(tensor\.view\(-1\), n\)",
    ),  # fmt: skip
    "torch_chunk_instead_of_tensor_split": (
        "ring_all_reduce",
        edit(
            "    chunks = torch.tensor_split(tensor.view(-1), n)\n\n    def exchange",
            "    chunks = torch.chunk(tensor.view(-1), n)\n\n    def exchange",
        ),
        r"chunk index is out of range.*tensor_split.*torch\.chunk",
    ),  # fmt: skip
    "all_gather_one_step_short": (
        "ring_all_gather",
        edit("    for step in range(n - 1):\n", "    for step in range(n - 2):\n"),
        r"(never received|unchanged).*n-1 steps",
    ),
    "stub": (
        "ring_all_reduce",
        replace_body(AR_HEAD, '    """Sum."""\n    raise NotImplementedError\n'),
        None,
    ),
}

# Issue item 9, and another deadlock: both must end in the hang hint, fast.
HANGS = {
    "blocking_send_face_to_face": (
        edit(AR_EXCHANGE,
             "        dist.send(chunks[send_idx].contiguous(), group=group, group_dst=right)\n"
             "        dist.recv(recv_buf, group=group, group_src=left)\n"),
        (Case(2),),
    ),
    "send_and_receive_on_the_right": (  # right and left differ from 3 ranks on
        edit(AR_EXCHANGE, AR_EXCHANGE.replace("left", "right")),
        (Case(3),),
    ),
}  # fmt: skip

# Valid variants: all must pass.
PEER = "    peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))\n"
VALID = {
    "global_ranks_by_get_global_rank_positional": (
        "ring_all_reduce",
        edit(
            "    chunks = torch.tensor_split(tensor.view(-1), n)\n\n    def exchange",
            PEER + "    chunks = torch.tensor_split(tensor.view(-1), n)\n\n    def exchange",
            "group=group, group_dst=right",
            "peer(right), group",
            "group=group, group_src=left",
            "peer(left), group",
        ),
    ),  # fmt: skip
    "batch_isend_irecv": (
        "ring_all_reduce",
        edit(
            AR_EXCHANGE,
            "        ops = [\n"
            "            dist.P2POp(dist.isend, chunks[send_idx].contiguous(), group=group,\n"
            "                       group_peer=right),\n"
            "            dist.P2POp(dist.irecv, recv_buf, group=group, group_peer=left),\n"
            "        ]\n"
            "        for req in dist.batch_isend_irecv(ops):\n"
            "            req.wait()\n",
        ),
    ),  # fmt: skip
    "blocking_send_recv_by_parity": (
        "ring_all_reduce",
        edit(
            AR_EXCHANGE,
            "        send = lambda: dist.send(chunks[send_idx].contiguous(), group=group,\n"
            "                                 group_dst=right)\n"
            "        recv = lambda: dist.recv(recv_buf, group=group, group_src=left)\n"
            "        if rank % 2 == 0:\n"
            "            send(); recv()\n"
            "        else:\n"
            "            recv(); send()\n",
        ),
    ),  # fmt: skip
    "ring_turning_left": (
        "ring_all_reduce",
        edit(
            "right, left = (rank + 1) % n, (rank - 1) % n\n    chunks = torch.tensor_split(tensor.view(-1), n)\n\n",  # noqa: E501
            "right, left = (rank - 1) % n, (rank + 1) % n\n    chunks = torch.tensor_split(tensor.view(-1), n)\n\n",  # noqa: E501
            "s, r = (rank - step) % n, (rank - step - 1) % n\n        buf = torch.empty_like(chunks[r])\n        exchange",  # noqa: E501
            "s, r = (rank + step) % n, (rank + step + 1) % n\n        buf = torch.empty_like(chunks[r])\n        exchange",  # noqa: E501
            "s, r = (rank + 1 - step) % n, (rank - step) % n",
            "s, r = (rank - 1 + step) % n, (rank + step) % n",
        ),
    ),  # fmt: skip
    "all_gather_blocking_by_parity": (
        "ring_all_gather",
        edit(
            "        reqs = [\n"
            "            dist.isend(chunks[s].contiguous(), group=group, group_dst=right),\n"
            "            dist.irecv(buf, group=group, group_src=left),\n"
            "        ]\n"
            "        for req in reqs:\n"
            "            req.wait()\n",
            "        for turn in (rank % 2, 1 - rank % 2):\n"
            "            if turn == 0:\n"
            "                dist.send(chunks[s].contiguous(), group=group, group_dst=right)\n"
            "            else:\n"
            "                dist.recv(buf, group=group, group_src=left)\n",
        ),
    ),  # fmt: skip
}

# Each world size costs a spawn of that many fresh processes (torch imported in each).
# The valid variants, and the attempts that go wrong only on a subgroup or from 3 ranks
# on, run 3 ranks and a subgroup of 2 of them in one spawn of 3 (the reference, below,
# runs every default case, or 2, 3 and 4 ranks in one spawn of 4).
ONE_SPAWN = (Case(4, (0, 2)), Case(4, (1, 2, 3)), Case(4))
THREE_RANKS = (Case(3, (1, 2)), Case(3))
LATE = {
    "group_ranks_as_dst_src",
    "world_size_without_group",
    "rank_without_group",
    "gather_at_rank_0_then_broadcast",
    "whole_tensor_to_everyone",
    "torch_chunk_instead_of_tensor_split",
    "all_gather_splits_rows_not_flat",
}


def _write(tmp_path, monkeypatch, src: str) -> None:
    (tmp_path / "my_ring.py").write_text(src)
    monkeypatch.chdir(tmp_path)


def _gather(fn_name: str) -> bool:
    return fn_name == "ring_all_gather"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fn_name", ["ring_all_reduce", "ring_all_gather"])
def test_reference_passes(tmp_path, monkeypatch, capsys, fn_name):
    """The solution passes (its all-gather on every default case: in the solution notebook)."""
    _write(tmp_path, monkeypatch, REFERENCE)
    cases = ONE_SPAWN if _gather(fn_name) else DEFAULT_CASES
    grade_ring("my_ring", fn_name, gather=_gather(fn_name), cases=cases)
    assert "OK: " in capsys.readouterr().out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_variant_passes(tmp_path, monkeypatch, name):
    fn_name, src = VALID[name]
    _write(tmp_path, monkeypatch, src)
    grade_ring("my_ring", fn_name, gather=_gather(fn_name), cases=THREE_RANKS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_attempt_fails_with_hint(tmp_path, monkeypatch, name):
    fn_name, src, hint = WRONG[name]
    _write(tmp_path, monkeypatch, src)
    if hint is None:
        with pytest.raises(NotImplementedError, match="not implemented yet"):
            grade_ring("my_ring", fn_name, gather=_gather(fn_name))
        return
    cases = THREE_RANKS if name in LATE else DEFAULT_CASES
    with pytest.raises(AssertionError, match=hint):
        grade_ring("my_ring", fn_name, gather=_gather(fn_name), cases=cases)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(HANGS))
def test_deadlock_is_the_hint_from_the_process_group_timeout(tmp_path, monkeypatch, name):
    # The hint comes from gloo's timeout (HANG_S), not from the spawn's later deadline.
    src, cases = HANGS[name]
    _write(tmp_path, monkeypatch, src)
    hang = r"waited more than 10 s .*every isend needs the neighbour's matching irecv"
    with pytest.raises(AssertionError, match=hang):
        grade_ring("my_ring", "ring_all_reduce", cases=cases)


# ----------------------------------------------------------------------------------------
# Part 2 and 3: the relative-error fit and the measured deviation (in-process, no spawn)


def fit_relative(sizes, times, messages, bytes_factor):
    """The solution: least squares on relative residuals, clamped at 0."""
    x = np.asarray(sizes, dtype=float) * bytes_factor
    t = np.asarray(times, dtype=float)
    rows = np.stack([np.full_like(x, messages), x], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(rows, np.ones_like(t), rcond=None)
    if alpha < 0:
        b = x / t
        return 0.0, max(0.0, b.sum() / (b @ b))
    if beta < 0:
        m = messages / t
        return max(0.0, m.sum() / (m @ m)), 0.0
    return alpha, beta


def fit_log_space(sizes, times, messages, bytes_factor):
    """A valid variant: minimise the squared log error (Gauss-Newton from the weighted fit)."""
    alpha, beta = fit_relative(sizes, times, messages, bytes_factor)
    x, t = np.asarray(sizes, dtype=float) * bytes_factor, np.asarray(times, dtype=float)
    for _ in range(20):
        model = alpha * messages + beta * x
        jac = np.stack([np.full_like(x, messages), x], axis=1) / model[:, None]
        step, *_ = np.linalg.lstsq(jac, np.log(t) - np.log(model), rcond=None)
        alpha, beta = max(alpha + step[0], 0.0), max(beta + step[1], 0.0)
    return alpha, beta


def fit_unweighted(sizes, times, messages, bytes_factor):
    x = np.asarray(sizes, dtype=float) * bytes_factor
    design = np.stack([np.full_like(x, messages), x], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, np.asarray(times), rcond=None)
    return max(alpha, 0.0), max(beta, 0.0)


def fit_no_clamp(sizes, times, messages, bytes_factor):
    x = np.asarray(sizes, dtype=float) * bytes_factor
    t = np.asarray(times, dtype=float)
    rows = np.stack([np.full_like(x, messages), x], axis=1) / t[:, None]
    return tuple(np.linalg.lstsq(rows, np.ones_like(t), rcond=None)[0])


def fit_by_the_library(sizes, times, messages, bytes_factor):
    return M.fit_alpha_beta(sizes, times, messages, bytes_factor)


def fit_stub(sizes, times, messages, bytes_factor):
    raise NotImplementedError("Your code here")


def deviation_with(fit, algorithm="naive_all_reduce"):
    def naive_deviation(sizes, ring_times, naive_times, world_size):
        messages, factor = M.alpha_beta_terms("ring_all_reduce", world_size)
        alpha, beta = fit(sizes, ring_times, messages, factor)
        return [
            t / M.predict(algorithm, s, world_size, alpha, beta)
            for s, t in zip(sizes, naive_times, strict=True)
        ]

    return naive_deviation


GIVEN_RATIOS = deviation_with(fit_relative)(
    GIVEN_SIZES, GIVEN_TIMES["ring_all_reduce"], GIVEN_TIMES["naive_all_reduce"], 2
)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fit", [fit_relative, fit_log_space])
def test_relative_fits_pass(capsys, fit):
    for _ in range(5):  # fresh random parameters on every call
        grade_fit(fit)
    assert "OK: " in capsys.readouterr().out


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "fit, hint",
    [
        (fit_unweighted, r"\+-5 % noise.*unweighted least squares.*RELATIVE error"),
        (fit_no_clamp, r"fall with size.*never negative.*set it to 0"),
        (fit_by_the_library, r"comm_model\.fit_alpha_beta is not allowed.*numpy"),
        (lambda *a: 1e-4, r"return \(alpha, beta\), two numbers"),
    ],
)
def test_wrong_fits_fail_with_hint(fit, hint):
    with pytest.raises(AssertionError, match=hint):
        for _ in range(5):
            grade_fit(fit)


@pytest.mark.timeout(30)
def test_fit_stub_is_not_implemented():
    with pytest.raises(NotImplementedError):
        grade_fit(fit_stub)


@pytest.mark.timeout(30)
def test_deviation_by_the_relative_fit_passes(capsys):
    grade_deviation(deviation_with(fit_relative))
    grade_deviation(deviation_with(fit_by_the_library))  # the library is fine here
    out = capsys.readouterr().out
    assert "OK: naive_all_reduce at N = 2" in out and f"{GIVEN_RATIOS[-1]:5.2f}" in out


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "attempt, hint",
    [
        (deviation_with(fit_unweighted), r"without weights"),
        (deviation_with(fit_relative, "ring_all_reduce"), r"ring's terms.*'naive_all_reduce'"),
        (lambda *a: GIVEN_RATIOS, r"randomly rescaled timings"),  # copied numbers
        (lambda s, r, n, w: [1 / x for x in deviation_with(fit_relative)(s, r, n, w)],
         r"upside down"),
        (lambda *a: 0.7, r"one ratio per size"),
    ],
)  # fmt: skip
def test_wrong_deviations_fail_with_hint(attempt, hint):
    with pytest.raises(AssertionError, match=hint):
        grade_deviation(attempt)


# ----------------------------------------------------------------------------------------
# The byte check alone, on counts a spawn would return (no spawn: the spawned attempts
# above already bring real counts through it)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "case, sent, shape, gather, hint",
    [
        # a ring whose every step passes the whole (4, 3) float64 tensor on: 2 x 96 bytes
        (Case(3), [192, 192, 192], (4, 3), False, r"group rank 0 sent 192 bytes where "
         r"comm_model\.bytes_sent_per_rank\('ring_all_reduce', \.\.\.\) = 2\(N-1\)/N x numel "
         r"x itemsize = 128 bytes.*never the whole tensor"),
        # one all-gather step too many (the result stays right: the extra chunk is final)
        (Case(2), [60, 60], (10,), False, r"sent 60 bytes where .* = 40 bytes.*no extra step"),
        (Case(4), [30, 30, 30, 36], (12,), True, r"group rank 0 sent 30 bytes where comm_model"
         r"\.bytes_sent_per_rank\('ring_all_gather', \.\.\.\) = \(N-1\)/N .* = 36 bytes"),
        # uneven chunks: a rank sending more than 2(N-1) of the largest chunk
        (Case(3), [80, 0, 0], (10,), False, r"no ring.*80 bytes in all"),
    ],
)  # fmt: skip
def test_byte_check_names_the_bytes(case, sent, shape, gather, hint):
    with pytest.raises(AssertionError, match=hint):
        _check_bytes(case, sent, shape, torch.float64 if shape == (4, 3) else torch.float32,
                     gather)  # fmt: skip


@pytest.mark.timeout(30)
def test_byte_check_accepts_any_chunk_order_on_uneven_splits():
    # 10 float32 over 3 ranks: chunks of 16, 12, 12 bytes. The library's order and the
    # reference's give different per-rank bytes (160 in all); both are rings.
    _check_bytes(Case(3), [52, 56, 52], (10,), torch.float32, False)
    _check_bytes(Case(3), [56, 52, 52], (10,), torch.float32, False)
    _check_bytes(Case(3), [64, 64, 64], (12,), torch.float32, False)
