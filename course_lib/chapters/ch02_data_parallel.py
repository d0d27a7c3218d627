"""Chapter 2: worker functions and figures for the data-parallel notebook.

The notebook ``notebooks/02_data_parallel.ipynb`` runs these through
:func:`course_lib.launch.run_distributed`, which needs importable top-level functions.
Every worker builds the course's reference GPT from a seed, draws its slice of the global
batch with :func:`course_lib.data.get_batch` and wraps the model in
:class:`course_lib.parallel.data_parallel.DataParallel`.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist
from matplotlib.lines import Line2D

from course_lib import collectives as C
from course_lib.cost import comm_model as M
from course_lib.data import get_batch, load_text, make_dataset
from course_lib.launch import DistContext
from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel.common import global_mean
from course_lib.parallel.data_parallel import DataParallel
from course_lib.train import build_model

SEED = 1337  # model init and batches
SEQ_LEN = 64  # tokens per sequence: the tiny model's block size


def _train_data() -> torch.Tensor:
    """The embedded corpus' training split, as byte ids."""
    return make_dataset(load_text(None)).split("train")


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """All tensors as one flat fp32 vector (for cross-rank comparisons)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _ranks_bitwise_equal(flat: torch.Tensor) -> bool:
    """True when every rank holds exactly the same ``flat`` tensor."""
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(t, everyone[0]) for t in everyone)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute elementwise difference between two lists of tensors."""
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b, strict=True))


def equivalence_worker(
    ctx: DistContext, modes: list[str], steps: int, batch_size: int, bucket_cap_mb: float
) -> dict[str, dict[str, Any]]:
    """Chapter 2: train DataParallel and, beside it, the single-device reference; compare.

    Every rank starts from a *different* random init (seed + rank): the wrap's broadcast
    must make them all rank 0's. The reference sees the whole global batch of
    ``batch_size`` sequences; both use SGD(lr=0.1, momentum=0.9). Per mode: the largest gradient
    difference at step 0, the largest parameter difference after each step, whether the
    ranks' parameters are bitwise equal at the end, and the last global mean loss.
    """
    data, cfg = _train_data(), GPTConfig()
    out = {}
    for mode in modes:
        ref = build_model(cfg, SEED, "cpu")  # rank 0's init, on one device
        module = build_model(cfg, SEED + ctx.rank, "cpu")  # a different init on every rank
        model = DataParallel(module, mode=mode, bucket_cap_mb=bucket_cap_mb)
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        diffs, grad_diff = [], None
        for step in range(steps):
            x, y = get_batch(data, batch_size, SEQ_LEN, SEED, step, ctx.rank, ctx.world_size)
            loss = loss_fn(model(x), y)  # (b, T) slice of this rank
            opt.zero_grad(set_to_none=True)
            loss.backward()
            model.finish_gradient_synchronization()
            xg, yg = get_batch(data, batch_size, SEQ_LEN, SEED, step)  # (B, T) global batch
            ref_loss = loss_fn(ref(xg), yg)
            ref_opt.zero_grad(set_to_none=True)
            ref_loss.backward()
            if step == 0:
                grad_diff = _max_diff(
                    [p.grad for p in module.parameters()], [p.grad for p in ref.parameters()]
                )
            opt.step()
            ref_opt.step()
            diffs.append(_max_diff(list(module.parameters()), list(ref.parameters())))
        out[mode] = {
            "grad_diff_step0": grad_diff,
            "param_diff_per_step": diffs,
            "ranks_bitwise_equal": _ranks_bitwise_equal(_flat(list(module.parameters()))),
            "loss": global_mean(loss, model.group),
            "ref_loss": ref_loss.item(),
        }
    return out


