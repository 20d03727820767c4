// The token (this tab's sessionStorage), authenticated requests, and a small DOM builder.
const TOKEN_KEY = "llm-gateway.console.token";

export class AuthError extends Error {}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function authHeaders(extra = {}) {
  return { authorization: `Bearer ${token()}`, ...extra };
}

/** The error message of an OpenAI-shaped error response, else its status text. */
export async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || response.statusText;
  } catch {
    return response.statusText || `HTTP ${response.status}`;
  }
}

/** GET a console API path as JSON; 401 and 403 raise AuthError (the app signs out). */
export async function getJSON(path) {
  const response = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    throw new AuthError(`Refused (${response.status}): ${await errorMessage(response)}`);
  }
  if (!response.ok) throw new Error(`${response.status}: ${await errorMessage(response)}`);
  return response.json();
}

/** h("td", {class: "num"}, "3") -> an element; attributes with null/undefined/false values are left out. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return el;
}

export const fmt = {
  pct: (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(2)}%`),
  ms: (s) => (s === null || s === undefined ? "–" : `${(s * 1000).toFixed(s >= 0.0995 ? 0 : 1)} ms`),
  num: (x, digits = 2) => (x === null || x === undefined ? "–" : x.toFixed(digits)),
  p: (p) => (p < 0.001 ? "p < 0.001" : `p = ${p.toFixed(3)}`),
};
