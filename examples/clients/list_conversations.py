#!/usr/bin/env python3
"""List one account's conversations through chat-gateway.

Pages through POST /v4/recentcontact/get_list until CompleteFlag is 1, sending back
the cursors (TimeStamp, StartIndex, TopTimeStamp, TopStartIndex) of each answer, and
prints one line per conversation followed by a total:

    <c2c|group> TAB <peer account or GroupId> TAB <MsgTime, UTC> TAB <pinned|->
    total: N conversations (P pinned) in K pages

Usage:
    python3 list_conversations.py ACCOUNT [GATEWAY_URL]

    ACCOUNT       falls back to $CHAT_ACCOUNT
    GATEWAY_URL   falls back to $CHAT_GATEWAY_URL, then http://127.0.0.1:8080
    $CHAT_GATEWAY_TOKEN, when set, is sent as "Authorization: Bearer <token>"
                  (needed when the gateway has server.auth_tokens).

Exit status: 0 listed; 1 Chat or the gateway answered an error, or the gateway could
not be reached; 2 usage. Python 3.8+, standard library only (urllib).
"""

import datetime
import json
import os
import sys
import time
import urllib.error
import urllib.request

REQUEST_TIMEOUT_SECS = 10
# HTTP 429 (the gateway's rate limit): how many times to retry a page, and the wait
# when the answer carries no usable Retry-After.
MAX_RETRIES = 3
DEFAULT_RETRY_SECS = 1.0
MAX_RETRY_SECS = 30.0
# A guard against a cursor that never completes.
MAX_PAGES = 10_000


class Failure(Exception):
    """An error worth one line on stderr and exit status 1."""


def post_page(url, token, body):
    """POSTs one get_list request; returns (status, headers, parsed JSON or None, raw)."""
    data = json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_SECS) as resp:
            status, hdrs, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:  # 4xx/5xx: the body is still an answer
        status, hdrs, raw = e.code, e.headers, e.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise Failure(f"cannot reach the gateway at {url}: {reason}") from None
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    return status, hdrs, parsed, raw


def retry_delay(headers, attempt):
    """Seconds to wait before retry `attempt` (1-based): Retry-After when present."""
    value = headers.get("Retry-After") if headers else None
    try:
        secs = float(value)
    except (TypeError, ValueError):
        secs = DEFAULT_RETRY_SECS * 2 ** (attempt - 1)
    return min(max(secs, 0.1), MAX_RETRY_SECS)


def describe(status, headers, answer, raw):
    """One line naming what went wrong, from the envelope and the gateway's headers."""
    parts = [f"HTTP {status}"]
    if isinstance(answer, dict) and "ErrorCode" in answer:
        parts.append(f"ErrorCode {answer.get('ErrorCode')}: {answer.get('ErrorInfo', '')}")
    else:
        parts.append("body: " + raw[:200].decode("utf-8", "replace"))
    reason = headers.get("x-chat-gateway-error") if headers else None
    if reason:
        parts.append(f"gateway: {reason}")
    request_id = headers.get("x-request-id") if headers else None
    if request_id:
        parts.append(f"request id {request_id}")
    return "; ".join(parts)


def fetch_page(url, token, body):
    """One page, retrying HTTP 429 up to MAX_RETRIES times; raises Failure on errors."""
    attempt = 0
    while True:
        status, headers, answer, raw = post_page(url, token, body)
        if status == 429 and attempt < MAX_RETRIES:
            attempt += 1
            delay = retry_delay(headers, attempt)
            print(
                f"rate limited (HTTP 429), retrying in {delay:.1f} s "
                f"(retry {attempt} of {MAX_RETRIES})",
                file=sys.stderr,
            )
            time.sleep(delay)
            continue
        if status != 200 or not isinstance(answer, dict) or answer.get("ErrorCode") != 0:
            raise Failure("get_list failed: " + describe(status, headers, answer, raw))
        return answer


def conversation_line(item):
    kind = "group" if item.get("Type") == 2 else "c2c"
    peer = item.get("GroupId") if kind == "group" else item.get("To_Account")
    when = datetime.datetime.fromtimestamp(int(item.get("MsgTime", 0)), datetime.timezone.utc)
    pinned = "pinned" if item.get("TopFlag") == 1 else "-"
    return f"{kind}\t{peer}\t{when.strftime('%Y-%m-%dT%H:%M:%SZ')}\t{pinned}"


def list_conversations(base_url, account, token):
    url = base_url.rstrip("/") + "/v4/recentcontact/get_list"
    cursor = {"TimeStamp": 0, "StartIndex": 0, "TopTimeStamp": 0, "TopStartIndex": 0}
    total = pinned = pages = 0
    while True:
        body = {"From_Account": account, **cursor, "AssistFlags": 63}
        answer = fetch_page(url, token, body)
        pages += 1
        for item in answer.get("SessionItem") or []:
            print(conversation_line(item))
            total += 1
            pinned += item.get("TopFlag") == 1
        if answer.get("CompleteFlag") == 1:
            break
        following = {k: answer.get(k, 0) for k in cursor}
        if following == cursor or pages >= MAX_PAGES:
            raise Failure(f"get_list did not complete: cursor stuck at {following}")
        cursor = following
    print(f"total: {total} conversations ({pinned} pinned) in {pages} pages")


def main(argv):
    if len(argv) > 3 or any(a in ("-h", "--help") for a in argv[1:]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    account = argv[1] if len(argv) > 1 else os.environ.get("CHAT_ACCOUNT", "")
    base_url = (argv[2] if len(argv) > 2 else "") or os.environ.get(
        "CHAT_GATEWAY_URL", "http://127.0.0.1:8080"
    )
    if not account:
        print("usage: list_conversations.py ACCOUNT [GATEWAY_URL]", file=sys.stderr)
        return 2
    token = os.environ.get("CHAT_GATEWAY_TOKEN", "").strip()
    try:
        list_conversations(base_url, account, token)
    except Failure as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # stdout was closed early (e.g. piped into `head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
