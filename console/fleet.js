// Fleet: every backend's live state, cache hit rates and policy actions over the last minutes,
// polled every 2 s while this view is shown and the tab is visible.
import { fmt, getJSON, h } from "./api.js";
import { COLORS, meter, stackedBars } from "./charts.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
let timer = null, active = false;

function badge(text, kind) {
  return h("span", { class: `badge ${kind}` }, text);
}

function num(value, digits = 0) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function backendRow(b) {
  const health = b.healthy ? badge("healthy", "ok") : badge("unhealthy", "bad");
  const breaker = badge(b.breaker.replace("_", "-"), b.breaker === "closed" ? "ok" : b.breaker === "open" ? "bad" : "warn");
  const limit = b.max_concurrency ? ` / ${b.max_concurrency}` : "";
  const kv = b.kv_usage === null ? "–" : meter(b.kv_usage, fmt.pct(b.kv_usage), b.kv_usage >= 0.9 ? "#be123c" : COLORS[2]);
  const share = b.share === null ? "–" : meter(b.share, `${fmt.pct(b.share)} (${b.routed})`);
  return h("tr", { "data-backend": b.name, "data-state": b.state },
    h("th", { scope: "row" }, b.name, h("div", { class: "muted" }, `${b.type}${b.model ? ` · ${b.model}` : ""}`)),
    h("td", { "data-field": "health" }, health,
      b.usable || b.state === "unhealthy" ? null : h("div", { class: "muted" }, b.state.replace(/_/g, " "))),
    h("td", { "data-field": "breaker" }, breaker),
    h("td", { class: "num", "data-field": "outstanding" }, `${b.outstanding}${limit}`),
    h("td", { class: "num", "data-field": "waiting" }, num(b.waiting) + (b.max_waiting !== null ? ` / ${b.max_waiting}` : "")),
    h("td", { class: "num", "data-field": "running" }, num(b.running)),
    h("td", { "data-field": "kv_usage" }, kv),
    h("td", { "data-field": "share" }, share));
}

function render(f) {
  const minutes = (f.window_s / 60).toFixed(1);
  const when = new Date(f.time * 1000).toLocaleTimeString();
  $("fleet-status").textContent = `${f.status === "ready" ? "Ready" : "Degraded"} · updated ${when} · `
    + `worker ${f.worker} · rates over the last ${minutes} min · Redis ${f.redis ?? "not configured"}`;
  $("fleet-status").dataset.status = f.status;
  $("fleet-degraded").replaceChildren(...f.degraded.map((line) => h("li", {}, line)));
  $("fleet-backends").tBodies[0].replaceChildren(...f.backends.map(backendRow));
  const c = f.cache;
  $("fleet-cache").replaceChildren(
    h("dt", {}, "Exact hit rate"), h("dd", { "data-field": "exact_rate" }, fmt.pct(c.exact_rate)),
    h("dt", {}, "Semantic hit rate"), h("dd", { "data-field": "semantic_rate" }, fmt.pct(c.semantic_rate)),
    h("dt", {}, "Lookups"), h("dd", { "data-field": "lookups" },
      `${c.lookups} (${c.exact} exact, ${c.semantic} semantic, ${c.miss} miss, ${c.error} skipped on error)`));
  $("fleet-cache-chart").replaceChildren(
    stackedBars({ label: "Cache lookups per 10 seconds", series: f.series,
      keys: [["exact", "exact hits", COLORS[2]], ["semantic", "semantic hits", COLORS[3]], ["miss", "misses", "#9ca3af"], ["error", "errors", COLORS[4]]] }),
    h("figcaption", {}, "Cache lookups per 10 s: exact hits (green), semantic hits (purple), misses (grey)."));
  const actions = Object.entries(f.policy);
  $("fleet-policy").tBodies[0].replaceChildren(...(actions.length
    ? actions.map(([key, n]) => { const [dir, what] = key.split(":"); return h("tr", {}, h("td", {}, dir), h("td", {}, what), h("td", { class: "num" }, String(n))); })
    : [h("tr", {}, h("td", { colspan: 3, class: "muted" }, "No policy action in the window."))]));
  $("fleet-policy-chart").replaceChildren(
    stackedBars({ label: "Policy actions per 10 seconds", series: f.series, keys: [["policy", "actions", COLORS[1]]], height: 80 }),
    h("figcaption", {}, "Policy actions (blocks, masks, flags) per 10 s."));
}

async function poll(onAuthError) {
  if (!active) return;
  if (document.visibilityState === "visible") {
    try {
      render(await getJSON("/console/api/fleet"));
    } catch (err) {
      if (onAuthError(err)) return;
      $("fleet-status").textContent = `Cannot read the fleet: ${err.message}`;
    }
  }
  if (active) timer = setTimeout(() => poll(onAuthError), POLL_MS);
}

export const fleet = {
  onAuthError: () => false,
  init(onAuthError) {
    this.onAuthError = onAuthError;
  },
  show() {
    if (active) return;
    active = true;
    poll(this.onAuthError);
  },
  hide() {
    active = false;
    clearTimeout(timer);
  },
  reset() {
    this.hide();
  },
};
