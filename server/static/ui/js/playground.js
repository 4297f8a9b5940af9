// Playground: the same prompt on two or more profiles, answers streamed side by side, the first differing
// token marked, a token view coloured by how the other profile rates each token, and a score mode that
// shows each profile's log-probs of candidate answers and which one it picks.

import * as api from "./api.js";
import { divergingColor } from "./charts.js";
import { $, $$, codePoints, fill, h, isNum, num, signed } from "./dom.js";

const TOKEN_SCALE = 3; // nats of log-prob difference that get the full colour

let ctx;
let selected = [];        // profile names in the order they were picked (the first is the reference)
let controller = null;    // aborts the running request(s)
let lastRun = null;       // {prompt, columns} of the last generation, for the token view
let defaulted = false;    // the default selection is made once, so unticking everything sticks

export function init(c) {
  ctx = c;
  ctx.bus.addEventListener("profiles", renderChips);
  ctx.bus.addEventListener("compare", (e) => {
    selected = e.detail.filter((n) => ctx.profiles.some((p) => p.name === n));
    renderChips();
  });
  const form = $("#pg-form");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    run();
  });
  for (const ta of $$("textarea", form)) {
    ta.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        form.requestSubmit();
      }
    });
  }
  for (const r of $$("input[name=pg-mode]")) r.addEventListener("change", modeChanged);
  $("#pg-stop-run").addEventListener("click", () => controller?.abort());
  $("#pg-token-view").addEventListener("change", (e) => {
    $("#pg-legend").hidden = !(e.target.checked && lastRun?.tokenView);
    if (e.target.checked && lastRun && !lastRun.tokenView) tokenView(lastRun);
    else if (lastRun) renderColumns(lastRun, e.target.checked && lastRun.tokenView);
  });
  renderChips();
}

const mode = () => $("input[name=pg-mode]:checked").value;

function modeChanged() {
  const score = mode() === "score";
  $("#pg-generate").hidden = score;
  $("#pg-score").hidden = !score;
  $("#pg-token-view").closest("label").hidden = score;
}

// -- profile chips -------------------------------------------------------------------------------------

function renderChips() {
  const names = ctx.profiles.map((p) => p.name);
  selected = selected.filter((n) => names.includes(n));
  if (!defaulted && names.length) {  // the first time: base and the first profile
    selected = names.slice(0, 2);
    defaulted = true;
  }
  const box = $("#pg-profiles");
  fill(box, ctx.profiles.map((p) => {
    const i = selected.indexOf(p.name);
    const input = h("input", { type: "checkbox", value: p.name, checked: i >= 0, onchange: (e) => {
      if (e.target.checked) selected.push(p.name);
      else selected = selected.filter((n) => n !== p.name);
      renderChips();
      $(`#pg-profiles input[value="${CSS.escape(p.name)}"]`)?.focus();
    } });
    return h("label", { class: `chip${i >= 0 ? " on" : ""}`, title: p.description || "" }, input, p.name,
      i === 0 ? h("span", { class: "tag" }, "reference") : null);
  }));
}

// -- running -------------------------------------------------------------------------------------------

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function generateParams() {
  const params = {
    prompt: $("#pg-prompt").value,
    max_new_tokens: numberOrNull("#pg-max") ?? 24,
    temperature: numberOrNull("#pg-temp") ?? 0,
    top_p: numberOrNull("#pg-top-p") ?? 1,
    top_k: numberOrNull("#pg-top-k") ?? 0,
  };
  const seed = numberOrNull("#pg-seed");
  if (seed !== null) params.seed = seed;
  const stop = $("#pg-stop").value.split(",").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s.length);
  if (stop.length) params.stop = stop;
  return params;
}

async function run() {
  controller?.abort();
  if (!selected.length) {
    ctx.showError(new Error("pick at least one profile (two or more to compare)"));
    return;
  }
  controller = new AbortController();
  const signal = controller.signal;
  $("#pg-run").disabled = true;
  $("#pg-stop-run").disabled = false;
  $("#pg-output").dataset.state = "running";
  try {
    if (mode() === "score") await runScore(signal);
    else await runGenerate(signal);
  } catch (err) {
    ctx.showError(err);
  } finally {
    $("#pg-run").disabled = false;
    $("#pg-stop-run").disabled = true;
    $("#pg-output").dataset.state = "done";
  }
}

