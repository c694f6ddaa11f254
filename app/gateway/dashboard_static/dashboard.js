"use strict";
// The operator dashboard: polls /v1/overview (app/overview.py) and redraws with Plotly.react,
// which updates the charts in place. Text from the log (names, reasons, details) goes into the
// page only through textContent, never as HTML.

const REFRESH_MS = 3000;
const PALETTE = ["#1c7ed6", "#f08c00", "#2f9e44", "#ae3ec9", "#e03131", "#0c8599", "#5c940d", "#d6336c", "#495057"];
const STATE_COLORS = {
  champion: "#2f9e44", challenger: "#1c7ed6", loaded: "#1971c2", ready: "#868e96",
  retired: "#adb5bd", superseded: "#ced4da", failed: "#e03131", rolled_back: "#f76707",
  up: "#2f9e44", starting: "#f59f00", down: "#e03131",  // processes
};
const EVENT_SYMBOLS = {
  ready: "circle-open", loaded: "circle", promoted: "star", retired: "x", rolled_back: "triangle-down", failed: "x-thin-open",
};
const CONFIG = {displaylogo: false, responsive: true};

// Read by tests/integration/test_dashboard.py, and handy in the browser console.
window.feedloopDashboard = {updates: 0, lastError: null, overview: null};

function baseLayout(extra) {
  return Object.assign({
    margin: {l: 50, r: 20, t: 30, b: 40},
    legend: {orientation: "h", x: 0, y: 1.02, yanchor: "bottom"},
    xaxis: {type: "date", title: {text: "event time (UTC)"}},
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    uirevision: "keep",  // keep the user's zoom across refreshes
  }, extra || {});
}

function noData(layout, hasData) {
  if (!hasData) {
    layout.annotations = [{text: "no data yet", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5,
                           font: {color: "#616e7c"}}];
  }
  return layout;
}

