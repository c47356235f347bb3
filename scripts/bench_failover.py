"""Failover and discovery figures for the swarm control plane.

1. Failover: a swarm of --nodes real `p2pnn-node` processes on 127.0.0.1 with
   the default swarm timings (heartbeat 0.2 s, election timeout 0.8 s, lease
   1.2 s) and a PostgreSQL store. --kills times: SIGKILL the principal; the
   failover time is from the kill to the new principal's ``election.won``
   event (its own log; "acting"), also printed: until every survivor follows
   it, and until the API of every survivor names it with a role map covering
   exactly the survivors (the poll of every node's API lags a little). Then
   the killed node restarts and the swarm settles (it may take over again:
   preempt is on). Prints p50, p99 and max, and how many lease periods
   overlap in the store's term history (must be 0).
   --idle S [--hog N]: before the kills, leave the swarm alone for S seconds
   (with N busy-looping processes) and count the terms granted meanwhile
   (false elections).
2. DHT convergence: --dht-nodes MemberViews (real Kademlia servers over UDP
   loopback, signed records, default DHT timings) spread over
   --dht-processes processes (one asyncio loop each: a single Python process
   cannot serve 50 nodes' RPCs on one core); all join through node 0; time
   from the first start until every one of them has read every other's record.
   --dht-steady S: then, over S seconds, the RPCs each node sends per second (and
   how many time out), the CPU per node (the processes' CPU time over the node
   count: the benchmark's own polling included) and the least-informed node every
   5 s; after that window each process times 20 record lookups over the network
   (find_value): success rate, p50, p99. P2PNN_BENCH_DEBUG=1: RPC counts by kind
   and each view's state on stderr.

    .venv/bin/python scripts/bench_failover.py [--kills 20] [--nodes 4] [--dht-nodes 50] [--idle 600 --hog 2]
    (no DHT run without --dht-nodes)
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from typing import Any

import psycopg
import trio
import trio_asyncio
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pnn.config import DhtConfig  # noqa: E402
from p2pnn.credential import SwarmCredential  # noqa: E402
from p2pnn.identity import init_data_dir, load_identity  # noqa: E402
from p2pnn.launcher import LocalSwarm, NodeProcess, agreed, led  # noqa: E402
from p2pnn.membership.dht import RPC_STATS  # noqa: E402
from p2pnn.membership.records import NodeRecord  # noqa: E402
from p2pnn.membership.view import MemberView  # noqa: E402

PG_URL = os.environ.get("P2PNN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SETTLE_TIMEOUT = 120.0
PROGRESS_SECONDS = 5.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _first_event(node: NodeProcess, since: float, newer_than: int) -> float | None:
    """Wall time of the node's first election.won / election.follow of a term above ``newer_than`` after ``since``."""
    for event in node.events():
        if (event.get("event") in ("election.won", "election.follow") and event.get("ts", 0) >= since
                and int(event.get("term", 0)) > newer_than):
            return float(event["ts"])
    return None


def _overlaps(conn: Any, schema: str) -> int:
    """Pairs of consecutive terms whose lease periods overlap in the store's history (must be 0)."""
    rows = conn.execute(
        sql.SQL("SELECT term, acquired_at, COALESCE(ended_at, expires_at) FROM {}.swarm_terms ORDER BY term").format(
            sql.Identifier(schema))
    ).fetchall()
    return sum(1 for a, b in zip(rows, rows[1:]) if b[1] < a[2] - 1e-6)


