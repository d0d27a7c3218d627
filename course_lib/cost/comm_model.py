"""The alpha-beta (latency-bandwidth) model of collective communication (chapter 1).

Sending one message of ``n`` bytes costs ``alpha + n * beta`` seconds: ``alpha`` is the
fixed latency of a message (software, network round trip), ``beta`` the time per byte
(1 / link bandwidth). A collective's time is that cost summed along its critical path,
the busiest rank's sequence of messages:

    T = alpha * messages + beta * bytes_factor * n

with ``n`` the size of the tensor in bytes and, for N ranks:

=============================  ====================  ====================  ==========
algorithm                      messages              bytes_factor          who waits
=============================  ====================  ====================  ==========
naive_all_reduce               2(N - 1)              2(N - 1)              rank 0
ring_reduce_scatter            N - 1                 (N - 1)/N             every rank
ring_all_gather                N - 1                 (N - 1)/N             every rank
ring_all_reduce                2(N - 1)              2(N - 1)/N            every rank
tree_broadcast, tree_reduce    ceil(log2 N)          ceil(log2 N)          the root
tree_all_reduce                2 ceil(log2 N)        2 ceil(log2 N)        the root
halving_doubling_all_reduce    2 log2 N              2(N - 1)/N            every rank
=============================  ====================  ====================  ==========

The ring's bytes term hardly grows with N (bandwidth optimal), the tree's messages grow
only with log2 N (latency friendly), the naive one loses on both. The model leaves out the
cost of the additions (a third term ``gamma * bytes`` in the literature); a ``beta``
fitted to measured all-reduces absorbs it.

:func:`bytes_sent_per_rank` and :func:`messages_sent_per_rank` are the exact counts of
:mod:`course_lib.collectives`, uneven chunks and skipped empty messages included; the
tests check the byte counters against them.

References
    [Thakur] Thakur, Rabenseifner, Gropp. "Optimization of Collective Communication
             Operations in MPICH". IJHPCA 2005.
    [nccl-tests] NVIDIA, "Performance reported by NCCL tests" (PERFORMANCE.md):
             algorithm and bus bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALGORITHMS = (
    "naive_all_reduce",
    "ring_reduce_scatter",
    "ring_all_gather",
    "ring_all_reduce",
    "tree_broadcast",
    "tree_reduce",
    "tree_all_reduce",
    "halving_doubling_all_reduce",
)  # names of the collectives in course_lib.collectives that the model covers

# The collective each algorithm computes, for the bus-bandwidth convention.
COLLECTIVE_OF = {
    "naive_all_reduce": "all_reduce",
    "ring_reduce_scatter": "reduce_scatter",
    "ring_all_gather": "all_gather",
    "ring_all_reduce": "all_reduce",
    "tree_broadcast": "broadcast",
    "tree_reduce": "reduce",
    "tree_all_reduce": "all_reduce",
    "halving_doubling_all_reduce": "all_reduce",
    "builtin_all_reduce": "all_reduce",  # torch.distributed.all_reduce, the yardstick
}


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")


def _check_world_size(world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")


def _check_power_of_two(algorithm: str, world_size: int) -> None:
    if algorithm == "halving_doubling_all_reduce" and world_size & (world_size - 1):
        raise ValueError(
            f"halving_doubling_all_reduce needs a power-of-two world_size, got {world_size}"
        )


def _log2_ceil(world_size: int) -> int:
    """ceil(log2 N): rounds of a binomial tree over N ranks (0 for N = 1)."""
    return (world_size - 1).bit_length()


# ---------------------------------------------------------------------------------------
# The model: time on the critical path
# ---------------------------------------------------------------------------------------


def alpha_beta_terms(algorithm: str, world_size: int) -> tuple[float, float]:
    """Chapter 1: ``(messages, bytes_factor)`` of the critical path, so that
    ``T = alpha * messages + beta * bytes_factor * n_bytes`` (see the module's table)."""
    _check_algorithm(algorithm)
    _check_world_size(world_size)
    _check_power_of_two(algorithm, world_size)
    n = world_size
    rounds = _log2_ceil(n)
    terms = {
        "naive_all_reduce": (2 * (n - 1), 2 * (n - 1)),
        "ring_reduce_scatter": (n - 1, (n - 1) / n),
        "ring_all_gather": (n - 1, (n - 1) / n),
        "ring_all_reduce": (2 * (n - 1), 2 * (n - 1) / n),
        "tree_broadcast": (rounds, rounds),
        "tree_reduce": (rounds, rounds),
        "tree_all_reduce": (2 * rounds, 2 * rounds),
        "halving_doubling_all_reduce": (2 * rounds, 2 * (n - 1) / n),
    }
    messages, bytes_factor = terms[algorithm]
    return float(messages), float(bytes_factor)


def predict(algorithm: str, n_bytes: float, world_size: int, alpha: float, beta: float) -> float:
    """Chapter 1: predicted seconds of ``algorithm`` on a tensor of ``n_bytes`` over N ranks.

    ``alpha`` in seconds per message, ``beta`` in seconds per byte. One rank costs 0 s.
    """
    if n_bytes < 0 or alpha < 0 or beta < 0:
        raise ValueError(f"n_bytes, alpha and beta must be >= 0, got {n_bytes}, {alpha}, {beta}")
    messages, bytes_factor = alpha_beta_terms(algorithm, world_size)
    return alpha * messages + beta * bytes_factor * n_bytes


def fit_alpha_beta(
    sizes_bytes: Sequence[float],
    times_s: Sequence[float],
    messages: float,
    bytes_factor: float,
) -> tuple[float, float]:
    """Chapter 1: ``(alpha, beta) >= 0`` from measured times of one algorithm, fitted so that
    every point's *relative* error counts alike.

    Fits ``t_i = alpha * messages + beta * bytes_factor * size_i`` (take ``messages`` and
    ``bytes_factor`` from :func:`alpha_beta_terms`) by least squares on the relative
    residuals ``(t_i - model_i) / t_i``, i.e. weights ``1 / t_i**2``. An unweighted fit
    lets the largest message decide everything: a 5 % wobble of a 100 ms point is 5 ms,
    ten times a typical alpha, so the intercept it gives is noise. Here a 4 KiB point
    weighs as much as a 64 MiB one: the small sizes set alpha, the large ones beta.

    A negative coefficient of the free fit means the data cannot support it; it is set
    to 0 and the other refitted alone (the two-variable non-negative least squares).
    Needs at least two distinct sizes and positive times. Chapter 2 fits its DDP
    all-reduces with it too.
    """
    x = np.asarray(sizes_bytes, dtype=np.float64) * bytes_factor
    t = np.asarray(times_s, dtype=np.float64)
    if x.shape != t.shape or x.ndim != 1:
        raise ValueError(f"sizes and times must be 1-D of equal length, got {x.shape}, {t.shape}")
    if len(np.unique(x)) < 2 or messages <= 0 or bytes_factor <= 0:
        raise ValueError(
            f"fitting alpha and beta needs >= 2 distinct sizes and messages, bytes_factor > 0 "
            f"(a world size > 1); got {len(np.unique(x))} distinct size(s), "
            f"messages={messages}, bytes_factor={bytes_factor}"
        )
    if not np.all(t > 0):
        raise ValueError(f"times must all be > 0 seconds (a relative fit divides by them), got {t}")
    m = messages / t  # alpha's column, each row divided by its own time
    b = x / t  # beta's column, likewise; the target becomes 1 on every row
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([m, b], axis=1), np.ones_like(t), rcond=None)
    if alpha < 0:  # latency not resolvable: pure bandwidth fit through the origin
        alpha, beta = 0.0, max(0.0, float(b.sum() / (b @ b)))
    elif beta < 0:  # bandwidth not resolvable: pure latency fit
        alpha, beta = max(0.0, float(m.sum() / (m @ m))), 0.0
    return float(alpha), float(beta)


