"""Workers for tests/test_tensor_parallel.py (spawned ranks import them by name).

One spawn per world size runs every check (:func:`everything`); each returns plain data
(pairs of got/expected tensors, byte counts) that the test compares.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib import collectives as C
from course_lib.model import GPT, Block, GPTConfig, loss_fn
from course_lib.parallel import dtensor_tp
from course_lib.parallel import tensor_parallel as T
from course_lib.parallel.tensor_gpt import (
    TensorParallelBlock,
    gather_full_gradients,
    gather_full_state_dict,
    tensor_parallelize,
)
from course_lib.parallel.tensor_strategy import TensorParallelSync
from course_lib.topology import Topology

BASE = dict(n_layer=2, n_head=4, n_embd=32, block_size=8, vocab_size=256, dropout=0.0)


def config(**overrides) -> GPTConfig:
    return GPTConfig(**{**BASE, **overrides})


def batch(cfg: GPTConfig, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (n, cfg.block_size + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _reference(cfg: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg)


def _opt(params) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay: linear in the gradients, so fp32 rounding in a
    near-zero gradient stays as small as it is (AdamW's first step, g / sqrt(g^2), would
    blow it up to the size of the learning rate and compare nothing but noise)."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)


def model_case(topology: Topology, case: dict) -> dict:
    """Loss, every gradient and (after ``steps`` AdamW steps) every parameter, vs one device."""
    cfg = config(**case.get("config", {}))
    ref = _reference(cfg)
    tpm = tensor_parallelize(ref, topology, case["sp"], collectives=case.get("collectives", "ours"),
                             recompute_all_gather=case.get("rg", False))  # fmt: skip
    sync = TensorParallelSync(tpm)
    ref_opt, tp_opt = _opt(ref.parameters()), _opt(tpm.parameters())
    out: dict = {"steps": [], "held": sum(p.numel() for p in tpm.parameters())}
    for step in range(case.get("steps", 1)):
        x, y = batch(cfg, seed=step)
        for opt in (ref_opt, tp_opt):
            opt.zero_grad()
        ref_loss = loss_fn(ref(x), y)
        ref_loss.backward()
        loss = tpm.loss(tpm(x), y)
        loss.backward()
        sync.finish_gradient_synchronization()
        ref_grads = dict(ref.named_parameters())
        grads = {}
        for name, p in tpm.named_parameters():
            want = ref_grads[name].grad
            want = p.tp_shard.take(want) if hasattr(p, "tp_shard") else want
            grads[name] = (p.grad.clone(), want.clone())
        out["steps"].append({"loss": (loss.item(), ref_loss.item()), "grads": grads})
        ref_opt.step()
        tp_opt.step()
    full = gather_full_state_dict(tpm)
    out["params"] = {k: (full[k], v.detach().clone()) for k, v in ref.state_dict().items()}
    return out


def _linear(n_in: int, n_out: int, seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def layers(topology: Topology) -> dict:
    """Column output exactly the reference's slice; row output and gradients close."""
    comm = T.TPComm(topology.tp_group)
    n, r = comm.size, comm.rank
    x = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(1))
    lin = _linear(12, 8, seed=2)
    col = T.ColumnParallelLinear.from_linear(lin, comm)
    col_out = col(x)
    rows = slice(r * 8 // n, (r + 1) * 8 // n)
    own_matmul = F.linear(x, lin.weight[rows], lin.bias[rows])  # no sum over ranks: bitwise
    gathered = T.ColumnParallelLinear.from_linear(lin, comm, gather_output=True)(x)
    row_lin = _linear(12, 5, seed=3)
    row = T.RowParallelLinear.from_linear(row_lin, comm)
    xs = x.chunk(n, -1)[r].clone().requires_grad_()
    row_out = row(xs)
    row_out.backward(torch.ones_like(row_out))
    xr = x.clone().requires_grad_()
    ref_out = row_lin(xr)
    ref_out.backward(torch.ones_like(ref_out))
    whole_in = T.RowParallelLinear.from_linear(row_lin, comm, input_is_parallel=False)(x)
    return {
        "column": (col_out.detach(), own_matmul.detach()),
        "column_slice": (col_out.detach(), lin(x).chunk(n, -1)[r].detach()),
        "column_gathered": (gathered.detach(), lin(x).detach()),
        "row": (row_out.detach(), ref_out.detach()),
        "row_whole_input": (whole_in.detach(), ref_out.detach()),
        "row_weight_grad": (row.weight.grad, row_lin.weight.grad.chunk(n, -1)[r]),
        "row_bias_grad": (row.bias.grad, row_lin.bias.grad),
        "row_input_grad": (xs.grad, xr.grad.chunk(n, -1)[r]),
    }


def cross_entropy(topology: Topology) -> dict:
    """Vocabulary-parallel cross-entropy vs F.cross_entropy, padded vocabulary or not."""
    comm = T.TPComm(topology.tp_group)
    n, r = comm.size, comm.rank
    out = {}
    for vocab in (12 * n, 12 * n - 1):  # divisible; then one id short (padding on the last)
        gen = torch.Generator().manual_seed(vocab)
        logits = torch.randn(3, 5, vocab, generator=gen, dtype=torch.float64) * 3
        targets = torch.randint(0, vocab, (3, 5), generator=gen)
        targets[0, 0] = vocab - 1  # the last real id, next to the padding
        full = logits.clone().requires_grad_()
        want = F.cross_entropy(full.view(-1, vocab), targets.view(-1))
        want.backward()
        padded = T.padded_vocab(vocab, n)
        pad = torch.zeros(3, 5, padded - vocab, dtype=torch.float64)
        shard = torch.cat([logits, pad], -1).chunk(n, -1)[r].clone().requires_grad_()
        got = T.vocab_parallel_cross_entropy(shard, targets, comm, vocab)
        got.backward()
        want_grad = torch.cat([full.grad, pad], -1).chunk(n, -1)[r]
        out[vocab] = {"loss": (got.detach(), want.detach()), "grad": (shard.grad, want_grad)}
    return out


def gradchecks(topology: Topology) -> dict:
    """torch.autograd.gradcheck in float64 of composites whose value is the same on every rank.

    Each operator's backward assumes what the next layer does with its output (a
    column-parallel layer sends back partial gradients, ...), so each is checked inside a
    function of a replicated input whose output is replicated too.
    """
    comm = T.TPComm(topology.tp_group)
    n, r = comm.size, comm.rank
    gen = torch.Generator().manual_seed(100 + r)  # rank-specific maps: each rank's slice
    a = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    scale = 1.0 + r

    def f_then_g(x):  # sum_r x A_r: f, a rank's slice, g
        return T.reduce_from_tensor_parallel(T.copy_to_tensor_parallel(x, comm) @ a, comm)

    def sequence_pair(x):  # (1, n, 3): f, partials, reduce-scatter (T), all-gather (T), g
        h = T.copy_to_tensor_parallel(x, comm) @ a @ b  # partial sums, full size
        h = T.reduce_scatter_to_sequence_parallel(h, comm) * scale  # (1, 1, 3) shard
        h = T.gather_from_sequence_parallel(h.tanh(), comm) @ a  # partial again
        return T.reduce_from_tensor_parallel(h, comm)

    w = torch.randn(2, 3, generator=gen, dtype=torch.float64)  # a column-parallel slice
    bias = torch.randn(2, generator=gen, dtype=torch.float64)

    def regather(x):  # (1, n, 3): as sequence_pair, Megatron's linear gathering twice
        h = T.copy_to_tensor_parallel(x, comm) @ a @ b  # partial sums, full size
        shard = T.reduce_scatter_to_sequence_parallel(h, comm)  # (1, 1, 3)
        y = T.AllGatherLinear.apply(shard.tanh(), w, bias, comm)  # (1, n, 2): my columns
        return T.reduce_from_tensor_parallel(y @ a.t(), comm)  # a row-parallel step, then g

    def scatter_gather(x):  # (2, n): split the last dim, scale, all-gather it back
        return T.gather_from_tensor_parallel(T.scatter_to_tensor_parallel(x, comm) * scale, comm)

    def entropy(x):  # cross-entropy of whole logits (3, 2n - 1) from their vocabulary shards
        pad = torch.zeros(3, 1, dtype=x.dtype)
        shard = T.scatter_to_tensor_parallel(torch.cat([x, pad], -1), comm)
        return T.vocab_parallel_cross_entropy(shard, targets, comm, 2 * n - 1)

    targets = torch.tensor([0, 2 * n - 2, 1])  # the last real id is next to the padding
    same = torch.Generator().manual_seed(7)  # the same inputs on every rank
    inputs = {
        "f_then_g": torch.randn(2, 3, generator=same, dtype=torch.float64),
        "sequence_pair": torch.randn(1, n, 3, generator=same, dtype=torch.float64),
        "regather": torch.randn(1, n, 3, generator=same, dtype=torch.float64),
        "scatter_gather": torch.randn(2, n, generator=same, dtype=torch.float64),
        "entropy": torch.randn(3, 2 * n - 1, generator=same, dtype=torch.float64),
    }
    fns = {"f_then_g": f_then_g, "sequence_pair": sequence_pair, "regather": regather,
           "scatter_gather": scatter_gather, "entropy": entropy}  # fmt: skip
    return {
        name: torch.autograd.gradcheck(fn, (inputs[name].requires_grad_(),), raise_exception=False)
        for name, fn in fns.items()
    }


def block_bytes(topology: Topology) -> dict:
    """Bytes one rank sends for one block's forward and backward, per collective."""
    cfg = config()
    out = {}
    for sp, rg in ((False, False), (True, False), (True, True)):
        counter = C.CommCounter()
        comm = T.TPComm(topology.tp_group, counter)
        torch.manual_seed(0)
        block = TensorParallelBlock(Block(cfg), comm, sp, T.TensorParallelRNG(0, comm.rank))
        for m in (block.attn.c_attn, block.mlp.c_fc):
            m.recompute_all_gather = rg
        B, L, d = 4, 8, cfg.n_embd
        x = torch.randn(B, L // comm.size if sp else L, d, requires_grad=True)
        y = block(x)
        forward = dict(counter.bytes_sent_by_op)
        counter.reset()
        y.backward(torch.ones_like(y))
        out[sp, rg] = {"forward": forward, "backward": dict(counter.bytes_sent_by_op),
                   "B": B, "T": L, "d": d}  # fmt: skip
    return out


def dropout(topology: Topology) -> dict:
    """Megatron's rule: the same masks on the replicated stream, different ones inside a split."""
    cfg = config(dropout=0.5)
    tpm = tensor_parallelize(_reference(cfg), topology).train()
    torch.manual_seed(123)  # the default stream: alike on every rank
    x, _ = batch(cfg)
    h = tpm.embed(x)
    for block in tpm.blocks:
        h = block(h)
    outside = torch.rand(4)
    with tpm.rng.fork():
        inside = torch.rand(4)
    return {"stream": h.detach(), "outside": outside, "inside": inside}


def ours_and_torch(topology: Topology) -> dict:
    """The same GPT under our tensor parallelism and torch's DTensor: loss and whole gradients."""
    cfg = config()
    x, y = batch(cfg)
    out = {}
    for sp in (False, True):
        ours = tensor_parallelize(_reference(cfg), topology, sp)
        loss = ours.loss(ours(x), y)
        loss.backward()
        TensorParallelSync(ours).finish_gradient_synchronization()
        theirs = dtensor_tp.torch_tensor_parallelize(_reference(cfg), topology.tp_group, sp)
        their_loss = dtensor_tp.torch_tp_step(theirs, x, y)
        out[sp] = {"loss": (loss.item(), their_loss), "ours": gather_full_gradients(ours),
                   "torch": dtensor_tp.full_gradients(theirs)}  # fmt: skip
    return out


def everything(ctx, cases: list[dict], extras: bool) -> dict:
    torch.set_num_threads(1)
    topology = Topology(tp=ctx.world_size)
    out = {"models": [model_case(topology, case) for case in cases]}
    if extras:
        out.update(layers=layers(topology), entropy=cross_entropy(topology),
                   gradcheck=gradchecks(topology), bytes=block_bytes(topology),
                   dropout=dropout(topology), torch=ours_and_torch(topology))  # fmt: skip
    dist.barrier()
    return out
