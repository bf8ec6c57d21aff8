"use strict";
// Finished merges of the same experts, side by side. Candidates are grouped by their inputs
// (base model and experts); merges can only be compared within one group.

const MAX_PAGES = 5;
const $ = (id) => document.getElementById(id);
const inputsOf = (job) => JSON.stringify([job.spec.base_model || null, job.spec.models.map((m) => m.model).sort()]);
const describeMerge = (job) => `${job.spec.method} ${shortId(job.id)}`;

async function succeededMerges() {
  const jobs = [];
  let token = null;
  for (let i = 0; i < MAX_PAGES; i += 1) {
    const query = new URLSearchParams({ page_size: "100", state: "succeeded" });
    if (token) query.set("page_token", token);
    const page = await api(`/v1/merges?${query}`);
    jobs.push(...page.jobs);
    token = page.next_page_token;
    if (!token) break;
  }
  return jobs;
}

function selected() {
  return [...document.querySelectorAll("#candidates input:checked")].map((box) => box.value);
}

function onPick() {
  const picked = document.querySelector("#candidates input:checked");
  const group = picked ? picked.dataset.group : null;
  for (const box of document.querySelectorAll("#candidates input")) box.disabled = group !== null && box.dataset.group !== group;
  $("compare-button").disabled = selected().length < 2;
}

function renderCandidates(jobs) {
  const groups = new Map();
  for (const job of jobs) groups.set(inputsOf(job), [...(groups.get(inputsOf(job)) || []), job]);
  const blocks = [...groups.entries()].map(([key, members], g) => {
    const [base, experts] = JSON.parse(key);
    return el("div", { class: "group" },
      el("p", { class: "muted", text: `base ${base || "none"} · experts ${experts.join(", ")}` }),
      ...members.map((job) => el("label", { class: "inline candidate" },
        el("input", { type: "checkbox", value: job.id, "data-group": String(g), onchange: onPick }),
        ` ${describeMerge(job)} · ${formatTime(job.finished_at)}`)));
  });
  $("candidates").replaceChildren(...(blocks.length ? blocks : [el("p", { class: "muted", text: "No finished merges yet." })]));
}

async function evaluationFor(id) {
  const [job, { metrics }, { artifacts }] = await Promise.all(
    [api(`/v1/merges/${id}`), api(`/v1/merges/${id}/metrics`), api(`/v1/merges/${id}/artifacts`)]);
  const reportFile = artifacts.find((a) => a.name === "merge_report.json");
  const report = metrics ? null : reportFile && await (await api(reportFile.url, { raw: true })).json();
  return { job, evaluation: evaluationOf(metrics, report) };
}

async function compare(ids) {
  const results = await Promise.all(ids.map(evaluationFor));
  const usable = results.filter((r) => r.evaluation);
  if (usable.length < ids.length) flash("Some merges have no evaluation metrics (their spec had no `evaluate`).");
  if (!usable.length) return;
  // Columns: each merge, then the inputs (base, experts) once, from the first merge that evaluated them.
  const inputs = modelsOf(usable[0].evaluation).filter((k) => k !== "merged");
  const columns = [...usable.map((r) => ({ name: describeMerge(r.job), rows: r.evaluation.merged })),
                   ...inputs.map((k) => ({ name: k === "base" ? "base" : k.split("/").filter(Boolean).pop(), rows: usable[0].evaluation[k] }))];
  const datasets = usable[0].evaluation.merged.map((r) => r.dataset);
  const valueOf = (column, dataset, metric) => (column.rows.find((r) => r.dataset === dataset) || {})[metric];
  $("comparison").hidden = false;
  fillSelect($("compare-metric"), metricNames(usable[0].evaluation), (metric) => {
    barChart($("compare-chart"), datasets, columns.map((c) => ({ name: c.name, values: datasets.map((d) => valueOf(c, d, metric)) })),
             { title: `${metric} per dataset` });
    table($("compare-table"), ["Dataset", ...columns.map((c) => c.name)],
          datasets.map((d) => [d, ...columns.map((c) => valueOf(c, d, metric))]));
  });
  history.replaceState(null, "", `/ui/compare?ids=${ids.join(",")}`);
}

async function start() {
  try {
    renderCandidates(await succeededMerges());
  } catch (err) { flash(`Could not load merges: ${err.message}`); return; }
  $("compare-button").addEventListener("click", () => compare(selected()));
  const preset = new URLSearchParams(location.search).get("ids");
  if (preset) {
    for (const id of preset.split(",")) {
      const box = document.querySelector(`#candidates input[value="${CSS.escape(id)}"]`);
      if (box) box.checked = true;
    }
    onPick();
    compare(preset.split(","));
  }
}

if (requireKey()) start();
