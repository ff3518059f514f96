"""The benchmark scripts run: small settings, the doc left alone (`--no-write`). Their numbers are `make bench`'s."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_fixtures import smollm2_dir

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--no-write"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_export_bench_compares_the_two_exports_and_finds_them_equal() -> None:
    out = bench("bench_export.py", "--hidden", "256", "--layers", "2", "--shard", "2MB", "--repeats", "1")
    assert "<!-- bench_export:begin -->" in out and "<!-- bench_export:end -->" in out
    assert "| peak RSS (MiB) |" in out and "| wall (s) |" in out
    assert "bit for bit: yes (largest |difference| 0)" in out


def test_gpu_bench_says_not_run_without_a_gpu() -> None:
    out = bench("bench_gpu.py", env={"CUDA_VISIBLE_DEVICES": ""})
    assert "Not run: no CUDA GPU on this machine" in out


@pytest.mark.real_model  # its prompts are tokenised by the real model's tokenizer
def test_gpu_bench_runs_its_comparisons_on_a_small_model_on_the_cpu() -> None:
    smollm2_dir()  # its tokenizer tokenises the prompts
    out = bench("bench_gpu.py", "--device", "cpu", "--dims", "tiny", "--max-facts", "40", "--rounds", "2")
    assert "GPU: none (a CPU check run)" in out
    walls = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| wall (s) |")]
    assert len(walls) == 2, out  # the decomposition against the forward pass, the streaming export against naive
    for _, ours, peer, ratio in walls:
        assert float(ours.split()[0]) > 0 and float(peer.split()[0]) > 0
        assert float(ratio) == float(ratio) > 0  # a number, not NaN
    assert "| peak RSS (MiB) |" in out
