// Alerts page: open incidents, an entity's recent score vs threshold, observed vs reconstructed features.
// Plain JS + inline SVG; no build step, no network beyond this server.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, parent) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
  if (parent) parent.appendChild(n);
  return n;
}

function text(parent, x, y, s, anchor) {
  const t = el("text", { x, y, "text-anchor": anchor || "start" }, parent);
  t.textContent = s;
  return t;
}

function fmt(v) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  return a >= 1000 || (a > 0 && a < 0.01) ? v.toExponential(2) : v.toFixed(a >= 100 ? 0 : 2);
}

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

function renderIncidents(items) {
  const body = document.querySelector("#incidents tbody");
  body.innerHTML = "";
  document.getElementById("no-incidents").hidden = items.length > 0;
  for (const inc of items) {
    const tr = document.createElement("tr");
    tr.dataset.id = inc.id;
    const cells = [inc.id, inc.stream, inc.entity_id, null, (inc.opened_at || "").slice(0, 19).replace("T", " "),
                   inc.alert_count, fmt(inc.peak_score) + " / " + fmt(inc.peak_threshold)];
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      if (i === 3) {
        const b = document.createElement("span");
        b.className = "sev sev-" + inc.severity;
        b.textContent = inc.severity;
        td.appendChild(b);
      } else td.textContent = c;
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => select(inc));
    body.appendChild(tr);
  }
}

function plotScores(container, samples, incident) {
  container.innerHTML = "";
  const W = 640, H = 260, L = 56, R = 12, T = 10, B = 30;
  const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" }, container);
  if (!samples.length) {
    text(svg, W / 2, H / 2, "no recent scores recorded for this entity", "middle");
    return;
  }
  const ts = samples.map(s => Date.parse(s.event_time));
  const vals = samples.flatMap(s => [s.score, s.threshold]).filter(v => v > 0);
  let lo = Math.min(...vals), hi = Math.max(...vals);
  const log = hi / Math.max(lo, 1e-12) > 50;  // wide range: log scale
  const f = log ? v => Math.log10(Math.max(v, lo)) : v => v;
  let y0 = f(log ? lo : Math.min(0, lo)), y1 = f(hi);
  if (y1 === y0) { y1 += 1; }
  y1 += (y1 - y0) * 0.05;
  let t0 = Math.min(...ts), t1 = Math.max(...ts);
  if (t1 === t0) { t0 -= 1000; t1 += 1000; }
  const X = t => L + (t - t0) / (t1 - t0) * (W - L - R);
  const Y = v => T + (1 - (f(v) - y0) / (y1 - y0)) * (H - T - B);
  // axes + grid
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#cbd5e1" }, svg);
  el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#cbd5e1" }, svg);
  for (let i = 0; i <= 4; i++) {
    const fv = y0 + (y1 - y0) * i / 4, v = log ? Math.pow(10, fv) : fv, y = Y(v);
    el("line", { x1: L, y1: y, x2: W - R, y2: y, stroke: "#eef1f5" }, svg);
    text(svg, L - 6, y + 4, fmt(v), "end");
  }
  text(svg, L, H - 10, new Date(t0).toISOString().slice(0, 19).replace("T", " "));
  text(svg, W - R, H - 10, new Date(t1).toISOString().slice(0, 19).replace("T", " "), "end");
  if (log) text(svg, L + 4, T + 10, "log scale");
  const line = (key) => samples.map((s, i) => (i ? "L" : "M") + X(ts[i]).toFixed(1) + "," + Y(s[key]).toFixed(1)).join("");
  el("path", { d: line("threshold"), fill: "none", stroke: "#dc2626", "stroke-width": 1.5,
               "stroke-dasharray": "5 3", class: "threshold" }, svg);
  el("path", { d: line("score"), fill: "none", stroke: "#2563eb", "stroke-width": 1.8, class: "score" }, svg);
  samples.forEach((s, i) => {
    if (s.is_anomaly) el("circle", { cx: X(ts[i]), cy: Y(s.score), r: 3.5, fill: "#dc2626", class: "anomaly" }, svg);
  });
  if (incident && incident.resolved_at) {
    const x = X(Date.parse(incident.resolved_at));
    el("line", { x1: x, y1: T, x2: x, y2: H - B, stroke: "#16a34a", "stroke-dasharray": "2 2" }, svg);
    text(svg, x + 3, T + 10, "resolved");
  }
}

