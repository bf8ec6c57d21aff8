"use strict";
// Shared by every page: the API key, calls to the /v1 API, and small DOM and chart helpers.

const UI = JSON.parse(document.getElementById("ui-config").textContent);
const KEY_NAME = "pivotmerge.api_key";
const FINAL_STATES = new Set(["succeeded", "failed", "cancelled"]);

const apiKey = () => sessionStorage.getItem(KEY_NAME);

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.field = body && body.field;
  }
}

// A /v1 call with the bearer key; a 401 sends the user back to sign in.
async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}`, ...(options.headers || {}) };
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET", headers, signal: options.signal,
    body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
  });
  if (response.status === 401 && document.body.dataset.page !== "sign-in") {
    sessionStorage.removeItem(KEY_NAME);
    location.assign("/ui/sign-in");
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, body);
  }
  return options.raw ? response : response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v;  // through CSSOM: the pages' CSP refuses style attributes
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function badge(state) {
  return el("span", { class: `badge state-${state}`, text: state, "data-state": state });
}

function flash(message) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.hidden = !message;
}

const kindOf = (collection) => UI.kinds.find((k) => k.collection === collection);
const collectionOf = (kind) => UI.kinds.find((k) => k.kind === kind).collection;
const jobUrl = (kind, id) => `/ui/${collectionOf(kind)}/${id}`;
const shortId = (id) => id.slice(0, 8);

// A waiting job's place in the queue: its position and, while a worker is live, when it is expected to start.
function queueText(job) {
  if (job.queue_position === null || job.queue_position === undefined) return "held: its team may not start jobs";
  const start = job.estimated_start ? ` · starts ~${formatTime(job.estimated_start)}` : " · no worker is live";
  return `#${job.queue_position} in the queue${start}`;
}

function formatTime(iso) {
  return iso ? new Date(iso).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" }) : "";
}

function formatBytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function formatNumber(v) {
  if (typeof v !== "number") return v === null || v === undefined ? "" : String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1000 || Math.abs(v) < 0.001 ? v.toExponential(3) : v.toFixed(4);
}

// What a job merges with: a merge's method, a tuning's candidates, the method of a spec under `spec` (a fold's).
const methodOf = (job) => (job.kind === "tuning" ? job.spec.methods.join(", ") : job.spec.method || job.spec.spec?.method || "");

// The order a spec is written in (the database keeps JSON keys in its own order); a tuning's request first.
const KEY_ORDER = ["spec", "methods", "space", "objective", "trials", "timeout_s", "batch_size", "dev", "test", "method", "base_model", "models", "model", "weight", "components", "include", "exclude", "parameters",
                   "calibration", "evaluate", "evaluate_inputs", "name", "dataset", "limit", "dtype", "device", "seed"];
const keyRank = (k) => (KEY_ORDER.includes(k) ? KEY_ORDER.indexOf(k) : KEY_ORDER.length);

