#!/usr/bin/env python3
"""Summarise bench/run.sh's raw JSON into a markdown table, a JSON file and ratios."""
import json
import os
import statistics
import sys

work, rounds, tck, rate, size, conns, duration, kind, out, nginx_v, kernel, ncpu = sys.argv[1:13]
rounds, tck = int(rounds), int(tck)
targets = os.environ.get("BENCH_TARGETS", "direct nginx edge-router").split()


def load(path):
    with open(path) as f:
        return json.load(f)


# TLS rows (bench/run.sh writes one line each: name, client scheme, requests per
# client connection or "-" for keep-alive, fixed rate): a table of their own.
tls_meta = {}
if os.path.exists(f"{work}/tls-rows"):
    for line in open(f"{work}/tls-rows"):
        name, client, conn_requests, row_rate, handshakes = line.split()
        tls_meta[name] = {"client": client, "conn_requests": None if conn_requests == "-" else int(conn_requests),
                          "rate": float(row_rate), "client_handshakes": handshakes}


def tls_conns(t, r, closed):
    """New TLS connections over the closed-loop phase from an nginx log (client
    side: the proxy's own; upstream side: peer B's), per second."""
    path = f"{work}/conns-{t}-{r}.txt"
    if not os.path.exists(path):
        return {}
    side, full, resumed = open(path).read().split()
    d = closed["duration_s"]
    return {f"{side}_full_per_s": int(full) / d, f"{side}_resumed_per_s": int(resumed) / d,
            f"{side}_resumed_pct": 100 * int(resumed) / (int(full) + int(resumed)) if int(full) + int(resumed) else None}


TLS_KEYS = ["client_full_per_s", "client_resumed_per_s", "client_resumed_pct", "upstream_full_per_s", "upstream_resumed_per_s"]

rows = {}
for t in targets:
    per_round = []
    for r in range(1, rounds + 1):
        closed = load(f"{work}/closed-{t}-{r}.json")
        fixed = load(f"{work}/rate-{t}-{r}.json")
        ticks = int(open(f"{work}/cpu-{t}-{r}.ticks").read())
        rss = int(open(f"{work}/rss-{t}-{r}.kib").read())
        served = closed["responses"]
        per_round.append({
            "rps": closed["achieved_rps"],
            "cpu_us_per_req": (ticks / tck * 1e6 / served) if (t != "direct" and served) else None,
            "p50_ms": fixed["latency_ms"]["p50"],
            "p99_ms": fixed["latency_ms"]["p99"],
            "p99_9_ms": fixed["latency_ms"]["p99_9"],
            "errors": sum(closed["errors"].values()) + sum(fixed["errors"].values()),
            "non_2xx": sum(v for k, v in list(closed["status"].items()) + list(fixed["status"].items()) if not k.startswith("2")),
            "rss_mib": rss / 1024 if t != "direct" else None,
        })
        if t in tls_meta:
            c = tls_conns(t, r, closed)
            per_round[-1].update({k: c.get(k) for k in TLS_KEYS})
    med = {}
    for k in per_round[0]:
        vals = [p[k] for p in per_round if p[k] is not None]
        med[k] = statistics.median(vals) if vals else None
    med["spread_cpu_pct"] = (
        100 * (max(p["cpu_us_per_req"] for p in per_round) - min(p["cpu_us_per_req"] for p in per_round)) / med["cpu_us_per_req"]
        if t != "direct" and rounds > 1 and med["cpu_us_per_req"] else None
    )
    rows[t] = {"median": med, "rounds": per_round}


def fmt(v, nd=1):
    return "—" if v is None else f"{v:,.{nd}f}"


def ratio_of(edge, nginx):
    """edge ÷ nginx for each figure, or None when either row is absent (a skipped cache row)."""
    if edge not in rows or nginx not in rows:
        return None
    out = {}
    for k in ["rps", "cpu_us_per_req", "p50_ms", "p99_ms", "p99_9_ms", "rss_mib"]:
        n, e = rows[nginx]["median"][k], rows[edge]["median"][k]
        out[k] = (e / n) if n and e else None
    return out


ratio = ratio_of("edge-router", "nginx")
# The cache-hit rows: edge-router's cache against nginx's proxy_cache.
cache_ratio = ratio_of("edge-router-cache", "nginx-cache")
# The TLS rows, edge-router ÷ nginx each.
tls_ratios = {kind: ratio_of(f"edge-router-{kind}", f"nginx-{kind}") for kind in ["https", "handshake", "hop-tls"]}

