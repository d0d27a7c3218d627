"""Grader for chapter 4's exercise: the learner's synchronous server round, on real ranks.

The learner's ``sync_round(shard, workers, lr)`` replaces the library's inside
:class:`course_lib.parallel.parameter_server.ParameterServer`; a short run of the tiny GPT through
it is compared, step by step and parameter by parameter, with single-device SGD.
"""

from __future__ import annotations

import os

import torch

from course_lib.data import get_batch, load_text, make_dataset
from course_lib.grading.core import ATOL, RTOL, import_learner, stub_error
from course_lib.launch import DeadlineError, RankError, run_distributed
from course_lib.model import GPTConfig
from course_lib.parallel.parameter_server import ParameterServer, PSConfig, SGDReference
from course_lib.train import TrainConfig, lr_at

MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
CONFIG = TrainConfig(steps=3, batch_size=12, seq_len=16, lr=0.3, min_lr=0.1, warmup_steps=0,
                     weight_decay=0.0, grad_clip=0.0)  # fmt: skip


def _run(strategy, data, steps: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Losses and named parameters after every step (the same loop on ranks and here)."""
    losses, params, cfg = [], [], CONFIG
    for step in range(steps):
        x, y = get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step,
                         strategy.data_rank, strategy.data_world_size)  # fmt: skip
        losses.append(strategy.train_step(x, y, lr_at(step, cfg)))
        params.append({k: v.detach().clone() for k, v in strategy.model.named_parameters()})
    return losses, params


def _grade_worker(ctx, cwd: str, module_name: str, fn_name: str, n_servers: int) -> dict | None:
    """Runs on each rank: the parameter server with the learner's ``sync_round``."""
    torch.set_num_threads(1)
    fn = getattr(import_learner(cwd, module_name), fn_name)
    strategy = ParameterServer(ctx, PSConfig(n_servers=n_servers), server_round=fn)
    strategy.setup(MODEL, CONFIG, "cpu")
    losses, params = _run(strategy, make_dataset(load_text()).train, CONFIG.steps)
    return None if strategy.is_server else {"losses": losses, "params": params}


def _reference() -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """SGD's losses and parameters; parameters[0] is the initial model, then every step."""
    torch.set_num_threads(1)  # as on the ranks: matmuls then add in the same order
    strategy = SGDReference()
    strategy.setup(MODEL, CONFIG, "cpu")
    start = {k: v.detach().clone() for k, v in strategy.model.named_parameters()}
    losses, params = _run(strategy, make_dataset(load_text()).train, CONFIG.steps)
    return losses, [start, *params]


def _hint(got: torch.Tensor, want: torch.Tensor, before: torch.Tensor, n_workers: int) -> str:
    """What a wrong update looks like: no update, the sum instead of the mean, a sign."""
    moved, should = (got - before).flatten(), (want - before).flatten()
    ratio = float(moved @ should / (should @ should).clamp_min(1e-30))
    if moved.abs().max() == 0:
        return "the parameters did not move: update `shard` in place (shard.add_ / shard -= ...)"
    if abs(ratio - n_workers) < 0.05 * n_workers:
        return f"the update is {n_workers}x too large: divide the summed gradients by W"
    if abs(ratio + 1) < 0.05:
        return "the update has the wrong sign: theta <- theta - lr * mean(g)"
    return f"the update is {ratio:.3f} times the expected one"


def _compare(results: list[dict], ref, n_servers: int) -> None:
    ref_losses, ref_params = ref
    n_workers = len(results)
    for step in range(CONFIG.steps):
        for w, r in enumerate(results):
            rank = n_servers + w
            for name, want in ref_params[step + 1].items():
                got = r["params"][step][name]
                if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                    hint = _hint(got, want, ref_params[step][name], n_workers)
                    raise AssertionError(
                        f"step {step}, worker rank {rank}: parameter {name!r} differs from "
                        f"single-device SGD by up to {(got - want).abs().max():.3g}. {hint}"
                    )
            if abs(r["losses"][step] - ref_losses[step]) > ATOL + RTOL * abs(ref_losses[step]):
                raise AssertionError(
                    f"step {step}, worker rank {rank}: the loss in your reply is "
                    f"{r['losses'][step]:.6f}, expected the mean of the workers' losses, "
                    f"{ref_losses[step]:.6f} (header field 3 of every PARAMS reply)"
                )


def grade_sync_round(module_name: str, fn_name: str = "sync_round", world_size: int = 3,
                     n_servers: int = 1) -> None:  # fmt: skip
    """Chapter 4's graded exercise: train through the learner's ``sync_round`` on
    ``world_size`` ranks (``n_servers`` servers) and compare every step with SGD."""
    try:
        ranks = run_distributed(_grade_worker, world_size, os.getcwd(), module_name, fn_name,
                                n_servers, timeout_s=90, pg_timeout_s=20)  # fmt: skip
    except RankError as err:
        stub = stub_error(err, fn_name, module_name)
        if stub is not None:
            raise stub from None
        if "Timed out" in str(err):
            raise AssertionError(
                "a rank waited for a message that never came: receive one PUSH from every "
                "worker and send every worker one PARAMS reply, with the tags PUSH and PARAMS"
                f"\n\n{err}"
            ) from None
        raise
    except DeadlineError as err:
        raise AssertionError(f"the run hung: every recv needs a matching send\n\n{err}") from None
    _compare([r for r in ranks if r is not None], _reference(), n_servers)
    roles = f"{n_servers} server(s), {world_size - n_servers} workers"
    print(f"OK: {fn_name} trains like single-device SGD for {CONFIG.steps} steps ({roles})")
