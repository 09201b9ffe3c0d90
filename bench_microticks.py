#!/usr/bin/env python3
"""Benchmark Microticks on this machine; prints tables and writes JSON.

    apt-get install wrk                         # the load generator (once)
    python bench_microticks.py                  # everything but scale (about 7 minutes; 14 with --repeat 3)
    python bench_microticks.py --only ingest    # one part: ingest, batches, big (with the reads), hostile, import...
    python bench_microticks.py --only scale     # 1, 5 and 20 million events (--scale-sizes 1,5,20)

Every figure stands beside a baseline measured in the same run, as a ratio,
so that runs on different machines can be compared:

- ingest: single-event form posts (what the first frontends send) at 1, 8
  and 32 concurrent clients, for `python microticks.py serve` and gunicorn
  -w 2, each beside a 20-line reference Bottle+SQLite app under the same
  server, and the reference under the standard library's single-threaded
  server. A hello-world shows the HTTP ceiling (and that wrk is not the
  bottleneck). Microticks runs with the API key, validation and CORS on.
- batches: batches of 100 and 1,000 events over HTTP, under `serve` and
  gunicorn -w 2, beside SQLite's in-process executemany of the same rows,
  measured anew in each turn (the ratio is taken within the turn); and the
  app alone (the same batches handed to the WSGI app in-process, one
  thread, no HTTP): what one core of Python makes of them. Also batches of
  100 as the tracker sends them (a uuid, seq and boot per event), and in
  the app alone with random uuids instead of ids ordered by time.
- big: the same single-event ingest into a database of 1,000,000 events in
  50,000 sessions (the sample week repeated, shifted week by week, loaded
  with `microticks.py import`), beside the empty database.
- reads: /stats and exports on that database; peak memory of `serve`.
- hostile: a thousand connections sending 1 MiB bodies with a wrong API
  key, and to a service with none set: `serve`'s memory at rest, at its
  peak, and how soon after the attack it is under 80 MB; and a normal client's latency beside 64 connections
  that stall (an Expect: 100-continue head without a body, a refused 2 MB
  body), against its latency alone; beside 64 heads of ambiguous framing
  (Content-Length twice, Transfer-Encoding beside it) and no body; and a
  kiosk beside bursts of eight expensive reads (a new data key or bin, a
  comparison), their connections closed at once.
- dashboard: the real week's dashboard in Chromium, from asking for the page
  to every card and chart drawn.
- heartbeats: single heartbeats over HTTP beside single events (one
  server, in turns); 50 kiosks' year up to today: a million events (the
  sample week, several copies a week) and a year of their 5-minute
  heartbeats (about 5 million): bytes per heartbeat; /stats with coverage
  and holding power over everything and over one day, beside /stats
  without them.
- scale (only with --only scale; about 20 minutes): databases of 1, 5 and
  20 million events (--scale-sizes), a year of the sample week at many
  museums' sites, and at each size the disk per event, a site's import,
  /stats over everything and a day, with the path figures and a funnel,
  /compare of two halves, sessions with their paths, the NDJSON export,
  the dashboard's first request, a research bundle, serve's peak memory,
  and DuckDB's time for the same figure over the export; each time's
  growth from the size before, beside the sessions'. Its files are
  removed at the end, Ctrl+C included.
- cgi: a CGI request's CPU as whole processes, beside `python -c "import
  bottle"`: GET /health and an event's POST through microticks.cgi, with a
  writable __pycache__ and with the compiled form made beforehand
  (compileall) where nothing can be written; without any compiled form;
  and microticks.py run as the CGI script itself.
- import: `import` of a JSON export (one document) and an NDJSON export of
  200,000 events, and of files it refuses (a 100 MB line, 100,000-deep
  nesting): rate and peak memory, beside Python with Bottle.

Peak memory of `serve` is measured in every ingest run, and also where no
bytecode can be cached (a directory the service cannot write), where every
start compiles the file.

The load comes from wrk (C, epoll) on loopback: it drives the hello-world
at several times Microticks' rate, so the figures are the server's.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import py_compile
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "examples" / "kiosk-sample-week.json"
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


def timed_get(url):
    """(seconds to the first byte, seconds in all, bytes) of a GET."""
    started = time.perf_counter()
    request = urllib.request.Request(url, headers={"X-Microticks-Key": "bench-key-0123456789abc"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        first = reply.read(1)
        first_byte = time.perf_counter() - started
        size = len(first)
        while True:
            chunk = reply.read(1 << 20)
            if not chunk:
                break
            size += len(chunk)
    return first_byte, time.perf_counter() - started, size


def sample_week():
    """The real week (examples/kiosk-sample-week.json): its events."""
    return json.loads(SAMPLE.read_text(encoding="utf-8"))["events"]


def build_big_database(path, sessions=50_000, year_to=None):
    """Repeat the sample week, shifted a week at a time, until `sessions`
    sessions (about 20 events each) are in an export file (the GET /events
    shape), and load it as a researcher would: `microticks.py import`.
    With `year_to` (a UTC datetime), the copies lie over the 52 weeks
    before it, as many kiosks' year (several copies a week) rather than
    one table's decade. Returns (events, sessions, weeks, seconds the import took)."""
    by_session = {}
    for event in sample_week():
        by_session.setdefault(event["session_id"], []).append(event)
    week_sessions = list(by_session.values())
    first = min(microticks.parse_timestamp(e["time"]) for events in week_sessions for e in events)
    # Whole weeks, so that each copy keeps the real week's weekdays and hours.
    base = timedelta(weeks=(year_to - timedelta(weeks=52) - first).days // 7) if year_to else timedelta(0)
    export = path.with_suffix(".ndjson")
    session_id = event_id = week = 0
    with export.open("w", encoding="utf-8") as out:
        while session_id < sessions:
            shift = base + timedelta(weeks=week % 52 if year_to else week)
            for events in week_sessions:
                if session_id >= sessions:
                    break
                session_id += 1
                for event in events:
                    event_id += 1
                    when = microticks.format_utc(microticks.parse_timestamp(event["time"]) + shift)
                    out.write(json.dumps({"id": event_id, "session_id": session_id, "time": when,
                                          "action": event["action"], "data": event["data"]}) + "\n")
            week += 1
    started = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "microticks.py"), "import", str(export), "--db", str(path),
                    "--consumer", "bench-import"], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    export.unlink()
    return event_id, session_id, week, seconds


