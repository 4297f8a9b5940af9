// Profiles: the list (with delete), a create form whose dry run updates as you type (per matrix: k,
// retained energy, Frobenius error), and the spectrum of any matrix with the kept rank and the
// Marchenko-Pastur threshold marked.

import * as api from "./api.js";
import { spectrumChart } from "./charts.js";
import { $, $$, debounce, fill, h, isNum, num, pct, sig } from "./dom.js";

const KINDS = ["laser", "laser_mp", "keep_bottom", "random_basis", "prune_magnitude", "zero"];
const RANKED = new Set(["laser", "keep_bottom", "random_basis"]);
const KNOBS = { rank_fraction: "ρ (rank fraction)", rank: "rank k", energy: "energy kept" };

let ctx;
let dryRun = { seq: 0, controller: null };
let editIds = 0;  // ids of intervention rows stay unique across removals

export function init(c) {
  ctx = c;
  ctx.bus.addEventListener("profiles", renderList);
  $("#pf-refresh").addEventListener("click", () => ctx.refreshProfiles().catch(ctx.showError));
  $("#pf-add").addEventListener("click", () => {
    addEdit();
    $$("#pf-edits .edit").at(-1)?.querySelector("select")?.focus();
    changed();
  });
  const form = $("#pf-form");
  form.addEventListener("input", changed);
  form.addEventListener("change", changed);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    create();
  });
  const types = Object.keys(ctx.info.laser_types);
  fill($("#sp-type"), types.map((t) => h("option", { value: t }, t)));
  const layer = $("#sp-layer");
  layer.min = String(-ctx.info.num_layers);
  layer.max = String(ctx.info.num_layers - 1);
  $("#sp-form").addEventListener("submit", (e) => {
    e.preventDefault();
    showSpectrum($("#sp-type").value, Number($("#sp-layer").value), $("#sp-k").value ? Number($("#sp-k").value) : null);
  });
  addEdit({ kind: "laser", target: types[0], layer: String(-1), knob: "rank_fraction", value: "0.01" });
}

/** When the tab is shown, run the form's dry run unless it already has a current answer. */
export function shown() {
  const state = $("#pf-dry").dataset.state;
  if (!state || state === "error") changed();
}

// -- list ------------------------------------------------------------------------------------------------

function describeEdit(e) {
  const knob = ["rank_fraction", "rank", "energy", "sparsity"].find((k) => e[k] !== undefined && e[k] !== null);
  const label = { rank_fraction: "ρ", rank: "k", energy: "energy", sparsity: "sparsity" }[knob];
  const layer = Array.isArray(e.layer) ? e.layer.join(",") : e.layer;
  return `${e.kind || "laser"} ${e.target} L${layer}${knob ? ` ${label}=${e[knob]}` : ""}`;
}

function renderList() {
  fill($("#pf-table tbody"), ctx.profiles.map((p) => h("tr", { dataset: { profile: p.name } },
    h("th", { scope: "row" }, p.name, p.active ? h("span", { class: "tag live", title: "weights live now" }, "live") : null),
    h("td", {}, p.interventions.length ? h("ul", { class: "edits" }, p.interventions.map((e) => h("li", {}, describeEdit(e))))
      : h("span", { class: "muted" }, "unedited")),
    h("td", { class: "num", "data-label": "Matrices" }, String(p.matrices)),
    h("td", { class: "desc" }, p.description || ""),
    h("td", { class: "actions" },
      h("button", { type: "button", class: "ghost small", onclick: () => compareWithBase(p.name),
        disabled: p.name === "base" }, "A/B vs base"),
      p.reserved ? null : h("button", { type: "button", class: "ghost small danger", onclick: () => remove(p.name),
        "aria-label": `Delete profile ${p.name}` }, "Delete")))));
}

function compareWithBase(name) {
  ctx.bus.dispatchEvent(new CustomEvent("compare", { detail: ["base", name] }));
  ctx.selectTab("playground");
}

async function remove(name) {
  if (!window.confirm(`Delete profile “${name}”? Requests naming it will answer 404.`)) return;
  try {
    await api.deleteProfile(name);
    ctx.toast(`Deleted profile ${name}`);
    await ctx.refreshProfiles();
  } catch (err) {
    ctx.showError(err);
  }
}

// -- interventions editor ------------------------------------------------------------------------------

function options(values, selectedValue, labels = {}) {
  return values.map((v) => h("option", { value: v, selected: v === selectedValue }, labels[v] || v));
}

