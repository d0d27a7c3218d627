"""Chapter 1's grader (grade_ring) on attempts: wrong ones fail with their hint, valid ones pass.

Each attempt is a ``my_ring.py`` written into a temporary folder, the notebook's folder as
the grader sees it; most are the reference solution with one small edit.
"""

import pytest

from course_lib.grading.ch01_collectives import grade_ring
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
    "gather_at_rank_0_then_broadcast": (
        "ring_all_reduce",
        replace_body(AR_HEAD, NAIVE_GATHER_BROADCAST),
        r"no ring.*2\(N-1\) x numel x itemsize.*ONE chunk",
    ),
    "whole_tensor_to_everyone": (
        "ring_all_reduce",
        replace_body(AR_HEAD, SEND_EVERYTHING),
        r"no ring.*never the whole tensor",
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
