"""Worker functions for tests/test_data_parallel.py (chapters 2 and 3).

One spawn per world size runs every case (:func:`run_cases`). In each case every rank
trains a wrapped model (DataParallel, ZeRO-1/2 or FSDP) for ``STEPS`` steps on its slice
of the global batch AND, beside it, the single-device reference on the whole global
batch, and returns both models' parameters after every step. The parent compares them
(reference: tolerance; across ranks: bitwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_lib.launch import DistContext
from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel.data_parallel import DataParallel
from course_lib.parallel.fsdp import FullyShardedDataParallel
from course_lib.parallel.zero import ZeroRedundancyOptimizer
from course_lib.topology import Topology
from course_lib.train import train_step

STEPS = 5
GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
SEQ = 6
VOCAB = 11
TINY_GPT = GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=10)
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99))),
}
COMPUTE_DTYPES = {None: None, "float64": torch.float64, "bfloat16": torch.bfloat16}


class ToyBlock(nn.Module):
    """An odd-sized residual block: 7 -> 13 -> 7."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(7, 13), nn.Linear(13, 7)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.tanh(self.up(h)))  # (B, T, 7)


class Toy(nn.Module):
    """Tied embedding/head, a frozen layer, a block that some steps skip, odd sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 7)
        self.blocks = nn.ModuleList([ToyBlock(), ToyBlock()])  # block 1: only when used
        self.frozen = nn.Linear(7, 7)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(7, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # one Parameter used twice

    use_extra = True  # whether forward runs block 1; set per step and rank by the test

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](self.emb(x))  # (B, T, 7)
        if self.use_extra:
            h = self.blocks[1](h)
        return self.head(self.frozen(h))  # (B, T, VOCAB)


@dataclass(frozen=True)
class Case:
    """One equivalence run: a wrapper, a model, an optimizer and the wrapper's options."""

    kind: str  # "dp", "zero1", "zero2", "zero3"; "<kind>_accum": no_sync, 2 micro-batches
    model: str = "gpt"  # "gpt" or "toy"
    optim: str = "adamw"  # a key of OPTIMIZERS
    mode: str = "overlapped"  # DataParallel mode
    bucket_mb: float = 25.0  # DataParallel bucket cap
    unused: str = "none"  # toy's extra block: "none" always used, "ranks" per rank, "steps"
    compute_dtype: str | None = None  # zero3 only
    prefetch: bool = False  # zero3 only: overlapped all-gathers and reduce-scatters
    clip: float = 0.0  # clip the global grad norm to this (0: off)


def make_cases() -> list[Case]:
    """Every case that runs at every world size."""
    cases = []
    for mode in ("naive", "bucketed", "overlapped"):
        for mb in (25.0, 0.0005):  # 0.0005 MB = 524 B: smaller than most parameters
            cases.append(Case("dp", "gpt", "adamw", mode, mb))
        cases.append(Case("dp", "toy", "sgd", mode, 0.0003))
        cases.append(Case("dp", "toy", "adamw", mode, 0.0003, unused="ranks"))
        cases.append(Case("dp_accum", "gpt", "adamw", mode, 0.002))
    cases.append(Case("dp", "gpt", "sgd", "overlapped", 0.002, clip=0.05))
    for kind in ("zero1", "zero2", "zero3"):
        for optim in ("sgd", "adamw"):
            cases.append(Case(kind, "gpt", optim))
        cases.append(Case(kind, "toy", "adamw", unused="steps" if kind == "zero3" else "none"))
        cases.append(Case(kind, "gpt", "adamw", clip=0.05))
        cases.append(Case(f"{kind}_accum", "gpt", "adamw"))
    cases.append(Case("zero3", "gpt", "adamw", compute_dtype="float64"))
    cases.append(Case("zero3", "gpt", "adamw", compute_dtype="bfloat16"))
    # ZeRO-3 with prefetch: the variants whose path it changes (skips, no_sync, bf16).
    cases.append(Case("zero3", "gpt", "adamw", prefetch=True))
    cases.append(Case("zero3", "toy", "adamw", unused="steps", prefetch=True))
    cases.append(Case("zero3_accum", "gpt", "adamw", prefetch=True))
    cases.append(Case("zero3", "gpt", "adamw", compute_dtype="bfloat16", prefetch=True))
    return cases


def build(model: str) -> nn.Module:
    torch.manual_seed(0)
    return GPT(TINY_GPT) if model == "gpt" else Toy()


