// The p2pnn dashboard: reads the node's API with the token a person pasted in (session storage,
// sent only as an Authorization header) and follows its Server-Sent Event streams through fetch,
// because EventSource cannot send headers and a token must never sit in a URL.
"use strict";
(() => {
  const TOKEN_KEY = "p2pnn.token";
  const RECONNECT_MS = 1000; // a broken stream is opened again after this pause
  const REFRESH_MS = 30000; // the task list is re-read this often, in case a stream missed a change
  const TRIALS_MS = 2000; // a sweep's trials (tasks of their own, not in its stream) are re-read this often
  const MAX_ROWS = 200; // tasks shown in the list

  const ui = {
    token: sessionStorage.getItem(TOKEN_KEY),
    tasks: new Map(),
    cluster: null,
    nodes: [],
    page: null, // AbortController of the current view's requests and streams
    charts: null,
  };

  const $ = (sel) => document.querySelector(sel);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // Elements are built with textContent only: nothing from the API is ever parsed as HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
    return node;
  }

  function short(id) { return id ? id.slice(0, 8) : "–"; }
  function age(ts) {
    if (!ts) return "–";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    return `${Math.round(s / 3600)} h ago`;
  }
  function metrics(p) {
    if (!p) return "";
    const parts = [];
    if (p.epoch != null) parts.push(`epoch ${p.epoch}/${p.epochs ?? "?"}`);
    if (typeof p.workers === "number" && p.workers > 1) parts.push(`${p.workers} workers`);
    if (typeof p.loss === "number") parts.push(`loss ${p.loss.toFixed(4)}`);
    if (typeof p.test_accuracy === "number") parts.push(`test acc ${p.test_accuracy.toFixed(4)}`);
    return parts.join("  ");
  }
  function setConn(on, why) {
    const c = $("#conn");
    c.className = "conn " + (on ? "on" : "off");
    c.textContent = on ? "live" : "offline";
    c.title = on ? "following the node's event stream" : (why || "not connected");
  }

  // --- the API ---

  class Unauthorized extends Error {}

  async function api(path, opts = {}) {
    const headers = { ...(opts.headers || {}), Authorization: `Bearer ${ui.token}` };
    const resp = await fetch(path, { ...opts, headers });
    if (resp.status === 401) {
      signOut("The node refused the token (expired or from another node?).");
      throw new Unauthorized("token refused");
    }
    if (!resp.ok) {
      let body = {};
      try { body = await resp.json(); } catch (e) { /* not JSON */ }
      throw new Error(`${body.error || resp.status}${body.detail ? ": " + body.detail : ""}`);
    }
    return resp;
  }
  const getJSON = async (path, signal) => (await api(path, { signal })).json();

  // One Server-Sent Events stream: yields {event, data} until the server ends it.
  async function* sse(path, signal) {
    const resp = await api(path, { signal, headers: { Accept: "text/event-stream" } });
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", name = "", data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        let line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield { event: name || "message", data: data.join("\n") };
          name = ""; data = [];
        } else if (!line.startsWith(":")) {
          const c = line.indexOf(":");
          const field = c < 0 ? line : line.slice(0, c);
          let v = c < 0 ? "" : line.slice(c + 1);
          if (v.startsWith(" ")) v = v.slice(1);
          if (field === "event") name = v;
          else if (field === "data") data.push(v);
        }
      }
    }
  }

  // Follow a stream, opening it again when it breaks, until the view goes away
  // (or, with untilEnd, until the server ends it: a task stream ends with its task).
  async function follow(path, signal, onEvent, untilEnd = false) {
    while (!signal.aborted) {
      try {
        for await (const ev of sse(path, signal)) {
          setConn(true);
          onEvent(ev.event, JSON.parse(ev.data));
        }
        if (untilEnd) return;
      } catch (e) {
        if (signal.aborted || e instanceof Unauthorized) return;
        setConn(false, e.message);
      }
      await sleep(RECONNECT_MS);
    }
  }

  // --- sign in / out ---

  function signOut(why) {
    ui.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("#login-error").textContent = why || "";
    route();
  }

  $("#login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = $("#login-token").value.trim();
    if (!token) return;
    ui.token = token;
    try {
      await getJSON("/api/v1/cluster");
    } catch (e) {
      if (!(e instanceof Unauthorized)) $("#login-error").textContent = e.message;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#login-token").value = "";
    $("#login-error").textContent = "";
    route();
  });
  $("#logout").addEventListener("click", () => signOut(""));

  // --- the overview: swarm and tasks ---

  function renderSwarm() {
    const c = ui.cluster || {};
    const principal = c.principal;
    $("#cluster").replaceChildren(
      el("span", {}, "swarm ", el("b", {}, c.swarm || "(a lone node)")),
      el("span", {}, "principal ", el("b", { class: "mono" }, short(principal))),
      el("span", {}, "term ", el("b", {}, c.term ?? "–")),
      el("span", {}, "members ", el("b", { id: "member-count" }, ui.nodes.length)),
    );
    const rows = [...ui.nodes].sort((a, b) => (a.id === principal ? -1 : b.id === principal ? 1 : a.id.localeCompare(b.id)));
    $("#nodes tbody").replaceChildren(...rows.map((n) => {
      const roles = (n.roles || []).map((r) => el("span", { class: `role role-${r}` }, r));
      const gpus = ((n.capabilities || {}).gpus || []).map((g) => g.name || "gpu").join(", ");
      const load = n.load || {};
      return el("tr", { "data-node-id": n.id },
        el("td", { class: "mono", title: n.id }, short(n.id)),
        el("td", {}, ...(roles.length ? roles : ["–"])),
        el("td", { class: "mono" }, short(n.an)),
        el("td", { class: "mono" }, (n.addresses || {}).api || "–"),
        el("td", {}, `${load.free_slots ?? "?"} / ${load.slots ?? "?"}`),
        el("td", {}, gpus || "–"),
        el("td", { class: n.healthy ? "healthy" : "down" }, n.healthy ? "healthy" : "unreachable"),
        el("td", {}, age(n.last_seen)),
      );
    }));
  }

  function matchesFilters(t) {
    const state = $("#filter-state").value, kind = $("#filter-kind").value;
    return (!state || t.state === state) && (!kind || t.kind === kind);
  }

  function renderTasks() {
    const shown = [...ui.tasks.values()].filter(matchesFilters)
      .sort((a, b) => b.created_at - a.created_at || b.id.localeCompare(a.id)).slice(0, MAX_ROWS);
    $("#task-count").textContent = `${shown.length} shown`;
    $("#tasks tbody").replaceChildren(...shown.map((t) => {
      const row = el("tr", { class: "link", "data-task-id": t.id, "data-state": t.state },
        el("td", { class: "mono", title: t.id }, short(t.id)),
        el("td", {}, t.kind),
        el("td", { class: `state-${t.state}` }, t.state + (t.cancel_requested && t.state === "running" ? " (cancelling)" : "")),
        el("td", {}, `${t.attempts}/${t.max_attempts}`),
        el("td", { class: "mono" }, t.state === "running" ? short(t.lease_owner) : "–"),
        el("td", {}, t.error ? t.error.slice(0, 60) : metrics(t.progress)),
        el("td", {}, age(t.created_at)),
      );
      row.addEventListener("click", () => { location.hash = `#/tasks/${t.id}`; });
      return row;
    }));
  }

  async function loadTasks(signal) {
    const params = new URLSearchParams({ limit: String(MAX_ROWS) });
    if ($("#filter-state").value) params.set("state", $("#filter-state").value);
    if ($("#filter-kind").value) params.set("kind", $("#filter-kind").value);
    const page = await getJSON(`/api/v1/tasks?${params}`, signal);
    ui.tasks = new Map(page.tasks.map((t) => [t.id, t]));
    renderTasks();
  }

  async function showOverview(signal) {
    // What an earlier visit left in the tables is stale: show nothing rather than an old state.
    $("#nodes tbody").replaceChildren();
    $("#tasks tbody").replaceChildren();
    $("#cluster").replaceChildren();
    $("#task-count").textContent = "loading…";
    const [cluster, nodes] = await Promise.all([getJSON("/api/v1/cluster", signal), getJSON("/api/v1/nodes", signal)]);
    ui.cluster = cluster; ui.nodes = nodes.nodes;
    renderSwarm();
    await loadTasks(signal);
    const refresh = setInterval(() => loadTasks(signal).catch(() => {}), REFRESH_MS);
    signal.addEventListener("abort", () => clearInterval(refresh));
    follow("/api/v1/events", signal, (event, data) => {
      if (event === "swarm") {
        ui.cluster = data.cluster; ui.nodes = data.nodes;
        renderSwarm();
      } else if (event === "task") {
        ui.tasks.set(data.id, { ...(ui.tasks.get(data.id) || {}), ...data });
        renderTasks();
      }
    });
  }
  for (const sel of ["#filter-state", "#filter-kind"]) {
    $(sel).addEventListener("change", () => { if (ui.page) loadTasks(ui.page.signal).catch(() => {}); });
  }

  // --- one task ---

  function makeCharts() {
    const opts = (series, el) => ({
      width: el.clientWidth || 520, height: 240, scales: { x: { time: false } }, legend: { live: false },
      axes: [{ label: "epoch" }, {}],
      series: [{ label: "epoch" }, ...series],
    });
    const lossEl = $("#chart-loss"), accEl = $("#chart-acc");
    lossEl.replaceChildren(); accEl.replaceChildren();
    return {
      loss: new uPlot(opts([
        { label: "train loss", stroke: "#1f5fb3", width: 2 },
        { label: "test loss", stroke: "#d9822b", width: 2, dash: [6, 4] },
      ], lossEl), [[], [], []], lossEl),
      acc: new uPlot(opts([
        { label: "train accuracy", stroke: "#1f7a3e", width: 2 },
        { label: "test accuracy", stroke: "#8e44ad", width: 2, dash: [6, 4] },
      ], accEl), [[], [], []], accEl),
    };
  }

  function drawSeries(points) {
    const withEpoch = points.filter((p) => typeof p.epoch === "number");
    const col = (k) => withEpoch.map((p) => (typeof p[k] === "number" ? p[k] : null));
    const x = withEpoch.map((p) => p.epoch);
    ui.charts.loss.setData([x, col("loss"), col("test_loss")]);
    ui.charts.acc.setData([x, col("accuracy"), col("test_accuracy")]);
    $("#chart-loss").dataset.points = String(x.length);
    $("#chart-acc").dataset.points = String(x.length);
  }

  function renderTask(t) {
    $("#task-id").textContent = t.id;
    $("#task-kind").textContent = t.kind;
    $("#task-charts").hidden = t.kind === "sweep"; // a sweep has no curve of its own: its trials do
    const state = $("#task-state");
    state.textContent = t.state + (t.cancel_requested && !["succeeded", "failed", "cancelled"].includes(t.state) ? " (cancelling)" : "");
    state.className = `state-${t.state}`;
    $("#task-attempts").textContent = `${t.attempts}/${t.max_attempts}`;
    $("#task-owner").textContent = t.owner;
    $("#task-node").textContent = t.lease_owner ? short(t.lease_owner) : "–";
    $("#task-progress").textContent = metrics(t.progress);
    $("#task-error").textContent = t.error || "";
    $("#task-cancel").hidden = ["succeeded", "failed", "cancelled"].includes(t.state);
    if (t.spec) {
      // A data-parallel group: the ranks asked for, and those it runs with once placed.
      const asked = t.spec.workers || 1, running = (t.progress || {}).workers;
      $("#task-group").hidden = asked <= 1;
      $("#task-workers").textContent = running && running !== asked ? `${running} of ${asked}` : String(asked);
    }
    $("#task-parent").hidden = !t.parent;
    if (t.parent) {
      $("#task-parent-link").textContent = short(t.parent);
      $("#task-parent-link").href = `#/tasks/${t.parent}`;
    }
    if (t.result !== undefined) {
      const result = t.result ? { ...t.result } : null;
      if (result && Array.isArray(result.epochs)) result.epochs = `[${result.epochs.length} epochs, drawn above]`;
      if (result && Array.isArray(result.trials)) result.trials = `[${result.trials.length} trials, listed above]`;
      $("#task-result").textContent = result ? JSON.stringify(result, null, 2) : "–";
    }
    if (t.spec) $("#task-spec").textContent = JSON.stringify(t.spec, null, 2);
    if (t.artifacts) {
      $("#task-artifacts").replaceChildren(...(t.artifacts.length ? t.artifacts.map((name) => {
        const b = el("button", { type: "button", "data-artifact": name }, `Download ${name}`);
        b.addEventListener("click", () => download(t.id, name).catch((e) => { $("#task-error").textContent = e.message; }));
        return el("li", {}, b);
      }) : [el("li", { class: "muted" }, "none")]));
    }
  }

  async function download(taskId, name) {
    const blob = await (await api(`/api/v1/tasks/${taskId}/artifacts/${encodeURIComponent(name)}`)).blob();
    const a = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  function renderTrials(sweep, trials) {
    // The sweep's result, once there, says where each trial was stopped; until then, their live state.
    const rows = new Map((((sweep.result || {}).trials) || []).map((r) => [r.task_id, r]));
    $("#trials tbody").replaceChildren(...trials.map((t) => {
      const row = el("tr", { class: "link", "data-task-id": t.id, "data-state": t.state },
        el("td", { class: "mono", title: t.id }, short(t.id)),
        el("td", { class: `state-${t.state}` }, t.state),
        el("td", { class: "mono" }, JSON.stringify((rows.get(t.id) || {}).params || {})),
        el("td", {}, t.error ? t.error.slice(0, 60) : metrics(t.progress)),
        el("td", {}, String((rows.get(t.id) || {}).stopped_at_epoch ?? "–")),
      );
      row.addEventListener("click", () => { location.hash = `#/tasks/${t.id}`; });
      return row;
    }));
    const best = (sweep.result || {}).best;
    $("#trials-best").textContent = best
      ? `best: trial ${short(best.task_id)}, ${sweep.result.metric} ${best.metric}, ${JSON.stringify(best.params)}` : "";
  }

  async function showTask(id, signal) {
    ui.charts = makeCharts();
    $("#task-result").textContent = "–";
    $("#task-trials").hidden = true;
    const refreshTrials = async (sweep) => {
      if (sweep.kind !== "sweep") return;
      const page = await getJSON(`/api/v1/tasks?parent=${encodeURIComponent(id)}&limit=500`, signal);
      $("#task-trials").hidden = false;
      renderTrials(sweep, page.tasks.sort((a, b) => a.created_at - b.created_at));
    };
    let lastEpoch = -1;
    const refreshSeries = async () => {
      const series = await getJSON(`/api/v1/tasks/${id}/progress`, signal);
      drawSeries(series.points);
    };
    const first = await getJSON(`/api/v1/tasks/${id}`, signal);
    renderTask(first);
    await refreshSeries();
    await refreshTrials(first);
    if (first.kind === "sweep") {
      const poll = setInterval(() => getJSON(`/api/v1/tasks/${id}`, signal).then(refreshTrials).catch(() => {}), TRIALS_MS);
      signal.addEventListener("abort", () => clearInterval(poll));
    }
    $("#task-cancel").onclick = async () => {
      try { renderTask(await (await api(`/api/v1/tasks/${id}`, { method: "DELETE" })).json()); }
      catch (e) { $("#task-error").textContent = e.message; }
    };
    follow(`/api/v1/tasks/${id}/events`, signal, (event, t) => {
      if (event !== "task") return;
      renderTask(t);
      const epoch = (t.progress || {}).epoch;
      if (epoch != null && epoch !== lastEpoch) {
        lastEpoch = epoch;
        refreshSeries().catch(() => {});
      }
    }, true);
  }

  // --- routing: #/ and #/tasks/ID ---

  function route() {
    if (ui.page) ui.page.abort();
    ui.page = new AbortController();
    const signal = ui.page.signal;
    for (const s of ["#login", "#overview", "#task"]) $(s).hidden = true;
    $("#logout").hidden = !ui.token;
    if (!ui.token) {
      setConn(false, "signed out");
      $("#login").hidden = false;
      $("#login-token").focus();
      return;
    }
    const m = location.hash.match(/^#\/tasks\/([0-9a-fA-F-]{36})$/);
    const view = m ? showTask(m[1], signal) : showOverview(signal);
    $(m ? "#task" : "#overview").hidden = false;
    view.catch((e) => {
      if (signal.aborted || e instanceof Unauthorized) return;
      $(m ? "#task-error" : "#task-count").textContent = e.message;
    });
  }

  window.addEventListener("hashchange", route);
  route();
})();
