"""Workers for tests/test_dtensor_tp.py (spawned ranks import them by name)."""

import torch

from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel import dtensor_tp as D

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=8, vocab_size=256, dropout=0.0)
BATCH, STEPS, LR, EPS = 4, 3, 1e-2, 1e-6


def model(tied: bool, config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**config.__dict__, "tie_weights": tied}))


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    shape = (BATCH, CONFIG.block_size + 1)
    tokens = [torch.randint(0, CONFIG.vocab_size, shape, generator=gen) for _ in range(steps)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0.1)


def reference(tied: bool) -> dict:
    """The single device: losses, the first step's gradients, the parameters after each step."""
    torch.set_num_threads(1)
    m = model(tied)
    opt, losses, states, grads = optimizer(m.parameters()), [], [], None
    for x, y in batches():
        opt.zero_grad()
        loss = loss_fn(m(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        grads = grads or {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        states.append({n: p.detach().clone() for n, p in m.named_parameters()})
    with torch.no_grad():
        eval_loss = float(loss_fn(m(batches()[0][0]), batches()[0][1]))
    return {"losses": losses, "grads": grads, "states": states, "eval_loss": eval_loss}


def dtensor_run(ctx, tied: bool, sp: bool) -> dict:
    """The same steps on the DTensor model: losses, first gradients, parameters after each step."""
    m = D.torch_tensor_parallelize(model(tied), sequence_parallel=sp)
    opt, losses, states, grads = optimizer(m.parameters()), [], [], None
    for x, y in batches():
        opt.zero_grad()
        losses.append(D.torch_tp_step(m, x, y))
        grads = grads or D.full_gradients(m)
        opt.step()
        states.append(D.full_state_dict(m))
    return {
        "losses": losses,
        "grads": grads,
        "states": states,
        "eval_loss": D.torch_tp_loss(m, *batches()[0]),  # after the steps, forward only
        "one_tied_parameter": m.lm_head.weight is m.wte.weight,
        "local_heads": m.blocks[0].attn.n_head,
        "local_wte": tuple(m.wte.weight.to_local().shape),
        "local_c_attn": tuple(m.blocks[0].attn.c_attn.weight.to_local().shape),
    }


def refusal(ctx, tied: bool, sp: bool, config: GPTConfig, seq_len: int) -> str:
    """The ValueError message a configuration tp cannot split raises, or '' if none."""
    try:
        m = D.torch_tensor_parallelize(model(tied, config), sequence_parallel=sp)
        x = torch.zeros(BATCH, seq_len, dtype=torch.long)
        D.torch_tp_loss(m, x, x)
    except ValueError as e:
        return str(e)
    return ""


def dtensor_many(ctx, configs: list[tuple[bool, bool]], refusals: list[tuple]) -> tuple:
    """Every (tied, sequence_parallel) run, then every refusal, in one spawn."""
    torch.set_num_threads(1)
    runs = [dtensor_run(ctx, tied, sp) for tied, sp in configs]
    return runs, [refusal(ctx, *r) for r in refusals]
