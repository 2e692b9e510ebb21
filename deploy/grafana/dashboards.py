#!/usr/bin/env python3
"""Writes the two shipped Grafana dashboards (the JSON is generated, not
hand-edited: change this file, run it, commit both).

    python3 deploy/grafana/dashboards.py          # rewrite the JSON files
    python3 deploy/grafana/dashboards.py --check  # fail if they differ (CI)

- dashboards/ingest-metrics.json: the server's Prometheus metrics.
- dashboards/ingest-sql-reports.json: the SQL reporting views
  (docs/schema.md), one dashboard for both of Grafana's data sources:
  PostgreSQL (core `grafana-postgresql-datasource`) and SQLite (plugin
  `frser-sqlite-datasource`). The `ds` variable picks the data source by
  uid; each query is written once in SQL both engines run unchanged, and
  each target carries it in both plugins' fields (`rawSql`/`format` for
  PostgreSQL, `queryText`/`rawQueryText`/`queryType`/`timeColumns` for
  SQLite). Time ranges use Grafana's global `$__from`/`$__to`
  (milliseconds), which both plugins interpolate, rather than either
  plugin's own macros.
"""

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "dashboards"

PROM_DS = {"type": "prometheus", "uid": "${prometheus}"}
SQL_DS = {"uid": "${ds}"}


class Layout:
    """Places panels left to right in rows of 24 columns."""

    def __init__(self):
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, w, h):
        if self.x + w > 24:
            self.x = 0
            self.y += self.row_h
            self.row_h = 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title):
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0
        panel = {
            "type": "row",
            "title": title,
            "collapsed": False,
            "id": self.take_id(),
            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
            "panels": [],
        }
        self.y += 1
        return panel

    def take_id(self):
        self.next_id += 1
        return self.next_id - 1


# --- the metrics dashboard ---------------------------------------------------

SEL = 'job="ingest", instance=~"$instance"'


def prom_target(expr, legend, ref):
    return {"datasource": PROM_DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def timeseries(layout, title, targets, unit="short", w=12, h=8, description="", stack=False, overrides=None):
    refs = "ABCDEFGHIJ"
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "id": layout.take_id(),
        "gridPos": layout.place(w, h),
        "datasource": PROM_DS,
        "targets": [prom_target(e, l, refs[i]) for i, (e, l) in enumerate(targets)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                           "stacking": {"mode": "normal" if stack else "none"}},
            },
            "overrides": overrides or [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
    }


def stat(layout, title, expr, unit="short", w=4, h=4, description="", thresholds=None):
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "id": layout.take_id(),
        "gridPos": layout.place(w, h),
        "datasource": PROM_DS,
        "targets": [prom_target(expr, "", "A")],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": thresholds or [{"color": "green", "value": None}]},
            },
            "overrides": [],
        },
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
    }


def quantiles(metric, by=""):
    group = f"le{', ' + by if by else ''}"
    out = []
    for q in ("0.5", "0.9", "0.99"):
        legend = f"p{int(float(q) * 100)}" + (f" {{{{{by}}}}}" if by else "")
        out.append((f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))", legend))
    return out


