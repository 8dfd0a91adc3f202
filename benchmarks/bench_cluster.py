"""Provisions and scheduled refreshes per second on a Redis Cluster, next to one Redis, same run.

One run starts one private ``redis-server`` and a Redis Cluster of three primaries
(``_infra.start_cluster``: ``redis-server --cluster-enabled yes`` each, ``redis-cli --cluster
create``), and the local OpenID provider (rotating refresh tokens; a reused one ends the grant).
The same code, the same worker processes (three, ``bench_refresh``'s: ``ConsentWorker(**worker_
settings(...))`` as ``consent-flow worker`` runs it), first on one, then on the other
(``CONSENT_REDIS_URL=redis://...`` against ``redis+cluster://...``), phase by phase:

(1) ``provision_requested`` events per second end to end, 50 concurrent callers of
    ``ConsentClient.request_provisioning``, a new user per event (``bench_provision``'s (b));
    afterwards the store must hold a pending session for every event answered.
(2) a backlog drain: ``--backlog`` grants imported while no worker runs, each due at once, then
    three workers start and refresh them all in batches (``bench_backlog``'s (b)); refreshes per
    second from the first provider call to the last commit. The cluster drains the grants the
    single Redis left (their refresh tokens moved across), so both refresh the same grants.
    Afterwards every grant must be provisioned with a refresh token the provider still knows,
    and the provider must have seen no reused token.

Beside the rates: the CPU each process spent per event (every Redis node on its own, the
workers, the provider, this process), Redis commands per event, what three idle workers cost
each node, shards and keys per node, and what each topology would reach with one core per
Redis primary (the busiest node's CPU per event). On a 2-core machine everything shares two
cores, so the rates measure the provider and the workers, not Redis: the point is that the
cluster runs the same work, correctly, spread over its nodes. A broken run (a worker that dies,
an event without its session, a lost grant, a reused token) exits non-zero.

    .venv/bin/python benchmarks/bench_cluster.py [--seconds 10] [--backlog 4000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # _infra, also when loaded by path
sys.path.insert(0, str(ROOT / "examples" / "provider"))

from _infra import (  # noqa: E402
    BenchError,
    Cluster,
    Redis,
    add_phase_options,
    cpu_used,
    free_port,
    group_cpu_seconds,
    percentile,
    quiet_logs,
    start_cluster,
    start_redis,
    stop_process,
    tail,
    warmup_seconds,
)
from bench_backlog import drain, import_grants, live_grants  # noqa: E402
from bench_provision import THROUGHPUT_CALLERS, bench_project  # noqa: E402
from bench_refresh import (  # noqa: E402
    WORKERS,
    bench_settings,
    command_counts,
    diff_counts,
    direct_grants,
    local_provider,
    project_env,
    start_worker,
    wait_ready,
)

PRIMARIES = 3
TOPOLOGIES = ("single", "cluster")
IDLE_SECONDS = 2.0  # three ready workers with nothing to do, measured before (1)


# --- the two topologies -------------------------------------------------------------------------


@contextlib.contextmanager
def topology(name: str, directory: Path) -> Iterator[Redis | Cluster]:
    """One private Redis (``single``) or a cluster of ``PRIMARIES`` primaries (``cluster``)."""
    server: Redis | Cluster = (
        start_redis(directory) if name == "single" else start_cluster(directory, PRIMARIES)
    )
    try:
        yield server
    finally:
        if isinstance(server, Cluster):
            server.stop()
        else:
            stop_process(server.process)


def nodes(server: Redis | Cluster) -> dict[str, Redis]:
    """Each redis-server of a topology, by the name its figures carry."""
    if isinstance(server, Cluster):
        return {f"node-{i}": node for i, node in enumerate(server.nodes)}
    return {"redis": server}


def shards_per_node(server: Redis | Cluster, shards: int) -> dict[str, int]:
    """How many of the shards' hash tags each node serves: a shard's users, schedule and queue
    all live on that node."""
    from consent_flow.store.redis_store import shard_tag

    names = list(nodes(server))
    if not isinstance(server, Cluster):
        return {names[0]: shards}
    count = dict.fromkeys(names, 0)
    for shard in range(shards):
        count[names[server.owner(shard_tag(shard))]] += 1
    return count


def keys_per_node(server: Redis | Cluster) -> dict[str, int]:
    import redis

    out = {}
    for name, node in nodes(server).items():
        with redis.Redis(port=node.port) as r:
            out[name] = int(r.dbsize())
    return out


def commands(server: Redis | Cluster) -> dict[str, int]:
    """Commands run so far, by name, summed over the nodes."""
    total: dict[str, int] = {}
    for node in nodes(server).values():
        for name, calls in command_counts(node).items():
            total[name] = total.get(name, 0) + calls
    return total


def per_event(cpu_ms: dict[str, float], names: list[str]) -> float:
    return round(sum(cpu_ms.get(n, 0.0) for n in names), 3)


# --- the phases ---------------------------------------------------------------------------------


async def provisions(
    label: str,
    server: Redis | Cluster,
    env: dict[str, str],
    settings: Any,
    provider: Any,
    workdir: Path,
    seconds: float,
    warmup: float,
) -> dict[str, Any]:
    """(1): three workers, 50 callers, a new user per event; then every event's session."""
    from consent_flow import ConsentClient, State

    workers = [start_worker(f"{label}-provision-{i + 1}", env, workdir) for i in range(WORKERS)]
    groups = dict(
        others(server, provider),
        workers=[w.process.pid for w in workers],
    )

    def alive() -> None:
        for worker in workers:
            worker.check()

    try:
        wait_ready(
            workers, settings.redis_url, settings.queue_name + ":health-check", "worker_started"
        )
        before = group_cpu_seconds(groups)
        await asyncio.sleep(IDLE_SECONDS)
        idle = cpu_used(group_cpu_seconds(groups), before)
        counted_before = commands(server)
        run = await bench_project(
            settings, alive, warmup, seconds, groups, callers=THROUGHPUT_CALLERS, tag=label
        )
        ran = diff_counts(commands(server), counted_before)
        alive()
    finally:
        for worker in workers:
            worker.stop()
    traceback_free(workers)
    async with ConsentClient(settings) as client:
        pending = (await client.store.counts())[State.PENDING]
    events = len(run.samples)  # every call, warm-up included: each started a session
    if pending != events:
        raise BenchError(f"{label}: {events} provisioning events answered, {pending} sessions")
    took = run.measured()
    return {
        "per_s": round(run.per_second, 1),
        "events": len(took),
        "p50_ms": round(percentile(took, 50) * 1000, 2),
        "p99_ms": round(percentile(took, 99) * 1000, 2),
        "cpu_ms_per_event": run.cpu_ms_per_call(),
        "commands_per_event": round(sum(ran.values()) / events, 1),
        "commands_per_event_by_name": top(ran, events),
        "pending_sessions": pending,
        "events_answered": events,
        "idle_cpu_percent": {k: round(100 * v / IDLE_SECONDS, 2) for k, v in idle.items()},
    }