// YAML for display: block style for mappings and lists, flow style for lists of scalars.
function toYaml(value, indent = "") {
  const scalar = (v) => {
    if (v === null) return "null";
    if (typeof v === "string") return /^[\w./@:+-]+$/.test(v) && !/^(null|true|false|[\d.+-]+)$/.test(v) ? v : JSON.stringify(v);
    return String(v);
  };
  const isScalar = (v) => v === null || typeof v !== "object";
  if (isScalar(value)) return scalar(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    if (value.every(isScalar)) return `[${value.map(scalar).join(", ")}]`;
    return value.map((item) => {
      const body = toYaml(item, indent + "  ");
      return `\n${indent}- ${isScalar(item) || Array.isArray(item) ? body : body.trimStart()}`;
    }).join("");
  }
  const entries = Object.entries(value).sort(([a], [b]) => keyRank(a) - keyRank(b));
  if (!entries.length) return "{}";
  return entries.map(([k, v]) => {
    const nested = !isScalar(v) && !(Array.isArray(v) && (v.length === 0 || v.every(isScalar))) && Object.keys(v).length;
    return `\n${indent}${k}:${nested ? toYaml(v, indent + "  ") : " " + toYaml(v, indent + "  ")}`;
  }).join("");
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const isNumber = (v) => typeof v === "number" && isFinite(v);

// Axis ticks at round steps (1, 2, 2.5 or 5 times a power of ten) covering low..high; a flat range keeps an axis.
function niceAxis(low, high) {
  const raw = (high - low || 1) / 4;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = power * [1, 2, 2.5, 5, 10].find((m) => m * power >= raw);
  const max = Math.ceil(high / step) * step || (low < 0 ? 0 : step * 4);
  return { step, max, min: Math.floor(low / step) * step };
}

// Horizontal grid lines with their values, for a plot whose y(v) maps values to pixels.
function yGrid(root, axis, y, left, right) {
  for (let v = axis.min; v <= axis.max + axis.step / 2; v += axis.step) {
    root.append(svg("line", { x1: left, x2: right, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, String(Number(v.toPrecision(4)))));
  }
}

function legendOf(series, extra = []) {
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => legend.append(el("span", {}, el("i", { class: `swatch series-${i % 8}` }), s.name)));
  for (const [swatch, name] of extra) legend.append(el("span", {}, el("i", { class: `swatch ${swatch}` }), name));
  return legend;
}

// A grouped bar chart as inline SVG: one group per label, one bar per series.
function barChart(container, labels, series, options = {}) {
  const values = series.flatMap((s) => s.values).filter(isNumber);
  const { step, max, min } = niceAxis(Math.min(0, ...values), Math.max(0, ...values));
  const span = max - min;
  const short = (label) => (label.length > 16 ? label.slice(0, 15) + "…" : label);
  const width = 640, left = 56, right = 8, top = 12;
  const groupW = (width - left - right) / Math.max(1, labels.length);
  // Labels wider than their group are slanted, with room made for them below the plot.
  const slant = labels.some((l) => short(l).length * 6.5 > groupW);
  const bottom = slant ? 90 : 40, height = 200 + bottom;
  const plotW = width - left - right, plotH = height - top - bottom;
  const barW = Math.max(2, (groupW * 0.8) / Math.max(1, series.length));
  const y = (v) => top + plotH * (max - v) / span;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "bar-chart", role: "img",
                            "aria-label": options.title || "bar chart" });
  yGrid(root, { step, max, min }, y, left, width - right);
  labels.forEach((label, g) => {
    const x0 = left + g * groupW + groupW * 0.1;
    series.forEach((s, i) => {
      const v = s.values[g];
      if (!isNumber(v)) return;
      const rect = svg("rect", { x: x0 + i * barW, y: Math.min(y(v), y(0)), width: barW - 1,
                                 height: Math.max(1, Math.abs(y(v) - y(0))), class: `bar series-${i % 8}`,
                                 "data-series": s.name, "data-label": label, "data-value": v });
      rect.append(svg("title", {}, `${s.name} · ${label}: ${formatNumber(v)}`));
      root.append(rect);
    });
    const x = left + g * groupW + groupW / 2, yLabel = height - bottom + 16;
    root.append(svg("text", slant
      ? { x, y: yLabel, "text-anchor": "end", class: "axis", transform: `rotate(-35 ${x} ${yLabel})` }
      : { x, y: yLabel, "text-anchor": "middle", class: "axis" }, short(label)));
  });
  root.append(svg("line", { x1: left, x2: width - right, y1: y(0), y2: y(0), class: "zero" }));
  container.replaceChildren(root, legendOf(series));
}