def accumulation_worker(
    ctx: DistContext, micro_batches: int, batch_size: int, bucket_cap_mb: float = 1.0
) -> dict[str, float | int]:
    """Chapter 2: ``micro_batches`` backward passes, all but the last inside ``no_sync()``.

    The global batch of ``batch_size`` sequences is cut over ranks, then each rank's share
    into ``micro_batches`` micro-batches whose losses are scaled by 1/micro_batches.
    Returns the largest difference from the single-device gradient of the whole batch,
    the all-reduce calls and bytes the accumulated step cost, and the number of buckets
    (one all-reduce each, whatever the number of micro-batches).
    """
    data, cfg = _train_data(), GPTConfig()
    module = build_model(cfg, SEED, "cpu")
    model = DataParallel(module, mode="overlapped", bucket_cap_mb=bucket_cap_mb)
    x, y = get_batch(data, batch_size, SEQ_LEN, SEED, 0, ctx.rank, ctx.world_size)  # (b, T)
    model.reset_counters()
    for k, (xm, ym) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True)):
        last = k == micro_batches - 1
        with model.no_sync() if not last else contextlib.nullcontext():
            loss = loss_fn(model(xm), ym)  # (b / micro_batches, T) micro-batch
            (loss / micro_batches).backward()
    model.finish_gradient_synchronization()
    ref = build_model(cfg, SEED, "cpu")
    xg, yg = get_batch(data, batch_size, SEQ_LEN, SEED, 0)  # (B, T) the whole global batch
    ref_loss = loss_fn(ref(xg), yg)
    ref_loss.backward()
    grads, ref_grads = [p.grad for p in module.parameters()], [p.grad for p in ref.parameters()]
    return {
        "grad_diff": _max_diff(grads, ref_grads),
        "all_reduce_calls": model.all_reduce_calls,
        "bytes_all_reduced": model.bytes_all_reduced,
        "n_buckets": len(model.buckets),
    }


def ring_bytes_worker(ctx: DistContext, modes: list[str], bucket_cap_mb: float) -> dict:
    """Chapter 2: bytes this rank sends in one synchronization with chapter 1's ring.

    ``DataParallel(ring=True)`` all-reduces with :func:`collectives.ring_all_reduce` and
    counts in a :class:`collectives.CommCounter`. Per mode: the gradient payload handed to
    all-reduce, the calls, the bytes and messages this rank sent, and each call's size.
    """
    data, cfg = _train_data(), GPTConfig()
    out = {}
    for mode in modes:
        counter = C.CommCounter()
        module = build_model(cfg, SEED, "cpu")
        model = DataParallel(module, mode, bucket_cap_mb, ring=True, counter=counter)
        x, y = get_batch(data, 2 * ctx.world_size, SEQ_LEN, SEED, 0, ctx.rank, ctx.world_size)
        loss_fn(model(x), y).backward()
        model.finish_gradient_synchronization()
        sizes = (
            [p.numel() * p.element_size() for p in model.params]
            if mode == "naive"
            else [k.nbytes for k in model.buckets]
        )
        out[mode] = {
            "payload": model.bytes_all_reduced,
            "calls": model.all_reduce_calls,
            "bytes_sent": counter.bytes_sent,
            "messages_sent": counter.messages_sent,
            "sizes": sizes,
        }
    return out


