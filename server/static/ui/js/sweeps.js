// Sweeps: start one on a built-in or uploaded dataset, follow its progress and ETA, watch the heatmap fill
// cell by cell from the job's events, sort the per-config table, read the test report and verdict, and
// promote the winner to a profile.

import * as api from "./api.js";
import { divergingColor, needsLightText } from "./charts.js";
import { $, $$, duration, fill, h, isNum, num, pct, points, signed } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const DEFAULT_TYPES = ["fc_in", "fc_out"];

let ctx;
/** The job on screen: its record, rows by key, the event subscription and the table's sort order. */
let view = null;

export function init(c) {
  ctx = c;
  const types = Object.keys(ctx.info.laser_types);
  const defaults = types.filter((t) => DEFAULT_TYPES.includes(t));
  fill($("#sw-types"), types.map((t) => h("label", { class: "chip" },
    h("input", { type: "checkbox", name: "sw-type", value: t, checked: (defaults.length ? defaults : types.slice(0, 1)).includes(t),
      onchange: (e) => e.target.closest("label").classList.toggle("on", e.target.checked) }), t)));
  $$("#sw-types input:checked").forEach((i) => i.closest("label").classList.add("on"));
  $("#sw-form").addEventListener("submit", (e) => {
    e.preventDefault();
    start();
  });
  $("#ds-file").addEventListener("change", fileChosen);
  $("#ds-form").addEventListener("submit", (e) => {
    e.preventDefault();
    upload();
  });
  $("#jobs-refresh").addEventListener("click", () => refreshJobs().catch(ctx.showError));
  $("#job-cancel").addEventListener("click", cancel);
  $("#job-promote").addEventListener("submit", (e) => {
    e.preventDefault();
    promote();
  });
}

let shownOnce = false;

export async function shown() {
  try {
    await refreshDatasets();
    const jobs = await refreshJobs();
    if (!shownOnce && !view && jobs.length) {
      const active = jobs.find((j) => !TERMINAL.has(j.state)) || jobs[0];
      openJob(active.id);
    }
    shownOnce = true;
  } catch (err) {
    ctx.showError(err);
  }
}

// -- datasets ------------------------------------------------------------------------------------------

async function refreshDatasets(select) {
  const datasets = await api.listDatasets();
  const box = $("#sw-dataset");
  const keep = select || box.value;
  fill(box, datasets.map((d) => h("option", { value: d.name, selected: d.name === keep },
    `${d.name} — ${d.kind.replace("_", " ")}, ${d.size} examples${d.builtin ? " (built in)" : ""}`)));
  return datasets;
}

function fileChosen() {
  const file = $("#ds-file").files[0];
  if (!file) return;
  const stem = file.name.replace(/\.[^.]+$/, "").replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[^A-Za-z0-9]+/, "");
  if (!$("#ds-name").value) $("#ds-name").value = stem.slice(0, 64) || "dataset";
  $("#ds-format").value = /\.jsonl$|\.txt$/i.test(file.name) ? "jsonl" : "bigbench";
}

async function upload() {
  const file = $("#ds-file").files[0];
  const status = $("#ds-status");
  const errors = $("#ds-errors");
  fill(errors);
  if (!file) {
    status.textContent = "Choose a file first.";
    $("#ds-file").focus();
    return;
  }
  if (!$("#ds-name").checkValidity()) {
    status.textContent = "Name: 1–64 letters, digits, '.', '_' or '-', starting with a letter or digit.";
    $("#ds-name").focus();
    return;
  }
  status.textContent = "Uploading…";
  try {
    const d = await api.uploadDataset({ name: $("#ds-name").value, format: $("#ds-format").value,
      content: await file.text() });
    status.textContent = `Stored ${d.name}: ${d.size} ${d.kind.replace("_", " ")} examples.`;
    $("#ds-form").reset();
    await refreshDatasets(d.name);
  } catch (err) {
    status.textContent = err.message;
    const bad = err.body?.errors;
    if (Array.isArray(bad)) {
      fill(errors, bad.slice(0, 20).map((e) => h("li", {}, e.line ? `line ${e.line}: ${e.message}` : e.message)),
        bad.length > 20 ? h("li", {}, `… and ${bad.length - 20} more`) : null);
      status.textContent = `Nothing stored: ${bad.length} bad row(s).`;
    }
    if (err instanceof api.ApiError && err.isAuth) ctx.showError(err);
  }
}

