// segmesh status page. Read-only: every call is an OperatorService read over
// Connect's JSON protocol with the operator token from sessionStorage; the
// controller authorises each one. Everything the controller returns (node
// names, errors an agent reported) is untrusted text: it only ever enters the
// page through textContent and attribute values, never as markup.
"use strict";

const TOKEN_KEY = "segmesh.operator-token";
const REFRESH_MS = 5000;
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

// el builds an element: attrs are set as attributes, children appended (strings
// become text nodes).
function el(tag, attrs, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null && v !== false) e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

class RPCError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// call posts req to OperatorService/method and returns the decoded response.
async function call(method, req) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  let resp;
  try {
    resp = await fetch("/segmesh.v1.OperatorService/" + method, {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        "Connect-Protocol-Version": "1",
        "Authorization": "Bearer " + token,
      },
      body: JSON.stringify(req || {}),
      credentials: "omit",
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
  } catch (e) {
    throw new RPCError("unavailable", "cannot reach the controller: " + e.message);
  }
  if (resp.ok) return resp.json();
  let body = {};
  try { body = await resp.json(); } catch (_) { /* not a Connect error body */ }
  throw new RPCError(body.code || "unknown", body.message || ("HTTP " + resp.status));
}

const num = (v) => Number(v || 0);

function ago(unix) {
  const t = num(unix);
  if (!t) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - t));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  if (s < 86400) return Math.floor(s / 3600) + "h ago";
  return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 16) + " UTC";
}

const pill = (text, kind) => el("span", { class: "pill " + (kind || "") }, text);

// --- summary and nodes -------------------------------------------------------

function renderStatus(st) {
  const serving = num(st.servingRevision), latest = num(st.policyRevision);
  $("revision").textContent = serving ? "revision " + serving : "default deny";
  $("revision-note").textContent = latest !== serving ? "latest stored: revision " + latest : (serving ? "latest stored revision" : "no policy applied yet");
  const active = num(st.nodesActive), online = num(st.nodesOnline), current = num(st.nodesCurrent);
  $("progress-text").textContent = current + " / " + active + " active nodes enforce it";
  $("progress-bar").style.width = (active ? Math.round(100 * current / active) : 0) + "%";
  $("progress-note").textContent = online + " online";
  const banner = $("banner");
  banner.hidden = !st.policyError;
  banner.textContent = st.policyError || "";

  const nodes = st.nodes || [];
  $("nodes-count").textContent = "(" + nodes.length + ")";
  const rows = nodes.map((n) => {
    const revoked = n.state === "revoked";
    const isCurrent = !!n.appliedHash && n.appliedHash === n.desiredHash;
    let cur;
    if (revoked) cur = pill("–");
    else if (isCurrent) cur = pill("current", "ok");
    else cur = pill("pending", "warn");
    return el("tr", { "data-node": n.name },
      el("td", {}, el("strong", {}, n.name)),
      el("td", {}, pill(n.state || "active", revoked ? "bad" : "ok")),
      el("td", {}, revoked ? "–" : (n.online ? pill("online", "ok") : pill("offline", "bad"))),
      el("td", { class: "mono" }, num(n.appliedRevision) + " / " + num(n.desiredRevision)),
      el("td", {}, cur),
      el("td", {}, n.dataplane || "–"),
      el("td", { class: "mono" }, n.endpoint || "–"),
      el("td", {}, ago(n.lastSeenUnix)),
      el("td", { class: "err" }, n.error || ""));
  });
  $("nodes").tBodies[0].replaceChildren(...rows);
}

// --- denied flows ------------------------------------------------------------

function endpointCell(addr, node, segs) {
  const parts = [el("span", { class: "mono" }, addr)];
  if (node) parts.push(" ", el("span", {}, node));
  if (segs && segs.length) parts.push(" ", el("span", { class: "muted" }, "[" + segs.join(", ") + "]"));
  return el("td", { class: "wrap" }, ...parts);
}

function renderFlows(resp, err) {
  const note = $("flows-note");
  const body = $("flows").tBodies[0];
  if (err) {
    note.hidden = false;
    note.textContent = err.code === "unimplemented"
      ? "Denied flows are not available on this controller."
      : "Denied flows not available: " + err.message;
    $("flows-count").textContent = "";
    $("flows").hidden = true;
    body.replaceChildren();
    return;
  }
  const flows = resp.flows || [];
  $("flows-count").textContent = "(" + flows.length + ")";
  $("flows").hidden = flows.length === 0;
  note.hidden = flows.length > 0 && !num(resp.dropped);
  note.textContent = flows.length ? num(resp.dropped) + " records not kept (the controller's log and the nodes' reports are bounded)" : "No denied flow reported.";
  body.replaceChildren(...flows.map((r) => {
    const f = r.flow || {};
    const packet = (f.protocol || "?") + (num(f.port) ? "/" + num(f.port) : "");
    const best = (r.closest || [])[0];
    const closest = best
      ? el("td", { class: "wrap" }, el("strong", {}, best.rule), " ", el("span", { class: "muted" }, (best.mismatches || []).join("; ")))
      : el("td", { class: "muted" }, "no rule comes close");
    return el("tr", {},
      el("td", {}, ago(f.lastSeenUnix)),
      el("td", {}, r.node),
      el("td", {}, f.direction || ""),
      endpointCell(f.source, r.sourceNode, r.sourceSegments),
      endpointCell(f.destination, r.destinationNode, r.destinationSegments),
      el("td", { class: "mono" }, packet),
      el("td", {}, num(f.packets)),
      closest);
  }));
}

