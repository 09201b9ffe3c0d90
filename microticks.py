#!/usr/bin/env python3
"""Microticks: simple analytics for kiosk and touch-table apps.

A frontend starts a session on the first touch, posts events (an action, a
JSON data object, a client timestamp) and stops the session when nobody has
touched the screen for a while. Everything lands in one SQLite file.

Run it on a kiosk PC (creates the database if missing):

    python microticks.py createconsumer kiosk1   # prints the key the frontend sends
    python microticks.py serve                   # http://127.0.0.1:8080/
    python microticks.py --help                  # every subcommand

Deploy it behind a web server:

    gunicorn -w 4 microticks:application          # any WSGI server
    WSGIScriptAlias /microticks/api /srv/microticks/microticks.py   # mod_wsgi
    AddHandler cgi-script .py                     # the file itself as a CGI script

Environment (a command-line flag wins over its variable; under mod_wsgi and
CGI, Apache's SetEnv works too):

    MICROTICKS_DB            SQLite file (default: microticks.db beside this file)
    MICROTICKS_KEY           API key every request must carry (default: none)
    MICROTICKS_CORS_ORIGINS  origins allowed to call the API, comma-separated
                             (default: *, any origin, file:// pages included)
    MICROTICKS_HOST          address `serve` listens on (default: 127.0.0.1)
    MICROTICKS_PORT          port `serve` listens on (default: 8080)
    MICROTICKS_SERVER        server `serve` runs (default: threads)
    MICROTICKS_THREADS       worker threads of the default server (default: 8)
    MICROTICKS_LOG_LEVEL     DEBUG, INFO, WARNING or ERROR (default: INFO;
                             the first Microticks' FLASK_LOG_LEVEL is read too)
    MICROTICKS_SENTRY_DSN    report errors to Sentry (needs the sentry_sdk package)

Needs Python 3.9 or newer and Bottle 0.13 (`pip install bottle`, or Bottle's
single file bottle.py copied beside this one).
"""

import argparse
import contextlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

# mod_wsgi does not put the script's directory on sys.path; a bottle.py copied
# beside this file (the offline install) must be found there too.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

try:
    import bottle
except ImportError:  # pragma: no cover - exercised by a subprocess test
    sys.exit("microticks: Bottle is missing: run `pip install bottle`, "
             "or copy bottle.py (one file, from https://pypi.org/project/bottle/) "
             "beside microticks.py.")

__version__ = "1.0.0"
__all__ = ["Settings", "load_settings", "make_app", "application", "main",
           "Database", "MicroticksError"]

log = logging.getLogger("microticks")


###############################################################################
# Configuration ###############################################################
###############################################################################

#: The largest request body accepted, in bytes (answered 413 beyond it).
MAX_BODY_BYTES = 1024 * 1024
#: Limits on single fields, in characters (data: in bytes of its JSON text).
MAX_ACTION_CHARS = 100
MAX_TOKEN_CHARS = 64
MAX_TIMESTAMP_CHARS = 64
MAX_DATA_BYTES = 64 * 1024
#: How deeply `data` may nest: a kiosk's click data is two levels deep.
MAX_DATA_DEPTH = 32
#: Rows one page of GET /events or GET /sessions holds.
DEFAULT_PAGE_LIMIT = 1000
MAX_PAGE_LIMIT = 10000

# Bottle reads bodies up to MEMFILE_MAX into memory and spills larger ones to a
# temporary file. This is process-wide; we never accept more than this anyway.
bottle.BaseRequest.MEMFILE_MAX = MAX_BODY_BYTES

DEFAULT_DB_PATH = os.path.join(_HERE, "microticks.db")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    """Everything configurable, read once from the environment."""

    #: The SQLite file; relative paths are taken from the working directory.
    db_path: str = DEFAULT_DB_PATH
    #: When set, every request but CORS preflights and /health must carry it.
    api_key: str = ""
    #: Origins allowed by CORS; "*" allows any (kiosk pages load from file://).
    cors_origins: tuple = ("*",)
    host: str = "127.0.0.1"
    port: int = 8080
    server: str = "threads"
    threads: int = 8
    log_level: str = "INFO"
    sentry_dsn: str = ""
    #: Problems found while reading the environment, reported at start-up.
    warnings: tuple = field(default=(), compare=False)


