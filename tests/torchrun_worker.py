"""Run under torchrun: all-reduce rank + 1 and write this rank's sum to OUT_DIR/rank{r}.txt.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 \
    tests/torchrun_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from dist_workers import torchrun_sum

from course_lib.launch import run_under_torchrun, torchrun_env_present


def main(out_dir: str) -> None:
    """Chapter 1: the same worker as under run_distributed, launched by torchrun."""
    if not torchrun_env_present():
        raise SystemExit("run this script under torchrun")
    rank, total = run_under_torchrun(torchrun_sum)
    Path(out_dir, f"rank{rank}.txt").write_text(f"{total:g}\n")


if __name__ == "__main__":
    main(sys.argv[1])
