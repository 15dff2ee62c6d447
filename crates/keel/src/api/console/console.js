// Keel's web console: runs, their steps and live events, the approvals
// inbox and the dead-letter queue, over the JSON API.
//
// Layout: `Client` (one method per API call), `SseParser` (Server-Sent
// Events lines), pure model helpers (what a view shows), then the DOM code,
// which runs only in a browser. The DOM is built with createElement and
// textContent only: run output, tool results and errors are data, never
// markup.

/** Statuses a run never leaves. */
export const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
/** Journal events that end a run's stream. */
export const TERMINAL_EVENTS = new Set(["run_completed", "run_failed", "run_cancelled"]);
/** Every run status, for the filter. */
export const STATUSES = [
  "PENDING", "RUNNING", "AWAITING_LLM", "AWAITING_TOOL", "AWAITING_APPROVAL",
  "AWAITING_CHILDREN", "SLEEPING", "COMPENSATING", "COMPLETED", "FAILED", "CANCELLED",
];

/** An error answer of the API: `{"error": {"code", "message", "fields"?}}`. */
export class ApiError extends Error {
  constructor(status, code, message, fields = []) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.fields = fields;
  }
}

/** The ApiError of a non-2xx response (its body need not be JSON). */
async function apiError(response) {
  const text = await response.text().catch(() => "");
  let error = null;
  try {
    error = JSON.parse(text).error;
  } catch {
    // not JSON: shown as text below
  }
  if (error && typeof error.code === "string") {
    return new ApiError(response.status, error.code, String(error.message ?? ""), error.fields ?? []);
  }
  return new ApiError(response.status, `http_${response.status}`, text || response.statusText);
}

/** A query string of the non-empty values of `params` ("" when none). */
export function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") q.set(key, String(value));
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

const seg = encodeURIComponent;

/** The API: base URL (empty: this origin), bearer token (optional), fetch. */
export class Client {
  constructor({ baseUrl = "", token = "", fetch: fetchFn } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.token = token;
    this.fetch = fetchFn ?? ((...args) => globalThis.fetch(...args));
  }

  headers(extra = {}) {
    const headers = { Accept: "application/json", ...extra };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    return headers;
  }

  /** Calls the API; the JSON answer, or throws an ApiError. */
  async request(method, path, body) {
    const init = { method, headers: this.headers() };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await this.fetch(this.baseUrl + path, init);
    if (!response.ok) throw await apiError(response);
    return response.status === 204 ? null : response.json();
  }

  /** `GET /v1/runs`: `{runs, next_cursor}`, newest first. */
  listRuns({ status, agent, limit, cursor } = {}) {
    return this.request("GET", `/v1/runs${query({ status, agent, limit, cursor })}`);
  }

  /** `GET /v1/runs/{id}`: the run's view (steps, calls, approvals). */
  getRun(id) {
    return this.request("GET", `/v1/runs/${seg(id)}`);
  }

  /** `POST /v1/runs/{id}/cancel`: `{id, status, error}`. */
  cancelRun(id, reason) {
    return this.request("POST", `/v1/runs/${seg(id)}/cancel`, reason ? { reason } : {});
  }

  /** `GET /v1/approvals?status=pending`: `{approvals, next_cursor}`. */
  inbox({ agent, limit, cursor } = {}) {
    return this.request("GET", `/v1/approvals${query({ status: "pending", agent, limit, cursor })}`);
  }

  /** `POST /v1/runs/{run_id}/approvals/{approval_id}` with a decision body. */
  decide(runId, approvalId, body) {
    return this.request("POST", `/v1/runs/${seg(runId)}/approvals/${seg(approvalId)}`, body);
  }

  /** `GET /v1/dlq`: `{dead_letters}`. */
  deadLetters() {
    return this.request("GET", "/v1/dlq");
  }

  /** `POST /v1/dlq/{id}/retry`: `{id, run_id, status: "requeued"}`. */
  retryDeadLetter(id) {
    return this.request("POST", `/v1/dlq/${seg(id)}/retry`);
  }

