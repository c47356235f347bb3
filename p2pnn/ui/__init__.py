"""The dashboard served at /ui/ by every node (p2pnn/api/routes/ui.py): static files, no build step.

static/index.html   the page: login (a pasted token, kept in session storage), swarm, tasks, task detail
static/app.js       reads the API with fetch, follows /api/v1/events and a task's event stream
static/app.css      the look
static/uPlot.*      the chart library (uPlot 1.6, MIT; its licence is static/uPlot.LICENSE.txt)
"""
