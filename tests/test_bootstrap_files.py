"""bootstrap/: the Grafana dashboard asks only for metrics a node exports; the systemd unit points at real files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from p2pnn.node import run_node
from tests.nodeutil import node_config

BOOTSTRAP = Path(__file__).resolve().parents[1] / "bootstrap"


async def test_grafana_dashboard_queries_metrics_a_node_exports(nursery, tmp_path):
    handle = await nursery.start(run_node, node_config(tmp_path / "node"))
    async with httpx.AsyncClient() as http:
        exposition = (await http.get(f"{handle.api_url}/metrics")).text
    exported = set(re.findall(r"^# TYPE (p2pnn_\w+) (\w+)", exposition, re.M))
    names = {n for n, _ in exported} | {f"{n}_bucket" for n, kind in exported if kind == "histogram"}
    names |= {f"{n}_total" for n, kind in exported if kind == "counter"}
    dashboard = json.loads((BOOTSTRAP / "grafana-dashboard.json").read_text())
    asked = {m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"p2pnn_\w+", t["expr"])}
    assert asked and asked <= names, asked - names


def test_systemd_unit_documents_and_installs_from_the_checkout():
    unit = (BOOTSTRAP / "p2pnn-node.service").read_text()
    docs = re.search(r"^Documentation=(.*)$", unit, re.M).group(1).split()
    root = Path(__file__).resolve().parents[1]
    for url in docs:
        # The unit's checkout is /opt/p2pnn/src: each file it names exists in this one.
        assert url.startswith("file:///opt/p2pnn/src/") and (root / url.removeprefix("file:///opt/p2pnn/src/")).is_file(), url
    assert "pip install /opt/p2pnn/src" in unit and "pip install p2pnn\n" not in unit