def bench_failover(kills: int, count: int, idle: float = 0.0, hog: int = 0) -> list[float]:
    """Kill the principal ``kills`` times; returns the failover times (kill -> new principal acting)."""
    schema = f"p2pnn_bench_{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as tmp:
        swarm = LocalSwarm(Path(tmp), PG_URL, schema, name="bench", env={"P2PNN_COMPUTE__SLOTS": "0"})
        conn = psycopg.connect(PG_URL, autocommit=True)
        try:
            for i in range(count):
                swarm.start(f"n{i}")
            took = swarm.wait_for(agreed(count), SETTLE_TIMEOUT)
            print(f"{count} nodes agreed {took:.2f} s after the last one started", flush=True)
            if idle:
                idle_check(swarm, conn, schema, idle, hog)
            times = []
            for k in range(kills):
                view = next(iter(swarm.views().values()))
                principal, term = view["principal"], view["term"]
                name = next(n for n, p in swarm.running().items() if p.node_id == principal)
                killed_wall, killed = time.time(), time.monotonic()
                swarm.nodes[name].stop(signal.SIGKILL)
                swarm.wait_for(led(lambda p, t: p != principal and t > term), SETTLE_TIMEOUT, poll=0.05)
                seen_by_api = time.monotonic() - killed
                # The nodes' own event times (same machine, same clock): the API poll above lags by a
                # round of requests to every node, which is not part of the failover.
                survivors = swarm.running().values()
                marks = [_first_event(node, killed_wall, term) for node in survivors]
                won = min(m for m in marks if m is not None) - killed_wall
                everyone = max(m for m in marks if m is not None) - killed_wall
                times.append(won)
                print(f"kill {k + 1:2d}: term {term} -> new principal acting after {won:.2f} s, followed by every "
                      f"survivor after {everyone:.2f} s (seen through the API after {seen_by_api:.2f} s)", flush=True)
                swarm.start(name)
                swarm.wait_for(led(), SETTLE_TIMEOUT)
                time.sleep(2.0)  # let a preempting take-over (if any) finish before the next kill
                swarm.wait_for(led(), SETTLE_TIMEOUT)
            print(f"lease periods that overlap in the store's term history: {_overlaps(conn, schema)}", flush=True)
            return times
        finally:
            swarm.stop_all()
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.close()


def _hog(until: float) -> None:
    while time.time() < until:
        pass


def idle_check(swarm: LocalSwarm, conn: Any, schema: str, seconds: float, hog: int) -> None:
    """Leave the swarm alone for ``seconds`` (with ``hog`` busy-looping processes) and count the terms granted."""
    import multiprocessing

    count = sql.SQL("SELECT COUNT(*) FROM {}.swarm_terms").format(sql.Identifier(schema))
    before = conn.execute(count).fetchone()[0]
    until = time.time() + seconds
    hogs = [multiprocessing.Process(target=_hog, args=(until,), daemon=True) for _ in range(hog)]
    for h in hogs:
        h.start()
    try:
        while time.time() < until:
            time.sleep(min(PROGRESS_SECONDS * 6, max(0.0, until - time.time())))
            print(f"  idle {seconds - (until - time.time()):5.0f} s: {conn.execute(count).fetchone()[0] - before} "
                  f"new terms", flush=True)
    finally:
        for h in hogs:
            h.kill()
            h.join()
    new = conn.execute(count).fetchone()[0] - before
    print(f"idle {seconds:.0f} s with {hog} CPU hog processes: {new} false elections (new terms); "
          f"overlapping lease periods {_overlaps(conn, schema)}", flush=True)


async def dht_worker(
    first: int, count: int, total: int, bootstrap: str, secret: str, rpc_timeout: float, gets_after: float
) -> None:
    """Run ``count`` MemberViews (one asyncio loop) and print how many members the least-informed one knows;
    ``gets_after`` seconds after every one of them knows all, time record lookups."""
    cred = SwarmCredential("bench", bytes.fromhex(secret))
    peers = [(h, int(p)) for h, _, p in (b.rpartition(":") for b in bootstrap.split(",") if b)]
    views: list[MemberView] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            for i in range(count):
                init_data_dir(Path(tmp) / str(i))
                ident = load_identity(Path(tmp) / str(i))

                def make(now: float, expires: float, ident=ident, i=i) -> NodeRecord:
                    return NodeRecord(
                        node_id=ident.node_id, dht=("127.0.0.1", views[i].dht_port), peer="ws://127.0.0.1:1",
                        api="http://127.0.0.1:1", capabilities={}, prefers="auto", priority=0, roles=(), an_id=None,
                        load={}, term=0, timestamp=now, expires_at=expires,
                    )

                boot = peers or ([("127.0.0.1", views[0].dht_port)] if views else [])
                view = MemberView(ident=ident, cred=cred, config=DhtConfig(rpc_timeout_seconds=rpc_timeout), bootstrap=boot, make_record=make)
                views.append(view)
                began = time.monotonic()
                await nursery.start(view.run, "127.0.0.1", 0)
                if os.environ.get("P2PNN_BENCH_DEBUG"):
                    print(f"worker {first}: node {i} started in {time.monotonic() - began:.2f} s", file=sys.stderr,
                          flush=True)
                if first == 0 and i == 0:
                    print(f"port {view.dht_port}", flush=True)
            measured = False
            while True:
                least = min(len(v.live()) for v in views)
                print(f"known {least} {RPC_STATS['sent']} {RPC_STATS['timeout']} {time.process_time():.3f}", flush=True)
                if os.environ.get("P2PNN_BENCH_DEBUG") and first == 1 and int(time.monotonic()) % 10 == 0:
                    print(f"worker 1: {dict(RPC_STATS)}", file=sys.stderr, flush=True)
                    for v in views:
                        print(f"  live {len(v.live())} members {len(v.members)} contacts {len(v.dht.contacts())} "
                              f"heard {time.time() - v._heard_at:.1f} s ago", file=sys.stderr, flush=True)
                if least >= total and not measured:
                    measured = True
                    nursery.start_soon(measure_gets, views, cred, gets_after)
                await trio.sleep(1.0 if measured else 0.2)  # polling 200 views is not free: less often once converged


