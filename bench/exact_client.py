#!/usr/bin/env python3
"""Sends exactly N POSTs on keep-alive connections and checks every answer.

For bench/instructions.sh: wrk cannot send an exact count. Each of the C
connections (default 1) sends N / C requests in turn, one at a time; every answer
must be HTTP 200, carry the expected header values (--expect NAME=VALUE,
repeatable, case-insensitive names) and, with --length, a body of that many
bytes. A connection the server closes is an error (the server must keep it
alive). Prints one line: the count, the connections and the time taken.

    bench/exact_client.py --url http://127.0.0.1:8080/v4/recentcontact/get_list \
        --body-file req.json -n 1000 --expect x-cache=HIT --length 1275
"""

import argparse
import http.client
import sys
import time
import urllib.parse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--body-file", required=True)
    ap.add_argument("-n", type=int, required=True, help="requests in all")
    ap.add_argument("-c", type=int, default=1, help="keep-alive connections (used in turn)")
    ap.add_argument("--expect", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--length", type=int, help="expected body length in bytes")
    ap.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                    help="extra request header")
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    if a.n < 0 or a.c < 1:
        ap.error("-n must be >= 0 and -c >= 1")

    u = urllib.parse.urlsplit(a.url)
    path = u.path + ("?" + u.query if u.query else "")
    with open(a.body_file, "rb") as f:
        body = f.read()
    headers = {"Content-Type": "application/json"}
    for h in a.header:
        k, _, v = h.partition("=")
        headers[k] = v
    expect = []
    for e in a.expect:
        k, _, v = e.partition("=")
        expect.append((k.lower(), v))

    conns = [http.client.HTTPConnection(u.hostname, u.port or 80, timeout=a.timeout)
             for _ in range(a.c)]
    for c in conns:
        c.connect()
    start = time.monotonic()
    for i in range(a.n):
        c = conns[i % a.c]
        c.request("POST", path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            print(f"request {i + 1}: HTTP {r.status}: {data[:300]!r}", file=sys.stderr)
            return 1
        for k, v in expect:
            got = r.getheader(k)
            if got != v:
                print(f"request {i + 1}: {k}: {got!r}, expected {v!r}", file=sys.stderr)
                return 1
        if a.length is not None and len(data) != a.length:
            print(f"request {i + 1}: body of {len(data)} bytes, expected {a.length}",
                  file=sys.stderr)
            return 1
        if r.will_close:
            print(f"request {i + 1}: the server closed the connection", file=sys.stderr)
            return 1
    took = time.monotonic() - start
    for c in conns:
        c.close()
    print(f"{a.n} requests on {a.c} connection(s) in {took:.2f} s, all checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
