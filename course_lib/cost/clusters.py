"""Chapter 7: the machines the planner plans for, and published runs to check it against.

A :class:`Cluster` is what :mod:`course_lib.cost.planner` needs to know about hardware:
GPUs per node, memory per GPU, peak FLOP/s, the MFU to assume, and chapter 6's
:class:`~course_lib.cost.tensor_model.Link` (alpha, bandwidth) inside a node and between
nodes. Every number carries its source in a comment; alphas of datacenter links are
chapter 6's assumptions (no datasheet gives them).

``PUBLISHED_RUNS``: training runs whose papers give the model shape, GPU count, batch,
sequence length, the parallel configuration and the throughput. ``checked`` says whether
the numbers were checked against a copy of the source while writing this file; the
others are quoted from memory of the paper and marked unchecked.

References
    [Megatron21] Narayanan et al. "Efficient Large-Scale Language Model Training on GPU
                 Clusters Using Megatron-LM". SC 2021 (arXiv:2104.04473), Table 1.
    [SP]         Korthikanti et al. "Reducing Activation Recomputation in Large Transformer
                 Models". MLSys 2023 (arXiv:2205.05198), Tables 3 and 5.
    [Llama3]     Dubey et al. (Llama team). "The Llama 3 Herd of Models". arXiv:2407.21783,
                 2024, Table 3 (405B shape) and Table 4 (scaling configurations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from course_lib.cost import hardware
from course_lib.cost.hardware import GB, GIB, H100_BYTES
from course_lib.cost.tensor_model import H100_PEAK_SOURCE, INFINIBAND_NDR, NVLINK_H100, Link
from course_lib.model import GPTConfig


@dataclass(frozen=True)
class Cluster:
    """Chapter 7: one kind of machine, as the planner sees it (validated on creation)."""

    name: str  # what the tables call it
    gpus_per_node: int  # GPUs (ranks) that share the fast intra-node link
    memory_bytes: int  # memory of ONE GPU, bytes (binary: 80 GiB = 80 * 2**30)
    peak_flops: float  # dense peak of ONE GPU in the training dtype, FLOP/s
    intra: Link  # link between two GPUs of one node (alpha, bandwidth each way)
    inter: Link  # link between nodes, per GPU (each GPU has its own NIC)
    default_mfu: float  # fraction of the peak the model's FLOPs reach (1.0 if measured)
    max_nodes: int | None  # how many nodes exist (None: as many as asked for)
    source: str  # where the numbers come from
    # seconds per parameter of the (elementwise) optimizer step on ONE GPU; 0: free. On a
    # GPU AdamW reads and writes ~28 bytes per parameter at HBM speed (~10 ps/param at
    # 3 TB/s: milliseconds for billions of parameters), so 0 there; on the laptop's CPU
    # it is measured and matters.
    optimizer_s_per_param: float = 0.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.gpus_per_node, bool)
            or not isinstance(self.gpus_per_node, int)
            or self.gpus_per_node < 1
        ):
            raise ValueError(
                f"Cluster {self.name!r}: gpus_per_node must be an integer >= 1, "
                f"got {self.gpus_per_node!r}"
            )
        if not isinstance(self.memory_bytes, int | float) or not self.memory_bytes > 0:
            raise ValueError(
                f"Cluster {self.name!r} has no memory (memory_bytes="
                f"{self.memory_bytes!r}); give the bytes of one GPU, e.g. 80 * GIB"
            )
        ok = isinstance(self.peak_flops, int | float) and math.isfinite(self.peak_flops)
        if not ok or not self.peak_flops > 0:
            raise ValueError(
                f"Cluster {self.name!r}: peak_flops must be a finite number > 0 "
                f"FLOP/s, got {self.peak_flops!r}"
            )
        if not 0 < self.default_mfu <= 1:
            raise ValueError(
                f"Cluster {self.name!r}: default_mfu must be in (0, 1], got {self.default_mfu!r}"
            )
        if not self.optimizer_s_per_param >= 0:
            raise ValueError(
                f"Cluster {self.name!r}: optimizer_s_per_param must be >= 0 s, "
                f"got {self.optimizer_s_per_param!r}"
            )
        if self.max_nodes is not None and self.max_nodes < 1:
            raise ValueError(f"Cluster {self.name!r}: max_nodes must be >= 1 or None")

    def check_gpus(self, n_gpus: int) -> None:
        """Chapter 7: refuse a GPU count this cluster cannot give, naming the fix."""
        g = self.gpus_per_node
        if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
            raise ValueError(f"n_gpus must be an integer >= 1, got {n_gpus!r}")
        if n_gpus > g and n_gpus % g:
            raise ValueError(
                f"n_gpus={n_gpus} spans more than one node of {g} GPUs but is not "
                f"a multiple of {g}; use {n_gpus // g * g} or {-(-n_gpus // g) * g}"
            )
        if self.max_nodes is not None and n_gpus > g * self.max_nodes:
            raise ValueError(
                f"{self.name!r} has {self.max_nodes} node(s) of {g} GPUs: at most "
                f"{g * self.max_nodes} GPUs; ask for fewer or use a larger cluster"
            )


# --- this machine (the course's 2-core CPU box): MEASURED on the course machine ---------
# Measured the way chapter 7 times its runs: benchmarks/hybrid.py's calibration
# (course_lib.cost.measure_hybrid.calibrate), 4 ranks with one torch thread each sharing
# the 2 cores, 2026-12-02 11:45 UTC, load average 0.65 (other sessions' tests were
# running on and off: run-to-run spread about +-30 %). Per rank, the slowest of the 4:
# - FLOP/s: the plain GPT (4 layers, d 256, seq 64) forward + backward on 4 sequences on
#   every rank at once: 2.3e10 per rank, so 9.2e10 for the 4 ranks together;
# - optimizer: gradient clipping + AdamW's step: 9.2 ns per parameter;
# - ring: chapter 1's ring all-reduce over two pairs side by side, 4 KiB to 4 MiB,
#   fitted (fit_alpha_beta): alpha 1623 us per message, beta 0.579 ns/B (1.73 GB/s).
# The earlier constants (notebooks 00 and 01: 237.5 GFLOP/s for 2 threads on a larger
# model, a ring alone at world 2: alpha 426.8 us, 0.985 ns/B, a free optimizer) predicted
# chapter 7's world-4 steps 2.3-3.3x too fast: they were measured differently.
LAPTOP_RING = Link(
    "gloo on this machine (ring fit, pairs at world 4)",
    alpha_s=1623e-6,
    bandwidth_bytes_per_s=1 / 0.579e-9,
    source="measured on the course machine: benchmarks/hybrid.py calibration, chapter 1's "
    "ring all-reduce over two pairs side by side at world 4 (alpha 1623 us, beta 0.579 ns/B)",
)
LAPTOP_FLOPS = 4 * 2.3e10  # FLOP/s of 4 one-thread ranks together, measured ("achieved": MFU 1)
LAPTOP_OPTIMIZER_S_PER_PARAM = 9.2e-9  # clip + AdamW, one rank of 4, measured
LAPTOP_MEMORY = 24_684_084 * 1024  # bytes of RAM of the course machine (/proc/meminfo)


def laptop_cluster(world_size: int = 4) -> Cluster:
    """Chapter 7: this machine with ``world_size`` ranks sharing its cores and memory.

    The measured FLOP/s and RAM are divided among the ranks (world 4 oversubscribes the
    2 cores: each rank gets a quarter). One node; every link is gloo's measured ring. The
    constants were measured at world 4 (see the comment above ``LAPTOP_RING``): other
    world sizes are an extrapolation, and the optimizer's cost per parameter is taken as
    at world 4 times 4 / ``world_size`` (the same share of the cores per rank).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return Cluster(
        f"this machine ({world_size} ranks)",
        gpus_per_node=world_size,
        memory_bytes=LAPTOP_MEMORY // world_size,
        peak_flops=LAPTOP_FLOPS / world_size,
        intra=LAPTOP_RING,
        inter=LAPTOP_RING,
        default_mfu=1.0,
        max_nodes=1,
        source="measured on the course machine (benchmarks/hybrid.py calibration)",
        optimizer_s_per_param=LAPTOP_OPTIMIZER_S_PER_PARAM * 4 / world_size,
    )


