"""The REST API every node serves.

app.py      routes (the original /tasks routes, /api/v1, health, metrics, OpenAPI)
auth.py     JWT bearer tokens and the viewer < operator < admin roles
openapi.py  the OpenAPI description of every route
"""
