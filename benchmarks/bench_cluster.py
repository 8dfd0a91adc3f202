"""Provisions and scheduled refreshes per second on a Redis Cluster, next to one Redis, same run.

One run starts one private ``redis-server``, a Redis Cluster of three primaries
(``_infra.start_cluster``: ``redis-server --cluster-enabled yes`` each, ``redis-cli --cluster
create``) and the local OpenID provider (rotating refresh tokens; a reused one ends the grant).
The same code and worker processes (three per topology, ``bench_refresh``'s: ``ConsentWorker(
**worker_settings(...))`` as ``consent-flow worker`` runs it) on one (``CONSENT_REDIS_URL=
redis://...``) and on the other (``redis+cluster://...``). Each phase measures the topologies in
alternating blocks, one Redis, cluster, cluster, one Redis, so that a machine whose load drifts
weighs on both alike:

(1) ``provision_requested`` events per second end to end, 50 concurrent callers of
    ``ConsentClient.request_provisioning``, a new user per event (``bench_provision``'s (b)),
    every topology's workers running; ``--seconds`` per topology, half in each block. Afterwards
    each store must hold a pending session for every event answered.
(2) backlog drains: ``--backlog`` grants per topology (obtained from the provider) imported
    while no worker runs, each due at once; three workers start and refresh them all in batches
    (``bench_backlog``'s drain); in the second block every grant is due again. Refreshes per
    second from the first provider call to the last commit. Afterwards every grant must be
    provisioned with a refresh token the provider still knows, and the provider must have seen
    no reused token.

Beside the rates: the CPU each process spent per event (every Redis node on its own, the
workers, the provider, this process), Redis commands per event, what idle workers cost each
node, shards and keys per node, and what each topology would reach with one core per Redis
primary (1 / the busiest node's CPU seconds per event). On a 2-core machine everything shares
two cores, so the rates measure the provider and the workers, not Redis: the point is that the
cluster runs the same work, correctly, spread over its nodes. A broken run (a worker that dies,
an event without its session, a lost grant, a reused token) exits non-zero.

    .venv/bin/python benchmarks/bench_cluster.py [--seconds 10] [--backlog 2500] [--shards 16]
        [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # _infra, also when loaded by path
sys.path.insert(0, str(ROOT / "examples" / "provider"))

import redis  # noqa: E402
from _infra import (  # noqa: E402
    BenchError,
    Cluster,
    Redis,
    Run,
    add_phase_options,
    cpu_used,
    free_port,
    group_cpu_seconds,
    percentile,
    quiet_logs,
    run_measure,
    start_cluster,
    start_redis,
    stop_process,
    tail,
    warmup_seconds,
)
from bench_backlog import all_due_now, drain, import_grants, live_grants  # noqa: E402
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
# Each phase measures the topologies in this order, so that a machine whose load drifts during
# the run weighs on both alike.
BLOCKS = ("single", "cluster", "cluster", "single")
IDLE_SECONDS = 2.0  # every topology's three ready workers with nothing to do, before (1)


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


def reads(server: Redis | Cluster) -> int:
    """Reads of client sockets so far, summed over the nodes: the round trips Redis served (a
    pipeline is one per node it reaches)."""
    total = 0
    for node in nodes(server).values():
        with redis.Redis(port=node.port) as r:
            total += int(r.info("stats")["total_reads_processed"])
    return total


def per_event(cpu_ms: dict[str, float], names: list[str]) -> float:
    return round(sum(cpu_ms.get(n, 0.0) for n in names), 3)


@dataclass
class Topology:
    """One topology's store, the run's environment for it, and its share of the grants."""

    server: Redis | Cluster
    env: dict[str, str]
    settings: Any
    workdir: Path
    grants: dict[str, str] = field(default_factory=dict)

    def groups(self, provider: Any, workers: list[Any]) -> dict[str, list[int]]:
        """The processes measured: this one, the provider, the workers, each Redis node."""
        groups = {"client": [os.getpid()]}
        node = getattr(provider, "_process", None)
        if node is not None:
            groups["provider"] = [node.pid]
        groups["workers"] = [w.process.pid for w in workers]
        groups.update({name: [n.process.pid] for name, n in nodes(self.server).items()})
        return groups


# --- the phases ---------------------------------------------------------------------------------


async def provisions(
    tops: dict[str, Topology], provider: Any, seconds: float, warmup: float
) -> dict[str, dict[str, Any]]:
    """(1): three workers per topology, all running; ``seconds`` per topology in two blocks,
    ``BLOCKS`` order, 50 callers, a new user per event; then every event's session."""
    from consent_flow import ConsentClient, State

    workers = {
        t: [start_worker(f"{t}-provision-{i + 1}", top.env, top.workdir) for i in range(WORKERS)]
        for t, top in tops.items()
    }
    everyone = [w for ws in workers.values() for w in ws]
    groups = {t: top.groups(provider, workers[t]) for t, top in tops.items()}

    def alive() -> None:
        for worker in everyone:
            worker.check()

    runs: dict[str, list[Run]] = {t: [] for t in tops}
    ran: dict[str, dict[str, int]] = {t: {} for t in tops}
    read = dict.fromkeys(tops, 0)
    try:
        for t, top in tops.items():
            settings = top.settings
            wait_ready(
                workers[t],
                settings.redis_url,
                settings.queue_name + ":health-check",
                "worker_started",
            )
        before = {t: group_cpu_seconds(g) for t, g in groups.items()}
        await asyncio.sleep(IDLE_SECONDS)
        idle = {t: cpu_used(group_cpu_seconds(g), before[t]) for t, g in groups.items()}
        for block, t in enumerate(BLOCKS):
            counted, read_before = commands(tops[t].server), reads(tops[t].server)
            runs[t].append(
                await bench_project(
                    tops[t].settings,
                    alive,
                    warmup,
                    seconds / 2,
                    groups[t],
                    callers=THROUGHPUT_CALLERS,
                    tag=f"{t}{block}",
                )
            )
            read[t] += reads(tops[t].server) - read_before
            for name, calls in diff_counts(commands(tops[t].server), counted).items():
                ran[t][name] = ran[t].get(name, 0) + calls
        alive()
    finally:
        for worker in everyone:
            worker.stop()
    traceback_free(everyone)

    out = {}
    for t, top in tops.items():
        async with ConsentClient(top.settings) as client:
            pending = (await client.store.counts())[State.PENDING]
        events = sum(len(run.samples) for run in runs[t])  # warm-ups too: each started a session
        if pending != events:
            raise BenchError(f"{t}: {events} provisioning events answered, {pending} sessions")
        took = [x for run in runs[t] for x in run.measured()]
        window = sum(run.window[1] - run.window[0] for run in runs[t])
        cpu: dict[str, float] = {}
        for run in runs[t]:
            for name, used in run.cpu.items():
                cpu[name] = cpu.get(name, 0.0) + used
        out[t] = {
            "per_s": round(len(took) / window, 1),
            "per_s_by_block": [round(run.per_second, 1) for run in runs[t]],
            "events": len(took),
            "p50_ms": round(percentile(took, 50) * 1000, 2),
            "p99_ms": round(percentile(took, 99) * 1000, 2),
            "cpu_ms_per_event": {k: round(1000 * v / len(took), 3) for k, v in cpu.items()},
            "commands_per_event": round(sum(ran[t].values()) / events, 1),
            "commands_per_event_by_name": top_commands(ran[t], events),
            "reads_per_event": round(read[t] / events, 1),
            "pending_sessions": pending,
            "events_answered": events,
            "idle_cpu_percent": {k: round(100 * v / IDLE_SECONDS, 2) for k, v in idle[t].items()},
        }
    return out


