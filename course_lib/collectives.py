"""Collectives from scratch: naive, ring, tree and halving-doubling, from send/recv only.

Chapter 1 builds every collective the course needs out of point-to-point calls
(``dist.send``, ``dist.recv``, ``dist.isend``, ``dist.irecv``) and counts the bytes each
rank puts on the wire, so that the alpha-beta model of :mod:`course_lib.cost.comm_model` can be
checked message by message. ``torch.distributed``'s own collectives appear only as the
yardstick in tests and benchmarks.

Conventions shared by every function here:

* The signature follows ``torch.distributed``: ``fn(tensor, group=None, counter=None)``,
  plus ``src``/``dst`` for broadcast and reduce, given as *global* ranks exactly as in
  ``dist.broadcast(tensor, src, group)``. The only reduction is a sum (no ``op``).
* Results are written in place into ``tensor``, of any shape (0-d included), any element
  count (0, 1, fewer than the ranks, not divisible by them) and any numeric dtype. Every
  rank must pass the same shape and dtype; that cannot be checked without talking.
* Ranks inside the algorithms are *group* ranks (``dist.get_rank(group)``), translated to
  global ranks only at the send/recv call, so every collective works on a subgroup (the
  data- or tensor-parallel groups of later chapters).
* Sums are computed in the tensor's dtype: a bfloat16 tensor is rounded to bfloat16 after
  every addition, as NCCL does. Each function's docstring states its order of additions,
  so a test can reproduce the exact bits with a sequential sum in that order.
* Every rank ends with bitwise identical results: each element is added up on exactly one
  rank, and the other ranks receive copies of those bytes.
* Exchanges between two ranks that both send and receive use ``isend`` + ``irecv`` and
  wait for both. Two blocking ``send`` calls face to face deadlock on gloo, even for 4
  floats, because neither rank reaches its ``recv``.
* Messages with no elements (the empty chunks of a tensor smaller than the group) are
  skipped on both sides, which both sides know from the shape alone.
* A message travels as segments of at most ``SEGMENT_BYTES``. A receive that must be
  added (reduce steps) lands segment by segment in a small reusable buffer and is added
  while the next segment is still arriving: the additions overlap the transfer, and no
  full-size receive buffer is allocated (fresh memory costs a page fault per 4 KiB).
  Segmenting changes neither the result nor the counts: a message counts once.
* Bad arguments raise ``ValueError`` before any message is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

SEGMENT_BYTES = 2**20  # messages travel as segments of at most this many bytes (pipelining)
PIPELINE_DEPTH = 2  # segments being received while one is added (receive buffers per call)

# ---------------------------------------------------------------------------------------
# Byte counter
# ---------------------------------------------------------------------------------------


@dataclass
class CommCounter:
    """Chapter 1: what one rank sent and received, in payload bytes (numel * element_size).

    Pass the same counter to several collectives to add them up; ``bytes_sent_by_op`` keeps
    the bytes sent by each collective (keyed by its function name) apart.
    """

    bytes_sent: int = 0  # payload bytes this rank sent
    bytes_received: int = 0  # payload bytes this rank received
    messages_sent: int = 0  # messages sent (segments of one message count once; no empties)
    messages_received: int = 0  # messages received
    bytes_sent_by_op: dict[str, int] = field(default_factory=dict)  # e.g. {"ring_all_reduce": n}

    def record_send(self, op: str, nbytes: int) -> None:
        """Count one message of ``nbytes`` sent by collective ``op``."""
        self.bytes_sent += nbytes
        self.messages_sent += 1
        self.bytes_sent_by_op[op] = self.bytes_sent_by_op.get(op, 0) + nbytes

    def record_recv(self, nbytes: int) -> None:
        """Count one message of ``nbytes`` received."""
        self.bytes_received += nbytes
        self.messages_received += 1

    def reset(self) -> None:
        """Set every count back to zero."""
        self.bytes_sent = self.bytes_received = 0
        self.messages_sent = self.messages_received = 0
        self.bytes_sent_by_op = {}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------
# This rank's view of the group, and the point-to-point layer
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """One collective call's view of its group: who we are, how many, what to count."""

    group: dist.ProcessGroup | None  # None means the default (world) group
    rank: int  # this rank's index in the group, 0 .. size - 1
    size: int  # number of ranks in the group, N
    counter: CommCounter | None
    op: str  # name of the public collective, for the counter

    def peer(self, group_rank: int) -> int:
        """Global rank of the group's rank ``group_rank``: what send/recv expect."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


def _group_view(group: dist.ProcessGroup | None, counter: CommCounter | None, op: str) -> _Group:
    """This rank's ``_Group``; ValueError when this rank is not a member of ``group``."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"{op}: global rank {dist.get_rank()} is not a member of the group "
            f"(ranks {dist.get_process_group_ranks(group)}); only members may call it"
        )
    return _Group(group, rank, dist.get_world_size(group), counter, op)