def _timed_step(model: DataParallel, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """One forward, backward and gradient synchronization, timed after a barrier.

    Times are seconds from the step's start: ``forward``, ``backward`` (compute, plus the
    hooks' launches in overlapped mode), ``sync`` (``finish_gradient_synchronization``).
    """
    for p in model.module.parameters():
        p.grad = None
    model.reset_counters()
    model.timeline = []
    dist.barrier()
    t0 = time.perf_counter()
    loss = loss_fn(model(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    model.finish_gradient_synchronization()
    t3 = time.perf_counter()
    timeline = [
        {**row, "start": row["start"] - t0, "end": (row["end"] or t3) - t0}
        for row in model.timeline
    ]
    return {
        "forward": t1 - t0,
        "backward": t2 - t1,
        "sync": t3 - t2,
        "step": t3 - t0,
        "backward_span": (t1 - t0, t2 - t0),
        "timeline": timeline,
        "calls": model.all_reduce_calls,
        "bytes": model.bytes_all_reduced,
    }


@dataclass(frozen=True)
class Simulation:
    """Chapter 2: simulated compute (sleeps) and a simulated link (the alpha-beta model).

    A 2-core laptop cannot show overlap or scaling: its ranks share the cores they
    compute with, and its "link" is memory. In a simulated step each rank's forward
    sleeps a third and its backward two thirds of ``compute_fixed_s + compute_per_seq_s * b``
    (spread over the blocks, so gradients become ready layer by layer as on real
    hardware), and every all-reduce lasts at least the alpha-beta time of a ring on the
    link ``(alpha_s, beta_s_per_byte)``, one all-reduce at a time, on a thread beside the
    compute. The model still runs, on sequences of ``seq_len`` tokens (short, so that
    real compute is small beside the sleeps), and the all-reduce is real: the gradients
    are truly averaged.
    """

    compute_fixed_s: float  # c0: compute per step whatever the batch (seconds)
    compute_per_seq_s: float  # c1: compute per sequence of the per-rank batch (seconds)
    alpha_s: float  # link latency per message (seconds)
    beta_s_per_byte: float  # link time per byte (seconds per byte): 1 / bandwidth
    seq_len: int = 8  # tokens per sequence actually computed

    def compute_s(self, b: int) -> float:
        """Simulated forward + backward seconds of a per-rank batch of ``b`` sequences."""
        return self.compute_fixed_s + self.compute_per_seq_s * b

    def all_reduce_s(self, n_bytes: float, world_size: int) -> float:
        """The link model's seconds for one ring all-reduce of ``n_bytes`` over N ranks."""
        return M.predict("ring_all_reduce", n_bytes, world_size, self.alpha_s, self.beta_s_per_byte)


class _LinkWork:
    """What an asynchronous all-reduce on the simulated link returns (like torch's Work)."""

    def __init__(self, future: torch.futures.Future) -> None:
        self.future = future

    def wait(self) -> bool:
        self.future.wait()  # re-raises an error of the link thread
        return True

    def get_future(self) -> torch.futures.Future:
        return self.future


class SimulatedLinkDP(DataParallel):
    """Chapter 2: :class:`DataParallel` whose all-reduces run on a simulated link.

    One thread per rank is the link: it runs the queued all-reduces one after another,
    each the real ``dist.all_reduce`` padded with a sleep to the :class:`Simulation`'s
    alpha-beta time. Call :meth:`close` when done (stops the thread).
    """

    def __init__(self, module: torch.nn.Module, mode: str, cap: float, sim: Simulation) -> None:
        super().__init__(module, mode, cap)
        self.sim = sim
        self._queue: list = []
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._link, daemon=True)
        self._thread.start()

    def _link(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._queue)
                job = self._queue.pop(0)
            if job is None:
                return
            tensor, future = job
            try:
                start = time.perf_counter()
                dist.all_reduce(tensor, group=self.group)
                n_bytes = tensor.numel() * tensor.element_size()
                rest = self.sim.all_reduce_s(n_bytes, self.world_size)
                time.sleep(max(0.0, rest - (time.perf_counter() - start)))
                future.set_result(tensor)
            except Exception as error:  # noqa: BLE001 -- handed to whoever waits
                future.set_exception(error)

    def _submit(self, job: Any) -> None:
        with self._wake:
            self._queue.append(job)
            self._wake.notify()

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> _LinkWork | None:
        """Queue ``tensor``'s all-reduce on the link (counted); wait unless ``async_op``."""
        self.bytes_all_reduced += tensor.numel() * tensor.element_size()
        self.all_reduce_calls += 1
        work = _LinkWork(torch.futures.Future())
        self._submit((tensor, work.future))
        if async_op:
            return work
        work.wait()
        return None

    def close(self) -> None:
        """Stop the link thread (after the last step's synchronization)."""
        self._submit(None)
        self._thread.join(timeout=30)


def _delay_blocks(model: GPT, clock: dict[str, float]) -> None:
    """Sleep ``clock["forward"]`` and ``clock["backward"]`` seconds, spread over the blocks.

    Each block sleeps its share in its forward and, through a hook on its output's
    gradient, in its backward, before its own parameters' gradients are computed: so
    the gradients of later blocks are ready (and their buckets can start) while the
    earlier blocks still "compute".
    """
    share = 1 / len(model.blocks)

    def forward_hook(_module, _inputs, output):
        time.sleep(clock["forward"] * share)
        if output.requires_grad:
            output.register_hook(lambda grad: time.sleep(clock["backward"] * share))

    for block in model.blocks:
        block.register_forward_hook(forward_hook)


def step_timing_worker(
    ctx: DistContext,
    configs: list[tuple[str, float]],
    batch_per_rank: list[int],
    repeats: int,
    simulation: Simulation | None = None,
) -> dict[str, Any]:
    """Chapter 2: time forward, backward and sync for each ``(mode, bucket_cap_mb)``.

    For each config and each per-rank batch size ``b``: one warm-up step, then
    ``repeats`` timed steps (configs interleaved repeat by repeat, so that load drift hits
    them alike). Returns ``times[(mode, cap, b, what)] = [seconds per repeat]`` with
    ``what`` in forward/backward/sync/step, ``info[(mode, cap)]`` (all-reduce calls and
    bytes per step, bucket sizes) and ``timelines[(mode, cap, b)]`` (the last repeat's).
    With a :class:`Simulation`, compute and link are simulated (sleeps) as it describes.
    """
    data, cfg = _train_data(), GPTConfig()
    seq_len = simulation.seq_len if simulation else SEQ_LEN
    clock = {"forward": 0.0, "backward": 0.0}  # the simulated compute of the current b
    models = {}
    for mode, cap in configs:
        module = build_model(cfg, SEED, "cpu")
        if simulation is None:
            models[(mode, cap)] = DataParallel(module, mode, cap)
        else:
            _delay_blocks(module, clock)
            models[(mode, cap)] = SimulatedLinkDP(module, mode, cap, simulation)
    times: dict[tuple, list[float]] = {}
    info, timelines = {}, {}
    for b in batch_per_rank:
        if simulation is not None:
            clock["forward"] = simulation.compute_s(b) / 3
            clock["backward"] = simulation.compute_s(b) * 2 / 3
        for i in range(repeats + 1):
            global_batch = b * ctx.world_size
            x, y = get_batch(data, global_batch, seq_len, SEED, i, ctx.rank, ctx.world_size)
            for (mode, cap), model in models.items():
                row = _timed_step(model, x, y)
                if i == 0:
                    continue  # warm-up
                for what in ("forward", "backward", "sync", "step"):
                    times.setdefault((mode, cap, b, what), []).append(row[what])
                sizes = [k.nbytes for k in model.buckets]
                info[(mode, cap)] = {"calls": row["calls"], "bytes": row["bytes"], "buckets": sizes}
                timelines[(mode, cap, b)] = {
                    "backward_span": row["backward_span"],
                    "step": row["step"],
                    "buckets": row["timeline"],
                }
    for model in models.values():
        if isinstance(model, SimulatedLinkDP):
            model.close()
    return {"times": times, "info": info, "timelines": timelines}


def scaling_worker(
    ctx: DistContext,
    measured: tuple[list[tuple[str, float]], list[int], int] | None,
    simulated: tuple[list[tuple[str, float]], list[int], int, Simulation] | None,
) -> dict[str, Any]:
    """Chapter 2: the measured and the simulated scaling runs of one world size, one spawn.

    Each argument is :func:`step_timing_worker`'s ``(configs, batch_per_rank, repeats)``
    (plus the :class:`Simulation` for ``simulated``), or None to skip that run.
    """
    out = {}
    if measured is not None:
        out["measured"] = step_timing_worker(ctx, *measured)
    if simulated is not None:
        out["simulated"] = step_timing_worker(ctx, *simulated)
    return out


def slowest_rank(
    per_rank: list[dict[tuple, list[float]]], stat: str = "min", across: str = "max"
) -> dict[tuple, float]:
    """Chapter 2: per key, ``stat`` ("min" or "median") over repeats of one rank's time.

    A repeat takes as long as its slowest rank (``across="max"``). On a machine shared
    with other jobs the fastest repeat ("min") is the least disturbed one: the best
    estimate of the cost itself. ``across="min"`` takes the rank that waited least: for
    the synchronization, the rank that finished backward last, whose sync time is pure
    communication (the others' includes waiting for it).
    """
    reduce = {"min": min, "median": statistics.median}[stat]
    pick = {"max": max, "min": min}[across]
    out = {}
    for key in per_rank[0]:
        series = zip(*(r[key] for r in per_rank), strict=True)
        out[key] = reduce([pick(ts) for ts in series])
    return out


def parameter_bytes(config: GPTConfig | None = None) -> int:
    """Chapter 2: bytes of the fp32 gradients DP all-reduces each step (tied weights once)."""
    model = GPT(config or GPTConfig())
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def plot_overlap_timeline(timelines: dict[str, list[dict[str, Any]]], title: str) -> plt.Figure:
    """Chapter 2: one panel per run: each rank's backward (grey) vs each bucket's all-reduce.

    ``timelines`` maps a label to the per-rank timelines of one step, as
    :func:`step_timing_worker` returns them (times from each rank's start of the step,
    which a barrier aligns). A bucket's bar spans from its all-reduce's launch (the tick)
    to its completion on that rank: a rank that launches first waits for the others, so
    its bar is long; the last one to launch finds the others ready. The dashed lines end
    the step (gradients averaged and in ``p.grad``).
    """
    n = len(timelines)
    n_buckets = max(len(tl["buckets"]) for tls in timelines.values() for tl in tls)
    fig, axes = plt.subplots(n, 1, figsize=(8.5, 0.8 + n * (0.9 + 0.32 * n_buckets)), sharex=True)
    axes = [axes] if n == 1 else list(axes)
    for ax, (label, per_rank) in zip(axes, timelines.items(), strict=True):
        shift = 0.4 / len(per_rank)
        for rank, tl in enumerate(per_rank):
            dy, color = (rank - (len(per_rank) - 1) / 2) * shift, f"C{rank}"
            start, end = tl["backward_span"]
            ax.barh(-1 + dy, (end - start) * 1e3, left=start * 1e3, height=shift, color="0.6")
            for row in tl["buckets"]:
                y, width = row["bucket"] + dy, max(row["end"] - row["start"], 3e-4) * 1e3
                ax.barh(y, width, left=row["start"] * 1e3, height=shift, color=color)
                ax.plot(row["start"] * 1e3, y, "|", color="k", ms=6)
            ax.axvline(tl["step"] * 1e3, color=color, ls="--", lw=1, label=f"rank {rank}")
        ax.set_yticks(
            range(-1, n_buckets), ["backward", *[f"bucket {k}" for k in range(n_buckets)]]
        )
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
        steps = ", ".join(f"{tl['step'] * 1e3:.1f}" for tl in per_rank)
        ax.set_title(f"{label}: step {steps} ms (rank 0, 1, ...)", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    axes[-1].set_xlabel("ms since the start of the step (each rank's clock)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def simulated_step_s(sim: Simulation, b: int, world_size: int, bucket_bytes: list[int]) -> dict:
    """Chapter 2: the model of a simulated step: without overlap, and overlap's best case.

    ``serial``: compute, then the buckets' all-reduces one after another.
    ``overlap_bound``: forward, then backward and the all-reduces side by side (the
    all-reduces can hide behind backward, never behind forward): no overlapped step is
    faster.
    """
    compute = sim.compute_s(b)
    comm = sum(sim.all_reduce_s(n, world_size) for n in bucket_bytes)
    return {
        "compute": compute,
        "comm": comm,
        "serial": compute + comm,
        "overlap_bound": compute / 3 + max(compute * 2 / 3, comm),
    }


def fit_compute_line(batch_sizes: list[int], seconds: list[float]) -> dict[str, Any]:
    """Chapter 2: fit ``compute(b) = c0 + c1 * b`` to measured times, with ``c0 >= 0``.

    A least-squares line whose intercept comes out negative (a fixed cost the points
    cannot resolve) is replaced by the line through the origin; ``note`` says which
    fit was kept and, in that case, the free fit's negative intercept.
    """
    bs, ts = np.asarray(batch_sizes, dtype=float), np.asarray(seconds, dtype=float)
    c1, c0 = np.polyfit(bs, ts, 1)
    if c0 >= 0:
        note = "least-squares line"
        return {"c0": float(c0), "c1": float(c1), "free_c0": float(c0), "note": note}
    through_origin = float(bs @ ts / (bs @ bs))
    note = (
        f"the free fit's intercept was {c0 * 1e3:.2f} ms < 0 (a fixed cost these points "
        "cannot resolve): kept the line through the origin, c0 = 0"
    )
    return {"c0": 0.0, "c1": through_origin, "free_c0": float(c0), "note": note}


def _flat_params(model: torch.nn.Module) -> torch.Tensor:
    return _flat([p for p in model.parameters() if p.requires_grad])


def _sgd(model: torch.nn.Module, grads: list[torch.Tensor], lr: float) -> None:
    """The source's ``update_params``: one plain gradient-descent step."""
    with torch.no_grad():
        for p, g in zip([p for p in model.parameters() if p.requires_grad], grads, strict=True):
            p.add_(g, alpha=-lr)


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _spread(flat: torch.Tensor, group: dist.ProcessGroup) -> float:
    """Largest distance of a rank's ``flat`` parameters from rank 0's, relative to rank 0's norm."""
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, flat, group=group)
    return max(float((t - everyone[0]).norm() / everyone[0].norm()) for t in everyone)


def source_scheme_worker(
    ctx: DistContext, epochs: int, batches_per_epoch: int, batch_size: int, lr: float
) -> dict[str, Any] | None:
    """Chapter 2: the source article's data-parallel pseudocode against true data parallelism.

    The source (its section 3.3) updates each rank's *local* parameters with its own
    gradient every batch, and once per epoch averages only the *last* batch's local
    gradients into the *global* parameters, which are never copied back to the ranks.
    Beside it: :class:`DataParallel` (gradients averaged every batch) and, on rank 0, one
    device on the whole global batch of ``batch_size`` sequences; all three take plain
    gradient-descent steps of ``lr`` from the same init. After every batch: each model's
    loss on a fixed held-out batch, and how far the ranks' parameters are apart. Returns
    rank 0's record (None elsewhere).
    """
    dataset, cfg = make_dataset(load_text(None)), GPTConfig()
    data, x_val, y_val = dataset.split("train"), *get_batch(dataset.split("val"), 8, SEQ_LEN, 7, 0)
    one = build_model(cfg, SEED, "cpu")  # one device, the whole batch (rank 0's only)
    dp = DataParallel(build_model(cfg, SEED, "cpu"), "bucketed", 25.0)
    group, n = dp.group, dp.world_size  # the data-parallel ranks: every rank of this run
    local = build_model(cfg, SEED, "cpu")  # the source's local_model_params
    global_ = build_model(cfg, SEED, "cpu")  # the source's global_model_params
    rows = []
    for epoch in range(epochs):
        for k in range(batches_per_epoch):
            x, y = get_batch(data, batch_size, SEQ_LEN, SEED, k, ctx.rank, ctx.world_size)
            local_grads = _grads(local, x, y)  # the source's local_gradients
            _sgd(local, local_grads, lr)
            _grads(dp, x, y)
            dp.finish_gradient_synchronization()
            _sgd(dp, [p.grad for p in dp.params], lr)
            if ctx.rank == 0:
                _sgd(one, _grads(one, *get_batch(data, batch_size, SEQ_LEN, SEED, k)), lr)
            if k == batches_per_epoch - 1:  # end of epoch: aggregate the LAST batch only
                for g in local_grads:
                    dist.all_reduce(g, group=group)
                    g.div_(n)
                _sgd(global_, local_grads, lr)
            with torch.no_grad():
                losses = {
                    name: loss_fn(m(x_val), y_val).item()
                    for name, m in [("one", one), ("dp", dp), ("local", local), ("global", global_)]
                }
            local_all = [torch.zeros(1) for _ in range(n)]
            dist.all_gather(local_all, torch.tensor([losses["local"]]), group=group)
            rows.append({
                "step": epoch * batches_per_epoch + k + 1,
                **losses,
                "local_per_rank": [float(t) for t in local_all],
                "spread_local": _spread(_flat_params(local), group),
                "spread_dp": _spread(_flat_params(dp.module), group),
                "global_vs_dp": float((_flat_params(global_) - _flat_params(dp.module)).norm()
                                      / _flat_params(dp.module).norm()),
            })  # fmt: skip
    return {"rows": rows} if ctx.rank == 0 else None


def plot_weak_scaling(
    panels: dict[str, dict[int, dict[str, list[float]]]], title: str = ""
) -> plt.Figure:
    """Chapter 2: speed-up over one rank at a fixed per-rank batch, one panel per run.

    ``panels[title][b]`` holds ``worlds``, ``measured`` and ``model`` (speed-ups, i.e.
    tokens/s at N over tokens/s at N = 1 with the same b). All panels share one linear
    y axis; colour is the batch, line style says measured, model or perfect.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    batches = sorted({b for panel in panels.values() for b in panel})
    top = max(max(r["worlds"]) for panel in panels.values() for r in panel.values())
    for ax, (panel_title, panel) in zip(axes, panels.items(), strict=True):
        ax.plot([1, top], [1, top], ":", color="0.5")
        for b, r in panel.items():
            color = f"C{batches.index(b)}"
            ax.plot(r["worlds"], r["measured"], "o-", color=color)
            ax.plot(r["worlds"], r["model"], "--", color=color, alpha=0.7)
        ax.set_xticks(sorted({w for r in panel.values() for w in r["worlds"]}))
        ax.set_xlabel("ranks N")
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over one rank (same b per rank)")
    axes[0].set_ylim(0, top + 0.3)
    handles = [Line2D([], [], color=f"C{i}", lw=3) for i in range(len(batches))]
    handles += [
        Line2D([], [], color="k", marker="o", ls="-"),
        Line2D([], [], color="k", ls="--"),
        Line2D([], [], color="0.5", ls=":"),
    ]
    labels = [f"b = {b} sequences per rank" for b in batches]
    labels += ["measured", "model (alpha-beta + compute)", "perfect (N x)"]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def plot_source_scheme(rows: list[dict[str, Any]], batches_per_epoch: int) -> plt.Figure:
    """Chapter 2: held-out loss and replica spread per batch, from :func:`source_scheme_worker`."""
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["one"] for r in rows], "-", color="k", lw=3, alpha=0.4, label="one device")
    ax1.plot(steps, [r["dp"] for r in rows], "--", color="C0", label="data parallel (ours)")
    ax1.plot(steps, [r["global"] for r in rows], "-", color="C3", label="source: global model")
    for rank in range(len(rows[0]["local_per_rank"])):
        ax1.plot(steps, [r["local_per_rank"][rank] for r in rows], ":", color=f"C{rank + 1}",
                 label=f"source: rank {rank}'s local model")  # fmt: skip
    ax1.set_xlabel("batch")
    ax1.set_ylabel("loss on a held-out batch")
    ax1.set_title("Training: the source's scheme vs data parallelism", fontsize=10)
    ax1.legend(fontsize=8)
    ax2.plot(
        steps, [r["spread_local"] for r in rows], "-", color="C3", label="source: local models"
    )
    ax2.plot(steps, [r["spread_dp"] for r in rows], "--", color="C0", label="data parallel")
    ax2.set_xlabel("batch")
    ax2.set_ylabel("|theta_r - theta_0| / |theta_0|, largest r")
    ax2.set_title("How far the ranks' parameters are apart", fontsize=10)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        for end in range(batches_per_epoch, steps[-1] + 1, batches_per_epoch):
            ax.axvline(end, color="0.8", lw=1, zorder=0)
    fig.tight_layout()
    return fig
