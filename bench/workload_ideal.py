#!/usr/bin/env python3
"""The floor for bench/workload.sh: Chat calls per 1,000 reads of an ideal cache.

The same operation mix as examples/workload.rs (60% portrait_get of the 20 accounts
of a screen, or of 20 independent picks; 15% get_list; 10% get_group_info; 10%
get_joined_group_list; 5% writes), accounts and groups picked Zipf(1.1), drawn
from Python's generator (the same distribution, not the same operations). The
cache is ideal: one for the whole fleet, entries never expire and are never
evicted, and only writes drop them, and only what they must (portrait_set: the
account's profile; sendmsg: the two accounts' conversation lists; group writes:
the group's info, not its members' lists). A read is one call to Chat when any of
its items is not cached, as for the gateway. No cache can make fewer calls on this
mix; the gateway, with TTLs, makes more.

    bench/workload_ideal.py --ops 30000 --accounts 100000 --groups 5000 [--rounds 2]
        [--portraits screens|independent] [--seed 1]

Prints one line per round: calls, reads, calls per 1,000 reads.
"""
import argparse
import bisect
import random


def zipf_cdf(n, s=1.1):
    out, total = [], 0.0
    for k in range(1, n + 1):
        total += k ** -s
        out.append(total)
    return [c / total for c in out]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ops", type=int, default=30000)
    p.add_argument("--accounts", type=int, default=100000)
    p.add_argument("--groups", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--portraits", choices=["screens", "independent"], default="screens")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    accounts, groups = zipf_cdf(a.accounts), zipf_cdf(a.groups)
    rng = random.Random(a.seed)

    def pick(cdf, r):
        return min(bisect.bisect_left(cdf, r.random()), len(cdf) - 1)

    profiles, pages, info, joined = set(), set(), set(), set()
    for rnd in range(1, a.rounds + 1):
        calls = reads = 0
        for _ in range(a.ops):
            x = rng.randrange(100)
            if x < 60:
                # A screen: the same viewer always shows the same 20 accounts.
                r = random.Random(pick(accounts, rng) * 7919 + 1) if a.portraits == "screens" else rng
                named = set()
                while len(named) < 20:
                    named.add(pick(accounts, r))
                reads += 1
                if not named <= profiles:
                    calls += 1
                    profiles |= named
            elif x < 95:
                table, cdf = (pages, accounts) if x < 75 else (info, groups) if x < 85 else (joined, accounts)
                item = pick(cdf, rng)
                reads += 1
                if item not in table:
                    calls += 1
                    table.add(item)
            else:
                w = rng.randrange(10)
                if w < 3:
                    profiles.discard(pick(accounts, rng))
                elif w < 7:
                    pages.discard(pick(accounts, rng))
                    pages.discard(pick(accounts, rng))
                else:
                    info.discard(pick(groups, rng))
        print(f"round {rnd}: {calls} calls, {reads} reads, {1000 * calls / reads:.1f} per 1,000 reads")


if __name__ == "__main__":
    main()