  /**
   * Follows `GET /v1/runs/{id}/events` (SSE over fetch, so the token can be
   * sent): yields `{id, event, data}` until the run's terminal event or the
   * end of the stream; `lastEventId` resumes after that event.
   */
  async *follow(runId, { lastEventId, signal } = {}) {
    const headers = this.headers({ Accept: "text/event-stream" });
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    const response = await this.fetch(`${this.baseUrl}/v1/runs/${seg(runId)}/events`, { headers, signal });
    if (!response.ok) throw await apiError(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return;
        for (const event of parser.push(decoder.decode(value, { stream: true }))) {
          yield event;
          if (TERMINAL_EVENTS.has(event.event)) return;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }
}

/**
 * Parses a Server-Sent Events stream fed in arbitrary chunks: `push` returns
 * the events each chunk completes, as `{id, event, data}` (`event` defaults
 * to `message`, `id` to the last id seen). Comments and unknown fields are
 * skipped.
 */
export class SseParser {
  constructor() {
    this.buffer = "";
    this.lastEventId = "";
    this.reset();
  }

  reset() {
    this.event = "";
    this.data = [];
  }

  push(chunk) {
    let text = this.buffer + chunk;
    // A final CR may be the first half of a CRLF: kept for the next chunk.
    const end = text.endsWith("\r") ? text.length - 1 : text.length;
    const lines = text.slice(0, end).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + text.slice(end);
    const events = [];
    for (const line of lines) {
      const event = this.line(line);
      if (event) events.push(event);
    }
    return events;
  }

  /** One line; the event it completes, if any. */
  line(line) {
    if (line === "") {
      const event = this.data.length
        ? { id: this.lastEventId, event: this.event || "message", data: this.data.join("\n") }
        : null;
      this.reset();
      return event;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    return null;
  }
}

// ---- Models: what each view shows, as plain data ----

/** The view a location hash names: `{view, id?}`. */
export function route(hash) {
  const path = String(hash || "").replace(/^#\/?/, "");
  if (path.startsWith("run/") && path.length > 4) {
    return { view: "run", id: decodeURIComponent(path.slice(4)) };
  }
  if (["approvals", "dlq"].includes(path)) return { view: path };
  return { view: "runs" };
}

/** A time in epoch milliseconds as text. */
export function time(ms) {
  return typeof ms === "number" ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "";
}

/** A JSON value (or a string holding JSON) as indented text. */
export function pretty(value) {
  if (typeof value === "string") {
    try {
      return JSON.stringify(JSON.parse(value), null, 2);
    } catch {
      return value;
    }
  }
  return JSON.stringify(value ?? null, null, 2);
}

function tokens(usage) {
  return (usage?.input_tokens ?? 0) + (usage?.output_tokens ?? 0);
}

/** The rows of a runs page: one per run, each cell text. */
export function runRows(page) {
  return (page?.runs ?? []).map((run) => ({
    id: run.id,
    agent: run.agent,
    version: run.version,
    status: run.status,
    steps: String(run.step_count ?? 0),
    tokens: String(tokens(run.usage)),
    created: time(run.created_at),
  }));
}

/** The fields of a run's summary: `[label, text]`, empty ones left out. */
export function runFields(run) {
  const usage = run.usage ?? {};
  const fields = [
    ["Status", run.status],
    ["Agent", `${run.agent} v${run.version}`],
    ["Error", run.error ?? ""],
    ["Error code", run.error_code ?? ""],
    ["Dead letter", run.dead_letter ?? ""],
    ["Input", pretty(run.input)],
    ["Output", run.output ?? ""],
    ["Tokens", `${usage.input_tokens ?? 0} in, ${usage.output_tokens ?? 0} out`],
    ["Cost", `$${Number(run.cost_usd ?? 0).toFixed(6)}`],
    ["Created", time(run.created_at)],
    ["Updated", time(run.updated_at)],
  ];
  return fields.filter(([, text]) => text !== "");
}

/** A run's steps with their tool calls, as text. */
export function stepItems(run) {
  return (run.steps ?? []).map((step) => ({
    title: `Step ${step.step} (${step.model}, ${tokens(step.usage)} tokens)`,
    content: step.content ?? "",
    calls: (step.tool_calls ?? []).map((call) => ({
      title: `${call.tool} (${call.call_id}, ${call.attempts} attempt${call.attempts === 1 ? "" : "s"})`,
      arguments: pretty(call.arguments),
      result: call.result === null || call.result === undefined ? "(no result yet)" : pretty(call.result),
      isError: Boolean(call.is_error),
    })),
  }));
}

/** The approvals of a run still waiting for a decision. */
export function pendingApprovals(run) {
  return (run.approvals ?? []).filter((a) => a.status === "pending");
}

/** An approval's fields: `[label, text]`. */
export function approvalFields(approval) {
  const fields = [
    ["Run", approval.run_id],
    ["Agent", approval.agent],
    ["Tool", approval.tool],
    ["Call", `step ${approval.step}, call ${approval.call_index}, attempt ${approval.attempt}`],
    ["Why", approval.reason === "uncertain" ? "repeat of a call that may have happened" : "approval policy"],
    ["Requested", time(approval.requested_at)],
  ];
  if (approval.deadline) fields.push(["Deadline", time(approval.deadline)]);
  if (approval.decided_by) fields.push(["Decided by", approval.decided_by]);
  return fields;
}

/** Edited arguments typed by a person: `{value}` (a JSON object) or `{error}`. */
export function parseArguments(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    return { error: `the arguments are not JSON: ${e.message}` };
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    return { error: "the arguments must be a JSON object" };
  }
  return { value };
}

/**
 * The body of a decision: `decision` ("approve" or "reject"), `reason`,
 * `by`, and for an approval with edits `argumentsText`. Throws an Error
 * saying what to fix (a rejection needs a reason; edits must be an object).
 */
export function decisionBody({ decision, reason = "", by = "", argumentsText }) {
  const body = { decision };
  if (reason.trim()) body.reason = reason.trim();
  if (by.trim()) body.by = by.trim();
  if (decision === "reject" && !body.reason) {
    throw new Error("a rejection needs a reason: the model sees it as the call's result");
  }
  if (decision === "approve" && argumentsText !== undefined) {
    const parsed = parseArguments(argumentsText);
    if (parsed.error) throw new Error(parsed.error);
    body.arguments = parsed.value;
  }
  return body;
}

/** An error as the console shows it. */
export function errorText(error) {
  if (error instanceof ApiError) {
    if (error.status === 401) {
      const given = /not valid/.test(error.message);
      return `this server needs an API token: ${given ? "the one given is not valid" : "enter it above"}`;
    }
    const fields = (error.fields ?? []).map((f) => `${f.field}: ${f.message}`).join("; ");
    return `${error.code}: ${error.message}${fields && !error.message.includes(fields) ? ` (${fields})` : ""}`;
  }
  return String(error?.message ?? error);
}

// ---- The page (a browser only) ----

const ui = { client: null, view: null, notice: null, stop: null, runs: { cursor: "", status: "", agent: "" }, inboxCursor: "" };

/** An element with properties (`className`, `type`, …) and children (text or nodes). */
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node[key] = value;
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function definitions(fields) {
  return h("dl", {}, fields.map(([label, text]) => [h("dt", {}, label), h("dd", {}, text.includes("\n") ? h("pre", {}, text) : text)]));
}

function notify(error) {
  ui.notice.textContent = error ? errorText(error) : "";
}

/** Runs `action`; its error shown in `where` (or the notice), and false. */
async function attempt(action, where) {
  try {
    await action();
    return true;
  } catch (error) {
    if (where) where.textContent = errorText(error);
    else notify(error);
    return false;
  }
}

/** Replaces the view with `nodes` (lists flattened, null ones left out). */
function show(...nodes) {
  ui.view.replaceChildren(...nodes.flat(Infinity).filter(Boolean));
}

function runLink(id) {
  return h("a", { href: `#run/${encodeURIComponent(id)}` }, id);
}

async function renderRuns() {
  const state = ui.runs;
  const page = await ui.client.listRuns({ status: state.status, agent: state.agent, limit: 50, cursor: state.cursor });
  const status = h("select", { id: "status-filter" }, h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s, selected: s === state.status }, s)));
  const agent = h("input", { id: "agent-filter", type: "text", value: state.agent });
  const apply = (cursor) => () => {
    Object.assign(state, { status: status.value, agent: agent.value.trim(), cursor });
    render();
  };
  const columns = ["id", "agent", "version", "status", "steps", "tokens", "created"];
  const rows = runRows(page).map((row) =>
    h("tr", {}, columns.map((c) => h("td", c === "status" ? { className: `status-${row.status}` } : {}, c === "id" ? runLink(row.id) : row[c]))));
  show(
    h("h2", {}, "Runs"),
    h("div", { className: "filters" },
      h("label", { htmlFor: "status-filter" }, "Status"), status,
      h("label", { htmlFor: "agent-filter" }, "Agent"), agent,
      h("button", { type: "button", onclick: apply("") }, "Filter")),
    h("table", {}, h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))), h("tbody", {}, rows)),
    rows.length ? null : h("p", {}, "No runs."),
    h("div", { className: "actions" },
      state.cursor ? h("button", { type: "button", onclick: apply("") }, "First page") : null,
      page.next_cursor ? h("button", { type: "button", onclick: apply(page.next_cursor) }, "Next page") : null),
  );
}

