"""The benchmarks still run: a one-second pass of each, so a script cannot rot unnoticed.

Figures are not checked against their targets here (a shared CI machine is too noisy); only
that the script starts everything it needs, measures, prints every figure and exits 0.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH_PROVISION = ROOT / "benchmarks" / "bench_provision.py"

pytestmark = pytest.mark.integration


def test_bench_provision_runs_and_prints_its_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH_PROVISION), "--seconds", "1", "--warmup", "0.5", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for name in ("floor_jobs_per_s", "provision_per_s", "ratio", "p50_ms", "p99_ms"):
        assert isinstance(figures[name], int | float) and figures[name] > 0, (name, figures)
    assert figures["p50_ms"] <= figures["p99_ms"]
    assert figures["floor_callers"] == figures["provision_callers"] == 50
    assert figures["latency_callers"] == 10
    assert figures["target_ratio"] == 0.6 and figures["target_p99_ms"] == 25

    # The human-readable report renders the same figures (no second run needed).
    spec = importlib.util.spec_from_file_location("bench_provision", BENCH_PROVISION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the repository
    spec.loader.exec_module(module)
    text = module.report(figures)
    for needle in ("(a) arq floor", "(b) provision_requested", "ratio (b)/(a)", "(c)", "p99",
                   "target"):
        assert needle in text
