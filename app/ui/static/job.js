"use strict";
// One job: state and progress live from its SSE stream, then its results once it has succeeded.

const root = document.getElementById("job");
const collection = root.dataset.collection;
const jobPath = `/v1/${collection}/${root.dataset.jobId}`;
const $ = (id) => document.getElementById(id);
let job = null;
const QUEUE_REFRESH_MS = 3000;

function setState(state, error) {
  const shown = $("job-state");
  shown.className = `badge state-${state}`;
  shown.textContent = state;
  shown.dataset.state = state;
  $("cancel").hidden = !["waiting", "queued", "running"].includes(state);
  if (error) { $("job-error").textContent = error; $("job-error").hidden = false; }
}

function setProgress(fraction, stage, layer, message) {
  const pct = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
  $("progress-fill").style.width = `${pct}%`;
  $("progress").setAttribute("aria-valuenow", String(pct));
  $("progress-text").textContent = `${pct}%`;
  const where = [stage, layer !== null && layer !== undefined ? `layer ${layer}` : null, message].filter(Boolean);
  $("progress-stage").textContent = where.join(" · ");
}

function renderFacts() {
  const facts = [["Kind", job.kind], ["Queue", job.state === "waiting" ? queueText(job) : ""],
                 [job.kind === "tuning" ? "Candidates" : "Method", methodOf(job)],
                 ["Created", formatTime(job.created_at)],
                 ["Started", formatTime(job.started_at)], ["Finished", formatTime(job.finished_at)],
                 ["Attempts", String(job.attempts)], ["Id", job.id]];
  $("facts").replaceChildren(...facts.filter(([, v]) => v).map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))));
}

function describe(type, data) {
  if (type === "progress") return `${Math.round(data.fraction * 100)}% ${[data.stage, data.message].filter(Boolean).join(" ")}`;
  if (type === "trial") {
    const score = data.objective === null ? data.error : `${job.spec.objective} ${formatNumber(data.objective)}`;
    return `${data.done}/${data.total} · trial ${data.number}: ${data.label} ${data.state}${score ? `, ${score}` : ""}`;
  }
  return Object.entries(data).map(([k, v]) => `${k}: ${v}`).join(", ");
}

function onEvent(type, event) {
  $("events").append(el("li", { "data-seq": event.seq, "data-type": event.type },
    el("span", { class: "seq", text: `#${event.seq}` }), el("span", { class: "type", text: event.type }),
    el("span", { text: describe(event.type, event.data) })));
  if (event.type === "progress") setProgress(event.data.fraction, event.data.stage, event.data.layer, event.data.message);
  if (event.type === "trial") {
    setProgress(event.data.fraction, "tune", null, `${event.data.done} of ${event.data.total} trials`);
    refreshTrials();
  }
  if (event.type === "state") {
    setState(event.data.state, event.data.error);
    if (event.data.state === "succeeded") setProgress(1, "done");
  }
}

// The stream ends when the job is final; returns true so it is not reopened.
async function onStreamEnd() {
  job = await api(jobPath);
  renderFacts();
  if (!FINAL_STATES.has(job.state)) return false;
  setState(job.state, job.error);
  if (job.state === "succeeded") await showResults();
  return true;
}

// A waiting job's position and estimated start move as other jobs start: read them again while it waits.
async function refreshQueue() {
  if (job.state !== "waiting") return;
  try {
    job = await api(jobPath);
    renderFacts();
  } catch (err) { flash(`Could not refresh the job: ${err.message}`); }
  setTimeout(refreshQueue, QUEUE_REFRESH_MS);
}

async function download(artifact, button) {
  button.disabled = true;
  try {
    const blob = await (await api(artifact.url, { raw: true })).blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: artifact.name.split("/").pop() });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  } catch (err) { flash(`Download failed: ${err.message}`); }
  button.disabled = false;
}

