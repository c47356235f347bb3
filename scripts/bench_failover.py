"""Failover and discovery figures for the swarm control plane.

1. Failover: a swarm of --nodes real `p2pnn-node` processes on 127.0.0.1 with
   the default swarm timings (heartbeat 0.5 s, election timeout 2 s, lease
   3 s) and a PostgreSQL store. --kills times: SIGKILL the principal, time
   until every surviving node names the same new principal with a higher term
   and its role map covers exactly the survivors; then restart the killed node
   and let the swarm settle (it may take over again: preempt is on).
   Prints p50, p99 and max.
2. DHT convergence: --dht-nodes MemberViews (real Kademlia servers over UDP
   loopback, signed records) in this one process, each joining through node
   0; time until every one of them has read every other's record.

    .venv/bin/python scripts/bench_failover.py [--kills 20] [--nodes 4] [--dht-nodes 50]
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

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pnn.config import DhtConfig  # noqa: E402
from p2pnn.credential import SwarmCredential  # noqa: E402
from p2pnn.identity import init_data_dir, load_identity  # noqa: E402
from p2pnn.launcher import LocalSwarm, agreed, led  # noqa: E402
from p2pnn.membership.records import NodeRecord  # noqa: E402
from p2pnn.membership.view import MemberView  # noqa: E402

PG_URL = os.environ.get("P2PNN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SETTLE_TIMEOUT = 120.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_failover(kills: int, count: int) -> list[float]:
    import psycopg
    from psycopg import sql

    schema = f"p2pnn_bench_{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as tmp:
        swarm = LocalSwarm(Path(tmp), PG_URL, schema, name="bench", env={"P2PNN_COMPUTE__SLOTS": "0"})
        try:
            for i in range(count):
                swarm.start(f"n{i}")
            took = swarm.wait_for(agreed(count), SETTLE_TIMEOUT)
            print(f"{count} nodes agreed {took:.2f} s after the last one started", flush=True)
            times = []
            for k in range(kills):
                view = next(iter(swarm.views().values()))
                principal, term = view["principal"], view["term"]
                name = next(n for n, p in swarm.running().items() if p.node_id == principal)
                killed = time.monotonic()
                swarm.nodes[name].stop(signal.SIGKILL)
                swarm.wait_for(led(lambda p, t: p != principal and t > term), SETTLE_TIMEOUT, poll=0.05)
                times.append(time.monotonic() - killed)
                print(f"kill {k + 1:2d}: term {term} -> failover {times[-1]:.2f} s", flush=True)
                swarm.start(name)
                swarm.wait_for(led(), SETTLE_TIMEOUT)
                time.sleep(2.0)  # let a preempting take-over (if any) finish before the next kill
                swarm.wait_for(led(), SETTLE_TIMEOUT)
            return times
        finally:
            swarm.stop_all()
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


async def bench_dht(count: int) -> float:
    cred = SwarmCredential("bench", secrets.token_bytes(32))
    config = DhtConfig()
    views: list[MemberView] = []
    with tempfile.TemporaryDirectory() as tmp:
        idents = []
        for i in range(count):
            init_data_dir(Path(tmp) / str(i))
            idents.append(load_identity(Path(tmp) / str(i)))
        async with trio.open_nursery() as nursery:
            started = time.monotonic()
            for i, ident in enumerate(idents):
                bootstrap = [("127.0.0.1", views[0].dht_port)] if views else []

                def make(now: float, expires: float, ident=ident, i=i) -> NodeRecord:
                    port = views[i].dht_port if i < len(views) else 0
                    return NodeRecord(
                        node_id=ident.node_id, dht=("127.0.0.1", port), peer="ws://127.0.0.1:1", api="http://127.0.0.1:1",
                        capabilities={}, prefers="auto", priority=0, roles=(), an_id=None, load={}, term=0,
                        timestamp=now, expires_at=expires,
                    )

                view = MemberView(ident=ident, cred=cred, config=config, bootstrap=bootstrap, make_record=make)
                views.append(view)
                await nursery.start(view.run, "127.0.0.1", 0)
            up = time.monotonic() - started
            while min(len(v.live()) for v in views) < count:
                await trio.sleep(0.1)
            took = time.monotonic() - started
            print(f"{count} DHT nodes: all started in {up:.2f} s; every node knew all {count} after {took:.2f} s "
                  f"(from the first start)", flush=True)
            nursery.cancel_scope.cancel()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--dht-nodes", type=int, default=50)
    args = parser.parse_args()
    if args.dht_nodes:
        trio.run(bench_dht, args.dht_nodes)
    if args.kills:
        times = bench_failover(args.kills, args.nodes)
        print(f"failover over {len(times)} principal kills ({args.nodes} nodes, default timings): "
              f"p50 {statistics.median(times):.2f} s, p99 {percentile(times, 0.99):.2f} s, max {max(times):.2f} s, "
              f"min {min(times):.2f} s")


if __name__ == "__main__":
    main()
