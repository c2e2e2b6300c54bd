#!/usr/bin/env python3
"""Checks the Grafana dashboard and the Prometheus rules against a live Prometheus that scrapes
a live gateway (dashboards/test.sh starts both and drives load through them first).

1. The dashboard's instance variable query (label_values(otpgate_build_info, instance)) lists
   the gateway.
2. Every panel target, with the dashboard's variables filled in as Grafana would fill them, is
   run through Prometheus's /api/v1/query at one moment of the run and must return data (a
   non-empty result). Values that are NaN there (a quantile of a histogram with no sample in
   the window) are reported, and fail the check too: the run is meant to exercise every panel.
3. Every recording and alert rule Prometheus loaded is healthy, and every metric name a rule
   or a panel reads is in the gateway's /metrics scrape (`up` and `ALERTS` are Prometheus's
   own, and names with a colon must be recording rules).

Only the standard library, so that CI needs nothing but python3. Prints one line per check
and closes with "N passed, N failed"; exits 1 when anything failed.
"""

import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan", "atan2",
}
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds",
                  "scrape_samples_scraped"}


class Checker:
    def __init__(self):
        self.n_passed = 0
        self.n_failed = 0

    def result(self, ok, what, detail=""):
        if ok:
            self.n_passed += 1
        else:
            self.n_failed += 1
        print(f"  {'ok  ' if ok else 'FAIL'} {what}{'  ' + detail if detail else ''}")


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def prom_query(prometheus, expr, at):
    query = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    try:
        body = get_json(f"{prometheus}/api/v1/query?{query}")
    except urllib.error.HTTPError as error:
        body = json.load(error)
    if body.get("status") != "success":
        return None, body.get("error", "query failed")
    return body["data"], None


def values_of(data):
    """The numbers in a query result: one per series (instant vector) or the scalar."""
    if data["resultType"] == "vector":
        return [float(sample["value"][1]) for sample in data["result"]]
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    if data["resultType"] == "matrix":
        return [float(v[1]) for series in data["result"] for v in series["values"]]
    return []