async def refreshes(tops: dict[str, Topology], provider: Any) -> dict[str, dict[str, Any]]:
    """(2): each topology's grants imported, due at once, drained by three workers; again (every
    grant due again) in ``BLOCKS`` order; then every grant checked at the provider."""
    for top in tops.values():
        await import_grants(top.settings, top.grants)
    drains: dict[str, list[dict[str, Any]]] = {t: [] for t in tops}
    ran: dict[str, dict[str, int]] = {t: {} for t in tops}
    read = dict.fromkeys(tops, 0)
    stats: dict[str, dict[str, int]] = {t: {} for t in tops}
    for block, t in enumerate(BLOCKS):
        top = tops[t]
        users = sorted(top.grants)
        if drains[t]:
            await all_due_now(top.settings, users)
        provider.reset_stats()
        counted, read_before = commands(top.server), reads(top.server)
        label = f"{t}-drain-{block + 1}"
        drains[t].append(
            await drain(top.env, top.workdir, top.settings, users, label, top.groups(provider, []))
        )
        if drains[t][-1]["refused"]:  # ended grants are due no more: the next drain would hang
            raise BenchError(f"{label}: the provider refused {drains[t][-1]['refused']} grants")
        read[t] += reads(top.server) - read_before
        for name, calls in diff_counts(commands(top.server), counted).items():
            ran[t][name] = ran[t].get(name, 0) + calls
        for name in ("refresh_requests", "refresh_errors", "refresh_reuse_detected"):
            stats[t][name] = stats[t].get(name, 0) + int(provider.stats().get(name, 0))

    out = {}
    for t, top in tops.items():
        users = sorted(top.grants)
        live = await live_grants(top.settings, provider, users)
        reused = stats[t]["refresh_reuse_detected"]
        if reused or len(live) != len(users):
            raise BenchError(
                f"{t}: {len(users) - len(live)} grants lost, {reused} refresh tokens reused"
            )
        refreshed = len(users) * len(drains[t])
        took = sum(d["seconds"] for d in drains[t])
        cpu: dict[str, float] = {}
        for d in drains[t]:  # ms per refresh of each drain, weighted alike (same size)
            for name, ms in d["cpu_ms_per_refresh"].items():
                cpu[name] = cpu.get(name, 0.0) + ms / len(drains[t])
        out[t] = {
            "per_s": round(refreshed / took, 1),
            "per_s_by_drain": [d["per_s"] for d in drains[t]],
            "seconds": round(took, 2),
            "refreshes": refreshed,
            "grants": len(users),
            "cpu_ms_per_refresh": {k: round(v, 3) for k, v in cpu.items()},
            "commands_per_refresh": round(sum(ran[t].values()) / refreshed, 1),
            "commands_per_refresh_by_name": top_commands(ran[t], refreshed),
            "reads_per_refresh": round(read[t] / refreshed, 1),
            "provider_refresh_requests": stats[t]["refresh_requests"],
            "provider_refresh_errors": stats[t]["refresh_errors"],
            "lost_grants": len(users) - len(live),
            "reused_tokens": reused,
        }
    return out