async function runGenerate(signal) {
  const params = generateParams();
  const columns = selected.map((profile) => ({ profile, pieces: [], text: "", finish: null, usage: null,
    tag: "", error: null, started: performance.now(), seconds: null }));
  const runState = { prompt: params.prompt, columns, tokenView: null };
  lastRun = runState;
  $("#pg-legend").hidden = true;
  fill($("#pg-summary"), h("span", { class: "muted" }, `Generating with ${columns.length} profile(s)…`));
  renderColumns(runState, false);
  await Promise.all(columns.map(async (col) => {
    try {
      for await (const ev of api.generateStream(col.profile, params, {
        signal, onOpen: (res) => { col.tag = res.headers.get("X-Laser-Profile") || ""; },
      })) {
        if (!col.tag) col.tag = profileTag(ev);
        if (ev.text) {
          col.pieces.push({ text: ev.text });
          col.text += ev.text;
          appendPiece(col, ev.text);
        }
        if (ev.finish_reason) {
          col.finish = ev.finish_reason;
          col.usage = ev.usage || null;
        }
      }
    } catch (err) {
      if (err.name === "AbortError") col.finish = "stopped";
      else col.error = err;
    }
    col.seconds = (performance.now() - col.started) / 1000;
    renderColumn(runState, col, false);
  }));
  renderColumns(runState, false);
  summarize(runState);
  const failed = columns.find((c) => c.error);
  if (failed) throw failed.error;
  if ($("#pg-token-view").checked && columns.length >= 2 && !signal.aborted) await tokenView(runState);
}

/** A short identity of the profile's edits, where the server sends one (a hash field or header). */
function profileTag(ev) {
  for (const [k, v] of Object.entries(ev)) {
    if (/hash|fingerprint/i.test(k) && (typeof v === "string" || typeof v === "number")) return String(v);
  }
  return "";
}

// -- columns -------------------------------------------------------------------------------------------

function columnEl(col) {
  return $(`#pg-output .column[data-profile="${CSS.escape(col.profile)}"]`);
}

function renderColumns(runState, colored) {
  const out = $("#pg-output");
  out.classList.toggle("score-mode", false);
  fill(out, runState.columns.map((col, i) => h("article", { class: `column${i === 0 ? " reference" : ""}`,
    dataset: { profile: col.profile }, "aria-label": `Answer of ${col.profile}` },
  h("header", {}, h("h3", {}, col.profile), h("span", { class: "tag-slot" }),
    i === 0 && runState.columns.length > 1 ? h("span", { class: "tag" }, "reference") : null),
  h("div", { class: "answer", dataset: { done: "false" } }, h("span", { class: "prompt" }, runState.prompt)),
  h("p", { class: "status small muted" }, "streaming…"),
  h("div", { class: "changes small" }))));
  for (const col of runState.columns) renderColumn(runState, col, colored);
}

function appendPiece(col, text) {
  const el = columnEl(col);
  if (el) $(".answer", el).append(h("span", { class: "tok" }, text));
}

function renderColumn(runState, col, colored) {
  const el = columnEl(col);
  if (!el) return;
  const done = col.finish !== null || col.error !== null;
  const pieces = colored && runState.tokenView ? runState.tokenView[runState.columns.indexOf(col)] : col.pieces;
  const answer = $(".answer", el);
  fill(answer, h("span", { class: "prompt" }, runState.prompt), pieces.map((p, j) => {
    const span = h("span", { class: "tok", dataset: { i: String(j) } }, p.text);
    if (colored && isNum(p.delta)) {
      span.style.backgroundColor = divergingColor(p.delta, TOKEN_SCALE);
      span.title = `“${p.text}”: log p ${num(p.self, 2)} here, ${num(p.other, 2)} under ${p.otherName} ` +
        `(Δ ${signed(p.delta)})`;
      span.classList.add("scored");
    }
    return span;
  }));
  answer.dataset.done = String(done);
  fill($(".tag-slot", el), col.tag ? h("code", { class: "hash", title: "profile hash" }, col.tag) : null);
  const status = $(".status", el);
  if (col.error) {
    status.textContent = `error: ${col.error.message}`;
    status.classList.add("error-text");
  } else if (done) {
    const toks = col.usage?.completion_tokens ?? col.pieces.length;
    status.textContent = `${toks} tokens · ${col.finish} · ${col.seconds?.toFixed(1) ?? "?"} s`;
  }
  fill($(".changes", el), colored && runState.tokenView ? biggestChanges(pieces) : null);
  markFirstDifference(runState, colored);
}

