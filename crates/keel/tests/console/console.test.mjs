// The console's logic, without a DOM: the pure helpers here, and the
// `Client` against a live `keel serve` (KEEL_URL, KEEL_TOKEN) that the Rust
// test `console::the_console_script_drives_a_live_server` starts with:
// 4 runs of `gate` parked on an approval, 2 completed runs of `plain` and a
// dead-lettered run of `doomed`. The page itself is rendered into a small
// stand-in DOM (`FakeDocument`) at the end. Run by hand: `node --test <this file>`.

import { test } from "node:test";
import assert from "node:assert/strict";

import {
  ApiError, Client, SseParser, decisionBody, errorText, parseArguments, pendingApprovals,
  route, runFields, runRows, stepItems,
} from "../../src/api/console/console.js";

/** A stand-in for the few DOM parts the page uses (elements, text, events). */
class FakeElement {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.childNodes = [];
    this.listeners = {};
    this.value = "";
  }
  append(...nodes) {
    for (const node of nodes) {
      // A browser would show anything else as text ("null", "[object HTMLDivElement]").
      assert.ok(typeof node === "string" || node instanceof FakeElement || node instanceof FakeText,
        `${node} appended to a ${this.tagName}`);
      this.childNodes.push(typeof node === "string" ? new FakeText(node) : node);
    }
  }
  replaceChildren(...nodes) {
    this.childNodes = [];
    this.append(...nodes);
  }
  addEventListener(type, listener) {
    (this.listeners[type] ??= []).push(listener);
  }
  /** Runs the listeners of `type`; resolves when they have. */
  dispatch(type) {
    return Promise.all((this.listeners[type] ?? []).map((listener) => listener({ preventDefault() {} })));
  }
  get textContent() {
    return this.childNodes.map((node) => node.textContent).join("");
  }
  set textContent(text) {
    this.childNodes = text ? [new FakeText(String(text))] : [];
  }
  /** Every element below this one, depth first. */
  *all() {
    for (const node of this.childNodes) {
      if (node instanceof FakeElement) {
        yield node;
        yield* node.all();
      }
    }
  }
  button(label) {
    const found = [...this.all()].find((e) => e.tagName === "BUTTON" && e.textContent === label);
    assert.ok(found, `no button "${label}" in: ${this.textContent}`);
    return found;
  }
}

class FakeText {
  constructor(text) {
    this.data = text;
  }
  get textContent() {
    return this.data;
  }
}

/** Installs a stand-in `document`, `window`, `location` and `sessionStorage`. */
function fakeBrowser(baseUrl, token, by) {
  const elements = Object.fromEntries(["view", "notice", "token", "by", "settings"].map((id) => [id, new FakeElement("div")]));
  const storage = new Map([["keel.token", token], ["keel.by", by]]);
  const window = new FakeElement("window");
  const realFetch = globalThis.fetch;
  Object.assign(globalThis, {
    document: {
      createElement: (tag) => new FakeElement(tag),
      createTextNode: (text) => new FakeText(text),
      getElementById: (id) => elements[id],
    },
    window,
    location: { hash: "" },
    sessionStorage: { getItem: (k) => storage.get(k) ?? null, setItem: (k, v) => storage.set(k, v) },
    // The page calls its own origin: here, the server's.
    fetch: (url, init) => realFetch(new URL(url, baseUrl), init),
  });
  const go = (hash) => {
    globalThis.location.hash = hash;
    return window.dispatch("hashchange");
  };
  return { ...elements, go };
}

test("the SSE parser reads events split anywhere", () => {
  const stream = ": keep-alive\r\nid: 1\r\nevent: run_submitted\r\ndata: {\"seq\":1}\r\n\r\n"
    + "id: 2.1.1.0\nevent: llm_delta\ndata: a\ndata: b\n\ndata: plain\n\nid: 3\nevent: run_completed\ndata:x\n\n";
  const expected = [
    { id: "1", event: "run_submitted", data: "{\"seq\":1}" },
    { id: "2.1.1.0", event: "llm_delta", data: "a\nb" },
    { id: "2.1.1.0", event: "message", data: "plain" },
    { id: "3", event: "run_completed", data: "x" },
  ];
  for (const size of [1, 2, 3, 7, stream.length]) {
    const parser = new SseParser();
    const events = [];
    for (let i = 0; i < stream.length; i += size) events.push(...parser.push(stream.slice(i, i + size)));
    assert.deepEqual(events, expected, `chunks of ${size}`);
  }
  // An event is only complete at its blank line.
  assert.deepEqual(new SseParser().push("data: half"), []);
});