def batch(step: int, replica: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (of one independent replica set): (GLOBAL_BATCH, SEQ)."""
    gen = torch.Generator().manual_seed(100 + step + 1000 * replica)
    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return data[:, :-1], data[:, 1:]


def use_extra(case: Case, step: int, rank: int) -> bool:
    """Whether rank ``rank`` runs the toy's extra block at ``step``."""
    if case.unused == "ranks":  # rank 0 at even steps, nobody at step 3
        return rank == 0 and step % 2 == 0
    if case.unused == "steps":  # every rank alike: skipped at odd steps
        return step % 2 == 0
    return True


def forward(model: nn.Module, case: Case, x, y, step: int, rank: int) -> torch.Tensor:
    set_extra(model, case, step, rank)
    return loss_fn(model(x), y)


def set_extra(model: nn.Module, case: Case, step: int, rank: int) -> None:
    """Tell the toy model (wrapped or not) whether to run its extra block now."""
    for m in model.modules():
        if isinstance(m, Toy):
            m.use_extra = use_extra(case, step, rank)


def groups(params: list[nn.Parameter], key=lambda p: int(p.dim() >= 2)) -> list[dict]:
    """Two groups as the course's AdamW: decay on 2-D weights only."""
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if key(p) == 1], "weight_decay": 0.1},
        {"params": [p for p in params if key(p) == 0], "weight_decay": 0.0},
    ]


def reference_step(model, opt, case: Case, step: int, world_size: int, replica: int = 0) -> float:
    """One device, the whole global batch: the mean of the N slices' mean losses."""
    x, y = batch(step, replica)
    xs, ys = x.chunk(world_size), y.chunk(world_size)
    losses = [forward(model, case, xs[r], ys[r], step, r) for r in range(world_size)]
    loss = torch.stack(losses).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if case.clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip)
    opt.step()
    return loss.item()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


class Runner:
    """One rank's wrapped model for ``case``, on data-parallel ``group`` (rank ``rank`` of ``n``).

    Every wrapper is driven through the one GradientSync interface and course_lib.train's
    ``train_step``: no per-wrapper branches below the constructor.
    """

    def __init__(self, case: Case, group, rank: int, n: int, replica: int = 0) -> None:
        self.case, self.rank, self.n, self.replica = case, rank, n, replica
        self.wrapper = case.kind.removesuffix("_accum")
        cls, kw = OPTIMIZERS[case.optim]
        self.lr = kw["lr"]
        module = build(case.model)
        self.names = [n for n, _ in module.named_parameters()]
        if self.wrapper == "dp":
            self.model = self.sync = DataParallel(
                module, case.mode, case.bucket_mb, group=group,
                find_unused_parameters=case.unused == "ranks",
            )  # fmt: skip
            self.opt = cls(groups(list(module.parameters())), **kw)
        elif self.wrapper in ("zero1", "zero2"):
            self.model = module
            self.opt = self.sync = ZeroRedundancyOptimizer(
                groups(list(module.parameters())), cls, group=group,
                stage=int(self.wrapper[-1]), module=module, **kw,
            )  # fmt: skip
        else:
            dtype = COMPUTE_DTYPES[case.compute_dtype]
            key = lambda p: int(p.dim() >= 2)  # noqa: E731
            self.model = self.sync = FullyShardedDataParallel(
                module, group=group, compute_dtype=dtype, group_of=key, prefetch=case.prefetch
            )
            shards = self.model.shard_parameters()
            self.opt = cls(groups([s for _, s in shards], key=lambda s: dict(
                (id(v), k) for k, v in shards)[id(s)]), **kw)  # fmt: skip

    def _accumulate(self, x, y, step: int) -> None:
        """Two micro-batches, the first inside no_sync(); then the usual finish, clip, step."""
        (x1, x2), (y1, y2) = x.chunk(2), y.chunk(2)  # sizes may differ: weight by size
        w1, w2 = len(x1) / len(x), len(x2) / len(x)
        self.opt.zero_grad(set_to_none=True)
        with self.sync.no_sync():
            (forward(self.model, self.case, x1, y1, step, self.rank) * w1).backward()
        (forward(self.model, self.case, x2, y2, step, self.rank) * w2).backward()
        self.sync.finish_gradient_synchronization()
        if self.case.clip:
            self.sync.clip_grad_norm_(self.case.clip)
        self.opt.step()

    def step(self, step: int) -> None:
        x, y = batch(step, self.replica)
        x, y = x.chunk(self.n)[self.rank], y.chunk(self.n)[self.rank]
        if self.case.kind.endswith("_accum"):
            self._accumulate(x, y, step)
            return
        set_extra(self.model, self.case, step, self.rank)
        train_step(self.model, self.opt, self.sync, x, y, self.lr, self.case.clip)

    def params(self) -> torch.Tensor:
        full = self.sync.full_state_dict()
        return torch.cat([full[n].reshape(-1) for n in self.names])