def load_settings(wsgi_environ=None, **overrides):
    """Read the settings from os.environ, then from MICROTICKS_* variables of
    a WSGI environ (Apache's SetEnv reaches the WSGI environ, not os.environ),
    then from `overrides` (command-line flags), the last one winning.
    Overrides that are None are ignored."""
    env = dict(os.environ)
    if wsgi_environ:
        env.update((k, v) for k, v in wsgi_environ.items()
                   if k.startswith("MICROTICKS_") and isinstance(v, str))
    warnings = []

    def integer(name, default):
        text = env.get(name, "").strip()
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            warnings.append(f"{name}={text!r} is not a whole number; using {default}")
            return default

    level = (env.get("MICROTICKS_LOG_LEVEL") or env.get("FLASK_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        warnings.append(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}; using INFO")
        level = "INFO"
    origins = tuple(o.strip() for o in env.get("MICROTICKS_CORS_ORIGINS", "*").split(",") if o.strip())
    settings = Settings(
        db_path=env.get("MICROTICKS_DB") or DEFAULT_DB_PATH,
        api_key=env.get("MICROTICKS_KEY", ""),
        cors_origins=origins or ("*",),
        host=env.get("MICROTICKS_HOST") or "127.0.0.1",
        port=integer("MICROTICKS_PORT", 8080),
        server=env.get("MICROTICKS_SERVER") or "threads",
        threads=max(1, integer("MICROTICKS_THREADS", 8)),
        log_level=level,
        sentry_dsn=env.get("MICROTICKS_SENTRY_DSN", ""),
        warnings=tuple(warnings),
    )
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def running_as_cgi():
    """True when a web server started this file as a CGI script."""
    return "GATEWAY_INTERFACE" in os.environ


def configure_logging(settings):
    """Log to stderr (the web server's error log under CGI and mod_wsgi;
    stdout is the response under CGI)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(settings.log_level)
    for warning in settings.warnings:
        log.warning(warning)


def init_sentry(settings):
    """Start Sentry when a DSN is configured; return the module or None."""
    if not settings.sentry_dsn:
        return None
    try:
        import sentry_sdk
    except ImportError:
        log.warning("MICROTICKS_SENTRY_DSN is set but the sentry_sdk package is not "
                    "installed (pip install sentry-sdk): errors are only logged")
        return None
    sentry_sdk.init(dsn=settings.sentry_dsn, release=f"microticks@{__version__}")
    return sentry_sdk


###############################################################################
# Errors ######################################################################
###############################################################################

class MicroticksError(bottle.HTTPError):
    """A refusal a client (or an operator, in the CLI) can act on.

    Raised anywhere below the routes; rendered as JSON
    ``{"error": message, "status": status}`` plus ``"errors": {field: [...]}``
    when individual fields were wrong."""

    def __init__(self, status, message, errors=None, headers=None):
        super().__init__(status, message, **(headers or {}))
        self.message = message
        self.errors = errors or {}


###############################################################################
# Database ####################################################################
###############################################################################

# The first Microticks' tables, exactly as deployed: databases in the field
# have this shape at user_version 0, and the later migrations start from it.
FIRST_GENERATION_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS consumers (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
        key TEXT NOT NULL, ip_filter TEXT, created_at TEXT NOT NULL,
        deleted_at TEXT)""",
    """CREATE TABLE IF NOT EXISTS sessions (
        id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL,
        ip TEXT NOT NULL, started_at TEXT NOT NULL, stopped_at TEXT,
        consumer_id INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, session_id INTEGER NOT NULL,
        time TEXT NOT NULL, action TEXT NOT NULL, data TEXT)""",
]

#: Numbered schema changes; MIGRATIONS[n - 1] brings user_version n-1 to n.
#: Columns are only ever added, so the first Microticks' readers keep working.
MIGRATIONS = [
    ("the first Microticks' schema", FIRST_GENERATION_SCHEMA),
    ("server receive times, UTC times, stop reasons, lookup indexes", [
        # received_at: the server's clock (UTC) when the row arrived.
        # *_utc: the client's time normalised to UTC, sortable as text.
        "ALTER TABLE sessions ADD COLUMN received_at TEXT",
        "ALTER TABLE sessions ADD COLUMN started_utc TEXT",
        "ALTER TABLE sessions ADD COLUMN stopped_utc TEXT",
        "ALTER TABLE sessions ADD COLUMN stop_received_at TEXT",
        "ALTER TABLE sessions ADD COLUMN stop_reason TEXT",
        "ALTER TABLE events ADD COLUMN received_at TEXT",
        "ALTER TABLE events ADD COLUMN time_utc TEXT",
        "UPDATE sessions SET started_utc = mt_utc(started_at), stopped_utc = mt_utc(stopped_at),"
        " stop_reason = CASE WHEN stopped_at IS NOT NULL THEN 'client' END",
        "UPDATE events SET time_utc = mt_utc(time)",
        # Not UNIQUE: a first-generation file could hold a repeated token, and
        # an upgrade must never fail on old data. New tokens are random.
        "CREATE INDEX IF NOT EXISTS sessions_token ON sessions (token)",
        "CREATE INDEX IF NOT EXISTS sessions_started_utc ON sessions (started_utc)",
        "CREATE INDEX IF NOT EXISTS events_session ON events (session_id, id)",
        "CREATE INDEX IF NOT EXISTS events_time_utc ON events (time_utc)",
    ]),
]
SCHEMA_VERSION = len(MIGRATIONS)