function biggestChanges(pieces) {
  const scored = pieces.filter((p) => isNum(p.delta)).sort((a, b) => Math.abs(b.delta) - Math.abs(a.delta)).slice(0, 3);
  if (!scored.length) return null;
  return h("p", {}, `Largest changes under ${scored[0].otherName}: `, scored.map((p, i) => [i ? ", " : "",
    h("q", {}, visible(p.text)), ` ${signed(p.delta)}`]));
}

/** Whitespace made visible, for tokens quoted on their own. */
const visible = (text) => text.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";

// -- first difference ----------------------------------------------------------------------------------

function firstDiff(a, b) {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** Index of the piece that holds character ``at`` (-1 past the end). */
function pieceAt(pieces, at) {
  let pos = 0;
  for (let i = 0; i < pieces.length; i++) {
    pos += pieces[i].text.length;
    if (at < pos) return i;
  }
  return -1;
}

function differences(runState, colored) {
  const cols = runState.columns;
  const piecesOf = (i) => (colored && runState.tokenView ? runState.tokenView[i] : cols[i].pieces);
  const textOf = (i) => piecesOf(i).map((p) => p.text).join("");
  const ref = textOf(0);
  return cols.slice(1).map((col, k) => {
    const i = k + 1;
    const text = textOf(i);
    if (text === ref) return { i, same: true };
    const at = firstDiff(ref, text);
    return { i, same: false, at, token: pieceAt(piecesOf(i), at), refToken: pieceAt(piecesOf(0), at) };
  });
}

function markFirstDifference(runState, colored) {
  if (runState.columns.some((c) => c.finish === null && c.error === null)) return;
  for (const el of $$("#pg-output .tok.first-diff")) {
    el.classList.remove("first-diff");
    el.removeAttribute("aria-description");
  }
  const mark = (colIndex, token) => {
    if (token < 0) return;
    const el = columnEl(runState.columns[colIndex]);
    const span = el && $(`.answer .tok[data-i="${token}"]`, el);
    if (span) {
      span.classList.add("first-diff");
      span.setAttribute("aria-description", "first differing token");
    }
  };
  const diffs = differences(runState, colored);
  let refToken = Infinity;
  for (const d of diffs.filter((x) => !x.same)) {
    mark(d.i, d.token);
    if (d.refToken >= 0) refToken = Math.min(refToken, d.refToken);
  }
  if (Number.isFinite(refToken)) mark(0, refToken);
}

function summarize(runState) {
  const cols = runState.columns;
  const box = $("#pg-summary");
  if (cols.length < 2) {
    fill(box, "Pick a second profile to compare answers.");
    box.dataset.state = "done";
    return;
  }
  const ref = cols[0].profile;
  const items = differences(runState, false).map((d) => {
    const name = cols[d.i].profile;
    if (d.same) return h("li", { class: "same" }, h("strong", {}, name), ` gives the same answer as ${ref}.`);
    const pieces = cols[d.i].pieces;
    const theirs = d.token >= 0 ? pieces[d.token].text : "(end)";
    const ours = d.refToken >= 0 ? cols[0].pieces[d.refToken].text : "(end)";
    return h("li", { class: "differs" }, h("strong", {}, name), " differs from ", h("strong", {}, ref),
      ` from token ${d.token >= 0 ? d.token + 1 : pieces.length + 1} on: `, h("q", {}, visible(theirs)), " instead of ",
      h("q", {}, visible(ours)), ".");
  });
  fill(box, h("ul", { class: "diff-list" }, items));
  box.dataset.state = "done";
}

// -- token view ----------------------------------------------------------------------------------------

/**
 * Each profile's answer re-scored token by token under its own weights and under the other profile's
 * (the reference for every other column; the second profile for the reference's own column).
 */
async function tokenView(runState) {
  const cols = runState.columns;
  if (cols.length < 2 || cols.some((c) => c.error || c.finish === null)) return;  // still streaming or failed
  const out = $("#pg-output");
  out.dataset.tokenView = "loading";
  const otherOf = (i) => (i === 0 ? 1 : 0);
  const texts = cols.map((c) => runState.prompt + c.text);
  // per profile: which column texts it must score (its own answer and the answers it is "the other" for)
  const jobs = cols.map((c, p) => cols.map((_, i) => i).filter((i) => i === p || otherOf(i) === p));
  try {
    const scored = await Promise.all(jobs.map((idx, p) => api.tokenLogprobs(cols[p].profile, idx.map((i) => texts[i]))));
    const lookup = (p, i) => scored[p][jobs[p].indexOf(i)];
    runState.tokenView = cols.map((c, i) => {
      const self = lookup(i, i);
      const other = lookup(otherOf(i), i);
      return answerTokens(self, other, c.text, cols[otherOf(i)].profile);
    });
    $("#pg-legend").hidden = false;
    renderColumns(runState, true);
    out.dataset.tokenView = "ready";
  } catch (err) {
    out.dataset.tokenView = "failed";
    ctx.showError(err);
  }
}

/** The generated part of a scored (prompt + answer) text: tokens with both log-probs and their difference. */
function answerTokens(self, other, answer, otherName) {
  const lens = self.tokens.map(codePoints);
  const total = lens.reduce((a, b) => a + b, 0);
  // The tokens join to the scored text (a BOS the tokenizer adds shows up in front), so the answer is its
  // tail: counting from the end keeps the split right whatever the prompt side looks like.
  const start = Math.max(0, total - codePoints(answer));
  const pieces = [];
  let pos = 0;
  self.tokens.forEach((tok, j) => {
    const end = pos + lens[j];
    if (end > start) {
      const text = [...tok].slice(Math.max(0, start - pos)).join("");
      const s = self.logprobs[j];
      const o = other.logprobs[j];
      pieces.push({ text, self: s, other: o, delta: isNum(s) && isNum(o) ? o - s : null, otherName });
    }
    pos = end;
  });
  return pieces;
}

// -- score mode ----------------------------------------------------------------------------------------

async function runScore(signal) {
  lastRun = null;
  $("#pg-legend").hidden = true;
  if (selected.length < 2) throw new Error("score mode compares profiles: pick at least two");
  const candidates = $("#pg-candidates").value.split("\n").filter((s) => s.trim().length);
  if (!candidates.length) throw new Error("give at least one candidate answer");
  const score = { context: $("#pg-context").value, continuations: candidates,
    normalize: $("#pg-normalize").checked };
  fill($("#pg-summary"), h("span", { class: "muted" }, "Scoring…"));
  const res = await api.compareScore(selected, score, { signal });
  renderScore(res, candidates, score.normalize);
}

function renderScore(res, candidates, normalize) {
  const profiles = res.profiles;
  const scores = res.score;
  const ref = scores[0];
  const key = (c) => (normalize ? c.mean_logprob : c.logprob);
  const table = h("table", { class: "data score-table" },
    h("caption", {}, `log P(answer | context) per profile${normalize ? ", picked by the per-token mean" : ""}; ` +
      "Δ is against the reference"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Answer"),
      profiles.map((p, i) => h("th", { scope: "col" }, p, i === 0 ? h("span", { class: "tag" }, "reference") : null)))),
    h("tbody", {}, candidates.map((cand, j) => h("tr", {}, h("th", { scope: "row" }, h("q", {}, cand)),
      scores.map((s, i) => {
        const c = s.continuations[j];
        const picked = s.argmax === j;
        return h("td", { class: picked ? "picked" : "", dataset: { profile: profiles[i] } },
          h("span", { class: "lp" }, num(key(c), 3)),
          i > 0 ? h("span", { class: "delta small" }, ` Δ ${signed(key(c) - key(ref.continuations[j]))}`) : null,
          h("span", { class: "small muted" }, ` · ${c.n_tokens} tok`),
          picked ? h("span", { class: "pick" }, " ✓ picked") : null);
      })))),
    h("tfoot", {}, h("tr", {}, h("th", { scope: "row" }, "Picks"),
      scores.map((s, i) => h("td", { class: "pick-cell", dataset: { profile: profiles[i] } },
        h("q", {}, candidates[s.argmax]))))));
  const out = $("#pg-output");
  out.classList.add("score-mode");
  fill(out, h("div", { class: "table-wrap card" }, table));
  const changed = scores.slice(1).filter((s) => s.argmax !== ref.argmax).map((_, k) => profiles[k + 1]);
  const pickOf = (s) => candidates[s.argmax];
  fill($("#pg-summary"), changed.length
    ? h("p", {}, h("strong", {}, changed.join(", ")), ` pick${changed.length === 1 ? "s" : ""} a different answer than `,
      h("strong", {}, profiles[0]), " (", h("q", {}, pickOf(ref)), ").")
    : h("p", {}, "Every profile picks ", h("q", {}, pickOf(ref)), "."));
  $("#pg-summary").dataset.state = "done";
}