/** The decision form of a pending approval; `done` runs after a decision. */
function approvalForm(approval, done) {
  const key = `${approval.run_id}-${approval.id}`.replace(/[^A-Za-z0-9_-]/g, "_");
  const reason = h("input", { id: `reason-${key}`, type: "text" });
  const edited = h("textarea", { id: `args-${key}`, value: pretty(approval.arguments), spellcheck: false });
  const error = h("p", { className: "error", role: "alert" });
  const by = () => document.getElementById("by").value;
  const decide = (decision, withEdits) => () => attempt(async () => {
    const body = decisionBody({ decision, reason: reason.value, by: by(), argumentsText: withEdits ? edited.value : undefined });
    await ui.client.decide(approval.run_id, approval.id, body);
    await done();
  }, error);
  return h("div", { className: "card" },
    h("h3", {}, `Approve ${approval.tool}?`),
    definitions(approvalFields(approval)),
    h("p", {}, "Arguments"), h("pre", {}, pretty(approval.arguments)),
    h("div", { className: "actions" },
      h("button", { type: "button", onclick: decide("approve", false) }, "Approve"),
      h("label", { htmlFor: reason.id }, "Reason"), reason,
      h("button", { type: "button", onclick: decide("reject", false) }, "Reject")),
    h("label", { htmlFor: edited.id }, "Edited arguments (JSON object)"), edited,
    h("div", { className: "actions" }, h("button", { type: "button", onclick: decide("approve", true) }, "Approve with these arguments")),
    error);
}

