"""The OpenAPI 3.1 description of every route (a test checks it against the app's routes)."""

from __future__ import annotations

from typing import Any

from p2pnn.tasks import KINDS, State

_ERROR = {"$ref": "#/components/schemas/Error"}
_TASK = {"$ref": "#/components/schemas/Task"}
_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


def _resp(description: str, schema: dict[str, Any] | None = None, content_type: str = "application/json") -> dict:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {content_type: {"schema": schema}}
    return out


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "invalid request", 401: "missing or invalid token", 403: "role too low",
            404: "not found", 409: "idempotency key reused with another body", 413: "body too large",
            503: "store unavailable, or too many event streams open"}
    return {str(c): _resp(text[c], _ERROR) for c in codes}


_LIST_PARAMS = [
    {"name": "state", "in": "query", "schema": {"type": "string", "enum": [s.value for s in State]}},
    {"name": "kind", "in": "query", "schema": {"type": "string", "enum": list(KINDS)}},
    {"name": "owner", "in": "query", "schema": {"type": "string"}},
    {"name": "parent", "in": "query", "schema": {"type": "string"}, "description": "a sweep's id: its trial tasks"},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "next_cursor of the previous page"},
]


def openapi() -> dict[str, Any]:
    secured = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "p2pnn node API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string"}, "detail": {"type": "string"}, "field": {"type": "string"}}},
                "Spec": {"type": "object", "required": ["kind"], "description": "a task spec (see README)",
                         "properties": {"kind": {"type": "string", "enum": list(KINDS)}}},
                "Node": {"type": "object", "properties": {
                    "id": {"type": "string"}, "addresses": {"type": "object", "description": "dht, peer, api"},
                    "roles": {"type": "array", "items": {"type": "string", "enum": ["principal", "an", "ki"]}},
                    "an": {"type": ["string", "null"], "description": "the An a Ki belongs to"},
                    "prefers": {"type": "string"}, "priority": {"type": "integer"},
                    "capabilities": {"type": "object", "description": "cpu_cores, memory_bytes, gpus, torch"},
                    "load": {"type": "object", "description": "slots, free_slots"}, "term": {"type": "integer"},
                    "last_seen": {"type": "number"}, "healthy": {"type": "boolean"}}},
                "Cluster": {"type": "object", "properties": {
                    "swarm": {"type": ["string", "null"]}, "node_id": {"type": "string"},
                    "principal": {"type": ["string", "null"]}, "term": {"type": "integer"},
                    "lease_expires_at": {"type": ["number", "null"]}, "leading": {"type": "boolean"},
                    "roles": {"type": "object", "description": "node id -> {roles, an}"}}},
                "Task": {"type": "object", "properties": {
                    "id": {"type": "string"}, "kind": {"type": "string"}, "spec": {"type": "object"},
                    "state": {"type": "string", "enum": [s.value for s in State]}, "owner": {"type": "string"},
                    "attempts": {"type": "integer"}, "max_attempts": {"type": "integer"},
                    "created_at": {"type": "number"}, "updated_at": {"type": "number"},
                    "started_at": {"type": ["number", "null"]}, "finished_at": {"type": ["number", "null"]},
                    "progress": {"type": ["object", "null"]}, "result": {"type": ["object", "null"]},
                    "error": {"type": ["string", "null"]}, "artifacts": {"type": "array", "items": {"type": "string"}},
                    "cancel_requested": {"type": "boolean"},
                    "parent": {"type": ["string", "null"], "description": "the sweep this task is a trial of"}}},
            },
        },
        "paths": {
            "/tasks": {
                "get": {"summary": "List tasks (original route)", "security": secured,
                        "responses": {"200": _resp("tasks, newest first", {"type": "array", "items": _TASK}), **_errors(401, 403)}},
                "post": {"summary": "Submit a task (original route): task_data is a spec, or a string for an echo task",
                         "security": secured,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {
                             "type": "object", "required": ["task_data"],
                             "properties": {"task_data": {"oneOf": [{"type": "string"}, {"$ref": "#/components/schemas/Spec"}]}}}}}},
                         "responses": {"201": _resp("the task", _TASK), **_errors(400, 401, 403, 413)}},
            },
            "/tasks/{task_id}": {
                "delete": {"summary": "Cancel a task (original route)", "security": secured, "parameters": [_ID],
                           "responses": {"200": _resp("the task", _TASK), **_errors(401, 403, 404)}},
            },
            "/api/v1/tasks": {
                "post": {"summary": "Submit one spec or a list of specs; with ?wait=SECONDS (0 to 60) the answer comes "
                                    "once every task is terminal or the wait is over (submit and long poll in one)",
                         "security": secured,
                         "parameters": [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 200}},
                                        {"name": "wait", "in": "query", "required": False,
                                         "schema": {"type": "number", "minimum": 0, "maximum": 60}}],
                         "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                             {"$ref": "#/components/schemas/Spec"},
                             {"type": "array", "items": {"$ref": "#/components/schemas/Spec"}}]}}}},
                         "responses": {"201": _resp("created: the task, or {tasks: [...]} for a list"),
                                       "200": _resp("repeat of an Idempotency-Key: the tasks made the first time"),
                                       **_errors(400, 401, 403, 409, 413)}},
                "get": {"summary": "List tasks, filtered and paginated", "security": secured, "parameters": _LIST_PARAMS,
                        "responses": {"200": _resp("a page", {"type": "object", "properties": {
                            "tasks": {"type": "array", "items": _TASK}, "next_cursor": {"type": ["string", "null"]}}}),
                            **_errors(400, 401, 403)}},
            },
            "/api/v1/tasks/{task_id}": {
                "get": {"summary": "One task: state, attempts, progress, result, error; with ?wait=SECONDS (0 to 60) "
                                   "the answer comes once the task is terminal or the wait is over (long poll)",
                        "security": secured,
                        "parameters": [_ID, {"name": "wait", "in": "query", "required": False,
                                             "schema": {"type": "number", "minimum": 0, "maximum": 60}}],
                        "responses": {"200": _resp("the task", _TASK), **_errors(400, 401, 403, 404)}},
                "delete": {"summary": "Cancel a task; a running one is stopped", "security": secured, "parameters": [_ID],
                           "responses": {"200": _resp("the task", _TASK), **_errors(401, 403, 404)}},
            },
            "/api/v1/tasks/{task_id}/artifacts/{name}": {
                "get": {"summary": "Download an artifact (model.safetensors of a train task)", "security": secured,
                        "parameters": [_ID, {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                        "responses": {"200": _resp("the bytes", {"type": "string", "format": "binary"}, "application/octet-stream"),
                                      **_errors(401, 403, 404)}},
            },
            "/api/v1/tasks/{task_id}/progress": {
                "get": {"summary": "Every progress report of the task's current attempt (one per epoch), oldest first",
                        "security": secured, "parameters": [_ID],
                        "responses": {"200": _resp("the series", {"type": "object", "properties": {
                            "task_id": {"type": "string"}, "attempt": {"type": "integer"},
                            "points": {"type": "array", "items": {"type": "object"}},
                            "truncated": {"type": "boolean", "description": "the attempt reported more than are kept"}}}),
                            **_errors(401, 403, 404)}},
            },
            "/api/v1/tasks/{task_id}/events": {
                "get": {"summary": "Server-Sent Events: 'task' with the task now and at each change; ends when the task ends",
                        "security": secured, "parameters": [_ID],
                        "responses": {"200": _resp("an event stream", {"type": "string"}, "text/event-stream"),
                                      **_errors(401, 403, 404, 503)}},
            },
            "/api/v1/events": {
                "get": {"summary": "Server-Sent Events: 'swarm' (cluster and nodes) when the membership changes, "
                                   "'task' (a summary) for each task that changes",
                        "security": secured,
                        "responses": {"200": _resp("an event stream", {"type": "string"}, "text/event-stream"),
                                      **_errors(401, 403, 503)}},
            },
            "/ui": {"get": {"summary": "The dashboard (redirects to /ui/)", "responses": {"308": _resp("to /ui/")}}},
            "/ui/": {"get": {"summary": "The dashboard: sign in with a token; swarm, tasks, live curves",
                             "responses": {"200": _resp("the page", {"type": "string"}, "text/html")}}},
            "/ui/{name}": {"get": {"summary": "A static file of the dashboard",
                                   "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                                   "responses": {"200": _resp("the file"), "404": _resp("no such file", _ERROR)}}},
            "/api/v1/nodes": {
                "get": {"summary": "Every member of the swarm as this node sees it (alone: this node)", "security": secured,
                        "responses": {"200": _resp("the members", {"type": "object", "properties": {
                            "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}}}),
                            **_errors(401, 403, 404)}},
            },
            "/api/v1/cluster": {
                "get": {"summary": "The principal, its term and lease, and the role map", "security": secured,
                        "responses": {"200": _resp("the cluster", {"$ref": "#/components/schemas/Cluster"}),
                                      **_errors(401, 403, 404)}},
            },
            "/health": {"get": {"summary": "Liveness", "responses": {"200": _resp("alive")}}},
            "/ready": {"get": {"summary": "Readiness: store reachable, workers up",
                               "responses": {"200": _resp("ready"), "503": _resp("not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": _resp("text exposition format", {"type": "string"}, "text/plain")}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _resp("OpenAPI 3.1")}}},
        },
    }
