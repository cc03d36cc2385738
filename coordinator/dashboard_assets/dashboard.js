// fedclip fleet dashboard: polls GET /api/fleet (read-only) and redraws. Plain JS, no build step;
// charts are uPlot (vendored, MIT). Data is written with textContent only, never as HTML, because
// agent ids, groups and rejection reasons come from the devices.
"use strict";

const params = new URLSearchParams(location.search);
const INTERVAL_MS = Math.max(500, Number(params.get("interval_ms")) || 2000);
const charts = {};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function setText(id, value) {
  document.getElementById(id).textContent = value === null || value === undefined ? "-" : String(value);
}

function fmtNum(x, digits = 3) {
  return typeof x === "number" ? x.toPrecision(digits) : "-";
}

function fmtPct(x) {
  return typeof x === "number" ? (100 * x).toFixed(1) + "%" : "-";
}

// The adapter an agent's inference uses (and the fleet's adapter its open-set gate sends unfamiliar
// images to, when a rollout delivered one beside it); with personal tuning on the device, its tuned
// copy and that copy's held-out accuracy beside the adapter's own, or how far the tuning has come.
function inUse(a) {
  const v = (a.adapter_version || "-") + (a.open_set_fallback ? " (fallback " + a.open_set_fallback + ")" : "");
  const p = a.tuning_progress;
  if (p && typeof p === "object") {  // of the adapter in use: the status contract says so
    return v + " (tuning on device: epoch " + p.epoch + " of " + p.epochs + ")";
  }
  const t = a.device_tuning;
  if (!t || typeof t !== "object") return v;
  return v + " + tuned on device (" + fmtPct(t.accuracy) + " vs " + fmtPct(t.accuracy_fleet) + ")";
}

function fmtBytes(n) {
  if (typeof n !== "number") return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function fmtSecs(s) {
  if (typeof s !== "number") return "-";
  return s < 1 ? (1000 * s).toFixed(0) + " ms" : s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}

function fmtTime(t) {
  return typeof t === "number" ? new Date(1000 * t).toLocaleTimeString() : "-";
}

// The few numbers worth a glance: accuracy before -> after local training (or plain accuracy) and
// the loss after; the full set is in /api/fleet.
function fmtMetrics(m) {
  m = m || {};
  const parts = [];
  if (typeof m.accuracy_before === "number" || typeof m.accuracy_after === "number") {
    parts.push("acc " + fmtPct(m.accuracy_before) + " → " + fmtPct(m.accuracy_after));
  } else if (typeof m.accuracy === "number") {
    parts.push("acc " + fmtPct(m.accuracy));
  }
  const loss = m.loss_after ?? m.loss;
  if (typeof loss === "number") parts.push("loss " + fmtNum(loss));
  const gain = fmtGain(m);
  if (gain) parts.push(gain);
  return parts.join(", ") || "-";
}

// The fleet's adapter against the agent's own of its last round (docs/agent.md, "Fleet gain"): in
// points, with the shares of agents it helped and cost where a round reports them.
function fmtGain(m) {
  if (typeof m.fleet_gain !== "number") return "";
  const pts = (m.fleet_gain >= 0 ? "+" : "") + (100 * m.fleet_gain).toFixed(1);
  const shares = typeof m.fleet_gain_helped === "number" && typeof m.fleet_gain_hurt === "number"
    ? ", " + fmtPct(m.fleet_gain_helped) + " helped, " + fmtPct(m.fleet_gain_hurt) + " hurt" : "";
  return "fleet gain " + pts + " pts" + shares;
}

function stateCell(state) {
  return el("td", state, "state-" + state);
}

// Replace a table body's rows; `rowFor(item)` returns a <tr>.
function fillTable(id, items, rowFor) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...items.map(rowFor));
}

function row(cells, attrs) {
  const tr = el("tr");
  for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  return tr;
}

// The accuracy series to plot: before/after local training when agents report them, else any accuracy.
function accuracyNames(rounds) {
  const names = new Set();
  for (const r of rounds) for (const k of Object.keys(r.metrics || {})) if (/acc/.test(k)) names.add(k);
  const pair = ["accuracy_before", "accuracy_after"].filter((k) => names.has(k));
  return pair.length ? pair : [...names].sort().slice(0, 3);
}

const COLORS = ["#8c96a0", "#1a7f37", "#0b62c4", "#c62828", "#9a6700"];

function chart(id, names, data, yLabel) {
  const box = document.getElementById(id);
  const width = Math.max(300, box.clientWidth || 360);
  const key = id + "|" + names.join(",");
  if (!charts[id] || charts[id].key !== key) {
    if (charts[id]) charts[id].plot.destroy();
    const opts = {
      width, height: 200,
      scales: { x: { time: false } },
      // rounds are whole numbers: integer ticks only
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, { label: yLabel, size: 60 }],
      series: [{ label: "round" }].concat(names.map((n, i) => ({
        label: n, stroke: COLORS[(i + (names.length === 2 ? 0 : 1)) % COLORS.length], width: 2,
        points: { show: true, size: 6 },
      }))),
    };
    charts[id] = { key, plot: new uPlot(opts, data, box) };
  } else {
    charts[id].plot.setData(data);
  }
  box.dataset.points = String(data[0].length);
}