def traceback_free(workers: list[Any]) -> None:
    for worker in workers:
        if "Traceback" in tail(worker.log, 400):
            raise BenchError(f"the {worker.name} worker logged a traceback:\n{tail(worker.log)}")


def top_commands(counts: dict[str, int], events: int, n: int = 8) -> dict[str, float]:
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return {name: round(calls / events, 2) for name, calls in ranked}


# --- the run ------------------------------------------------------------------------------------


async def measure(
    backlog: int, shards: int, seconds: float, warmup: float, workdir: Path
) -> dict[str, Any]:
    quiet_logs()
    load_before = os.getloadavg()
    callback_port = free_port()
    with contextlib.ExitStack() as stack:
        provider = stack.enter_context(local_provider(callback_port))
        prefix = "bench" + uuid.uuid4().hex[:10]
        tops: dict[str, Topology] = {}
        for t in TOPOLOGIES:
            server = stack.enter_context(topology(t, workdir / t))
            env = project_env(
                server, provider, workdir / t, prefix, f"{prefix}:queue", callback_port
            )
            env["CONSENT_REDIS_SHARDS"] = str(shards)
            tops[t] = Topology(server, env, bench_settings(env), workdir / t)

        t0 = time.monotonic()
        accounts = {t: [f"{t}{i:05d}" for i in range(backlog)] for t in TOPOLOGIES}
        every = [a for t in TOPOLOGIES for a in accounts[t]]
        given = dict(zip(every, await direct_grants(provider, every), strict=True))
        for t, top in tops.items():
            top.grants = {a: given[a] for a in accounts[t]}
        grants_s = time.monotonic() - t0

        provisioned = await provisions(tops, provider, seconds, warmup)
        load_refresh = os.getloadavg()
        refreshed = await refreshes(tops, provider)
        results = {
            t: {
                "provision": provisioned[t],
                "refresh": refreshed[t],
                "shards_per_node": shards_per_node(top.server, top.settings.redis_shards),
                "keys_per_node": keys_per_node(top.server),
            }
            for t, top in tops.items()
        }
        names = list(nodes(tops["cluster"].server))

    out: dict[str, Any] = {
        "primaries": PRIMARIES,
        "workers": WORKERS,
        "callers": THROUGHPUT_CALLERS,
        "seconds": seconds,
        "warmup_seconds": warmup,
        "blocks": list(BLOCKS),
        "backlog": backlog,
        "shards": shards,
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
            single[cpu], cluster[cpu], names
        )
        # What bounds the rates here: every process's CPU per event, against the machine's
        # cores (the rates cannot pass cpus / that).
        for figures in (single, cluster):
            total = sum(figures[cpu].values())
            figures["all_cpu_ms_per_event"] = round(total, 3)
            figures["machine_bound_per_s"] = (
                round(1000 * (os.cpu_count() or 1) / total) if total else 0
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

    def blocks(a: list[float], b: list[float]) -> str:
        return f"{' & '.join(f'{x:g}' for x in a)} / {' & '.join(f'{x:g}' for x in b)}"

    return "\n".join(
        [
            f"consent-flow on a Redis Cluster of {r['primaries']} primaries against one Redis, "
            f"same code, same run: {r['workers']} worker processes each, {r['cpus']} CPUs (load "
            f"average {r['loadavg_before'][0]:.2f} before, {r['loadavg_at_refresh'][0]:.2f} at "
            f"the refreshes, {r['loadavg_after'][0]:.2f} after); blocks in the order "
            + ", ".join(r["blocks"]),
            f"{'':46}{'one Redis':>12}{'cluster':>12}{'cluster/one':>13}",
            f"{'(1) provision_requested, ' + str(r['callers']) + ' callers:':46}"
            f"{sp['per_s']:>10.1f}/s{cp['per_s']:>10.1f}/s{r['provision_ratio']:>13.3f}",
            "    by block, one Redis / cluster: "
            f"{blocks(sp['per_s_by_block'], cp['per_s_by_block'])}"
            f"; p50 {sp['p50_ms']:.1f} / {cp['p50_ms']:.1f} ms, p99 {sp['p99_ms']:.1f} / "
            f"{cp['p99_ms']:.1f} ms",
            f"{'(2) scheduled refreshes, ' + str(r['backlog']) + ' grants due at once:':46}"
            f"{sr['per_s']:>10.1f}/s{cr['per_s']:>10.1f}/s{r['refresh_ratio']:>13.3f}",
            "    by drain, one Redis / cluster: "
            f"{blocks(sr['per_s_by_drain'], cr['per_s_by_drain'])}"
            f"; {sr['refreshes']:,} / {cr['refreshes']:,} refreshes in {sr['seconds']:g} / "
            f"{cr['seconds']:g} s",
            "CPU ms per provision (one Redis): " + cpu(sp["cpu_ms_per_event"]),
            "CPU ms per provision (cluster):   " + cpu(cp["cpu_ms_per_event"]),
            "CPU ms per refresh (one Redis):   " + cpu(sr["cpu_ms_per_refresh"]),
            "CPU ms per refresh (cluster):     " + cpu(cr["cpu_ms_per_refresh"]),
            "Redis commands (round trips) per provision, one Redis / cluster: "
            f"{sp['commands_per_event']:g} ({sp['reads_per_event']:g}) / "
            f"{cp['commands_per_event']:g} ({cp['reads_per_event']:g}); per refresh: "
            f"{sr['commands_per_refresh']:g} ({sr['reads_per_refresh']:g}) / "
            f"{cr['commands_per_refresh']:g} ({cr['reads_per_refresh']:g})",
            "Idle, every topology's workers ready, % of a core: one Redis: "
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
            f"What bounds this run: every process's CPU per event, one Redis / cluster: "
            f"provision {sp['all_cpu_ms_per_event']:.2f} / {cp['all_cpu_ms_per_event']:.2f} ms "
            f"({r['cpus']} cores: {sp['machine_bound_per_s']:,} / "
            f"{cp['machine_bound_per_s']:,}/s), "
            f"refresh {sr['all_cpu_ms_per_event']:.2f} / {cr['all_cpu_ms_per_event']:.2f} ms "
            f"({sr['machine_bound_per_s']:,} / {cr['machine_bound_per_s']:,}/s); the provider "
            f"alone {sr['cpu_ms_per_refresh'].get('provider', 0):.2f} / "
            f"{cr['cpu_ms_per_refresh'].get('provider', 0):.2f} ms per refresh",
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
        "--backlog",
        type=int,
        default=2500,
        help="grants per topology, due at once in each drain of (2) (default 2500)",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=16,
        help="CONSENT_REDIS_SHARDS on both topologies (default 16, the project's default)",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.backlog < 1 or not 1 <= args.shards <= 1024:
        parser.error("--seconds must be positive, --backlog at least 1 and --shards from 1 to 1024")
    warmup = warmup_seconds(args)
    return run_measure(
        lambda workdir: measure(args.backlog, args.shards, args.seconds, warmup, workdir),
        report,
        as_json=args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
