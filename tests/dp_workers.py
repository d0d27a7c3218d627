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
import torch.nn.functional as F
from torch import nn

from course_lib.data_parallel import DataParallel
from course_lib.launch import DistContext
from course_lib.model import GPT, GPTConfig
from course_lib.zero import FullyShardedDataParallel, ZeroRedundancyOptimizer, clip_grad_norm_

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

    def forward(self, x: torch.Tensor, y: torch.Tensor, use_extra: bool = True):
        h = self.blocks[0](self.emb(x))  # (B, T, 7)
        if use_extra:
            h = self.blocks[1](h)
        logits = self.head(self.frozen(h))  # (B, T, VOCAB)
        return logits, F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


@dataclass(frozen=True)
class Case:
    """One equivalence run: a wrapper, a model, an optimizer and the wrapper's options."""

    kind: str  # "dp", "dp_accum" (no_sync, 2 micro-batches), "zero1", "zero2", "zero3"
    model: str = "gpt"  # "gpt" or "toy"
    optim: str = "adamw"  # a key of OPTIMIZERS
    mode: str = "overlapped"  # DataParallel mode
    bucket_mb: float = 25.0  # DataParallel bucket cap
    unused: str = "none"  # toy's extra block: "none" always used, "ranks" per rank, "steps"
    compute_dtype: str | None = None  # zero3 only
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
    cases.append(Case("zero3", "gpt", "adamw", compute_dtype="float64"))
    cases.append(Case("zero3", "gpt", "adamw", compute_dtype="bfloat16"))
    return cases


def build(model: str) -> nn.Module:
    torch.manual_seed(0)
    return GPT(TINY_GPT) if model == "gpt" else Toy()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: (GLOBAL_BATCH, SEQ) token ids and targets."""
    gen = torch.Generator().manual_seed(100 + step)
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
    if case.model == "toy":
        return model(x, y, use_extra(case, step, rank))[1]
    return model(x, y)[1]


def groups(params: list[nn.Parameter], key=lambda p: int(p.dim() >= 2)) -> list[dict]:
    """Two groups as the course's AdamW: decay on 2-D weights only."""
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if key(p) == 1], "weight_decay": 0.1},
        {"params": [p for p in params if key(p) == 0], "weight_decay": 0.0},
    ]


def reference_step(model, opt, case: Case, step: int, world_size: int) -> float:
    """One device, the whole global batch: the mean of the N slices' mean losses."""
    x, y = batch(step)
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
    """One rank's wrapped model for ``case``: step() and params() hide the wrapper."""

    def __init__(self, case: Case, ctx: DistContext) -> None:
        self.case, self.rank, self.n = case, ctx.rank, ctx.world_size
        cls, kw = OPTIMIZERS[case.optim]
        module = build(case.model)
        self.names = [n for n, _ in module.named_parameters()]
        if case.kind in ("dp", "dp_accum"):
            self.model = DataParallel(module, case.mode, case.bucket_mb,
                                      find_unused_parameters=case.unused == "ranks")  # fmt: skip
            self.opt = cls(groups(list(module.parameters())), **kw)
        elif case.kind in ("zero1", "zero2"):
            self.model = module
            self.opt = ZeroRedundancyOptimizer(groups(list(module.parameters())), cls,
                                               stage=int(case.kind[-1]), **kw)  # fmt: skip
        else:
            dtype = COMPUTE_DTYPES[case.compute_dtype]
            key = lambda p: int(p.dim() >= 2)  # noqa: E731
            self.model = FullyShardedDataParallel(module, compute_dtype=dtype, group_of=key)
            shards = self.model.shard_parameters()
            self.opt = cls(groups([s for _, s in shards], key=lambda s: dict(
                (id(v), k) for k, v in shards)[id(s)]), **kw)  # fmt: skip

    def _backward(self, x, y, step: int) -> None:
        case = self.case
        if case.kind == "dp_accum":  # two micro-batches, the first without communication
            (x1, x2), (y1, y2) = x.chunk(2), y.chunk(2)  # sizes may differ: weight by size
            w1, w2 = len(x1) / len(x), len(x2) / len(x)
            with self.model.no_sync():
                (forward(self.model, case, x1, y1, step, self.rank) * w1).backward()
            (forward(self.model, case, x2, y2, step, self.rank) * w2).backward()
        else:
            forward(self.model, case, x, y, step, self.rank).backward()

    def step(self, step: int) -> None:
        x, y = batch(step)
        x, y = x.chunk(self.n)[self.rank], y.chunk(self.n)[self.rank]
        if self.case.kind == "zero3":
            self.model.zero_grad()
        self.opt.zero_grad()
        self._backward(x, y, step)
        kind, clip = self.case.kind, self.case.clip
        if kind in ("dp", "dp_accum", "zero3"):
            self.model.finish_gradient_synchronization()
        if kind in ("dp", "dp_accum") and clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        elif kind in ("zero1", "zero2"):
            self.opt.reduce_gradients()
            if clip:
                self.opt.clip_grad_norm_(clip)
        elif kind == "zero3" and clip:
            clip_grad_norm_([s for _, s in self.model.shard_parameters()], clip)
        self.opt.step()

    def params(self) -> torch.Tensor:
        if self.case.kind != "zero3":
            module = self.model.module if self.case.kind.startswith("dp") else self.model
            return flat_params(module)
        full = self.model.full_state_dict()
        return torch.cat([full[n].reshape(-1) for n in self.names])


def run_case(ctx: DistContext, case: Case) -> dict:
    runner = Runner(case, ctx)
    ref = build(case.model)
    cls, kw = OPTIMIZERS[case.optim]
    ref_opt = cls(groups(list(ref.parameters())), **kw)
    ours, theirs = [], []
    for step in range(STEPS):
        runner.step(step)
        reference_step(ref, ref_opt, case, step, ctx.world_size)
        ours.append(runner.params())
        theirs.append(flat_params(ref))
    return {"ours": torch.stack(ours), "ref": torch.stack(theirs)}


def run_cases(ctx: DistContext, cases: list[Case]) -> list[dict]:
    torch.set_num_threads(1)
    return [run_case(ctx, case) for case in cases]


def wrap_mismatched(ctx: DistContext, what: str) -> None:
    """Rank 2 builds another model: one more layer ("count") or a wider one ("shape")."""
    if ctx.rank != 2:
        module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    elif what == "count":
        module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    else:
        module = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2))
    DataParallel(module)
