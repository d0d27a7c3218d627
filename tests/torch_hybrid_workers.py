"""Workers for tests/test_torch_hybrid.py (spawned ranks import them by name).

One world-4 spawn: every rank trains the single-device reference, then torch's dp2 x tp2
(DTensor TP + FSDP2) without and with sequence parallelism, then ours
(``parallelize`` on ``Topology(2, 1, 2)``), all on the same global batches; it returns
each run's losses, norms before clipping and gathered final parameters.
"""

import torch
import torch.distributed as dist
from compose_workers import CLIP, CONFIG, GLOBAL_BATCH, LR, SGD, STEPS, batch, groups, model
from compose_workers import reference as compose_reference

from course_lib.parallel.compose import parallelize
from course_lib.parallel.torch_hybrid import torch_parallelize
from course_lib.topology import Topology

DP, TP = 2, 2  # the model, batches, optimizer and reference are tests/compose_workers.py's


def reference() -> dict:
    """The single device (compose_workers'), its final state under the parameters' names
    (the tied matrix once, as ``wte.weight``, as the gathered runs name it)."""
    ref = compose_reference()
    names = {n for n, _ in model().named_parameters()}
    return {**ref, "state": {n: t for n, t in ref["state"].items() if n in names}}


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
        "reference": ref,
        "torch": torch_run(ctx, sp=False),
        "torch_sp": torch_run(ctx, sp=True),
        "ours": ours_run(ctx),
    }
    dist.barrier()
    return out
