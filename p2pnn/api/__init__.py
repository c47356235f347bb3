"""The REST API every node serves.

app.py      the application: route modules, error mapping to JSON 4xx, request metrics
http.py     what routes share: ApiContext (the node's services, the caller, the body), ApiError
routes/     one Blueprint per area: tasks, swarm, ops (health, ready, metrics, OpenAPI)
auth.py     JWT bearer tokens and the viewer < operator < admin roles (p2pnn.callers)
openapi.py  the OpenAPI description of every route
"""