def metrics_dashboard():
    L = Layout()
    p = []
    p.append(L.row("Overview"))
    p.append(stat(L, "Targets up", f'sum(up{{{SEL}}})', description="Ingesters answering the scrape.",
                  thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]))
    p.append(stat(L, "Readings committed /s", f'sum(rate(ingest_readings_total{{{SEL}, outcome="committed"}}[$__rate_interval]))', unit="ops"))
    p.append(stat(L, "Rejected share (10m)",
                  f'sum(rate(ingest_readings_total{{{SEL}, outcome="rejected"}}[10m])) / sum(rate(ingest_readings_total{{{SEL}}}[10m]))',
                  unit="percentunit", thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 0.05}]))
    p.append(stat(L, "Devices online", f'sum(devices_online{{{SEL}}})'))
    p.append(stat(L, "Open alerts", f'sum(alerts_open{{{SEL}}})',
                  thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1}]))
    p.append(stat(L, "Commands pending", f'sum(commands_pending{{{SEL}}})'))

    p.append(L.row("Ingest"))
    p.append(timeseries(L, "Readings /s by outcome", [
        (f'sum by (outcome) (rate(ingest_readings_total{{{SEL}}}[$__rate_interval]))', "{{outcome}}")],
        unit="ops", stack=True,
        description="committed + duplicate + rejected = readings received."))
    p.append(timeseries(L, "Rejected readings /s by reason", [
        (f'sum by (reason) (rate(ingest_readings_total{{{SEL}, outcome="rejected"}}[$__rate_interval]))', "{{reason}}")],
        unit="ops"))
    p.append(timeseries(L, "Batches /s by outcome", [
        (f'sum by (outcome) (rate(ingest_batches_total{{{SEL}}}[$__rate_interval]))', "{{outcome}}")], unit="ops"))
    p.append(timeseries(L, "Batch acknowledgement latency (received to answered)",
                        quantiles("ingest_batch_ack_seconds"), unit="s"))
    p.append(timeseries(L, "Group commit duration", quantiles("ingest_group_commit_seconds"), unit="s",
                        description="Alert IngestGroupCommitSlow: p99 over 1 s for 5 minutes."))
    p.append(timeseries(L, "Readings per group commit", [
        (f'sum(rate(ingest_group_commit_readings_sum{{{SEL}}}[$__rate_interval])) / sum(rate(ingest_group_commit_readings_count{{{SEL}}}[$__rate_interval]))', "mean"),
        (f'histogram_quantile(0.99, sum by (le) (rate(ingest_group_commit_readings_bucket{{{SEL}}}[$__rate_interval])))', "p99"),
        (f'sum(rate(ingest_group_commit_seconds_count{{{SEL}}}[$__rate_interval]))', "commits /s")]))
    p.append(timeseries(L, "Writer queue: depth vs capacity", [
        (f'sum by (instance) (ingest_writer_queue_batches{{{SEL}}})', "queued {{instance}}"),
        (f'sum by (instance) (ingest_writer_queue_capacity{{{SEL}}})', "capacity {{instance}}")],
        description="Alert IngestWriterQueueNearlyFull: over 80% for 5 minutes.",
        overrides=[{"matcher": {"id": "byRegexp", "options": "capacity.*"},
                    "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                                   {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}]))
    p.append(timeseries(L, "Buffered readings vs budget", [
        (f'sum by (instance) (ingest_buffered_readings{{{SEL}}})', "buffered {{instance}}"),
        (f'sum by (instance) (ingest_buffered_readings_limit{{{SEL}}})', "budget {{instance}}")],
        description="Decoded readings not yet committed, against --max-buffered-readings. "
                    "Alert IngestReadingsBufferFull: over 90% for 5 minutes.",
        overrides=[{"matcher": {"id": "byRegexp", "options": "budget.*"},
                    "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                                   {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}]))
    p.append(timeseries(L, "Upload streams held back (throttled seconds /s)", [
        (f'sum(rate(ingest_upload_throttled_seconds_total{{{SEL}}}[$__rate_interval]))', "throttled")],
        unit="s", description="Streams held back by the per-device reading rate limit (flow control, nothing refused)."))

    p.append(L.row("Sessions, alerts and commands"))
    p.append(timeseries(L, "Open streams by kind", [
        (f'sum by (kind) (ingest_streams{{{SEL}}})', "{{kind}}"),
        (f'sum(devices_online{{{SEL}}})', "devices online")], w=8))
    p.append(timeseries(L, "Open alerts by severity", [
        (f'sum by (severity) (alerts_open{{{SEL}}})', "{{severity}}")], w=8, stack=True))
    p.append(timeseries(L, "Alert events /s by kind", [
        (f'sum by (kind) (rate(alert_events_total{{{SEL}}}[$__rate_interval]))', "{{kind}}"),
        (f'sum(rate(alert_watchers_lagged_total{{{SEL}}}[$__rate_interval]))', "watchers lagged")], unit="ops", w=8))
    p.append(timeseries(L, "Commands /s by outcome", [
        (f'sum by (outcome) (rate(commands_total{{{SEL}}}[$__rate_interval]))', "{{outcome}}")], unit="ops"))
    p.append(timeseries(L, "Commands pending", [
        (f'sum(commands_pending{{{SEL}}})', "pending")]))

    p.append(L.row("gRPC"))
    p.append(timeseries(L, "Calls /s by method and code", [
        (f'sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total{{{SEL}}}[$__rate_interval]))', "{{grpc_method}} {{grpc_code}}")],
        unit="ops"))
    p.append(timeseries(L, "Unary call duration p99 by method", [
        (f'histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{{{SEL}, grpc_type="unary"}}[$__rate_interval])))', "{{grpc_method}}")],
        unit="s", description="Streams are observed when they end, so their durations are the streams' lifetimes."))

    p.append(L.row("Security"))
    p.append(timeseries(L, "Authentication failures /s by reason", [
        (f'sum by (reason) (rate(auth_failures_total{{{SEL}}}[$__rate_interval]))', "{{reason}}"),
        (f'sum(rate(tls_handshake_failures_total{{{SEL}}}[$__rate_interval]))', "TLS handshake failures")], unit="ops"))
    p.append(timeseries(L, "Days until certificate expiry", [
        (f'(tls_certificate_expiry_timestamp_seconds{{{SEL}}} - time()) / 86400', "{{instance}} {{cert}}")],
        unit="d", description="Alert IngestCertificateExpiringSoon: under 14 days."))

    p.append(L.row("Storage and process"))
    p.append(timeseries(L, "Database pool acquire", quantiles("db_pool_acquire_seconds"), unit="s", w=8))
    p.append(timeseries(L, "Retention and partitions", [
        (f'sum(rate(retention_deleted_total{{{SEL}}}[$__rate_interval]))', "rows deleted /s"),
        (f'sum(increase(partitions_created_total{{{SEL}}}[$__rate_interval]))', "partitions created")], w=8))
    p.append(timeseries(L, "Resident memory", [
        (f'process_resident_memory_bytes{{{SEL}}}', "{{instance}}")], unit="bytes", w=8))
    p.append(timeseries(L, "CPU", [
        (f'rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval])', "{{instance}}")], unit="percentunit", w=8))
    p.append(timeseries(L, "Open file descriptors", [
        (f'process_open_fds{{{SEL}}}', "{{instance}}")], w=8))
    p.append(timeseries(L, "Uptime", [
        (f'time() - process_start_time_seconds{{{SEL}}}', "{{instance}}")], unit="s", w=8))

    return {
        "uid": "telemetry-ingest-metrics",
        "title": "telemetry-ingest: server",
        "description": "Throughput, latency, queue, sessions, alerts and commands of telemetry-ingest, from its /metrics (scrape job `ingest`).",
        "tags": ["telemetry-ingest"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "utc",
        "graphTooltip": 1,
        "annotations": {"list": []},
        "links": [{"title": "SQL reports", "type": "link", "url": "/d/telemetry-ingest-sql", "targetBlank": False}],
        "templating": {"list": [
            {"name": "prometheus", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0},
            {"name": "instance", "label": "instance", "type": "query", "datasource": PROM_DS,
             "query": {"query": 'label_values(up{job="ingest"}, instance)', "refId": "instance"},
             "definition": 'label_values(up{job="ingest"}, instance)',
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
             "current": {"text": ["All"], "value": ["$__all"]}, "hide": 0},
        ]},
        "panels": p,
    }


# --- the SQL reports dashboard -----------------------------------------------

# Both engines: `$__from`/`$__to` are milliseconds since the epoch; the views'
# times are nanoseconds. A time column in seconds is read as a Unix time by
# both plugins. `${device:sqlstring}` is the textbox quoted and escaped.
def in_range(column):
    return f"{column} >= $__from * 1000000 AND {column} < $__to * 1000000"


DEVICE = "(${device:sqlstring} = '' OR device_id = ${device:sqlstring})"
SENSOR = "(${sensor:sqlstring} = '' OR sensor = ${sensor:sqlstring})"

SQL_PANELS = [
    # (title, kind, width, height, sql, description, unit)
    ("Readings stored per hour, by sensor", "timeseries", 12, 8, f"""
SELECT hour_unix_nano / 1000000000 AS time, sensor AS metric, SUM(reading_count) AS readings
FROM readings_hourly
WHERE {in_range('hour_unix_nano')} AND {DEVICE} AND {SENSOR}
GROUP BY hour_unix_nano, sensor
ORDER BY hour_unix_nano, sensor""", "From the hourly rollup (readings_hourly).", "short"),
    ("Hourly average, by device (sensor and devices from the filters)", "timeseries", 12, 8, f"""
SELECT hour_unix_nano / 1000000000 AS time, device_id || ' ' || sensor AS metric, avg_value AS value
FROM readings_hourly
WHERE {in_range('hour_unix_nano')} AND {DEVICE} AND {SENSOR}
ORDER BY hour_unix_nano, device_id, sensor
LIMIT 20000""", "readings_hourly.avg_value; narrow it with the device and sensor filters on a large fleet.", "short"),
    ("Fleet status", "stat", 24, 4, """
SELECT COUNT(*) AS devices,
       SUM(online) AS online,
       SUM(CASE WHEN last_upload_unix_nano IS NULL OR seconds_since_last_upload > 60 THEN 1 ELSE 0 END) AS silent_over_60s,
       SUM(open_alerts) AS open_alerts,
       SUM(readings_24h) AS readings_24h
FROM device_status""", "device_status: registered, holding a Control stream, no upload for a minute (or never), open alerts, readings in the last 24 hours.", "short"),
    ("Devices gone silent (no upload for a minute, or never)", "table", 12, 8, """
SELECT device_id, display_name, online, last_upload_utc, seconds_since_last_upload, last_seen_utc, firmware_version
FROM device_status
WHERE last_upload_unix_nano IS NULL OR seconds_since_last_upload > 60
ORDER BY CASE WHEN last_upload_unix_nano IS NULL THEN 0 ELSE 1 END, seconds_since_last_upload DESC
LIMIT 200""", "device_status.", "short"),
    ("Latest reading of each sensor", "table", 12, 8, f"""
SELECT device_id, sensor, unit, time_utc, value
FROM latest_readings
WHERE {DEVICE} AND {SENSOR}
ORDER BY device_id, sensor
LIMIT 500""", "latest_readings.", "short"),
    ("Daily summary", "table", 24, 8, f"""
SELECT day_utc, device_id, sensor, unit, reading_count, min_value, avg_value, max_value
FROM readings_daily
WHERE day_unix_nano >= ($__from * 1000000) - 86399999999999 AND day_unix_nano < $__to * 1000000
  AND {DEVICE} AND {SENSOR}
ORDER BY day_unix_nano DESC, device_id, sensor
LIMIT 1000""", "readings_daily: every UTC day that overlaps the time range.", "short"),
    ("Alerts fired per hour, by severity", "timeseries", 12, 8, f"""
SELECT (fired_unix_nano / 3600000000000) * 3600 AS time, severity AS metric, COUNT(*) AS alerts
FROM alert_history
WHERE {in_range('fired_unix_nano')} AND {DEVICE}
GROUP BY (fired_unix_nano / 3600000000000) * 3600, severity
ORDER BY 1, 2""", "alert_history, by firing time.", "short"),
    ("Time to resolve, per rule", "table", 12, 8, f"""
SELECT rule_id, severity, COUNT(*) AS alerts,
       AVG(seconds_to_resolve) AS avg_seconds_to_resolve,
       MAX(seconds_to_resolve) AS max_seconds_to_resolve,
       AVG(seconds_to_ack) AS avg_seconds_to_ack
FROM alert_history
WHERE state = 'resolved' AND {in_range('fired_unix_nano')} AND {DEVICE}
GROUP BY rule_id, severity
ORDER BY alerts DESC""", "alert_history, alerts fired in the time range and resolved since.", "short"),
    ("Alerts not resolved", "table", 24, 8, f"""
SELECT alert_id, rule_id, device_id, sensor, severity, state, fired_utc, fired_value, message
FROM alert_history
WHERE state <> 'resolved' AND {DEVICE}
ORDER BY fired_unix_nano DESC
LIMIT 200""", "alert_history: open and acknowledged alerts.", "short"),
    ("Commands by kind", "table", 12, 8, f"""
SELECT kind, COUNT(*) AS sent,
       SUM(CASE WHEN state = 'acked' THEN 1 ELSE 0 END) AS acked,
       SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed,
       SUM(CASE WHEN state = 'expired' THEN 1 ELSE 0 END) AS expired,
       100.0 * SUM(CASE WHEN state = 'acked' THEN 1 ELSE 0 END) / COUNT(*) AS success_pct,
       AVG(seconds_to_ack) AS avg_seconds_to_ack
FROM command_log
WHERE {in_range('created_unix_nano')} AND {DEVICE}
GROUP BY kind
ORDER BY kind""", "command_log, commands created in the time range.", "short"),
    ("Command acknowledgement time per hour", "timeseries", 12, 8, f"""
SELECT (created_unix_nano / 3600000000000) * 3600 AS time, kind AS metric, AVG(seconds_to_ack) AS seconds_to_ack
FROM command_log
WHERE {in_range('created_unix_nano')} AND {DEVICE} AND seconds_to_ack IS NOT NULL
GROUP BY (created_unix_nano / 3600000000000) * 3600, kind
ORDER BY 1, 2""", "command_log.seconds_to_ack (acked and failed), averaged per hour of creation.", "s"),
    ("Recent commands", "table", 24, 8, f"""
SELECT command_id, device_id, kind, arguments, state, result, created_utc, seconds_to_delivery, seconds_to_ack
FROM command_log
WHERE {in_range('created_unix_nano')} AND {DEVICE}
ORDER BY command_id DESC
LIMIT 200""", "command_log.", "short"),
]


def sql_target(sql, kind):
    time_series = kind == "timeseries"
    return {
        "refId": "A",
        "datasource": SQL_DS,
        # PostgreSQL (core plugin)
        "rawSql": sql,
        "rawQuery": True,
        "editorMode": "code",
        "format": "time_series" if time_series else "table",
        # SQLite (frser-sqlite-datasource)
        "queryText": sql,
        "rawQueryText": sql,
        "queryType": "time series" if time_series else "table",
        "timeColumns": ["time"],
    }


def sql_dashboard():
    L = Layout()
    panels = [L.row("Readings")]
    rows_before = {"Alerts fired per hour, by severity": "Alerts", "Commands by kind": "Commands",
                   "Fleet status": "Devices"}
    for title, kind, w, h, sql, description, unit in SQL_PANELS:
        if title in rows_before:
            panels.append(L.row(rows_before[title]))
        panel = {
            "type": kind,
            "title": title,
            "description": description,
            "id": L.take_id(),
            "gridPos": L.place(w, h),
            "datasource": SQL_DS,
            "targets": [sql_target(sql.strip(), kind)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
        }
        if kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": True},
                                "textMode": "value_and_name", "colorMode": "none", "graphMode": "none"}
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
        panels.append(panel)
    return {
        "uid": "telemetry-ingest-sql",
        "title": "telemetry-ingest: SQL reports",
        "description": "The reporting views of docs/schema.md (readings_hourly, readings_daily, latest_readings, device_status, alert_history, command_log). One SQL text per panel runs on both PostgreSQL and SQLite: pick the data source with `ds`.",
        "tags": ["telemetry-ingest"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "1m",
        "timezone": "utc",
        "annotations": {"list": []},
        "links": [{"title": "Server metrics", "type": "link", "url": "/d/telemetry-ingest-metrics", "targetBlank": False}],
        "templating": {"list": [
            {"name": "ds", "label": "database", "type": "custom",
             "description": "uid of a PostgreSQL or SQLite data source (deploy/grafana/provisioning/datasources provisions ingest-postgres and ingest-sqlite)",
             "query": "ingest-postgres,ingest-sqlite",
             "options": [{"text": "ingest-postgres", "value": "ingest-postgres", "selected": True},
                         {"text": "ingest-sqlite", "value": "ingest-sqlite", "selected": False}],
             "current": {"text": "ingest-postgres", "value": "ingest-postgres"}, "hide": 0},
            {"name": "device", "label": "device id (empty: all)", "type": "textbox", "query": "",
             "current": {"text": "", "value": ""}, "hide": 0},
            {"name": "sensor", "label": "sensor (empty: all)", "type": "textbox", "query": "",
             "current": {"text": "", "value": ""}, "hide": 0},
        ]},
        "panels": panels,
    }


def render(board):
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main():
    check = "--check" in sys.argv[1:]
    boards = {"ingest-metrics.json": metrics_dashboard(), "ingest-sql-reports.json": sql_dashboard()}
    stale = []
    for name, board in boards.items():
        path = OUT / name
        text = render(board)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python3 deploy/grafana/dashboards.py):", *stale, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
