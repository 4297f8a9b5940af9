// Charts drawn as SVG and colour scales: the singular-value spectrum (log scale, kept rank and
// Marchenko-Pastur threshold marked) and the diverging colours of heatmap cells and token views.

import { h, sig } from "./dom.js";

/**
 * Diverging background for a signed value: blue above zero, orange below, white at zero; ``scale`` is the
 * magnitude that gets the full colour. Returns a CSS colour.
 */
export function divergingColor(value, scale) {
  if (!Number.isFinite(value) || scale <= 0) return "";
  const t = Math.max(-1, Math.min(1, value / scale));
  const [r, g, b] = t >= 0 ? [37, 99, 235] : [234, 88, 12];
  const a = 0.12 + 0.68 * Math.abs(t);
  return Math.abs(t) < 1e-9 ? "rgba(148, 163, 184, 0.18)" : `rgba(${r}, ${g}, ${b}, ${a.toFixed(3)})`;
}

/** Whether text on ``divergingColor(value, scale)`` should be light. */
export const needsLightText = (value, scale) => Number.isFinite(value) && Math.abs(value / scale) > 0.6;

function niceLogTicks(lo, hi) {
  const ticks = [];
  const a = Math.floor(Math.log10(lo));
  const b = Math.ceil(Math.log10(hi));
  const steps = b - a <= 2 ? [1, 2, 5] : [1];
  for (let e = a; e <= b; e++) {
    for (const m of steps) {
      const v = m * 10 ** e;
      if (v >= lo * 0.999 && v <= hi * 1.001) ticks.push(v);
    }
  }
  return ticks.length >= 2 ? ticks : [lo, hi];
}

function niceLinearTicks(max, count = 6) {
  const raw = max / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = 0; v <= max; v += step) ticks.push(v);
  return ticks;
}

/**
 * The spectrum of one matrix as an SVG: singular values (log y) against their index, the kept components
 * 1..k highlighted with a line at k, and the Marchenko-Pastur threshold as a dashed line.
 */
export function spectrumChart(spec, { k = null, width = 720, height = 300 } = {}) {
  const S = spec.singular_values.filter((v) => v > 0);
  const n = S.length;
  const m = { left: 62, right: 16, top: 14, bottom: 42 };
  const w = width - m.left - m.right;
  const ht = height - m.top - m.bottom;
  const lo = Math.min(S[n - 1], spec.mp_threshold > 0 ? spec.mp_threshold : Infinity) / 1.3;
  const hi = S[0] * 1.3;
  const x = (i) => m.left + (n <= 1 ? 0 : (i / (n - 1)) * w);
  const y = (v) => m.top + ht * (1 - (Math.log10(v) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo)));
  const kept = k ? Math.min(k, n) : 0;

  const label = `Singular values of ${spec.type} layer ${spec.layer} (${spec.shape[0]}×${spec.shape[1]}) on a log scale` +
    (kept ? `; ${kept} kept` : "") + `; Marchenko-Pastur threshold ${sig(spec.mp_threshold)} (${spec.mp_rank} above it).`;
  const svg = h("svg:svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, class: "chart" });
  svg.append(h("svg:title", {}, label));

  const axes = h("svg:g", { class: "axis" });
  for (const t of niceLogTicks(lo, hi)) {
    axes.append(
      h("svg:line", { x1: m.left, x2: m.left + w, y1: y(t), y2: y(t), class: "grid" }),
      h("svg:text", { x: m.left - 8, y: y(t) + 4, "text-anchor": "end" }, sig(t, 2)),
    );
  }
  for (const t of niceLinearTicks(n)) {
    const xi = x(Math.max(0, t - 1));
    axes.append(
      h("svg:line", { x1: xi, x2: xi, y1: m.top + ht, y2: m.top + ht + 5 }),
      h("svg:text", { x: xi, y: m.top + ht + 19, "text-anchor": "middle" }, String(Math.max(1, t))),
    );
  }
  axes.append(
    h("svg:line", { x1: m.left, x2: m.left, y1: m.top, y2: m.top + ht }),
    h("svg:line", { x1: m.left, x2: m.left + w, y1: m.top + ht, y2: m.top + ht }),
    h("svg:text", { x: m.left + w / 2, y: height - 6, "text-anchor": "middle" }, "index i (descending σᵢ)"),
    h("svg:text", { x: 14, y: m.top + ht / 2, "text-anchor": "middle",
      transform: `rotate(-90 14 ${m.top + ht / 2})` }, "σᵢ (log)"),
  );
  svg.append(axes);

  if (kept) {
    svg.append(h("svg:rect", { x: m.left, y: m.top, width: Math.max(2, x(kept - 1) - m.left), height: ht,
      class: "kept-area" }));
  }
  const path = (from, to) => S.slice(from, to).map((v, i) => `${i ? "L" : "M"}${x(from + i).toFixed(1)},${y(v).toFixed(1)}`).join("");
  svg.append(h("svg:path", { d: path(0, n), class: "sv-line" }));
  if (kept) svg.append(h("svg:path", { d: path(0, kept), class: "sv-line kept" }));

  if (spec.mp_threshold > 0) {
    const ym = y(spec.mp_threshold);
    svg.append(
      h("svg:line", { x1: m.left, x2: m.left + w, y1: ym, y2: ym, class: "mp-line" }),
      h("svg:text", { x: m.left + w - 4, y: ym - 6, "text-anchor": "end", class: "mp-label" },
        `MP threshold ${sig(spec.mp_threshold)} · ${spec.mp_rank} above`),
    );
  }
  if (kept) {
    const xk = x(kept - 1);
    const right = xk > m.left + w * 0.75;
    svg.append(
      h("svg:line", { x1: xk, x2: xk, y1: m.top, y2: m.top + ht, class: "k-line" }),
      h("svg:text", { x: right ? xk - 6 : xk + 6, y: m.top + 16, "text-anchor": right ? "end" : "start",
        class: "k-label" }, `k = ${kept}`),
    );
  }
  return svg;
}
