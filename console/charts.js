// Inline SVG charts drawn from the API's numbers: error bars for 95% intervals, distributions from
// histogram buckets, stacked bars per interval, meters. Every chart is role="img" with a text summary.
const NS = "http://www.w3.org/2000/svg";
export const COLORS = ["#1d4ed8", "#b45309", "#047857", "#7e22ce", "#be123c"];

export function color(i) {
  return COLORS[i % COLORS.length];
}

/** An SVG element; attributes with null/undefined values are left out. */
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return el;
}

function frame(width, height, summary) {
  // scales with its container (CSS: .chart { width: 100%; max-width: <width>px })
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": summary });
  svg.style.maxWidth = `${width}px`;
  return svg;
}

/** Short labels for axis ticks: 20%, 150 ms, 1.5 s. */
export const tick = {
  pct: (x) => `${+(x * 100).toPrecision(3)}%`,
  time: (s) => (s >= 1 ? `${+s.toPrecision(2)} s` : `${+(s * 1000).toPrecision(2)} ms`),
};

function linear(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

function niceTicks(min, max, count = 5) {
  const raw = (max - min) / count || 1;
  const step = 10 ** Math.floor(Math.log10(raw));
  const nice = [1, 2, 2.5, 5, 10].map((m) => m * step).find((m) => m >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(min / nice) * nice; v <= max + nice * 1e-9; v += nice) ticks.push(+v.toPrecision(12));
  return ticks;
}

/** One row per variant: a dot at the value and a bar over its 95% interval. `rows`: {name, index,
 *  value, low, high, data} (data: attributes for the row's <g>, e.g. the exact numbers). */
export function intervalChart({ label, rows, min, max, format, tickFormat = format }) {
  const width = 600, rowH = 34, top = 8, left = 110, right = 190, axisH = 26;
  const height = top + rows.length * rowH + axisH;
  const x = linear(min, max, left, width - right);
  const summary = `${label}. ` + rows.map((r) => (r.value === null
    ? `${r.name}: no data`
    : `${r.name}: ${format(r.value)}, 95% interval ${format(r.low)} to ${format(r.high)}`)).join("; ");
  const svg = frame(width, height, summary);
  const axisY = top + rows.length * rowH + 4;
  for (const t of niceTicks(min, max)) {
    svg.append(s("line", { class: "grid", x1: x(t), x2: x(t), y1: top, y2: axisY }));
    svg.append(s("text", { x: x(t), y: axisY + 15, "text-anchor": "middle" }, tickFormat(t)));
  }
  svg.append(s("line", { class: "axis", x1: left, x2: width - right, y1: axisY, y2: axisY }));
  rows.forEach((r, i) => {
    const y = top + i * rowH + rowH / 2, c = color(r.index);
    const g = s("g", { class: "row", ...r.data }, s("text", { x: left - 8, y: y + 4, "text-anchor": "end" }, r.name));
    if (r.value === null) {
      g.append(s("text", { x: width - right + 8, y: y + 4 }, "no data"));
    } else {
      const lo = r.low ?? r.value, hi = r.high ?? r.value;
      g.append(
        s("title", {}, `${r.name}: ${format(r.value)} [${format(lo)}, ${format(hi)}]`),
        s("line", { x1: x(lo), x2: x(hi), y1: y, y2: y, stroke: c, "stroke-width": 2.5 }),
        s("line", { x1: x(lo), x2: x(lo), y1: y - 7, y2: y + 7, stroke: c, "stroke-width": 2 }),
        s("line", { x1: x(hi), x2: x(hi), y1: y - 7, y2: y + 7, stroke: c, "stroke-width": 2 }),
        s("circle", { cx: x(r.value), cy: y, r: 5.5, fill: c }),
        s("text", { x: width - right + 8, y: y + 4 }, `${format(r.value)} [${format(lo)}, ${format(hi)}]`),
      );
    }
    svg.append(g);
  });
  return svg;
}

function logTicks(lo, hi) {
  const decades = Math.log10(hi / lo);
  const steps = decades > 2.5 ? [1] : decades > 1.2 ? [1, 3] : [1, 2, 5]; // labels that do not collide
  const ticks = [];
  for (let d = Math.floor(Math.log10(lo)); d <= Math.ceil(Math.log10(hi)); d++) {
    for (const m of steps) {
      const v = m * 10 ** d;
      if (v >= lo && v <= hi) ticks.push(v);
    }
  }
  return ticks;
}

/** Histograms on a log time axis, one band per variant, with p50 (dashed) and p95 (dotted) marked.
 *  `rows`: {name, index, buckets: [[lower_s, upper_s, count]], p50, p95 ([est, low, high] | null), n, data}. */
export function distributionChart({ label, rows, format, tickFormat = format }) {
  const width = 600, bandH = 54, top = 6, left = 110, right = 190, axisH = 26;
  const all = rows.flatMap((r) => r.buckets);
  const height = top + rows.length * bandH + axisH;
  const lows = all.map(([lo, hi]) => (lo > 0 ? lo : hi / 1.2));
  const dMin = all.length ? Math.min(...lows) : 1e-3, dMax = all.length ? Math.max(...all.map((b) => b[1])) : 1;
  const lx = linear(Math.log10(dMin), Math.log10(dMax), left, width - right);
  const x = (v) => lx(Math.log10(Math.max(v, dMin)));
  const summary = `${label}. ` + rows.map((r) => (r.p50
    ? `${r.name}: median ${format(r.p50[0])}, 95th percentile ${r.p95 ? format(r.p95[0]) : "–"}, ${r.n} answers`
    : `${r.name}: no data`)).join("; ");
  const svg = frame(width, height, summary);
  const axisY = top + rows.length * bandH + 2;
  for (const t of logTicks(dMin, dMax)) {
    svg.append(s("line", { class: "grid", x1: x(t), x2: x(t), y1: top, y2: axisY }));
    svg.append(s("text", { x: x(t), y: axisY + 15, "text-anchor": "middle" }, tickFormat(t)));
  }
  svg.append(s("line", { class: "axis", x1: left, x2: width - right, y1: axisY, y2: axisY }));
  rows.forEach((r, i) => {
    const base = top + (i + 1) * bandH - 6, c = color(r.index);
    const peak = Math.max(1, ...r.buckets.map((b) => b[2]));
    const g = s("g", { class: "row", ...r.data }, s("text", { x: left - 8, y: base - 14, "text-anchor": "end" }, r.name));
    for (const [lo, hi, count] of r.buckets) {
      const h = (count / peak) * (bandH - 14);
      const x0 = lo > 0 ? x(lo) : x(hi / 1.2);
      g.append(s("rect", { x: x0, y: base - h, width: Math.max(1, x(hi) - x0 - 0.5), height: h, fill: c, opacity: 0.75 },
        s("title", {}, `${format(lo)}–${format(hi)}: ${count}`)));
    }
    for (const [q, dash] of [[r.p50, "4 3"], [r.p95, "1 3"]]) {
      if (q) g.append(s("line", { x1: x(q[0]), x2: x(q[0]), y1: base - bandH + 10, y2: base, stroke: "#15181e", "stroke-width": 1.5, "stroke-dasharray": dash }));
    }
    const text = r.p50 ? `p50 ${format(r.p50[0])} · p95 ${format(r.p95[0])}` : "no data";
    g.append(s("text", { x: width - right + 8, y: base - 14 }, text), s("text", { x: width - right + 8, y: base }, `n = ${r.n}`));
    svg.append(g);
  });
  return svg;
}

/** Stacked bars, one per interval. `series`: [{t, s, ...counts}]; `keys`: [[key, label, colour]]. */
export function stackedBars({ label, series, keys, width = 420, height = 110 }) {
  const left = 30, bottom = 18, top = 6;
  const totals = series.map((p) => keys.reduce((sum, [k]) => sum + (p[k] || 0), 0));
  const peak = Math.max(1, ...totals);
  const summary = `${label}: ` + keys.map(([k, name]) => `${name} ${series.reduce((a, p) => a + (p[k] || 0), 0)}`).join(", ");
  const svg = frame(width, height, summary);
  const y = linear(0, peak, height - bottom, top);
  const slot = (width - left) / Math.max(series.length, 1);
  svg.append(s("line", { class: "axis", x1: left, x2: width, y1: height - bottom, y2: height - bottom }));
  svg.append(s("text", { x: left - 4, y: top + 10, "text-anchor": "end" }, String(peak)));
  svg.append(s("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, "0"));
  series.forEach((p, i) => {
    let acc = 0;
    for (const [k, name, c] of keys) {
      const v = p[k] || 0;
      if (!v) continue;
      svg.append(s("rect", { x: left + i * slot + 1, y: y(acc + v), width: Math.max(1, slot - 2), height: y(acc) - y(acc + v), fill: c },
        s("title", {}, `${name}: ${v} in ${p.s} s`)));
      acc += v;
    }
  });
  svg.append(s("text", { x: left, y: height - 3 }, `${Math.round(series.reduce((a, p) => a + p.s, 0) / 60 * 10) / 10} min`));
  svg.append(s("text", { x: width, y: height - 3, "text-anchor": "end" }, "now"));
  return svg;
}

/** A horizontal meter for a 0..1 value, with its text beside it. */
export function meter(value, text, colour = COLORS[0]) {
  const w = 80, hgt = 10;
  const svg = s("svg", { width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}`, "aria-hidden": "true" },
    s("rect", { x: 0, y: 0, width: w, height: hgt, rx: 2, fill: "#e5e7eb" }),
    s("rect", { x: 0, y: 0, width: Math.max(0, Math.min(1, value)) * w, height: hgt, rx: 2, fill: colour }));
  const span = document.createElement("span");
  span.className = "meter";
  span.append(svg, document.createTextNode(text));
  return span;
}