async function renderRun(id) {
  const run = await ui.client.getRun(id);
  const cancelError = h("p", { className: "error", role: "alert" });
  const cancel = TERMINAL.has(run.status) ? null : h("button", {
    type: "button",
    onclick: () => attempt(async () => { await ui.client.cancelRun(id, "cancelled from the console"); await render(); }, cancelError),
  }, "Cancel run");
  const pending = pendingApprovals(run);
  const decided = (run.approvals ?? []).filter((a) => a.status !== "pending");
  show(
    h("h2", {}, `Run ${run.id}`),
    definitions(runFields(run)),
    h("div", { className: "actions" }, cancel), cancelError,
    pending.length ? h("section", {}, h("h3", {}, "Waiting for a decision"), pending.map((a) => approvalForm(a, render))) : null,
    decided.length ? h("section", {}, h("h3", {}, "Decided approvals"),
      decided.map((a) => h("p", {}, `${a.id} ${a.tool}: ${a.status}${a.decided_by ? ` by ${a.decided_by}` : ""}${a.decision_reason ? ` (${a.decision_reason})` : ""}`))) : null,
    h("section", {}, h("h3", {}, "Steps"), stepItems(run).map((step) => h("div", { className: "card" },
      h("h4", {}, step.title),
      step.content ? h("pre", {}, step.content) : null,
      step.calls.map((call) => h("div", {},
        h("p", {}, `Tool call ${call.title}`),
        h("pre", {}, call.arguments),
        h("p", { className: call.isError ? "error" : "" }, call.isError ? "Result (error)" : "Result"),
        h("pre", {}, call.result)))))),
  );
  return run;
}

