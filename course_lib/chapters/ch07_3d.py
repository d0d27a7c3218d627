"""Chapter 7's workers and tables: the DP x PP x TP grid, live equivalence, bytes per axis.

Used by ``notebooks/07_3d_parallelism.ipynb`` (and ``tests/test_chapter7.py``).

* :func:`grid_worker` / :func:`grid_groups`: every rank builds the library's
  :class:`~course_lib.topology.Topology` and reports its coordinates and the three groups
  it belongs to; the parent joins them into the whole grid (the chapter's figure is drawn
  from this, not from a second implementation of the mapping).
* :func:`equivalence_worker`: every ((dp, pp, tp), sequence parallel, ZeRO stage) in one
  spawn, each trained a few steps with :func:`~course_lib.parallel.compose.parallelize`
  beside the single device on the same global batch (the pattern of
  ``tests/compose_workers.py``); :func:`equivalence_rows` turns the ranks' reports into
  one row per configuration.
* :func:`axis_traffic`: bytes and seconds per training step of each axis of one
  configuration on a real cluster, each axis put on the intra-node link and on the
  inter-node link (chapter 1's ring, chapter 5's point-to-point sends, chapter 6's
  tensor-parallel collectives, through :mod:`course_lib.cost.planner_model`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from course_lib.cost import tensor_model as tm
from course_lib.cost.clusters import Cluster
from course_lib.cost.comm_model import bytes_sent_per_rank
from course_lib.cost.cost_model import PRECISIONS
from course_lib.cost.planner_model import Choice, stage_parameter_counts, step_time
from course_lib.launch import DistContext, run_distributed
from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel.compose import parallelize
from course_lib.parallel.pipeline import split_blocks
from course_lib.topology import AXES, Topology

# The equivalence check's GPT: tied weights, 4 blocks (pp up to 4), 4 heads (tp up to 4).
EQUIV_CONFIG = GPTConfig(
    n_layer=4, n_head=4, n_embd=32, block_size=8, vocab_size=64, dropout=0.0, tie_weights=True
)
# SGD with momentum: linear in the gradients, so fp32 rounding stays as small as it is
# (AdamW's first step, g / sqrt(g^2), would blow a near-zero gradient's noise up to lr).
SGD = {"lr": 0.5, "momentum": 0.9}
CLIP = 0.3  # below every gradient norm of the run: clipping binds, so it is checked too

# ---------------------------------------------------------------------------------------
# The grid: coordinates and groups, as the library builds them
# ---------------------------------------------------------------------------------------


def _place(topology: Topology) -> dict[str, Any]:
    """This rank's coordinates and the global ranks of its dp, pp and tp groups."""
    return {
        "rank": topology.rank,
        "coords": (topology.dp_rank, topology.pp_rank, topology.tp_rank),
        "dp": topology.dp_ranks(),
        "pp": topology.pp_ranks(),
        "tp": topology.tp_ranks(),
    }


def grid_worker(ctx: DistContext, dp: int, pp: int, tp: int) -> dict[str, Any]:
    """Chapter 7: build ``Topology(dp, pp, tp)`` on this rank; return where it sits."""
    torch.set_num_threads(1)
    place = _place(Topology(dp, pp, tp))
    dist.barrier()
    return place


def join_places(places: list[dict[str, Any]]) -> dict[str, Any]:
    """Chapter 7: the whole grid from every rank's report of :func:`grid_worker`.

    Returns ``coords`` (rank -> (d, p, t)) and, per axis, the distinct groups in order of
    their first rank. Raises ValueError when two ranks disagree about a group they share
    (a group is the same list of ranks on each of its members).
    """
    out: dict[str, Any] = {"coords": {pl["rank"]: tuple(pl["coords"]) for pl in places}}
    for axis in AXES:
        groups: dict[int, list[int]] = {}
        for pl in places:
            members = list(pl[axis])
            if pl["rank"] not in members:
                raise ValueError(f"rank {pl['rank']} is not in its own {axis} group {members}")
            for r in members:
                if groups.setdefault(r, members) != members:
                    raise ValueError(
                        f"{axis} groups disagree: rank {r} is in {groups[r]} and {members}"
                    )
        out[axis] = sorted({tuple(g) for g in groups.values()})
    return out