// Points (x, y) as inline SVG, one colour per series: `series` [{name, points: [{x, y, title}]}];
// options: `line` [[x, y], ...] drawn as steps (a best so far), `marks` [{x, title}] crosses on the
// x axis for points without a value, `ring` the x of a point to circle, axis labels `xLabel`, `yLabel`.
function pointChart(container, series, options = {}) {
  const line = options.line || [], marks = options.marks || [];
  const values = [...series.flatMap((s) => s.points.map((p) => p.y)), ...line.map(([, v]) => v)].filter(isNumber);
  const axis = niceAxis(Math.min(...values), Math.max(...values));
  const xs = [...series.flatMap((s) => s.points.map((p) => p.x)), ...marks.map((m) => m.x)];
  const xAxis = niceAxis(0, Math.max(1, ...xs));
  const width = 640, height = 260, left = 76, right = 12, top = 12, bottom = 48;
  const x = (v) => left + (width - left - right) * v / xAxis.max;
  const y = (v) => top + (height - top - bottom) * (axis.max - v) / (axis.max - axis.min);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "point-chart", role: "img",
                            "aria-label": options.title || "point chart" });
  yGrid(root, axis, y, left, width - right);
  const xStep = Math.max(1, Math.ceil(xAxis.step));  // trial numbers are whole
  for (let v = 0; v <= xAxis.max; v += xStep) {
    root.append(svg("text", { x: x(v), y: height - bottom + 16, "text-anchor": "middle", class: "axis" }, String(v)));
  }
  root.append(svg("text", { x: left + (width - left - right) / 2, y: height - 8, "text-anchor": "middle", class: "axis" },
                  options.xLabel || ""));
  root.append(svg("text", { x: 14, y: top + (height - top - bottom) / 2, "text-anchor": "middle", class: "axis",
                            transform: `rotate(-90 14 ${top + (height - top - bottom) / 2})` }, options.yLabel || ""));
  if (line.length) {
    const path = line.map(([lx, ly], i) => (i ? `H ${x(lx)} V ${y(ly)}` : `M ${x(lx)} ${y(ly)}`)).join(" ");
    root.append(svg("path", { d: path, class: "step" }));
  }
  series.forEach((s, i) => s.points.filter((p) => isNumber(p.y)).forEach((p) => {
    const dot = svg("circle", { cx: x(p.x), cy: y(p.y), r: 5, class: `point series-${i % 8}`, "data-series": s.name,
                                "data-x": p.x, "data-value": p.y });
    dot.append(svg("title", {}, p.title || `${s.name} · ${p.x}: ${formatNumber(p.y)}`));
    root.append(dot);
    if (p.x === options.ring) root.append(svg("circle", { cx: x(p.x), cy: y(p.y), r: 9, class: "ring" }));
  }));
  for (const m of marks) {
    const cross = svg("text", { x: x(m.x), y: height - bottom - 4, "text-anchor": "middle", class: "mark", "data-x": m.x }, "×");
    cross.append(svg("title", {}, m.title));
    root.append(cross);
  }
  const extra = [...(line.length ? [["swatch-line", options.lineLabel || "line"]] : []),
                 ...(marks.length ? [["swatch-mark", options.markLabel || "no value"]] : [])];
  container.replaceChildren(root, legendOf(series, extra));
}

function table(node, head, rows) {
  node.replaceChildren(
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c instanceof Node ? c : formatNumber(c)))))),
  );
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
// Reconnects after a dropped connection with Last-Event-ID, so no event is lost or repeated.
function followEvents(path, onEvent, onEnd) {
  let lastId = null, stopped = false, controller = null;
  const handle = (block) => {
    const event = { id: null, type: "message", data: "" };
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const [field, ...rest] = line.split(":");
      const value = rest.join(":").replace(/^ /, "");
      if (field === "id") event.id = value;
      else if (field === "event") event.type = value;
      else if (field === "data") event.data += value;
    }
    if (!event.data) return;
    if (event.id !== null) lastId = event.id;
    onEvent(event.type, JSON.parse(event.data));
  };
  async function connect() {
    while (!stopped) {
      controller = new AbortController();
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      try {
        const response = await api(path, { headers, signal: controller.signal, raw: true });
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            handle(buffer.slice(0, cut));
            buffer = buffer.slice(cut + 2);
          }
        }
        if (onEnd()) return;  // the job is final: the stream ended on purpose
      } catch (err) {
        if (err instanceof ApiError && err.status < 500) { stopped = true; return; }
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  connect();
  // drop(): what a lost connection does (the stream reopens after Last-Event-ID); tests use it.
  return { drop() { if (controller) controller.abort(); } };
}

// Metrics of a merge: {merged: [...], base: [...], <expert>: [...]}, each a list of per-dataset rows.
function evaluationOf(metrics, report) {
  const source = (metrics && (metrics.evaluation || metrics)) || (report && report.evaluation);
  return source && Array.isArray(source.merged) ? source : null;
}

// The merged model first, then the base, then the experts (the database does not keep key order).
function modelsOf(evaluation) {
  const rank = (k) => (k === "merged" ? 0 : k === "base" ? 1 : 2);
  return Object.keys(evaluation).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

const METRIC_NAMES = ["token_accuracy", "exact_match", "caption_loss", "perplexity"];

function metricNames(evaluation) {
  const names = new Set();
  for (const rows of Object.values(evaluation)) for (const row of rows)
    for (const [k, v] of Object.entries(row)) if (typeof v === "number" && !["samples", "tokens", "questions"].includes(k)) names.add(k);
  return [...METRIC_NAMES.filter((n) => names.has(n)), ...[...names].filter((n) => !METRIC_NAMES.includes(n))];
}

function fillSelect(select, names, onChange) {
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  select.onchange = () => onChange(select.value);
  onChange(select.value);
}

function requireKey() {
  if (!apiKey()) { location.assign("/ui/sign-in"); return false; }
  return true;
}

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_NAME);
  location.assign("/ui/sign-in");
});
if (document.body.dataset.page === "sign-in") document.getElementById("nav").hidden = true;
