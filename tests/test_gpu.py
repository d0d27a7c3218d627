"""benchmarks/gpu.py: the CPU smoke run checks the code path; the CUDA run needs a GPU.

The script is run as ``python -m benchmarks.gpu`` from the repository root, exactly as on
the GPU machine. Only well-formedness is checked here, never a timing (design, section 7).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE_ROWS = ("step time (ms, median)", "tokens/s", "MFU (%)", "peak memory (GiB)")


def load_script():
    """benchmarks/gpu.py as a module, without putting the repository root on sys.path."""
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", ROOT / "benchmarks/gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_benchmark(*args: str, env: dict | None = None, timeout: float = 300):
    # One thread: the CPU smoke model is tiny, and 2 shared cores make threads fight.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_results(data: dict, n_runs: int) -> None:
    assert [r["mode"] for r in data["runs"]] == ["eager", "compiled"][:n_runs]
    assert data["error"] is None
    assert data["adamw_formula_bytes"] == 16 * data["n_params"]
    for r in data["runs"]:
        assert r["steps"] >= 1
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert math.isfinite(r["final_loss"])
        # Random tokens: the loss stays near ln(vocab).
        assert abs(r["final_loss"] - math.log(data["model"]["vocab_size"])) < 1.0


def test_cpu_smoke_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_benchmark("--dry-run", "--steps", "2", "--json", str(out), "--peak-tflops", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "eager", "compiled", "compiled/eager"]
    for row in TABLE_ROWS:
        assert any(line.startswith(row) for line in lines), row
    data = json.loads(out.read_text())
    assert data["device"] == "CPU" and data["peak_flops"] == 1e12
    check_results(data, n_runs=2)
    assert data["runs"][1]["compile_s"] >= 0
    assert data["compiled_over_eager"]["tokens_per_s"] == pytest.approx(
        data["runs"][1]["tokens_per_s"] / data["runs"][0]["tokens_per_s"]
    )
    for r in data["runs"]:  # MFU is achieved FLOP/s over the (given) peak
        assert r["mfu"] == pytest.approx(data["flops_per_token"] * r["tokens_per_s"] / 1e12)


def test_cpu_smoke_without_compile_has_one_run(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_benchmark("--dry-run", "--no-compile", "--steps", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    check_results(data, n_runs=1)
    assert data["peak_flops"] is None and data["runs"][0]["mfu"] is None
    assert "MFU not shown" in proc.stdout


def test_without_cuda_it_says_so_and_exits_2(monkeypatch, capsys):
    gpu = load_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--steps", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_table_without_a_compiled_run_shows_dashes():
    gpu = load_script()
    eager = gpu.RunResult("eager", "AdamW (fused)", 3, 10.0, 1000.0, 0.5, 0.1, None, 2**30, 0, 3.0)
    table = gpu.format_table(eager, None, formula_bytes=2**29)
    rows = {line[:24].strip(): line[24:].split() for line in table.splitlines()[1:8]}
    assert rows["tokens/s"] == ["1,000", "-", "-"]
    assert rows["MFU (%)"] == ["50.0", "-", "-"]
    assert rows["peak memory (GiB)"] == ["1.00", "-", "-"]
    assert table.splitlines()[8].split()[-2:] == ["0.500", "0.500"]  # the 16 B/param formula


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_smoke_runs_eager_and_compiled(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_benchmark(
        "--device", "cuda", "--smoke", "--steps", "3", "--json", str(out), timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    check_results(data, n_runs=2)
    for r in data["runs"]:
        assert r["optimizer"] == "AdamW (fused)"
        # Held after a step: at least the 16 B/param of weights, grads, m and v.
        assert r["state_mem_bytes"] >= data["adamw_formula_bytes"]
        assert r["peak_mem_bytes"] >= r["state_mem_bytes"]
        if data["peak_flops"] is not None:
            assert 0 < r["mfu"] < 1
