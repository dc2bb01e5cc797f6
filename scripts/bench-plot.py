#!/usr/bin/env python3
"""Plots rate and p99 against commands in flight (W) for the worker and the echo
ceiling, from the JSON lines `profile-worker bench --json` appends. Standard
library only: writes an SVG by hand, so it runs wherever python3 does.

    python3 scripts/bench-plot.py bench/sweep.jsonl bench/sweep.svg
"""
import json
import math
import sys

import svg


def load(path):
    points = {"worker": {}, "ceiling": {}}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            w = r["in_flight"]
            for target in ("worker", "ceiling"):
                s = r.get(target)
                if s:
                    points[target][w] = (s["rate"], s["p99_ms"])
    return points


def panel(x0, y0, width, height, title, ylabel, series, log_y):
    ws = sorted({w for pts in series.values() for w in pts})
    ys = [v for pts in series.values() for v in pts.values() if v > 0]
    if not ws or not ys:
        return []
    lx = lambda w: math.log10(w)
    xmin, xmax = lx(ws[0]), lx(ws[-1])
    if log_y:
        ymin, ymax = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        fy = lambda v: (math.log10(v) - ymin) / max(ymax - ymin, 1e-9)
        ticks = [10 ** e for e in range(ymin, ymax + 1)]
    else:
        ymin, top = 0.0, max(ys) * 1.1
        step = 10 ** math.floor(math.log10(top / 2))
        ymax = math.ceil(top / step) * step
        fy = lambda v: (v - ymin) / (ymax - ymin)
        ticks = [ymin + i * step for i in range(int((ymax - ymin) / step) + 1)]
    px = lambda w: x0 + (lx(w) - xmin) / max(xmax - xmin, 1e-9) * width
    py = lambda v: y0 + height - fy(v) * height
    out = [
        f'<text x="{x0 + width / 2}" y="{y0 - 12}" text-anchor="middle" font-weight="bold">{title}</text>',
        f'<rect x="{x0}" y="{y0}" width="{width}" height="{height}" fill="none" stroke="#999"/>',
        f'<text x="{x0 - 48}" y="{y0 + height / 2}" transform="rotate(-90 {x0 - 48} {y0 + height / 2})" text-anchor="middle">{ylabel}</text>',
        f'<text x="{x0 + width / 2}" y="{y0 + height + 36}" text-anchor="middle">commands in flight (W, log scale)</text>',
    ]
    for t in ticks:
        y = py(t)
        label = f"{t:g}"
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
    for w in ws:
        x = px(w)
        out.append(f'<text x="{x:.1f}" y="{y0 + height + 16}" text-anchor="middle" font-size="11">{w}</text>')
    colours = {"worker": "#c0392b", "ceiling": "#2c3e50"}
    for name, pts in series.items():
        coords = [(px(w), py(v)) for w, v in sorted(pts.items()) if v > 0]
        out += svg.series(coords, colours[name])
    return out


def main():
    src, dst = sys.argv[1], sys.argv[2]
    pts = load(src)
    rate = {t: {w: v[0] for w, v in p.items()} for t, p in pts.items()}
    p99 = {t: {w: v[1] for w, v in p.items()} for t, p in pts.items()}
    width, height = 900, 380
    body = ['<rect width="100%" height="100%" fill="white"/>']
    body += panel(80, 40, 320, 260, "rate (commands/s)", "commands/s", rate, False)
    body += panel(540, 40, 320, 260, "p99 round trip (ms)", "ms (log scale)", p99, True)
    body.append('<line x1="300" y1="355" x2="330" y2="355" stroke="#c0392b" stroke-width="2"/>')
    body.append('<text x="336" y="359">worker</text>')
    body.append('<line x1="420" y1="355" x2="450" y2="355" stroke="#2c3e50" stroke-width="2"/>')
    body.append('<text x="456" y="359">echo ceiling (no database)</text>')
    svg.write(dst, width, height, body)


if __name__ == "__main__":
    main()
