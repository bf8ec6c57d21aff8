"use strict";
// The team's jobs of every kind, newest first. With "all kinds", each /v1 collection is
// paged by its own token and the pages are merged by creation time, so paging never skips a job.

const POLL_MS = 2000;
const tbody = document.querySelector("#jobs tbody");
const controls = {
  kind: document.getElementById("filter-kind"),
  state: document.getElementById("filter-state"),
  label: document.getElementById("filter-label"),
  size: document.getElementById("page-size"),
};
let cursors = [];  // per collection: {collection, buffer, token, done}
let shown = [];

function newCursors() {
  const wanted = controls.kind.value;
  return UI.kinds.filter((k) => !wanted || k.collection === wanted)
    .map((k) => ({ collection: k.collection, buffer: [], token: null, done: false }));
}

async function refill(cursor, size) {
  if (cursor.done || cursor.buffer.length >= size) return;
  const query = new URLSearchParams({ page_size: String(size) });
  if (cursor.token) query.set("page_token", cursor.token);
  if (controls.state.value) query.append("state", controls.state.value);
  if (controls.label.value.trim()) query.append("label", controls.label.value.trim());
  const page = await api(`/v1/${cursor.collection}?${query}`);
  cursor.buffer.push(...page.jobs);
  cursor.token = page.next_page_token;
  cursor.done = !cursor.token;
}

async function takePage() {
  const size = Number(controls.size.value);
  const page = [];
  while (page.length < size) {
    await Promise.all(cursors.map((c) => refill(c, size - page.length)));
    const live = cursors.filter((c) => c.buffer.length);
    if (!live.length) break;
    const newest = live.reduce((a, b) => (a.buffer[0].created_at >= b.buffer[0].created_at ? a : b));
    page.push(newest.buffer.shift());
  }
  return page;
}

const hasMore = () => cursors.some((c) => c.buffer.length || !c.done);

function row(job) {
  const pct = Math.round(job.progress.fraction * 100);
  return el("tr", { "data-job-id": job.id, "data-state": job.state },
    el("td", {}, el("a", { href: jobUrl(job.kind, job.id), text: shortId(job.id), title: job.id })),
    el("td", { text: job.kind }),
    el("td", {}, badge(job.state)),
    job.state === "waiting"
      ? el("td", { class: "queue", text: queueText(job) })
      : el("td", {}, el("div", { class: "progress small", title: `${pct}%` },
                        el("div", { class: "progress-fill", style: `width:${pct}%` })), ` ${pct}%`),
    el("td", { text: methodOf(job) }),
    el("td", { class: "labels", text: Object.entries(job.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ") }),
    el("td", { text: formatTime(job.created_at) }),
  );
}

function render() {
  tbody.replaceChildren(...shown.map(row));
  document.getElementById("jobs-empty").hidden = shown.length > 0;
  document.getElementById("next-page").disabled = !hasMore();
}

let onFirstPage = true;

async function firstPage() {
  try {
    cursors = newCursors();
    shown = await takePage();
    onFirstPage = true;
    document.getElementById("first-page").disabled = true;
    render();
    flash("");
  } catch (err) { flash(`Could not load jobs: ${err.message}`); }
}

async function nextPage() {
  shown = await takePage();
  onFirstPage = false;
  document.getElementById("first-page").disabled = false;
  render();
  window.scrollTo(0, 0);
}

// Live: the first page is reloaded (new jobs appear); on later pages the unfinished jobs are refreshed.
async function poll() {
  try {
    if (onFirstPage) await firstPage();
    else {
      const active = shown.filter((j) => !FINAL_STATES.has(j.state));
      const fresh = await Promise.all(active.map((j) => api(`/v1/${collectionOf(j.kind)}/${j.id}`)));
      shown = shown.map((j) => fresh.find((f) => f.id === j.id) || j);
      render();
    }
  } finally { setTimeout(poll, POLL_MS); }
}

if (requireKey()) {
  for (const c of Object.values(controls)) c.addEventListener("change", firstPage);
  // Enter in the label box filters instead of submitting the form.
  document.getElementById("filters").addEventListener("submit", (event) => { event.preventDefault(); firstPage(); });
  document.getElementById("first-page").addEventListener("click", firstPage);
  document.getElementById("next-page").addEventListener("click", nextPage);
  firstPage().then(() => setTimeout(poll, POLL_MS));
}
