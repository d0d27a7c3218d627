"""Benchmark chapters 2-3: our DP modes and ZeRO stages against torch's, side by side.

On the course's reference GPT (gloo, CPU, one thread per rank, a fixed batch per rank),
every mode trains its own copy of the model in the same run, interleaved step by step so
a busy machine slows them alike; each step starts after a barrier and counts as the
slowest rank's time. Printed per world size: median step time, tokens/s, the ratio to
``torch.nn.parallel.DistributedDataParallel`` and to torch's own version of the same
algorithm (``vs torch``: ZeRO-3 against FSDP2's ``fully_shard``, ZeRO-1/2 against
``torch.distributed.optim.ZeroRedundancyOptimizer`` on DDP; ``zero3`` is our ZeRO-3 on
chapter 1's synchronous ring, ``zero3_prefetch`` the same with prefetched all-gathers and
asynchronous reduce-scatters, as FSDP does); the largest difference of
each mode's losses from torch DDP's (every mode sees the same data from the same
initial weights, so they must agree to fp32 rounding); bytes per rank per step (handed to
all-reduce, and sent as counted by our collectives where the mode uses them) against
the formula (torch's rows: what gloo's algorithms send); bytes each rank holds for
parameters, gradients and optimizer state against ZeRO's formula.

    python -m benchmarks.data_parallel                   # worlds 1, 2, 4; 30 timed steps
    python -m benchmarks.data_parallel --quick           # smoke: worlds 1, 2; 3 steps
    python -m benchmarks.data_parallel --json out.json   # also write every row as JSON

World size 4 oversubscribes 2 cores: read its times as a shape, not a speed. The load
average before and after each world size is printed under its table: on a busy machine
the ratios (measured interleaved) mean more than the times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZero
from torch.distributed.tensor import DTensor

from course_lib import collectives as C
from course_lib.launch import DistContext, run_distributed
from course_lib.memory import held_bytes
from course_lib.model import GPT, GPTConfig
from course_lib.parallel.data_parallel import DataParallel
from course_lib.parallel.fsdp import FullyShardedDataParallel
from course_lib.parallel.zero import ZeroRedundancyOptimizer, zero_memory_formula
from course_lib.train import LocalGradients, train_step

MODES = [
    "torch_ddp", "naive", "bucketed", "overlapped", "torch_zero1", "zero1", "zero2",
    "torch_fsdp2", "zero3", "zero3_prefetch",
]  # fmt: skip
# ZeRO stage of each mode (the others are plain DP: stage 0) and the torch mode it is compared to
STAGE = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_prefetch": 3,
         "torch_zero1": 1, "torch_fsdp2": 3}  # fmt: skip
TORCH_TWIN = {"zero1": "torch_zero1", "zero2": "torch_zero1", "zero3": "torch_fsdp2",
              "zero3_prefetch": "torch_fsdp2"}  # fmt: skip
BUCKET_MB = 0.5  # small enough that the tiny GPT has several buckets to overlap
MIB = 2**20  # memory in binary units, as everywhere in the course


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


class Mode:
    """One mode's model, optimizer, gradient sync and byte counts on this rank."""

    def __init__(self, name: str, config: GPTConfig) -> None:
        torch.manual_seed(0)
        module = GPT(config)
        self.name, self.counter = name, C.CommCounter()
        self.psi = sum(p.numel() for p in module.parameters())
        self.dp: DataParallel | None = None
        self.losses: list[float] = []
        if name in ("torch_ddp", "torch_zero1"):  # DDP averages inside backward: no sync left
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                module, bucket_cap_mb=BUCKET_MB
            )
            self.sync = LocalGradients(module)
            self.opt = (
                _optimizer(module.parameters())
                if name == "torch_ddp"
                else TorchZero(module.parameters(), torch.optim.AdamW, lr=1e-3)
            )
        elif name == "torch_fsdp2":  # as torchtitan: each block, then the root
            for block in module.blocks:
                fully_shard(block)
            self.model = fully_shard(module)
            self.opt, self.sync = _optimizer(module.parameters()), LocalGradients(module)
        elif name in ("naive", "bucketed", "overlapped"):
            self.model = self.dp = self.sync = DataParallel(module, name, BUCKET_MB)
            self.opt = _optimizer(module.parameters())
        elif name in ("zero1", "zero2"):
            self.model = module
            self.opt = self.sync = ZeroRedundancyOptimizer(
                module.parameters(), torch.optim.AdamW, stage=STAGE[name],
                counter=self.counter, module=module, lr=1e-3,
            )  # fmt: skip
        else:
            self.model = self.sync = FullyShardedDataParallel(
                module, counter=self.counter, prefetch=name == "zero3_prefetch"
            )
            self.opt = _optimizer(self.model.parameters())  # the shards, as with torch's FSDP

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = train_step(self.model, self.opt, self.sync, x, y, lr=1e-3, grad_clip=0.0)
        self.losses.append(loss.item())

    def payload_bytes(self) -> float:
        """Bytes handed to collectives per step (DP: the gradient; ZeRO: what our ring sent)."""
        if self.dp is not None:
            return self.dp.bytes_all_reduced
        if self.name == "torch_ddp":
            return 4 * self.psi  # one fp32 gradient through gloo's all-reduce
        return float("nan")

    def memory(self) -> dict[str, int]:
        if self.name == "torch_zero1":  # the inner optimizer holds this rank's state
            return {**self.sync.memory_bytes(self.opt), "optimizer": _local_state(self.opt.optim)}
        if self.name == "torch_fsdp2":  # DTensors: count this rank's local pieces
            params = [p.to_local() for p in self.model.parameters()]
            grads = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
            return {
                "params": held_bytes(params),
                "grads": held_bytes(grads),
                "optimizer": _local_state(self.opt),
            }
        return self.sync.memory_bytes(self.opt)