#: Seconds a connection waits for another writer before giving up (503).
BUSY_TIMEOUT = 10.0


def utc_now():
    """The server's clock as stored: ISO 8601 in UTC with milliseconds."""
    return format_utc(datetime.now(timezone.utc))


def format_utc(moment):
    """An aware datetime as 'YYYY-MM-DDTHH:MM:SS.mmmZ' (sorts as text)."""
    m = moment.astimezone(timezone.utc)
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
            f".{m.microsecond // 1000:03d}Z")


def _utc_or_none(text):
    """SQL function mt_utc(): a stored client time in UTC, or NULL."""
    if not isinstance(text, str):
        return None
    try:
        return format_utc(parse_timestamp(text))
    except (ValueError, OverflowError):
        return None


def connect(path):
    """Open the database at `path`, creating and upgrading it as needed."""
    if path != ":memory:" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise MicroticksError(503, f"The database's directory does not exist: {os.path.dirname(os.path.abspath(path))}")
    # isolation_level=None: we issue BEGIN ourselves, so that writes can start
    # with BEGIN IMMEDIATE (a deferred BEGIN that upgrades its lock fails at
    # once with "database is locked" when two writers race, whatever the timeout).
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    try:
        # WAL: readers never block the writer, and several processes
        # (gunicorn workers, CGI requests) can share the file.
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged event survives a power cut too, not only a
        # crashed process; a kiosk gets unplugged at closing time. It costs
        # about 3x in raw SQLite speed, far above what HTTP can deliver.
        conn.execute("PRAGMA synchronous=FULL")
        conn.create_function("mt_utc", 1, _utc_or_none, deterministic=True)
        migrate(conn)
    except Exception:
        conn.close()
        raise
    return conn


def schema_version(conn):
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn):
    """Apply the migrations this file has not seen yet, each in its own
    transaction together with its version number, so that an interrupted
    upgrade leaves the file at the last complete version."""
    while schema_version(conn) < SCHEMA_VERSION:
        with write_transaction(conn):
            version = schema_version(conn)  # another process may have been first
            if version >= SCHEMA_VERSION:
                break
            description, statements = MIGRATIONS[version]
            log.info("upgrading the database to version %d: %s", version + 1, description)
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1:d}")


