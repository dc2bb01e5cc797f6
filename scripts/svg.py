"""What the benchmark plots share: writing an SVG document (standard library only)."""


def write(dst, width, height, body):
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="13">\n' + "\n".join(body) + "\n</svg>\n"
    )
    with open(dst, "w") as f:
        f.write(svg)
    print(f"wrote {dst}")


def series(coords, colour):
    """One line of a plot: the polyline through `coords` and a dot at each point."""
    if not coords:
        return []
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    out = [f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>']
    out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in coords]
    return out