// --- segment graph -----------------------------------------------------------

const NODE_R = 38;
const LOOP_REACH = 78; // how far a self-loop's control points lie beyond its circle
const LABEL_H = 15;

function short(s, n) { return s.length > n ? s.slice(0, n - 1) + "…" : s; }

// labelBox is the box a label of text centred at (x, y) takes, roughly.
function labelBox(x, y, text) {
  const w = 7 * text.length + 8;
  return { x0: x - w / 2, x1: x + w / 2, y0: y - LABEL_H / 2, y1: y + LABEL_H / 2 };
}

function boxesOverlap(a, b) { return a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1; }

function boxHitsCircle(b, c) {
  const dx = Math.max(b.x0 - c.x, 0, c.x - b.x1), dy = Math.max(b.y0 - c.y, 0, c.y - b.y1);
  return dx * dx + dy * dy < NODE_R * NODE_R;
}

// renderGraph draws the segments on a circle and one arrow per edge, each bent
// to its right so that a -> b and b -> a stay apart; a rule within a segment is
// a loop on the outside of the circle. Each label goes at the first point along
// its arrow where it covers no other label and no segment.
function renderGraph(g) {
  const svg = $("graph");
  const segs = g.segments || [], edges = g.edges || [];
  $("graph-count").textContent = "(" + segs.length + " segments, " + edges.length + " edges)";
  if (!segs.length) {
    svg.setAttribute("viewBox", "0 0 600 80");
    svg.setAttribute("width", 600);
    svg.setAttribute("height", 80);
    svg.replaceChildren(el("svg:text", { x: 300, y: 45, "text-anchor": "middle", class: "empty-note" }, "No segment: the policy in force allows nothing (default deny)."));
    return;
  }
  const R = segs.length <= 1 ? 0 : Math.max(165, Math.min(340, segs.length * 36));
  const pos = new Map();
  segs.forEach((s, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / segs.length;
    pos.set(s.segment, { x: R * Math.cos(a), y: R * Math.sin(a), a });
  });
  const circles = [...pos.values()];
  // extent collects the points the picture must hold.
  const extent = circles.flatMap((c) => [[c.x - NODE_R, c.y - NODE_R], [c.x + NODE_R, c.y + NODE_R]]);
  const placed = [];
  const place = (text, candidates) => {
    let at = candidates[0];
    for (const [x, y] of candidates) {
      const b = labelBox(x, y, text);
      if (!placed.some((p) => boxesOverlap(p, b)) && !circles.some((c) => boxHitsCircle(b, c))) {
        at = [x, y];
        break;
      }
    }
    const b = labelBox(at[0], at[1], text);
    placed.push(b);
    extent.push([b.x0, b.y0], [b.x1, b.y1]);
    return at;
  };

  const defs = el("svg:defs", {},
    el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      el("svg:path", { d: "M0,0 L10,5 L0,10 z", class: "arrow" })));
  const edgeLayer = el("svg:g", {});
  const nodeLayer = el("svg:g", {});
  const labelLayer = el("svg:g", {});
  const f = (v) => v.toFixed(1);
  for (const e of edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    const ports = (e.ports || []).join(" ");
    const text = short(ports, 30);
    const title = e.from + " → " + e.to + ": " + ports + "  (rules: " + (e.rules || []).join(", ") + ")";
    let d, lx, ly;
    if (e.from === e.to) {
      const ua = segs.length > 1 ? a.a : -Math.PI / 2;
      const p = (ang, r) => [a.x + r * Math.cos(ang), a.y + r * Math.sin(ang)];
      const [sx, sy] = p(ua - 0.45, NODE_R), [ex, ey] = p(ua + 0.45, NODE_R + 4);
      const [c1x, c1y] = p(ua - 0.6, NODE_R + LOOP_REACH), [c2x, c2y] = p(ua + 0.6, NODE_R + LOOP_REACH);
      d = `M${f(sx)},${f(sy)} C${f(c1x)},${f(c1y)} ${f(c2x)},${f(c2y)} ${f(ex)},${f(ey)}`;
      // A cubic reaches about 3/4 of the way to its control points.
      for (const da of [-0.5, 0, 0.5]) extent.push(p(ua + da, NODE_R + 0.75 * LOOP_REACH + 4));
      [lx, ly] = place(text, [p(ua, NODE_R + 0.75 * LOOP_REACH + 14), p(ua, NODE_R + LOOP_REACH + 14)]);
    } else {
      const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy);
      const bend = 52; // control point: the chord's midpoint moved to the right of a -> b
      const cx = (a.x + b.x) / 2 - (dy / len) * bend, cy = (a.y + b.y) / 2 + (dx / len) * bend;
      const toward = (p, r) => { const l = Math.hypot(cx - p.x, cy - p.y); return [p.x + (cx - p.x) * r / l, p.y + (cy - p.y) * r / l]; };
      const [sx, sy] = toward(a, NODE_R), [ex, ey] = toward(b, NODE_R + 4);
      d = `M${f(sx)},${f(sy)} Q${f(cx)},${f(cy)} ${f(ex)},${f(ey)}`;
      const at = (t) => [(1 - t) * (1 - t) * sx + 2 * (1 - t) * t * cx + t * t * ex, (1 - t) * (1 - t) * sy + 2 * (1 - t) * t * cy + t * t * ey];
      [lx, ly] = place(text, [0.5, 0.38, 0.62, 0.28, 0.72, 0.2, 0.8].map(at));
    }
    edgeLayer.append(el("svg:g", { class: "edge", "data-edge": e.from + "->" + e.to },
      el("svg:title", {}, title),
      el("svg:path", { d, "marker-end": "url(#arrow)" })));
    labelLayer.append(el("svg:text", { x: f(lx), y: f(ly + 4), "text-anchor": "middle", class: "label" }, el("svg:title", {}, title), text));
  }
  for (const s of segs) {
    const p = pos.get(s.segment);
    const external = s.kind === "external";
    const members = num(s.members);
    const cls = "seg" + (external ? " external" : "") + (!external && !members ? " empty" : "");
    nodeLayer.append(el("svg:g", { class: cls, "data-segment": s.segment },
      el("svg:title", {}, s.segment + (external ? " (external CIDRs)" : " (" + members + " nodes)")),
      el("svg:circle", { cx: f(p.x), cy: f(p.y), r: NODE_R }),
      el("svg:text", { x: f(p.x), y: f(p.y - 1), "text-anchor": "middle", class: s.segment.length > 7 ? "name long" : "name" }, short(s.segment, 11)),
      el("svg:text", { x: f(p.x), y: f(p.y + 15), "text-anchor": "middle", class: "members" },
        external ? "external" : members + (members === 1 ? " node" : " nodes"))));
  }
  // Drawn at its own size (1 unit = 1 px) so that text keeps its size.
  const m = 12;
  const x0 = Math.min(...extent.map((p) => p[0])) - m, x1 = Math.max(...extent.map((p) => p[0])) + m;
  const y0 = Math.min(...extent.map((p) => p[1])) - m, y1 = Math.max(...extent.map((p) => p[1])) + m;
  svg.setAttribute("viewBox", [x0, y0, x1 - x0, y1 - y0].map(f).join(" "));
  svg.setAttribute("width", f(x1 - x0));
  svg.setAttribute("height", f(y1 - y0));
  svg.replaceChildren(defs, edgeLayer, nodeLayer, labelLayer);
}