@contextlib.contextmanager
def write_transaction(conn):
    """A transaction that holds the write lock from its first statement."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class Database:
    """One SQLite connection per thread (Bottle under gunicorn --threads,
    mod_wsgi and our own server runs requests on several threads), opened on
    first use so that it is never shared across a fork."""

    def __init__(self, path):
        self.path = path
        self._local = threading.local()

    def connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
        return conn

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def create_consumer(conn, name):
    """Register a frontend; returns its new consumer key."""
    key = secrets.token_hex(16)
    # Local time, as the first Microticks wrote it.
    created_at = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    try:
        with write_transaction(conn):
            conn.execute("INSERT INTO consumers (name, key, created_at) VALUES (?, ?, ?)",
                         (name, key, created_at))
    except sqlite3.IntegrityError:
        raise MicroticksError(409, f"A consumer named {name!r} exists already") from None
    return key


def list_consumers(conn):
    rows = conn.execute(
        "SELECT c.id, c.name, c.created_at, c.deleted_at,"
        " (SELECT count(*) FROM sessions s WHERE s.consumer_id = c.id) AS sessions"
        " FROM consumers c ORDER BY c.id").fetchall()
    return [dict(row) for row in rows]


def revoke_consumer(conn, name):
    """Refuse new sessions from a consumer; its data stays."""
    with write_transaction(conn):
        row = conn.execute("SELECT id, deleted_at FROM consumers WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise MicroticksError(404, f"No consumer named {name!r}")
        if row["deleted_at"] is None:
            conn.execute("UPDATE consumers SET deleted_at = ? WHERE id = ?",
                         (datetime.now().strftime("%Y-%m-%d %H:%M:%S"), row["id"]))


def start_session(conn, consumer_key, ts, ip):
    """Open a session for the consumer owning `consumer_key`; returns its token."""
    token = secrets.token_hex(16)
    with write_transaction(conn):
        consumer = conn.execute("SELECT id, deleted_at FROM consumers WHERE key = ?",
                                (consumer_key,)).fetchone()
        if consumer is None:
            raise MicroticksError(403, "Unknown consumer key: create one with "
                                       "`python microticks.py createconsumer NAME`")
        if consumer["deleted_at"] is not None:
            raise MicroticksError(403, "This consumer key was revoked")
        conn.execute(
            "INSERT INTO sessions (token, ip, started_at, consumer_id, received_at, started_utc)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (token, ip, ts.text, consumer["id"], utc_now(), ts.utc))
    return token


def _open_session(conn, token):
    """The session a token names, refused when unknown."""
    session = conn.execute("SELECT id, stopped_at FROM sessions WHERE token = ?", (token,)).fetchone()
    if session is None:
        raise MicroticksError(404, "Could not find session: start one with POST /sessions")
    return session


def store_event(conn, token, action, data, ts):
    """Store one event of an open session; returns its id."""
    with write_transaction(conn):
        session = _open_session(conn, token)
        if session["stopped_at"] is not None:
            raise MicroticksError(409, "Session was already stopped.")
        cursor = conn.execute(
            "INSERT INTO events (session_id, time, action, data, received_at, time_utc)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (session["id"], ts.text, action, data, utc_now(), ts.utc))
    return cursor.lastrowid


def stop_session(conn, token, ts):
    """Close a session at the client's time. Stopping a stopped session
    changes nothing, so that a client may retry."""
    with write_transaction(conn):
        session = _open_session(conn, token)
        if session["stopped_at"] is not None:
            return False
        conn.execute(
            "UPDATE sessions SET stopped_at = ?, stopped_utc = ?, stop_received_at = ?,"
            " stop_reason = 'client' WHERE id = ?",
            (ts.text, ts.utc, utc_now(), session["id"]))
    return True


def decode_data(text):
    """Stored data as the client meant it: parsed JSON, or the plain string
    that an old frontend sent."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def list_events(conn, limit, offset):
    """A page of events in the first Microticks' shape, and how many match."""
    count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    rows = conn.execute(
        "SELECT id, session_id, time, action, data FROM events ORDER BY id LIMIT ? OFFSET ?",
        (limit, offset))
    events = [{"id": r["id"], "session_id": r["session_id"], "time": r["time"],
               "action": r["action"], "data": decode_data(r["data"])} for r in rows]
    return {"events": events, "count": count}


def list_sessions(conn, limit, offset):
    """A page of sessions, those without any event included, and how many match."""
    count = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
    rows = conn.execute(
        "SELECT s.id, s.consumer_id, c.name AS consumer, s.ip, s.started_at, s.stopped_at,"
        " s.stop_reason, s.received_at,"
        " (SELECT count(*) FROM events e WHERE e.session_id = s.id) AS events,"
        " (SELECT count(*) FROM events e WHERE e.session_id = s.id AND e.action = 'click') AS clicks,"
        " (SELECT e.action FROM events e WHERE e.session_id = s.id ORDER BY e.id DESC LIMIT 1) AS last_action"
        " FROM sessions s LEFT JOIN consumers c ON c.id = s.consumer_id"
        " ORDER BY s.id LIMIT ? OFFSET ?", (limit, offset))
    return {"sessions": [dict(r) for r in rows], "count": count}


def check_writable(conn):
    """Raise unless a write transaction can be started (for /health)."""
    with write_transaction(conn):
        pass


###############################################################################
# Validation ##################################################################
###############################################################################

_ISO_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d{1,9}))?)?"
    r"(Z|[+-]\d\d(?::?\d\d)?)", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True)
class Timestamp:
    """A client time: as sent (stored verbatim) and normalised to UTC."""
    text: str
    utc: str


def parse_timestamp(text):
    """An ISO 8601 date and time with a zone ('Z' or an offset), seconds and
    fractions optional, as an aware datetime; ValueError otherwise."""
    match = _ISO_TIME.fullmatch(text.strip())
    if not match:
        raise ValueError("must be an ISO 8601 time with a zone, "
                         "like 2017-08-25T17:09:19.438Z (from new Date().toISOString())")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if zone.upper() == "Z":
        offset = timedelta(0)
    else:
        digits = zone[1:].replace(":", "")
        offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
        if offset >= timedelta(hours=24):
            raise ValueError("has a zone offset of 24 hours or more")
        if zone[0] == "-":
            offset = -offset
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        return datetime(int(year), int(month), int(day), int(hour), int(minute),
                        int(second or 0), micro, tzinfo=timezone(offset))
    except ValueError:
        raise ValueError(f"is not a real date and time: {text.strip()!r}") from None


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return number


