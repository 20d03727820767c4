// Experiments: the `ab-report --json` document for a window, as charts: rates with their 95%
// intervals as error bars, TTFT and latency distributions, tokens/s, feedback; significance against
// control in words. Every row of a chart carries its exact numbers as data-* attributes.
import { fmt, getJSON, h } from "./api.js";
import { COLORS, distributionChart, intervalChart, tick } from "./charts.js";

const $ = (id) => document.getElementById(id);
const RATES = [["error_rate", "error rate"], ["block_rate", "policy-block rate"],
  ["cache_hit_rate", "cache-hit rate"], ["disconnect_rate", "disconnect rate"]];
const MEANS = [["tokens_per_s", "tokens/s", (x) => fmt.num(x, 1)], ["feedback", "feedback", (x) => fmt.num(x, 2)]];
const DISTRIBUTIONS = [["ttft", "Time to first token"], ["latency", "Latency"]];

function value(entry, kind) {
  return kind === "rate" ? entry.rate : entry.mean;
}

/** Significance against control, in words. */
function verdict(name, control, label, entry, base, kind, format) {
  if (!("p" in entry)) return null;
  const v = value(entry, kind), c = value(base, kind);
  if (entry.p === null || v === null || c === null) {
    return h("li", {}, `${name}'s ${label} cannot be compared with ${control}'s yet: not enough data on one side.`);
  }
  const dir = v > c ? "higher than" : v < c ? "lower than" : "the same as";
  const tail = entry.significant
    ? `the difference is statistically significant (${fmt.p(entry.p)}).`
    : `the difference is not significant (${fmt.p(entry.p)}): it may be chance.`;
  return h("li", { class: entry.significant ? "significant" : null, "data-metric": label },
    `${name}'s ${label} (${format(v)}) is ${dir} ${control}'s (${format(c)}); ${tail}`);
}

function attrs(entry) {
  // the exact numbers behind a chart row (String() of a number round-trips it)
  return Object.fromEntries(Object.entries(entry).filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => [`data-${k}`, String(v)]));
}

function rateRows(names, variants, key) {
  return names.map((name, index) => {
    const e = variants[name][key];
    const [low, high] = e.ci;
    return { name, index, value: e.rate, low, high,
      data: attrs({ variant: name, metric: key, rate: e.rate, low, high, count: e.count, p: e.p }) };
  });
}

function meanRows(names, variants, key) {
  return names.map((name, index) => {
    const e = variants[name][key];
    const [low, high] = e.ci ?? [e.mean, e.mean];
    return { name, index, value: e.mean, low, high,
      data: attrs({ variant: name, metric: key, mean: e.mean, low: e.ci?.[0], high: e.ci?.[1], n: e.n, p: e.p }) };
  });
}

function span(rows, floor) {
  const points = rows.filter((r) => r.value !== null).flatMap((r) => [r.low, r.high]);
  const lo = Math.min(floor, ...points), hi = Math.max(...points, lo);
  if (!(hi - lo > 1e-9)) return [lo - 0.5, hi + 0.5]; // one value (or none): a unit around it
  return [lo, hi + (hi - lo) * 0.08];
}

function chartFigure(title, svg, caption) {
  return h("figure", { class: "panel", "data-chart": title }, h("h4", {}, title), svg, caption ? h("figcaption", {}, caption) : null);
}