LAPTOP = laptop_cluster(4)

# --- H100 SXM: hardware.py's peak (989.4 TFLOP/s bf16 dense, Hopper whitepaper Table 3)
# and memory (80 GiB); chapter 6's NVLink 4 and InfiniBand NDR links. MFU 0.4: the
# order that large runs report (Llama 3: 38-43 % [Llama3] Table 4).
_H100_PEAK: float = hardware.H100_PEAK_BF16_FLOPS  # type: ignore[assignment]
H100_NODE = Cluster(
    "1 x DGX H100 (8 GPUs, NVLink 4)",
    gpus_per_node=8,
    memory_bytes=H100_BYTES,
    peak_flops=_H100_PEAK,
    intra=NVLINK_H100,
    inter=INFINIBAND_NDR,
    default_mfu=0.4,
    max_nodes=1,
    source=f"{H100_PEAK_SOURCE}; {NVLINK_H100.source}",
)
H100_CLUSTER = Cluster(
    "DGX H100 nodes on InfiniBand NDR",
    gpus_per_node=8,
    memory_bytes=H100_BYTES,
    peak_flops=_H100_PEAK,
    intra=NVLINK_H100,
    inter=INFINIBAND_NDR,
    default_mfu=0.4,
    max_nodes=None,
    source=f"{NVLINK_H100.source}; {INFINIBAND_NDR.source}",
)

