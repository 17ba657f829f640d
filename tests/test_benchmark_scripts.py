"""The benchmark scripts still run end to end (slow: on demand with `-m slow`): a smoke run of each on a few rows,
checking the figures they write, not the speed (the machine's speed is no test)."""

from __future__ import annotations

import json
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
