"""Route modules, one Blueprint each, built over the node's ApiContext.

tasks.py   submit, list, get, cancel, artifacts (/api/v1) and the original /tasks routes
swarm.py   /api/v1/nodes and /api/v1/cluster
ops.py     /health, /ready, /metrics, /openapi.json
"""

from p2pnn.api.routes import ops, swarm, tasks

BLUEPRINTS = (tasks.blueprint, swarm.blueprint, ops.blueprint)

__all__ = ["BLUEPRINTS"]
