"""The benchmark scripts still run end to end: a smoke run of each on a few rows, checking the figures they write,
not the speed (the machine's speed is no test). Slow ones run on demand with `-m slow`; gpu.sh's dry run, which
stands in for a GPU nobody has lent yet, runs in the default suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_image_benchmark_writes_both_clocks_and_auto_s_choice(tmp_path):
    figures = tmp_path / "images.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "images.py"), "--images", "8", "--repeats", "1",
                             "--workers", "auto,0", "--parts", "2", "--json", str(figures)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "labels equal the pipeline's on 8 of 8 images" in result.stdout
    written = json.loads(figures.read_text())
    names = ["batchrun (num_workers auto)", "batchrun (num_workers 0)"]
    assert sorted(written["images_per_second"]) == sorted([*names, "pipeline"])
    assert sorted(written["own_clock_seconds"]) == sorted(names)
    assert all(len(values) == 1 and values[0] > 0 for values in written["own_clock_seconds"].values())
    assert len(written["auto_chose"]) <= 1 and all("num_workers auto:" in line for line in written["auto_chose"])


def test_the_gpu_script_runs_every_path_but_vllm_dry_on_the_cpu(tmp_path):
    """benchmarks/gpu.sh waits for a lent GPU; its dry mode runs the same paths on the CPU with tiny sizes (all at
    once: one server start's time), so it cannot rot meanwhile."""
    figures = tmp_path / "gpu.json"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", str(figures)],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    written = json.loads(figures.read_text())
    assert written["overlapped"] and written["device"] == "cpu" and written["rows"] == 8
    generation = written["generation"]
    assert sorted(generation) == ["in-process", "serve-cb"]  # no vllm in the dry run
    for figures_of_run in generation.values():
        assert figures_of_run["completion_tokens"] == 8 * 4  # every row exactly --new-tokens long, served or not
        assert figures_of_run["rows_per_second"] > 0 and figures_of_run["completion_tokens_per_second"] > 0
    assert generation["serve-cb"]["rows_equal_to_in_process"] == 8  # greedy on the same rows: the same text
    overhead = written["overhead"]
    assert overhead["completion_tokens"] == 8 * 4 and overhead["concurrency"] == 4
    assert [len(values) for values in overhead["seconds"].values()] == [1, 1]
    assert isinstance(overhead["overhead"], float)
    for workload in ("embedding", "classification"):
        assert sorted(written["encoders"][workload]["batchrun_vs"]) == ["limit", "pipeline"]
        assert set(written["encoders"][workload]["rows_per_second"]) == {"batchrun", "limit", "pipeline"}


def test_the_server_benchmark_refuses_an_unknown_run_before_building_anything():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "server.py"), "--out", "unused.json",
                             "--runs", "in-process,tgi"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--runs: unknown tgi" in result.stderr
    assert not (ROOT / "unused.json").exists()


@pytest.mark.slow
def test_the_server_benchmark_compares_all_three_runs_and_the_client_overhead(tmp_path):
    figures = tmp_path / "server.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "server.py"), "--rows", "4", "--shape", "tiny",
                             "--new-tokens", "4", "--overhead-rounds", "1", "--out", str(figures)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(figures.read_text())
    assert list(written["generation"]) == ["in-process", "serve", "serve-cb"]
    assert all(run["completion_tokens"] == 16 and run["rows_equal_to_in_process"] == 4
               for run in written["generation"].values())
    assert written["overhead"]["concurrency"] == 32 and "overhead" in result.stdout
