// keel's live trace page: a client of the public API, with no framework and no build step.
// The API key lives in sessionStorage and travels only in the Authorization header. Events are streamed with
// fetch + a ReadableStream reader (EventSource cannot send headers), resumed with Last-Event-ID after a drop.
"use strict";

const KEY = "keel.key";
const TERMINAL = new Set(["succeeded", "partial_success", "failed", "needs_clarification", "cancelled"]);
const $ = (sel) => document.querySelector(sel);
// keel's root, from the page's own address (…/ui/): the page keeps working behind a proxy that adds a prefix.
const ROOT = new URL("../", document.baseURI).pathname;
const url = (path) => ROOT + path.replace(/^\//, "");

// -- small helpers --------------------------------------------------------------------------------------------

/** An element with attributes and children; text is always set as text, never parsed as HTML. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const badge = (s) => h("span", { class: `badge s-${s}` }, s);
const fmtUsd = (x) => (x === undefined || x === null ? "–" : `$${Number(x).toFixed(x && x < 0.01 ? 6 : 4)}`);
const fmtMs = (ms) => (ms === undefined || ms === null ? "–" : ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`);
const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");
const json = (v) => h("pre", {}, JSON.stringify(v, null, 2));

function duration(task) {
  if (!task.started_at) return null;
  const end = task.finished_at || Date.now() / 1000;
  return (end - task.started_at) * 1000;
}

function replace(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// -- the API, with the key -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(path, { method = "GET", body, key = sessionStorage.getItem(KEY) } = {}) {
  const headers = { Authorization: `Bearer ${key}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(url(path), { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

// -- who we are --------------------------------------------------------------------------------------------------

const me = { tenant: null, scopes: [] };
const can = (scope) => me.scopes.includes(scope) || me.scopes.includes("admin");

async function signIn(key) {
  const who = await api("/ui/api/key", { key });
  sessionStorage.setItem(KEY, key);
  Object.assign(me, who);
  $("#who").textContent = `tenant ${who.tenant} · ${who.scopes.join(", ")}`;
  $("#logout").hidden = false;
}

function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  stopStream();
  me.tenant = null;
  me.scopes = [];
  $("#who").textContent = "";
  $("#logout").hidden = true;
  $("#login-error").textContent = message;
  show("login");
}

function show(id) {
  for (const s of ["login", "list", "task"]) $(`#${s}`).hidden = s !== id;
}

// -- the task list ----------------------------------------------------------------------------------------------

let listTimer = null;

async function loadWorkflows() {
  const select = $("#f-workflow");
  if (select.options.length > 1) return;
  try {
    for (const wf of await api("/v1/workflows")) select.append(h("option", {}, wf.name));
  } catch (e) {
    $("#list-error").textContent = e.message;
  }
}

async function renderList() {
  const status = $("#f-status").value;
  const workflow = $("#f-workflow").value;
  try {
    // The API filters by status; the workflow filter is applied here, over up to five pages of the newest tasks.
    let items = [];
    let cursor = null;
    for (let pages = 0; pages < 5 && items.length < 200; pages++) {
      const query = new URLSearchParams({ limit: "200" });
      if (status) query.append("status", status);
      if (cursor) query.append("cursor", cursor);
      const page = await api(`/v1/tasks?${query}`);
      items = items.concat(page.items.filter((t) => !workflow || t.workflow === workflow));
      cursor = page.next_cursor;
      if (!cursor || !workflow) break;
    }
    replace(
      $("#tasks tbody"),
      items.map((t) => {
        const env = t.envelope;
        return h(
          "tr",
          { "data-id": t.id, onclick: () => (location.hash = `#/tasks/${t.id}`) },
          h("td", {}, h("a", { href: `#/tasks/${t.id}` }, h("code", {}, t.id))),
          h("td", {}, t.workflow),
          h("td", {}, badge(t.status)),
          h("td", {}, fmtTime(t.created_at)),
          h("td", { class: "num" }, fmtMs(duration(t))),
          h("td", { class: "num" }, env ? fmtUsd(env.metadata.cost_usd) : "–"),
          h("td", {}, env ? badge(env.status) : "–"),
        );
      }),
    );
    $("#list-empty").hidden = items.length > 0;
    $("#list-error").textContent = "";
  } catch (e) {
    if (e.status === 401) return signOut(e.message);
    $("#list-error").textContent = e.message;
  }
}

function openList() {
  stopStream();
  show("list");
  loadWorkflows();
  renderList();
  clearInterval(listTimer);
  listTimer = setInterval(() => !$("#list").hidden && renderList(), 3000);
}

// -- one task: its state, fed by the API and its event stream --------------------------------------------------------

let trace = null;

function freshTrace(id) {
  return {
    id,
    task: null,
    steps: new Map(), // name -> {name, kind, status, started_at, duration_ms, tries, run_attempt, replayed, error}
    budget: null,
    plan: null,
    retrieval: [],
    modelCalls: [], // from model_call events, while the task runs; the envelope lists them all at the end
    effects: [],
    approvals: [],
    envelope: null,
    lastId: null,
    ended: false,
    abort: new AbortController(),
    events: 0,
  };
}

function stopStream() {
  if (trace) trace.abort.abort();
}

async function openTask(id) {
  clearInterval(listTimer);
  stopStream();
  trace = freshTrace(id);
  show("task");
  $("#events").replaceChildren();
  $("#task-error").textContent = "";
  $("#t-id").textContent = id;
  try {
    await refresh(trace);
  } catch (e) {
    if (e.status === 401) return signOut(e.message);
    $("#task-error").textContent = e.status === 404 ? `No task ${id} for this key.` : e.message;
    $("#t-workflow").textContent = "";
    return;
  }
  stream(trace);
}

/** Everything the stream does not carry, or carries only as it happens: read again from the API. */
async function refresh(t) {
  const base = `/v1/tasks/${t.id}`;
  const [task, steps, effects, approvals] = await Promise.all([
    api(base),
    api(`/ui/api/tasks/${t.id}/steps`),
    api(`${base}/effects`),
    api(`${base}/approvals`),
  ]);
  if (t !== trace) return;
  t.task = task;
  t.effects = effects;
  t.approvals = approvals;
  for (const s of steps) {
    const known = t.steps.get(s.name) || {};
    t.steps.set(s.name, { ...known, ...s, status: s.status });
  }
  if (task.envelope) absorbEnvelope(t, task.envelope);
  render();
}

function absorbEnvelope(t, env) {
  t.envelope = env;
  const md = env.metadata || {};
  for (const s of md.steps || []) {
    const known = t.steps.get(s.name) || { name: s.name };
    t.steps.set(s.name, {
      ...known,
      kind: s.kind,
      status: known.status && !s.replayed ? known.status : s.status,
      duration_ms: known.duration_ms ?? s.duration_ms,
      tries: s.attempts,
      run_attempt: known.run_attempt ?? s.run_attempt,
      replayed: known.replayed || s.replayed,
      tokens: s.tokens,
      cost_usd: s.cost_usd,
    });
  }
  if (md.budget) t.budget = md.budget;
  if (md.plan) t.plan = md.plan;
  if (md.retrieval && md.retrieval.length) t.retrieval = md.retrieval;
}

let refreshTimer = null;
function refreshSoon(t) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => t === trace && refresh(t).catch(() => {}), 250);
}

