// The reading page: login with the token of the link's #fragment, then one task at a time.
// Every answer is posted at once; the server commits it before it replies, so a reload (or a
// restarted server) continues at the first unanswered task.
"use strict";

const FLAGS = [["missed_finding", "missed finding"], ["invented_finding", "invented finding"],
               ["wrong_location", "wrong laterality or location"], ["wrong_severity", "wrong severity"]];
const KEYS_A = "qwert", KEYS_B = "asdfg";
const IDLE_MS = 30000;  // a draft's active time leaves out pauses longer than this

let current = null;     // the task on screen
let active = { ms: 0, last: 0, since: 0 };

const $ = (id) => document.getElementById(id);

function show(section) {
  for (const id of ["login", "pairwise", "draft", "done"]) $(id).hidden = id !== section;
}

function error(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, credentials: "same-origin",
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = new Error(data.error || `HTTP ${response.status}`);
    err.status = response.status;
    throw err;
  }
  return data;
}

function setProgress(answered, total) {
  $("progress").textContent = `${answered} of ${total} answered`;
}

async function login(token) {
  welcome(await api("POST", "/api/login", { token }));
}

function welcome(me) {
  $("who").textContent = me.centre ? `${me.name} (${me.centre})` : me.name;
  $("logout").hidden = false;
  setProgress(me.answered, me.total);
}

async function next() {
  error("");
  const task = await api("GET", "/api/task");
  if (task.done_all) {
    setProgress(task.answered, task.total);
    current = null;
    show("done");
    return;
  }
  current = task;
  setProgress(task.answered, task.total);
  if (task.kind === "pairwise") renderPairwise(task); else renderDraft(task);
}

function buildControls() {
  for (const box of document.querySelectorAll(".scale")) {
    const side = box.dataset.side, keys = side === "a" ? KEYS_A : KEYS_B;
    for (let v = 1; v <= 5; v++) {
      const label = document.createElement("label");
      label.innerHTML = `<input type="radio" name="accept_${side}" value="${v}"> ${v} <kbd>${keys[v - 1]}</kbd>`;
      box.appendChild(label);
    }
    box.insertAdjacentText("beforeend", " (1 unacceptable - 5 acceptable as is)");
  }
  for (const box of document.querySelectorAll(".flags")) {
    for (const [value, text] of FLAGS) {
      const label = document.createElement("label");
      label.innerHTML = `<input type="checkbox" name="flags_${box.dataset.side}" value="${value}"> ${text}`;
      box.appendChild(label);
    }
  }
}

function renderPairwise(task) {
  for (const input of $("pairwise").querySelectorAll("input")) input.checked = false;
  $("pw-findings").textContent = task.findings;
  $("pw-a").textContent = task.a;
  $("pw-b").textContent = task.b;
  show("pairwise");
}

function renderDraft(task) {
  const assisted = task.condition === "assisted";
  $("dr-findings").textContent = task.findings;
  $("dr-title").textContent = assisted ? "Edit the draft impression until you would sign it"
                                       : "Write the impression";
  $("dr-text").value = assisted ? task.draft : "";
  active = { ms: 0, last: Date.now(), since: Date.now() };
  show("draft");
  $("dr-text").focus();
}

// Active time: the time between two signs of work counts when they are under IDLE_MS apart
// and the page is visible.
function activity() {
  if (!current || current.kind !== "draft" || document.hidden) return;
  const now = Date.now();
  if (now - active.last < IDLE_MS) active.ms += now - active.last;
  active.last = now;
}

function checked(name) {
  return [...document.querySelectorAll(`input[name="${name}"]:checked`)].map((i) => i.value);
}

async function submitPairwise() {
  const pref = checked("preference")[0], a = checked("accept_a")[0], b = checked("accept_b")[0];
  if (!pref || !a || !b) { error("Choose a preference and rate both impressions."); return; }
  await send({ task_id: current.task_id, preference: pref, accept_a: Number(a), accept_b: Number(b),
               flags_a: checked("flags_a"), flags_b: checked("flags_b") });
}

async function submitDraft() {
  activity();
  const text = $("dr-text").value;
  if (!text.trim()) { error("The impression is empty."); return; }
  await send({ task_id: current.task_id, text, active_ms: Math.round(active.ms) });
}

async function send(answer) {
  try {
    const result = await api("POST", "/api/answer", answer);
    setProgress(result.answered, result.total);
    await next();
  } catch (err) {
    if (err.status === 409) { await next(); return; }  // answered in another tab: move on
    error(err.message);
  }
}

function keys(event) {
  if (!current) return;
  if (current.kind === "draft") {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); submitDraft(); }
    return;
  }
  const k = event.key.toLowerCase();
  const pick = (name, value) => {
    const input = document.querySelector(`input[name="${name}"][value="${value}"]`);
    if (input) input.checked = true;
  };
  if (["1", "2", "3"].includes(k)) pick("preference", ["A", "equal", "B"][Number(k) - 1]);
  else if (k.length === 1 && KEYS_A.includes(k)) pick("accept_a", KEYS_A.indexOf(k) + 1);
  else if (k.length === 1 && KEYS_B.includes(k)) pick("accept_b", KEYS_B.indexOf(k) + 1);
  else if (event.key === "Enter") { event.preventDefault(); submitPairwise(); }
}

function tokenFromLink() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) history.replaceState(null, "", location.pathname);  // the token leaves the address bar
  return token;
}

async function start() {
  buildControls();
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try { await login($("token").value.trim()); await next(); } catch (err) { error(err.message); }
  });
  $("pw-submit").addEventListener("click", submitPairwise);
  $("dr-submit").addEventListener("click", submitDraft);
  $("logout").addEventListener("click", async () => { await api("POST", "/api/logout"); location.reload(); });
  document.addEventListener("keydown", keys);
  for (const ev of ["keydown", "input", "mousemove", "mousedown", "scroll"]) {
    document.addEventListener(ev, activity, { passive: true });
  }
  document.addEventListener("visibilitychange", () => { active.last = Date.now(); });
  // A link pasted into the address bar of an open page changes only the fragment: log in then too.
  window.addEventListener("hashchange", async () => {
    const token = tokenFromLink();
    if (!token) return;
    try { await login(token); await next(); } catch (err) { show("login"); error(err.message); }
  });
  const fromLink = tokenFromLink();
  try {
    if (fromLink) await login(fromLink);
    else welcome(await api("GET", "/api/me"));  // the cookie of an earlier login resumes the study
    await next();
  } catch (err) {
    show("login");
    if (err.status !== 401 || fromLink) error(err.message);
  }
}

document.addEventListener("DOMContentLoaded", start);