def parse_json(text):
    """Strict JSON (no NaN or Infinity, which other readers refuse), bounded
    in depth; ValueError otherwise."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"nests deeper than {MAX_DATA_DEPTH} levels") from None
    if json_depth(value) > MAX_DATA_DEPTH:
        raise ValueError(f"nests deeper than {MAX_DATA_DEPTH} levels")
    return value


def json_depth(value):
    """How many containers deep a parsed JSON value nests (iteratively)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _text(fields, name, max_chars, required=True):
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise ValueError(f'No "{name}" parameter provided')
        return None
    if not isinstance(value, str):
        raise ValueError(f'"{name}" must be a string')
    if len(value) > max_chars:
        raise ValueError(f'"{name}" is longer than {max_chars} characters')
    return value


def _timestamp(fields, name):
    text = _text(fields, name, MAX_TIMESTAMP_CHARS)
    try:
        return Timestamp(text, format_utc(parse_timestamp(text)))
    except OverflowError:
        raise ValueError(f'"{name}" is out of range') from None
    except ValueError as error:
        raise ValueError(f'"{name}" {error}') from None


def _data(fields, name, from_form):
    """Event data as the JSON text to store (always valid JSON, so SQLite's
    JSON functions can read every new row), or None when absent."""
    value = fields.get(name)
    if value is None:
        return None
    if from_form:
        # Forms carry data as a JSON string; old frontends sometimes sent
        # plain text, which is kept and read back as that string.
        if len(value.encode("utf-8")) > MAX_DATA_BYTES:
            raise ValueError(f'"{name}" is larger than {MAX_DATA_BYTES} bytes')
        try:
            parse_json(value)
            return value
        except ValueError:
            return json.dumps(value, ensure_ascii=False)
    if json_depth(value) > MAX_DATA_DEPTH:
        raise ValueError(f'"{name}" nests deeper than {MAX_DATA_DEPTH} levels')
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode("utf-8")) > MAX_DATA_BYTES:
        raise ValueError(f'"{name}" is larger than {MAX_DATA_BYTES} bytes')
    return text


def _check(fields, checks):
    """Run each field's check; one 400 listing every field that failed."""
    clean, errors = {}, {}
    for name, check in checks.items():
        try:
            clean[name] = check(fields, name)
        except ValueError as error:
            errors[name] = [str(error)]
    if errors:
        raise MicroticksError(400, next(iter(errors.values()))[0], errors)
    return clean


def clean_session_start(fields):
    return _check(fields, {"consumer_key": lambda f, n: _text(f, n, MAX_TOKEN_CHARS * 2),
                           "ts": _timestamp})


def clean_event(fields, from_form):
    return _check(fields, {"token": lambda f, n: _text(f, n, MAX_TOKEN_CHARS),
                           "action": lambda f, n: _text(f, n, MAX_ACTION_CHARS),
                           "data": lambda f, n: _data(f, n, from_form),
                           "ts": _timestamp})


def clean_session_stop(fields):
    return _check(fields, {"token": lambda f, n: _text(f, n, MAX_TOKEN_CHARS),
                           "ts": _timestamp})


def _whole_number(query, name, default, maximum):
    text = query.get(name)
    if text is None or text == "":
        return default
    if not text.isascii() or not text.isdigit() or int(text) > maximum:
        raise ValueError(f'"{name}" must be a whole number from 0 to {maximum}')
    return int(text)


def clean_page(query, allowed=()):
    """limit and offset of a read, refusing parameters the endpoint lacks."""
    known = {"limit", "offset", "key", *allowed}
    unknown = sorted(set(query) - known)
    if unknown:
        raise MicroticksError(400, f"Unknown parameter {unknown[0]!r}; allowed: {', '.join(sorted(known))}",
                              {name: ["unknown parameter"] for name in unknown})
    return _check(query, {
        "limit": lambda q, n: _whole_number(q, n, DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT),
        "offset": lambda q, n: _whole_number(q, n, 0, 2**62),
    })


###############################################################################
# HTTP ########################################################################
###############################################################################

STATUS_MESSAGES = {
    400: "Bad request",
    404: "No such endpoint",
    405: "Method not allowed",
    413: f"Request body too large: at most {MAX_BODY_BYTES} bytes",
    500: "Internal server error: the administrator will find the details in the server's log",
}