async function showArtifacts() {
  const { artifacts } = await api(`${jobPath}/artifacts`);
  $("artifacts-card").hidden = !artifacts.length;
  $("artifacts").querySelector("tbody").replaceChildren(...artifacts.map((a) => {
    const button = el("button", { type: "button", class: "secondary", "data-artifact": a.name, text: "Download" });
    button.addEventListener("click", () => download(a, button));
    return el("tr", {}, el("td", { text: a.name }), el("td", { text: formatBytes(a.size), title: `${a.size} bytes` }),
              el("td", {}, el("code", { class: "sha", text: a.sha256, title: a.sha256 })), el("td", {}, button));
  }));
  return artifacts;
}

async function readJsonArtifact(artifacts, name) {
  const artifact = artifacts.find((a) => a.name === name);
  return artifact ? (await api(artifact.url, { raw: true })).json() : null;
}

const modelLabel = (key) => (key === "merged" || key === "base" ? key : key.split("/").filter(Boolean).pop());

function showMetrics(evaluation, first = null) {
  const models = modelsOf(evaluation);
  const datasets = evaluation.merged.map((r) => r.dataset);
  const valueOf = (model, dataset, metric) => (evaluation[model].find((r) => r.dataset === dataset) || {})[metric];
  const names = metricNames(evaluation);
  $("metrics-card").hidden = false;
  fillSelect($("metric-choice"), first && names.includes(first) ? [first, ...names.filter((n) => n !== first)] : names, (metric) => {
    barChart($("metrics-chart"), datasets,
             models.map((m) => ({ name: modelLabel(m), values: datasets.map((d) => valueOf(m, d, metric)) })),
             { title: `${metric} per dataset` });
    table($("metrics-table"), ["Dataset", ...models.map(modelLabel)],
          datasets.map((d) => [d, ...models.map((m) => valueOf(m, d, metric))]));
  });
}

function showDistances(report) {
  const layers = Object.keys(report.layers);
  const names = Object.keys(report.total);
  $("distances-card").hidden = false;
  fillSelect($("distance-choice"), names, (metric) => {
    barChart($("distances-chart"), layers, [{ name: metric, values: layers.map((l) => report.layers[l][metric]) }],
             { title: `${metric} per layer` });
  });
  table($("distances-table"), ["Layer", ...names],
        [...layers.map((l) => [l, ...names.map((n) => report.layers[l][n])]), ["total", ...names.map((n) => report.total[n])]]);
}

