#!/usr/bin/env python3
"""Runs every query of the SQL reports dashboard on real SQLite and
PostgreSQL databases with the project's schema, the way Grafana would send
it (global variables interpolated), and fails on any error.

    deploy/grafana/check_sql.py PATH/TO/ingest [--postgres-url postgres://user@host:port]

- The schema comes from the binary itself (`ingest migrate`).
- When `device-sim` sits next to `ingest` (the same cargo target
  directory), both databases are first filled by a short simulated fleet
  with anomalies, so alerts fire and commands are sent: then the readings
  and device panels must also return rows, not just parse.
- PostgreSQL: a scratch database is created on the server and dropped
  afterwards. Without --postgres-url only SQLite is checked, and the output
  says so.
"""

import argparse
import json
import os
import pathlib
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
DASHBOARD = HERE / "dashboards" / "ingest-sql-reports.json"

# Panels that must return rows once a fleet has uploaded.
MUST_HAVE_ROWS = {
    "Readings stored per hour, by sensor",
    "Hourly average, by device (sensor and devices from the filters)",
    "Fleet status",
    "Latest reading of each sensor",
    "Daily summary",
}


def interpolate(sql, now_ms):
    """What Grafana sends: $__from/$__to in ms, the textboxes empty."""
    values = {
        "$__from": str(now_ms - 24 * 3600 * 1000),
        "$__to": str(now_ms + 3600 * 1000),
        "${device:sqlstring}": "''",
        "${sensor:sqlstring}": "''",
    }
    for key, value in values.items():
        sql = sql.replace(key, value)
    left = re.findall(r"\$\{?\w+", sql)
    if left:
        raise SystemExit(f"uninterpolated Grafana variables {left} in:\n{sql}")
    return sql


def panels():
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            sql = target["rawSql"]
            # Both plugins must get the same text.
            if not (sql == target["queryText"] == target["rawQueryText"]):
                raise SystemExit(f"{panel['title']}: rawSql, queryText and rawQueryText differ")
            ts = panel["type"] == "timeseries"
            if (target["format"] == "time_series") != ts or (target["queryType"] == "time series") != ts:
                raise SystemExit(f"{panel['title']}: format/queryType do not match the panel type")
            if ts and not re.search(r"\bAS time\b", sql):
                raise SystemExit(f"{panel['title']}: a time series query needs a `time` column")
            out.append((panel["title"], sql))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_quietly(cmd, **kwargs):
    done = subprocess.run(cmd, timeout=120, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def seed_with_fleet(device_sim, ingest, data_dir, database_url=None):
    """A few simulated devices for a few seconds, with anomalies."""
    fleet = [str(device_sim), "--devices", "4", "--duration", "4s", "--anomalies",
             "--anomaly-rate", "0.2", "--quiet", "--data-dir", str(data_dir)]
    if database_url is None:
        run_quietly(fleet + ["--local-server", "--listen", f"127.0.0.1:{free_port()}"])
        return
    port = free_port()
    env = dict(os.environ, INGEST_DATABASE_URL=database_url, INGEST_DATA_DIR=str(data_dir),
               INGEST_LISTEN=f"127.0.0.1:{port}", RUST_LOG="warn")
    env.pop("INGEST_OPS_TOKEN", None)
    server = subprocess.Popen([str(ingest), "serve"], env=env)
    try:
        token = pathlib.Path(data_dir) / "ops.token"
        for _ in range(200):
            if token.exists() and token.stat().st_size:
                break
            if server.poll() is not None:
                raise SystemExit(f"ingest serve exited with {server.returncode}")
            time.sleep(0.1)
        time.sleep(0.5)
        run_quietly(fleet + ["--server", f"http://127.0.0.1:{port}"])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def check_sqlite(ingest, device_sim, queries, now_ms):
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data"
        subprocess.run([str(ingest), "migrate", "--data-dir", str(data)], check=True, stdout=subprocess.DEVNULL,
                       env={k: v for k, v in os.environ.items() if k != "INGEST_DATABASE_URL"})
        if device_sim:
            seed_with_fleet(device_sim, ingest, data)
        db = sqlite3.connect(f"file:{data / 'telemetry.db'}?mode=ro", uri=True)
        return {title: len(db.execute(interpolate(sql, now_ms)).fetchall()) for title, sql in queries}


def psql(url, *args, **kwargs):
    return subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-X", "-q", *args],
                          check=True, text=True, capture_output=True, **kwargs)


def check_postgres(base_url, ingest, device_sim, queries, now_ms):
    base_url = base_url.rstrip("/")
    name = f"ingest_dashboard_check_{os.getpid()}"
    psql(f"{base_url}/postgres", "-c", f"CREATE DATABASE {name}")
    url = f"{base_url}/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([str(ingest), "migrate", "--database-url", url, "--data-dir", tmp],
                           check=True, stdout=subprocess.DEVNULL)
            if device_sim:
                seed_with_fleet(device_sim, ingest, pathlib.Path(tmp) / "fleet", database_url=url)
        rows = {}
        for title, sql in queries:
            try:
                out = psql(url, "-At", "-c", interpolate(sql, now_ms)).stdout
            except subprocess.CalledProcessError as e:
                raise SystemExit(f"PostgreSQL rejected '{title}':\n{e.stderr}")
            rows[title] = len([line for line in out.splitlines() if line])
        return rows
    finally:
        psql(f"{base_url}/postgres", "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("ingest")
    parser.add_argument("--postgres-url", help="postgres://user@host:port (no database)")
    args = parser.parse_args()
    ingest = pathlib.Path(args.ingest).resolve()
    device_sim = ingest.parent / "device-sim"
    device_sim = device_sim if os.access(device_sim, os.X_OK) else None
    queries = panels()
    now_ms = int(time.time() * 1000)
    print(f"  {len(queries)} queries; data: "
          + ("a 4-device simulated fleet (device-sim next to ingest)" if device_sim else "schema only (no device-sim next to ingest)"))
    results = {"SQLite": check_sqlite(ingest, device_sim, queries, now_ms)}
    if args.postgres_url:
        results["PostgreSQL"] = check_postgres(args.postgres_url, ingest, device_sim, queries, now_ms)
    else:
        print("  PostgreSQL: not checked (no --postgres-url)")
    failed = False
    for engine, rows in results.items():
        for title, n in rows.items():
            print(f"  {engine:<10} {n:>5} rows  {title}")
            if device_sim and title in MUST_HAVE_ROWS and n == 0:
                print(f"  FAIL: {engine}: '{title}' returned no rows after the fleet uploaded")
                failed = True
    if failed:
        sys.exit(1)
    print(f"SQL dashboard: every query ran on {' and '.join(results)}")


if __name__ == "__main__":
    main()