function addEdit(init = {}) {
  const box = $("#pf-edits");
  const n = ++editIds;
  const targets = [...Object.keys(ctx.info.laser_types), ...Object.keys(ctx.info.groups || {})];
  const id = (f) => `pf-e${n}-${f}`;
  const field = (f, label, control) => h("label", { for: id(f), class: `f-${f}` }, label, control);
  const row = h("div", { class: "edit row wrap", role: "group" },
    field("kind", "Kind", h("select", { id: id("kind"), name: "kind" }, options(KINDS, init.kind || "laser"))),
    field("target", "Target", h("select", { id: id("target"), name: "target" }, options(targets, init.target || targets[0]))),
    field("layer", "Layer", h("input", { id: id("layer"), name: "layer", type: "text", value: init.layer ?? "-1",
      size: 6, title: "an int (negative from the end), a list 1,2, a range 20:30 or all" })),
    field("knob", "Knob", h("select", { id: id("knob"), name: "knob" }, options(Object.keys(KNOBS), init.knob || "rank_fraction", KNOBS))),
    field("value", "Value", h("input", { id: id("value"), name: "value", type: "number", step: "any", min: "0",
      value: init.value ?? "0.01" })),
    field("sparsity", "Sparsity", h("input", { id: id("sparsity"), name: "sparsity", type: "number", step: "any",
      min: "0", max: "0.999", value: "0.9" })),
    field("seed", "Seed", h("input", { id: id("seed"), name: "seed", type: "number", min: "0", value: "0" })),
    h("button", { type: "button", class: "ghost small remove", onclick: () => {
      row.remove();
      renumber();
      changed();
    } }, "Remove"));
  box.append(row);
  syncEditFields(row);
  renumber();
}

/** Rows are named by their position, so "Intervention 2" is always the second one. */
function renumber() {
  $$("#pf-edits .edit").forEach((row, i) => {
    row.setAttribute("aria-label", `Intervention ${i + 1}`);
    $(".remove", row).setAttribute("aria-label", `Remove intervention ${i + 1}`);
  });
}

/** Show only the fields the row's kind takes. */
function syncEditFields(row) {
  const kind = $("[name=kind]", row).value;
  $(".f-knob", row).hidden = !RANKED.has(kind);
  $(".f-value", row).hidden = !RANKED.has(kind);
  $(".f-sparsity", row).hidden = kind !== "prune_magnitude";
  $(".f-seed", row).hidden = kind !== "random_basis";
}

function parseLayer(text) {
  const t = text.trim();
  if (/^-?\d+$/.test(t)) return Number(t);
  if (/^-?\d+(\s*,\s*-?\d+)+$/.test(t)) return t.split(",").map((x) => Number(x.trim()));
  return t;
}

function profileBody() {
  const interventions = $$("#pf-edits .edit").map((row) => {
    syncEditFields(row);
    const v = (name) => $(`[name=${name}]`, row).value;
    const kind = v("kind");
    const spec = { kind, target: v("target"), layer: parseLayer(v("layer")) };
    if (RANKED.has(kind)) spec[v("knob")] = v("value") === "" ? null : Number(v("value"));
    if (kind === "prune_magnitude") spec.sparsity = v("sparsity") === "" ? null : Number(v("sparsity"));
    if (kind === "random_basis") spec.seed = Number(v("seed") || 0);
    return spec;
  });
  return { name: $("#pf-name").value.trim(), description: $("#pf-description").value, interventions };
}

function changed() {
  const body = profileBody();
  $("#pf-json").textContent = JSON.stringify(body, null, 2);
  scheduleDryRun();
}

// -- dry run -------------------------------------------------------------------------------------------

const scheduleDryRun = debounce(runDryRun, 250);

async function runDryRun() {
  const body = profileBody();
  const box = $("#pf-dry");
  dryRun.controller?.abort();
  const seq = ++dryRun.seq;
  if (!body.interventions.length) {
    fill(box, h("p", { class: "muted" }, "No interventions: the profile would be the unedited model."));
    box.dataset.state = "empty";
    return;
  }
  dryRun.controller = new AbortController();
  box.dataset.state = "running";
  box.setAttribute("aria-busy", "true");
  try {
    const res = await api.dryRunProfile({ ...body, name: body.name || "draft" }, { signal: dryRun.controller.signal });
    if (seq !== dryRun.seq) return;
    renderDryRun(res.matrices);
    box.dataset.state = "ok";
  } catch (err) {
    if (err.name === "AbortError" || seq !== dryRun.seq) return;
    if (err instanceof api.ApiError && err.status === 422) {
      fill(box, h("p", { class: "error-text" }, `Not valid yet — ${err.message}`));
      box.dataset.state = "invalid";
    } else {
      fill(box, h("p", { class: "error-text" }, err.message));
      box.dataset.state = "error";
      if (err instanceof api.ApiError && err.isAuth) ctx.showError(err);
    }
  } finally {
    if (seq === dryRun.seq) box.removeAttribute("aria-busy");
  }
}