def _root_group_rank(g: _Group, root: int, name: str) -> int:
    """Group rank of the global rank ``root``; ValueError when it is not in the group."""
    members = list(range(g.size)) if g.group is None else dist.get_process_group_ranks(g.group)
    if isinstance(root, bool) or not isinstance(root, int) or root not in members:
        raise ValueError(
            f"{g.op}: {name}={root!r} is not a rank of the group; {name} is a global rank "
            f"(as in torch.distributed), one of {members}"
        )
    return members.index(root)


def _segments(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A 1-D ``tensor`` as views of at most SEGMENT_BYTES each; no segments when empty.

    Both ends of a message cut it the same way (same size, same dtype), so the k-th
    segment sent matches the k-th segment received.
    """
    per_segment = max(1, SEGMENT_BYTES // tensor.element_size())
    return tensor.split(per_segment) if tensor.numel() > 0 else ()


def _post_send(g: _Group, tensor: torch.Tensor, to: int) -> list[dist.Work]:
    """Start sending 1-D ``tensor`` to group rank ``to``; count it as one message."""
    works = [dist.isend(seg, g.peer(to), group=g.group) for seg in _segments(tensor)]
    if works and g.counter is not None:
        g.counter.record_send(g.op, _nbytes(tensor))
    return works


def _post_recv(g: _Group, tensor: torch.Tensor, frm: int) -> list[dist.Work]:
    """Start receiving 1-D ``tensor`` from group rank ``frm``; count it as one message."""
    works = [dist.irecv(seg, g.peer(frm), group=g.group) for seg in _segments(tensor)]
    if works and g.counter is not None:
        g.counter.record_recv(_nbytes(tensor))
    return works


def _wait(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()


def _send(g: _Group, tensor: torch.Tensor, to: int) -> None:
    """Send 1-D ``tensor`` to group rank ``to`` and wait until it is gone."""
    _wait(_post_send(g, tensor, to))


def _recv(g: _Group, tensor: torch.Tensor, frm: int) -> None:
    """Receive into 1-D ``tensor`` from group rank ``frm`` and wait until it is there."""
    _wait(_post_recv(g, tensor, frm))


def _exchange(g: _Group, outgoing: torch.Tensor, to: int, incoming: torch.Tensor, frm: int) -> None:
    """Send ``outgoing`` to ``to`` while receiving ``incoming`` from ``frm``; wait for both.

    Both transfers are posted before either is waited on, so two ranks exchanging with
    each other (or every rank of a ring at once) cannot deadlock.
    """
    _wait(_post_recv(g, incoming, frm) + _post_send(g, outgoing, to))


def _scratch(flat: torch.Tensor) -> torch.Tensor:
    """PIPELINE_DEPTH receive buffers of one segment each, for :func:`_recv_add`: (depth, seg)."""
    per_segment = min(max(1, SEGMENT_BYTES // flat.element_size()), flat.numel())
    return torch.empty(PIPELINE_DEPTH, per_segment, dtype=flat.dtype, device=flat.device)


def _recv_add(g: _Group, target: torch.Tensor, frm: int, scratch: torch.Tensor) -> None:
    """Receive a tensor shaped like 1-D ``target`` from ``frm`` and add it into ``target``.

    Pipelined: the next ``depth - 1`` segments are already arriving in the other scratch
    rows while segment k is added, so the additions overlap the transfer, and the scratch
    stays a few segments whatever the message size (a fresh full-size buffer costs a page
    fault per 4 KiB, slower than the transfer itself).
    """
    parts = _segments(target)
    depth = scratch.shape[0]
    if g.counter is not None and parts:
        g.counter.record_recv(_nbytes(target))
    pending = {}

    def post(k: int) -> None:  # receive segment k into scratch row k mod depth
        row = scratch[k % depth, : parts[k].numel()]
        pending[k] = dist.irecv(row, g.peer(frm), group=g.group)

    for k in range(min(depth, len(parts))):
        post(k)
    for k, part in enumerate(parts):
        pending.pop(k).wait()
        part.add_(scratch[k % depth, : part.numel()])
        if k + depth < len(parts):
            post(k + depth)  # row k mod depth is free again


def _exchange_add(
    g: _Group,
    outgoing: torch.Tensor,
    to: int,
    target: torch.Tensor,
    frm: int,
    scratch: torch.Tensor,
) -> None:
    """Send ``outgoing`` to ``to`` while receiving from ``frm`` and adding into ``target``."""
    sends = _post_send(g, outgoing, to)
    _recv_add(g, target, frm, scratch)
    _wait(sends)


# ---------------------------------------------------------------------------------------
# Working on a flat view
# ---------------------------------------------------------------------------------------


def _check_tensor(tensor: torch.Tensor, op: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor, got {type(tensor).__name__}")


def _work_buffer(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``tensor`` itself when contiguous, else a contiguous copy for ``_copy_back``."""
    _check_tensor(tensor, op)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _copy_back(tensor: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Write the result into a non-contiguous caller's tensor; return the caller's tensor."""
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def _contiguous_flat(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """The flat view that reduce-scatter and all-gather return chunks of (no copy allowed)."""
    _check_tensor(tensor, op)
    if not tensor.is_contiguous():
        raise ValueError(
            f"{op} works in place on a flat view of the tensor and returns a view of it, "
            f"so it needs a contiguous tensor (shape {tuple(tensor.shape)}, strides "
            f"{tensor.stride()}); pass tensor.contiguous() and keep that tensor"
        )
    return tensor.view(-1)  # (numel,)


def ring_chunks(flat: torch.Tensor, world_size: int) -> tuple[torch.Tensor, ...]:
    """Chapter 1: the ``world_size`` chunks of a 1-D tensor that ring collectives use.

    ``torch.tensor_split`` sizes: with ``numel = q * N + r`` the first ``r`` chunks have
    ``q + 1`` elements and the others ``q`` (so some are empty when ``numel < N``). Each
    chunk is a view into ``flat``.
    """
    return torch.tensor_split(flat, world_size)


# ---------------------------------------------------------------------------------------
# Naive all-reduce: everything through rank 0
# ---------------------------------------------------------------------------------------


def naive_all_reduce(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None, counter: CommCounter | None = None
) -> torch.Tensor:
    """Chapter 1: all-reduce (sum) through group rank 0, the baseline every other one beats.

    Every rank sends its whole tensor to rank 0; rank 0 adds them in rank order,
    ``((x_0 + x_1) + x_2) + ...``, and sends the sum back to every rank. Rank 0 receives
    ``N - 1`` and sends ``N - 1`` messages of the full size, so its time grows with N while
    the other ranks idle. Returns ``tensor``, which holds the sum on every rank.
    """
    g = _group_view(group, counter, "naive_all_reduce")
    work = _work_buffer(tensor, g.op)
    flat = work.view(-1)  # (numel,)
    if g.rank == 0:
        scratch = _scratch(flat)
        for r in range(1, g.size):
            _recv_add(g, flat, r, scratch)
        for r in range(1, g.size):
            _send(g, flat, r)
    else:
        _send(g, flat, 0)
        _recv(g, flat, 0)
    return _copy_back(tensor, work)


# ---------------------------------------------------------------------------------------
# Ring: reduce-scatter, all-gather, and all-reduce as the two in a row
# ---------------------------------------------------------------------------------------


def _ring_reduce_scatter_steps(g: _Group, chunks: tuple[torch.Tensor, ...]) -> None:
    """The N - 1 reduce-scatter steps; afterwards ``chunks[g.rank]`` holds the full sum."""
    right, left = (g.rank + 1) % g.size, (g.rank - 1) % g.size
    scratch = _scratch(chunks[0])  # chunk 0 is the largest; reused every step
    for step in range(g.size - 1):
        send_idx = (g.rank - step - 1) % g.size  # our own at step 0, then last step's partial sum
        recv_idx = (g.rank - step - 2) % g.size  # our copy of the chunk our left neighbour sends
        _exchange_add(g, chunks[send_idx], right, chunks[recv_idx], left, scratch)


def _ring_all_gather_steps(g: _Group, chunks: tuple[torch.Tensor, ...]) -> None:
    """The N - 1 all-gather steps: ``chunks[g.rank]`` goes round the ring to every rank."""
    right, left = (g.rank + 1) % g.size, (g.rank - 1) % g.size
    for step in range(g.size - 1):
        send_idx = (g.rank - step) % g.size  # our own chunk first, then what we last received
        recv_idx = (g.rank - step - 1) % g.size  # received straight into its place
        _exchange(g, chunks[send_idx], right, chunks[recv_idx], left)


def ring_reduce_scatter(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None, counter: CommCounter | None = None
) -> torch.Tensor:
    """Chapter 1: ring reduce-scatter (sum); returns this rank's fully reduced chunk.

    Contract: ``tensor`` (contiguous, same shape on every rank) is every rank's full
    input. Its flat view is cut into N chunks by :func:`ring_chunks` (``tensor_split``
    sizes, uneven allowed, empty when numel < N). Afterwards chunk ``rank`` (group rank)
    holds the sum over all ranks and is returned as a 1-D *view* into ``tensor``; the
    other chunks of ``tensor`` hold partial sums (scratch). This is the in-place layout of
    NCCL's reduce-scatter; :func:`ring_all_gather` on the same tensor completes an
    all-reduce.

    The ring: rank r sends to r + 1 and receives from r - 1. At step s = 0 .. N-2 rank r
    sends chunk (r - s - 1) mod N, and adds the chunk (r - s - 2) mod N it receives into
    its own copy. Chunk j starts at rank j + 1 and collects one rank per step, so after
    N - 1 steps rank j holds it complete, summed in the order
    ``((x_{j+1} + x_{j+2}) + ...) + x_j`` (ranks mod N). Each rank sends N - 1 chunks:
    (N - 1)/N of the tensor.
    """
    g = _group_view(group, counter, "ring_reduce_scatter")
    chunks = ring_chunks(_contiguous_flat(tensor, g.op), g.size)  # N views of (numel/N,)
    _ring_reduce_scatter_steps(g, chunks)
    return chunks[g.rank]


def ring_all_gather(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None, counter: CommCounter | None = None
) -> torch.Tensor:
    """Chapter 1: ring all-gather, in place; returns ``tensor``.

    Contract (the mirror of :func:`ring_reduce_scatter`): ``tensor`` is contiguous with the
    same shape on every rank; on entry chunk ``rank`` of its flat view (:func:`ring_chunks`)
    holds this rank's piece, the other chunks are overwritten. Afterwards every chunk holds
    its owner's piece, so every rank has the same, bitwise identical, tensor.

    At step s = 0 .. N-2 rank r sends chunk (r - s) mod N to r + 1 (its own first, then
    the one it just received) and receives chunk (r - s - 1) mod N from r - 1 straight
    into place. Each rank sends (N - 1)/N of the tensor.
    """
    g = _group_view(group, counter, "ring_all_gather")
    chunks = ring_chunks(_contiguous_flat(tensor, g.op), g.size)  # N views of (numel/N,)
    _ring_all_gather_steps(g, chunks)
    return tensor


def ring_all_reduce(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None, counter: CommCounter | None = None
) -> torch.Tensor:
    """Chapter 1: ring all-reduce (sum) = ring reduce-scatter, then ring all-gather.

    Step by step, with N ranks and the tensor cut into N chunks:

    1. Reduce-scatter, N - 1 steps: each rank sends one chunk to its right neighbour and
       adds the chunk arriving from its left into its own copy. After N - 1 steps rank r
       owns chunk r summed over all ranks.
    2. All-gather, N - 1 steps: each rank passes the finished chunks on round the ring,
       overwriting its stale copies, until every rank has all N finished chunks.

    2(N - 1) steps in all; per phase each rank sends (N - 1)/N of the tensor, so
    2(N - 1)/N in total, nearly independent of N: this is why the ring is bandwidth
    optimal. Chunk j is summed on rank j in the order ``((x_{j+1} + x_{j+2}) + ...) + x_j``
    and copied everywhere else, so all ranks end bitwise identical. Returns ``tensor``.
    """
    g = _group_view(group, counter, "ring_all_reduce")
    work = _work_buffer(tensor, g.op)
    chunks = ring_chunks(work.view(-1), g.size)  # N views of (numel/N,)
    _ring_reduce_scatter_steps(g, chunks)
    _ring_all_gather_steps(g, chunks)
    return _copy_back(tensor, work)


# ---------------------------------------------------------------------------------------
# Binomial tree: broadcast and reduce from any root
# ---------------------------------------------------------------------------------------


def _tree_broadcast_steps(g: _Group, flat: torch.Tensor, root: int) -> None:
    """Binomial broadcast from group rank ``root``: the ranks holding the data double per round.

    With relative ranks v = (rank - root) mod N, in the round of ``mask`` = 1, 2, 4, ...
    every v < mask sends to v + mask; ceil(log2 N) rounds in all.
    """
    v = (g.rank - root) % g.size
    mask = 1
    while mask < g.size:
        if v < mask and v + mask < g.size:
            _send(g, flat, (v + mask + root) % g.size)
        elif mask <= v < 2 * mask:
            _recv(g, flat, (v - mask + root) % g.size)
        mask *= 2


def _tree_reduce_steps(g: _Group, flat: torch.Tensor, root: int) -> None:
    """Binomial reduce to group rank ``root``: the broadcast's rounds run backwards.

    In the round of ``mask``, a relative rank v with bit ``mask`` set sends its partial sum
    to v - mask and is done; the others add what v + mask sends them.
    """
    v = (g.rank - root) % g.size
    scratch = _scratch(flat)
    mask = 1
    while mask < g.size:
        if v & mask:
            _send(g, flat, (v - mask + root) % g.size)
            return
        if v + mask < g.size:
            _recv_add(g, flat, (v + mask + root) % g.size, scratch)
        mask *= 2


def tree_broadcast(
    tensor: torch.Tensor,
    src: int,
    group: dist.ProcessGroup | None = None,
    counter: CommCounter | None = None,
) -> torch.Tensor:
    """Chapter 1: binomial-tree broadcast of ``tensor`` from global rank ``src``, in place.

    Round k doubles the ranks that hold the data, so ceil(log2 N) rounds of full-size
    messages instead of the N - 1 sends of a root that sends to everyone. ``src`` is a
    global rank, as in ``dist.broadcast``. Returns ``tensor``.
    """
    g = _group_view(group, counter, "tree_broadcast")
    root = _root_group_rank(g, src, "src")
    work = _work_buffer(tensor, g.op)
    _tree_broadcast_steps(g, work.view(-1), root)
    return _copy_back(tensor, work)


def tree_reduce(
    tensor: torch.Tensor,
    dst: int,
    group: dist.ProcessGroup | None = None,
    counter: CommCounter | None = None,
) -> torch.Tensor:
    """Chapter 1: binomial-tree reduce (sum) onto global rank ``dst``, in place.

    On ``dst`` the tensor ends holding the sum; on the other ranks it is scratch and holds
    a partial sum (``dist.reduce`` promises nothing there either). With relative ranks
    v = (rank - dst) mod N the sum is a balanced tree: ``(x_0 + x_1) + (x_2 + x_3)`` for
    N = 4, each pair added at the lower rank. ``dst`` is a global rank. Returns ``tensor``.
    """
    g = _group_view(group, counter, "tree_reduce")
    root = _root_group_rank(g, dst, "dst")
    work = _work_buffer(tensor, g.op)
    _tree_reduce_steps(g, work.view(-1), root)
    return _copy_back(tensor, work)


def tree_all_reduce(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None, counter: CommCounter | None = None
) -> torch.Tensor:
    """Chapter 1: all-reduce (sum) as a binomial tree reduce to group rank 0, then a broadcast.

    2 ceil(log2 N) rounds of full-size messages: few messages (good for small tensors,
    latency-bound) but every byte crosses log2 N links (bad for large ones). The sum is
    :func:`tree_reduce`'s tree order with root 0. Returns ``tensor``.
    """
    g = _group_view(group, counter, "tree_all_reduce")
    work = _work_buffer(tensor, g.op)
    flat = work.view(-1)  # (numel,)
    _tree_reduce_steps(g, flat, 0)
    _tree_broadcast_steps(g, flat, 0)
    return _copy_back(tensor, work)


# ---------------------------------------------------------------------------------------
# Recursive halving-doubling (Rabenseifner), power-of-two groups
# ---------------------------------------------------------------------------------------


def _chunk_offsets(numel: int, world_size: int) -> list[int]:
    """Start of each of :func:`ring_chunks`' chunks, plus ``numel`` at the end (N + 1 values)."""
    q, r = divmod(numel, world_size)
    return [i * q + min(i, r) for i in range(world_size + 1)]


def _halving_reduce_scatter(g: _Group, flat: torch.Tensor, offsets: list[int]) -> None:
    """Recursive halving: at distance d = N/2, ..., 1 swap half of our chunk range with rank^d.

    The rank whose bit d is clear keeps the lower half of the range, its partner the upper
    half; each adds the partner's copy of the half it keeps. Ends owning chunk ``g.rank``.
    """
    lo, hi = 0, g.size  # the range of chunks this rank is still responsible for
    scratch = _scratch(flat)
    d = g.size // 2
    while d >= 1:
        mid = (lo + hi) // 2
        keep, give = ((lo, mid), (mid, hi)) if g.rank & d == 0 else ((mid, hi), (lo, mid))
        kept = flat[offsets[keep[0]] : offsets[keep[1]]]
        given = flat[offsets[give[0]] : offsets[give[1]]]
        _exchange_add(g, given, g.rank ^ d, kept, g.rank ^ d, scratch)
        lo, hi = keep
        d //= 2


def _doubling_all_gather(g: _Group, flat: torch.Tensor, offsets: list[int]) -> None:
    """Recursive doubling: at distance d = 1, 2, ..., N/2 swap our finished range with rank^d."""
    lo, hi = g.rank, g.rank + 1
    d = 1
    while d < g.size:
        theirs = (hi, hi + d) if g.rank & d == 0 else (lo - d, lo)
        mine_view = flat[offsets[lo] : offsets[hi]]
        theirs_view = flat[offsets[theirs[0]] : offsets[theirs[1]]]
        _exchange(g, mine_view, g.rank ^ d, theirs_view, g.rank ^ d)
        lo, hi = min(lo, theirs[0]), max(hi, theirs[1])
        d *= 2


def halving_doubling_all_reduce(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None, counter: CommCounter | None = None
) -> torch.Tensor:
    """Chapter 1: Rabenseifner's all-reduce (sum): recursive halving, then recursive doubling.

    Needs a power-of-two group (ValueError otherwise, before any message). Reduce-scatter
    by halving: log2 N exchanges with partner rank ^ d for d = N/2, ..., 1, each swapping
    half of the remaining range, so (N - 1)/N of the tensor is sent, as in the ring, but in
    log2 N messages instead of N - 1. All-gather by doubling mirrors it. Totals:
    2 log2 N messages and 2(N - 1)/N of the tensor per rank. The sum is a butterfly:
    each step adds the partner's partial, ``p <- p + p_partner``, for d = N/2 down to 1.
    Returns ``tensor``.
    """
    g = _group_view(group, counter, "halving_doubling_all_reduce")
    if g.size & (g.size - 1):
        powers = [2**k for k in range(g.size.bit_length())]
        raise ValueError(
            f"halving_doubling_all_reduce needs a power-of-two group size, got {g.size}; "
            f"use a group of {powers[-1]} ranks, or ring_all_reduce for any size"
        )
    work = _work_buffer(tensor, g.op)
    flat = work.view(-1)  # (numel,)
    offsets = _chunk_offsets(flat.numel(), g.size)
    _halving_reduce_scatter(g, flat, offsets)
    _doubling_all_gather(g, flat, offsets)
    return _copy_back(tensor, work)


ALL_REDUCES = {
    "naive_all_reduce": naive_all_reduce,
    "ring_all_reduce": ring_all_reduce,
    "tree_all_reduce": tree_all_reduce,
    "halving_doubling_all_reduce": halving_doubling_all_reduce,
}  # every all-reduce above by name, for benchmarks and notebooks