// -- starting ------------------------------------------------------------------------------------------

/** "all", "1,2,-1" or Python-like ranges "20:30", "-5:" (resolved with the model's layer count). */
function parseLayers(text) {
  const t = text.trim().toLowerCase();
  if (t === "all") return "all";
  const n = ctx.info.num_layers;
  const out = [];
  for (const part of t.split(/[\s,]+/).filter(Boolean)) {
    const range = part.match(/^(-?\d*):(-?\d*)$/);
    if (range) {
      const norm = (v, d) => (v === "" ? d : Number(v) < 0 ? n + Number(v) : Number(v));
      for (let l = norm(range[1], 0); l < Math.min(norm(range[2], n), n); l++) out.push(l);
    } else if (/^-?\d+$/.test(part)) {
      out.push(Number(part));
    } else {
      throw new Error(`layers: cannot read “${part}”; use ints, a range like 20:30, or all`);
    }
  }
  if (!out.length) throw new Error("layers: give at least one layer, or all");
  return out;
}

function parseRhos(text) {
  const rhos = text.split(/[\s,]+/).filter(Boolean).map(Number);
  if (!rhos.length || rhos.some((r) => !(r > 0 && r <= 1))) throw new Error("ρ: numbers in (0, 1], comma separated");
  return rhos;
}

const optionalInt = (id) => ($(id).value.trim() === "" ? undefined : Number($(id).value));

