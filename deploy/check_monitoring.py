#!/usr/bin/env python3
"""Static checks of the shipped monitoring, beyond what promtool does for
the rules themselves:

    deploy/check_monitoring.py [--scrape metrics.txt]

1. Every PromQL expression of the metrics dashboard parses: they are
   written into a scratch rule file (Grafana's $__rate_interval and
   $instance replaced) and given to `promtool check rules`.
2. Every metric the rules and the dashboard use is one the server exports
   (the list of issue 13), so a typo cannot hide in a panel that is simply
   empty.
3. With --scrape (a /metrics page of the real server): every metric the
   rules and dashboard use appears in it (as a sample or a # TYPE line).
   Families that only appear once something happened (a rejection, a TLS
   handshake) may be missing from an idle server: these are reported, and
   fail the check only with --strict.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml  # noqa: F401  (PyYAML: installed with kubernetes-validate)

DEPLOY = pathlib.Path(__file__).resolve().parent
RULES = DEPLOY / "prometheus" / "rules" / "ingest.rules.yml"
METRICS_DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ingest-metrics.json"

# The server's metric families (issue 13, "Metrics"), plus Prometheus' own `up`.
KNOWN = {
    "up",
    "grpc_server_started_total", "grpc_server_handled_total", "grpc_server_msg_received_total",
    "grpc_server_msg_sent_total", "grpc_server_handling_seconds",
    "ingest_readings_total", "ingest_batches_total", "ingest_group_commit_seconds",
    "ingest_group_commit_readings", "ingest_batch_ack_seconds", "ingest_writer_queue_batches",
    "ingest_writer_queue_capacity", "ingest_upload_throttled_seconds_total",
    "ingest_buffered_readings", "ingest_buffered_readings_limit", "ingest_upload_budget_wait_seconds_total",
    "ingest_streams", "devices_online", "alerts_open", "alert_events_total", "alert_watchers_lagged_total",
    "commands_total", "commands_pending",
    "auth_failures_total", "ingest_mqtt_refusals_total", "tls_handshake_failures_total", "tls_certificate_expiry_timestamp_seconds",
    "db_pool_acquire_seconds", "retention_deleted_total", "partitions_created_total",
    "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_start_time_seconds",
}
HISTOGRAMS = {"grpc_server_handling_seconds", "ingest_group_commit_seconds", "ingest_group_commit_readings",
              "ingest_batch_ack_seconds", "db_pool_acquire_seconds"}
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")


def family(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def rule_exprs():
    doc = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs():
    board = json.loads(METRICS_DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def check_dashboard_promql(exprs):
    rules = []
    for i, (title, expr) in enumerate(exprs):
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        if "$" in concrete:
            raise SystemExit(f"uninterpolated variable in '{title}': {expr}")
        rules.append({"record": f"dashboard:panel_{i}", "expr": concrete})
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        done = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout, done.stderr)
            raise SystemExit("a dashboard expression does not parse")
    print(f"  {len(exprs)} dashboard expressions parse (promtool check rules)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrape")
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()

    exprs = rule_exprs() + dashboard_exprs()
    check_dashboard_promql(dashboard_exprs())

    used = {}
    for where, expr in exprs:
        for name in SELECTOR.findall(expr):
            used.setdefault(family(name), set()).add(where)
    unknown = {n: w for n, w in used.items() if n not in KNOWN}
    if unknown:
        for name, where in sorted(unknown.items()):
            print(f"  unknown metric {name} in: {', '.join(sorted(where))}")
        raise SystemExit("rules or dashboard use metrics the server does not export")
    print(f"  {len(used)} metric families used by the rules and dashboard, all exported by the server")

    if args.scrape:
        text = pathlib.Path(args.scrape).read_text()
        present = set()
        for line in text.splitlines():
            if line.startswith("# TYPE ") or line.startswith("# HELP "):
                present.add(family(line.split()[2]))
            elif line and not line.startswith("#"):
                present.add(family(re.split(r"[{ ]", line, 1)[0]))
        # OpenMetrics counters are typed without their _total suffix.
        present |= {p + "_total" for p in present}
        missing = sorted(n for n in used if n != "up" and n not in present)
        if missing:
            print(f"  not in the scrape: {', '.join(missing)}")
            if args.strict:
                raise SystemExit("metrics used by the rules or dashboard are missing from the scrape")
        else:
            print("  every metric used appears in the scrape")


if __name__ == "__main__":
    main()