async def refreshes(
    label: str,
    server: Redis | Cluster,
    env: dict[str, str],
    settings: Any,
    provider: Any,
    workdir: Path,
    grants: dict[str, str],
) -> tuple[dict[str, Any], dict[str, str]]:
    """(2): ``grants`` imported, due at once, drained by three workers; then every grant checked
    at the provider. Returns the figures and the grants' refresh tokens as the drain left them."""
    users = sorted(grants)
    t0 = time.monotonic()
    await import_grants(settings, grants)
    import_s = time.monotonic() - t0
    provider.reset_stats()
    counted_before = commands(server)
    drained = await drain(env, workdir, settings, users, f"{label}-drain", others(server, provider))
    ran = diff_counts(commands(server), counted_before)
    stats = provider.stats()
    live = await live_grants(settings, provider, users)
    reused = int(stats.get("refresh_reuse_detected", 0))
    if reused or len(live) != len(users):
        raise BenchError(
            f"{label}: {len(users) - len(live)} grants lost, {reused} refresh tokens reused"
        )
    return {
        "per_s": drained["per_s"],
        "seconds": drained["seconds"],
        "refreshes": len(users),
        "busiest_second": drained["busiest_second"],
        "cpu_ms_per_refresh": drained["cpu_ms_per_refresh"],
        "commands_per_refresh": round(sum(ran.values()) / len(users), 1),
        "commands_per_refresh_by_name": top(ran, len(users)),
        "provider_refresh_requests": stats.get("refresh_requests"),
        "provider_refresh_errors": stats.get("refresh_errors", 0),
        "lost_grants": len(users) - len(live),
        "reused_tokens": reused,
        "import_seconds": round(import_s, 1),
    }, live


def others(server: Redis | Cluster, provider: Any) -> dict[str, list[int]]:
    """The processes measured beside the workers: this one, the provider, each Redis node."""
    groups = {"client": [os.getpid()]}
    node = getattr(provider, "_process", None)
    if node is not None:
        groups["provider"] = [node.pid]
    groups.update({name: [n.process.pid] for name, n in nodes(server).items()})
    return groups


def traceback_free(workers: list[Any]) -> None:
    for worker in workers:
        if "Traceback" in tail(worker.log, 400):
            raise BenchError(f"the {worker.name} worker logged a traceback:\n{tail(worker.log)}")


