// Entry point: the API key field, the tabs, the model line, the shared profile list and the alert banner.
// Each tab is a module with ``init(ctx)``; they share state only through ``ctx``.

import * as api from "./api.js";
import { $, $$, fill, h } from "./dom.js";
import * as playground from "./playground.js";
import * as profiles from "./profiles.js";
import * as sweeps from "./sweeps.js";

const TABS = ["playground", "profiles", "sweeps"];
const TAB_MODULES = { playground, profiles, sweeps };

/** Shared between the tabs: the model description, the profile list and a few UI services. */
const ctx = {
  info: null,
  profiles: [],
  bus: new EventTarget(),
  /** Reload the profile list (after a create, delete or promote) and tell every tab. */
  async refreshProfiles() {
    ctx.profiles = await api.listProfiles();
    ctx.bus.dispatchEvent(new CustomEvent("profiles", { detail: ctx.profiles }));
    return ctx.profiles;
  },
  toast,
  showError,
  selectTab,
};

// -- alerts --------------------------------------------------------------------------------------------

const alertBox = () => $("#alert");

/** Show an error in the banner (auth errors explain what to do with the key field). */
function showError(err) {
  if (err?.name === "AbortError") return;
  const box = alertBox();
  let message;
  if (err instanceof api.ApiError && err.status === 401) {
    message = [h("strong", {}, "401 — this server needs an API key. "),
      `Enter it in the API key field above and press “Use key”. (${err.message})`];
  } else if (err instanceof api.ApiError && err.status === 403) {
    message = [h("strong", {}, "403 — this key may not do that. "),
      `Changing profiles, datasets and jobs needs the admin key. (${err.message})`];
  } else {
    message = [h("strong", {}, err instanceof api.ApiError && err.status ? `${err.status} — ` : "Error — "),
      String(err?.message || err)];
  }
  fill(box, h("span", {}, message), h("button", { type: "button", class: "ghost small", "aria-label": "Dismiss",
    onclick: clearError }, "×"));
  box.dataset.status = err instanceof api.ApiError ? String(err.status) : "";
  box.hidden = false;
}

function clearError() {
  alertBox().hidden = true;
  fill(alertBox());
}

let toastTimer = null;
function toast(message) {
  const t = $("#toast");
  t.textContent = message;
  t.classList.add("visible");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.classList.remove("visible"), 4000);
}

// -- tabs ----------------------------------------------------------------------------------------------

function selectTab(name, { focus = false, updateHash = true } = {}) {
  if (!TABS.includes(name)) name = "playground";
  for (const t of TABS) {
    const tab = $(`#tab-${t}`);
    const on = t === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`#panel-${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  if (updateHash && location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  TAB_MODULES[name].shown?.(ctx);
}

function wireTabs() {
  for (const t of TABS) $(`#tab-${t}`).addEventListener("click", () => selectTab(t));
  $(".tabs").addEventListener("keydown", (e) => {
    const i = TABS.findIndex((t) => $(`#tab-${t}`).getAttribute("aria-selected") === "true");
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: TABS.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    selectTab(TABS[(next + TABS.length) % TABS.length], { focus: true });
  });
  window.addEventListener("hashchange", () => selectTab(location.hash.slice(1), { updateHash: false }));
}

// -- API key -------------------------------------------------------------------------------------------

function wireKey() {
  const input = $("#api-key");
  input.value = api.getKey();
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    api.setKey(input.value.trim());
    clearError();
    load();
  });
  $("#key-clear").addEventListener("click", () => {
    api.setKey("");
    input.value = "";
    toast("Key forgotten");
    load();
  });
  api.onAuthError((err) => {
    showError(err);
    if (err.status === 401) input.focus();
  });
}

// -- start ---------------------------------------------------------------------------------------------

function modelLine(info) {
  const types = Object.keys(info.laser_types || {}).join(", ");
  return `${info.model_id} · ${info.architecture || info.model_type} · ${info.num_layers} layers · ` +
    `${info.device} ${info.dtype} · LASER types ${types} · v${info.version}`;
}

let loaded = false;

/** (Re)load what every tab needs; runs at start and whenever a key is entered. */
async function load() {
  try {
    if (!ctx.info) {
      ctx.info = await api.info();
      $("#model-line").textContent = modelLine(ctx.info);
      for (const m of Object.values(TAB_MODULES)) m.init(ctx);
    }
    await ctx.refreshProfiles();
    clearError();
    if (!loaded) {
      loaded = true;
      selectTab(location.hash.slice(1) || "playground", { updateHash: false });
    } else {
      const current = TABS.find((t) => !$(`#panel-${t}`).hidden);
      TAB_MODULES[current].shown?.(ctx);
    }
    document.body.dataset.ready = "true";
  } catch (err) {
    if (!ctx.info) $("#model-line").textContent = "server not reachable or still loading — retrying";
    showError(err);
    if (!ctx.info && !(err instanceof api.ApiError && err.isAuth)) setTimeout(load, 3000);
  }
}

wireTabs();
wireKey();
$$(".panel").forEach((p, i) => { p.hidden = i !== 0; });
load();