function colorFor(names) {
  const sorted = Array.from(new Set(names)).sort();
  return (name) => PALETTE[sorted.indexOf(name) % PALETTE.length];
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function fillTable(id, headers, rows) {
  const table = document.getElementById(id);
  table.replaceChildren();
  const head = el("tr");
  headers.forEach((h) => head.appendChild(el("th", h)));
  table.appendChild(head);
  if (!rows.length) {
    const row = el("tr");
    const cell = el("td", "none", "empty");
    cell.colSpan = headers.length;
    row.appendChild(cell);
    table.appendChild(row);
  }
  rows.forEach((cells) => {
    const row = el("tr");
    cells.forEach((cell) => row.appendChild(cell instanceof Node ? wrapCell(cell) : el("td", cell ?? "—",
      typeof cell === "number" ? "num" : undefined)));
    table.appendChild(row);
  });
}

function wrapCell(node) {
  const cell = el("td");
  cell.appendChild(node);
  return cell;
}

function badge(state) {
  const node = el("span", state, "state");
  node.style.background = STATE_COLORS[state] || "#495057";
  return node;
}

function fmt(value, digits) {
  return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
}

function sum(values) {
  return values.reduce((a, b) => a + b, 0);
}

// --- sections ----------------------------------------------------------------------------

function drawTiles(o) {
  const tiles = [
    ["events accepted", sum(Object.values(o.events_accepted))],
    ["interactions", o.events_accepted.interaction],
    ["feedback", o.events_accepted.feedback],
    ["dead letters", sum(Object.values(o.dead_letters))],
    ["examples", o.examples],
    ["champion", o.champion],
    ["challengers", o.challengers.join(", ") || "none"],
    ["router version", o.router ? o.router.version : "—"],
    ...(o.app_id ? [] : [
      ["batches", sum(Object.values(o.batches_by_status))],
      ["drift alarms", sum(Object.values(o.drift_alarms))],
      ["archive segments", o.segments],
    ]),
  ];
  const box = document.getElementById("tiles");
  box.replaceChildren();
  tiles.forEach(([label, value]) => {
    const tile = el("div", null, "tile");
    tile.appendChild(el("b", value));
    tile.appendChild(el("span", label));
    box.appendChild(tile);
  });
}

function drawAdapters(o) {
  const traces = [];
  // A thin line per adapter joins its lifecycle events; one marker trace per kind carries the legend.
  o.adapters.filter((a) => a.events.length).forEach((a) => {
    traces.push({type: "scatter", mode: "lines", x: a.events.map((e) => e.at), y: a.events.map(() => a.name),
                 line: {color: STATE_COLORS[a.state] || "#495057", width: 2}, hoverinfo: "skip", showlegend: false,
                 name: a.name});
  });
  Object.keys(EVENT_SYMBOLS).forEach((kind) => {
    const points = o.adapters.flatMap((a) => a.events.filter((e) => e.kind === kind).map((e) => [a, e]));
    if (!points.length) return;
    traces.push({type: "scatter", mode: "markers", name: kind, x: points.map(([, e]) => e.at),
                 y: points.map(([a]) => a.name), text: points.map(([, e]) => e.detail),
                 hovertemplate: `${kind}: %{y}<br>%{x}<br>%{text}<extra></extra>`,
                 marker: {symbol: EVENT_SYMBOLS[kind], size: 12, color: points.map(([a]) => STATE_COLORS[a.state])}});
  });
  const layout = noData(baseLayout({yaxis: {type: "category", automargin: true}, margin: {l: 10, r: 20, t: 30, b: 40}}),
                        traces.length > 0);
  Plotly.react("chart-adapters", traces, layout, CONFIG);
  fillTable("table-adapters", ["adapter", "state", "parent", "swap ms", "created", "reason"],
            o.adapters.map((a) => [a.name, badge(a.state), a.parent, a.swap_ms === null ? null : Number(a.swap_ms.toFixed(1)),
                                   a.created_at, a.reason]));
}

function drawTraffic(o, color) {
  const series = o.traffic_share;
  const traces = Object.entries(series.values).map(([arm, shares]) => ({
    type: "scatter", mode: "lines", stackgroup: "share", name: arm, x: series.times, y: shares,
    line: {color: color(arm), width: 1}, hovertemplate: `${arm}: %{y:.0%}<extra></extra>`,
  }));
  Plotly.react("chart-traffic", traces,
               noData(baseLayout({yaxis: {range: [0, 1], tickformat: ".0%", title: {text: "share of interactions"}}}),
                      traces.length > 0), CONFIG);
}

function drawReward(o, color) {
  const series = o.reward_mean;
  const traces = Object.entries(series.values).map(([arm, means]) => ({
    type: "scatter", mode: "lines+markers", name: arm, x: series.times, y: means, connectgaps: true,
    line: {color: color(arm)}, marker: {size: 4}, hovertemplate: `${arm}: %{y:.3f}<extra></extra>`,
  }));
  const shapes = o.recent_drift_alarms.map((alarm) => ({
    type: "line", xref: "x", yref: "paper", x0: alarm.detected_at, x1: alarm.detected_at, y0: 0, y1: 1,
    line: {color: "#e03131", width: 1, dash: "dot"},
  }));
  Plotly.react("chart-reward", traces,
               noData(baseLayout({shapes, yaxis: {range: [0, 1], title: {text: "mean combined reward"}}}),
                      traces.length > 0), CONFIG);
}

function drawAB(o, color) {
  const traces = [];
  o.experiments.filter((x) => x.times.length).forEach((x) => {
    const label = `${x.challenger} vs ${x.champion}`;
    const c = color(x.challenger);
    // Upper bound first, then the lower bound filled up to it: the band is the confidence sequence.
    // Only the points with bounds (both arms past ab_min_samples): Plotly's fill breaks on gaps.
    const bounded = x.times.map((_, i) => i).filter((i) => x.lowers[i] !== null && x.uppers[i] !== null);
    traces.push({type: "scatter", mode: "lines", name: `${label} upper`, x: bounded.map((i) => x.times[i]),
                 y: bounded.map((i) => x.uppers[i]), line: {width: 0, color: c}, showlegend: false, hoverinfo: "skip"});
    traces.push({type: "scatter", mode: "lines", name: `${label} lower`, x: bounded.map((i) => x.times[i]),
                 y: bounded.map((i) => x.lowers[i]), fill: "tonexty",
                 fillcolor: c + "33", line: {width: 0, color: c}, showlegend: false, hoverinfo: "skip"});
    traces.push({type: "scatter", mode: "lines", name: `lift ${label}`, x: x.times, y: x.lifts, line: {color: c},
                 customdata: x.lowers.map((lo, i) => [lo, x.uppers[i]]),
                 hovertemplate: "lift %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>"});
  });
  const layout = baseLayout({yaxis: {title: {text: "lift (reward)"}, zeroline: true, zerolinecolor: "#495057"}});
  Plotly.react("chart-ab", traces, noData(layout, traces.length > 0), CONFIG);
  fillTable("table-ab", ["challenger", "champion", "status", "n champion", "n challenger", "lift", "lower", "upper"],
            o.experiments.map((x) => [x.challenger, x.champion, x.status, x.n_champion, x.n_challenger,
                                      fmt(x.lift, 3), fmt(x.lower, 3), fmt(x.upper, 3)]));
}

function drawBatches(o) {
  const batches = o.recent_batches;
  const ids = batches.map((b) => b.batch_id);
  const strata = Array.from(new Set(batches.flatMap((b) => Object.keys(b.strata)))).sort();
  const channels = Array.from(new Set(batches.flatMap((b) => Object.keys(b.loss_weights)))).sort();
  const traces = strata.map((stratum) => ({
    type: "bar", name: stratum, x: ids, y: batches.map((b) => b.strata[stratum] || 0),
    hovertemplate: `${stratum}: %{y} records<extra></extra>`,
  }));
  channels.forEach((channel) => traces.push({
    type: "scatter", mode: "lines+markers", name: `weight ${channel}`, x: ids, yaxis: "y2",
    y: batches.map((b) => b.loss_weights[channel] ?? null), line: {dash: "dot"},
  }));
  const layout = baseLayout({
    barmode: "stack", xaxis: {type: "category", automargin: true},
    yaxis: {title: {text: "records"}}, yaxis2: {overlaying: "y", side: "right", range: [0, 1], title: {text: "weight"}},
  });
  Plotly.react("chart-batches", traces, noData(layout, batches.length > 0), CONFIG);
  fillTable("table-failed-batches", ["failed batch", "reason", "retry with"],
            o.failed_batches.map((b) => [b.batch_id, b.reason, `feedloop train --retry ${b.batch_id}`]));
}

function drawDeadLetters(o) {
  const reasons = Object.keys(o.dead_letters);
  const traces = reasons.length ? [{type: "bar", orientation: "h", name: "dead letters", y: reasons,
                                    x: reasons.map((r) => o.dead_letters[r]), marker: {color: "#e03131"}}] : [];
  const layout = baseLayout({xaxis: {title: {text: "records"}}, yaxis: {type: "category", automargin: true},
                             margin: {l: 10, r: 20, t: 30, b: 40}});
  Plotly.react("chart-deadletters", traces, noData(layout, traces.length > 0), CONFIG);
  fillTable("table-deadletters", ["received", "reason", "app", "detail"],
            o.recent_dead_letters.slice(0, 8).map((d) => [(d.received_at || "").replace("T", " ").slice(0, 19), d.reason, d.app_id,
                                                          (d.detail || "").slice(0, 120)]));
}

function drawDrift(o) {
  fillTable("table-drift", ["detected", "signal", "detector", "mean before", "mean after"],
            o.recent_drift_alarms.map((a) => [a.detected_at, a.signal, a.detector, fmt(a.mean_before, 3),
                                              fmt(a.mean_after, 3)]));
}

function drawPrivacy(o) {
  const p = o.privacy;
  const trace = {
    type: "indicator", mode: "gauge+number", value: p.spent_epsilon, name: "epsilon spent",
    number: {suffix: ` of ${p.budget_epsilon} ε`, valueformat: ".2f"},
    gauge: {axis: {range: [0, p.budget_epsilon]}, bar: {color: p.spent_epsilon > 0.8 * p.budget_epsilon ? "#e03131" : "#1c7ed6"}},
    title: {text: p.enabled ? "DP training on" : "DP training off", font: {size: 13}},
  };
  Plotly.react("chart-privacy", [trace], {margin: {l: 30, r: 30, t: 40, b: 10}, paper_bgcolor: "rgba(0,0,0,0)"}, CONFIG);
}

function drawLag(o) {
  fillTable("table-lag", ["consumer", "partition", "archived", "checkpointed", "lag"],
            o.lag.map((l) => [l.consumer, l.partition, l.archived_offset, l.checkpointed_offset, l.lag]));
}

function drawProcesses(o) {
  fillTable("table-processes", ["process", "instance", "state", "last beat", "started", "doing"],
            o.processes.map((p) => [p.process, `${p.host}:${p.pid}`, badge(p.state),
                                    `${Math.round(p.beat_age_s)} s ago`, p.started_at.replace("T", " ").slice(0, 19),
                                    p.state === "up" ? Object.entries(p.detail).map(([k, v]) => `${k} ${JSON.stringify(v)}`).join(", ")
                                                     : p.why]));
}

// An app's key sees its own app: what is made of every app's data is not in its overview.
function showScope(o) {
  document.getElementById("title").textContent = o.app_id ? `feedloop · ${o.app_id}` : "feedloop";
  document.querySelectorAll('[data-scope="all"]').forEach((article) => { article.hidden = Boolean(o.app_id); });
}

function draw(o) {
  showScope(o);
  const color = colorFor([...o.adapters.map((a) => a.name), ...Object.keys(o.traffic_share.values),
                          ...Object.keys(o.reward_mean.values)]);
  drawTiles(o);
  drawAdapters(o);
  drawTraffic(o, color);
  drawReward(o, color);
  drawAB(o, color);
  drawBatches(o);
  drawDeadLetters(o);
  drawDrift(o);
  drawPrivacy(o);
  drawLag(o);
  drawProcesses(o);
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/v1/overview", {credentials: "same-origin", cache: "no-store"});
    if (response.status === 401) throw new Error("signed out: open /dashboard?key=<API key> again");
    if (!response.ok) throw new Error(`overview answered ${response.status}`);
    const overview = await response.json();
    draw(overview);
    window.feedloopDashboard.overview = overview;
    window.feedloopDashboard.updates += 1;
    window.feedloopDashboard.lastError = null;
    status.textContent = `updated ${overview.generated_at} UTC · refreshes every ${REFRESH_MS / 1000} s`;
    status.classList.remove("stale");
  } catch (error) {
    window.feedloopDashboard.lastError = String(error);
    status.textContent = `not updated: ${error.message}`;
    status.classList.add("stale");
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