async function start() {
  const status = $("#sw-status");
  let body;
  try {
    const types = $$("#sw-types input:checked").map((i) => i.value);
    if (!types.length) throw new Error("types: pick at least one");
    body = {
      dataset: $("#sw-dataset").value, strategy: $("#sw-strategy").value, kind: $("#sw-kind").value, types,
      layers: parseLayers($("#sw-layers").value), rhos: parseRhos($("#sw-rhos").value),
      seed: optionalInt("#sw-seed") ?? 0, max_validation_examples: optionalInt("#sw-max-val"),
      max_test_examples: optionalInt("#sw-max-test"), max_configs: optionalInt("#sw-max-configs"),
    };
  } catch (err) {
    status.textContent = err.message;
    return;
  }
  status.textContent = "Starting…";
  $("#sw-start").disabled = true;
  try {
    const job = await api.startSweep(body);
    status.textContent = `Started ${job.id}.`;
    await refreshJobs();
    await openJob(job.id, job);
    $("#job-view").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (err) {
    status.textContent = err.message;
    if (err instanceof api.ApiError && err.isAuth) ctx.showError(err);
  } finally {
    $("#sw-start").disabled = false;
  }
}

// -- jobs list -----------------------------------------------------------------------------------------

async function refreshJobs() {
  const jobs = await api.listJobs();
  fill($("#jobs-list"), jobs.length ? jobs.slice(0, 12).map((j) => h("li", {},
    h("button", { type: "button", class: `job-link${view?.id === j.id ? " current" : ""}`, onclick: () => openJob(j.id),
      "aria-label": `Open job ${j.id} on ${j.dataset}, ${j.state}` },
    h("span", { class: `state ${j.state}` }, j.state), h("span", { class: "mono" }, j.id),
    h("span", { class: "muted small" }, `${j.dataset} · ${j.done}/${j.total ?? "?"}`))))
    : h("li", { class: "muted" }, "No sweeps yet."));
  return jobs;
}

// -- one job -------------------------------------------------------------------------------------------

async function openJob(id, record) {
  view?.controller.abort();
  const v = { id, job: null, rows: new Map(), controller: new AbortController(), sort: { key: "step", dir: 1 } };
  view = v;
  $$("#jobs-list .job-link").forEach((b) => b.classList.toggle("current", b.getAttribute("aria-label")?.includes(id)));
  $("#job-view").hidden = false;
  fill($("#job-report"));
  $("#job-promote").hidden = true;
  fill($("#job-promote-status"));
  try {
    const job = record || await api.getJob(id);
    if (view !== v) return;
    v.job = job;
    for (const r of job.rows || []) v.rows.set(r.key, r);
    buildHeatmap(v);
    renderJob(v);
    if (!TERMINAL.has(job.state)) follow(v);
  } catch (err) {
    ctx.showError(err);
  }
}

/** Apply the job's events as they come: progress, a heatmap cell per finished config, the final state. */
async function follow(v) {
  try {
    for await (const ev of api.jobEvents(v.id, { signal: v.controller.signal })) {
      if (view !== v) return;
      Object.assign(v.job, { state: ev.state, done: ev.done, total: ev.total, progress: ev.progress,
        elapsed_s: ev.elapsed_s, eta_s: ev.eta_s, best: ev.best ?? v.job.best, error: ev.error ?? v.job.error });
      if (ev.last) v.rows.set(ev.last.key, ev.last);
      if (ev.last?.role === "base") v.job.base = ev.last;
      renderJob(v);
      if (ev.event === "state" && TERMINAL.has(ev.state)) break;
    }
    if (view !== v) return;
    const final = await api.getJob(v.id);  // the full table, the test report and the verdict
    if (view !== v) return;
    v.job = final;
    v.rows = new Map(final.rows.map((r) => [r.key, r]));
    renderJob(v);
    refreshJobs().catch(() => {});
    if (!TERMINAL.has(final.state)) follow(v);  // the stream ended early (a proxy timeout): listen again
  } catch (err) {
    if (err.name !== "AbortError") ctx.showError(err);
  }
}

function resolvedLayers(config) {
  const n = ctx.info.num_layers;
  const layers = config.layers === "all" || !Array.isArray(config.layers)
    ? Array.from({ length: n }, (_, i) => i)
    : config.layers.map((l) => (l < 0 ? n + l : l));
  return [...new Set(layers)].sort((a, b) => a - b);
}

const rhoKey = (rho) => (isNum(rho) ? String(Number(rho.toPrecision(10))) : "none");
const cellKey = (type, layer, rho) => `${type}|${layer}|${rhoKey(rho)}`;

function buildHeatmap(v) {
  const config = v.job.config || {};
  const layers = resolvedLayers(config);
  const rhos = [...new Set((config.rhos || [null]).map(Number))].sort((a, b) => b - a);
  const types = config.types || [];
  fill($("#job-heatmap"), types.map((type) => h("figure", { class: "heatmap" },
    h("figcaption", {}, h("strong", {}, type), h("span", { class: "muted small" }, " · rows ρ, columns layer")),
    h("div", { class: "table-wrap" }, h("table", { class: "heat", dataset: { type } },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, h("span", { class: "sr-only" }, "ρ \\ layer"), "ρ"),
        layers.map((l) => h("th", { scope: "col" }, String(l))))),
      h("tbody", {}, rhos.map((rho) => h("tr", {}, h("th", { scope: "row" }, isNum(rho) ? String(rho) : "MP"),
        layers.map((layer) => h("td", { class: "cell", dataset: { key: cellKey(type, layer, rho), state: "pending" },
          "aria-label": `${type}, layer ${layer}, ρ ${rho}: not run yet` }, "·"))))))))));
}

function renderJob(v) {
  const job = v.job;
  const base = [...v.rows.values()].find((r) => r.role === "base") || job.base;
  const baseAcc = base?.validation?.accuracy;
  fill($("#job-title"), `Sweep ${job.id} `, h("span", { class: `state ${job.state}` }, job.state),
    h("span", { class: "muted small" }, ` · ${job.dataset}${job.n_validation ? ` · ${job.n_validation} validation / ${job.n_test} test examples` : ""}`));
  $("#job-cancel").hidden = TERMINAL.has(job.state);
  const progress = $("#job-progress");
  progress.value = isNum(job.progress) ? job.progress : 0;
  const eta = !TERMINAL.has(job.state) && isNum(job.eta_s) ? ` · about ${duration(job.eta_s)} left` : "";
  $("#job-progress-text").textContent = `${job.done}/${job.total ?? "?"} steps · ${pct(job.progress, 0)} · ` +
    `${duration(job.elapsed_s)} elapsed${eta}`;
  const best = job.best;
  fill($("#job-best"), best?.validation
    ? ["Best on validation: ", h("strong", { class: "mono" }, best.key), ` — ${pct(best.validation.accuracy)}`,
      isNum(baseAcc) ? ` (base ${pct(baseAcc)}, ${points(best.validation.accuracy - baseAcc)})` : ""]
    : isNum(baseAcc) ? `Base on validation: ${pct(baseAcc)}` : "Waiting for the first step…");
  paintCells(v, baseAcc);
  renderTable(v);
  renderReport(v);
}