function renderCharts(rounds) {
  const done = rounds.filter((r) => r.state === "aggregated");
  const xs = done.map((r) => r.round);
  const acc = accuracyNames(done);
  chart("chart-accuracy", acc, [xs, ...acc.map((n) => done.map((r) => r.metrics[n] ?? null))], "accuracy");
  const closed = rounds.filter((r) => r.closed_at);
  const cx = closed.map((r) => r.round);
  chart("chart-bytes", ["bytes in", "bytes out"],
    [cx, closed.map((r) => r.bytes_in), closed.map((r) => r.bytes_out)], "bytes");
  chart("chart-durations", ["round duration", "aggregation"],
    [cx, closed.map((r) => r.duration_s), closed.map((r) => r.aggregate_s)], "seconds");
  // above 0 the adapter the fleet sent beat what the devices had trained themselves (docs/agent.md)
  const gain = (r) => (typeof (r.metrics || {}).fleet_gain === "number" ? 100 * r.metrics.fleet_gain : null);
  chart("chart-gain", ["fleet gain"], [xs, done.map(gain)], "points");
}

function lineage(versions, head) {
  const byId = Object.fromEntries(versions.map((v) => [v.version, v]));
  const chain = [];
  for (let v = head; v && byId[v] && chain.length < 50; v = byId[v].parent) chain.push(v);
  return chain.join(" ← ") || "-";
}

function render(doc) {
  setText("fleet", doc.fleet);
  setText("bundle", (doc.bundle_id || "").slice(0, 12));
  setText("strategy", doc.strategy);
  setText("global-version", doc.global_version);
  const counts = doc.round_counts;
  setText("rounds-aggregated", counts.aggregated);
  setText("rounds-failed", counts.failed);
  setText("last-round", counts.last);
  setText("last-state", counts.last_state);
  setText("agents-online", doc.agents.filter((a) => a.online).length);
  setText("agents-known", doc.agents.length);

  fillTable("agents", doc.agents, (a) => {
    const online = el("td");
    online.append(el("span", null, "dot" + (a.online ? " on" : "")), document.createTextNode(a.online ? "yes" : "no"));
    const dev = a.device && typeof a.device === "object" ? Object.values(a.device).slice(0, 2).join(" ") : "-";
    return row([a.agent, online, (a.groups || []).join(", ") || "-", (a.bundle_id || "-").slice(0, 12),
      inUse(a), a.personal_version || "-", a.last_round, fmtMetrics(a.metrics), dev],
      { "data-agent": a.agent, "data-online": String(a.online) });
  });

  const rounds = doc.rounds;
  renderCharts(rounds);
  fillTable("rounds", rounds.slice(-30).reverse(), (r) => {
    const m = r.metrics || {};
    const before = m.accuracy_before ?? null, after = m.accuracy_after ?? m.accuracy ?? null;
    const gain = fmtGain(m);
    const accuracy = (before === null ? fmtPct(after) : fmtPct(before) + " → " + fmtPct(after))
      + (gain ? " (" + gain + ")" : "");
    const note = el("td", r.reason || (r.extended ? "deadline extended" : ""), "reason");
    return row([r.round, stateCell(r.state), r.updates + " / " + r.selected,
      accuracy, fmtSecs(r.duration_s), fmtSecs(r.aggregate_s),
      fmtBytes(r.bytes_in), fmtBytes(r.bytes_out), r.global_version || "-", note],
      { "data-round": String(r.round), "data-state": r.state });
  });

  setText("lineage", lineage(doc.versions, doc.global_version));
  fillTable("versions", doc.versions.slice().reverse().slice(0, 60), (v) =>
    row([v.version, v.parent || "-", v.round, v.scope, v.agent || "-", v.strategy, fmtMetrics(v.metrics)],
      { "data-version": v.version }));

  fillTable("rollouts", doc.rollouts, (r) => {
    const stages = (r.stages || []).map((s) => s.name + ": " + s.state + " (" + s.agents.length + ")").join("; ");
    const counts = {};
    for (const a of r.acks || []) counts[a.status] = (counts[a.status] || 0) + 1;
    const acks = Object.entries(counts).map(([k, n]) => k + " " + n).join(", ") || "-";
    return row([r.id, r.version, r.target, stateCell(r.state), stages || "-", acks, el("td", r.reason || "", "reason")],
      { "data-rollout": String(r.id), "data-state": r.state });
  });

  const rejected = Object.entries(doc.rejection_counts || {}).filter(([, n]) => n > 0);
  setText("rejection-counts", rejected.map(([k, n]) => k + " " + n).join(", ") || "none");
  fillTable("rejections", doc.rejections.slice(0, 30), (r) =>
    row([fmtTime(r.at), r.agent || "-", r.round, r.kind, el("td", r.reason, "reason")]));

  setText("updated", new Date().toLocaleTimeString());
  document.body.dataset.generatedAt = String(doc.generated_at);
}

async function poll() {
  const error = document.getElementById("error");
  const started = performance.now();
  let delay = INTERVAL_MS;
  try {
    const resp = await fetch("/api/fleet", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status + " " + (await resp.text()).trim());
    render(await resp.json());
    error.hidden = true;
  } catch (e) {
    // shown on the page, not thrown: a coordinator restart must not leave a dead dashboard
    error.textContent = "cannot read the fleet: " + e.message;
    error.hidden = false;
  } finally {
    // a large fleet's document takes a while to build: never spend more than a fifth of the time on it
    delay = Math.max(INTERVAL_MS, 5 * (performance.now() - started));
    setTimeout(poll, delay);
  }
}

poll();
