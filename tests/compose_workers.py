"""Workers for tests/test_compose.py (spawned ranks import them by name).

One spawn per world size runs every ((dp, pp, tp), sequence parallel, ZeRO stage) in turn,
each on a new Topology;
every rank also trains the single-device reference on the same global batch and returns
(got, want) pairs that the test compares.
"""

import torch
import torch.distributed as dist

from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel.compose import parallelize
from course_lib.topology import Topology

CONFIG = GPTConfig(n_layer=4, n_head=4, n_embd=32, block_size=8, vocab_size=64, dropout=0.0,
                   tie_weights=True)  # fmt: skip
GLOBAL_BATCH, STEPS, LR, CLIP = 16, 3, 0.5, 0.3  # CLIP below every norm: it binds


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, CONFIG.block_size + 1),
                           generator=gen)  # fmt: skip
    return tokens[:, :-1], tokens[:, 1:]  # (B, T) each


def groups(params) -> list[dict]:
    """Two optimizer groups, as training uses: weight decay on matrices only."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip


SGD = dict(lr=LR, momentum=0.9)  # SGD with momentum: linear in the gradients, so fp32
# rounding stays as small as it is (AdamW's first step, g / sqrt(g^2), would blow a
# near-zero gradient's noise up to lr)


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups(params), **SGD)


def reference() -> dict:
    """The single device: losses, norms before clipping, and the final state dict."""
    ref = model()
    opt = optimizer(ref.parameters())
    losses, norms = [], []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        loss = loss_fn(ref(x), y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "state": ref.state_dict()}


def run_shape(shape: tuple[int, int, int], sp: bool, zero: int, want: dict) -> dict:
    """STEPS steps of one (dp, pp, tp) shape; (got, want) of losses, norms and parameters."""
    dp, pp, tp = shape
    topology = Topology(dp, pp, tp)
    m = 2 * pp
    hybrid = parallelize(model(), topology, microbatches=m, sequence_parallel=sp,
                         zero_stage=zero, global_batch=GLOBAL_BATCH,
                         seq_len=CONFIG.block_size)  # fmt: skip
    hybrid.build_optimizer(torch.optim.SGD, groups(hybrid.parameters()), **SGD)
    losses, norms = [], []
    for step in range(STEPS):
        x, y = batch(step)
        rows = GLOBAL_BATCH // dp  # this replica's share of the global batch
        mine = slice(topology.dp_rank * rows, (topology.dp_rank + 1) * rows)
        losses.append(hybrid.step(x[mine], y[mine], LR, CLIP))  # this replica's rows
        norms.append(hybrid.last_grad_norm)
    pieces = {}  # this rank's slice of every parameter it holds, beside the reference's
    for name, p in hybrid.named_parameters():
        whole = want["state"][name]
        ref = p.tp_shard.take(whole) if hasattr(p, "tp_shard") else whole
        pieces[name] = (p.detach().clone(), ref)
    full = hybrid.full_state_dict()
    shard_numels = [zg.layout.shard_numel for zg in hybrid.zero_groups]
    local_numel = sum(p.numel() for p in hybrid.parameters())
    return {
        "memory": hybrid.memory_bytes(),
        "shard_numels": shard_numels,
        "local_numel": local_numel,
        "coords": (topology.dp_rank, topology.pp_rank, topology.tp_rank),
        "losses": (losses, want["losses"]),
        "norms": (norms, want["norms"]),
        "pieces": pieces,
        "full": {k: (full[k], v) for k, v in want["state"].items()},
    }


def every_shape(ctx, shapes: list[tuple[tuple[int, int, int], bool, int]]) -> list[dict]:
    """Each ((dp, pp, tp), sequence_parallel, zero) in turn on this rank: one result each."""
    torch.set_num_threads(1)
    want = reference()
    out = [run_shape(shape, sp, zero, want) for shape, sp, zero in shapes]
    dist.barrier()
    return out