def grid_groups(dp: int, pp: int, tp: int, **launch: Any) -> dict[str, Any]:
    """Chapter 7: spawn dp x pp x tp ranks, build the Topology, return :func:`join_places`."""
    return join_places(run_distributed(grid_worker, dp * pp * tp, dp, pp, tp, **launch))


def _partners(grid: Mapping[str, Any], axis: str, rank: int) -> list[int]:
    return [r for g in grid[axis] if rank in g for r in g if r != rank]


def holdings(grid: Mapping[str, Any], config: GPTConfig) -> list[dict[str, Any]]:
    """Chapter 7: per rank of ``grid`` (:func:`grid_groups`), what it holds of ``config``.

    The blocks of its pipeline stage (chapter 5's :func:`~course_lib.parallel.pipeline.
    split_blocks`; the embedding on the first stage, the head on the last), its share of
    the heads and of the vocabulary (chapter 6: tp rank t of tp holds heads
    [tH/tp, (t+1)H/tp) and vocabulary rows likewise), and the ranks it talks to on each
    axis.
    """
    dp, pp, tp = (1 + max(c[i] for c in grid["coords"].values()) for i in range(3))
    stages = split_blocks(config.n_layer, pp)
    heads, vocab = config.n_head // tp, tm.padded_vocab(config.vocab_size, tp) // tp
    rows = []
    for rank, (d, p, t) in sorted(grid["coords"].items()):
        extra = (["embedding"] if p == 0 else []) + (["head"] if p == pp - 1 else [])
        rows.append(
            {
                "rank": rank,
                "coords": (d, p, t),
                "blocks": list(stages[p]),
                "extra": extra,
                "heads": list(range(t * heads, (t + 1) * heads)),
                "vocab": (t * vocab, (t + 1) * vocab),
                "replica": d,
                **{axis: _partners(grid, axis, rank) for axis in AXES},
            }
        )
    return rows


