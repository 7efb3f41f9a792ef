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

lines = [
    f"Run: {kind}, {rounds} round(s), closed loop {conns} connections × {duration}, fixed rate {rate} req/s × {duration}, "
    f"{size}-byte bodies; {ncpu} cores, kernel {kernel}, {nginx_v}. Medians over rounds.",
    "",
    "| target | closed-loop rps | proxy CPU µs/req | p50 ms @ rate | p99 ms @ rate | p99.9 ms @ rate | RSS MiB | errors / non-2xx |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]
for t in targets:
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
spread = [f"{t} {fmt(rows[t]['median']['spread_cpu_pct'])} %" for t in targets if t != "direct" and rows[t]["median"]["spread_cpu_pct"] is not None]
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
               "ratio_cache_edge_over_nginx": cache_ratio}, f, indent=2)
print(f"\nwritten: {out}.md, {out}.json")