def top(counts: dict[str, int], events: int, n: int = 8) -> dict[str, float]:
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return {name: round(calls / events, 2) for name, calls in ranked}


# --- the run ------------------------------------------------------------------------------------


async def measure(backlog: int, seconds: float, warmup: float, workdir: Path) -> dict[str, Any]:
    quiet_logs()
    load_before = os.getloadavg()
    callback_port = free_port()
    results: dict[str, dict[str, Any]] = {t: {} for t in TOPOLOGIES}
    with contextlib.ExitStack() as stack:
        provider = stack.enter_context(local_provider(callback_port))
        servers = {t: stack.enter_context(topology(t, workdir / t)) for t in TOPOLOGIES}
        prefix = "bench" + uuid.uuid4().hex[:10]
        envs = {
            t: project_env(
                servers[t], provider, workdir / t, prefix, f"{prefix}:queue", callback_port
            )
            for t in TOPOLOGIES
        }
        settings = {t: bench_settings(envs[t]) for t in TOPOLOGIES}
        for t in TOPOLOGIES:
            results[t]["shards_per_node"] = shards_per_node(servers[t], settings[t].redis_shards)

        t0 = time.monotonic()
        users = [f"user{i:05d}" for i in range(backlog)]
        grants = dict(zip(users, await direct_grants(provider, users), strict=True))
        grants_s = time.monotonic() - t0

        for t in TOPOLOGIES:
            results[t]["provision"] = await provisions(
                t, servers[t], envs[t], settings[t], provider, workdir / t, seconds, warmup
            )
        load_refresh = os.getloadavg()
        for t in TOPOLOGIES:
            # The cluster drains the grants the single Redis left: the same grants, refreshed
            # once on each topology.
            results[t]["refresh"], grants = await refreshes(
                t, servers[t], envs[t], settings[t], provider, workdir / t, grants
            )
            results[t]["keys_per_node"] = keys_per_node(servers[t])

    out: dict[str, Any] = {
        "primaries": PRIMARIES,
        "workers": WORKERS,
        "callers": THROUGHPUT_CALLERS,
        "seconds": seconds,
        "warmup_seconds": warmup,
        "backlog": backlog,
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_at_refresh": [round(x, 2) for x in load_refresh],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "grants_seconds": round(grants_s, 1),
        **results,
    }
    for phase, cpu in (("provision", "cpu_ms_per_event"), ("refresh", "cpu_ms_per_refresh")):
        single, cluster = results["single"][phase], results["cluster"][phase]
        out[f"{phase}_ratio"] = round(cluster["per_s"] / single["per_s"], 3)
        out[f"{phase}_one_core_per_primary"] = one_core_per_primary(
            single[cpu], cluster[cpu], list(nodes(servers["cluster"]))
        )
    return out


def one_core_per_primary(
    single: dict[str, float], cluster: dict[str, float], names: list[str]
) -> dict[str, Any]:
    """What Redis alone would allow with a core per redis-server: a node saturates at one CPU
    second per second, so at 1 / (its CPU seconds per event); a cluster at its busiest node's.
    The CPU per event counts the idle polling of the window too (a fixed cost per second), so
    the bound errs low."""
    redis_ms = single.get("redis")
    node_ms = [cluster[n] for n in names if n in cluster]
    if not redis_ms or len(node_ms) != len(names) or not all(node_ms):
        return {}
    busiest = max(node_ms)
    return {
        "single_redis_ms_per_event": redis_ms,
        "cluster_node_ms_per_event": dict(zip(names, node_ms, strict=True)),
        "cluster_redis_ms_per_event_total": round(sum(node_ms), 3),
        "single_per_s": round(1000 / redis_ms),
        "cluster_per_s": round(1000 / busiest),
        "cluster_per_s_if_even": round(1000 * len(node_ms) / sum(node_ms)),
        "ratio": round(redis_ms / busiest, 2),
        "busiest_node_share": round(busiest / sum(node_ms), 3),
    }