function renderDryRun(matrices) {
  const totals = matrices.length ? `${matrices.length} matrix${matrices.length > 1 ? "es" : ""}` : "no matrices";
  const cell = (label, cls, text) => h("td", { class: cls, "data-label": label }, text);
  fill($("#pf-dry"), h("div", { class: "table-wrap" }, h("table", { class: "data dry-table stack-narrow" },
    h("caption", {}, `Dry run: ${totals} (nothing stored). Choose a row's “Spectrum” to see what is kept.`),
    h("thead", {}, h("tr", {}, ["#", "Matrix", "Shape", "Kind", "k", "Energy kept", "‖W−W′‖F", "Relative", ""].map(
      (t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, matrices.map((m) => h("tr", { dataset: { type: m.type, layer: String(m.layer) } },
      cell("Intervention", "num", String(m.index + 1)),
      h("th", { scope: "row" }, `${m.type} · layer ${m.layer}`),
      cell("Shape", "", `${m.shape[0]}×${m.shape[1]}`),
      cell("Kind", "", m.kind),
      cell("k", "num k", isNum(m.k) ? String(m.k) : "–"),
      cell("Energy kept", "num", pct(m.retained_energy, 2)),
      cell("‖W−W′‖F", "num", sig(m.frobenius_error)),
      cell("Relative error", "num", pct(m.relative_frobenius_error, 1)),
      h("td", {}, h("button", { type: "button", class: "ghost small", "aria-label": `Spectrum of ${m.type} layer ${m.layer}`,
        onclick: () => {
          $("#sp-type").value = m.type;
          $("#sp-layer").value = String(m.layer);
          $("#sp-k").value = isNum(m.k) ? String(m.k) : "";
          showSpectrum(m.type, m.layer, m.k);
          $("#sp-form").scrollIntoView({ behavior: "smooth", block: "start" });
        } }, "Spectrum"))))))));
}

// -- create --------------------------------------------------------------------------------------------

async function create() {
  const body = profileBody();
  const status = $("#pf-status");
  const name = $("#pf-name");
  if (!name.checkValidity()) {
    status.textContent = "Name: 1–64 letters, digits, '.', '_' or '-', starting with a letter or digit.";
    name.focus();
    return;
  }
  try {
    const created = await api.createProfile(body);
    status.textContent = `Created ${created.name} (${created.matrices} matrices).`;
    ctx.toast(`Profile ${created.name} created`);
    name.value = "";
    await ctx.refreshProfiles();
  } catch (err) {
    status.textContent = err.message;
    if (err instanceof api.ApiError && err.isAuth) ctx.showError(err);
  }
}

// -- spectrum ------------------------------------------------------------------------------------------

async function showSpectrum(type, layer, k) {
  const out = $("#sp-out");
  out.dataset.state = "loading";
  fill(out, h("p", { class: "muted" }, `Decomposing ${type} layer ${layer}…`));
  try {
    const spec = await api.spectrum(type, layer, isNum(k) ? k : null);
    const kept = spec.k;
    fill(out,
      h("div", { class: "chart-wrap" }, spectrumChart(spec, { k: kept })),
      h("dl", { class: "facts" },
        fact("Matrix", `${spec.type} · layer ${spec.layer} (${spec.shape[0]}×${spec.shape[1]})`),
        fact("Parameter", spec.param_name),
        fact("σ max / min", `${sig(spec.sigma_max)} / ${sig(spec.sigma_min)}`),
        fact("Above MP threshold", `${spec.mp_rank} of ${spec.singular_values.length}`),
        fact("Effective rank", num(spec.effective_rank, 1)),
        fact("Stable rank", num(spec.stable_rank, 2)),
        kept ? fact("Kept k", `${kept} · energy ${pct(spec.retained_energy, 2)} · rel. error ${pct(spec.relative_frobenius_error, 1)}`) : null));
    out.dataset.state = "ready";
  } catch (err) {
    fill(out, h("p", { class: "error-text" }, err.message));
    out.dataset.state = "error";
    if (err instanceof api.ApiError && err.isAuth) ctx.showError(err);
  }
}

const fact = (term, value) => [h("dt", {}, term), h("dd", {}, value)];