/** Follows a run's events, refreshing the view on each, until it ends or `signal` aborts. */
async function live(id, signal) {
  let lastEventId = "";
  let timer = null;
  const refresh = () => {
    if (timer) return;
    timer = setTimeout(() => { timer = null; if (!signal.aborted) renderRun(id).catch(notify); }, 200);
  };
  while (!signal.aborted) {
    try {
      for await (const event of ui.client.follow(id, { lastEventId, signal })) {
        if (event.id) lastEventId = event.id;
        refresh();
        if (TERMINAL_EVENTS.has(event.event)) return;
      }
      const run = await ui.client.getRun(id);
      if (TERMINAL.has(run.status)) return;
    } catch (error) {
      if (signal.aborted) return;
      notify(error);
      if (error instanceof ApiError && error.status < 500) return;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function renderInbox() {
  const page = await ui.client.inbox({ limit: 50, cursor: ui.inboxCursor });
  const go = (cursor) => () => { ui.inboxCursor = cursor; render(); };
  show(
    h("h2", {}, "Approvals waiting for a decision"),
    page.approvals.length ? page.approvals.map((a) => approvalForm(a, render)) : h("p", {}, "Nothing is waiting."),
    h("div", { className: "actions" },
      ui.inboxCursor ? h("button", { type: "button", onclick: go("") }, "First page") : null,
      page.next_cursor ? h("button", { type: "button", onclick: go(page.next_cursor) }, "Next page") : null),
  );
}

async function renderDlq() {
  const { dead_letters: letters } = await ui.client.deadLetters();
  const columns = ["id", "run", "kind", "step", "attempts", "error", "created", ""];
  const rows = letters.map((d) => {
    const result = h("span", { role: "status" });
    const retry = h("button", {
      type: "button",
      onclick: () => attempt(async () => {
        const answer = await ui.client.retryDeadLetter(d.id);
        retry.disabled = true;
        result.textContent = ` ${answer.status}`;
      }, result),
    }, "Retry");
    return h("tr", {}, h("td", {}, d.id), h("td", {}, runLink(d.run_id)), h("td", {}, d.kind), h("td", {}, String(d.step ?? "")),
      h("td", {}, String(d.attempts)), h("td", {}, d.error), h("td", {}, time(d.created_at)), h("td", {}, retry, result));
  });
  show(
    h("h2", {}, "Dead letters"),
    rows.length
      ? h("table", {}, h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))), h("tbody", {}, rows))
      : h("p", {}, "No dead letters."),
  );
}

async function render() {
  const where = route(location.hash);
  if (ui.stop && ui.stop.id !== where.id) {
    ui.stop.abort();
    ui.stop = null;
  }
  notify(null);
  await attempt(async () => {
    if (where.view === "run") {
      const run = await renderRun(where.id);
      if (!ui.stop && !TERMINAL.has(run.status)) {
        ui.stop = new AbortController();
        ui.stop.id = where.id;
        live(where.id, ui.stop.signal);
      }
    } else if (where.view === "approvals") await renderInbox();
    else if (where.view === "dlq") await renderDlq();
    else await renderRuns();
  });
}

function start() {
  ui.view = document.getElementById("view");
  ui.notice = document.getElementById("notice");
  const token = document.getElementById("token");
  const by = document.getElementById("by");
  token.value = sessionStorage.getItem("keel.token") ?? "";
  by.value = sessionStorage.getItem("keel.by") ?? "";
  ui.client = new Client({ token: token.value });
  document.getElementById("settings").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("keel.token", token.value);
    sessionStorage.setItem("keel.by", by.value);
    ui.client.token = token.value;
    return render();
  });
  window.addEventListener("hashchange", render);
  render();
}

if (typeof document !== "undefined") start();
