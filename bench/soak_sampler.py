#!/usr/bin/env python3
"""Step 10 of bench/run (the soak): one line a minute while the load runs.

Reads the server's /metrics each minute and reports, for that minute:
committed readings/s, the database's size, batch acknowledgement p99 (from
the server's ingest_batch_ack_seconds histogram, the minute's own
observations), alert p99 (the alert_latency probe, run for a few samples
each minute), the writer queue's depth, and the server's RSS. At the end,
the summary the issue asks for: the first and last windows' rates and
their ratio, the worst minute's alert p99, and RSS first against last.

usage: soak_sampler.py METRICS_URL MINUTES SIZE_CMD PROBE_CMD
  SIZE_CMD  prints the database size in bytes (run by the shell)
  PROBE_CMD runs the alert probe; its "p99 X ms" is read from its output
"""
import re
import subprocess
import sys
import time
import urllib.request


def scrape(url):
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        samples[name_labels] = float(value)
    return samples


def total(samples, name, where=""):
    return sum(v for k, v in samples.items() if k.startswith(name) and where in k)


def buckets(samples, name):
    out = {}
    for k, v in samples.items():
        if k.startswith(name + "_bucket"):
            le = re.search(r'le="([^"]+)"', k).group(1)
            out[float("inf") if le == "+Inf" else float(le)] = out.get(
                float("inf") if le == "+Inf" else float(le), 0.0) + v
    return out


def p99(before, after):
    """The 99th percentile of the observations between two scrapes,
    interpolated within its bucket as Prometheus' histogram_quantile does
    (so the figure reads the same as the dashboards')."""
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    count = delta.get(float("inf"), 0)
    if count <= 0:
        return None
    rank = 0.99 * count
    lower, below = 0.0, 0.0
    for le in sorted(delta):
        if delta[le] >= rank:
            if le == float("inf"):
                return lower * 1000
            inside = delta[le] - below
            share = (rank - below) / inside if inside > 0 else 1.0
            return (lower + (le - lower) * share) * 1000
        lower, below = le, delta[le]
    return None


def main():
    url, minutes, size_cmd, probe_cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    rows = []
    before = scrape(url)
    start = time.time()
    print(f"  {'min':>3} {'committed/s':>12} {'db MiB':>8} {'ack p99 ms':>11} "
          f"{'alert p99 ms':>13} {'queue':>6} {'rss MiB':>8}", flush=True)
    for minute in range(1, minutes + 1):
        # The probe runs inside the minute; the rest of it is waited out.
        probe = subprocess.run(probe_cmd, shell=True, capture_output=True, text=True)
        found = re.search(r"p99 ([0-9.]+) ms", probe.stdout)
        alert = float(found.group(1)) if found else None
        if probe.returncode != 0:
            print(f"  probe failed: {probe.stdout.strip()} {probe.stderr.strip()[:200]}", flush=True)
        time.sleep(max(0.0, start + 60 * minute - time.time()))
        after = scrape(url)
        committed = (total(after, "ingest_readings_total", 'outcome="committed"')
                     - total(before, "ingest_readings_total", 'outcome="committed"')) / 60
        ack = p99(buckets(before, "ingest_batch_ack_seconds"), buckets(after, "ingest_batch_ack_seconds"))
        size = int(subprocess.run(size_cmd, shell=True, capture_output=True, text=True).stdout.strip() or 0)
        row = {
            "minute": minute,
            "rate": committed,
            "db_mib": size / 2**20,
            "ack_p99": ack,
            "alert_p99": alert,
            "queue": total(after, "ingest_writer_queue_batches"),
            "rss_mib": total(after, "process_resident_memory_bytes") / 2**20,
        }
        rows.append(row)
        fmt = lambda v: "-" if v is None else f"{v:.1f}"
        print(f"  {minute:>3} {round(committed):>12} {row['db_mib']:>8.0f} {fmt(ack):>11} "
              f"{fmt(alert):>13} {round(row['queue']):>6} {row['rss_mib']:>8.0f}", flush=True)
        before = after
    window = max(1, min(10, len(rows) // 2))
    first = sum(r["rate"] for r in rows[:window]) / window
    last = sum(r["rate"] for r in rows[-window:]) / window
    alerts = [r["alert_p99"] for r in rows if r["alert_p99"] is not None]
    worst = max(rows, key=lambda r: r["alert_p99"] or 0)
    print(f"soak summary: first {window} min {round(first)} readings/s, last {window} min "
          f"{round(last)} readings/s, ratio {last / first if first else 0:.3f} (target >= 0.95); "
          f"worst minute's alert p99 {max(alerts) if alerts else float('nan'):.1f} ms (minute "
          f"{worst['minute']}; target <= 100); RSS {rows[0]['rss_mib']:.0f} MiB in minute 1, "
          f"{rows[-1]['rss_mib']:.0f} MiB in minute {rows[-1]['minute']}; database "
          f"{rows[-1]['db_mib']:.0f} MiB at the end", flush=True)


if __name__ == "__main__":
    main()
