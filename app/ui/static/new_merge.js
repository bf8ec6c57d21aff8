"use strict";
// The new-merge form: methods and their parameters come from /v1/methods, model and dataset
// suggestions from /v1/inputs; the API's 422 answer is shown next to the field it names.

const $ = (id) => document.getElementById(id);
let methods = [];

function enumOf(schema) {
  if (schema.enum) return schema.enum;
  const choice = (schema.anyOf || []).find((s) => s.enum);
  return choice ? choice.enum : null;
}

function typesOf(schema) {
  return new Set([schema.type, ...(schema.anyOf || []).map((s) => s.type)].filter(Boolean));
}

function parameterField(p) {
  const id = `param-${p.name}`;
  const choices = enumOf(p.json_schema);
  let input;
  if (choices) {
    input = el("select", { id }, ...choices.map((c) => el("option", { value: JSON.stringify(c), text: String(c) })));
    input.value = JSON.stringify(p.default);
  } else if (typesOf(p.json_schema).has("boolean") && typesOf(p.json_schema).size === 1) {
    input = el("input", { id, type: "checkbox" });
    input.checked = Boolean(p.default);
  } else {
    input = el("input", { id, type: "text", value: p.default === null ? "" : JSON.stringify(p.default),
                          placeholder: p.default === null ? "default: none" : "" });
  }
  input.dataset.param = p.name;
  input.dataset.default = JSON.stringify(p.default);
  return el("div", { class: "field param", "data-field": `parameters.${p.name}` },
    el("label", { for: id, text: p.name }), input,
    el("p", { class: "hint", text: p.description || "" }), el("p", { class: "field-error" }));
}

function valueOf(input) {
  if (input.type === "checkbox") return input.checked;
  if (input.tagName === "SELECT") return JSON.parse(input.value);
  const text = input.value.trim();
  if (!text) return null;
  try { return JSON.parse(text); } catch (_) { return text; }  // a bare word is a string
}

function renderMethod() {
  const method = methods.find((m) => m.name === $("method").value);
  $("method-summary").textContent = method.summary;
  $("calibration-hint").textContent = method.calibration_data.length
    ? `(optional; measures ${method.calibration_data.join(", ")})` : "(not used by this method)";
  $("base-hint").textContent = { required: "(required)", optional: "(optional)", unused: "(not used by this method)" }[method.base_model];
  $("parameters").replaceChildren(el("legend", { text: "Parameters" }), el("p", { class: "field-error" }),
                                  ...method.parameters.map(parameterField));
}

function listRow(container, listId, fieldName, index, value = "") {
  const row = el("div", { class: "field row", "data-field": fieldName(index) },
    el("input", { type: "text", list: listId, value, "aria-label": fieldName(index) }),
    el("button", { type: "button", class: "secondary", text: "Remove", onclick: () => { row.remove(); renumber(container, fieldName); } }),
    el("p", { class: "field-error" }));
  container.append(row);
}

function renumber(container, fieldName) {
  [...container.children].forEach((row, i) => { row.dataset.field = fieldName(i); });
}

const expertField = (i) => `models.${i}.model`;
const evaluateField = (i) => `evaluate.${i}.dataset`;
// Empty rows are sent too, so a row's index is its index in the spec and an error lands on it.
const rowValues = (container) => [...container.querySelectorAll("input")].map((i) => i.value.trim());

function buildSpec() {
  const spec = { method: $("method").value, device: $("device").value,
                 models: rowValues($("experts")).map((model) => ({ model })) };
  const base = $("base-model").value.trim();
  if (base) spec.base_model = base;
  const parameters = {};
  for (const input of document.querySelectorAll("[data-param]")) {
    const value = valueOf(input);
    if (value !== null && JSON.stringify(value) !== input.dataset.default) parameters[input.dataset.param] = value;
  }
  if (Object.keys(parameters).length) spec.parameters = parameters;
  const components = [...document.querySelectorAll("input[name=component]:checked")].map((c) => c.value);
  if (components.length) spec.components = components;
  const calibration = $("calibration").value.trim();
  if (calibration) spec.calibration = { dataset: calibration };
  spec.evaluate = rowValues($("evaluate")).map((dataset) => ({ dataset }));
  if (spec.evaluate.length && $("evaluate-inputs").checked) spec.evaluate_inputs = true;
  return spec;
}

// The element for an error's field: the closest one whose data-field is the field or a prefix of it.
function showError(field, message) {
  const parts = (field || "body").split(".");
  for (let n = parts.length; n > 0; n -= 1) {
    const target = document.querySelector(`[data-field="${CSS.escape(parts.slice(0, n).join("."))}"]`);
    if (target) {
      const slot = target.classList.contains("field-error") ? target : target.querySelector(".field-error");
      slot.textContent = message;
      target.classList.add("invalid");
      target.scrollIntoView({ block: "center" });
      return;
    }
  }
  $("form-error").textContent = message;
}

function clearErrors() {
  for (const slot of document.querySelectorAll(".field-error")) slot.textContent = "";
  for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
}

const idempotencyKey = `ui-${Date.now()}-${Math.random().toString(36).slice(2)}`;

async function submit(event) {
  event.preventDefault();
  clearErrors();
  $("submit-merge").disabled = true;
  try {
    const job = await api("/v1/merges", { method: "POST", json: buildSpec(), headers: { "Idempotency-Key": idempotencyKey } });
    location.assign(jobUrl(job.kind, job.id));
  } catch (err) {
    showError(err.field, err.message);
    $("submit-merge").disabled = false;
  }
}

async function start() {
  const [methodList, inputs] = await Promise.all([api("/v1/methods"), api("/v1/inputs")]);
  methods = methodList.methods;
  $("model-choices").replaceChildren(...inputs.models.map((m) => el("option", { value: m })));
  $("dataset-choices").replaceChildren(...inputs.datasets.map((d) => el("option", { value: d })));
  $("method").replaceChildren(...methods.map((m) => el("option", { value: m.name, text: m.name })));
  $("method").value = methods.some((m) => m.name === "pivotmerge") ? "pivotmerge" : methods[0].name;
  $("method").addEventListener("change", renderMethod);
  renderMethod();
  listRow($("experts"), "model-choices", expertField, 0);
  listRow($("experts"), "model-choices", expertField, 1);
  $("add-expert").addEventListener("click", () => listRow($("experts"), "model-choices", expertField, $("experts").children.length));
  $("add-evaluate").addEventListener("click", () => listRow($("evaluate"), "dataset-choices", evaluateField, $("evaluate").children.length));
  $("merge-form").addEventListener("submit", submit);
}

if (requireKey()) start().catch((err) => flash(`Could not load the form: ${err.message}`));
