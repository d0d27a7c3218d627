"""The CLI tests of chapters 5 and 6: run `python -m course_lib train`, read its losses."""

import json
import subprocess
import sys
from pathlib import Path


def cli_losses(out_root: Path, common: list[str], runs: dict[str, list[str]]) -> dict[str, list]:
    """For each named run, ``python -m course_lib <common> <extra>``; its per-step losses."""
    losses = {}
    for name, extra in runs.items():
        out = out_root / name
        cmd = [sys.executable, "-m", "course_lib", *common, *extra, "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
        metrics = json.loads((out / "metrics.json").read_text())
        rows = metrics["metrics"] if isinstance(metrics, dict) else metrics
        losses[name] = [row["loss"] for row in rows]
    return losses