def fill_variables(expr, variables):
    # Longest names first, so that $__rate_interval is not read as $__rate.
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def metric_names(expr):
    """Metric names an expression reads: identifiers that are not functions, keywords, label
    names in by/on/without lists, or text inside strings, label matchers and ranges."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def scraped_names(metrics_url):
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def describe(values):
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return f"{len(values)} series, all NaN"
    peak = max(finite, key=abs)
    return f"{len(values)} series, {len(finite)} with a value, max {peak:.4g}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prometheus", required=True, help="e.g. http://127.0.0.1:9090")
    parser.add_argument("--metrics", required=True, help="the gateway's /metrics URL")
    parser.add_argument("--dashboard", required=True)
    parser.add_argument("--instance", required=True, help="the gateway's instance label")
    parser.add_argument("--time", type=float, required=True, help="unix seconds to query at")
    parser.add_argument("--range-secs", type=int, required=True, help="what $__range stands for")
    parser.add_argument("--rate-interval", default="10s", help="what $__rate_interval stands for")
    parser.add_argument("--var", action="append", default=[], help="NAME=VALUE, a dashboard variable")
    args = parser.parse_args()

    checker = Checker()
    dashboard = json.load(open(args.dashboard))
    scrape = scraped_names(args.metrics)
    rules_body = get_json(f"{args.prometheus}/api/v1/rules")
    rules = [rule for group in rules_body["data"]["groups"] for rule in group["rules"]]
    recorded = {rule["name"] for rule in rules if rule["type"] == "recording"}

    variables = {
        # As Grafana writes a regex variable into a PromQL string: regex-escaped, then
        # string-escaped (127\\.0\\.0\\.1:9464).
        "instance": re.escape(args.instance).replace("\\", "\\\\"),
        "__rate_interval": args.rate_interval,
        "__interval": "5s",
        "__range": f"{args.range_secs}s",
        "__range_s": str(args.range_secs),
    }
    for pair in args.var:
        name, value = pair.split("=", 1)
        variables[name] = value
    declared = {v["name"] for v in dashboard["templating"]["list"]}
    for name in ("datasource", "instance"):
        checker.result(name in declared, f"dashboard declares the ${name} variable")

    print("== the instance variable")
    listed = get_json(f"{args.prometheus}/api/v1/label/instance/values?"
                      + urllib.parse.urlencode({"match[]": "otpgate_build_info"}))["data"]
    checker.result(args.instance in listed,
                   "label_values(otpgate_build_info, instance) lists the gateway",
                   ", ".join(listed))

    def check_names(what, expr):
        for name in sorted(metric_names(expr)):
            if ":" in name:
                ok, where = name in recorded, "a loaded recording rule"
            elif name in PROMETHEUS_OWN:
                data, _ = prom_query(args.prometheus, name, args.time)
                ok, where = bool(data and data["result"]), "Prometheus's own series"
            else:
                ok, where = name in scrape, "the gateway's /metrics"
            if not ok:
                checker.result(False, f"{what}: {name} is not in {where}")
            else:
                names_checked.add(name)

    names_checked = set()
    print(f"== panels: every target at {args.time:.0f} "
          f"($__rate_interval={args.rate_interval}, $__range={args.range_secs}s)")
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            print(f"-- {panel['title']}")
            continue
        for target in panel.get("targets", []):
            expr = fill_variables(target["expr"], variables)
            legend_format = target.get("legendFormat", "").replace("__auto", "")
            what = f"{panel['title']} [{target['refId']}] {legend_format}".rstrip()
            left = re.findall(r"\$\{?\w+", expr)
            if left:
                checker.result(False, what, f"unfilled variables {left}: {expr}")
                continue
            data, error = prom_query(args.prometheus, expr, args.time)
            if data is None:
                checker.result(False, what, f"error {error}: {expr}")
                continue
            values = values_of(data)
            ok = bool(values) and any(not math.isnan(v) for v in values)
            checker.result(ok, what, describe(values) if values else f"no data: {expr}")
            check_names(f"panel {panel['title']}", expr)

    print("== dashboard annotations (may be empty; must be valid)")
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            data, error = prom_query(args.prometheus, fill_variables(annotation["expr"], variables), args.time)
            checker.result(data is not None, f"annotation {annotation['name']}",
                           error or f"{len(data['result'])} series now")

    n_recording = sum(1 for rule in rules if rule["type"] == "recording")
    print(f"== rules: {n_recording} recording, {len(rules) - n_recording} alerting, as Prometheus loaded them")
    for rule in rules:
        label = f"{rule['type']} {rule['name']}"
        healthy = rule.get("health") == "ok" and not rule.get("lastError")
        state = f"state {rule['state']}" if rule["type"] == "alerting" else ""
        checker.result(healthy, label, rule.get("lastError") or state)
        check_names(label, rule["query"])
        if rule["type"] == "recording":
            labels = ", ".join(f'{name}="{value}"' for name, value in sorted(rule.get("labels", {}).items()))
            selector = rule["name"] + ("{" + labels + "}" if labels else "")
            data, _ = prom_query(args.prometheus, selector, args.time)
            values = values_of(data) if data else []
            checker.result(any(not math.isnan(v) for v in values), f"{selector} has data",
                           describe(values) if values else "no data")

    print(f"== metric names read by rules and panels, found where they must be: {len(names_checked)}")
    print("   " + " ".join(sorted(names_checked)))
    def base(name):
        return re.sub(r"_(bucket|sum|count)$", "", name)

    read = {base(name) for name in names_checked}
    unused = sorted({base(n) for n in scrape if n.startswith("otpgate_")} - read)
    if unused:
        print("   exported but read by no panel or rule: " + " ".join(unused))
    print(f"dashboards: {checker.n_passed} passed, {checker.n_failed} failed")
    return 1 if checker.n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