# --- A100 SXM 80GB (the Megatron papers' Selene: DGX A100 nodes) ------------------------
NVLINK_A100 = Link(
    "NVLink 3 (A100 SXM)",
    alpha_s=3e-6,  # assumption, as NVLINK_H100's
    bandwidth_bytes_per_s=300 * GB,
    source="NVIDIA A100 datasheet: NVLink 600 GB/s total bidirectional per GPU = 300 GB/s "
    "each way, any pair through the NVSwitches of a DGX/HGX A100. alpha = 3 us: assumption.",
)
INFINIBAND_HDR = Link(
    "InfiniBand HDR (200 Gb/s)",
    alpha_s=6e-6,  # assumption, as INFINIBAND_NDR's
    bandwidth_bytes_per_s=25 * GB,
    source="DGX A100 datasheet: 8 x ConnectX-6 HDR 200 Gb/s for the compute fabric, one per "
    "GPU = 25 GB/s each way per GPU ([Megatron21] Sec. 5: Selene, 8 x 200 Gb/s HDR per "
    "node). alpha = 6 us: assumption.",
)
_A100_PEAK: float = hardware.A100_PEAK_BF16_FLOPS  # type: ignore[assignment]
A100_80GB = 80 * GIB  # "80 GB" HBM2e taken as 80 GiB, hardware.py's convention
A100_NODE = Cluster(
    "1 x DGX A100 80GB (8 GPUs, NVLink 3)",
    gpus_per_node=8,
    memory_bytes=A100_80GB,
    peak_flops=_A100_PEAK,
    intra=NVLINK_A100,
    inter=INFINIBAND_HDR,
    default_mfu=0.4,
    max_nodes=1,
    source=f"A100 312 TFLOP/s bf16 dense (hardware.py); {NVLINK_A100.source}",
)
A100_CLUSTER = Cluster(
    "DGX A100 80GB nodes on InfiniBand HDR",
    gpus_per_node=8,
    memory_bytes=A100_80GB,
    peak_flops=_A100_PEAK,
    intra=NVLINK_A100,
    inter=INFINIBAND_HDR,
    default_mfu=0.4,
    max_nodes=None,
    source=f"{NVLINK_A100.source}; {INFINIBAND_HDR.source}",
)

CLUSTERS: dict[str, Cluster] = {
    "laptop": LAPTOP,
    "h100_node": H100_NODE,
    "h100_cluster": H100_CLUSTER,
    "a100_node": A100_NODE,
    "a100_cluster": A100_CLUSTER,
}


# ---------------------------------------------------------------------------------------
# Published runs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedRun:
    """Chapter 7: one published training configuration and what it reported."""

    name: str  # e.g. "Megatron-LM 1T"
    config: GPTConfig  # the model's shape, as our GPT (see each run's note)
    cluster: Cluster  # the machine it ran on
    n_gpus: int  # GPUs of the run
    batch: int  # global batch, sequences
    seq: int  # sequence length
    dp: int  # data-parallel size (n_gpus / (pp * tp))
    pp: int  # pipeline stages
    tp: int  # tensor-parallel size
    reported: str  # the throughput / MFU the paper reports
    source: str  # paper and table
    checked: bool  # numbers checked against a copy of the source while writing this
    note: str = ""  # what our GPT shape leaves out, what else they used


