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
from conftest import HEAVY

ROOT = Path(__file__).resolve().parent.parent
BENCH_PROVISION = ROOT / "benchmarks" / "bench_provision.py"

# Each run starts dozens of processes and keeps them busy: under pytest-xdist they run one after
# another on one worker (`make test` passes --dist loadgroup), not beside each other.
pytestmark = [pytest.mark.integration, HEAVY]


def test_bench_provision_runs_and_prints_its_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH_PROVISION), "--seconds", "1", "--warmup", "0.5", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
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
    _report_says(
        monkeypatch,
        BENCH_PROVISION,
        figures,
        "(a) arq floor",
        "(b) provision_requested",
        "ratio (b)/(a)",
        "(c)",
        "p99",
        "target",
    )


def _load_script(monkeypatch: pytest.MonkeyPatch, path: Path) -> object:
    """The script as a module, for its ``report`` (its figures come from the run above)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the repository
    spec.loader.exec_module(module)
    return module


def _report_says(monkeypatch: pytest.MonkeyPatch, path: Path, figures: dict, *needles: str) -> None:
    """The script's human-readable report of ``figures`` holds every one of ``needles``."""
    text = _load_script(monkeypatch, path).report(figures)  # type: ignore[attr-defined]
    for needle in needles:
        assert needle in text