function cell(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") return formatNumber(value);
  if (Array.isArray(value) && value.every((v) => typeof v === "number")) return value.map(formatNumber).join(", ");
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function showLayers(layers) {
  const columns = [...new Set(layers.flatMap((l) => Object.keys(l)))];
  $("layers-card").hidden = !layers.length;
  table($("layers"), columns, layers.map((l) => columns.map((c) => cell(l[c]))));
}

const paramsText = (params) => Object.entries(params).sort(([a], [b]) => a.localeCompare(b))
  .map(([k, v]) => `${k}=${typeof v === "number" ? Number(v.toPrecision(4)) : JSON.stringify(v)}`).join(", ");
// The dev metric each objective is the mean of (pivotmerge.tune.trials.OBJECTIVE_METRIC).
const OBJECTIVE_METRIC = { loss: "caption_loss", accuracy: "token_accuracy", qa: "exact_match" };

// The study's trials: the dev objective of each by trial number, one colour per candidate, the best so
// far as steps, failed trials as crosses; and the table of every trial.
async function showTrials() {
  const study = await api(`${jobPath}/trials`);
  if (!study.trials.length) return;
  const better = study.direction === "minimize" ? (a, b) => a < b : (a, b) => a > b;
  const scored = study.trials.filter((t) => t.objective !== null);
  let best = null;
  const line = scored.map((t) => { best = best === null || better(t.objective, best) ? t.objective : best; return [t.number, best]; });
  const metric = `dev ${study.objective}`;
  $("trials-card").hidden = false;
  pointChart($("trials-chart"), job.spec.methods.map((label) => ({
    name: label,
    points: scored.filter((t) => t.label === label).map((t) => ({
      x: t.number, y: t.objective, title: `trial ${t.number} · ${label} (${paramsText(t.params)}): ${formatNumber(t.objective)}` })),
  })), {
    title: `${metric} by trial and candidate`, xLabel: "trial", yLabel: `${metric} (${study.direction === "minimize" ? "lower" : "higher"} is better)`,
    line, lineLabel: "best so far", ring: study.best,
    marks: study.trials.filter((t) => t.state === "failed").map((t) => ({ x: t.number, title: `trial ${t.number} failed: ${t.error}` })),
    markLabel: "failed",
  });
  table($("trials-table"), ["Trial", "Candidate", "Parameters", metric, "State", "Seconds", "Worker"],
        study.trials.map((t) => [t.number, t.label, paramsText(t.params), t.objective === null ? t.error : t.objective,
                                 t.state, t.seconds, t.worker || ""]));
  $("trials-table").querySelectorAll("tbody tr").forEach((tr, i) => {
    tr.dataset.number = study.trials[i].number;
    tr.classList.toggle("best", study.trials[i].number === study.best);
  });
  const chosen = study.trials.find((t) => t.number === study.best);
  $("trials-summary").textContent = `${study.trials.length} of ${study.budget} trials` + (chosen
    ? `; best: trial ${chosen.number} (${chosen.label}), ${metric} ${formatNumber(chosen.objective)}` : "");
}

// Trial events come in bursts (a batch, or the stored ones on load): one reload at a time, then one more if needed.
let trialsLoading = null, trialsStale = false;
function refreshTrials() {
  if (trialsLoading) { trialsStale = true; return; }
  trialsLoading = showTrials().catch((err) => flash(`Could not load the trials: ${err.message}`)).finally(() => {
    trialsLoading = null;
    if (trialsStale) { trialsStale = false; refreshTrials(); }
  });
}

async function showResults() {
  const artifacts = await showArtifacts();
  const { metrics } = await api(`${jobPath}/metrics`);
  if (job.kind === "tuning") {
    refreshTrials();
    // The chosen trial's scores: dev (what chose it) and test (scored once, never used to choose).
    const rows = (part) => (metrics[part] || []).map((r) => ({ ...r, dataset: `${r.dataset} (${part})` }));
    if (metrics) showMetrics({ merged: [...rows("dev"), ...rows("test")] }, OBJECTIVE_METRIC[job.spec.objective]);
  } else if (job.kind === "merge") {
    const report = await readJsonArtifact(artifacts, "merge_report.json");
    const evaluation = evaluationOf(metrics, report);
    if (evaluation) showMetrics(evaluation);
    if (report && report.layers) showLayers(report.layers);
  } else if (job.kind === "analysis") {
    const report = metrics || await readJsonArtifact(artifacts, "analysis_report.json");
    if (report && report.layers) showDistances(report);
  }
}

async function cancel() {
  $("cancel").disabled = true;
  try {
    const answer = await api(`${jobPath}:cancel`, { method: "POST" });
    setState(answer.state);
  } catch (err) { flash(`Cancel failed: ${err.message}`); }
  $("cancel").disabled = false;
}

async function load() {
  try {
    job = await api(jobPath);
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 422)) {
      $("not-found").hidden = false;
      $("job-title").textContent = "Job not found";
      return;
    }
    flash(`Could not load the job: ${err.message}`);
    return;
  }
  $("job-body").hidden = false;
  $("job-title").textContent = `${kindOf(collection).label} ${shortId(job.id)}`;
  document.title = `${kindOf(collection).label} ${shortId(job.id)} · PivotMerge`;
  $("spec").textContent = toYaml(job.spec).trimStart();
  renderFacts();
  setState(job.state, job.error);
  setProgress(job.progress.fraction, job.progress.stage, job.progress.layer, job.progress.message);
  $("cancel").addEventListener("click", cancel);
  window.jobStream = followEvents(`${jobPath}/events`, onEvent, onStreamEnd);
  setTimeout(refreshQueue, QUEUE_REFRESH_MS);
}

if (requireKey()) load();