test("the models show what a person needs", () => {
  assert.deepEqual(route("#run/0193-ab"), { view: "run", id: "0193-ab" });
  assert.deepEqual(route("#approvals"), { view: "approvals" });
  assert.deepEqual(route("#dlq"), { view: "dlq" });
  assert.deepEqual(route(""), { view: "runs" });
  assert.deepEqual(route("#nonsense"), { view: "runs" });

  const rows = runRows({
    runs: [{ id: "r1", agent: "a", version: "2", status: "COMPLETED", step_count: 3, usage: { input_tokens: 10, output_tokens: 5 }, created_at: 0 }],
  });
  assert.deepEqual(rows, [{ id: "r1", agent: "a", version: "2", status: "COMPLETED", steps: "3", tokens: "15", created: "1970-01-01 00:00:00" }]);

  const hostile = "<img src=x onerror=alert(1)>";
  const run = {
    id: "r1", agent: "a", version: "1", status: "AWAITING_APPROVAL", input: "hi", output: hostile, error: null,
    usage: { input_tokens: 1, output_tokens: 2 }, cost_usd: 0.5, created_at: 0, updated_at: 0,
    steps: [{ step: 1, model: "m", content: null, usage: { input_tokens: 1, output_tokens: 2 },
      tool_calls: [{ call_id: "c", tool: "echo", arguments: "{\"n\":1}", attempts: 1, result: null, is_error: false }] }],
    approvals: [{ id: "1.0.1", status: "pending" }, { id: "2.0.1", status: "approved" }],
  };
  const fields = Object.fromEntries(runFields(run));
  assert.equal(fields.Output, hostile, "text, shown with textContent");
  assert.equal(fields.Tokens, "1 in, 2 out");
  assert.equal(fields.Cost, "$0.500000");
  assert.ok(!("Error" in fields));
  const [step] = stepItems(run);
  assert.equal(step.calls[0].arguments, "{\n  \"n\": 1\n}");
  assert.equal(step.calls[0].result, "(no result yet)");
  assert.deepEqual(pendingApprovals(run).map((a) => a.id), ["1.0.1"]);

  assert.deepEqual(parseArguments("{\"n\": 2}"), { value: { n: 2 } });
  assert.match(parseArguments("{n: 2}").error, /not JSON/);
  assert.match(parseArguments("[1]").error, /JSON object/);
  assert.deepEqual(decisionBody({ decision: "approve", by: " ann " }), { decision: "approve", by: "ann" });
  assert.deepEqual(decisionBody({ decision: "approve", argumentsText: "{\"n\": 3}" }), { decision: "approve", arguments: { n: 3 } });
  assert.throws(() => decisionBody({ decision: "approve", argumentsText: "{" }), /not JSON/);
  assert.throws(() => decisionBody({ decision: "reject", reason: "  " }), /needs a reason/);
  assert.equal(
    errorText(new ApiError(422, "invalid", "reason: missing", [{ field: "reason", message: "missing" }])),
    "invalid: reason: missing",
  );
  assert.equal(errorText(new ApiError(404, "not_found", "run `x` not found")), "not_found: run `x` not found");
});

