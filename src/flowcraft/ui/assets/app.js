// The flowcraft run view: a runs list and a live run page, drawn from /api (no libraries).
// Every value from a run is inserted as text, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 150, NODE_H = 48;
const STATES = ["pending", "running", "done", "skipped", "failed", "awaiting"];
let config = { allowActions: false };
let timer = null;
let stream = null;

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
                                      : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function when(seconds) {
  return seconds == null ? "—" : new Date(seconds * 1000).toLocaleString();
}

function duration(seconds) {
  if (seconds == null) return "—";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  return m < 60 ? `${m} min ${s} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function badge(status) {
  return el("span", { class: `badge ${status}`, "data-status": status }, status);
}

function stopLive() {
  if (timer) clearTimeout(timer);
  if (stream) stream.close();
  timer = stream = null;
}

// -- runs page ----------------------------------------------------------------------------------

async function runsPage(main) {
  const params = new URLSearchParams(location.search);
  const status = el("select", { id: "status-filter" },
    el("option", { value: "" }, "any status"),
    ["running", "awaiting", "completed", "failed", "cancelled"].map(
      (s) => el("option", { value: s, selected: params.get("status") === s }, s)));
  const blueprint = el("input", { id: "blueprint-filter", placeholder: "blueprint id",
                                  value: params.get("blueprint") || "" });
  const apply = (cursor) => {
    const next = new URLSearchParams();
    if (status.value) next.set("status", status.value);
    if (blueprint.value.trim()) next.set("blueprint", blueprint.value.trim());
    if (cursor) next.set("cursor", cursor);
    history.pushState(null, "", `/?${next}`);
    route();
  };
  status.addEventListener("change", () => apply());
  blueprint.addEventListener("keydown", (e) => { if (e.key === "Enter") apply(); });
  const body = el("tbody");
  const pager = el("div", { class: "pager" });
  main.replaceChildren(
    el("div", { class: "filters" }, status, blueprint, el("button", { onclick: () => apply() }, "Filter")),
    el("table", { id: "runs" }, el("thead", {}, el("tr", {},
      ["Run", "Status", "Blueprint", "Started", "Last update", "Duration"].map((h) => el("th", {}, h)))), body),
    pager);
  const query = new URLSearchParams(params);
  query.set("limit", "25");
  const refresh = async () => {
    try {
      const page = await api(`/api/runs?${query}`);
      body.replaceChildren(...(page.runs.length ? page.runs.map((run) =>
        el("tr", { "data-run-id": run.run_id },
          el("td", {}, el("a", { href: `/runs/${encodeURIComponent(run.run_id)}` }, run.run_id)),
          el("td", {}, badge(run.status)), el("td", {}, run.blueprint_id || "—"),
          el("td", {}, when(run.started_at)), el("td", {}, when(run.last_updated)),
          el("td", {}, duration(run.duration_seconds)))) :
        [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No runs match."))]));
      pager.replaceChildren(
        params.get("cursor") ? el("button", { onclick: () => apply(null) }, "« First page") : "",
        page.nextCursor ? el("button", { id: "next-page", onclick: () => apply(page.nextCursor) }, "Next page »") : "");
    } catch (error) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "error" }, error.message)));
    }
    timer = setTimeout(refresh, 2000);
  };
  refresh();
}

// -- run page -----------------------------------------------------------------------------------

function edgePath(a, b, back) {
  const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
  if (back) {  // a loop's way back: under both nodes
    const low = Math.max(a.y, b.y) + NODE_H + 28;
    return [`M ${a.x + NODE_W / 2} ${a.y + NODE_H} C ${a.x + NODE_W / 2} ${low}, ${b.x + NODE_W / 2} ${low}, ${b.x + NODE_W / 2} ${b.y + NODE_H}`,
            (a.x + b.x + NODE_W) / 2, low - 6];
  }
  const mid = (x1 + x2) / 2;
  return [`M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}`, mid, (y1 + y2) / 2 - 4];
}

function drawGraph(graph, onSelect) {
  const places = Object.fromEntries(graph.nodes.map((n) => [n.id, n]));
  const svg = el("svg:svg", { id: "graph", width: graph.width, height: graph.height + 40,
                              viewBox: `0 0 ${graph.width} ${graph.height + 40}` },
    el("svg:defs", {}, el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
                                          markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      el("svg:path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#6b737d" }))));
  for (const edge of graph.edges) {
    const [d, lx, ly] = edgePath(places[edge.source], places[edge.target], edge.back);
    svg.append(el("svg:g", { class: `edge${edge.back ? " back" : ""}`, "data-source": edge.source,
                             "data-target": edge.target },
      edge.label ? el("svg:title", {}, edge.label) : null,
      el("svg:path", { d, "marker-end": "url(#arrow)" }),
      edge.label ? el("svg:text", { x: lx, y: ly, "text-anchor": "middle" },
        edge.label.length > 26 ? `${edge.label.slice(0, 25)}…` : edge.label) : null));
  }
  for (const node of graph.nodes) {
    const label = node.id.length > 18 ? `${node.id.slice(0, 17)}…` : node.id;
    svg.append(el("svg:g", { class: "node", "data-node-id": node.id, "data-state": "pending",
                             transform: `translate(${node.x},${node.y})`, onclick: () => onSelect(node.id) },
      el("svg:title", {}, node.id),
      el("svg:rect", { width: NODE_W, height: NODE_H }),
      el("svg:text", { x: 10, y: 20 }, label),
      el("svg:text", { x: 10, y: 37, class: "uses" }, node.uses || "")));
  }
  return svg;
}

function pretty(value) {
  return value === undefined || value === null ? "—" : JSON.stringify(value, null, 2);
}

function nodeDetails(node) {
  if (!node) return [el("p", { class: "muted" }, "Click a node to see its input, output and error.")];
  return [
    el("h2", {}, node.id, " ", el("span", { class: `badge ${node.state === "done" ? "completed" : node.state}` }, node.state)),
    el("div", { class: "muted" }, `uses ${node.uses || "?"}`,
       node.iterations > 1 ? ` · ${node.iterations} iterations` : "",
       node.attempts != null ? ` · ${node.attempts} attempt(s)` : "",
       node.action ? ` · action ${node.action}` : ""),
    node.lease_owner ? el("div", { class: "muted" }, `running on ${node.lease_owner}`) : null,
    node.error ? [el("h3", {}, "Error"), el("pre", { class: "error", id: "node-error" }, node.error)] : null,
    el("h3", {}, "Input"), el("pre", { id: "node-input" }, pretty(node.input)),
    el("h3", {}, "Output"), el("pre", { id: "node-output" }, pretty(node.output)),
    node.awaiting ? [el("h3", {}, "Awaiting"), el("pre", {}, pretty(node.awaiting))] : null,
  ];
}

async function runPage(main, runId) {
  let view = null, selected = null, svg = null;
  const summary = el("div", { class: "summary" });
  const errors = el("div", { class: "errors", id: "errors", hidden: true });
  const graphBox = el("div", { class: "graph" });
  const details = el("div", { class: "details", id: "details" }, nodeDetails(null));
  const actions = el("div", { class: "actions", id: "actions" });
  const legend = el("div", { class: "legend" }, STATES.map((s) =>
    el("span", {}, el("i", { style: `background: var(--${s})` }), s)));
  main.replaceChildren(summary, errors, legend, el("div", { class: "layout" }, graphBox,
                       el("div", {}, details, actions)));
  const select = (id) => { selected = id; render(); };

  function render() {
    summary.replaceChildren(el("h1", {}, view.runId), badge(view.status),
      el("span", {}, "blueprint ", el("b", {}, view.blueprintId || "?")),
      el("span", { class: "muted" }, `started ${when(view.startedAt)}`),
      el("span", { class: "muted" }, `updated ${when(view.lastUpdated)}`),
      el("span", { class: "muted", id: "duration" }, `duration ${duration(view.durationSeconds)}`));
    errors.hidden = !view.errors.length;
    errors.replaceChildren(...view.errors.map((e) => el("div", {}, e)));
    // Redraw only when the graph itself changed (a dynamic node), not when an edge was taken.
    const shape = JSON.stringify([view.graph.nodes, view.graph.edges.map((e) => [e.source, e.target, e.label])]);
    if (!svg || svg.dataset.shape !== shape) {
      svg = drawGraph(view.graph, select);
      svg.dataset.shape = shape;
      graphBox.replaceChildren(svg);
    }
    for (const g of svg.querySelectorAll(".node")) {
      const node = view.nodes[g.dataset.nodeId];
      g.setAttribute("data-state", node ? node.state : "pending");
      g.classList.toggle("selected", g.dataset.nodeId === selected);
    }
    for (const g of svg.querySelectorAll(".edge")) {
      const edge = view.graph.edges.find((e) => e.source === g.dataset.source && e.target === g.dataset.target);
      g.classList.toggle("taken", Boolean(edge && edge.taken));
    }
    details.replaceChildren(el("div", {}, nodeDetails(selected && view.nodes[selected])));
    renderActions();
  }

  function renderActions() {
    if (!config.allowActions) { actions.replaceChildren(); return; }
    if (actions.dataset.status === view.status && actions.dataset.awaiting === view.awaitingNodeIds.join()) return;
    actions.dataset.status = view.status;
    actions.dataset.awaiting = view.awaitingNodeIds.join();
    const message = el("div", { id: "action-message", class: "muted" });
    const post = async (path, body) => {
      try {
        await api(`/api/runs/${encodeURIComponent(runId)}/${path}`, {
          method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
        message.textContent = `${path} sent`;
      } catch (error) { message.textContent = error.message; }
    };
    const live = view.status === "running" || view.status === "awaiting";
    const parts = [];
    if (live) {
      parts.push(el("button", { id: "cancel", class: "danger", onclick: () => {
        if (confirm(`Cancel run ${runId}?`)) post("cancel", { reason: "cancelled from the run view" });
      } }, "Cancel run"));
    }
    if (view.awaitingNodeIds.length) {
      const node = el("select", { id: "resume-node" }, view.awaitingNodeIds.map((id) => el("option", { value: id }, id)));
      const action = el("input", { id: "resume-action", placeholder: "action (optional)" });
      const data = el("textarea", { id: "resume-data", rows: 3, placeholder: "output as JSON (optional)" });
      parts.push(el("div", { class: "resume" }, el("b", {}, "Resume "), node, " ", action, data,
        el("button", { id: "resume", onclick: () => {
          let value = null;
          try { value = data.value.trim() ? JSON.parse(data.value) : null; }
          catch (error) { message.textContent = `output is not JSON: ${error.message}`; return; }
          post("resume", { nodeId: node.value, action: action.value.trim() || null, data: value });
        } }, "Resume")));
    }
    actions.replaceChildren(...parts, message);
  }

  const accept = (next) => {
    if (!next) { main.replaceChildren(el("p", { class: "error" }, `No run '${runId}'.`)); stopLive(); return; }
    view = next;
    render();
  };
  const poll = async () => {  // used when the browser cannot keep an event stream open
    try { accept(await api(`/api/runs/${encodeURIComponent(runId)}`)); } catch (error) { /* retry */ }
    timer = setTimeout(poll, 2000);
  };
  try { accept(await api(`/api/runs/${encodeURIComponent(runId)}`)); }
  catch (error) { main.replaceChildren(el("p", { class: "error" }, error.message)); return; }
  if (window.EventSource) {
    stream = new EventSource(`/api/runs/${encodeURIComponent(runId)}/events`);
    stream.addEventListener("run", (event) => accept(JSON.parse(event.data)));
    stream.onerror = () => { if (stream && stream.readyState === EventSource.CLOSED) { stream = null; poll(); } };
  } else {
    poll();
  }
}

// -- routing ------------------------------------------------------------------------------------

async function route() {
  stopLive();
  const main = document.getElementById("app");
  const match = location.pathname.match(/^\/runs\/(.+)$/);
  if (match) await runPage(main, decodeURIComponent(match[1]));
  else await runsPage(main);
}

window.addEventListener("popstate", route);
api("/api/config").then((c) => { config = c; }).catch(() => {}).finally(route);
