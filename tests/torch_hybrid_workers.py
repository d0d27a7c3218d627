"""Workers for tests/test_torch_hybrid.py (spawned ranks import them by name).

One world-4 spawn: every rank trains the single-device reference, then torch's dp2 x tp2
(DTensor TP + FSDP2) without and with sequence parallelism, then ours
(``parallelize`` on ``Topology(2, 1, 2)``), all on the same global batches; it returns
each run's losses, norms before clipping and gathered final parameters.
"""

import torch
import torch.distributed as dist

from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel.compose import parallelize
from course_lib.parallel.torch_hybrid import torch_parallelize
from course_lib.topology import Topology

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=8, vocab_size=64, dropout=0.0,
                   tie_weights=True)  # fmt: skip
DP, TP = 2, 2
GLOBAL_BATCH, STEPS, LR, CLIP = 8, 3, 0.5, 0.3  # CLIP below every norm: it binds
SGD = dict(lr=LR, momentum=0.9)  # linear in the gradients: fp32 rounding stays small


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


def reference() -> dict:
    """The single device: losses, norms before clipping, the final parameters."""
    ref = model()
    opt = torch.optim.SGD(groups(ref.parameters()), **SGD)
    losses, norms = [], []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        loss = loss_fn(ref(x), y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "state": dict(ref.named_parameters())}


def train(hybrid, dp_rank: int) -> dict:
    """STEPS steps of a Hybrid or TorchHybrid on this replica's rows of the global batch."""
    hybrid.build_optimizer(torch.optim.SGD, groups(hybrid.parameters()), **SGD)
    rows = GLOBAL_BATCH // DP
    mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
    losses, norms = [], []
    for step in range(STEPS):
        x, y = batch(step)
        losses.append(hybrid.step(x[mine], y[mine], LR, CLIP))
        norms.append(hybrid.last_grad_norm)
    state = hybrid.full_state_dict()
    return {"losses": losses, "norms": norms, "state": state}


def torch_run(ctx, sp: bool) -> dict:
    """torch's dp2 x tp2: DTensor TP on mesh["tp"], FSDP2 on mesh["dp"]."""
    hybrid = torch_parallelize(model(), DP, TP, sequence_parallel=sp, seq_len=CONFIG.block_size)
    out = train(hybrid, dp_rank=ctx.rank // TP)
    wte = hybrid.model.wte.weight
    out["wte_local"] = tuple(wte.to_local().shape)
    out["tied"] = hybrid.model.lm_head.weight is wte
    return out


def ours_run(ctx) -> dict:
    """Ours: chapter 7's parallelize on Topology(2, 1, 2), no pipeline."""
    topology = Topology(DP, 1, TP)
    hybrid = parallelize(model(), topology, microbatches=1, global_batch=GLOBAL_BATCH,
                         seq_len=CONFIG.block_size)  # fmt: skip
    return train(hybrid, dp_rank=topology.dp_rank)


def every_run(ctx) -> dict:
    """The reference, torch's without and with sequence parallelism, ours: one spawn."""
    torch.set_num_threads(1)
    ref = reference()
    out = {
        "reference": {**ref, "state": {n: p.detach().clone() for n, p in ref["state"].items()}},
        "torch": torch_run(ctx, sp=False),
        "torch_sp": torch_run(ctx, sp=True),
        "ours": ours_run(ctx),
    }
    dist.barrier()
    return out