function experiment(model, rep, windowLabel) {
  const names = Object.keys(rep.variants), variants = rep.variants, control = rep.control;
  const legend = h("p", { class: "legend" }, names.map((n, i) => {
    const el = h("span", {}, n === control ? `${n} (control)` : n);
    el.style.setProperty("--swatch", COLORS[i % COLORS.length]);
    return el;
  }));
  const summary = h("table", {}, h("caption", {}, `Requests and tokens, ${windowLabel}`),
    h("thead", {}, h("tr", {}, ["Variant", "Requests", "Tokens in", "Tokens out"].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, names.map((n) => h("tr", { "data-variant": n }, h("th", { scope: "row" }, n),
      h("td", { class: "num", "data-field": "requests" }, String(variants[n].requests)),
      h("td", { class: "num" }, String(variants[n].tokens_in)), h("td", { class: "num" }, String(variants[n].tokens_out))))));
  const verdicts = names.filter((n) => n !== control).flatMap((n) => [
    ...RATES.map(([k, label]) => verdict(n, control, label, variants[n][k], variants[control][k], "rate", fmt.pct)),
    ...MEANS.map(([k, label, f]) => verdict(n, control, label, variants[n][k], variants[control][k], "mean", f)),
  ]).filter(Boolean);
  const charts = [];
  for (const [key, label] of RATES) {
    const rows = rateRows(names, variants, key);
    const [, max] = span(rows, 0);
    charts.push(chartFigure(label[0].toUpperCase() + label.slice(1),
      intervalChart({ label: `${label} with 95% intervals`, rows, min: 0, max: Math.min(1, Math.max(max, 0.01)),
        format: fmt.pct, tickFormat: tick.pct }),
      "Dot: the rate; bar: its 95% Wilson interval."));
  }
  for (const [key, label, f] of MEANS) {
    const rows = meanRows(names, variants, key);
    const [min, max] = span(rows, key === "feedback" ? Infinity : 0);
    charts.push(chartFigure(label === "tokens/s" ? "Tokens per second" : "Feedback",
      intervalChart({ label: `mean ${label} with 95% intervals`, rows, min: Number.isFinite(min) ? min : 0, max: Number.isFinite(max) ? max : 1, format: f }),
      "Dot: the mean per request; bar: its 95% Student-t interval."));
  }
  for (const [key, label] of DISTRIBUTIONS) {
    const rows = names.map((name, index) => {
      const e = variants[name][key];
      return { name, index, buckets: e.histogram, p50: e.p50, p95: e.p95, n: e.n,
        data: attrs({ variant: name, metric: key, n: e.n, p50: e.p50?.[0], p95: e.p95?.[0] }) };
    });
    charts.push(chartFigure(label, distributionChart({ label: `${label} distribution`, rows, format: fmt.ms, tickFormat: tick.time }),
      "Answers per bucket (log time axis); dashed: median, dotted: 95th percentile."));
  }
  return h("article", { class: "experiment panel", "data-model": model },
    h("h3", {}, model), h("p", { class: "muted" }, `Control: ${control}. Window: ${windowLabel}. A difference from control counts as significant at p < 0.05.`),
    legend, summary,
    h("h4", {}, "Against control"),
    verdicts.length ? h("ul", { class: "verdicts" }, verdicts) : h("p", { class: "muted" }, "Only one variant: nothing to compare."),
    h("div", { class: "charts" }, charts));
}

async function load(onAuthError) {
  const since = $("ex-since").value;
  const label = $("ex-since").selectedOptions[0].textContent;
  $("ex-status").textContent = "Loading…";
  try {
    const doc = await getJSON(`/console/api/experiments?since=${encodeURIComponent(since)}`);
    const models = Object.entries(doc.experiments);
    $("ex-list").replaceChildren(...models.map(([m, rep]) => experiment(m, rep, label)));
    $("ex-list").dataset.windowS = String(doc.window_s);
    $("ex-status").textContent = `${models.length} experiment(s), ${label} (${doc.window_s} s).`;
  } catch (err) {
    if (onAuthError(err)) return;
    $("ex-status").textContent = `Cannot read the experiments: ${err.message}`;
  }
}

export const experiments = {
  onAuthError: () => false,
  init(onAuthError) {
    this.onAuthError = onAuthError;
    $("ex-form").addEventListener("submit", (e) => { e.preventDefault(); load(this.onAuthError); });
    $("ex-since").addEventListener("change", () => load(this.onAuthError));
  },
  show() {
    load(this.onAuthError);
  },
  hide() {},
  reset() {
    $("ex-list").replaceChildren();
  },
};