def format_holdings(rows: list[dict[str, Any]]) -> str:
    """Chapter 7: :func:`holdings` as a text table, one line per rank."""
    lines = [
        f"{'rank':>4} {'(d,p,t)':>8} | {'blocks':<14} {'heads':<8} {'vocab rows':<11} | "
        f"{'tp with':<8} {'pp with':<8} {'dp with':<8}"
    ]
    lines.append("-" * len(lines[0]))
    for r in rows:
        blocks = f"{r['blocks'][0]}-{r['blocks'][-1]}" + "".join(f" +{e}" for e in r["extra"])
        heads = f"{r['heads'][0]}-{r['heads'][-1]}"
        vocab = f"{r['vocab'][0]}-{r['vocab'][1] - 1}"
        who = [",".join(map(str, r[a])) or "-" for a in AXES]
        lines.append(
            f"{r['rank']:>4} {str(r['coords']).replace(' ', ''):>8} | {blocks:<14} "
            f"{heads:<8} {vocab:<11} | {who[2]:<8} {who[1]:<8} {who[0]:<8}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Equivalence: every configuration against the single device
# ---------------------------------------------------------------------------------------


def _batch(config: GPTConfig, global_batch: int, step: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(
        0, config.vocab_size, (global_batch, config.block_size + 1), generator=gen
    )
    return tokens[:, :-1], tokens[:, 1:]  # (B, T) each


def _groups(params) -> list[dict]:
    """Two optimizer groups, as training uses: weight decay on matrices only."""
    params = list(params)
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def reference_run(config: GPTConfig, global_batch: int, steps: int) -> dict[str, Any]:
    """Chapter 7: the single device's losses and final state dict (SGD, clipped)."""
    torch.manual_seed(0)
    model = GPT(config)
    opt = torch.optim.SGD(_groups(model.parameters()), **SGD)
    losses = []
    for step in range(steps):
        x, y = _batch(config, global_batch, step)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "state": model.state_dict()}


def _run_shape(
    config, shape, sp: bool, zero: int, global_batch: int, steps: int, want: dict[str, Any]
) -> dict[str, Any]:
    """One configuration on this rank: its losses, parameter error and held bytes."""
    dp, pp, tp = shape
    topology = Topology(dp, pp, tp)
    torch.manual_seed(0)
    hybrid = parallelize(
        GPT(config),
        topology,
        microbatches=2 * pp,
        sequence_parallel=sp,
        zero_stage=zero,
        global_batch=global_batch,
        seq_len=config.block_size,
    )
    hybrid.build_optimizer(torch.optim.SGD, _groups(hybrid.parameters()), **SGD)
    rows = global_batch // dp  # this replica's share of the global batch
    mine = slice(topology.dp_rank * rows, (topology.dp_rank + 1) * rows)
    losses = []
    for step in range(steps):
        x, y = _batch(config, global_batch, step)
        losses.append(hybrid.step(x[mine], y[mine], SGD["lr"], CLIP))
    error, pieces = 0.0, []
    for name, p in hybrid.named_parameters():
        whole = want["state"][name]
        ref = p.tp_shard.take(whole) if hasattr(p, "tp_shard") else whole
        error = max(error, float((p.detach() - ref).abs().max()))
        pieces.append(p.detach().reshape(-1).clone())
    return {
        **_place(topology),
        "losses": losses,
        "param_error": error,
        "pieces": torch.cat(pieces),
        "memory": hybrid.memory_bytes(),
    }


def equivalence_worker(
    ctx: DistContext,
    shapes: list,
    config: GPTConfig = EQUIV_CONFIG,
    global_batch: int = 16,
    steps: int = 3,
) -> list[dict[str, Any]]:
    """Chapter 7: each ((dp, pp, tp), sequence_parallel, zero) in turn; one report each.

    Every rank also trains the single device on the same global batch and reports its
    losses beside its own (``want_losses``).
    """
    torch.set_num_threads(1)
    want = reference_run(config, global_batch, steps)
    out = []
    for shape, sp, zero in shapes:
        res = _run_shape(config, tuple(shape), sp, zero, global_batch, steps, want)
        out.append({**res, "want_losses": want["losses"]})
    dist.barrier()
    return out


def shape_label(shape: tuple[int, int, int], sp: bool = False, zero: int = 0) -> str:
    """Chapter 7: ``dp2 pp1 tp2 +SP +ZeRO-1``, the name of a configuration in tables."""
    dp, pp, tp = shape
    return f"dp{dp} pp{pp} tp{tp}" + (" +SP" if sp else "") + (f" +ZeRO-{zero}" if zero else "")


def equivalence_rows(shapes: list, per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Chapter 7: one row per configuration from :func:`equivalence_worker`'s reports.

    ``loss_diff``: the largest |loss - single device| over steps and ranks;
    ``param_diff``: the largest |parameter - single device's slice| over ranks;
    ``replicas_equal``: every replica of a dp group holds bitwise the same parameters.
    """
    rows = []
    for i, (shape, sp, zero) in enumerate(shapes):
        reports = [rank[i] for rank in per_rank]
        loss = max(
            abs(a - b) for r in reports for a, b in zip(r["losses"], r["want_losses"], strict=True)
        )
        places: dict[tuple[int, int], torch.Tensor] = {}
        equal = True
        for r in reports:
            _, p, t = r["coords"]
            first = places.setdefault((p, t), r["pieces"])
            equal &= torch.equal(first, r["pieces"])
        rows.append(
            {
                "config": shape_label(tuple(shape), sp, zero),
                "shape": tuple(shape),
                "sequence_parallel": sp,
                "zero": zero,
                "loss_diff": loss,
                "param_diff": max(r["param_error"] for r in reports),
                "replicas_equal": equal,
                "losses": reports[0]["losses"],
            }
        )
    return rows


def format_equivalence(rows: list[dict[str, Any]]) -> str:
    """Chapter 7: the equivalence rows as a text table."""
    lines = [
        f"{'configuration':<24} | {'max |loss - 1 device|':>21} "
        f"{'max |param - 1 device|':>22} {'dp replicas identical':>21}"
    ]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r['config']:<24} | {r['loss_diff']:>21.2e} {r['param_diff']:>22.2e} "
            f"{r['replicas_equal']!s:>21}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Bytes and seconds per axis on a real cluster (modelled)
# ---------------------------------------------------------------------------------------


def _on_one_link(cluster: Cluster, link: tm.Link) -> Cluster:
    """The cluster with every link replaced by ``link`` (one node as big as the world)."""
    return dataclasses.replace(cluster, intra=link, inter=link, max_nodes=None)


def axis_bytes(
    config: GPTConfig, c: Choice, micro_batch: int, seq: int, precision: str = "mixed"
) -> dict[str, float]:
    """Chapter 7: bytes one GPU sends per training step on each axis of ``c``.

    ``tp``: chapter 6's :func:`~course_lib.cost.tensor_model.model_comm_bytes` of the
    last stage (its blocks, the LM head and the loss) for each of the m micro-batches;
    ``pp``: a middle stage's two point-to-point sends per micro-batch (the activation
    forward, its gradient backward), a (b, T, d) tensor, /tp with sequence parallelism;
    ``dp``: chapter 1's ring all-reduce of the largest stage's gradients (ZeRO-1/2 send
    the same bytes as a reduce-scatter plus an all-gather).
    """
    s = PRECISIONS[precision].param
    m, L = c.microbatches, config.n_layer
    out = {"tp": 0.0, "pp": 0.0, "dp": 0.0}
    if c.tp > 1:
        comm = tm.model_comm_bytes(config, micro_batch, seq, c.tp, c.sequence_parallel, s)
        last = comm["blocks"] * (L // c.pp) / L + comm["lm_head"] + comm["cross_entropy"]
        out["tp"] = m * last
    if c.pp > 1:
        act = micro_batch * seq * config.n_embd * s / (c.tp if c.sequence_parallel else 1)
        out["pp"] = 2 * m * act
    if c.dp > 1:
        grads = max(stage_parameter_counts(config, c.tp, c.pp)) * PRECISIONS[precision].grad
        out["dp"] = bytes_sent_per_rank("ring_all_reduce", int(grads), c.dp, 0, element_size=2)
    return out


def axis_traffic(
    config: GPTConfig,
    cluster: Cluster,
    c: Choice,
    global_batch: int,
    seq: int,
    precision: str = "mixed",
) -> list[dict[str, Any]]:
    """Chapter 7: per axis, bytes per GPU per step and seconds on each of the cluster's links.

    Seconds come from the planner's own model (:func:`~course_lib.cost.planner_model.
    step_time`) run with every link set to the intra-node link, then to the inter-node
    link: ``tp`` and ``pp`` on the critical path, ``dp`` the whole collective (of which
    the planner hides all but the last bucket behind the backward: ``dp_exposed``).
    """
    b = global_batch // (c.dp * c.microbatches)
    sent = axis_bytes(config, c, b, seq, precision)
    times = {}
    for where, link in (("intra", cluster.intra), ("inter", cluster.inter)):
        t = step_time(
            config,
            _on_one_link(cluster, link),
            c,
            b,
            seq,
            mfu=cluster.default_mfu,
            precision=precision,
        )
        times[where] = {
            "tp": t["tp"],
            "pp": t["pp_p2p"],
            "dp": t["dp"],
            "dp_exposed": t["dp_exposed"],
            "compute": t["compute"],
        }
    rows = []
    for axis, size in (("tp", c.tp), ("pp", c.pp), ("dp", c.dp)):
        rows.append(
            {
                "axis": axis,
                "size": size,
                "bytes": sent[axis],
                "intra_s": times["intra"][axis],
                "inter_s": times["inter"][axis],
                "intra_link": cluster.intra.name,
                "inter_link": cluster.inter.name,
            }
        )
    rows.append(
        {
            "axis": "compute",
            "size": None,
            "bytes": 0.0,
            "intra_s": times["intra"]["compute"],
            "inter_s": times["inter"]["compute"],
            "dp_exposed_intra_s": times["intra"]["dp_exposed"],
            "dp_exposed_inter_s": times["inter"]["dp_exposed"],
        }
    )
    return rows


def format_traffic(rows: list[dict[str, Any]]) -> str:
    """Chapter 7: :func:`axis_traffic`'s rows as a text table (GB, seconds)."""
    axes = [r for r in rows if r["axis"] != "compute"]
    intra, inter = axes[0]["intra_link"], axes[0]["inter_link"]
    lines = [
        f"{'axis':<5}{'size':>5} | {'GB sent per GPU per step':>24} | "
        f"{'s on ' + intra:>28} {'s on ' + inter:>32}"
    ]
    lines.append("-" * len(lines[0]))
    for r in axes:
        lines.append(
            f"{r['axis']:<5}{r['size']:>5} | {r['bytes'] / 1e9:>24.2f} | "
            f"{r['intra_s']:>28.3f} {r['inter_s']:>32.3f}"
        )
    compute = next(r for r in rows if r["axis"] == "compute")
    lines.append(f"compute of the slowest stage, for comparison: {compute['intra_s']:.3f} s")
    return "\n".join(lines)