def bench_reads(workdir, results, db):
    events = sqlite3.connect(db).execute("SELECT count(*) FROM events").fetchone()[0]
    sessions = sqlite3.connect(db).execute("SELECT count(*) FROM sessions").fetchone()[0]
    day = "2017-05-23"
    serve = [sys.executable, str(HERE / "microticks.py"), "serve", "--db", str(db), "--port", "{port}"]
    with Process(serve, env={**MICROTICKS_ENV, "MICROTICKS_TZ": "UTC"}) as server:
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
        # /stats adds up per-session figures kept by the import (and by
        # earlier calls); sessions without them are computed. Another bin
        # has none kept: every session is computed, as on the first call
        # over a database upgraded from the first Microticks.
        measure("stats, everything, first call after the import", "/stats", repeat=1, target=2.0)
        measure("stats, everything, again", "/stats", target=2.0)
        paths = "paths=3&funnel=main,year:2017,year:2016,year:2015"
        measure("stats with path figures and a 4-step funnel, one day", f"/stats?from={day}&to={day}&{paths}",
                target=0.1)
        measure("stats with path figures and a 4-step funnel, everything", f"/stats?{paths}", target=1.0)
        busiest = sqlite3.connect(db).execute(
            "SELECT screen FROM stats_heat WHERE data_key = 'subject' AND bin = 50 GROUP BY screen"
            " ORDER BY sum(points) DESC LIMIT 1").fetchone()[0]
        measure(f"heatmap of the busiest screen ({busiest}), everything",
                f"/screens/{urllib.parse.quote(busiest, safe='')}/touches", target=0.3)
        # Two halves of the sessions, by their start: both sides' /stats and the tests of their differences.
        middle = sqlite3.connect(db).execute("SELECT substr(started_utc, 1, 10) FROM sessions ORDER BY started_utc"
                                             " LIMIT 1 OFFSET ?", (sessions // 2,)).fetchone()[0]
        measure("compare two halves, everything", f"/compare?a.to={middle}T00:00Z&b.from={middle}T00:00Z", target=2.0)
        both = next(r["seconds"] for r in rows if r["read"] == "compare two halves, everything")
        alone = next(r["seconds"] for r in rows if r["read"] == "stats, everything, again")
        rows.append({"read": "compare two halves / stats of everything", "ratio": round(both / alone, 2)})
        _, seconds, _ = measure("sessions with their paths, streamed", "/sessions?format=ndjson&fields=id,path,touches",
                                repeat=1)
        rows.append({"read": "sessions with paths, rate", "sessions_per_s": round(sessions / seconds),
                     "target_sessions_per_s": 20_000})
        measure("stats, everything, nothing kept (another bin)", "/stats?bin=20", repeat=1)
        rows.append({"read": "serve peak memory after stats", "peak_rss_mb": round(peak_rss_mb(server.proc.pid), 1)})
        _, seconds, size = measure("CSV export, everything", "/events?format=csv", repeat=1)
        rows.append({"read": "CSV export rate", "rows_per_s": round(events / seconds), "target_rows_per_s": 100_000})
        _, seconds, _ = measure("NDJSON export, everything", "/events?format=ndjson", repeat=1)
        rows.append({"read": "NDJSON export rate", "rows_per_s": round(events / seconds)})
        ndjson_rate = events / seconds
        # The first Microticks' read: GET /events without a limit, one JSON document of every event.
        _, seconds, _ = measure("GET /events, every event as one JSON document", "/events", repeat=1)
        rows.append({"read": "GET /events document rate", "rows_per_s": round(events / seconds),
                     "ratio_to_ndjson_export": round(events / seconds / ndjson_rate, 2)})
        for export in ("csv", "ndjson"):  # a researcher's export: a column per data key too
            _, seconds, _ = measure(f"{export.upper()} export with 3 data keys", f"/events?format={export}"
                                    "&data_keys=subject,clickX,clickY", repeat=1)
            rows.append({"read": f"{export.upper()} export with 3 data keys, rate", "rows_per_s": round(events / seconds)})
        peak = peak_rss_mb(server.proc.pid)
        rows.append({"read": "serve peak memory after the exports", "peak_rss_mb": round(peak, 1),
                     "database_mb": round(db.stat().st_size / 1e6, 1)})
    # A research bundle of everything (the events and sessions as NDJSON and
    # CSV, stats.json...), written by the command, and its peak memory.
    bundle = workdir / "bundle"
    started = time.perf_counter()
    peak_kb = subprocess.run(
        [sys.executable, "-c", "import resource, sys, microticks; code = microticks.main(sys.argv[1:]);"
         " print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
         "export", "--bundle", str(bundle), "--db", str(db)],
        check=True, capture_output=True, text=True, cwd=HERE, env={**os.environ, **MICROTICKS_ENV}).stdout.split()[-1]
    seconds = time.perf_counter() - started
    # Every event and session is written twice (NDJSON and CSV, every field).
    rows.append({"read": "research bundle of everything (events and sessions, NDJSON and CSV)",
                 "seconds": round(seconds, 1), "rows_written_per_s": round(2 * (events + sessions) / seconds),
                 "events_per_s": round(events / seconds), "peak_rss_mb": round(int(peak_kb) / 1024, 1),
                 "target_rows_per_s": 100_000, "bytes": sum(f.stat().st_size for f in bundle.iterdir())})
    shutil.rmtree(bundle)
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
        print_row(row)


REFERENCE_APP = '''
import sqlite3, sys, threading
import bottle

app, local, DB = bottle.Bottle(), threading.local(), sys.argv[1] if __name__ == "__main__" else None

def db():
    if not hasattr(local, "conn"):
        local.conn = sqlite3.connect(DB or __import__("os").environ["REF_DB"], timeout=10, isolation_level=None)
        local.conn.execute("PRAGMA journal_mode=WAL")
    return local.conn

@app.post("/events")
def events():
    form, conn = bottle.request.forms, db()
    conn.execute("BEGIN IMMEDIATE")
    cursor = conn.execute("INSERT INTO events (session_id, time, action, data) VALUES (1, ?, ?, ?)",
                          (form.ts, form.action, form.data))
    conn.execute("COMMIT")
    return {"event_id": cursor.lastrowid}

@app.get("/hello")
def hello():
    return "hello"

application = app
'''

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = %s
wrk.headers["X-Microticks-Key"] = "bench-key-0123456789abc"
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format('WRK {"requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, errors, summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


# A body holding SENT_AT gets the current time there, request by request: a
# batch's sent_at as a kiosk with a right clock sends it. (One body replayed
# with a fixed sent_at would age during the run, and every event would be
# corrected for a clock that is not wrong.) Each UUID gets a new id, ordered
# by time as the tracker's UUIDv7s are: a replayed one would be a duplicate.
SENT_AT, UUID = "@SENT_AT@", "@UUID@"
FRESH_FIELDS = """
local parts, made, thread_count = {}, 0, 0
for part in (wrk.body .. "@UUID@"):gmatch("(.-)@UUID@") do parts[#parts + 1] = part end
setup = function(thread)
  thread_count = thread_count + 1
  thread:set("thread_number", thread_count)
end
request = function()
  local now, body = os.time(), {parts[1]}
  for i = 2, #parts do
    made = made + 1
    body[#body + 1] = string.format("%010x-%d-%012x", now, thread_number or 0, made)
    body[#body + 1] = parts[i]
  end
  body = table.concat(body):gsub("@SENT_AT@", os.date("!%Y-%m-%dT%H:%M:%S.000Z"))
  return wrk.format(nil, nil, nil, body)
end
"""


def lua_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk(url, clients, seconds, body="", content_type="application/x-www-form-urlencoded", method="POST"):
    """Requests/s and p50/p99 latency (ms) of wrk against url."""
    import shutil
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is missing: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (lua_string(body), lua_string(content_type)))
        if SENT_AT in body or UUID in body:
            script.write(FRESH_FIELDS)
        if method == "GET":
            script.write('wrk.method = "GET"\nwrk.body = nil\n')
    try:
        out = subprocess.run(["wrk", "-t", str(min(clients, 2)), "-c", str(clients), "-d", f"{seconds}s",
                              "--timeout", "10s", "-s", script.name, url], capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(script.name)
    line = next((l for l in out.stdout.splitlines() if l.startswith("WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout} {out.stderr}")
    figures = json.loads(line[4:])
    return {"rps": round(figures["requests"] / (figures["duration_us"] / 1e6)), "p50_ms": figures["p50_us"] / 1000,
            "p99_ms": figures["p99_us"] / 1000, "errors": figures["errors"] + figures["non2xx"],
            "requests": figures["requests"]}


class Process:
    """A server subprocess on a free port ({port} in its command, PORT in its
    environment), waited for until `health` answers."""

    def __init__(self, command, env=None, cwd=None, health="/health"):
        self.port = free_port()
        command = [c.replace("{port}", str(self.port)) for c in command]
        self.proc = subprocess.Popen(command, env={**os.environ, **(env or {}), "PORT": str(self.port)}, cwd=cwd,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + health, timeout=1).read()
                return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"{command} did not start")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(15)


def microticks_db(path):
    """A database with a consumer and an open session; returns the token."""
    conn = microticks.connect(str(path))
    key = microticks.create_consumer(conn, f"bench-{time.monotonic_ns()}")
    ts = microticks.Timestamp("2017-08-25T17:09:19.438Z", "2017-08-25T17:09:19.438Z")
    token, _ = microticks.start_session(conn, key, ts, "127.0.0.1")
    conn.close()
    return token


def reference_db(path):
    conn = sqlite3.connect(path)
    for statement in microticks.FIRST_GENERATION_SCHEMA:
        conn.execute(statement)
    conn.commit()
    conn.close()


def form_body(token):
    return urllib.parse.urlencode({"token": token, "action": "click", "ts": "2017-08-25T17:09:20.438Z",
                                   "data": json.dumps({"target": "some_box", "clickX": 406, "clickY": 300})})


# The API key, validation and CORS on; the rate limit off (wrk plays a building
# of kiosks from one address); the access log off, as the reference app has
# none (its cost is measured on its own).
MICROTICKS_ENV = {"MICROTICKS_KEY": "bench-key-0123456789abc", "MICROTICKS_RATE_LIMIT": "0", "MICROTICKS_LOG_LEVEL": "WARNING"}


def gunicorn_command(app):
    """gunicorn -w 2, as the issue has it; from version 27 on, without the
    control socket it would write under ~/.gunicorn (Python 3.9 gets older
    ones, which have none)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        quiet = ["--no-control-socket"] if int(version("gunicorn").split(".")[0]) >= 27 else []
    except PackageNotFoundError:
        sys.exit("bench: gunicorn is missing: pip install -e '.[test]'")
    return [sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:{port}", "--backlog", "256", *quiet, app]


def servers(workdir, kind, app, db):
    """The command (and environment) that runs `app` ("microticks", "reference"
    or "hello") under server `kind` ("serve", "gunicorn", "stdlib")."""
    if app == "microticks":
        env = {**MICROTICKS_ENV, "MICROTICKS_DB": str(db)}
        if kind == "serve":
            return [sys.executable, str(HERE / "microticks.py"), "serve", "--port", "{port}"], env, HERE
        if kind == "serve-uncached":  # as from a directory the service cannot write
            env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(workdir / "no-bytecode-here"))
            return [sys.executable, str(HERE / "microticks.py"), "serve", "--port", "{port}"], env, HERE
        return gunicorn_command("microticks:application"), env, HERE
    env = {"REF_DB": str(db), "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if kind == "gunicorn":
        return gunicorn_command("reference_app:application"), env, workdir
    runner = ("import os, reference_app, microticks, bottle; app = reference_app.application;"
              " port = int(os.environ['PORT']);")
    if kind == "serve":  # our server, as `serve` runs it
        runner += " microticks.make_http_server(app, '127.0.0.1', port).serve_forever()"
    else:  # the standard library's single-threaded server
        runner += " bottle.run(app, server='wsgiref', host='127.0.0.1', port=port, quiet=True)"
    return [sys.executable, "-c", runner], env, workdir


def run_side_by_side(workdir, setups, clients, seconds):
    """Load runs of several servers, each setup a (kind, app) pair or a dict
    of run_ingest's arguments, taken in turns (A B A B ...): a change in the
    VM's speed during the part weighs on each alike, so their ratios hold
    better than the figures do. The median run of each."""
    setups = [dict(zip(("kind", "app"), s)) if isinstance(s, tuple) else s for s in setups]
    with contextlib.ExitStack() as stack:
        servers_started = []
        for setup in setups:
            kind, app, token = setup["kind"], setup["app"], setup.get("token")
            db = setup.get("db") or workdir / f"{app}-{kind}-{clients}-{time.monotonic_ns()}.db"
            if app == "microticks" and token is None:
                token = microticks_db(db)
            elif app == "reference":
                reference_db(db)
            command, env, cwd = servers(workdir, kind, app, db)
            env = {**env, **(setup.get("extra_env") or {})}
            health = "/hello" if app != "microticks" else "/health"
            servers_started.append((stack.enter_context(Process(command, env, cwd, health)), token))
        runs = [[] for _ in setups]
        for _ in range(REPEAT):
            for setup, (server, token), mine in zip(setups, servers_started, runs):
                if setup["app"] == "hello":
                    mine.append(wrk(server.url + "/hello", clients, seconds, method="GET"))
                else:
                    mine.append(wrk(server.url + "/events", clients, seconds, form_body(token or "")))
        results = []
        for setup, (server, _), mine in zip(setups, servers_started, runs):
            result = sorted(mine, key=lambda r: r["rps"])[len(mine) // 2]  # the median run
            result["errors"] = sum(r["errors"] for r in mine)
            result["peak_rss_mb"] = round(peak_rss_mb(server.proc.pid), 1) if setup["kind"].startswith("serve") else None
            results.append(result)
    return results


def run_ingest(workdir, kind, app, clients, seconds, **setup):
    return run_side_by_side(workdir, [dict(kind=kind, app=app, **setup)], clients, seconds)[0]


#: Load runs per measurement; the median counts (--repeat).
REPEAT = 1


def bench_ingest(workdir, results, seconds):
    (workdir / "reference_app.py").write_text(REFERENCE_APP)
    # `serve` imports the file, with the bytecode cached in __pycache__ (written
    # here, whatever PYTHONDONTWRITEBYTECODE says), as after its first start.
    py_compile.compile(str(HERE / "microticks.py"), doraise=True)
    rows, stdlib = [], {}
    for kind in ("serve", "gunicorn"):
        for clients in (1, 8, 32):
            # The standard library's server in the same turns as `serve`: the
            # two are compared below.
            extra = [("stdlib", "reference")] if kind == "serve" else []
            mine, ref, *single = run_side_by_side(workdir, [(kind, "microticks"), (kind, "reference"), *extra],
                                                  clients, seconds)
            if single:
                stdlib[clients] = single[0]
            rows.append({"server": kind, "clients": clients, "microticks_rps": mine["rps"], "reference_rps": ref["rps"],
                         "ratio": round(mine["rps"] / ref["rps"], 3), "p50_ms": mine["p50_ms"], "p99_ms": mine["p99_ms"],
                         "ref_p99_ms": ref["p99_ms"], "errors": mine["errors"], "ref_errors": ref["errors"],
                         "peak_rss_mb": mine["peak_rss_mb"]})
            print_row(rows[-1])
    for clients in (1, 8, 32):
        single = stdlib[clients]
        serve = next(r for r in rows if r["server"] == "serve" and r["clients"] == clients)
        # The servers side by side on the same app (the reference), and
        # Microticks under serve against the reference under this server.
        rows.append({"server": "stdlib single-threaded (reference app)", "clients": clients, "reference_rps": single["rps"],
                     "p50_ms": single["p50_ms"], "p99_ms": single["p99_ms"], "errors": single["errors"],
                     "serve_over_this_same_app": round(serve["reference_rps"] / single["rps"], 3),
                     "microticks_serve_over_this": round(serve["microticks_rps"] / single["rps"], 3)})
        print_row(rows[-1])
    for clients in (1, 8, 32):
        uncached = run_ingest(workdir, "serve-uncached", "microticks", clients, seconds)
        cached = next(r for r in rows if r["server"] == "serve" and r["clients"] == clients)
        rows.append({"server": "serve with no bytecode cache (a directory it cannot write)", "clients": clients,
                     "microticks_rps": uncached["rps"], "p99_ms": uncached["p99_ms"], "errors": uncached["errors"],
                     "peak_rss_mb": uncached["peak_rss_mb"], "cached_peak_rss_mb": cached["peak_rss_mb"]})
        print_row(rows[-1])
    logged, quiet = run_side_by_side(workdir, [dict(kind="serve", app="microticks",
                                                    extra_env={"MICROTICKS_LOG_LEVEL": "INFO"}),
                                               ("serve", "microticks")], 8, seconds)
    rows.append({"server": "serve with the access log (INFO)", "clients": 8, "microticks_rps": logged["rps"],
                 "ratio_to_no_log": round(logged["rps"] / quiet["rps"], 3), "p99_ms": logged["p99_ms"],
                 "errors": logged["errors"]})
    print_row(rows[-1])
    for kind in ("gunicorn", "serve"):
        hello = run_ingest(workdir, kind, "hello", 8, seconds)
        rows.append({"server": f"{kind} (hello world: the HTTP ceiling)", "clients": 8, "reference_rps": hello["rps"],
                     "p99_ms": hello["p99_ms"], "errors": hello["errors"]})
        print_row(rows[-1])
    results["ingest"] = rows


def executemany_rate(workdir, rows, runs=5):
    """SQLite's in-process rate for these rows (6 columns, or 9 with uuid,
    seq and boot): executemany in one transaction, into a new file; the
    median of `runs` runs. Each starts from a quiet disk (os.sync): run
    after a load, the writes still in the page cache slowed it by up to 40%."""
    columns = "session_id, time, action, data, received_at, time_utc" + (", uuid, seq, boot" if len(rows[0]) > 6 else "")
    sql = f"INSERT INTO events ({columns}) VALUES ({', '.join('?' * len(rows[0]))})"
    rates = []
    for run in range(runs):
        path = workdir / f"executemany-{run}.db"
        conn = microticks.connect(str(path))
        os.sync()
        started = time.perf_counter()
        with microticks.write_transaction(conn):
            conn.executemany(sql, rows)
        rates.append(len(rows) / (time.perf_counter() - started))
        conn.close()
        for leftover in workdir.glob(path.name + "*"):
            leftover.unlink()
    return sorted(rates)[len(rates) // 2]


def id_maker(ordered=True):
    """A function making new ids: ordered by time, as the tracker's UUIDv7s
    are, or scattered over the index, as random (version 4) uuids are; at
    the same cost either way (an odd multiplier permutes 64-bit numbers)."""
    numbers = itertools.count(1)
    if ordered:
        prefix = f"{int(time.time()):010x}-alone-"
        return lambda: f"{prefix}{next(numbers):012x}"
    return lambda: f"{next(numbers) * 0x9E3779B97F4A7C15 % 2**64:016x}"


def app_alone_rate(workdir, body, events, seconds, ordered_ids=True):
    """Events/s of the app alone: the same batches handed to the WSGI app
    in this process, one at a time, with no HTTP and no other thread (each
    batch its own commit, as from one client). What one core of Python
    does with them: about the most `serve`, one process, can reach."""
    db = workdir / f"alone-{time.monotonic_ns()}.db"
    token = microticks_db(db)
    app = microticks.make_app(microticks.load_settings(db_path=str(db), api_key="bench-key-0123456789abc", rate_limit=0,
                                                       log_level="WARNING"))
    answers = []
    posted = 0
    first, *parts = body.replace("@TOKEN@", token).split(UUID)
    new_id = id_maker(ordered_ids)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        text = first + "".join([new_id() + part for part in parts])
        raw = text.replace(SENT_AT, microticks.utc_now()).encode()
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/events", "CONTENT_TYPE": "application/json",
                   "CONTENT_LENGTH": str(len(raw)), "wsgi.input": io.BytesIO(raw), "QUERY_STRING": "",
                   "HTTP_X_MICROTICKS_KEY": "bench-key-0123456789abc", "REMOTE_ADDR": "127.0.0.1",
                   "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "wsgi.url_scheme": "http"}
        answer = b"".join(app(environ, lambda status, headers, exc_info=None: answers.append(status)))
        posted += events
    elapsed = time.perf_counter() - started
    for leftover in workdir.glob(db.name + "*"):
        leftover.unlink()
    if set(answers) != {"200 OK"} or b'"duplicate"' in answer:
        raise RuntimeError(f"the app alone answered {set(answers)}: {answer[:200]!r}")
    return posted / elapsed


#: The batches measured: (events, shape). "plain": action, data and ts, the
#: least an event holds; "tracker": as examples/microticks.js sends them,
#: with a uuid (ordered by time), seq and boot, deduplicated by uuid.
BATCHES = ((100, "plain"), (1000, "plain"), (100, "tracker"))


def batch_of(size, shape):
    """(the JSON body with @TOKEN@, @SENT_AT@ and @UUID@s to fill in, the same
    rows for executemany)."""
    events, rows, new_id = [], [], id_maker()
    for i in range(size):
        event = {"token": "@TOKEN@", "action": "click", "data": {"target": "box", "clickX": i, "clickY": 300},
                 "ts": "2017-08-25T17:09:20.438Z"}
        row = (1, event["ts"], "click", json.dumps(event["data"]), microticks.utc_now(), event["ts"])
        if shape == "tracker":
            event.update(uuid=UUID, seq=i + 1, boot="bench-boot")
            row += (None, i + 1, "bench-boot")
        events.append(event)
        rows.append(row)
    rows = rows * max(1, 100_000 // size)
    if shape == "tracker":  # each row its own uuid, as each event has
        rows = [row[:6] + (new_id(),) + row[7:] for row in rows]
    return json.dumps({"events": events, "sent_at": SENT_AT}), rows


def bench_batches(workdir, results, seconds):
    """Batches over HTTP against SQLite's executemany of the same rows. The
    two servers run side by side, and each turn measures the ceiling (from
    a quiet disk), loads each server once and runs the app alone: a ratio
    is taken within a turn, and the median of five turns (or --repeat)
    counts, as the machine's speed drifts. Tracker-shaped batches also go
    to the app alone with random ids: what ids ordered by time save."""
    rows = []
    alone = "app alone (in-process, one thread, no HTTP)"
    alone_random = "app alone, random ids (as uuid4)"
    for size, shape in BATCHES:
        body, same_rows = batch_of(size, shape)
        with contextlib.ExitStack() as stack:
            started = {}
            for kind in ("serve", "gunicorn"):
                db = workdir / f"batch-{size}-{shape}-{kind}.db"
                token = microticks_db(db)
                command, env, cwd = servers(workdir, kind, "microticks", db)
                started[kind] = stack.enter_context(Process(command, env, cwd)), body.replace("@TOKEN@", token)
            alones = {alone: True, **({alone_random: False} if shape == "tracker" else {})}
            turns = {kind: [] for kind in [*started, *alones]}
            for _ in range(max(5, REPEAT)):
                ceiling = executemany_rate(workdir, same_rows, runs=3)
                for kind, (server, server_body) in started.items():
                    run = wrk(server.url + "/events", 8, seconds, server_body, "application/json")
                    turns[kind].append(dict(run, ceiling=ceiling, ratio=run["rps"] * size / ceiling))
                # Last in the turn: the writes it leaves in the page cache slowed
                # the servers' commits after it (the next ceiling starts from os.sync()).
                for kind, ordered in alones.items():
                    rate = app_alone_rate(workdir, body, size, seconds, ordered_ids=ordered)
                    turns[kind].append({"rps": rate / size, "ceiling": ceiling, "ratio": rate / ceiling,
                                        "p99_ms": None, "errors": 0})
            # Eight batches in flight, parsed: more than single events need.
            peak_mb = {"serve": round(peak_rss_mb(started["serve"][0].proc.pid), 1)}
        for kind, runs in turns.items():
            median = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
            rows.append({"server": kind, "batch": size, "events": shape, "clients": 8 if kind in started else 1,
                         "events_per_s": round(median["rps"] * size),
                         "executemany_rows_per_s": round(median["ceiling"]), "ratio": round(median["ratio"], 3),
                         "ratios_of_the_turns": [round(r["ratio"], 3) for r in runs],
                         "p99_ms": median["p99_ms"], "errors": sum(r["errors"] for r in runs),
                         **({"peak_rss_mb": peak_mb[kind]} if kind in peak_mb else {})})
            print_row(rows[-1])
    results["batches"] = rows


def bench_big(workdir, results, seconds):
    db = workdir / "big.db"
    events, sessions, weeks, import_seconds = build_big_database(db)
    results["import"] = {"events": events, "sessions": sessions, "seconds": round(import_seconds, 1),
                         "events_per_s": round(events / import_seconds)}
    print(f"  imported {events:,} events in {sessions:,} sessions ({weeks} weeks) in {import_seconds:.1f} s"
          f" ({events / import_seconds:,.0f} events/s, statistics kept)")
    token = microticks_db(db)
    empty, big = run_side_by_side(workdir, [("serve", "microticks"),
                                            dict(kind="serve", app="microticks", db=db, token=token)], 8, seconds)
    # The load's session ends, as a kiosk's would: the reads below see 50,000
    # closed sessions, not one open session of tens of thousands of events.
    conn = microticks.connect(str(db))
    microticks.stop_session(conn, token, microticks.Timestamp("2017-08-25T17:19:19.438Z", "2017-08-25T17:19:19.438Z"))
    conn.close()
    row = {"clients": 8, "empty_rps": empty["rps"], "million_rps": big["rps"], "ratio": round(big["rps"] / empty["rps"], 3),
           "p99_ms_empty": empty["p99_ms"], "p99_ms_million": big["p99_ms"]}
    print_row(row)
    results["big"] = row
    bench_reads(workdir, results, db=db)


def add_heartbeat_year(db, start, devices=50):
    """A year of 5-minute heartbeats from `devices` kiosks of the big
    database's consumer (about 5 million) from `start` (a UTC datetime),
    each day's stored as the API stores a tracker's queued ones
    (record_heartbeat), and the sessions spread over the kiosks. Returns
    (heartbeats, seconds, bytes the file grew)."""
    conn = microticks.connect(str(db))
    key = microticks.rotate_consumer_key(conn, "bench-import")  # the imported sessions' consumer: its kiosks
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    first = int(start.timestamp() // 60)
    beats, started = 0, time.perf_counter()
    for device in range(devices):
        for day in range(365):
            minutes = range(first + day * 1440 + device % 5, first + (day + 1) * 1440, 5)
            microticks.record_heartbeat(conn, key, f"kiosk-{device:02d}", None, 0, "127.0.0.1", minutes=minutes,
                                        interval=300)
            beats += len(minutes)
    seconds = time.perf_counter() - started
    with conn:
        conn.execute("UPDATE sessions SET device_id = (SELECT min(id) FROM devices) + id % ?", (devices,))
    grown = (conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
             - pages) * conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    return beats, seconds, grown


def bench_heartbeats(workdir, results, seconds):
    """Heartbeats: their ingest over HTTP beside single events' (the same
    server, in turns), what a year of them from 50 kiosks costs on disk, and
    /stats with coverage and holding power on a million events and them,
    beside /stats without."""
    db = workdir / "beats.db"
    token = microticks_db(db)
    key = microticks.create_consumer(microticks.connect(str(db)), "beating")
    beat = json.dumps({"consumer_key": key, "device": "kiosk-1", "interval": 300})
    command, env, cwd = servers(workdir, "serve", "microticks", db)
    rows = []
    with Process(command, env, cwd) as server:
        runs = {"events": [], "heartbeats": []}
        for _ in range(REPEAT):
            runs["events"].append(wrk(server.url + "/events", 8, seconds, form_body(token)))
            runs["heartbeats"].append(wrk(server.url + "/heartbeat", 8, seconds, beat, "application/json"))
        event, heartbeat = (sorted(r, key=lambda x: x["rps"])[len(r) // 2] for r in runs.values())
    rows.append({"ingest": "single requests, 8 clients", "events_rps": event["rps"], "heartbeats_rps": heartbeat["rps"],
                 "ratio": round(heartbeat["rps"] / event["rps"], 3), "target_ratio": 1.0,
                 "errors": event["errors"] + heartbeat["errors"]})
    # The issue's installation: 50 kiosks' year up to today, with its million
    # events and its heartbeats ("everything" is that year).
    big = workdir / "big-beats.db"
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    events, sessions, _, _ = build_big_database(big, year_to=today)
    beats, fill_seconds, grown = add_heartbeat_year(big, today - timedelta(days=365))
    one_day = (today - timedelta(days=180)).date().isoformat()
    rows.append({"stored": f"a year of 5-minute heartbeats from 50 kiosks ({beats:,})", "seconds": round(fill_seconds, 1),
                 "heartbeats_per_s": round(beats / fill_seconds), "bytes": grown,
                 "bytes_per_heartbeat": round(grown / beats, 2), "target_bytes_per_heartbeat": 40})
    serve = [sys.executable, str(HERE / "microticks.py"), "serve", "--db", str(big), "--port", "{port}"]
    with Process(serve, env={**MICROTICKS_ENV, "MICROTICKS_TZ": "Europe/Berlin"}) as server:
        timed_get(server.url + "/stats")  # the kept figures in the page cache, as on a running service
        def best(path, repeat=3):
            return min(timed_get(server.url + path)[1] for _ in range(repeat))
        plain = best("/stats")
        for name, path, target in [
                ("stats with coverage and holding power, everything", "/stats?coverage=1&holding=1", 1.5),
                ("stats with coverage, everything", "/stats?coverage=1", None),
                ("stats with holding power, everything", "/stats?holding=1", None),
                ("stats with coverage and holding power, one day", f"/stats?coverage=1&holding=1&date={one_day}", 0.1),
                ("GET /devices, everything", "/devices", None)]:
            took = best(path)
            rows.append({"read": name, "seconds": round(took, 3), "target_s": target,
                         "ratio_to_stats_alone": round(took / plain, 2)})
        rows.append({"read": "stats alone, everything (the baseline)", "seconds": round(plain, 3)})
    results["heartbeats"] = {"events": events, "sessions": sessions, "heartbeats": beats, "rows": rows}
    for row in rows:
        print_row(row)


def flood_with_bodies(port, connections, body_bytes, key=None, seconds=20):
    """`connections` clients each sending a POST of `body_bytes` at once, as
    fast as the server reads them; returns when all is sent, or after `seconds`."""
    import socket
    head = (f"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + (f"X-Microticks-Key: {key}\r\n" if key else "") + f"Content-Length: {body_bytes}\r\n\r\n").encode()
    request = memoryview(head + b"x" * body_bytes)
    clients = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        clients.append([sock, 0])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(sent < len(request) for _, sent in clients):
        progress = 0
        for client in clients:
            sock, sent = client
            if sent < len(request):
                with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                    n = sock.send(request[sent:sent + 262144])
                    client[1], progress = sent + n, progress + n
        if not progress:
            time.sleep(0.02)
    return clients


def vm_mb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def normal_latencies(port, token, n=200):
    """Seconds each of `n` single-event posts took, one after another."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("POST", "/events", body=form_body(token),
                     headers={"Content-Type": "application/x-www-form-urlencoded", "X-Microticks-Key": "bench-key-0123456789abc"})
        conn.getresponse().read()
        times.append(time.perf_counter() - started)
    conn.close()
    return sorted(times)


def bench_hostile(workdir, results, seconds):
    """A thousand connections sending 1 MiB bodies (without the API key, and
    to a service with none set): serve's peak memory, and how soon after they
    close it is under 80 MB; 64 connections that stall (an Expect: 100-continue head
    and no body; a refused 2 MB body a byte now and then) beside a normal
    client, whose latency is compared with its latency alone."""
    import resource
    import socket
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))  # a thousand sockets each side
    for label, env in (("wrong key", {}), ("no key set", {"MICROTICKS_KEY": ""})):
        command, server_env, cwd = servers(workdir, "serve", "microticks", workdir / f"hostile-{label[0]}.db")
        with Process(command, {**server_env, **env}, cwd) as server:
            at_rest = vm_mb(server.proc.pid, "VmRSS")
            clients = flood_with_bodies(server.port, 1000, 1 << 20, key="wrong" if label == "wrong key" else None)
            for sock, _ in clients:
                sock.close()
            closed = time.monotonic()
            while vm_mb(server.proc.pid, "VmRSS") >= 80 and time.monotonic() - closed < 60:
                time.sleep(0.25)
            settled = time.monotonic() - closed
            peak, after = vm_mb(server.proc.pid, "VmHWM"), vm_mb(server.proc.pid, "VmRSS")
        row = {"attack": f"1,000 x 1 MiB, {label}", "rss_at_rest_mb": round(at_rest, 1), "peak_mb": round(peak, 1),
               "rss_after_mb": round(after, 1), "seconds_to_under_80_mb": round(settled, 1),
               "aim": "under 200 MB, under 80 MB soon after"}
        print_row(row)
        results.setdefault("hostile", {})[label] = row
    db = workdir / "stalls.db"
    command, server_env, cwd = servers(workdir, "serve", "microticks", db)
    token = microticks_db(db)
    stalled = []
    with Process(command, server_env, cwd) as server, contextlib.ExitStack() as closing:
        port = server.port
        alone = normal_latencies(port, token)
        for n in range(64):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            head = (b"POST /events HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.6.%d.%d\r\n" % (n // 256, n % 256)
                    + (b"Expect: 100-continue\r\nContent-Length: 900\r\n\r\n" if n % 2 else
                       b"X-Microticks-Key: bench-key-0123456789abc\r\nContent-Length: 2000000\r\n\r\nx"))
            sock.sendall(head)
            stalled.append(closing.enter_context(sock))
        beside = normal_latencies(port, token)
    row = {"normal_client": "single events, one after another", "alone_p50_ms": round(alone[100] * 1000, 2),
           "alone_p99_ms": round(alone[197] * 1000, 2), "beside_64_stalled_p50_ms": round(beside[100] * 1000, 2),
           "beside_64_stalled_p99_ms": round(beside[197] * 1000, 2),
           "p99_ratio": round(beside[197] / alone[197], 2), "aim": "p99 under 1 s"}
    print_row(row)
    results.setdefault("hostile", {})["stalls"] = row
    bench_key_timing(workdir, results)
    bench_ambiguous_framing(workdir, results)
    bench_expensive_bursts(workdir, results)
    bench_huge_open_session(workdir, results)


def bench_key_timing(workdir, results, n=400):
    """The answers to an API key wrong in its first character and in its
    last (compared by hmac.compare_digest): their medians, and the ratio.
    Each from an address of its own (through a trusted local proxy), so
    that ten wrong keys from one address do not turn into 429s."""
    import http.client
    db = workdir / "keys.db"
    command, server_env, cwd = servers(workdir, "serve", "microticks", db)
    key = server_env["MICROTICKS_KEY"]
    with Process(command, server_env, cwd) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        medians = {}
        for turn in range(2):  # the two kinds in turns, twice: a drift in the machine's speed touches both
            for label, wrong in (("first", "x" + key[1:]), ("last", key[:-1] + "x")):
                times = []
                for i in range(n):
                    started = time.perf_counter()
                    conn.request("GET", "/events", headers={"X-Microticks-Key": wrong,
                                                            "X-Forwarded-For": f"10.{turn}.{i // 256}.{i % 256}"})
                    conn.getresponse().read()
                    times.append(time.perf_counter() - started)
                medians.setdefault(label, []).append(sorted(times)[n // 2])
        conn.close()
    first, last = min(medians["first"]), min(medians["last"])
    row = {"api_key": "wrong in the first / last character, 401", "first_median_us": round(first * 1e6),
           "last_median_us": round(last * 1e6), "last / first": round(last / first, 3),
           "aim": "1.0 within the noise: compared in constant time"}
    print_row(row)
    results.setdefault("hostile", {})["key timing"] = row


AMBIGUOUS_HEADS = [b"Content-Length: 900\r\nContent-Length: 900\r\n\r\n",
                   b"Transfer-Encoding: identity\r\nContent-Length: 900\r\n\r\n",
                   b"Transfer-Encoding: gzip\r\n\r\n"]


def bench_ambiguous_framing(workdir, results):
    """64 connections whose heads announce a body that never comes, by
    ambiguous framing (Content-Length twice, Transfer-Encoding beside it),
    beside a normal client: its latency, against its latency alone."""
    import socket
    db = workdir / "framing.db"
    command, server_env, cwd = servers(workdir, "serve", "microticks", db)
    token = microticks_db(db)
    with Process(command, server_env, cwd) as server, contextlib.ExitStack() as closing:
        alone = normal_latencies(server.port, token)
        for n in range(64):
            sock = closing.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            sock.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\n" + AMBIGUOUS_HEADS[n % len(AMBIGUOUS_HEADS)])
        beside = normal_latencies(server.port, token)
    row = {"normal_client": "beside 64 heads of ambiguous framing and no body",
           "alone_p99_ms": round(alone[197] * 1000, 2), "beside_p50_ms": round(beside[100] * 1000, 2),
           "beside_p99_ms": round(beside[197] * 1000, 2), "p99_ratio": round(beside[197] / alone[197], 2),
           "aim": "p99 under 100 ms"}
    print_row(row)
    results.setdefault("hostile", {})["ambiguous framing"] = row


def fill_database(path, sessions, events_per_session):
    """Closed sessions of touches on screens, written by SQL at once (a
    database of a size whose figures take seconds to compute), for the
    first consumer. The tests fill their databases with it too."""
    conn = microticks.connect(path)
    consumer = conn.execute("SELECT min(id) FROM consumers").fetchone()[0]
    with conn:
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                     " INSERT INTO sessions (token, ip, started_at, stopped_at, consumer_id, started_utc, stopped_utc,"
                     " stop_reason) SELECT lower(hex(randomblob(16))), '', t, t, ?, t, t, 'client' FROM"
                     " (SELECT strftime('%Y-%m-%dT%H:%M:%S.000Z', '2017-05-22', '+' || i || ' minutes') AS t FROM n)",
                     (sessions, consumer))
        conn.execute("WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ? - 1)"
                     " INSERT INTO events (session_id, time, time_utc, action, data)"
                     " SELECT s.id, s.started_utc, s.started_utc, 'click', json_object('subject', 's' || (n.i % 7),"
                     " 'clickX', (n.i * 37) % 1000, 'clickY', (n.i * 53) % 700, 'other', 'o' || (n.i % 5))"
                     " FROM sessions s CROSS JOIN n WHERE s.stopped_at IS NOT NULL", (events_per_session,))
    conn.close()


def bench_expensive_bursts(workdir, results, sessions=20_000, events_per_session=25):
    """Bursts of eight expensive requests at once (a new data key, a new
    bin, a comparison of everything with a new data key; their connections
    closed at once), as one keyed client can send them, on a database of
    half a million events, beside a kiosk posting an event and asking
    /health every 50 ms: the kiosk's latency, against its latency alone."""
    import socket
    import threading
    db = workdir / "bursts.db"
    token = microticks_db(db)
    fill_database(str(db), sessions, events_per_session)
    command, server_env, cwd = servers(workdir, "serve", "microticks", db)
    with Process(command, server_env, cwd) as server:
        timed_get(server.url + "/stats")  # the default figures kept, as a running service has them
        alone = normal_latencies(server.port, token)
        stop, beside = threading.Event(), []

        def kiosk():
            while not stop.is_set():
                beside.extend(normal_latencies(server.port, token, n=5))
                beside.append(timed_get(server.url + "/health")[1])
                time.sleep(0.05)

        watcher = threading.Thread(target=kiosk)
        watcher.start()
        started = time.perf_counter()
        for query in ("/stats?data_key=other", "/stats?bin=7", "/compare?a.from=2017-05-22&b.from=2017-06-22"
                                                               "&data_key=other2"):
            for _ in range(8):
                with socket.create_connection(("127.0.0.1", server.port)) as sock:
                    sock.sendall(f"GET {query} HTTP/1.1\r\nHost: x\r\nX-Microticks-Key: bench-key-0123456789abc"
                                 "\r\n\r\n".encode())
            time.sleep(3)
        stop.set()
        watcher.join()
        seconds = time.perf_counter() - started
    beside.sort()
    row = {"kiosk": f"beside 3 bursts of 8 abandoned expensive reads, {sessions * events_per_session:,} events",
           "alone_p99_ms": round(alone[197] * 1000, 2), "beside_p50_ms": round(beside[len(beside) // 2] * 1000, 2),
           "beside_p99_ms": round(beside[int(len(beside) * 0.99)] * 1000, 2), "beside_max_ms":
           round(beside[-1] * 1000, 2), "seconds": round(seconds, 1), "aim": "p99 under 1 s"}
    print_row(row)
    results.setdefault("hostile", {})["expensive bursts"] = row


def bench_huge_open_session(workdir, results, events=200_000):
    """One client posts `events` events into one session, in batches of a
    thousand, while another asks for /stats every half second: the time of
    each /stats, beside /stats before the flood (a few small sessions)."""
    import statistics
    import threading
    db = workdir / "huge.db"
    command, server_env, cwd = servers(workdir, "serve", "microticks", db)
    token = microticks_db(db)
    with Process(command, server_env, cwd) as server:
        before = [timed_get(server.url + "/stats")[1] for _ in range(5)]
        done = threading.Event()

        def flood():
            for first in range(0, events, 1000):
                batch = [{"token": token, "action": "click", "ts": "2017-08-25T17:10:00Z",
                          "data": {"subject": f"s{n % 30}", "clickX": n % 1920, "clickY": n % 1080}}
                         for n in range(first, first + 1000)]
                request = urllib.request.Request(server.url + "/events", json.dumps({"events": batch}).encode(),
                                                 {"Content-Type": "application/json", "X-Microticks-Key": "bench-key-0123456789abc"})
                urllib.request.urlopen(request, timeout=600).read()
            done.set()

        started = time.perf_counter()
        poster = threading.Thread(target=flood)
        poster.start()
        during = []
        while not done.is_set():
            during.append(timed_get(server.url + "/stats")[1])
            time.sleep(0.5)
        poster.join()
        flood_seconds = time.perf_counter() - started
        after = [timed_get(server.url + "/stats")[1] for _ in range(5)]
    row = {"huge_open_session": f"{events:,} events posted in {flood_seconds:.1f} s",
           "stats_before_median_s": round(statistics.median(before), 4), "stats_calls_during": len(during),
           "stats_during_median_s": round(statistics.median(during), 3), "stats_during_max_s": round(max(during), 3),
           "stats_after_median_s": round(statistics.median(after), 4),
           "during_median / before": round(statistics.median(during) / statistics.median(before), 1)}
    print_row(row)
    results.setdefault("hostile", {})["huge open session"] = row


def peak_of(command):
    """Run `command`; returns (seconds, its peak resident memory in MB, exit code)."""
    measure = ("import resource, subprocess, sys, time; started = time.perf_counter();"
               " code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode;"
               " print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")
    seconds, kilobytes, code = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True,
                                              text=True, check=True).stdout.split()
    return float(seconds), int(kilobytes) / 1024, int(code)


def grow_database(db, events_wanted, first_copy):
    """Copy the database's first site (the sessions and events of the big
    database's import) as more sites (museum-NN, each a few minutes later),
    by SQL, until it holds `events_wanted` events (less a copy's tenth):
    a consortium's many sites and kiosks over the same year. Returns the
    next copy's number."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous = OFF")  # a benchmark's scratch file
    session_columns = [row[1] for row in conn.execute("PRAGMA table_info(sessions)")]
    event_columns = [row[1] for row in conn.execute("PRAGMA table_info(events)") if row[1] != "id"]
    base_last = conn.execute("SELECT max(id) FROM sessions WHERE site IS NULL").fetchone()[0]
    copy = first_copy
    shift = "strftime('%Y-%m-%dT%H:%M:%fZ', {0}, '+' || ? || ' minutes')"
    new_values = {"id": "id + ?", "token": "lower(hex(randomblob(16)))", "uuid": "NULL", "site": "?",
                  **{c: shift.format(c) for c in ("started_at", "stopped_at", "received_at", "started_utc",
                                                  "stopped_utc", "stop_received_at")}}
    event_values = {"session_id": "session_id + ?", "uuid": "NULL",
                    **{c: shift.format(c) for c in ("time", "received_at", "time_utc")}}
    copy_events = conn.execute("SELECT count(*) FROM events e JOIN sessions s ON s.id = e.session_id"
                               " WHERE s.site IS NULL").fetchone()[0]
    while conn.execute("SELECT count(*) FROM events").fetchone()[0] < events_wanted - copy_events // 10:
        offset, minutes = conn.execute("SELECT max(id) FROM sessions").fetchone()[0], 7 * copy % 240
        params = {"id": offset, "site": f"museum-{copy:02d}"}
        with conn:
            values = [new_values.get(c, c) for c in session_columns]
            conn.execute(f"INSERT INTO sessions ({', '.join(session_columns)}) SELECT {', '.join(values)}"
                         f" FROM sessions WHERE id <= ? ORDER BY id",
                         [params.get(c, minutes) for c in session_columns if "?" in new_values.get(c, "")]
                         + [base_last])
            values = [event_values.get(c, c) for c in event_columns]
            conn.execute(f"INSERT INTO events ({', '.join(event_columns)}) SELECT {', '.join(values)}"
                         f" FROM events WHERE session_id <= ? ORDER BY id",
                         [offset if c == "session_id" else minutes for c in event_columns
                          if "?" in event_values.get(c, "")]
                         + [base_last])
        copy += 1
    conn.close()
    conn = microticks.connect(str(db))  # their figures kept, as an import of theirs would keep them
    microticks.keep_stats(conn)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return copy


def scale_sizes(text):
    """--scale-sizes: millions of events, comma-separated, growing."""
    sizes = sorted(int(float(part) * 1_000_000) for part in text.split(","))
    if not sizes or sizes[0] <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: millions of events, like 1,5,20")
    return sizes


#: The database sizes --only scale grows through (events); --scale-sizes sets them.
SCALE_SIZES = [1_000_000, 5_000_000, 20_000_000]


def bench_scale(workdir, results, seconds):
    """The cost of each figure as the database grows (SCALE_SIZES): the big
    database's year of the sample week (its import measured), grown by
    copies as more museums' sites; at each size, the disk per event, the
    import of a site's export, /stats over everything (first, then kept)
    and over one day, with the path figures and a funnel, /compare of two
    halves, a page of sessions with their paths, the NDJSON export, the
    dashboard's first request, a research bundle, serve's peak memory, and
    the same figure (events per day and action) by DuckDB over the export.
    Each figure's growth from the size before stands beside the sessions'.
    Everything is written in the benchmark's temporary folder, removed at
    the end, Ctrl+C included."""
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    db = workdir / "scale.db"
    first_size, *_ = SCALE_SIZES
    week = sample_week()  # as many sessions as make the first size's events
    base_sessions = max(1, round(first_size * len({e["session_id"] for e in week}) / len(week)))
    _, _, _, import_seconds = build_big_database(db, sessions=base_sessions, year_to=today)
    site_export = workdir / "site.ndjson"  # one site's export, as a museum sends it to the consortium
    subprocess.run([sys.executable, str(HERE / "microticks.py"), "export", "events", "--format", "ndjson",
                    "--fields", "all", "--limit", "100000", "-o", str(site_export), "--db", str(db)], check=True)
    site_events = sum(1 for _ in site_export.open(encoding="utf-8"))
    screens = [row[0] for row in sqlite3.connect(db).execute(
        "SELECT json_extract(data, '$.subject') AS screen FROM events WHERE screen IS NOT NULL"
        " GROUP BY screen ORDER BY count(*) DESC LIMIT 3")]
    week_ago, day = (today - timedelta(days=6)).date().isoformat(), (today - timedelta(days=100)).date().isoformat()
    rows, copy = [], 1
    for size in SCALE_SIZES:
        copy = grow_database(db, size, copy)
        conn = sqlite3.connect(db)
        events, sessions = (conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("events", "sessions"))
        first_day, last_day = conn.execute("SELECT min(started_utc), max(started_utc) FROM sessions").fetchone()
        conn.close()
        middle = (datetime.fromisoformat(first_day[:10]) + (datetime.fromisoformat(last_day[:10])
                                                            - datetime.fromisoformat(first_day[:10])) / 2).date()
        row = {"events": events, "sessions": sessions, "bytes_per_event": round(db.stat().st_size / events, 1)}
        started = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "microticks.py"), "import", str(site_export), "--db", str(db),
                        "--site", f"export-{size}"], check=True, stdout=subprocess.DEVNULL)
        row["import_events_per_s"] = round(site_events / (time.perf_counter() - started))
        if size == first_size:
            row["import_events_per_s_empty"] = round(events / import_seconds)  # the first import, into nothing
        serve = [sys.executable, str(HERE / "microticks.py"), "serve", "--db", str(db), "--port", "{port}"]
        with Process(serve, env={**MICROTICKS_ENV, "MICROTICKS_TZ": "UTC"}) as server:
            def took(path, repeat=1):
                return round(min(timed_get(server.url + path)[1] for _ in range(repeat)), 3)
            row["stats_first_s"] = took("/stats")  # each session's figures computed and kept
            row["stats_s"] = took("/stats", 2)
            row["stats_one_day_s"] = took(f"/stats?date={day}", 3)
            row["stats_paths_funnel_s"] = took(f"/stats?paths=3&funnel={','.join(screens)}")
            row["compare_halves_s"] = took(f"/compare?a.to={middle}T00:00Z&b.from={middle}T00:00Z")
            row["sessions_page_with_paths_s"] = took("/sessions?limit=1000&sort.desc=id&fields=id,started_utc,path", 3)
            row["dashboard_first_request_s"] = took(f"/stats?from={week_ago}&to={today.date()}&data_key=&touches=navigating")
            export = workdir / "scale.ndjson"
            started = time.perf_counter()
            request = urllib.request.Request(server.url + "/events?format=ndjson&fields=all",
                                             headers={"X-Microticks-Key": MICROTICKS_ENV["MICROTICKS_KEY"]})
            with urllib.request.urlopen(request, timeout=3600) as reply, export.open("wb") as out:
                shutil.copyfileobj(reply, out, 1 << 20)
            row["ndjson_export_rows_per_s"] = round(events / (time.perf_counter() - started))
            row["serve_peak_mb"] = round(peak_rss_mb(server.proc.pid), 1)
        bundle = workdir / "scale-bundle"
        started = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "microticks.py"), "export", "--bundle", str(bundle), "--db", str(db)],
                       check=True, stdout=subprocess.DEVNULL, env={**os.environ, **MICROTICKS_ENV})
        row["bundle_rows_per_s"] = round(2 * (events + sessions) / (time.perf_counter() - started))
        shutil.rmtree(bundle)
        try:  # the same figure where the README's recipe takes it: DuckDB over the export
            import duckdb
            started = time.perf_counter()
            duckdb.sql(f"SELECT CAST(time_utc AS DATE) AS day, action, count(*) FROM read_json('{export}',"
                       " format = 'newline_delimited') GROUP BY ALL").fetchall()
            row["duckdb_events_per_day_s"] = round(time.perf_counter() - started, 3)
        except ImportError:
            row["duckdb_events_per_day_s"] = None
        export.unlink()
        if rows:
            before = rows[-1]
            row["growth"] = {"sessions": round(sessions / before["sessions"], 2), **{
                name: round(row[name] / before[name], 2) for name in row  # of the times taken
                if name.endswith("_s") and not name.endswith("_per_s") and row.get(name) and before.get(name)}}
        rows.append(row)
        print_row(row)
    results["scale"] = rows


def process_cpu(command, env, body=b"", cwd=None):
    """CPU seconds (user + system) a whole process took, and its output."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(command, env=env, input=body, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, out.stdout


def bench_cgi(workdir, results, seconds, runs=21):
    """A CGI request's CPU as whole processes (as Apache starts them), beside
    `python -c "import bottle"`, the floor of any Bottle app run as CGI:
    GET /health and a single event's POST through microticks.cgi (the
    README's way) with a writable __pycache__, and with the compiled form
    made beforehand where the script cannot write (compileall, then no
    bytecode written); then without any compiled form, and microticks.py
    run as the script itself. The median of `runs`, the cases in turns."""
    import statistics
    folder = workdir / "cgi"
    folder.mkdir()
    for name in ("microticks.py", "microticks.cgi"):
        shutil.copy2(HERE / name, folder / name)
    token = microticks_db(folder / "cgi.db")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
           and not k.startswith("MICROTICKS_")}
    cgi = {**env, "GATEWAY_INTERFACE": "CGI/1.1", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
           "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "SCRIPT_NAME": "/microticks/cgi",
           "MICROTICKS_DB": str(folder / "cgi.db"), "MICROTICKS_KEY": MICROTICKS_ENV["MICROTICKS_KEY"],
           "MICROTICKS_LOG_LEVEL": "WARNING"}
    health = {**cgi, "REQUEST_METHOD": "GET", "PATH_INFO": "/health", "QUERY_STRING": ""}
    body = form_body(token).encode()
    event = {**cgi, "REQUEST_METHOD": "POST", "PATH_INFO": "/events", "QUERY_STRING": "", "CONTENT_LENGTH": str(len(body)),
             "CONTENT_TYPE": "application/x-www-form-urlencoded", "HTTP_X_MICROTICKS_KEY": cgi["MICROTICKS_KEY"]}
    read_only = {"PYTHONDONTWRITEBYTECODE": "1"}  # as Apache's user, who cannot write the folder
    script, module = [sys.executable, str(folder / "microticks.cgi")], [sys.executable, str(folder / "microticks.py")]
    cases = {
        "python -c 'import bottle' (the baseline)": ([sys.executable, "-c", "import bottle"], env, b""),
        "GET /health, microticks.cgi, writable __pycache__": (script, health, b""),
        "POST /events (one event), the same": (script, event, body),
        "GET /health, microticks.cgi, compileall beforehand, nothing written": (script, {**health, **read_only}, b""),
        "POST /events, the same": (script, {**event, **read_only}, body),
    }
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(folder)], check=True)
    times = {name: [] for name in cases}
    for _ in range(runs):
        for name, (command, case_env, case_body) in cases.items():
            took, out = process_cpu(command, case_env, case_body, cwd=folder)
            if b"Status: 200" not in out and "bottle" not in name:
                sys.exit(f"bench: the CGI request failed: {out[:300]!r}")
            times[name].append(took)
    shutil.rmtree(folder / "__pycache__")  # no compiled form at all, and none written: compiled every time
    slow = {"GET /health, microticks.cgi, no compiled form (not the README's way)": (script, {**health, **read_only}),
            "GET /health, microticks.py as the CGI script itself": (module, health)}
    for name, (command, case_env) in slow.items():
        times[name] = [process_cpu(command, case_env, cwd=folder)[0] for _ in range(max(5, runs // 3))]
    floor = statistics.median(times["python -c 'import bottle' (the baseline)"])
    rows = []
    for name, taken in times.items():
        median = statistics.median(taken)
        rows.append({"cgi": name, "cpu_s": round(median, 4), "ratio_to_import_bottle": round(median / floor, 2),
                     "target_ratio": 1.15 if name in cases and "bottle" not in name else None})
    for row in rows:
        print_row(row)
    results["cgi"] = rows


def bench_import(workdir, results, seconds, events=200_000):
    """`import` of a first Microticks' JSON export (one document) and of an
    NDJSON export of `events` events: its rate and peak memory; and of
    files that used to take it all (a 100 MB line, 100,000-deep nesting),
    which it refuses: its peak memory then. Beside them, Python's own
    start with Bottle (the floor)."""
    week = sample_week()
    records = [dict(event, id=n + 1, session_id=event["session_id"] + 1000 * (n // len(week)))
               for n, event in zip(range(events), itertools.cycle(week))]
    document, lines = workdir / "export.json", workdir / "export.ndjson"
    with open(document, "w") as stream:
        stream.write('{"events": [')
        stream.write(", ".join(json.dumps(record) for record in records))
        stream.write(f'], "count": {events}}}')
    with open(lines, "w") as stream:
        stream.writelines(json.dumps(record) + "\n" for record in records)
    long_line, deep = workdir / "long-line.ndjson", workdir / "deep.json"
    with open(long_line, "w") as stream:
        stream.write(json.dumps(records[0]) + "\n" + '{"id": 2, "data": "' + "x" * (100 << 20) + '"}\n')
    deep.write_text('{"events": [' + "[" * 100_000 + "]" * 100_000 + "]}")
    floor = peak_of([sys.executable, "-c", "import bottle"])[1]
    for label, path in (("JSON export", document), ("NDJSON export", lines), ("a 100 MB line", long_line),
                        ("100,000-deep nesting", deep)):
        db = workdir / f"import-{path.stem}.db"
        took, peak, code = peak_of([sys.executable, str(HERE / "microticks.py"), "import", str(path), "--db", str(db)])
        row = {"import": label, "file_mb": round(path.stat().st_size / 1e6, 1), "exit": code,
               "events_per_s": round(events / took) if code == 0 else None, "seconds": round(took, 2),
               "peak_mb": round(peak, 1), "python_with_bottle_mb": round(floor, 1), "aim": "under 100 MB, any input"}
        print_row(row)
        results.setdefault("import", {})[label] = row


def bench_dashboard(workdir, results, seconds):
    """The dashboard of the real week in Chromium (Debian's, driven by
    Playwright): from asking for the page to every card and chart drawn,
    the journeys and a heatmap over a screen image among them; the median
    of five loads, beside the same page's HTML alone."""
    import statistics
    from playwright.sync_api import sync_playwright
    db = workdir / "dashboard-week.db"
    subprocess.run([sys.executable, str(HERE / "microticks.py"), "import", str(SAMPLE), "--db", str(db)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(HERE / "microticks.py"), "screenshot", "main", str(HERE / "examples" / "demo-main.png"),
                    "--db", str(db)], check=True, capture_output=True)
    command, server_env, cwd = servers(workdir, "serve", "microticks", db)
    drawn = ("document.querySelector('[data-figure=\"sessions\"]').textContent === '83'"
             " && document.querySelectorAll('#journeys svg path.band').length > 0"
             " && document.querySelectorAll('#per-day svg rect').length > 0"
             " && document.getElementById('heat-image-note').textContent.includes('image')")
    with Process(command, {**server_env, "MICROTICKS_KEY": ""}, cwd) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        loads, html = [], []
        for _ in range(6):
            # bypass_csp: Playwright's wait evaluates a string, which the page's policy forbids.
            page = browser.new_page(viewport={"width": 1920, "height": 1080}, bypass_csp=True)
            started = time.perf_counter()
            page.goto(f"{server.url}/dash?from=2017-05-22&to=2017-05-29&screen=main")
            html.append(time.perf_counter() - started)
            page.wait_for_function(drawn, timeout=30000)
            loads.append(time.perf_counter() - started)
            page.close()
        browser.close()
    row = {"dashboard": "the real week, 1920 x 1080, every card and chart drawn (the first load left out)",
           "median_s": round(statistics.median(loads[1:]), 3), "max_s": round(max(loads[1:]), 3),
           "page_html_median_s": round(statistics.median(html[1:]), 3), "aim": "under 1 s"}
    print_row(row)
    results["dashboard"] = row


def cpu_times():
    """(stolen, total) CPU time so far, from /proc/stat (zeros elsewhere). On
    a VM, time the hypervisor gave to other guests ("steal") slows every
    figure measured meanwhile, the baselines with the rest."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(n) for n in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])


def print_row(row):
    print("  " + ", ".join(f"{k}={v}" for k, v in row.items() if v is not None), flush=True)


PARTS = {"ingest": bench_ingest, "batches": bench_batches, "big": bench_big, "hostile": bench_hostile,
         "import": bench_import, "dashboard": bench_dashboard, "heartbeats": bench_heartbeats, "cgi": bench_cgi,
         "scale": bench_scale}
#: Parts the whole run leaves out (they take long): --only runs them.
ON_REQUEST = ("scale",)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(PARTS), action="append", help="run only this part (big includes reads)")
    parser.add_argument("--seconds", type=int, default=4, help="length of each load run (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="load runs per figure; the median counts (default: %(default)s)")
    parser.add_argument("--json", default="bench_results.json", help="where to write the figures (default: %(default)s)")
    parser.add_argument("--scale-sizes", type=scale_sizes, default=SCALE_SIZES, metavar="MILLIONS",
                        help="the database sizes of --only scale, in millions of events (default: 1,5,20)")
    args = parser.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    SCALE_SIZES[:] = args.scale_sizes
    results = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), "sqlite": sqlite3.sqlite_version},
               "microticks": microticks.__version__, "when": microticks.utc_now()}
    with tempfile.TemporaryDirectory(prefix="microticks-bench-") as workdir:
        for name in args.only or [part for part in PARTS if part not in ON_REQUEST]:
            print(f"\n== {name}")
            before = cpu_times()
            PARTS[name](Path(workdir), results, args.seconds)
            stolen, total = (now - then for now, then in zip(cpu_times(), before))
            stolen_percent = round(100 * stolen / max(total, 1), 1)
            results.setdefault("cpu_stolen_percent", {})[name] = stolen_percent
            print(f"  CPU time stolen by the hypervisor meanwhile: {stolen_percent:.1f}%"
                  + (" (more than 2-3%: the figures of this part are not representative)"
                     if stolen_percent > 2 else ""))
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