def run_case(ctx: DistContext, case: Case, topology: Topology | None = None) -> dict:
    """``case`` over the world, or over ``topology``'s data-parallel group: then each tensor-
    parallel index is an independent replica set with its own batches and reference."""
    if topology is None:
        runner, n, replica = Runner(case, None, ctx.rank, ctx.world_size), ctx.world_size, 0
    else:
        n, replica = topology.dp, topology.tp_rank
        runner = Runner(case, topology.dp_group, topology.dp_rank, n, replica)
    ref = build(case.model)
    cls, kw = OPTIMIZERS[case.optim]
    ref_opt = cls(groups(list(ref.parameters())), **kw)
    ours, theirs = [], []
    for step in range(STEPS):
        runner.step(step)
        reference_step(ref, ref_opt, case, step, n, replica)
        ours.append(runner.params())
        theirs.append(flat_params(ref))
    return {"ours": torch.stack(ours), "ref": torch.stack(theirs)}


def run_cases(ctx: DistContext, cases: list[Case]) -> list[dict]:
    torch.set_num_threads(1)
    return [run_case(ctx, case) for case in cases]


def run_grid_cases(ctx: DistContext, cases: list[Case], dp: int, tp: int) -> list[dict]:
    """The cases inside a ``Topology(dp=dp, tp=tp)`` grid: data parallel over ``dp_group``."""
    torch.set_num_threads(1)
    topology = Topology(dp=dp, tp=tp)
    return [{**run_case(ctx, case, topology), "tp_rank": topology.tp_rank} for case in cases]


def wrap_mismatched(ctx: DistContext, what: str) -> None:
    """Rank 2 builds another model: one more layer ("count") or a wider one ("shape")."""
    if ctx.rank != 2:
        module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    elif what == "count":
        module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    else:
        module = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2))
    DataParallel(module)


def fsdp_with_plain_adamw(ctx: DistContext) -> dict:
    """FSDP trained as with torch's FSDP: ``torch.optim.AdamW(model.parameters())``."""
    torch.set_num_threads(1)
    model = FullyShardedDataParallel(build("gpt"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref = build("gpt")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(STEPS):
        x, y = batch(step)
        mine = x.chunk(ctx.world_size)[ctx.rank], y.chunk(ctx.world_size)[ctx.rank]
        train_step(model, opt, model, *mine, lr=1e-2, grad_clip=0.0)
        reference_step(ref, ref_opt, Case("zero3"), step, ctx.world_size)
    full = model.full_state_dict()
    return {
        "n_params": len(list(model.parameters())),
        "ours": torch.cat([full[n].reshape(-1) for n, _ in ref.named_parameters()]),
        "ref": flat_params(ref),
    }


def wrap_with_another_ranks_group(ctx: DistContext, wrapper: str) -> None:
    """Both ranks build the group {0}; rank 1 wrongly passes it to a wrapper."""
    import torch.distributed as dist

    only_rank0 = dist.new_group([0])
    if ctx.rank == 0:
        return
    module = build("gpt")
    if wrapper == "dp":
        DataParallel(module, group=only_rank0)
    elif wrapper == "zero1":
        ZeroRedundancyOptimizer(module.parameters(), torch.optim.SGD, group=only_rank0, lr=0.1)
    else:
        FullyShardedDataParallel(module, group=only_rank0)


def chapter2_simulation(ctx: DistContext) -> dict:
    """Chapter 2's simulated link and the source's scheme, in one spawn (tests/test_chapter2.py).

    The simulated link's averaged gradients against plain DataParallel's, the simulated
    timing worker's counts, and a short run of the source's data-parallel scheme.
    """
    from course_lib.chapters import ch02_data_parallel as chapter2

    sim = chapter2.Simulation(0.0, 1e-4, 1e-5, 1e-10, seq_len=4)
    grads = {}
    for name in ("plain", "simulated"):
        for mode in ("bucketed", "overlapped"):
            module = build("gpt")
            if name == "plain":
                model = DataParallel(module, mode, 1e-3)
            else:
                model = chapter2.SimulatedLinkDP(module, mode, 1e-3, sim)
            x, y = batch(0, ctx.rank)
            loss_fn(model(x), y).backward()
            model.finish_gradient_synchronization()
            grads[(name, mode)] = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
            if name == "simulated":
                model.close()
                grads[("alive", mode)] = model._thread.is_alive()
    timing = chapter2.step_timing_worker(ctx, [("overlapped", 0.5)], [1], 1, sim)
    source = chapter2.source_scheme_worker(ctx, 2, 2, 2, 0.1)
    return {"grads": grads, "info": timing["info"], "source": source}