function paintCells(v, baseAcc) {
  const configs = [...v.rows.values()].filter((r) => r.role === "config" && r.validation);
  const deltas = configs.map((r) => (isNum(baseAcc) ? r.validation.accuracy - baseAcc : 0));
  const scale = Math.max(0.05, ...deltas.map(Math.abs));
  const bestKey = v.job.best?.key;
  for (const r of configs) {
    const cell = $(`#job-heatmap td[data-key="${CSS.escape(cellKey(r.type, r.layer, r.rho))}"]`);
    if (!cell) continue;
    const acc = r.validation.accuracy;
    const delta = isNum(baseAcc) ? acc - baseAcc : null;
    cell.textContent = r.rejected ? "✕" : (100 * acc).toFixed(acc === 1 ? 0 : 1);
    cell.style.backgroundColor = r.rejected ? "" : divergingColor(delta ?? 0, scale);
    cell.classList.toggle("light", !r.rejected && needsLightText(delta ?? 0, scale));
    cell.classList.toggle("best", r.key === bestKey);
    cell.classList.toggle("rejected", Boolean(r.rejected));
    cell.dataset.state = "done";
    const what = `${r.type}, layer ${r.layer}, ρ ${r.rho}: validation accuracy ${pct(acc)}` +
      (isNum(delta) ? `, ${points(delta)} vs base` : "") + (r.rejected ? `, rejected: ${r.rejected}` : "") +
      (r.key === bestKey ? ", best so far" : "");
    cell.setAttribute("aria-label", what);
    cell.title = what;
  }
}

// -- table ---------------------------------------------------------------------------------------------

const COLUMNS = [
  { key: "step", label: "#", value: (r) => r.step, show: (r) => String(r.step + 1) },
  { key: "key", label: "Config", value: (r) => r.key, show: (r) => r.key, cls: "mono" },
  { key: "type", label: "Type", value: (r) => r.type ?? "", show: (r) => r.type ?? "–" },
  { key: "layer", label: "Layer", value: (r) => r.layer ?? -1, show: (r) => (r.layer ?? "–").toString(), cls: "num" },
  { key: "rho", label: "ρ", value: (r) => r.rho ?? -1, show: (r) => (r.rho ?? "–").toString(), cls: "num" },
  { key: "acc", label: "Val. accuracy", value: (r) => r.validation?.accuracy ?? -1, show: (r) => pct(r.validation?.accuracy), cls: "num" },
  { key: "ci", label: "95% CI", value: (r) => r.validation?.ci_low ?? -1,
    show: (r) => (r.validation ? `${pct(r.validation.ci_low, 0)}–${pct(r.validation.ci_high, 0)}` : "–"), cls: "num" },
  { key: "dacc", label: "Δ acc.", value: (r) => r.delta_accuracy ?? -Infinity, show: (r) => points(r.delta_accuracy), cls: "num" },
  { key: "dloss", label: "Δ log-loss", value: (r) => r.delta_log_loss ?? Infinity, show: (r) => signed(r.delta_log_loss, 3), cls: "num" },
  { key: "seconds", label: "Seconds", value: (r) => r.seconds ?? 0, show: (r) => num(r.seconds, 2), cls: "num" },
];

