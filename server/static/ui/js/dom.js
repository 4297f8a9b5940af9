// Small DOM and formatting helpers. Elements are built with properties and text nodes, never innerHTML,
// so text from the model or the server can never become markup.

const SVG_NS = "http://www.w3.org/2000/svg";
const PROPERTIES = new Set(["value", "checked", "disabled", "selected", "hidden", "indeterminate", "open"]);

/**
 * ``h("button", {class: "primary", onclick: fn}, "Run")``. Tags prefixed ``svg:`` are SVG elements.
 * ``text`` sets textContent, ``dataset`` the data-* attributes, ``on<event>`` adds a listener.
 */
export function h(tag, props, ...children) {
  const svg = tag.startsWith("svg:");
  const el = svg ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") el.textContent = String(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (!svg && PROPERTIES.has(key)) el[key] = value;
    else el.setAttribute(key === "className" ? "class" : key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** Run ``fn`` once typing pauses for ``ms``. */
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// -- formatting --------------------------------------------------------------------------------------

export const isNum = (x) => typeof x === "number" && Number.isFinite(x);
export const pct = (x, digits = 1) => (isNum(x) ? `${(100 * x).toFixed(digits)}%` : "–");
export const num = (x, digits = 3) => (isNum(x) ? x.toFixed(digits) : "–");
export const signed = (x, digits = 2) => (isNum(x) ? `${x > 0 ? "+" : x < 0 ? "−" : "±"}${Math.abs(x).toFixed(digits)}` : "–");
export const points = (x, digits = 1) => (isNum(x) ? `${signed(100 * x, digits)} pts` : "–");

/** Short number for axes and cells: 3 significant digits, exponent when very large or small. */
export function sig(x, digits = 3) {
  if (!isNum(x)) return "–";
  if (x !== 0 && (Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3)) return x.toExponential(digits - 1);
  return Number(x.toPrecision(digits)).toString();
}

export function duration(seconds) {
  if (!isNum(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

/** Length in Unicode code points (how the server counts characters). */
export const codePoints = (s) => [...s].length;