test("the client against a live server", { skip: !process.env.KEEL_URL && "KEEL_URL is not set" }, async (t) => {
  const client = new Client({ baseUrl: process.env.KEEL_URL, token: process.env.KEEL_TOKEN });
  const eventually = async (what, read, done) => {
    const deadline = Date.now() + 30_000;
    for (;;) {
      const value = await read();
      if (done(value)) return value;
      assert.ok(Date.now() < deadline, `${what}: still ${JSON.stringify(value)}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  };

  await t.test("runs are listed page by page and read one by one", async () => {
    const seen = [];
    let cursor = "";
    let pages = 0;
    do {
      const page = await client.listRuns({ limit: 2, cursor });
      assert.ok(page.runs.length <= 2);
      seen.push(...runRows(page).map((row) => row.id));
      cursor = page.next_cursor;
      pages += 1;
    } while (cursor);
    assert.equal(seen.length, 7, `${seen}`);
    assert.equal(new Set(seen).size, 7, "no run twice");
    assert.equal(pages, 4);
    const completed = await client.listRuns({ status: "COMPLETED", agent: "plain" });
    assert.equal(completed.runs.length, 2);
    assert.equal(completed.next_cursor, null);
    const run = await client.getRun(completed.runs[0].id);
    assert.equal(run.status, "COMPLETED");
    const [step] = stepItems(run);
    assert.equal(step.calls[0].isError, false);
    assert.match(step.calls[0].result, /echo/);
    assert.match(Object.fromEntries(runFields(run)).Output, /done after 1 tool calls/);
    await assert.rejects(client.listRuns({ status: "BORED" }), (e) => e instanceof ApiError && e.code === "bad_request");
  });

  const approvals = [];
  await t.test("the inbox is paged by its cursor", async () => {
    let cursor = "";
    do {
      const page = await client.inbox({ limit: 2, cursor });
      approvals.push(...page.approvals);
      cursor = page.next_cursor;
    } while (cursor);
    assert.equal(approvals.length, 4, JSON.stringify(approvals));
    for (const a of approvals) {
      assert.equal(a.agent, "gate");
      assert.equal(a.tool, "echo");
      assert.deepEqual(a.arguments, { n: 1 });
    }
  });

  await t.test("an approval with edited arguments resumes the run, followed live", async () => {
    const [approval] = approvals;
    // The stream is followed from the start while the run waits and resumes.
    const events = [];
    const following = (async () => {
      for await (const event of client.follow(approval.run_id)) events.push(event);
    })();
    const body = decisionBody({ decision: "approve", by: "console test", argumentsText: "{\"n\": 42}" });
    const answer = await client.decide(approval.run_id, approval.id, body);
    assert.equal(answer.decision, "approved");
    assert.equal(answer.by, "console test");
    await following;
    const names = events.map((e) => e.event);
    assert.equal(names[0], "run_submitted");
    assert.ok(names.includes("approval_requested") && names.includes("approval_decided"), `${names}`);
    assert.equal(names.at(-1), "run_completed");
    const seqs = events.filter((e) => !e.id.includes(".")).map((e) => Number(e.id));
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
    const last = JSON.parse(events.at(-1).data);
    assert.equal(last.event.type, "run_completed");
    assert.equal(String(last.seq), events.at(-1).id);

    const run = await client.getRun(approval.run_id);
    assert.equal(run.status, "COMPLETED");
    assert.deepEqual(run.approvals[0].edited_arguments, { n: 42 });
    assert.equal(run.approvals[0].decided_by, "console test");
    // The tool was called with the edits (the mock tool echoes them; the
    // step keeps what the model asked for).
    assert.deepEqual(JSON.parse(run.steps[0].tool_calls[0].result), { echo: { n: 42 } });
    assert.match(run.output, /"n":42/);

    // Resuming after an event replays only what follows it.
    const middle = events[Math.floor(events.length / 2)].id;
    const rest = [];
    for await (const event of client.follow(approval.run_id, { lastEventId: middle })) rest.push(event.id);
    assert.deepEqual(rest, events.slice(events.findIndex((e) => e.id === middle) + 1).map((e) => e.id));
  });

  await t.test("a rejection needs and carries a reason", async () => {
    const approval = approvals[1];
    await assert.rejects(
      client.decide(approval.run_id, approval.id, { decision: "reject" }),
      (e) => e.code === "invalid" && e.status === 422 && e.fields[0].field === "reason",
    );
    const answer = await client.decide(approval.run_id, approval.id, decisionBody({ decision: "reject", reason: "not today" }));
    assert.equal(answer.decision, "rejected");
    const run = await eventually("the rejected run", () => client.getRun(approval.run_id), (r) => r.status === "COMPLETED");
    assert.equal(run.approvals[0].status, "rejected");
    assert.equal(run.approvals[0].decision_reason, "not today");
    await assert.rejects(
      client.decide(approval.run_id, approval.id, { decision: "approve" }),
      (e) => e instanceof ApiError && e.status >= 400 && e.status < 500,
    );
  });

  await t.test("a run is cancelled", async () => {
    const approval = approvals[2];
    const answer = await client.cancelRun(approval.run_id, "not needed");
    assert.equal(answer.status, "CANCELLED");
    const run = await client.getRun(approval.run_id);
    assert.equal(run.status, "CANCELLED");
    assert.equal(run.approvals[0].status, "void");
    assert.equal((await client.inbox()).approvals.length, 1);
  });

  await t.test("a dead letter is retried", async () => {
    const { dead_letters: letters } = await client.deadLetters();
    assert.equal(letters.length, 1, JSON.stringify(letters));
    const answer = await client.retryDeadLetter(letters[0].id);
    assert.deepEqual(answer, { id: letters[0].id, run_id: letters[0].run_id, status: "requeued" });
    await assert.rejects(client.retryDeadLetter("not-a-task"), (e) => e.code === "not_found");
  });

  await t.test("the page renders each view and decides an approval", async () => {
    const approval = approvals[3];
    const page = fakeBrowser(process.env.KEEL_URL, process.env.KEEL_TOKEN, "dom tester");
    await import("../../src/api/console/console.js?page");
    try {
      await decideOnThePage(page, approval);
    } finally {
      // Leaving the run's view stops following its stream.
      await page.go("#runs");
    }
  });

  async function decideOnThePage(page, approval) {
    const text = () => page.view.textContent;
    await eventually("the runs view", text, (t) => t.includes("Runs") && t.includes(approval.run_id));
    assert.equal([...page.view.all()].filter((e) => e.tagName === "TR").length, 8, "a header and 7 runs");

    await page.go("#approvals");
    assert.match(text(), /Approve echo\?/);
    assert.match(text(), new RegExp(`Run${approval.run_id}`));

    await page.go(`#run/${approval.run_id}`);
    assert.match(text(), /StatusAWAITING_APPROVAL/);
    assert.match(text(), /Waiting for a decision/);
    assert.ok(![...page.view.all()].some((e) => e.tagName === "DD" && e.textContent === ""));
    const [rejectReason, edited] = [...page.view.all()].filter((e) => ["INPUT", "TEXTAREA"].includes(e.tagName));
    assert.equal(edited.value, "{\n  \"n\": 1\n}");
    await page.view.button("Reject").dispatch("click");
    assert.match(text(), /a rejection needs a reason/);
    edited.value = "{\"n\": ";
    await page.view.button("Approve with these arguments").dispatch("click");
    assert.match(text(), /the arguments are not JSON/);
    assert.equal(rejectReason.value, "");
    edited.value = "{\"n\": 7}";
    await page.view.button("Approve with these arguments").dispatch("click");
    // The live stream refreshes the view until the run has completed.
    await eventually("the live view", text, (t) => t.includes("COMPLETED") && t.includes("approved by dom tester"));
    const run = await client.getRun(approval.run_id);
    assert.deepEqual(run.approvals[0].edited_arguments, { n: 7 });

    await page.go("#approvals");
    assert.match(text(), /Nothing is waiting/);
    await page.go("#dlq");
    assert.match(text(), /Dead letters/);
    await page.go("#nowhere");
    assert.match(text(), /Runs/);
    assert.equal(page.notice.textContent, "");

    // Without a token the notice says one is needed.
    page.token.value = "";
    await page.settings.dispatch("submit");
    assert.equal(page.notice.textContent, "this server needs an API token: enter it above");
  }

  await t.test("without the token the API says so", async () => {
    const anonymous = new Client({ baseUrl: process.env.KEEL_URL });
    await assert.rejects(anonymous.listRuns(), (e) => {
      assert.ok(e instanceof ApiError);
      assert.equal(e.code, "unauthorized");
      assert.equal(e.status, 401);
      assert.match(errorText(e), /this server needs an API token/);
      return true;
    });
    await assert.rejects(
      (async () => { for await (const _ of anonymous.follow(approvals[0].run_id)) ; })(),
      (e) => e.code === "unauthorized",
    );
  });
});