def _megatron(layers: int, d: int, heads: int, seq: int = 2048) -> GPTConfig:
    # GPT-2-style blocks, vocabulary 51,200, tied embeddings, as [Megatron21] and [SP] train.
    return GPTConfig(vocab_size=51200, block_size=seq, n_layer=layers, n_head=heads, n_embd=d)


PUBLISHED_RUNS: tuple[PublishedRun, ...] = (
    PublishedRun(
        "Megatron-LM 1T (3072 A100)",
        _megatron(128, 25600, 160),
        A100_CLUSTER,
        3072,
        batch=3072,
        seq=2048,
        dp=6,
        pp=64,
        tp=8,
        reported="163 TFLOP/s per GPU, 52% of peak, 502 PFLOP/s in all",
        source="[Megatron21] Table 1 (last row) and abstract",
        checked=False,
        note="abstract checked (3072 GPUs, 502 PFLOP/s, 52%); the shape and tp/pp of Table "
        "1 are from memory. Interleaved 1F1B schedule, full recomputation.",
    ),
    PublishedRun(
        "Megatron-LM 145.6B (1536 A100)",
        _megatron(80, 12288, 96),
        A100_CLUSTER,
        1536,
        batch=2304,
        seq=2048,
        dp=24,
        pp=8,
        tp=8,
        reported="148 TFLOP/s per GPU, 47% of peak",
        source="[Megatron21] Table 1",
        checked=False,
        note="unchecked: quoted from memory of Table 1",
    ),
    PublishedRun(
        "Korthikanti 22B (8 A100)",
        _megatron(48, 6144, 64),
        A100_NODE,
        8,
        batch=4,
        seq=2048,
        dp=1,
        pp=1,
        tp=8,
        reported="MFU 41.5% (sequence parallel + selective recomputation)",
        source="[SP] Table 3 (configuration) and Table 5 (MFU)",
        checked=False,
        note="unchecked: quoted from memory; sequence parallelism on",
    ),
    PublishedRun(
        "Korthikanti 175B (64 A100)",
        _megatron(96, 12288, 96),
        A100_CLUSTER,
        64,
        batch=64,
        seq=2048,
        dp=1,
        pp=8,
        tp=8,
        reported="MFU 51.4% (sequence parallel + selective recomputation)",
        source="[SP] Tables 3 and 5",
        checked=False,
        note="unchecked: quoted from memory",
    ),
    PublishedRun(
        "Korthikanti 530B (2240 A100)",
        _megatron(105, 20480, 128),
        A100_CLUSTER,
        2240,
        batch=2240,
        seq=2048,
        dp=8,
        pp=35,
        tp=8,
        reported="MFU 54.2% (sequence parallel + selective recomputation); 42.1% with "
        "full recomputation",
        source="[SP] abstract (GPUs, MFU) and Tables 3 and 5 (configuration)",
        checked=False,
        note="abstract checked (530B GPT-3 style model, 2240 A100 GPUs, MFU 54.2% against "
        "42.1% with recomputation); the shape (105 layers, d 20480, 128 heads), the batch "
        "and tp 8 x pp 35 x dp 8 are from memory of Tables 3 and 5: unchecked",
    ),
    PublishedRun(
        "Llama 3 405B (8192 H100)",
        GPTConfig(
            vocab_size=128256,
            block_size=8192,
            n_layer=126,
            n_head=128,
            n_embd=16384,
            bias=False,
            tie_weights=False,
        ),
        H100_CLUSTER,
        8192,
        batch=2048,
        seq=8192,
        dp=64,
        pp=16,
        tp=8,
        reported="430 TFLOP/s per GPU, BF16 MFU 43%",
        source="[Llama3] Table 4 (first row: 8192 GPUs, tp 8, cp 1, pp 16, dp 64, 16M tokens "
        "per batch) and Table 3 (126 layers, d 16384, 128 heads)",
        checked=True,
        note="checked against a public copy of Table 4 (GPUs, tp, cp, pp, 16M tokens, 430 "
        "TFLOP/s) and Table 3. Our GPT shape approximates theirs: SwiGLU (FFN 53248) and 8 KV "
        "heads give ~11.9 d^2 per layer against our 12 d^2. 126 layers over 16 stages is "
        "uneven (they drop a layer from the first and last stage): plan with uneven_stages.",
    ),
)