def request_fields(request):
    """The fields of a write request, and whether they came from a form.

    Form bodies (what the first frontends' jQuery sent) and JSON objects,
    also sent as text/plain (navigator.sendBeacon cannot set a JSON type)."""
    if "chunked" in request.environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        raise MicroticksError(411, "Send the body with a Content-Length, not chunked")
    try:
        length = int(request.environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise MicroticksError(400, "Content-Length is not a number") from None
    if length > MAX_BODY_BYTES:
        raise MicroticksError(413, STATUS_MESSAGES[413])
    raw = request.body.read(MAX_BODY_BYTES + 1) if length > 0 else b""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MicroticksError(400, "The body is not valid UTF-8") from None
    content_type = request.content_type.split(";")[0].strip().lower()
    if content_type in ("", "application/x-www-form-urlencoded"):
        try:
            pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=100)
        except UnicodeDecodeError:
            raise MicroticksError(400, "The form holds percent-escapes that are not UTF-8") from None
        except ValueError:
            raise MicroticksError(400, "The form has too many fields") from None
        return dict(pairs), True
    if content_type in ("application/json", "text/plain"):
        try:
            value = parse_json(text)
        except ValueError as error:
            raise MicroticksError(400, f"The body is not valid JSON: {error}") from None
        if not isinstance(value, dict):
            raise MicroticksError(400, "The JSON body must be an object of fields")
        return value, False
    raise MicroticksError(415, f"Unsupported Content-Type {content_type!r}: send "
                               "application/x-www-form-urlencoded or application/json")


