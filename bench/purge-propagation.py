#!/usr/bin/env python3
"""Purge propagation across three regions of `edge-router demo`, as a client sees it.

For each round: fill /static/pN in every region (until HIT), purge it by key
through region 0's admin listener, then poll regions 1 and 2 until each
answers MISS; the time from sending the purge to that MISS is one sample
(the 202 comes once the row is in the table; the fan-out starts before).
Run it once with the direct path and once with the direct path cut
(`--cut`: the links from region 0 are blocked, so the purge arrives through
the simulated table after the replication delay).

  bench/purge-propagation.py [--rounds 200] [--delay 300ms] [--cut] [--bin target/release/edge-router]

Prints p50/p90/p99/max per region. Not part of CI: it measures, it does not assert.
"""

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import time

REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-1"]
TOKEN = "purge-propagation-bench"


def free_block():
    for _ in range(200):
        base = random.randint(20000, 28000)
        ports = [base + i for i in range(106)] + [base + 200 + i for i in range(3)]
        ok = True
        for p in ports:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                ok = False
            finally:
                s.close()
            if not ok:
                break
        if ok:
            return base, base + 200
    sys.exit("no free block of ports")


def request(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    out = (r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    c.close()
    return out


def x_cache(port, path):
    return request(port, "GET", path, headers={"Host": "bench.test"})[1].get("x-cache", "")


def wait_until(check, limit=20.0, step=0.0005):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if check():
            return time.monotonic() - start
        time.sleep(step)
    return None


def pct(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--delay", default="300ms")
    ap.add_argument("--cut", action="store_true", help="block the direct path from region 0")
    ap.add_argument("--bin", default="target/release/edge-router")
    a = ap.parse_args()
    base, admin = free_block()
    env = dict(os.environ, EDGE_ADMIN_TOKEN=TOKEN, EDGE_LOG="warn")
    demo = subprocess.Popen(
        [a.bin, "demo", "--regions", "3", "--base-port", str(base),
         "--admin-base-port", str(admin), "--replication-delay", a.delay],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = wait_until(lambda: all(
            _ok(lambda: request(base + i, "GET", "/.edge/health")[0] == 200) for i in range(3)), 30, 0.1)
        if ready is None:
            sys.exit("demo did not start")
        auth = {"Authorization": "Bearer " + TOKEN}
        if a.cut:
            for to in REGIONS[1:]:
                request(base + 99, "PUT", f"/link?from={REGIONS[0]}&to={to}", b"blocked", auth)
        wait_until(lambda: all(x_cache(base + i, "/static/warm") in ("MISS", "HIT") for i in range(3)), 30, 0.1)
        samples = {r: [] for r in REGIONS[1:]}
        for n in range(a.rounds):
            path = f"/static/p{n}"
            for i in range(3):
                if wait_until(lambda: x_cache(base + i, path) == "HIT", 10, 0.01) is None:
                    sys.exit(f"{REGIONS[i]} never cached {path}")
            body = json.dumps({"keys": [f"http://bench.test{path}"]}).encode()
            t0 = time.monotonic()
            status, _, resp = request(admin, "POST", "/purge", body, auth)
            if status != 202:
                sys.exit(f"purge answered {status}: {resp!r}")
            pending = {1, 2}
            while pending and time.monotonic() - t0 < 20:
                for i in list(pending):
                    if x_cache(base + i, path) == "MISS":
                        samples[REGIONS[i]].append((time.monotonic() - t0) * 1000)
                        pending.discard(i)
            if pending:
                sys.exit(f"round {n}: regions {pending} never saw the purge")
        path_name = "table (direct path cut)" if a.cut else "direct + table"
        print(f"purge propagation, {a.rounds} purges by key through {REGIONS[0]}, "
              f"replication delay {a.delay}, {path_name}; ms from sending the purge to the first MISS")
        print(f"{'region':<16}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
        for r, s in samples.items():
            print(f"{r:<16}{pct(s, .5):8.1f}{pct(s, .9):8.1f}{pct(s, .99):8.1f}{max(s):8.1f}")
    finally:
        demo.terminate()
        demo.wait(timeout=10)


def _ok(f):
    try:
        return f()
    except OSError:
        return False


if __name__ == "__main__":
    main()