function plotFeatures(container, alert) {
  container.innerHTML = "";
  const feats = (alert && alert.top_features) || [];
  const W = 640, rowH = 34, L = 170, R = 70, H = Math.max(40, feats.length * rowH + 10);
  const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" }, container);
  if (!feats.length) { text(svg, 10, 24, "no feature attribution for this incident"); return; }
  feats.forEach((f, i) => {
    const m = Math.max(Math.abs(f.observed), Math.abs(f.reconstructed), 1e-12);  // per-feature scale
    const y = 6 + i * rowH, w = W - L - R;
    text(svg, L - 8, y + 16, f.feature, "end");
    el("rect", { x: L, y: y + 2, width: Math.abs(f.observed) / m * w, height: 11, fill: "#0f766e",
                 class: "bar observed" }, svg);
    el("rect", { x: L, y: y + 15, width: Math.abs(f.reconstructed) / m * w, height: 11, fill: "#a78bfa",
                 class: "bar reconstructed" }, svg);
    text(svg, W - R + 6, y + 11, fmt(f.observed));
    text(svg, W - R + 6, y + 25, fmt(f.reconstructed));
  });
}

async function select(inc) {
  document.querySelectorAll("#incidents tbody tr").forEach(tr =>
    tr.classList.toggle("selected", tr.dataset.id === String(inc.id)));
  document.getElementById("detail-title").textContent =
    `incident #${inc.id}: ${inc.stream} / ${inc.entity_id}, ${inc.alert_count} alerts, ${inc.severity}`;
  const [detail, scores] = await Promise.all([
    getJSON(`api/incidents/${inc.id}`),
    getJSON(`api/entities/${encodeURIComponent(inc.entity_id)}/scores?stream=${encodeURIComponent(inc.stream)}`),
  ]);
  plotScores(document.getElementById("score-plot"), scores.samples, detail.incident);
  plotFeatures(document.getElementById("features"), detail.peak_alert);
  document.body.dataset.selected = String(inc.id);
}

// Live drift of each stream's model (served by `pipeline run --api-port` only): one row per figure.
function renderDrift(data) {
  const body = document.querySelector("#drift tbody");
  body.innerHTML = "";
  const rows = [];
  for (const s of data.streams) {
    rows.push([s.stream, s.model_version, "warming share", s.live_entities, null, fmt(100 * s.warming_share) + " %"]);
    if (s.score) rows.push([s.stream, s.model_version, "score", s.score.n, s.score.psi, s.score.reading]);
    for (const c of s.inputs) rows.push([s.stream, s.model_version, "input " + c.channel, c.n, c.psi, c.reading]);
  }
  for (const r of rows) {
    const tr = document.createElement("tr");
    r.forEach((c, i) => {
      const td = document.createElement("td");
      td.textContent = i === 4 ? fmt(c) : c;
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
  const none = document.getElementById("no-drift");
  none.hidden = rows.length > 0;
  none.textContent = data.live ? "No scored events yet." : data.note;
}

async function loadDrift() {
  try {
    renderDrift(await getJSON("api/drift"));
  } catch (e) {
    renderDrift({ live: false, streams: [], note: "drift unavailable: " + e.message });
  }
}

async function load() {
  try {
    const items = await getJSON("api/incidents?status=open&limit=200");
    document.getElementById("summary").textContent =
      `${items.length} open incident${items.length === 1 ? "" : "s"} · refreshed ${new Date().toLocaleTimeString()}`;
    renderIncidents(items);
    const keep = document.body.dataset.selected;
    const pick = items.find(i => String(i.id) === keep) || items[0];
    if (pick) await select(pick);
    document.body.dataset.state = "ready";
  } catch (e) {
    document.getElementById("summary").textContent = "error: " + e.message;
    document.body.dataset.state = "error";
  }
}

load();
loadDrift();
setInterval(load, 15000);
setInterval(loadDrift, 15000);
