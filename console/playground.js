// Playground: chat through the normal /v1/chat/completions (policies, cache, limits and A/B apply),
// streamed with a ReadableStream SSE reader; beside each answer its variant, backend, cache result
// (response headers), time to first token (measured here) and tokens (the usage chunk).
import { authHeaders, errorMessage, getJSON, h } from "./api.js";

const $ = (id) => document.getElementById(id);
let history = [];
let running = null; // the AbortController of the answer being streamed

function metaList(fields) {
  const dl = h("dl", { class: "meta" });
  for (const [key, label] of fields) dl.append(h("dt", {}, label), h("dd", { "data-field": key }, "…"));
  return dl;
}

const FIELDS = [["variant", "Variant"], ["backend", "Backend"], ["cache", "Cache"], ["ttft", "First token"],
  ["tokens", "Tokens"], ["total", "Total time"]];

function addTurn(role, text) {
  const bubble = h("div", { class: "bubble" }, text);
  const li = h("li", { class: `turn ${role}` }, bubble, role === "assistant" ? metaList(FIELDS) : h("div"));
  $("pg-log").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function setField(li, key, value) {
  li.querySelector(`[data-field="${key}"]`).textContent = value;
}

/** Split SSE text into events; returns the unfinished tail. */
function events(buffer, onData) {
  const parts = buffer.replace(/\r\n/g, "\n").split("\n\n");
  const tail = parts.pop();
  for (const part of parts) {
    const data = part.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
    if (data) onData(data);
  }
  return tail;
}

async function ask(prompt) {
  const model = $("pg-model").value;
  const messages = [...history, { role: "user", content: prompt }];
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = $("pg-temperature").value;
  if (temperature !== "") body.temperature = Number(temperature);
  const headers = authHeaders({ "content-type": "application/json" });
  if ($("pg-nocache").checked) headers["x-gateway-cache"] = "no-cache";
  addTurn("user", prompt);
  const li = addTurn("assistant", "");
  const bubble = li.querySelector(".bubble");
  running = new AbortController();
  const started = performance.now();
  let text = "", firstToken = null, usage = null, failed = null;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: running.signal });
    setField(li, "variant", response.headers.get("x-gateway-variant") || "–");
    setField(li, "backend", response.headers.get("x-gateway-backend") || "–");
    setField(li, "cache", response.headers.get("x-gateway-cache") || "–");
    if (!response.ok) throw new Error(`${response.status}: ${await errorMessage(response)}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = events(buffer + value, (data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) { failed = chunk.error.message; return; }
        if (chunk.usage) usage = chunk.usage;
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) {
          if (firstToken === null) {
            firstToken = performance.now() - started;
            setField(li, "ttft", `${firstToken.toFixed(0)} ms`);
          }
          text += piece;
          bubble.textContent = text;
        }
      });
    }
  } catch (err) {
    failed = err.name === "AbortError" ? "stopped" : err.message;
  } finally {
    running = null;
  }
  const total = performance.now() - started;
  setField(li, "total", `${total.toFixed(0)} ms`);
  if (firstToken === null) setField(li, "ttft", "–");
  setField(li, "tokens", usage ? `${usage.prompt_tokens} in / ${usage.completion_tokens} out` : "–");
  if (failed) {
    bubble.classList.add("failed");
    bubble.textContent = text ? `${text}\n\n[${failed}]` : failed;
    $("pg-status").textContent = `The answer failed: ${failed}`;
  } else {
    history = [...messages, { role: "assistant", content: text }];
    $("pg-status").textContent = `Answer complete (${usage ? usage.completion_tokens : "?"} tokens, first token after ${firstToken === null ? "–" : firstToken.toFixed(0) + " ms"}).`;
  }
  li.dataset.done = failed ? "failed" : "ok";
}

async function submit(event) {
  event.preventDefault();
  const prompt = $("pg-prompt").value.trim();
  if (!prompt || running) return;
  $("pg-prompt").value = "";
  $("pg-send").disabled = true;
  $("pg-stop").disabled = false;
  $("pg-status").textContent = "Streaming…";
  try {
    await ask(prompt);
  } finally {
    $("pg-send").disabled = false;
    $("pg-stop").disabled = true;
    $("pg-prompt").focus();
  }
}

export const playground = {
  loaded: false,
  init() {
    $("pg-form").addEventListener("submit", submit);
    $("pg-prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("pg-form").requestSubmit();
    });
    $("pg-stop").addEventListener("click", () => running?.abort());
    $("pg-new").addEventListener("click", () => {
      history = [];
      $("pg-log").replaceChildren();
      $("pg-status").textContent = "New conversation.";
    });
  },
  async show() {
    if (this.loaded) return;
    const models = await getJSON("/console/api/models");
    $("pg-model").replaceChildren(...models.data.map((m) => h("option", { value: m.id },
      `${m.id} (${m.variants.map((v) => `${v.name} ${v.weight}`).join(", ")})`)));
    this.loaded = true;
  },
  hide() {},
  reset() {
    this.loaded = false;
    history = [];
    $("pg-log").replaceChildren();
  },
};