GETS_PER_PROCESS = 20  # network lookups of random members' records, once every node of the process knows all
GETS_MARGIN = 3.0  # with --dht-steady, lookups start this long after the steady window (not inside it)


async def measure_gets(views: list[MemberView], cred: SwarmCredential, after: float) -> None:
    """Time record lookups over the network (find_value crawls, as a node without a copy does); print the times."""
    import random

    from p2pnn.membership.records import record_key

    await trio.sleep(after)
    times, ok = [], 0
    for _ in range(GETS_PER_PROCESS):
        view = random.choice(views)
        target = random.choice([r for r in view.live() if r.node_id != view.ident.node_id])
        started = time.perf_counter()
        with trio.move_on_after(5):
            value = await view.dht.get(record_key(cred.name, target.node_id), network=True)
            ok += value is not None
        times.append(time.perf_counter() - started)
    print(f"gets {len(times)} {ok} {' '.join(f'{t:.4f}' for t in times)}", flush=True)


def bench_dht(total: int, processes: int, rpc_timeout: float, steady: float = 0.0) -> float:
    """Start ``total`` DHT nodes in ``processes`` processes; seconds until every node knows every other.

    Also reports the RPCs sent per node per second (and how many timed out), until convergence and, with
    ``steady``, over that many seconds after it.
    """
    import subprocess

    secret = secrets.token_hex(32)
    per = [total // processes + (1 if k < total % processes else 0) for k in range(processes)]
    started = time.monotonic()

    def spawn(k: int, bootstrap: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, __file__, "--dht-worker", str(k), str(per[k]), str(total), bootstrap or "-", secret,
             str(rpc_timeout), str(steady + GETS_MARGIN if steady else 0.0)],
            stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    workers = [spawn(0, "")]
    first_line = workers[0].stdout.readline().split()
    seed = f"127.0.0.1:{first_line[1]}"
    workers += [spawn(k, seed) for k in range(1, processes)]
    known = [0] * processes
    sent = [0] * processes
    timeouts = [0] * processes
    cpu = [0.0] * processes
    gets: list[float] = []
    gets_ok = [0, 0]  # found, processes that reported
    try:
        import selectors

        sel = selectors.DefaultSelector()
        for k, w in enumerate(workers):
            sel.register(w.stdout, selectors.EVENT_READ, k)
        deadline = started + SETTLE_TIMEOUT
        last_report = started
        def poll() -> None:
            for key, _ in sel.select(timeout=1.0):
                line = key.fileobj.readline().split()
                if len(line) == 5 and line[0] == "known":
                    known[key.data], sent[key.data], timeouts[key.data] = map(int, line[1:4])
                    cpu[key.data] = float(line[4])
                elif line and line[0] == "gets":
                    gets_ok[0] += int(line[2])
                    gets_ok[1] += 1
                    gets.extend(float(t) for t in line[3:])

        def rates(since: float, sent0: int, timeouts0: int) -> str:
            span = max(time.monotonic() - since, 1e-9)
            return (f"{(sum(sent) - sent0) / span / total:.1f} RPCs/s per node sent, "
                    f"{(sum(timeouts) - timeouts0) / span / total:.2f}/s per node timed out")

        last_sent, last_timeouts = 0, 0
        while min(known) < total and time.monotonic() < deadline:
            poll()
            if time.monotonic() - last_report > PROGRESS_SECONDS:
                window = rates(last_report, last_sent, last_timeouts)
                last_report, last_sent, last_timeouts = time.monotonic(), sum(sent), sum(timeouts)
                print(f"  {last_report - started:5.1f} s: least-informed node per process knows {known}; {window}",
                      flush=True)
        took = time.monotonic() - started
        until = rates(started, 0, 0)
        result = "every node knew all" if min(known) >= total else f"NOT converged (min {min(known)})"
        print(f"{total} DHT nodes in {processes} processes: {result} {total} after {took:.2f} s "
              f"(from the first start; rpc timeout {rpc_timeout} s, other DHT timings default); {until}", flush=True)
        if steady and min(known) >= total:
            since, sent0, timeouts0, cpu0 = time.monotonic(), sum(sent), sum(timeouts), sum(cpu)
            lowest, window_low, shown = total, total, since
            while time.monotonic() - since < steady:
                poll()
                lowest, window_low = min(lowest, min(known)), min(window_low, min(known))
                if time.monotonic() - shown > PROGRESS_SECONDS:
                    shown = time.monotonic()
                    print(f"  {shown - since:5.1f} s into the steady state: least-informed node knew {window_low}; "
                          f"load average {os.getloadavg()[0]:.1f}", flush=True)
                    window_low = total
            span = time.monotonic() - since
            print(f"  steady state over {steady:.0f} s after convergence: {rates(since, sent0, timeouts0)}; "
                  f"CPU {100 * (sum(cpu) - cpu0) / span / total:.2f} % of a core per node; "
                  f"least-informed node knew {lowest}", flush=True)
        waited = time.monotonic()
        while min(known) >= total and gets_ok[1] < processes and time.monotonic() - waited < 30:
            poll()  # each process times its lookups once all its nodes know every member
        if gets:
            print(f"  record gets over the network (find_value lookups): {len(gets)}, {gets_ok[0]} found "
                  f"({100 * gets_ok[0] / len(gets):.1f} %), p50 {1000 * statistics.median(gets):.1f} ms, "
                  f"p99 {1000 * percentile(gets, 0.99):.1f} ms", flush=True)
        return took
    finally:
        for w in workers:
            w.kill()
            w.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--dht-nodes", type=int, default=0, help="DHT nodes for the convergence run (0, the default: no DHT run)")
    parser.add_argument("--dht-processes", type=int, default=10, help="processes the DHT nodes are spread over")
    parser.add_argument("--dht-rpc-timeout", type=float, default=DhtConfig().rpc_timeout_seconds,
                        help="dht.rpc_timeout_seconds for the DHT benchmark (default: the configuration default)")
    parser.add_argument("--dht-steady", type=float, default=0.0,
                        help="after convergence, measure the DHT RPC rate for this many seconds")
    parser.add_argument("--idle", type=float, default=0.0,
                        help="before the kills, leave the swarm alone this many seconds and count new terms")
    parser.add_argument("--hog", type=int, default=0, help="busy-looping processes during --idle (a loaded machine)")
    parser.add_argument("--dht-worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dht_worker:
        first, count, total, bootstrap, secret, rpc_timeout, gets_after = args.dht_worker
        trio.run(dht_worker, int(first), int(count), int(total), "" if bootstrap == "-" else bootstrap, secret,
                 float(rpc_timeout), float(gets_after))
        return
    if args.dht_nodes:
        bench_dht(args.dht_nodes, args.dht_processes, args.dht_rpc_timeout, args.dht_steady)
    if args.kills or args.idle:
        times = bench_failover(args.kills, args.nodes, args.idle, args.hog)
    if args.kills:
        print(f"failover (SIGKILL -> new principal acting) over {len(times)} principal kills "
              f"({args.nodes} nodes, default timings): "
              f"p50 {statistics.median(times):.2f} s, p99 {percentile(times, 0.99):.2f} s, max {max(times):.2f} s, "
              f"min {min(times):.2f} s")


if __name__ == "__main__":
    main()