def supplied_api_key(request):
    """The API key a request carries, as bytes ('' when none): an
    X-Microticks-Key header, Authorization: Bearer, or ?key= (the first
    Microticks' way). Headers, because Apache drops Authorization unless
    told otherwise (WSGIPassAuthorization On / CGIPassAuth On)."""
    supplied = request.get_header("X-Microticks-Key")
    if not supplied:
        scheme, _, credentials = request.get_header("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            supplied = credentials.strip()
    if not supplied:
        supplied = request.query.get("key", "")
    # WSGI strings are latin-1 decoded bytes: encoding back restores them.
    return supplied.encode("latin-1", "replace")


def cors_headers(settings, origin):
    """CORS headers for a request from `origin` (none when not allowed)."""
    if "*" in settings.cors_origins:
        allowed = "*"
    elif origin in settings.cors_origins:
        allowed = origin
    else:
        return {"Vary": "Origin"}
    headers = {
        "Access-Control-Allow-Origin": allowed,
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Authorization, X-Microticks-Key",
        "Access-Control-Max-Age": "86400",
    }
    if allowed != "*":
        headers["Vary"] = "Origin"
    return headers


def make_app(settings):
    """The WSGI application for `settings`."""
    configure_logging(settings)
    sentry = init_sentry(settings)
    db = Database(settings.db_path)
    app = bottle.Bottle()
    request, response = bottle.request, bottle.response
    api_key = settings.api_key.encode("utf-8")

    def common_headers():
        headers = cors_headers(settings, request.get_header("Origin"))
        headers["Cache-Control"] = "no-store"
        return headers

    def set_common_headers():
        for name, value in common_headers().items():
            response.set_header(name, value)

    def render_error(error):
        """Every error, Bottle's own (404, 405, 413...) included, as JSON."""
        set_common_headers()
        response.content_type = "application/json"
        status = error.status_code
        if isinstance(error, MicroticksError):
            message = error.message
        elif status == 404:
            message = f"No such endpoint: {request.method} {request.path}"
        else:
            message = STATUS_MESSAGES.get(status, error.status_line)
        body = {"error": message, "status": status}
        if getattr(error, "errors", None):
            body["errors"] = error.errors
        return json.dumps(body)

    app.default_error_handler = render_error

    def refuse_failures(callback):
        """Plugin: the one place where a failure below a route becomes an
        answer. Database trouble is a 503 the client may retry; anything else
        unexpected is logged (and sent to Sentry) and answered 500."""
        def wrapper(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except sqlite3.Error as error:
                # Not the client's fault, and the operator must hear of it
                # (a full disk, a file that lost its write permission).
                log.error("database error on %s %s: %s", request.method, request.path, error)
                if sentry:
                    sentry.capture_exception(error)
                raise MicroticksError(503, f"The database is unavailable ({error}); try again later",
                                      headers={"Retry-After": "5"}) from None
            except Exception as error:
                log.exception("unexpected error on %s %s", request.method, request.path)
                if sentry:
                    sentry.capture_exception(error)
                raise MicroticksError(500, STATUS_MESSAGES[500]) from None
        return wrapper

    app.install(refuse_failures)

    @app.hook("before_request")
    def preflight_and_authenticate():
        request.environ["microticks.started"] = time.perf_counter()
        if request.method == "OPTIONS":
            # CORS preflights carry no credentials, whatever the path.
            raise bottle.HTTPResponse(status=204, headers=common_headers())
        if not api_key or request.path == "/health":
            return
        if not hmac.compare_digest(supplied_api_key(request), api_key):
            raise MicroticksError(401, "Missing or wrong API key: send it as ?key=, "
                                       "an X-Microticks-Key header or Authorization: Bearer",
                                  headers={"WWW-Authenticate": 'Bearer realm="microticks"'})

    @app.hook("after_request")
    def finish():
        set_common_headers()
        started = request.environ.get("microticks.started", time.perf_counter())
        # The path only: the query string may carry the API key.
        log.info("%s %s %s %d %.1fms", request.environ.get("REMOTE_ADDR", "-"), request.method,
                 request.path, response.status_code, (time.perf_counter() - started) * 1000)

    @app.get("/")
    def index():
        return {"name": "Microticks", "version": __version__, "status": 200,
                "endpoints": ["POST /sessions", "POST /events", "POST /sessions/stop",
                              "GET /events", "GET /sessions", "GET /health"]}

    @app.get("/health")
    def health():
        check_writable(db.connection())
        return {"status": "ok", "version": __version__}

    @app.post("/sessions")
    def post_session():
        fields, _ = request_fields(request)
        clean = clean_session_start(fields)
        # REMOTE_ADDR, not request.remote_addr: that one trusts X-Forwarded-For.
        ip = request.environ.get("REMOTE_ADDR") or "unknown"
        token = start_session(db.connection(), clean["consumer_key"], clean["ts"], ip)
        return {"token": token, "status": 200}

    @app.post("/events")
    def post_event():
        fields, from_form = request_fields(request)
        clean = clean_event(fields, from_form)
        event_id = store_event(db.connection(), clean["token"], clean["action"],
                               clean["data"], clean["ts"])
        return {"event_id": event_id, "status": 200}

    @app.post("/sessions/stop")
    def post_session_stop():
        fields, _ = request_fields(request)
        clean = clean_session_stop(fields)
        stopped = stop_session(db.connection(), clean["token"], clean["ts"])
        return {"stopped": True, "already_stopped": not stopped, "status": 200}

    @app.get("/events")
    def get_events():
        page = clean_page(request.query)
        return dict(list_events(db.connection(), page["limit"], page["offset"]), status=200)

    @app.get("/sessions")
    def get_sessions():
        page = clean_page(request.query)
        return dict(list_sessions(db.connection(), page["limit"], page["offset"]), status=200)

    app.config["microticks.settings"] = settings
    app.config["microticks.db"] = db
    return app


class PooledWSGIServer(WSGIServer):
    """The standard library's WSGI server with a fixed pool of threads: one
    slow kiosk does not block the others, and a pool avoids the cost of a
    thread per request."""

    #: The listen backlog; the stdlib's 5 drops connections under 8 clients.
    request_queue_size = 128
    threads = 8

    def server_activate(self):
        super().server_activate()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="microticks")

    def process_request(self, request, client_address):
        self.pool.submit(self._process_in_pool, request, client_address)

    def _process_in_pool(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def server_close(self):
        super().server_close()
        self.pool.shutdown(wait=False)


class QuietRequestHandler(WSGIRequestHandler):
    #: Seconds a client may stay silent before its thread is freed.
    timeout = 30

    def address_string(self):  # no reverse DNS lookup per request
        return self.client_address[0]

    def log_message(self, format, *args):
        pass  # the app logs each request, without the query string (it may carry the key)


def make_http_server(app, host, port, threads=8):
    """Our default server, bound and ready for serve_forever()."""
    server_class = type("Server", (PooledWSGIServer,), {"threads": threads})
    if ":" in host:
        import socket
        server_class.address_family = socket.AF_INET6
    server = server_class((host, port), QuietRequestHandler)
    server.set_app(app)
    return server


###############################################################################
# Command line ################################################################
###############################################################################

def open_database(settings):
    """The database for an admin command, created and upgraded if needed."""
    return connect(settings.db_path)


def cmd_initdb(args, settings):
    conn = open_database(settings)
    print(f"Database ready: {os.path.abspath(settings.db_path)} (schema version {schema_version(conn)})")


def cmd_createconsumer(args, settings):
    key = create_consumer(open_database(settings), args.name)
    print(f"Consumer key: {key}")
    print("Give this key to the frontend as consumer_key; it is not shown again.", file=sys.stderr)


def cmd_consumers(args, settings):
    consumers = list_consumers(open_database(settings))
    if not consumers:
        print("No consumers yet: python microticks.py createconsumer NAME")
        return
    print(f"{'ID':>4}  {'NAME':<24} {'CREATED':<19}  {'SESSIONS':>8}  STATUS")
    for c in consumers:
        status = f"revoked {c['deleted_at']}" if c["deleted_at"] else "active"
        print(f"{c['id']:>4}  {c['name']:<24} {c['created_at']:<19}  {c['sessions']:>8}  {status}")


def cmd_revokeconsumer(args, settings):
    revoke_consumer(open_database(settings), args.name)
    print(f"Consumer {args.name!r} revoked: its key starts no new sessions; its data stays.")


def cmd_serve(args, settings):
    # Create or upgrade the file now, so that a problem shows at start-up;
    # the app opens its own connections (per thread, after any fork).
    open_database(settings).close()
    app = make_app(settings)
    where = f"http://{settings.host}:{settings.port}/"
    if settings.server == "threads":
        server = make_http_server(app, settings.host, settings.port, settings.threads)
        where = f"http://{settings.host}:{server.server_port}/"
        print(f"Microticks {__version__} listening on {where} "
              f"(database: {os.path.abspath(settings.db_path)}); Ctrl+C stops it", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return
    if settings.server not in bottle.server_names:
        raise MicroticksError(400, f"Unknown server {settings.server!r}; choose threads or one of: "
                                   + ", ".join(sorted(bottle.server_names)))
    print(f"Microticks {__version__} starting {settings.server} on {where} "
          f"(database: {os.path.abspath(settings.db_path)})", flush=True)
    try:
        bottle.run(app, server=settings.server, host=settings.host, port=settings.port, quiet=True)
    except ImportError as error:
        raise MicroticksError(400, f"The {settings.server} server is not installed ({error}): "
                                   f"pip install {settings.server}, or use --server threads") from None


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", help="SQLite database file (default: $MICROTICKS_DB, "
                                     "else microticks.db beside microticks.py)")
    parser = argparse.ArgumentParser(
        prog="microticks.py",
        description="Microticks: simple analytics for kiosk and touch-table apps.",
        epilog="Every flag has an environment variable twin (MICROTICKS_DB, ...); the flag wins.")
    parser.add_argument("--version", action="version", version=f"Microticks {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, func, help):
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    command("initdb", cmd_initdb, "create the database, or upgrade it in place; never deletes data")
    sub = command("createconsumer", cmd_createconsumer, "register a frontend and print its consumer key")
    sub.add_argument("name", help="a name for the frontend, e.g. the kiosk's location")
    command("consumers", cmd_consumers, "list the consumers")
    sub = command("revokeconsumer", cmd_revokeconsumer, "stop a consumer's key from starting sessions")
    sub.add_argument("name", help="the consumer's name")
    sub = command("serve", cmd_serve, "run the HTTP service")
    sub.add_argument("--host", help="address to listen on (default: $MICROTICKS_HOST, else 127.0.0.1;"
                                    " 0.0.0.0 for every network)")
    sub.add_argument("--port", type=int, help="port (default: $MICROTICKS_PORT, else 8080)")
    sub.add_argument("--server", help="threads (the built-in pool; default), or any server Bottle "
                                      "supports and you installed: waitress, gunicorn, cheroot, ...")
    sub.add_argument("--threads", type=int, help="worker threads of the built-in server "
                                                 "(default: $MICROTICKS_THREADS, else 8)")
    return parser


###############################################################################
# Entry points ################################################################
###############################################################################

class DeferredApplication:
    """The WSGI entry point. It builds the app on its first request, because
    under mod_wsgi Apache's SetEnv reaches the request's environ, not
    os.environ, and because gunicorn imports this module before it forks."""

    def __init__(self):
        self._app = None
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = make_app(load_settings(environ))
        return self._app(environ, start_response)


#: For gunicorn (microticks:application), mod_wsgi and any WSGI server.
application = DeferredApplication()


def main(argv=None):
    if argv is None and running_as_cgi():
        # Under CGI, stdout is the response: nothing may print on this path.
        bottle.CGIServer().run(application)
        return 0
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "server", "threads")}
    settings = load_settings(db_path=args.db, **overrides)
    configure_logging(settings)
    try:
        args.func(args, settings)
    except MicroticksError as error:
        print(f"microticks: {error.message}", file=sys.stderr)
        return 1
    except sqlite3.Error as error:
        print(f"microticks: database {os.path.abspath(settings.db_path)}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