# ---------------------------------------------------------------------------------------
# Bandwidth as nccl-tests reports it
# ---------------------------------------------------------------------------------------


def algbw(n_bytes: float, seconds: float) -> float:
    """Chapter 1: algorithmic bandwidth, bytes per second: the tensor's size over the time."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return n_bytes / seconds


def busbw_factor(algorithm_or_collective: str, world_size: int) -> float:
    """Chapter 1: nccl-tests' bus-bandwidth factor, by the collective computed.

    2(N - 1)/N for all-reduce, (N - 1)/N for reduce-scatter and all-gather, 1 for
    broadcast and reduce: busbw is then comparable to the link's peak for any N, whatever
    the algorithm.
    """
    _check_world_size(world_size)
    collective = COLLECTIVE_OF.get(algorithm_or_collective, algorithm_or_collective)
    n = world_size
    factors = {
        "all_reduce": 2 * (n - 1) / n,
        "reduce_scatter": (n - 1) / n,
        "all_gather": (n - 1) / n,
        "broadcast": 1.0,
        "reduce": 1.0,
    }
    if collective not in factors:
        raise ValueError(f"unknown collective {algorithm_or_collective!r}; one of {factors}")
    return factors[collective]


def busbw(algorithm: str, n_bytes: float, seconds: float, world_size: int) -> float:
    """Chapter 1: bus bandwidth, bytes per second: ``algbw * busbw_factor``."""
    return algbw(n_bytes, seconds) * busbw_factor(algorithm, world_size)


# ---------------------------------------------------------------------------------------
# Exact counts per rank, as the collectives' CommCounter sees them
# ---------------------------------------------------------------------------------------


def chunk_sizes(numel: int, world_size: int) -> list[int]:
    """Chapter 1: elements in each ring chunk, as ``torch.tensor_split(flat, N)`` cuts them.

    The first ``numel % N`` chunks get one element more than the others.
    """
    q, r = divmod(numel, world_size)
    return [q + 1 if i < r else q for i in range(world_size)]


def _tree_children(v: int, world_size: int) -> int:
    """Sends of relative rank ``v`` in a binomial broadcast: one per mask with v < mask < N - v."""
    return sum(1 for k in range(_log2_ceil(world_size)) if v < 2**k < world_size - v)


def _halving_doubling_sends(sizes: list[int], rank: int) -> list[int]:
    """Elements in each message ``rank`` sends in halving-doubling (halving, then doubling)."""
    n = len(sizes)
    sent, (lo, hi), d = [], (0, n), n // 2
    while d >= 1:  # recursive halving: give away the half we do not keep
        mid = (lo + hi) // 2
        keep, give = ((lo, mid), (mid, hi)) if rank & d == 0 else ((mid, hi), (lo, mid))
        sent.append(sum(sizes[give[0] : give[1]]))
        (lo, hi), d = keep, d // 2
    d = 1
    while d < n:  # recursive doubling: send all we have
        sent.append(sum(sizes[lo:hi]))
        lo, hi = (lo, hi + d) if rank & d == 0 else (lo - d, hi)
        d *= 2
    return sent


def _message_sizes(algorithm: str, numel: int, world_size: int, rank: int, root: int) -> list[int]:
    """Elements of every message ``rank`` sends, empty ones included."""
    n, sizes = world_size, chunk_sizes(numel, world_size)
    v = (rank - root) % n  # rank relative to the tree's root
    ring_rs = [sizes[(rank - s - 1) % n] for s in range(n - 1)]
    ring_ag = [sizes[(rank - s) % n] for s in range(n - 1)]
    table = {
        "naive_all_reduce": [numel] * (n - 1 if rank == 0 else 1),
        "ring_reduce_scatter": ring_rs,
        "ring_all_gather": ring_ag,
        "ring_all_reduce": ring_rs + ring_ag,
        "tree_broadcast": [numel] * _tree_children(v, n),
        "tree_reduce": [numel] * (v != 0),
        "tree_all_reduce": [numel] * ((rank != 0) + _tree_children(rank, n)),
    }
    if algorithm == "halving_doubling_all_reduce":
        return _halving_doubling_sends(sizes, rank)
    return table[algorithm]


def _check_count_args(
    algorithm: str, n_bytes: int, world_size: int, rank: int, root: int, element_size: int
) -> int:
    """Validate and return the element count."""
    _check_algorithm(algorithm)
    _check_world_size(world_size)
    _check_power_of_two(algorithm, world_size)
    if not 0 <= rank < world_size or not 0 <= root < world_size:
        raise ValueError(f"rank={rank} and root={root} must be in [0, {world_size})")
    if element_size < 1 or n_bytes < 0 or n_bytes % element_size:
        raise ValueError(f"n_bytes={n_bytes} must be a multiple of element_size={element_size}")
    return n_bytes // element_size


def bytes_sent_per_rank(
    algorithm: str,
    n_bytes: int,
    world_size: int,
    rank: int,
    *,
    root: int = 0,
    element_size: int = 1,
) -> int:
    """Chapter 1: exact payload bytes that group rank ``rank`` sends in ``algorithm``.

    ``n_bytes`` is the whole tensor; ``element_size`` matters for uneven ring chunks (the
    split is by elements). ``root`` is the group rank of src/dst for the trees. With N
    dividing the element count, the ring all-reduce sends exactly ``2(N - 1)/N * n_bytes``
    from every rank.
    """
    numel = _check_count_args(algorithm, n_bytes, world_size, rank, root, element_size)
    return sum(_message_sizes(algorithm, numel, world_size, rank, root)) * element_size


def messages_sent_per_rank(
    algorithm: str,
    n_bytes: int,
    world_size: int,
    rank: int,
    *,
    root: int = 0,
    element_size: int = 1,
) -> int:
    """Chapter 1: messages that group rank ``rank`` sends (empty ones are skipped)."""
    numel = _check_count_args(algorithm, n_bytes, world_size, rank, root, element_size)
    return sum(1 for m in _message_sizes(algorithm, numel, world_size, rank, root) if m > 0)


def critical_path_seconds_table(
    n_bytes: float, world_size: int, alpha: float, beta: float
) -> dict[str, float]:
    """Chapter 1: :func:`predict` for every algorithm that runs on ``world_size`` ranks."""
    pow2 = world_size & (world_size - 1) == 0
    return {
        a: predict(a, n_bytes, world_size, alpha, beta)
        for a in ALGORITHMS
        if pow2 or a != "halving_doubling_all_reduce"
    }
