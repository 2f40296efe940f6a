"""A small run of benchmarks/scaling.py: the machinery works (the timing and memory targets are the benchmark's)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_scaling_benchmark_runs_every_stage_on_generated_images(tmp_path):
    cmd = [sys.executable, "benchmarks/scaling.py", "--sizes", "30", "120", "--side", "128", "--work", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["audit"] * 2 + ["train"] * 2 + ["predict"] * 2
    assert "duplicates the audit found among the generated images: {30: 0, 120: 0}" in result.stdout
    images = [p for p in (tmp_path / "n120").rglob("*.jpg")]
    assert len(images) == 120 and len({p.stat().st_size for p in images}) > 100  # distinct images, not copies
    assert (tmp_path / "out" / "predict-120" / "predictions.csv").read_text().count("\n") == 121
