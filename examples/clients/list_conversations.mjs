#!/usr/bin/env node
// List one account's conversations through chat-gateway.
//
// Pages through POST /v4/recentcontact/get_list until CompleteFlag is 1, sending back
// the cursors (TimeStamp, StartIndex, TopTimeStamp, TopStartIndex) of each answer, and
// prints one line per conversation followed by a total:
//
//     <c2c|group> TAB <peer account or GroupId> TAB <MsgTime, UTC> TAB <pinned|->
//     total: N conversations (P pinned) in K pages
//
// Usage:
//     node list_conversations.mjs ACCOUNT [GATEWAY_URL]
//
//     ACCOUNT       falls back to $CHAT_ACCOUNT
//     GATEWAY_URL   falls back to $CHAT_GATEWAY_URL, then http://127.0.0.1:8080
//     $CHAT_GATEWAY_TOKEN, when set, is sent as "Authorization: Bearer <token>"
//                   (needed when the gateway has server.auth_tokens).
//
// Exit status: 0 listed; 1 Chat or the gateway answered an error, or the gateway could
// not be reached; 2 usage. Node.js 18+, no dependencies (the built-in fetch).

const REQUEST_TIMEOUT_MS = 10_000;
// HTTP 429 (the gateway's rate limit): how many times to retry a page, and the wait
// when the answer carries no usable Retry-After.
const MAX_RETRIES = 3;
const DEFAULT_RETRY_SECS = 1.0;
const MAX_RETRY_SECS = 30.0;
// A guard against a cursor that never completes.
const MAX_PAGES = 10_000;
const CURSOR = ["TimeStamp", "StartIndex", "TopTimeStamp", "TopStartIndex"];

/** An error worth one line on stderr and exit status 1. */
class Failure extends Error {}

/** POSTs one get_list request; returns {status, headers, answer (or null), raw}. */
async function postPage(url, token, body) {
  const headers = { "content-type": "application/json", accept: "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  let resp, raw;
  try {
    resp = await fetch(url, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    raw = await resp.text();
  } catch (e) {
    const reason = e.cause?.code ?? e.cause?.message ?? e.message;
    throw new Failure(`cannot reach the gateway at ${url}: ${reason}`);
  }
  let answer = null;
  try {
    answer = JSON.parse(raw);
  } catch {
    // not JSON: reported by describe()
  }
  return { status: resp.status, headers: resp.headers, answer, raw };
}

/** Seconds to wait before retry `attempt` (1-based): Retry-After when present. */
function retryDelay(headers, attempt) {
  const value = headers.get("retry-after");
  let secs = value === null || value.trim() === "" ? NaN : Number(value);
  if (!Number.isFinite(secs)) secs = DEFAULT_RETRY_SECS * 2 ** (attempt - 1);
  return Math.min(Math.max(secs, 0.1), MAX_RETRY_SECS);
}

/** One line naming what went wrong, from the envelope and the gateway's headers. */
function describe({ status, headers, answer, raw }) {
  const parts = [`HTTP ${status}`];
  if (answer !== null && typeof answer === "object" && "ErrorCode" in answer) {
    parts.push(`ErrorCode ${answer.ErrorCode}: ${answer.ErrorInfo ?? ""}`);
  } else {
    parts.push(`body: ${raw.slice(0, 200)}`);
  }
  const reason = headers.get("x-chat-gateway-error");
  if (reason) parts.push(`gateway: ${reason}`);
  const requestId = headers.get("x-request-id");
  if (requestId) parts.push(`request id ${requestId}`);
  return parts.join("; ");
}

/** One page, retrying HTTP 429 up to MAX_RETRIES times; throws Failure on errors. */
async function fetchPage(url, token, body) {
  for (let attempt = 0; ; ) {
    const r = await postPage(url, token, body);
    if (r.status === 429 && attempt < MAX_RETRIES) {
      attempt += 1;
      const delay = retryDelay(r.headers, attempt);
      console.error(
        `rate limited (HTTP 429), retrying in ${delay.toFixed(1)} s (retry ${attempt} of ${MAX_RETRIES})`,
      );
      await new Promise((resolve) => setTimeout(resolve, delay * 1000));
      continue;
    }
    if (r.status !== 200 || r.answer === null || typeof r.answer !== "object" || r.answer.ErrorCode !== 0) {
      throw new Failure(`get_list failed: ${describe(r)}`);
    }
    return r.answer;
  }
}

function conversationLine(item) {
  const kind = item.Type === 2 ? "group" : "c2c";
  const peer = kind === "group" ? item.GroupId : item.To_Account;
  // toISOString() always has milliseconds; MsgTime is whole seconds.
  const when = new Date(Number(item.MsgTime ?? 0) * 1000).toISOString().replace(/\.\d{3}Z$/, "Z");
  const pinned = item.TopFlag === 1 ? "pinned" : "-";
  return `${kind}\t${peer}\t${when}\t${pinned}`;
}

async function listConversations(baseUrl, account, token) {
  const url = `${baseUrl.replace(/\/+$/, "")}/v4/recentcontact/get_list`;
  let cursor = { TimeStamp: 0, StartIndex: 0, TopTimeStamp: 0, TopStartIndex: 0 };
  let total = 0;
  let pinned = 0;
  let pages = 0;
  for (;;) {
    const answer = await fetchPage(url, token, { From_Account: account, ...cursor, AssistFlags: 63 });
    pages += 1;
    const lines = [];
    for (const item of answer.SessionItem ?? []) {
      lines.push(`${conversationLine(item)}\n`);
      total += 1;
      if (item.TopFlag === 1) pinned += 1;
    }
    process.stdout.write(lines.join(""));
    if (answer.CompleteFlag === 1) break;
    const following = Object.fromEntries(CURSOR.map((k) => [k, answer[k] ?? 0]));
    if (CURSOR.every((k) => following[k] === cursor[k]) || pages >= MAX_PAGES) {
      throw new Failure(`get_list did not complete: cursor stuck at ${JSON.stringify(following)}`);
    }
    cursor = following;
  }
  console.log(`total: ${total} conversations (${pinned} pinned) in ${pages} pages`);
}

async function main(argv) {
  const args = argv.slice(2);
  const usage = "usage: node list_conversations.mjs ACCOUNT [GATEWAY_URL]";
  if (args.length > 2 || args.includes("-h") || args.includes("--help")) {
    console.error(usage);
    return 2;
  }
  const account = args[0] || process.env.CHAT_ACCOUNT || "";
  const baseUrl = args[1] || process.env.CHAT_GATEWAY_URL || "http://127.0.0.1:8080";
  if (!account) {
    console.error(usage);
    return 2;
  }
  const token = (process.env.CHAT_GATEWAY_TOKEN ?? "").trim();
  try {
    await listConversations(baseUrl, account, token);
  } catch (e) {
    if (!(e instanceof Failure)) throw e;
    console.error(`error: ${e.message}`);
    return 1;
  }
  return 0;
}

// stdout closed early (e.g. piped into `head`): stop quietly.
process.stdout.on("error", (e) => {
  if (e.code !== "EPIPE") throw e;
  process.exit(1);
});
// Set exitCode rather than calling process.exit(), so buffered stdout is flushed.
process.exitCode = await main(process.argv);