function onEvent(t, type, data, id) {
  if (id) t.lastId = id;
  t.events += 1;
  const log = $("#events");
  if (type !== "token" && log.children.length < 1000) {
    log.append(h("li", {}, `#${id} ${type} ${JSON.stringify(data).slice(0, 240)}`));
  }
  const step = data.step && (t.steps.get(data.step) || { name: data.step });
  switch (type) {
    case "status":
      if (t.task) t.task.status = data.status;
      break;
    case "progress":
      if (t.task) Object.assign(t.task, { progress: data.progress, current_step: data.step });
      break;
    case "step_started":
      if (!step.status || step.status === "running") {
        t.steps.set(data.step, {
          ...step,
          kind: data.kind,
          status: "running",
          started_at: step.started_at || Date.now() / 1000,
          run_attempt: data.attempt,
          tries: step.tries || 1,
        });
      }
      break;
    case "step_retrying":
      t.steps.set(data.step, { ...step, status: "retrying", tries: data.try });
      break;
    case "step_completed":
    case "step_failed":
      t.steps.set(data.step, {
        ...step,
        kind: data.kind,
        status: type === "step_completed" ? "completed" : "failed",
        tries: data.tries,
        duration_ms: data.duration_ms ?? step.duration_ms,
        error: data.error || null,
      });
      refreshSoon(t); // the checkpoint's own times, and a write's ledger row
      break;
    case "step_cancelled":
      t.steps.set(data.step, { ...step, status: "cancelled" });
      break;
    case "budget":
      t.budget = data;
      break;
    case "plan":
      t.plan = data.plan;
      break;
    case "retrieval":
      t.retrieval = [...t.retrieval, data];
      break;
    case "model_call":
      t.modelCalls = [...t.modelCalls, data];
      break;
    case "decision_requested":
    case "decision_made":
    case "effect_outcome_unknown":
    case "effect_reconciled":
      refreshSoon(t);
      break;
    case "end":
      t.ended = true;
      if (t.task) t.task.status = data.status;
      if (data.envelope) absorbEnvelope(t, data.envelope);
      refreshSoon(t);
      break;
    default:
  }
  scheduleRender();
}