def _local_state(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's per-parameter tensors held by this rank (DTensors: local)."""
    tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local if t.dim() > 0)


def _timed(fn: Callable[[], None]) -> float:
    """Seconds of ``fn`` on the slowest rank, started together after a barrier."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def bench_worker(
    ctx: DistContext, config: GPTConfig, batch: int, steps: int, warmup: int, modes: list[str]
) -> dict:
    """Each rank: per mode, step times, bytes per step and bytes held."""
    torch.set_num_threads(1)
    built = {name: Mode(name, config) for name in modes}
    gen = torch.Generator().manual_seed(ctx.rank)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for i in range(warmup + steps):
        data = torch.randint(0, config.vocab_size, (batch, config.block_size + 1), generator=gen)
        x, y = data[:, :-1], data[:, 1:]  # (batch, T) per rank
        for mode in built.values():
            if i == warmup:  # count one step's bytes, right after warm-up
                mode.counter.reset()
                if mode.dp is not None:
                    mode.dp.reset_counters()
            seconds = _timed(lambda m=mode, x=x, y=y: m.step(x, y))
            if i == warmup:
                mode.sent, mode.payload = mode.counter.bytes_sent, mode.payload_bytes()
            if i >= warmup:
                times[mode.name].append(seconds)
    return {
        name: {
            "times": times[name],
            "sent": m.sent,
            "payload": m.payload,
            "psi": m.psi,
            "memory": m.memory(),
            "losses": m.losses,
        }
        for name, m in built.items()
    }


def bytes_formula(mode: str, psi: int, world_size: int) -> float:
    """Bytes each rank sends per step, in (N-1)/N of the fp32 model: a ring all-reduce is 2,
    ours ZeRO-1/2 2 (reduce-scatter + all-gather), ZeRO-3 3 (all-gathers in forward and
    backward, one reduce-scatter). torch's rows as gloo runs them: FSDP2 4 (gloo's
    reduce-scatter is a whole all-reduce, then a slice), ZeroRedundancyOptimizer 3 (DDP's
    all-reduce, then each rank broadcasts its updated 1/N to the N - 1 others)."""
    share = (world_size - 1) / world_size
    times = {"torch_fsdp2": 4, "torch_zero1": 3}.get(mode, 3 if STAGE.get(mode) == 3 else 2)
    return times * share * 4 * psi


def rows(world_size: int, result: dict, tokens_per_step: int) -> list[dict]:
    median = {name: statistics.median(r["times"]) for name, r in result.items()}
    ddp = median.get("torch_ddp")
    out = []
    for name, r in result.items():
        step, twin = median[name], median.get(TORCH_TWIN.get(name, ""))
        losses = zip(r["losses"], result["torch_ddp"]["losses"], strict=True)
        formula = zero_memory_formula(r["psi"], world_size, STAGE.get(name, 0))
        out.append(
            {
                "world_size": world_size,
                "mode": name,
                "step_ms": 1e3 * step,
                "tokens_per_s": tokens_per_step / step,
                "vs_ddp": step / ddp if ddp else None,
                "vs_torch": step / twin if twin else None,
                "max_loss_diff": max(abs(a - b) for a, b in losses),
                "payload_mb": r["payload"] / MIB,
                "sent_mb": r["sent"] / MIB,
                "formula_sent_mb": bytes_formula(name, r["psi"], world_size) / MIB,
                "held_mb": sum(r["memory"].values()) / MIB,
                "formula_held_mb": sum(formula.values()) / MIB,
                "memory": r["memory"],
            }
        )
    return out


def format_table(table: list[dict]) -> str:
    head = (
        f"{'mode':<15}{'step ms':>9}{'tokens/s':>10}{'vs DDP':>8}{'vs torch':>9}"
        f"{'loss diff':>10}{'payload MiB':>12}"
        f"{'sent MiB':>9}{'formula':>9}{'held MiB':>9}{'formula':>9}  params/grads/optim MiB"
    )
    lines = [f"world size {table[0]['world_size']}", head, "-" * len(head)]
    for r in table:
        m = r["memory"]
        split = "/".join(f"{m[k] / MIB:.2f}" for k in ("params", "grads", "optimizer"))
        sent = f"{r['sent_mb']:.2f}" if r["sent_mb"] else "-"
        payload = "-" if r["payload_mb"] != r["payload_mb"] else f"{r['payload_mb']:.2f}"
        twin = "-" if r["vs_torch"] is None else f"{r['vs_torch']:.2f}"
        lines.append(
            f"{r['mode']:<15}{r['step_ms']:>9.1f}{r['tokens_per_s']:>10.0f}{r['vs_ddp']:>8.2f}"
            f"{twin:>9}{r['max_loss_diff']:>10.1e}"
            f"{payload:>12}{sent:>9}{r['formula_sent_mb']:>9.2f}"
            f"{r['held_mb']:>9.2f}{r['formula_held_mb']:>9.2f}  {split}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="worlds 1 and 2, 3 timed steps")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    args = parser.parse_args(argv)
    worlds = args.world_sizes or ([1, 2] if args.quick else [1, 2, 4])
    steps, warmup = (3, 1) if args.quick else (args.steps, 3)
    modes = args.modes if "torch_ddp" in args.modes else ["torch_ddp", *args.modes]
    config = GPTConfig()
    print(
        f"reference GPT: {sum(p.numel() for p in GPT(config).parameters()):,} parameters, "
        f"{args.batch} x {config.block_size} tokens per rank per step, gloo, 1 thread per rank, "
        f"{steps} timed steps (median), bucket cap {BUCKET_MB} MiB"
    )
    table = []
    for n in worlds:
        load = os.getloadavg()[0]  # other processes on the machine slow every mode alike
        result = run_distributed(
            bench_worker,
            n,
            config,
            args.batch,
            steps,
            warmup,
            modes,
            backend="gloo",
            timeout_s=1800,
            threads_per_rank=1,
        )[0]
        world_rows = rows(n, result, n * args.batch * config.block_size)
        print(format_table(world_rows))
        print(f"load average (1 min) before / after: {load:.1f} / {os.getloadavg()[0]:.1f}\n")
        table += world_rows
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