lines = [
    f"Run: {kind}, {rounds} round(s), closed loop {conns} connections × {duration}, fixed rate {rate} req/s × {duration}, "
    f"{size}-byte bodies; {ncpu} cores, kernel {kernel}, {nginx_v}. Medians over rounds.",
    "",
    "| target | closed-loop rps | proxy CPU µs/req | p50 ms @ rate | p99 ms @ rate | p99.9 ms @ rate | RSS MiB | errors / non-2xx |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]
plain = [t for t in targets if t not in tls_meta]
for t in plain:
    m = rows[t]["median"]
    lines.append(
        f"| {t} | {fmt(m['rps'], 0)} | {fmt(m['cpu_us_per_req'])} | {fmt(m['p50_ms'], 3)} | {fmt(m['p99_ms'], 3)} | "
        f"{fmt(m['p99_9_ms'], 3)} | {fmt(m['rss_mib'])} | {int(m['errors'] or 0)} / {int(m['non_2xx'] or 0)} |"
    )
for label, r in [("edge-router / nginx", ratio), ("edge-router-cache / nginx-cache", cache_ratio)]:
    if r is None:
        continue
    lines.append(
        f"| **{label}** | {fmt(r['rps'], 2)}× | **{fmt(r['cpu_us_per_req'], 2)}×** | {fmt(r['p50_ms'], 2)}× | "
        f"{fmt(r['p99_ms'], 2)}× | {fmt(r['p99_9_ms'], 2)}× | {fmt(r['rss_mib'], 2)}× | |"
    )
spread = [f"{t} {fmt(rows[t]['median']['spread_cpu_pct'])} %" for t in plain if t != "direct" and rows[t]["median"]["spread_cpu_pct"] is not None]
if spread:
    lines.append("")
    lines.append("CPU µs/req spread across rounds (max−min)/median: " + ", ".join(spread))

tls = [t for t in targets if t in tls_meta]
if tls:
    rates = sorted({m["rate"] for m in tls_meta.values()})
    cores = os.environ.get("BENCH_TLS_CORES", "0")
    lines += [
        "",
        f"TLS rows: separate processes, 2 workers each, on core(s) {cores}; certificate ECDSA P-256; "
        "https = keep-alive over TLS; handshake = a new TLS connection per request (rps = handshakes/s, CPU per handshake + request); "
        "hop-tls = plain HTTP from clients, a new client connection every 100 requests, the proxy forwarding over TLS to peer B "
        "(nginx; B's CPU not counted). Fixed rate: " + ", ".join(
            f"{fmt(r, 0)} req/s ({', '.join(t for t in tls if tls_meta[t]['rate'] == r)})" for r in rates) + ". "
        + ("The handshake rows' client resumes sessions (edge-loadtest has no --no-tls-resume): their handshakes are "
           "mostly resumed ones (TLS 1.3 PSK with ECDHE, no certificate), not full ones. "
           if any(m["client_handshakes"] == "resumed" for m in tls_meta.values())
           else "The handshake rows' client never resumes (--no-tls-resume): every handshake is a full one. ") +
        "Client handshakes resumed: from nginx's log ($ssl_session_reused), not observable for edge-router (—). "
        "Upstream handshakes: new connections in peer B's log over the closed-loop phase (its health probes left out).",
        "",
        "| target | closed-loop rps | client TLS handshakes/s | client handshakes resumed | proxy CPU µs/req | upstream full handshakes/s | upstream resumed handshakes/s | p50 ms @ rate | p99 ms @ rate | RSS MiB | errors / non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tls:
        m, meta = rows[t]["median"], tls_meta[t]
        # Every request of a handshake row is a handshake; keep-alive and plain-HTTP clients make (almost) none.
        hs = m["rps"] / meta["conn_requests"] if meta["client"] == "https" and meta["conn_requests"] else None
        resumed = None if hs is None or m.get("client_resumed_pct") is None else f"{m['client_resumed_pct']:.0f} %"
        lines.append(
            f"| {t} | {fmt(m['rps'], 0)} | {fmt(hs, 0)} | {resumed or '—'} | {fmt(m['cpu_us_per_req'])} | "
            f"{fmt(m.get('upstream_full_per_s'))} | {fmt(m.get('upstream_resumed_per_s'))} | {fmt(m['p50_ms'], 3)} | "
            f"{fmt(m['p99_ms'], 3)} | {fmt(m['rss_mib'])} | {int(m['errors'] or 0)} / {int(m['non_2xx'] or 0)} |"
        )
    for kind, r in tls_ratios.items():
        if r is None:
            continue
        lines.append(
            f"| **edge-router-{kind} / nginx-{kind}** | {fmt(r['rps'], 2)}× | | | **{fmt(r['cpu_us_per_req'], 2)}×** | | | "
            f"{fmt(r['p50_ms'], 2)}× | {fmt(r['p99_ms'], 2)}× | {fmt(r['rss_mib'], 2)}× | |"
        )
    spread = [f"{t} {fmt(rows[t]['median']['spread_cpu_pct'])} %" for t in tls if rows[t]["median"]["spread_cpu_pct"] is not None]
    if spread:
        lines.append("")
        lines.append("CPU µs/req spread across rounds (max−min)/median: " + ", ".join(spread))
table = "\n".join(lines)
print(table)
with open(out + ".md", "w") as f:
    f.write(table + "\n")
with open(out + ".json", "w") as f:
    json.dump({"kind": kind, "rounds": rounds, "rate": float(rate), "size": int(size), "connections": int(conns),
               "duration": duration, "targets": rows, "ratio_edge_over_nginx": ratio,
               "ratio_cache_edge_over_nginx": cache_ratio, "tls_rows": tls_meta,
               "ratio_tls_edge_over_nginx": tls_ratios}, f, indent=2)
print(f"\nwritten: {out}.md, {out}.json")