/** The task's SSE stream, parsed by hand: frames end at a blank line; `id:`, `event:` and `data:` lines. */
async function stream(t) {
  while (!t.ended && !t.abort.signal.aborted) {
    const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY)}`, Accept: "text/event-stream" };
    if (t.lastId) headers["Last-Event-ID"] = t.lastId;
    $("#t-live").textContent = "● live";
    try {
      const r = await fetch(url(`/v1/tasks/${t.id}/events`), { headers, signal: t.abort.signal });
      if (r.status === 204) break; // finished, and nothing after our cursor
      if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let id = null;
          let type = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "id") id = val;
            else if (field === "event") type = val;
            else if (field === "data") data.push(val);
          }
          if (data.length) onEvent(t, type, JSON.parse(data.join("\n")), id);
        }
      }
    } catch (e) {
      if (t.abort.signal.aborted) return;
      if (e.status === 401) return signOut(e.message);
      if (e.status && e.status < 500) {
        $("#task-error").textContent = e.message;
        break;
      }
    }
    if (!t.ended) await new Promise((ok) => setTimeout(ok, 1000)); // dropped: resume from t.lastId
  }
  if (t === trace) $("#t-live").textContent = "";
}

// -- rendering the task page ----------------------------------------------------------------------------------------

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    render();
  });
}

function render() {
  const t = trace;
  if (!t || !t.task) return;
  const task = t.task;
  $("#t-workflow").textContent = task.workflow;
  $("#t-status").replaceChildren(badge(task.status));
  $("#t-progress").value = task.progress || 0;
  $("#t-step").textContent = task.current_step ? `at ${task.current_step}` : "";
  $("#cancel").hidden = TERMINAL.has(task.status) || !can("tasks:write");
  renderApprovals(t);
  renderBudget(t);
  renderSteps(t);
  renderTools(t);
  renderModels(t);
  renderRetrieval(t);
  renderPlan(t);
  renderEnvelope(t);
}

function renderSteps(t) {
  const started = t.task.started_at;
  replace(
    $("#steps tbody"),
    [...t.steps.values()].map((s) =>
      h(
        "tr",
        { "data-step": s.name },
        h("td", {}, h("code", {}, s.name)),
        h("td", {}, s.kind || "–"),
        h("td", { class: "num" }, s.started_at && started ? `+${fmtMs(Math.max(0, (s.started_at - started) * 1000))}` : "–"),
        h("td", { class: "num" }, fmtMs(s.duration_ms)),
        h("td", { class: "num" }, s.tries ?? "–", s.tries > 1 ? ` (${s.tries - 1} retr${s.tries > 2 ? "ies" : "y"})` : ""),
        h("td", { class: "num" }, s.run_attempt ?? "–"),
        h("td", { class: "num" }, s.tokens ? s.tokens : "–"),
        h("td", { class: "num" }, s.cost_usd ? fmtUsd(s.cost_usd) : "–"),
        h(
          "td",
          {},
          badge(s.status || "running"),
          s.replayed ? [" ", badge("replayed")] : null,
          s.error ? h("div", { class: "error" }, s.error.message || JSON.stringify(s.error)) : null,
        ),
      ),
    ),
  );
}

function renderTools(t) {
  const byStep = new Map(t.effects.map((e) => [e.step, e]));
  const waiting = new Map(t.approvals.filter((d) => d.verdict === null).map((d) => [d.step, d]));
  const listed = t.envelope ? t.envelope.metadata.tools_called || [] : [];
  const rows = listed.length
    ? listed.map((c) => ({ tool: c.tool, step: c.step }))
    : [...t.steps.values()].filter((s) => s.kind === "tool").map((s) => ({ tool: s.name, step: s.name }));
  for (const e of t.effects) if (!rows.some((r) => r.step === e.step)) rows.push({ tool: e.tool, step: e.step });
  for (const d of waiting.values()) if (!rows.some((r) => r.step === d.step)) rows.push({ tool: d.tool, step: d.step });
  replace(
    $("#tools tbody"),
    rows.map((r) => {
      const effect = byStep.get(r.step);
      const pending = waiting.get(r.step);
      const state = effect ? effect.status : pending ? "awaiting approval" : "read (no ledger row)";
      return h(
        "tr",
        { "data-tool": r.tool },
        h("td", {}, h("code", {}, effect ? effect.tool : r.tool)),
        h("td", {}, h("code", {}, r.step)),
        h("td", {}, badge(effect ? effect.status : pending ? "pending" : "read"), " ", effect || pending ? "" : state),
        h("td", { class: "num" }, effect ? effect.executions : "–"),
      );
    }),
  );
}

function renderModels(t) {
  const calls = t.envelope ? t.envelope.metadata.model_calls || [] : t.modelCalls;
  replace(
    $("#models tbody"),
    calls.map((c) =>
      h(
        "tr",
        {},
        h("td", {}, h("code", {}, c.model_id || c.requested_model || "–")),
        h("td", { class: "num" }, c.input_tokens ?? "–"),
        h("td", { class: "num" }, c.output_tokens ?? "–"),
        h("td", { class: "num" }, fmtUsd(c.cost_usd)),
        h("td", { class: "num" }, fmtMs(c.latency_ms)),
        h("td", {}, badge(c.error ? "error" : c.outcome || "ok")),
      ),
    ),
  );
  const md = t.envelope && t.envelope.metadata;
  const used = t.budget && t.budget.used;
  $("#cost").textContent = md
    ? `Cost ${fmtUsd(md.cost_usd)} · ${md.tokens.total} tokens (${md.tokens.input} in, ${md.tokens.output} out) · ${calls.length} model call(s)`
    : used
      ? `So far: ${fmtUsd(used.cost_usd)} · ${used.tokens} tokens · ${used.model_calls} model call(s)`
      : "";
}

function renderBudget(t) {
  const b = t.budget;
  if (!b) return replace($("#budget tbody"), []);
  const names = [...new Set([...Object.keys(b.used), ...Object.keys(b.limits)])];
  replace(
    $("#budget tbody"),
    names.map((n) => {
      const used = b.used[n];
      const limit = b.limits[n];
      const share = limit ? Math.min((used || 0) / limit, 1) : null;
      return h(
        "tr",
        { "data-budget": n },
        h("th", {}, n.replace(/_/g, " ")),
        h("td", { class: "num" }, n === "cost_usd" ? fmtUsd(used) : used ?? "–"),
        h("td", { class: "num" }, limit === undefined ? "–" : n === "cost_usd" ? fmtUsd(limit) : limit),
        h("td", {}, share === null ? "" : meter(share)),
      );
    }),
  );
}

/** A bar for a share of a limit; its width set through the CSSOM, which the page's CSP allows (a style attribute
 * would be refused). */
function meter(share) {
  const bar = h("i");
  bar.style.width = `${share * 100}%`;
  return h("span", { class: `meter${share >= 1 ? " over" : ""}`, title: `${Math.round(share * 100)}%` }, bar);
}

function renderRetrieval(t) {
  const box = $("#retrieval");
  if (!t.retrieval.length) return box.replaceChildren(h("p", { class: "muted" }, "No retrieval."));
  box.replaceChildren(
    ...t.retrieval.map((r) =>
      h(
        "div",
        { class: "retrieval" },
        h("p", {}, "Query ", h("q", {}, r.query), " · confidence ", h("strong", { class: "confidence" }, r.confidence), " ", badge(r.level)),
        h(
          "table",
          {},
          h("thead", {}, h("tr", {}, h("th", {}, "Document"), h("th", {}, "Page"), h("th", {}, "Score"), h("th", {}, "Text"))),
          h(
            "tbody",
            {},
            (r.hits || []).map((hit) =>
              h("tr", {}, h("td", {}, h("code", {}, hit.document)), h("td", {}, hit.page ?? "–"), h("td", { class: "num" }, hit.score), h("td", {}, hit.text || "")),
            ),
          ),
        ),
      ),
    ),
  );
}

function renderPlan(t) {
  const box = $("#plan");
  if (!t.plan) return box.replaceChildren(h("p", { class: "muted" }, "No plan."));
  const p = t.plan;
  box.replaceChildren(
    p.goal ? h("p", {}, h("strong", {}, "Goal: "), p.goal) : "",
    p.confidence !== undefined ? h("p", {}, "Planner confidence ", h("strong", {}, p.confidence)) : "",
    Array.isArray(p.nodes) && p.nodes.length
      ? h("ol", {}, p.nodes.map((n) => h("li", {}, typeof n === "string" ? n : n.name || n.id || JSON.stringify(n))))
      : "",
    h("details", {}, h("summary", {}, "Full plan"), json(p)),
  );
}

function renderEnvelope(t) {
  const box = $("#envelope");
  const env = t.envelope;
  if (!env) return box.replaceChildren(h("p", { class: "muted" }, "Not finished yet."));
  const errors = env.errors || [];
  box.replaceChildren(
    h("p", {}, "Status ", badge(env.status), t.task.status === "waiting_for_approval" ? " (provisional: waiting for a person)" : ""),
    errors.length
      ? h(
          "table",
          { id: "envelope-errors" },
          h("thead", {}, h("tr", {}, ["Severity", "Type", "Message", "Step", "Pointer"].map((x) => h("th", {}, x)))),
          h(
            "tbody",
            {},
            errors.map((e) =>
              h(
                "tr",
                {},
                h("td", {}, badge(e.severity)),
                h("td", {}, h("code", {}, e.type)),
                h("td", {}, e.message, e.recovery_suggested ? h("span", { class: "muted" }, " (retry may help)") : ""),
                h("td", {}, e.step ? h("code", {}, e.step) : "–"),
                h("td", {}, e.pointer ? h("code", {}, e.pointer) : "–"),
              ),
            ),
          ),
        )
      : h("p", { class: "muted" }, "No errors."),
    h("h3", {}, env.status === "partial_success" ? "Partial result" : "Result"),
    json(env.result),
  );
}

function renderApprovals(t) {
  const pending = t.approvals.filter((d) => d.verdict === null);
  $("#approvals-box").hidden = pending.length === 0;
  $("#approvals").replaceChildren(
    ...pending.map((d) =>
      h(
        "div",
        { class: "approval", "data-call": d.call_id },
        h("p", {}, h("strong", {}, d.tool), " at ", h("code", {}, d.step), " · ", d.reason),
        json(d.args),
        can("tasks:approve")
          ? h(
              "p",
              {},
              h("button", { type: "button", class: "approve", onclick: () => decide(t, d, "approve") }, "Approve"),
              " ",
              h("button", { type: "button", class: "deny", onclick: () => decide(t, d, "deny") }, "Deny"),
            )
          : h("p", { class: "muted" }, "A key with tasks:approve can approve or deny this call."),
      ),
    ),
  );
}

async function decide(t, d, decision) {
  try {
    await api(`/v1/tasks/${t.id}/approvals/${encodeURIComponent(d.call_id)}`, { method: "POST", body: { decision } });
    await refresh(t);
  } catch (e) {
    $("#task-error").textContent = e.message;
  }
}

async function cancelTask() {
  const t = trace;
  try {
    t.task = await api(`/v1/tasks/${t.id}/cancel`, { method: "POST" });
    render();
  } catch (e) {
    $("#task-error").textContent = e.message;
  }
}

// -- routing ------------------------------------------------------------------------------------------------------

async function route() {
  // `#key=…`: a key handed over for scripted use. A fragment never reaches the server; drop it from the address.
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.has("key")) {
    const key = fragment.get("key");
    history.replaceState(null, "", location.pathname + location.search + "#/tasks");
    try {
      await signIn(key);
    } catch (e) {
      return signOut(e.message);
    }
  }
  const key = sessionStorage.getItem(KEY);
  if (!key) return signOut();
  if (!me.tenant) {
    try {
      await signIn(key);
    } catch (e) {
      return signOut(e.message);
    }
  }
  const m = location.hash.match(/^#\/tasks\/([^/?#]+)/);
  if (m) openTask(decodeURIComponent(m[1]));
  else openList();
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = $("#key").value.trim();
  try {
    await signIn(key);
    $("#key").value = "";
    $("#login-error").textContent = "";
    if (!location.hash.startsWith("#/tasks")) location.hash = "#/tasks";
    else route();
  } catch (e) {
    $("#login-error").textContent = e.message;
  }
});
$("#logout").addEventListener("click", () => signOut());
$("#cancel").addEventListener("click", cancelTask);
$("#refresh").addEventListener("click", renderList);
$("#f-status").addEventListener("change", renderList);
$("#f-workflow").addEventListener("change", renderList);
window.addEventListener("hashchange", route);
route();
