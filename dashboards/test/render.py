#!/usr/bin/env python3
"""Draws the Grafana dashboard as an SVG from a live Prometheus: every panel of
dashboards/grafana/otpgate.json, laid out by its gridPos, with its targets run through
/api/v1/query_range over one run. It is a picture of what the operator sees in Grafana, for the
README, not a replacement for Grafana (no Grafana is needed to draw it).

dashboards/test.sh calls it when RENDER=FILE.svg is set. Only the standard library.
"""

import argparse
import json
import math
import re
import urllib.parse
import urllib.request
from xml.sax.saxutils import escape

PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c"]
BACKGROUND, PANEL, BORDER, TEXT, DIM = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9e"
WIDTH, UNIT_H, PAD = 1680, 34, 4


def fill(expr, variables):
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def get(prometheus, path, params):
    url = f"{prometheus}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=20) as response:
        body = json.load(response)
    return body["data"] if body.get("status") == "success" else None


def legend(fmt, metric):
    if not fmt or fmt == "__auto":
        return ", ".join(f"{k}={v}" for k, v in metric.items() if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def fmt(value, unit):
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞"
    if unit == "s":
        if abs(value) < 1:
            return f"{value * 1000:.3g} ms"
        if abs(value) < 120:
            return f"{value:.3g} s"
        return f"{value / 60:.3g} min"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    suffix = {"reqps": " req/s", "ops": "/s"}.get(unit, "")
    for factor, letter in ((1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{letter}{suffix}"
    return f"{value:.3g}{suffix}"


class Svg:
    def __init__(self):
        self.parts = []

    def add(self, text):
        self.parts.append(text)

    def text(self, x, y, content, size=12, color=TEXT, anchor="start", weight="normal"):
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{color}" '
                 f'text-anchor="{anchor}" font-weight="{weight}">{escape(str(content))}</text>')

    def rect(self, x, y, w, h, color, stroke="none", opacity=1.0):
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" '
                 f'fill="{color}" stroke="{stroke}" fill-opacity="{opacity}"/>')


def series_of(prometheus, panel, variables, start, end, step):
    out = []
    for target in panel.get("targets", []):
        data = get(prometheus, "/api/v1/query_range",
                   {"query": fill(target["expr"], variables), "start": start, "end": end, "step": step})
        for result in (data or {}).get("result", []):
            points = [(float(t), float(v)) for t, v in result["values"]]
            out.append((legend(target.get("legendFormat"), result["metric"]), points))
    return out


def dashed_names(panel):
    """The series drawn dashed (limits and thresholds), and their fixed colours."""
    names = {}
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        properties = {p["id"]: p["value"] for p in override["properties"]}
        if "custom.lineStyle" in properties:
            color = properties.get("color", {}).get("fixedColor", "")
            names[override["matcher"]["options"]] = {"red": "#f2495c", "orange": "#ff9830"}.get(color)
    return names


def draw_timeseries(svg, panel, series, box, start, end):
    x0, y0, w, h = box
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    plot_x, plot_y = x0 + 58, y0 + 26
    n_legend_rows = min(3, math.ceil(len(series) / 3)) if series else 0
    plot_w, plot_h = w - 70, h - 60 - 14 * n_legend_rows
    finite = [v for _, pts in series for _, v in pts if math.isfinite(v)]
    top = max(finite) if finite else 1.0
    bottom = min(0.0, min(finite)) if finite else 0.0
    top = top * 1.1 if top > 0 else 1.0
    svg.add(f'<line x1="{plot_x}" y1="{plot_y + plot_h}" x2="{plot_x + plot_w}" y2="{plot_y + plot_h}" stroke="{BORDER}"/>')
    for frac in (0.5, 1.0):
        gy = plot_y + plot_h - frac * plot_h
        svg.add(f'<line x1="{plot_x}" y1="{gy:.1f}" x2="{plot_x + plot_w}" y2="{gy:.1f}" stroke="{BORDER}" stroke-dasharray="2,3"/>')
        svg.text(plot_x - 4, gy + 4, fmt(bottom + frac * (top - bottom), unit), 10, DIM, "end")
    svg.text(plot_x - 4, plot_y + plot_h + 4, fmt(bottom, unit), 10, DIM, "end")
    for frac in (0, 0.5, 1):
        svg.text(plot_x + frac * plot_w, plot_y + plot_h + 12, f"+{frac * (end - start):.0f}s", 9, DIM,
                 "middle" if 0 < frac < 1 else ("start" if frac == 0 else "end"))
    dashed = dashed_names(panel)
    for index, (name, points) in enumerate(series):
        color = dashed.get(name) or PALETTE[index % len(PALETTE)]
        segments, current = [], []
        for t, v in points:
            if not math.isfinite(v):
                if current:
                    segments.append(current)
                current = []
                continue
            px = plot_x + (t - start) / max(end - start, 1) * plot_w
            py = plot_y + plot_h - (v - bottom) / (top - bottom) * plot_h
            current.append(f"{px:.1f},{py:.1f}")
        if current:
            segments.append(current)
        style = ' stroke-dasharray="6,4"' if name in dashed else ""
        for segment in segments:
            if len(segment) == 1:
                segment = segment * 2
            svg.add(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{color}" stroke-width="1.4"{style}/>')
    shown = series[: 3 * n_legend_rows]
    for index, (name, _) in enumerate(shown):
        lx = x0 + 10 + (index % 3) * (w - 20) / 3
        ly = y0 + h - 8 - 14 * (n_legend_rows - 1 - index // 3)
        svg.rect(lx, ly - 8, 10, 3, dashed.get(name) or PALETTE[index % len(PALETTE)])
        max_chars = int((w - 20) / 3 / 6.0) - 3
        label = name if len(name) <= max_chars else name[: max_chars - 1] + "…"
        svg.text(lx + 14, ly - 3, label, 10, DIM)
    if len(series) > len(shown):
        svg.text(x0 + w - 8, y0 + 15, f"{len(series)} series", 10, DIM, "end")
    if not series:
        svg.text(x0 + w / 2, y0 + h / 2, "No data", 14, DIM, "middle")


def draw_state_timeline(svg, panel, series, box, start, end):
    x0, y0, w, h = box
    mapping = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    colors = {"green": "#73bf69", "yellow": "#f2cc0c", "red": "#f2495c"}
    plot_x, plot_w = x0 + 70, w - 80
    band = min(28, (h - 50) / max(len(series), 1))
    for row_index, (name, points) in enumerate(series):
        by = y0 + 28 + row_index * (band + 4)
        svg.text(plot_x - 6, by + band / 2 + 4, name, 11, TEXT, "end")
        for (t, v), (t_next, _) in zip(points, points[1:] + [(end, None)]):
            state = mapping.get(str(int(v))) if math.isfinite(v) else None
            if state:
                px = plot_x + (t - start) / max(end - start, 1) * plot_w
                pw = (t_next - t) / max(end - start, 1) * plot_w
                svg.rect(px, by, pw + 0.5, band, colors[state["color"]], opacity=0.8)
    for index, (value, state) in enumerate(sorted(mapping.items())):
        lx = x0 + 10 + index * 90
        svg.rect(lx, y0 + h - 16, 10, 10, colors[state["color"]])
        svg.text(lx + 14, y0 + h - 7, state["text"], 10, DIM)


def draw_stat(svg, panel, series, box):
    x0, y0, w, h = box
    defaults = panel["fieldConfig"]["defaults"]
    if not series:
        svg.text(x0 + w / 2, y0 + h / 2 + 10, "No data", 14, DIM, "middle")
        return
    name, points = series[0]
    finite = [v for _, v in points if not math.isnan(v)]
    value = finite[-1] if finite else float("nan")
    color = TEXT
    for step in defaults.get("thresholds", {}).get("steps", []):
        if step["value"] is None or (math.isfinite(value) and value >= step["value"]):
            color = {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c"}.get(step["color"], TEXT)
    text = name if panel["options"].get("textMode") == "name" else fmt(value, defaults.get("unit", "short"))
    svg.text(x0 + w / 2, y0 + h / 2 + 16, text, 26 if len(text) < 9 else 18, color, "middle", "bold")


def draw_bargauge(svg, panel, series, box):
    x0, y0, w, h = box
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    values = [(name, [v for _, v in pts if math.isfinite(v)][-1:] or [0.0]) for name, pts in series]
    top = max((v[0] for _, v in values), default=1.0) or 1.0
    bar_h = min(24, (h - 40) / max(len(values), 1) - 4)
    for index, (name, (value,)) in enumerate(values):
        by = y0 + 28 + index * (bar_h + 4)
        svg.text(x0 + 80, by + bar_h / 2 + 4, name, 11, TEXT, "end")
        svg.rect(x0 + 86, by, (w - 160) * value / top, bar_h, PALETTE[index % len(PALETTE)], opacity=0.85)
        svg.text(x0 + w - 8, by + bar_h / 2 + 4, fmt(value, unit), 11, TEXT, "end")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--dashboard", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--end", type=float, required=True)
    parser.add_argument("--step", type=float, default=1.0)
    parser.add_argument("--rate-interval", default="5s")
    parser.add_argument("--var", action="append", default=[])
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dashboard = json.load(open(args.dashboard))
    variables = {"instance": re.escape(args.instance).replace("\\", "\\\\"),
                 "__rate_interval": args.rate_interval, "__interval": f"{args.step:g}s",
                 "__range": f"{args.end - args.start:.0f}s"}
    variables.update(pair.split("=", 1) for pair in args.var)
    col = (WIDTH - 2 * PAD) / 24
    header = 44
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    height = header + bottom * UNIT_H + PAD * 2
    svg = Svg()
    svg.rect(0, 0, WIDTH, height, BACKGROUND)
    svg.text(PAD + 8, 28, f"{dashboard['title']} — {args.title}", 18, TEXT, weight="bold")
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        x, y = PAD + grid["x"] * col, header + grid["y"] * UNIT_H
        w, h = grid["w"] * col - PAD, grid["h"] * UNIT_H - PAD
        if panel["type"] == "row":
            svg.text(x + 4, y + UNIT_H - 12, panel["title"], 15, TEXT, weight="bold")
            continue
        svg.rect(x, y, w, h, PANEL, BORDER)
        svg.text(x + 8, y + 16, panel["title"], 12, TEXT, weight="bold")
        if panel["type"] == "bargauge":
            data = []
            for target in panel["targets"]:
                result = get(args.prometheus, "/api/v1/query",
                             {"query": fill(target["expr"], variables), "time": args.end})
                for r in (result or {}).get("result", []):
                    data.append((legend(target.get("legendFormat"), r["metric"]), [(args.end, float(r["value"][1]))]))
            draw_bargauge(svg, panel, data, (x, y, w, h))
            continue
        series = series_of(args.prometheus, panel, variables, args.start, args.end, args.step)
        if panel["type"] == "stat":
            draw_stat(svg, panel, series, (x, y, w, h))
        elif panel["type"] == "state-timeline":
            draw_state_timeline(svg, panel, series, (x, y, w, h), args.start, args.end)
        else:
            draw_timeseries(svg, panel, series, (x, y, w, h), args.start, args.end)
    with open(args.out, "w") as out:
        out.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}" '
                  f'viewBox="0 0 {WIDTH} {height:.0f}" font-family="Inter, Helvetica, Arial, sans-serif">\n')
        out.write("\n".join(svg.parts))
        out.write("\n</svg>\n")


if __name__ == "__main__":
    main()
