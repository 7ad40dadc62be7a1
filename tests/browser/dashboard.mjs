// The dashboard in a real browser (Debian's chromium, driven by playwright-core), against a
// daemon that tests/dashboard.rs runs and restarts.
//
// Protocol with the Rust side, one line each: this script prints `restart` on stdout when
// the daemon should be restarted (SIGTERM, then the same data dir and port) and waits for
// `restarted` on stdin; it prints `ok` when every check passed. Progress and failures go to
// stderr. Every wait is on the page's state (waitForFunction), never on a sleep.
//
// Environment: PROGRESSD_URL (the daemon), SCENARIO (`restart` or `auth`), PROGRESSD_SECRET
// (the daemon's JWT secret, for `auth`), CHROMIUM (the browser; /usr/bin/chromium).

import { createHmac } from "node:crypto";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const BASE = process.env.PROGRESSD_URL;
const SECRET = process.env.PROGRESSD_SECRET;
const WAIT = 10_000;
if (!BASE) throw new Error("PROGRESSD_URL is not set");

const stdin = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const log = (text) => process.stderr.write(`dashboard.mjs: ${text}\n`);
const say = (line) => process.stdout.write(`${line}\n`);

// An HS256 token the daemon accepts, as an application's backend would mint it.
function token(grants) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const exp = Math.floor(Date.now() / 1000) + 600;
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part({ progressd: grants, exp })}`;
  return `${unsigned}.${createHmac("sha256", SECRET).update(unsigned).digest("base64url")}`;
}
const ADMIN = SECRET ? token({ publish: ["*"], subscribe: ["*"], admin: true }) : null;
const auth = ADMIN ? { authorization: `Bearer ${ADMIN}` } : {};

async function publish(job, update) {
  const res = await fetch(`${BASE}/v1/jobs/${job}/events`, {
    method: "POST",
    headers: { "content-type": "application/json", ...auth },
    body: JSON.stringify(update),
  });
  if (res.status !== 201) throw new Error(`publish to ${job}: HTTP ${res.status} ${await res.text()}`);
}

async function remove(job) {
  const res = await fetch(`${BASE}/v1/jobs/${job}`, { method: "DELETE", headers: auth });
  if (res.status !== 204) throw new Error(`delete ${job}: HTTP ${res.status}`);
}

// What the page shows, for the waits and for failure messages.
function state() {
  const rows = [...document.querySelectorAll("#rows tr[data-job]")].map((tr) => ({
    job: tr.dataset.job,
    status: tr.dataset.status,
    seq: Number(tr.dataset.seq),
    value: tr.querySelector("progress").getAttribute("value"),
    stage: tr.children[3].textContent,
    message: tr.children[4].textContent,
  }));
  const events = [...document.querySelectorAll("#d-events tr")].map((tr) => Number(tr.dataset.seq));
  return {
    conn: document.getElementById("conn").dataset.state,
    auth: !document.getElementById("auth").hidden,
    rows,
    detail: document.getElementById("detail").hidden ? null : {
      conn: document.getElementById("d-conn").dataset.state,
      status: document.getElementById("d-snap").dataset.status,
      events,
    },
  };
}

// What went wrong in the pages: uncaught errors, CSP violations.
const problems = [];

async function open(browser, url, options) {
  const page = await (await browser.newContext(options)).newPage();
  page.on("pageerror", (err) => problems.push(`uncaught: ${err.stack || err.message}`));
  page.on("console", (msg) => {
    if (/Content.Security.Policy/i.test(msg.text())) problems.push(`CSP: ${msg.text()}`);
  });
  await page.goto(url);
  return page;
}

// A page function made of node-side functions. The page's CSP forbids eval, and Playwright
// evaluates string predicates with eval; a function is compiled over the DevTools protocol.
const inPage = (body) => new Function(`return ${body};`);

// Waits until `check(state)` holds on `page`; otherwise says what and shows the state.
async function until(page, what, check) {
  try {
    if (problems.length) throw new Error("the page reported problems");
    await page.waitForFunction(inPage(`(${check})((${state})())`), null, { timeout: WAIT });
    if (problems.length) throw new Error("the page reported problems");
    log(`ok: ${what}`);
  } catch (err) {
    const seen = await page.evaluate(state).catch(() => "(page gone)");
    throw new Error(`failed waiting for: ${what}\npage state: ${JSON.stringify(seen, null, 1)}\n`
      + `${problems.join("\n")}\n${err.message}`);
  }
}

const scenarios = {
  // Publish, watch the list and a job, restart the daemon under the open page.
  async restart(browser) {
    const XSS = `<img src=x onerror="window.__xss=1">`;
    await publish("old-1", { status: "queued", stage: "waiting" });
    await publish("lint-1", { status: "running", percent: 10 });
    await publish("lint-1", { status: "succeeded", percent: 100 });
    await publish("build-42", { status: "queued" });
    await publish("build-42", { status: "running", percent: 40, stage: "compile", message: XSS });

    const page = await open(browser, `${BASE}/`);
    await until(page, "the stream is live", (s) => s.conn === "live");
    await until(page, "build-42 listed at 40%, running, newest first",
      (s) => s.rows.map((r) => r.job).join() === "build-42,lint-1,old-1"
        && s.rows[0].value === "40" && s.rows[0].status === "running" && s.rows[0].stage === "compile"
        && s.rows[1].status === "succeeded" && s.rows[2].status === "queued");
    const shown = await page.evaluate(() => ({
      images: document.querySelectorAll("img").length,
      ran: "__xss" in window,
      label: document.querySelector('#rows tr[data-job="build-42"] progress').getAttribute("aria-label"),
    }));
    if (shown.images || shown.ran) throw new Error(`job data was rendered as markup: ${JSON.stringify(shown)}`);
    if (shown.label !== "build-42 progress") throw new Error(`progress label: ${shown.label}`);
    await until(page, "the message is shown as text", new Function("s", `return s.rows[0].message === ${JSON.stringify(XSS)}`));

    // Live: an update, a new job, a deletion.
    await publish("build-42", { percent: 50, stage: "test" });
    await until(page, "build-42 at 50% live", (s) => s.rows[0].value === "50" && s.rows[0].stage === "test");
    await publish("deploy-7", { status: "running", current: 1, total: 4 });
    await until(page, "a new job appears on top", (s) => s.rows[0].job === "deploy-7" && s.rows[0].value === "25");
    await remove("deploy-7");
    await until(page, "a deleted job disappears", (s) => !s.rows.some((r) => r.job === "deploy-7"));

    // Filters.
    await page.selectOption("#f-status", "succeeded");
    await until(page, "the status filter", (s) => s.rows.map((r) => r.job).join() === "lint-1");
    await page.selectOption("#f-status", "");
    await page.fill("#f-prefix", "build");
    await until(page, "the prefix filter", (s) => s.rows.map((r) => r.job).join() === "build-42");
    await page.fill("#f-prefix", "");
    await until(page, "no filter", (s) => s.rows.length === 3);

    // The detail view: history, then live.
    await page.click('#rows tr[data-job="build-42"] a');
    await until(page, "the detail shows the history and goes live",
      (s) => s.detail && s.detail.conn === "live" && s.detail.events.join() === "1,2,3" && s.detail.status === "running");
    await publish("build-42", { percent: 60 });
    await until(page, "the detail streams", (s) => s.detail.events.join() === "1,2,3,4" && s.rows[0].value === "60");

    // The daemon restarts under the open page.
    await page.evaluate(() => {
      window.__states = { conn: [], detail: [] };
      const watch = (id, into) => new MutationObserver(() => into.push(document.getElementById(id).dataset.state))
        .observe(document.getElementById(id), { attributes: true, attributeFilter: ["data-state"] });
      watch("conn", window.__states.conn);
      watch("d-conn", window.__states.detail);
    });
    say("restart");
    const answer = await stdin.next();
    if (answer.value !== "restarted") throw new Error(`expected "restarted", got ${JSON.stringify(answer)}`);
    // The daemon's `retry:` keeps the page away for a second: this comes from the replay.
    await publish("build-42", { percent: 80, message: "after restart" });
    log(`the daemon restarted; published with the page ${(await page.evaluate(state)).conn}`);
    const reconnected = (states) => {
      const i = states.indexOf("reconnecting");
      return i >= 0 && states.slice(i).includes("live") && states[states.length - 1] === "live";
    };
    await page.waitForFunction(
      inPage(`(${reconnected})(window.__states.conn) && (${reconnected})(window.__states.detail)`),
      null, { timeout: WAIT },
    ).catch(async (err) => {
      throw new Error(`indicators did not go reconnecting → live: ${JSON.stringify(await page.evaluate(() => window.__states))}\n${err.message}`);
    });
    log(`ok: indicators went ${JSON.stringify(await page.evaluate(() => window.__states))}`);
    await until(page, "the update published across the restart arrives",
      (s) => s.rows[0].value === "80" && s.rows[0].message === "after restart" && s.detail.events.join() === "1,2,3,4,5");

    // The end.
    await publish("build-42", { status: "succeeded", percent: 100 });
    await until(page, "succeeded, once, with every event once",
      (s) => s.rows.filter((r) => r.job === "build-42").length === 1 && s.rows.length === 3
        && s.rows[0].status === "succeeded" && s.rows[0].value === "100" && s.rows[0].seq === 6
        && s.detail.status === "succeeded" && s.detail.conn === "finished"
        && s.detail.events.join() === "1,2,3,4,5,6");
    const badge = await page.textContent('#rows tr[data-job="build-42"] .badge');
    if (badge !== "succeeded") throw new Error(`status badge: ${badge}`);

    // A page opened on a finished job's URL: history and snapshot, and no stream.
    const second = await open(browser, `${BASE}/#job=build-42`);
    await until(second, "a finished job opened by URL",
      (s) => s.detail && s.detail.status === "succeeded" && s.detail.conn === "finished"
        && s.detail.events.join() === "1,2,3,4,5,6" && s.rows.length === 3);

    // A page that opens while a job is being published to: its list, its history and its
    // streams overlap, and it still applies every event exactly once.
    const burst = (async () => {
      for (let i = 1; i <= 150; i++) {
        await publish("burst-1", { current: i, total: 150, ...(i === 150 && { status: "succeeded" }) });
      }
    })();
    const third = await open(browser, `${BASE}/#job=burst-1`);
    await burst;
    await until(third, "a job published to while the page loads, every event once",
      (s) => s.rows.filter((r) => r.job === "burst-1").length === 1
        && s.rows[0].job === "burst-1" && s.rows[0].seq === 150 && s.rows[0].status === "succeeded"
        && s.rows[0].value === "100" && s.detail.conn === "finished"
        && s.detail.events.length === 150 && s.detail.events.every((seq, i) => seq === i + 1));
  },

  // With auth on: the page asks for a token, keeps it in the cookie, streams with it; a
  // token in the page's URL works too.
  async auth(browser) {
    await publish("team-1", { status: "running", percent: 30 });
    await publish("other-1", { status: "running", percent: 70 });
    const reader = token({ subscribe: ["team-*"] });

    const page = await open(browser, `${BASE}/`);
    await until(page, "a token is asked for", (s) => s.auth && s.conn === "signed-out" && s.rows.length === 0);
    await page.fill("#token", reader);
    await page.click('#auth-form button[type="submit"]');
    await until(page, "the token's jobs are listed, live",
      (s) => !s.auth && s.conn === "live" && s.rows.map((r) => r.job).join() === "team-1" && s.rows[0].value === "30");
    const cookie = (await page.context().cookies()).find((c) => c.name === "progressd_token");
    if (cookie?.value !== reader || cookie.sameSite !== "Strict" || cookie.path !== "/") {
      throw new Error(`cookie: ${JSON.stringify(cookie)}`);
    }
    await publish("team-1", { percent: 90 });
    await publish("other-1", { percent: 80 });
    await publish("team-2", { status: "queued" });
    await until(page, "the stream carries the token's jobs only",
      (s) => s.rows.map((r) => r.job).join() === "team-2,team-1" && s.rows[1].value === "90");
    await page.click('#rows tr[data-job="team-1"] a');
    await until(page, "the detail streams with the cookie",
      (s) => s.detail && s.detail.conn === "live" && s.detail.events.join() === "1,2");

    const linked = await open(browser, `${BASE}/?access_token=${reader}#job=team-1`);
    await until(linked, "a token in the page's URL",
      (s) => !s.auth && s.conn === "live" && s.rows.length === 2 && s.detail.events.join() === "1,2");
    await publish("team-1", { status: "failed", message: "out of disk" });
    await until(linked, "failed, through the URL token",
      (s) => s.rows[0].job === "team-1" && s.rows[0].status === "failed" && s.detail.conn === "finished");
  },
};

const scenario = scenarios[process.env.SCENARIO || "restart"];
if (!scenario) throw new Error(`unknown SCENARIO ${process.env.SCENARIO}`);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
});
try {
  await scenario(browser);
  if (problems.length) throw new Error(`the page reported problems:\n${problems.join("\n")}`);
  say("ok");
} finally {
  await browser.close();
}
