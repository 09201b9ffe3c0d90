#!/usr/bin/env python3
"""Benchmark Microticks on this machine; prints a table and writes JSON.

    python bench_microticks.py                 # everything (several minutes)
    python bench_microticks.py --only reads    # one part: reads

Every figure is reported beside a baseline measured in the same run, as a
ratio, so that runs on different machines can be compared.

Reads: a database of 1,000,000 events in 50,000 sessions, made by repeating
the sample week (../shared/data/kiosk-sample-events.json) shifted week by
week, served by `python microticks.py serve`; timed over HTTP.
"""

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "shared" / "data" / "kiosk-sample-events.json"
sys.path.insert(0, str(HERE))
import microticks  # noqa: E402


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid):
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Serve:
    """`python microticks.py serve` as a subprocess."""

    def __init__(self, db, *args, env=None):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "microticks.py"), "serve", "--db", str(db), "--port", str(self.port), *args],
            env={**os.environ, "MICROTICKS_LOG_LEVEL": "WARNING", **(env or {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("serve did not start")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)


def timed_get(url):
    """(seconds to the first byte, seconds in all, bytes) of a GET."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as reply:
        first = reply.read(1)
        first_byte = time.perf_counter() - started
        size = len(first)
        while True:
            chunk = reply.read(1 << 20)
            if not chunk:
                break
            size += len(chunk)
    return first_byte, time.perf_counter() - started, size


def build_big_database(path, sessions=50_000):
    """Repeat the sample week, shifted a week at a time, until `sessions`
    sessions (about 20 events each) are stored; one transaction."""
    sample = json.loads(SAMPLE.read_text(encoding="utf-8"))["events"]
    by_session = {}
    for event in sample:
        by_session.setdefault(event["session_id"], []).append(event)
    week_sessions = list(by_session.values())
    conn = microticks.connect(str(path))
    consumer = conn.execute("INSERT INTO consumers (name, key, created_at) VALUES ('bench', 'k', '2017-01-01 00:00:00')").lastrowid
    from datetime import timedelta
    session_rows, event_rows = [], []
    session_id = event_id = 0
    week = 0
    while session_id < sessions:
        shift = timedelta(weeks=week)
        for events in week_sessions:
            if session_id >= sessions:
                break
            session_id += 1
            times = [microticks.format_utc(microticks.parse_timestamp(e["time"]) + shift) for e in events]
            session_rows.append((session_id, f"tok{session_id}", "10.0.0.1", times[0], times[-1], consumer,
                                 times[0], times[0], times[-1], times[-1], "client"))
            for event, when in zip(events, times):
                event_id += 1
                event_rows.append((event_id, session_id, when, event["action"],
                                   json.dumps(event["data"], separators=(",", ":")), when, when))
        week += 1
    with microticks.write_transaction(conn):
        conn.executemany("INSERT INTO sessions (id, token, ip, started_at, stopped_at, consumer_id, received_at,"
                         " started_utc, stopped_utc, stop_received_at, stop_reason)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", session_rows)
        conn.executemany("INSERT INTO events (id, session_id, time, action, data, received_at, time_utc)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)", event_rows)
    conn.execute("ANALYZE")
    conn.close()
    return event_id, session_id, week


def bench_reads(workdir, results):
    db = workdir / "big.db"
    started = time.perf_counter()
    events, sessions, weeks = build_big_database(db)
    print(f"built {events:,} events in {sessions:,} sessions ({weeks} weeks) in {time.perf_counter() - started:.1f} s")
    day = "2017-05-23"
    with Serve(db, env={"MICROTICKS_TZ": "UTC"}) as server:
        rows = []

        def measure(name, path, repeat=3, target=None):
            runs = [timed_get(server.url + path) for _ in range(repeat)]
            best = min(runs, key=lambda r: r[1])
            rows.append({"read": name, "seconds": round(best[1], 3), "first_byte_s": round(best[0], 4),
                         "bytes": best[2], "target_s": target})
            return best

        measure("events page (1,000 rows)", "/events?limit=1000")
        measure("events page by cursor, deep", f"/events?after_id={events - 2000}&limit=1000")
        measure("events page by offset, deep", f"/events?offset={events - 2000}&limit=1000")
        measure("stats, one day", f"/stats?from={day}&to={day}", target=0.1)
        measure("stats, everything", "/stats", repeat=1, target=2.0)
        _, seconds, size = measure("CSV export, everything", "/events?format=csv", repeat=1)
        rows.append({"read": "CSV export rate", "rows_per_s": round(events / seconds), "target_rows_per_s": 100_000})
        _, seconds, _ = measure("NDJSON export, everything", "/events?format=ndjson", repeat=1)
        rows.append({"read": "NDJSON export rate", "rows_per_s": round(events / seconds)})
        peak = peak_rss_mb(server.proc.pid)
        rows.append({"read": "serve peak memory after the exports", "peak_rss_mb": round(peak, 1),
                     "database_mb": round(db.stat().st_size / 1e6, 1)})
    # The baseline: SQLite alone reading every row in-process.
    conn = sqlite3.connect(db)
    started = time.perf_counter()
    n = sum(1 for _ in conn.execute("SELECT id, session_id, time, action, data FROM events"))
    raw = time.perf_counter() - started
    rows.append({"read": "baseline: sqlite3 in-process, every row", "rows_per_s": round(n / raw)})
    csv_rate = next(r["rows_per_s"] for r in rows if r["read"] == "CSV export rate")
    rows.append({"read": "CSV export / in-process read", "ratio": round(csv_rate / (n / raw), 3)})
    results["reads"] = {"events": events, "sessions": sessions, "rows": rows}
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items() if v is not None))


PARTS = {"reads": bench_reads}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(PARTS), action="append", help="run only this part")
    parser.add_argument("--json", default="bench_results.json", help="where to write the figures (default: %(default)s)")
    args = parser.parse_args()
    results = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), "sqlite": sqlite3.sqlite_version},
               "microticks": microticks.__version__, "when": microticks.utc_now()}
    with tempfile.TemporaryDirectory(prefix="microticks-bench-") as workdir:
        for name in args.only or PARTS:
            print(f"\n== {name}")
            PARTS[name](Path(workdir), results)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