// --- life cycle --------------------------------------------------------------

let timer = null;
let inFlight = false;
let lastGraph = "";

function showLogin(message) {
  clearInterval(timer);
  timer = null;
  $("login").hidden = false;
  $("dashboard").hidden = true;
  $("signout").hidden = true;
  $("updated").textContent = "";
  const err = $("login-error");
  err.hidden = !message;
  err.textContent = message || "";
  document.body.dataset.state = "signed-out";
}

async function refresh() {
  if (inFlight || !sessionStorage.getItem(TOKEN_KEY)) return;
  inFlight = true;
  try {
    const [st, graph] = await Promise.all([call("Status"), call("GetSegmentGraph")]);
    let flows = null, flowsErr = null;
    try { flows = await call("ListDeniedFlows", { limit: 50 }); } catch (e) { flowsErr = e; }
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("signout").hidden = false;
    renderStatus(st);
    const gkey = JSON.stringify(graph);
    if (gkey !== lastGraph) {
      renderGraph(graph);
      lastGraph = gkey;
    }
    renderFlows(flows, flowsErr);
    $("updated").textContent = "updated " + new Date().toTimeString().slice(0, 8);
    document.body.dataset.state = "ready";
  } catch (e) {
    if (e.code === "unauthenticated" || e.code === "permission_denied") {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(e.message);
    } else {
      const banner = $("banner");
      banner.hidden = false;
      banner.textContent = e.message;
      $("updated").textContent = "refresh failed " + new Date().toTimeString().slice(0, 8);
      document.body.dataset.state = "error";
    }
  } finally {
    inFlight = false;
  }
}

function start() {
  document.body.dataset.state = "loading";
  lastGraph = "";
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    $("token").value = "";
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    start();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("");
  });
  if (sessionStorage.getItem(TOKEN_KEY)) start(); else showLogin("");
});
