// The console's shell: sign-in (a pasted admin token, kept in sessionStorage), the three views
// behind the URL's hash (#playground, #fleet, #experiments), sign-out when the API refuses the token.
import { AuthError, getJSON, setToken, token } from "./api.js";
import { experiments } from "./experiments.js";
import { fleet } from "./fleet.js";
import { playground } from "./playground.js";

const $ = (id) => document.getElementById(id);
const VIEWS = { playground, fleet, experiments };
let current = null;

function showOnly(id) {
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== id;
}

function signOut(message = "") {
  setToken(null);
  for (const view of Object.values(VIEWS)) view.reset();
  current = null;
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("login-error").textContent = message;
  showOnly("login");
  $("login-token").focus();
}

/** For the views: an AuthError signs out (true: handled). */
function onAuthError(err) {
  if (!(err instanceof AuthError)) return false;
  signOut(err.message);
  return true;
}

async function route() {
  if (!token()) return signOut();
  const name = location.hash.slice(1) in VIEWS ? location.hash.slice(1) : "playground";
  if (current && current !== name) VIEWS[current].hide();
  current = name;
  $("nav").hidden = false;
  $("sign-out").hidden = false;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.view === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  showOnly(`view-${name}`);
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · llm-gateway console`;
  try {
    await VIEWS[name].show();
  } catch (err) {
    if (!onAuthError(err)) console.error(err);
  }
}

async function signIn(event) {
  event.preventDefault();
  setToken($("login-token").value.trim());
  $("login-token").value = "";
  $("login-error").textContent = "Checking…";
  try {
    await getJSON("/console/api/models"); // 401 / 403 here: the token is refused
  } catch (err) {
    signOut(err instanceof AuthError ? err.message : `Cannot reach the gateway: ${err.message}`);
    return;
  }
  $("login-error").textContent = "";
  await route();
  $("main").focus();
}

playground.init();
fleet.init(onAuthError);
experiments.init(onAuthError);
$("login-form").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", route);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && current === "fleet") fleet.show();
});
route();
