#!/usr/bin/env python3
"""Plots p50 and p99 against offered load (% of the worker's closed-loop rate)
for the worker, the echo ceiling and the events ceiling, from the JSON lines
`profile-worker-bench --load-percent … --json FILE` appends (medians of each
target's rounds at each load, then of the runs). Standard library only.

    python3 scripts/bench-latency-plot.py bench/latency.jsonl bench/latency.svg
"""
import json
import math
import statistics
import sys

import svg

TARGETS = {
    "worker": ("#c0392b", "worker"),
    "ceiling": ("#2c3e50", "echo ceiling (no database)"),
    "ceiling-events": ("#27ae60", "echo ceiling with the contract's events"),
}


def load(path):
    """{target: {load%: (p50, p99)}}, medians over rounds and runs."""
    acc = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            run = json.loads(line)
            per = {}
            for r in run["rounds"]:
                pct = r.get("load_percent")
                if pct is None:
                    continue
                per.setdefault((r["target"], pct), []).append((r["p50_ms"], r["p99_ms"]))
            for key, vals in per.items():
                p50 = statistics.median(v[0] for v in vals)
                p99 = statistics.median(v[1] for v in vals)
                acc.setdefault(key, []).append((p50, p99))
    out = {}
    for (target, pct), vals in acc.items():
        out.setdefault(target, {})[pct] = (
            statistics.median(v[0] for v in vals),
            statistics.median(v[1] for v in vals),
        )
    return out


def panel(x0, y0, width, height, title, series):
    loads = sorted({p for pts in series.values() for p in pts})
    ys = [v for pts in series.values() for v in pts.values() if v > 0]
    if not loads or not ys:
        return []
    ymin = math.floor(math.log10(min(ys)))
    ymax = math.ceil(math.log10(max(ys)))
    fy = lambda v: (math.log10(v) - ymin) / max(ymax - ymin, 1e-9)
    px = lambda p: x0 + p / 100.0 * width
    py = lambda v: y0 + height - fy(v) * height
    out = [
        f'<text x="{x0 + width / 2}" y="{y0 - 12}" text-anchor="middle" font-weight="bold">{title}</text>',
        f'<rect x="{x0}" y="{y0}" width="{width}" height="{height}" fill="none" stroke="#999"/>',
        f'<text x="{x0 - 48}" y="{y0 + height / 2}" transform="rotate(-90 {x0 - 48} {y0 + height / 2})" text-anchor="middle">ms (log scale)</text>',
        f'<text x="{x0 + width / 2}" y="{y0 + height + 36}" text-anchor="middle">offered load (% of the worker\'s closed-loop rate)</text>',
    ]
    for e in range(ymin, ymax + 1):
        for m in (1, 2, 5):
            t = m * 10 ** e
            if t < 10 ** ymin or t > 10 ** ymax:
                continue
            y = py(t)
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>')
    for p in [0] + loads + [100]:
        out.append(f'<text x="{px(p):.1f}" y="{y0 + height + 16}" text-anchor="middle" font-size="11">{p:g}</text>')
    for name, pts in series.items():
        coords = [(px(p), py(v)) for p, v in sorted(pts.items()) if v > 0]
        out += svg.series(coords, TARGETS[name][0])
    return out


def main():
    src, dst = sys.argv[1], sys.argv[2]
    pts = load(src)
    p50 = {t: {p: v[0] for p, v in d.items()} for t, d in pts.items() if t in TARGETS}
    p99 = {t: {p: v[1] for p, v in d.items()} for t, d in pts.items() if t in TARGETS}
    width, height = 900, 400
    body = ['<rect width="100%" height="100%" fill="white"/>']
    body += panel(80, 40, 320, 260, "p50 round trip", p50)
    body += panel(540, 40, 320, 260, "p99 round trip", p99)
    x = 120
    for name in TARGETS:
        if name not in p50:
            continue
        colour, label = TARGETS[name]
        body.append(f'<line x1="{x}" y1="375" x2="{x + 30}" y2="375" stroke="{colour}" stroke-width="2"/>')
        body.append(f'<text x="{x + 36}" y="379">{label}</text>')
        x += 60 + 7 * len(label)
    svg.write(dst, width, height, body)


if __name__ == "__main__":
    main()