def _run_json(path: Path, *args: str, timeout: float = 120) -> dict:
    result = subprocess.run(
        [sys.executable, str(path), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures: dict = json.loads(result.stdout)
    return figures


def test_bench_refresh_runs_and_prints_its_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    script = ROOT / "benchmarks" / "bench_refresh.py"
    figures = _run_json(script, "--users", "4", "--seconds", "1", "--warmup", "0.5")
    for phase in ("provider_before", "project", "floor", "provider_after"):
        assert figures[phase]["per_s"] > 0 and figures[phase]["calls"] > 0, (phase, figures)
        assert figures[phase]["p50_ms"] <= figures[phase]["p99_ms"]
    assert figures["ratio"] > 0 and figures["baseline_per_s"] > 0
    assert figures["floor_ratio"] > 0 and figures["project_share_of_floor"] > 0
    assert figures["workers"] == 3 and figures["callers"] == figures["users"] == 4
    assert "target_ratio" not in figures  # the on-demand target is retired
    assert figures["provider_refresh_reuse_detected"] == 0
    assert figures["redis_commands_per_refresh"] > 0
    _report_says(
        monkeypatch,
        script,
        figures,
        "(a) provider",
        "(b) through the project",
        "(c) floor",
        "ratio (b) / mean(a)",
        "floor (c) / mean(a)",
        "target is retired",
    )


def test_bench_schedule_runs_and_prints_its_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    script = ROOT / "benchmarks" / "bench_schedule.py"
    figures = _run_json(script, "--users", "2500", "--repeat", "3")
    for case in ("baseline_zrangebyscore", "sweep_steady", "sweep_requeue", "sweep_idle"):
        assert 0 < figures[case]["p50_ms"] <= figures[case]["max_ms"], (case, figures)
    assert figures["sweep_window"] == 1000
    assert figures["sweep_backlog_probe"]["due"] == 2000
    memory = figures["memory"]
    assert memory["bytes_per_user"] > memory["grant_bytes_per_user"] > 0
    assert memory["breakdown_bytes_per_user"]
    assert "ideas" not in memory and "aged" not in memory  # the layout exploration is gone
    # The sealed tokens live in a key of their own: the record keeps the compact encoding
    # (listpack; Redis 6.2 calls it ziplist).
    assert memory["rec_encoding"] in ("listpack", "ziplist")
    assert figures["target_tick_ms"] == 20 and figures["target_bytes_per_user"] == 2048
    _report_says(
        monkeypatch,
        script,
        figures,
        "(a) sweep tick",
        "baseline ZRANGEBYSCORE",
        "requeue path",
        "(b) memory",
        "record, tokens, schedule",
        "per provisioned user",
        "target",
    )


def test_bench_broker_runs_and_prints_its_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    script = ROOT / "benchmarks" / "bench_broker.py"
    figures = _run_json(script, "--calls", "2000", "--users", "10")
    for case in (
        "baseline_dict_time",
        "baseline_dict_time_async",
        "cache_path",
        "store_path",
        "baseline_hgetall",
    ):
        assert 0 < figures[case]["p50_us"] <= figures[case]["p99_us"], (case, figures)
    assert figures["cache_path_redis_calls"] == 0
    assert figures["target_p50_us"] == 50
    _report_says(
        monkeypatch,
        script,
        figures,
        "(a) baseline",
        "(b) access_token, in-process cache",
        "(c) access_token",
        "bare HGETALL",
        "target p50",
    )


def test_bench_backlog_runs_and_prints_its_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    script = ROOT / "benchmarks" / "bench_backlog.py"
    figures = _run_json(script, "--backlog", "40", "--seconds", "1", timeout=300)
    for name in (
        "provider_capacity_per_s",
        "backlog_drain_per_s",
        "backlog_ratio",
        "rate_limit_per_s",
        "rate_limited_drain_per_s",
        "worker_cpu_ms_per_refresh",
    ):
        assert isinstance(figures[name], int | float) and figures[name] > 0, (name, figures)
    assert figures["backlog_size"] == 40
    assert figures["lost_grants"] == 0
    # The limit held: no second of the rate-limited drain's refreshes held more.
    assert figures["rate_limited_busiest_second"] <= figures["rate_limit_per_s"]
    _report_says(
        monkeypatch,
        script,
        figures,
        "(a) provider capacity",
        "(b) backlog drain",
        "(c) drain at",
        "(d) worker CPU",
    )


def test_bench_wait_runs_and_prints_its_figures() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_wait.py"), "--n", "60", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for name in ("mark0", "mark1", "commit0", "commit1"):
        assert figures[name]["p50_us"] > 0, (name, figures)
    assert figures["refresh_redis_us_with_wait"] > 0


def test_bench_cluster_runs_and_prints_its_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    script = ROOT / "benchmarks" / "bench_cluster.py"
    figures = _run_json(script, "--seconds", "1", "--warmup", "0.5", "--backlog", "30", timeout=300)
    assert figures["primaries"] == 3 and figures["workers"] == 3
    for topology in ("single", "cluster"):
        provision, refresh = figures[topology]["provision"], figures[topology]["refresh"]
        assert provision["per_s"] > 0 and refresh["per_s"] > 0, (topology, figures)
        assert provision["pending_sessions"] == provision["events_answered"] > 0
        assert provision["reads_per_event"] > 0 and refresh["reads_per_refresh"] > 0
        assert refresh["grants"] == 30 and refresh["refreshes"] == 60  # each drained twice
        assert refresh["lost_grants"] == refresh["reused_tokens"] == 0
    # Every node of the cluster served shards and holds keys: the work spread over them.
    nodes = ["node-0", "node-1", "node-2"]
    assert sorted(figures["cluster"]["shards_per_node"]) == nodes
    assert all(figures["cluster"]["shards_per_node"][n] > 0 for n in nodes)
    assert sum(figures["cluster"]["shards_per_node"].values()) == 16
    assert all(figures["cluster"]["keys_per_node"][n] > 0 for n in nodes)
    assert figures["single"]["shards_per_node"] == {"redis": 16}
    assert figures["provision_ratio"] > 0 and figures["refresh_ratio"] > 0
    # A second of provisions gives every node CPU ticks to count (60 refreshes may not).
    bound = figures["provision_one_core_per_primary"]
    assert bound["single_per_s"] > 0 and bound["cluster_per_s"] > 0, figures
    _report_says(
        monkeypatch,
        script,
        figures,
        "(1) provision_requested",
        "(2) scheduled refreshes",
        "cluster/one",
        "CPU ms per refresh (cluster)",
        "With one core per Redis primary",
        "0 lost grants",
    )