def report(r: dict[str, Any]) -> str:
    s, c = r["single"], r["cluster"]
    names = list(c["shards_per_node"])

    def cpu(figures: dict[str, float]) -> str:
        redis_nodes = [n for n in figures if n == "redis" or n.startswith("node-")]
        parts = [f"{k} {v:.3f}" for k, v in figures.items() if k not in redis_nodes]
        if len(redis_nodes) > 1:
            nodes_ms = " + ".join(f"{figures[n]:.3f}" for n in redis_nodes)
            parts.append(f"Redis {nodes_ms} = {per_event(figures, redis_nodes):.3f}")
        elif redis_nodes:
            parts.append(f"Redis {figures[redis_nodes[0]]:.3f}")
        return ", ".join(parts)

    def bound(phase: str, what: str) -> str:
        b = r[f"{phase}_one_core_per_primary"]
        if not b:
            return f"    {what}: n/a (no CPU figures)"
        return (
            f"    {what}: one Redis {b['single_per_s']:,}/s "
            f"({b['single_redis_ms_per_event']:.3f} ms each); cluster {b['cluster_per_s']:,}/s "
            f"(busiest node {max(b['cluster_node_ms_per_event'].values()):.3f} ms, "
            f"{100 * b['busiest_node_share']:.0f} % of the nodes' "
            f"{b['cluster_redis_ms_per_event_total']:.3f} ms; "
            f"{b['cluster_per_s_if_even']:,}/s if spread evenly): x{b['ratio']:.2f}"
        )

    sp, cp, sr, cr = s["provision"], c["provision"], s["refresh"], c["refresh"]
    return "\n".join(
        [
            f"consent-flow on a Redis Cluster of {r['primaries']} primaries against one Redis, "
            f"same code, same run: {r['workers']} worker processes, {r['cpus']} CPUs (load "
            f"average {r['loadavg_before'][0]:.2f} before, {r['loadavg_at_refresh'][0]:.2f} at "
            f"the refreshes, {r['loadavg_after'][0]:.2f} after)",
            f"{'':44}{'one Redis':>14}{'cluster':>14}{'cluster/one':>13}",
            f"{'(1) provision_requested, ' + str(r['callers']) + ' callers:':44}"
            f"{sp['per_s']:>12.1f}/s{cp['per_s']:>12.1f}/s{r['provision_ratio']:>13.3f}",
            f"{'    latency p50 / p99 (ms):':44}"
            f"{sp['p50_ms']:>6.1f} /{sp['p99_ms']:>6.1f}{cp['p50_ms']:>7.1f} /{cp['p99_ms']:>6.1f}",
            f"{'(2) scheduled refreshes, ' + str(r['backlog']) + ' due at once:':44}"
            f"{sr['per_s']:>12.1f}/s{cr['per_s']:>12.1f}/s{r['refresh_ratio']:>13.3f}",
            f"{'    drain seconds:':44}{sr['seconds']:>14.2f}{cr['seconds']:>14.2f}",
            "CPU ms per provision (one Redis): " + cpu(sp["cpu_ms_per_event"]),
            "CPU ms per provision (cluster):   " + cpu(cp["cpu_ms_per_event"]),
            "CPU ms per refresh (one Redis):   " + cpu(sr["cpu_ms_per_refresh"]),
            "CPU ms per refresh (cluster):     " + cpu(cr["cpu_ms_per_refresh"]),
            f"Redis commands per provision: {sp['commands_per_event']:g} one Redis, "
            f"{cp['commands_per_event']:g} cluster; per refresh: {sr['commands_per_refresh']:g}, "
            f"{cr['commands_per_refresh']:g}",
            "Idle, 3 ready workers, % of a core: one Redis: "
            + ", ".join(f"{k} {v:g}" for k, v in sp["idle_cpu_percent"].items())
            + "; cluster: "
            + ", ".join(f"{k} {v:g}" for k, v in cp["idle_cpu_percent"].items()),
            "Shards per node: "
            + ", ".join(f"{n} {c['shards_per_node'][n]}" for n in names)
            + f" (of {sum(c['shards_per_node'].values())}); keys per node after: "
            + ", ".join(f"{n} {c['keys_per_node'][n]:,}" for n in names)
            + f" (one Redis: {sum(s['keys_per_node'].values()):,})",
            "With one core per Redis primary (Redis CPU alone; the rest needs cores too):",
            bound("provision", "provisions"),
            bound("refresh", "refreshes"),
            "Correct: provisions: "
            + ", ".join(
                f"{t} {x['provision']['pending_sessions']} sessions for "
                f"{x['provision']['events_answered']} events"
                for t, x in (("one Redis", s), ("cluster", c))
            )
            + "; refreshes: "
            + ", ".join(
                f"{t} {x['refresh']['lost_grants']} lost grants, {x['refresh']['reused_tokens']} "
                f"reused tokens ({x['refresh']['provider_refresh_requests']} refresh requests)"
                for t, x in (("one Redis", s), ("cluster", c))
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_phase_options(parser)
    parser.add_argument(
        "--backlog", type=int, default=4000, help="grants due at once in (2) (default 4000)"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.backlog < 1:
        parser.error("--seconds must be positive and --backlog at least 1")
    warmup = warmup_seconds(args)
    workdir = Path(tempfile.mkdtemp(prefix="consent-flow-bench-"))
    try:
        results = asyncio.run(measure(args.backlog, args.seconds, warmup, workdir))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - something broke: say what, exit non-zero
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"(worker and Redis logs kept in {workdir})", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