function renderTable(v) {
  const table = $("#job-table");
  const { key, dir } = v.sort;
  fill($("thead", table), h("tr", {}, COLUMNS.map((c) => h("th", { scope: "col",
    "aria-sort": c.key === key ? (dir > 0 ? "ascending" : "descending") : "none", class: c.cls || "" },
  h("button", { type: "button", class: "sort", dataset: { key: c.key }, onclick: () => {
    v.sort = { key: c.key, dir: key === c.key ? -dir : c.key === "acc" || c.key === "dacc" ? -1 : 1 };
    renderTable(v);
    $(`#job-table button.sort[data-key="${c.key}"]`)?.focus();
  } }, c.label, h("span", { class: "arrow", "aria-hidden": "true" }, c.key === key ? (dir > 0 ? " ▲" : " ▼") : ""))))));
  const col = COLUMNS.find((c) => c.key === key);
  const rows = [...v.rows.values()].filter((r) => r.role === "base" || r.role === "config");
  rows.sort((a, b) => {
    const x = col.value(a);
    const y = col.value(b);
    return (x < y ? -1 : x > y ? 1 : a.step - b.step) * dir;
  });
  const bestKey = v.job.best?.key;
  fill($("tbody", table), rows.map((r) => h("tr", { class: `${r.role}${r.key === bestKey ? " best" : ""}${r.rejected ? " rejected" : ""}`,
    dataset: { key: r.key }, title: r.rejected || "" },
  COLUMNS.map((c) => h("td", { class: c.cls || "" }, c.show(r))))));
}

// -- report, promote, cancel ---------------------------------------------------------------------------

function renderReport(v) {
  const job = v.job;
  const box = $("#job-report");
  const t = job.test;
  const verdict = job.verdict || t?.verdict;
  if (!verdict && !job.error) {
    fill(box);
    $("#job-promote").hidden = true;
    return;
  }
  const acc = (a) => (a ? `${pct(a.accuracy)} [${pct(a.ci_low, 1)}, ${pct(a.ci_high, 1)}] (${a.n_correct}/${a.n})` : "–");
  fill(box, h("h3", {}, "Test report"),
    job.error ? h("p", { class: "error-text" }, `Failed: ${job.error}`) : null,
    t ? h("dl", { class: "facts" },
      h("dt", {}, "Winner"), h("dd", { class: "mono" }, t.winner_key),
      h("dt", {}, "Base on test"), h("dd", {}, acc(t.base)),
      h("dt", {}, "Winner on test"), h("dd", {}, acc(t.winner)),
      h("dt", {}, "Gain"), h("dd", {}, points(t.delta_accuracy)),
      h("dt", {}, "Exact McNemar"), h("dd", {}, `p = ${num(t.mcnemar.p_value, 3)} · only base right ${t.mcnemar.only_base}` +
        ` · only winner right ${t.mcnemar.only_winner}`)) : null,
    verdict ? h("p", { id: "job-verdict", class: `verdict ${t?.significant ? "significant" : "not-significant"}` },
      h("strong", {}, "Verdict: "), verdict) : null);
  const promotable = ["succeeded", "cancelled"].includes(job.state) && job.best && job.best.key !== "base" &&
    (job.best.interventions || []).length > 0;
  $("#job-promote").hidden = !promotable;
  if (promotable && !$("#job-promote-name").value) {
    $("#job-promote-name").value = `best-${job.dataset}`.replace(/[^A-Za-z0-9._-]+/g, "-").slice(0, 64);
  }
}

async function promote() {
  const v = view;
  const name = $("#job-promote-name");
  const status = $("#job-promote-status");
  if (!name.checkValidity()) {
    status.textContent = "Name: 1–64 letters, digits, '.', '_' or '-'.";
    name.focus();
    return;
  }
  try {
    const p = await api.promoteJob(v.id, { name: name.value, replace: $("#job-promote-replace").checked });
    await ctx.refreshProfiles();
    fill(status, `Profile ${p.name} created. `, h("button", { type: "button", class: "link", onclick: () => {
      ctx.bus.dispatchEvent(new CustomEvent("compare", { detail: ["base", p.name] }));
      ctx.selectTab("playground");
    } }, `Compare ${p.name} with base in the Playground →`));
    ctx.toast(`Promoted ${v.job.best.key} as ${p.name}`);
  } catch (err) {
    fill(status, h("span", { class: "error-text" }, err.message));
    if (err instanceof api.ApiError && err.isAuth) ctx.showError(err);
  }
}

async function cancel() {
  const v = view;
  if (!v) return;
  try {
    v.job = await api.cancelJob(v.id);
    renderJob(v);
    refreshJobs().catch(() => {});
  } catch (err) {
    ctx.showError(err);
  }
}
