"""Route modules, one Blueprint each, built over the node's ApiContext.

tasks.py   submit, list, get, cancel, artifacts (/api/v1) and the original /tasks routes
swarm.py   /api/v1/nodes and /api/v1/cluster
ops.py     /health, /ready, /metrics, /openapi.json
live.py    /api/v1/tasks/{id}/progress, and the event streams /api/v1/tasks/{id}/events and /api/v1/events
ui.py      the dashboard's static files at /ui/
"""

from p2pnn.api.routes import live, ops, swarm, tasks, ui

BLUEPRINTS = (tasks.blueprint, swarm.blueprint, live.blueprint, ops.blueprint, ui.blueprint)

__all__ = ["BLUEPRINTS"]
