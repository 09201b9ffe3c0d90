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
CGI, Apache's SetEnv works too; each default is in the Settings class below,
and `--help` shows it):

    MICROTICKS_DB            SQLite file (beside this file; installed with pip,
                             in the working directory)
    MICROTICKS_KEY           API key every request must carry
    MICROTICKS_CORS_ORIGINS  origins allowed to call the API, comma-separated
    MICROTICKS_HOST          address `serve` listens on
    MICROTICKS_PORT          port `serve` listens on
    MICROTICKS_SERVER        server `serve` runs: threads (its own), or another
    MICROTICKS_THREADS       worker threads of the default server
    MICROTICKS_CPUS          one: the default server runs on one CPU core, where
                             Python's threads take turns fastest; all: on any
                             (gunicorn -w N is the way to use several)
    MICROTICKS_LOG_LEVEL     DEBUG, INFO, WARNING or ERROR (the first
                             Microticks' FLASK_LOG_LEVEL is read too)
    MICROTICKS_SENTRY_DSN    report errors to Sentry (needs the sentry_sdk package)
    MICROTICKS_TZ            time zone of statistics and date filters, e.g.
                             Europe/Berlin
    MICROTICKS_SESSION_TIMEOUT  seconds without an event before the server
                             closes a session
    MICROTICKS_RATE_LIMIT    requests a second per client address (0: none)
    MICROTICKS_STORE_IP      what is kept of client addresses: truncated (the /24
                             or /48 network), full or none
    MICROTICKS_RETENTION_DAYS  delete sessions older than this (0: never)
    MICROTICKS_SILENT_HOURS  hours after which `status` and /metrics call a
                             consumer or kiosk silent
    MICROTICKS_SITE          this installation's site name, beside sites imported
                             with `import --site`
    MICROTICKS_TRUSTED_PROXIES  addresses or networks of reverse proxies whose
                             header names the client, comma-separated ("": none)
    MICROTICKS_PROXY_HEADER  that header: x-forwarded-for, or forwarded (RFC
                             7239) where the proxy is set up to write it

Needs Python 3.9 or newer and Bottle 0.13 (`pip install bottle`, or Bottle's
single file bottle.py copied beside this one).
"""

# Modules that only some commands, pages or the built-in server need
# (argparse, zoneinfo, html, mmap, queue, concurrent.futures) are imported
# where they are used: under CGI every request starts Python and imports
# this file, and their imports were a third of its cost beyond Bottle's.
import base64
import codecs
import collections
import contextlib
import gc
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pathlib
import re
import secrets
import select
import selectors
import shutil
import socket
import sqlite3
import stat
import struct
import sys
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from functools import lru_cache
from datetime import date, datetime, timedelta, timezone
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import parse_qsl, unquote, urlencode

try:
    import fcntl
except ImportError:  # Windows: writers of several processes meet at SQLite's lock alone
    fcntl = None

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

class LazyPattern:
    """re.compile(*args), compiled on first use: a CGI process imports this
    file for one request, which needs few of its patterns (compiling them
    all was 2 ms of it). A method once used is kept on the instance, so
    later calls cost what the compiled pattern's do."""

    def __init__(self, *args):
        self.args = args

    def __getattr__(self, name):  # only for what is not kept yet
        value = getattr(re.compile(*self.args), name)
        setattr(self, name, value)
        return value


#: The largest request body accepted, in bytes (answered 413 beyond it).
MAX_BODY_BYTES = 1024 * 1024
#: Limits on single fields, in characters (data: in bytes of its JSON text).
MAX_ACTION_CHARS = 100
MAX_TOKEN_CHARS = 64
MAX_TIMESTAMP_CHARS = 64
MAX_DATA_BYTES = 64 * 1024
MAX_DEVICE_CHARS = 100
MAX_CONSUMER_NAME_CHARS = 100
#: How deeply `data` may nest: a kiosk's click data is two levels deep.
MAX_DATA_DEPTH = 32
#: Wrong keys (API or consumer) one client address may send in a minute;
#: beyond them, its wrong keys are answered 429 until the minute is over.
MAX_KEY_FAILURES = 10
#: What MICROTICKS_KEY must have at least (api_key_problem): a right key is
#: never held up by others' wrong ones, so a key must not be guessable.
MIN_API_KEY_CHARS, MIN_API_KEY_DISTINCT = 20, 10
#: Events one batch may hold (answered 413 beyond it, as is a body over 1 MiB).
MAX_BATCH_EVENTS = 1000
#: Sessions one batch may start (a closing page's beacon: see clean_batch_sessions).
MAX_BATCH_SESSIONS = 10
#: Clock offsets below this are network delay, not a wrong clock: not corrected.
MIN_CLOCK_CORRECTION = timedelta(seconds=2)
#: The longest timeout, retention or silence taken: beyond a century, the
#: dates computed from one leave the calendar (the year 1 or 9999).
MAX_AGE = timedelta(days=100 * 365)
#: The data key naming the screen (/stats, session paths) and the heatmaps'
#: bin size in pixels, unless asked otherwise.
DEFAULT_DATA_KEY, DEFAULT_HEATMAP_BIN = "subject", 50
#: A session with this many touches or more is meaningful (/stats' meaningful=).
DEFAULT_MEANINGFUL_TOUCHES = 2
MAX_MEANINGFUL_TOUCHES = 1000
#: The longest annotation, in characters.
MAX_ANNOTATION_CHARS = 1000
#: The largest screen image (PUT /screens/{screen}/image: that route alone
#: takes bodies over MAX_BODY_BYTES), and the longest screen name.
MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_SCREEN_CHARS = 200
#: The most rows a page of GET /events or GET /sessions holds (limit=);
#: without a limit, every row comes, streamed.
MAX_PAGE_LIMIT = 10000

# Bottle reads bodies up to MEMFILE_MAX into memory and spills larger ones to a
# temporary file. This is process-wide; we never accept more than this anyway.
bottle.BaseRequest.MEMFILE_MAX = MAX_BODY_BYTES

#: Installed with pip, this module sits among the environment's packages
#: (and the examples beside it as the package microticks_examples).
INSTALLED = os.path.basename(_HERE) in ("site-packages", "dist-packages")
#: A copied microticks.py keeps its database beside itself, wherever it is
#: started from (Apache runs scripts in /); an installed one in the working
#: directory, never among the environment's packages.
DEFAULT_DB_PATH = "microticks.db" if INSTALLED else os.path.join(_HERE, "microticks.db")
#: The browser tracker and its demo, served at /examples/ when present.
EXAMPLES_DIR = os.path.join(_HERE, "microticks_examples" if INSTALLED else "examples")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: This installation's site name unless MICROTICKS_SITE says otherwise.
DEFAULT_SITE = (socket.gethostname() or "local")[:MAX_CONSUMER_NAME_CHARS]
#: The values of MICROTICKS_CPUS and `serve --cpus`, the default first.
CPUS_CHOICES = ("one", "all")
#: The values of MICROTICKS_STORE_IP, the default first.
STORE_IP_CHOICES = ("truncated", "full", "none")
#: The values of MICROTICKS_PROXY_HEADER, the default first: the header in
#: which trusted proxies name the client.
PROXY_HEADER_CHOICES = ("x-forwarded-for", "forwarded")


class Settings(NamedTuple):
    """Everything configurable, read once from the environment."""

    #: The SQLite file; relative paths are taken from the working directory.
    db_path: str = DEFAULT_DB_PATH
    #: When set, every request but CORS preflights and /health must carry it.
    api_key: str = ""
    #: Origins allowed by CORS; "*" allows any (kiosk pages load from file://).
    cors_origins: tuple = ("*",)
    #: Where `serve` listens: this machine only, unless told otherwise.
    host: str = "127.0.0.1"
    port: int = 8080
    #: "threads": the built-in server (make_http_server); or one Bottle knows.
    server: str = "threads"
    threads: int = 8
    #: "one": the default server keeps to one CPU core; "all": it runs on any.
    cpus: str = CPUS_CHOICES[0]
    log_level: str = "INFO"
    #: Report errors to Sentry too (none: only the log).
    sentry_dsn: str = ""
    #: The zone statistics and date filters are read in ("" = the server's).
    tz: str = ""
    #: Seconds without an event after which the server closes a session.
    session_timeout: int = 1800
    #: Requests a second one client address may make (0: no limit).
    rate_limit: int = 50
    #: What is kept of a client's address: truncated (its network), full or none.
    store_ip: str = STORE_IP_CHOICES[0]
    #: Sessions older than this many days are deleted (0: kept for ever).
    retention_days: int = 0
    #: Hours without a sign of life after which `status` calls a kiosk silent.
    silent_hours: int = 24
    #: Reverse proxies (addresses or networks) trusted to name the client in
    #: X-Forwarded-For or Forwarded; by default one on the same machine.
    trusted_proxies: tuple = ("127.0.0.1", "::1")
    #: The one header those proxies name the client in. X-Forwarded-For:
    #: nginx, Apache and the others append the address they saw to it. A
    #: client's own Forwarded header passes through them unchanged, so it
    #: is read only where a proxy is set up to write it (forwarded).
    proxy_header: str = PROXY_HEADER_CHOICES[0]
    #: This installation's site: the name its own sessions have beside
    #: those imported from other sites (site=, exports).
    site: str = DEFAULT_SITE
    #: Problems found while reading the environment, reported at start-up.
    warnings: tuple = ()


#: Every setting's default, stated once (above): the environment, the
#: command line's help and the module's docstring take them from here.
DEFAULTS = Settings()


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

    def integer(name, default, low=-sys.maxsize, high=sys.maxsize):
        text = env.get(name, "").strip()
        if not text:
            return default
        try:
            number = int(text)
        except ValueError:
            warnings.append(f"{name}={text!r} is not a whole number; using {default}")
            return default
        if not low <= number <= high:
            number = min(max(number, low), high)
            warnings.append(f"{name}={text} is outside {low} to {high}; using {number}")
        return number

    def choice(name, choices):
        value = env.get(name, "").strip().lower() or choices[0]
        if value not in choices:
            warnings.append(f"{name}={value!r} is not one of {', '.join(choices)}; using {choices[0]}")
            return choices[0]
        return value

    level = (env.get("MICROTICKS_LOG_LEVEL") or env.get("FLASK_LOG_LEVEL") or DEFAULTS.log_level).upper()
    if level not in LOG_LEVELS:
        warnings.append(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}; using {DEFAULTS.log_level}")
        level = DEFAULTS.log_level
    origins = tuple(o.strip() for o in env.get("MICROTICKS_CORS_ORIGINS", "").split(",") if o.strip())
    settings = Settings(
        db_path=env.get("MICROTICKS_DB") or DEFAULTS.db_path,
        api_key=env.get("MICROTICKS_KEY", DEFAULTS.api_key),
        cors_origins=origins or DEFAULTS.cors_origins,
        host=env.get("MICROTICKS_HOST") or DEFAULTS.host,
        port=integer("MICROTICKS_PORT", DEFAULTS.port),
        server=env.get("MICROTICKS_SERVER") or DEFAULTS.server,
        threads=integer("MICROTICKS_THREADS", DEFAULTS.threads, 1, 256),
        cpus=choice("MICROTICKS_CPUS", CPUS_CHOICES),
        log_level=level,
        sentry_dsn=env.get("MICROTICKS_SENTRY_DSN", DEFAULTS.sentry_dsn),
        tz=timezone_setting(env.get("MICROTICKS_TZ", DEFAULTS.tz), warnings),
        session_timeout=integer("MICROTICKS_SESSION_TIMEOUT", DEFAULTS.session_timeout, 1,
                                MAX_AGE // timedelta(seconds=1)),
        rate_limit=integer("MICROTICKS_RATE_LIMIT", DEFAULTS.rate_limit, 0, 10**6),
        store_ip=choice("MICROTICKS_STORE_IP", STORE_IP_CHOICES),
        retention_days=integer("MICROTICKS_RETENTION_DAYS", DEFAULTS.retention_days, 0, MAX_AGE.days),
        silent_hours=integer("MICROTICKS_SILENT_HOURS", DEFAULTS.silent_hours, 1, MAX_AGE // timedelta(hours=1)),
        trusted_proxies=proxies_setting(env.get("MICROTICKS_TRUSTED_PROXIES", ",".join(DEFAULTS.trusted_proxies)),
                                        warnings),
        proxy_header=choice("MICROTICKS_PROXY_HEADER", PROXY_HEADER_CHOICES),
        site=site_setting(env.get("MICROTICKS_SITE", ""), warnings),
        warnings=tuple(warnings),
    )
    return settings._replace(**{k: v for k, v in overrides.items() if v is not None})


def api_key_problem(key):
    """What makes MICROTICKS_KEY unfit to guard the service, or None (no key
    set, or a good one). The key is in every kiosk page and anyone may try
    keys (ten a minute per address, from as many addresses as they have):
    only a long random key holds."""
    if not key:
        return None
    if len(key) >= MIN_API_KEY_CHARS and len(set(key)) >= MIN_API_KEY_DISTINCT:
        return None
    return (f"MICROTICKS_KEY is too easy to guess: it needs at least {MIN_API_KEY_CHARS} characters, at least"
            f" {MIN_API_KEY_DISTINCT} of them different. Make one with: python3 -c \"import secrets;"
            " print(secrets.token_urlsafe(24))\"")


def proxies_setting(text, warnings):
    proxies = []
    for entry in (e.strip() for e in text.split(",")):
        try:
            proxies.append(str(ipaddress.ip_network(entry, strict=False)) if "/" in entry else
                           str(ipaddress.ip_address(entry)) if entry else None)
        except ValueError:
            warnings.append(f"MICROTICKS_TRUSTED_PROXIES: {entry!r} is neither an address nor a network; left out")
    return tuple(p for p in proxies if p)


def clean_consumer_name(text):
    """A consumer's name as an operator gives it (it shows in the dashboard,
    exports and /metrics): 1 to MAX_CONSUMER_NAME_CHARS printable characters."""
    name = text.strip()
    if not name or len(name) > MAX_CONSUMER_NAME_CHARS or not name.isprintable():
        raise ValueError(f"{text[:120]!r} is not a name of 1 to {MAX_CONSUMER_NAME_CHARS} printable characters")
    return name


def clean_site_name(text):
    """A site's name (MICROTICKS_SITE, import --site): as a consumer's."""
    try:
        return clean_consumer_name(text)
    except ValueError as error:
        raise ValueError(str(error).replace("is not a name", "is not a site name")) from None


def site_setting(name, warnings):
    if not name.strip():
        return DEFAULT_SITE
    try:
        return clean_site_name(name)
    except ValueError as error:
        warnings.append(f"MICROTICKS_SITE: {error}; using {DEFAULT_SITE!r}")
        return DEFAULT_SITE


@lru_cache(maxsize=65536)
def local_slot(utc_minute, tz_name):
    """SQL function mt_local_slot(): the local weekday (0: Monday) times 24
    plus the local hour, in zone `tz_name`, of a stored UTC time (its first
    16 characters, to the minute, are enough: zones differ by whole
    minutes); None for what is not one."""
    try:
        moment = datetime(int(utc_minute[:4]), int(utc_minute[5:7]), int(utc_minute[8:10]), int(utc_minute[11:13]),
                          int(utc_minute[14:16]), tzinfo=timezone.utc).astimezone(load_timezone(tz_name))
    except (TypeError, ValueError, OverflowError):
        return None
    return moment.weekday() * 24 + moment.hour


@lru_cache(maxsize=32)
def load_timezone(name):
    """The zone called `name` (an IANA name like Europe/Berlin), or the
    server's own zone for ''. ValueError for an unknown name."""
    import zoneinfo  # here: a CGI request that reads no local time does not pay for it (see the imports)
    if name:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}; use a name like Europe/Berlin or UTC") from None
    # The system's zone by name, so that daylight saving time is right.
    link = os.path.realpath("/etc/localtime")
    if "zoneinfo/" in link:
        with contextlib.suppress(zoneinfo.ZoneInfoNotFoundError, ValueError):
            return zoneinfo.ZoneInfo(link.split("zoneinfo/", 1)[1])
    return datetime.now().astimezone().tzinfo


def timezone_setting(name, warnings):
    if not name.strip():  # the server's own: nothing to check
        return ""
    try:
        load_timezone(name.strip())
        return name.strip()
    except ValueError as error:
        warnings.append(f"MICROTICKS_TZ: {error}; using the server's zone")
        return ""


def operator_command():
    """How an operator runs this file's commands, for usage lines and hints:
    `microticks` (the command pip installs) or `python microticks.py`."""
    started_as = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "microticks" if INSTALLED or started_as == "microticks" else "python microticks.py"


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

    def fields(self):
        """As one of a batch's results: error_fields."""
        return error_fields(self.status_code, self.message, self.errors)


class ClientGone(Exception):
    """Work stopped because nobody waits for its answer any more."""


class WrongKey(MicroticksError):
    """A key that matches none (an API or consumer key): what guessing
    gets. Counted per client address; see Service.wrong_key."""


def _compact_json_encoder(ensure_ascii=False, allow_nan=False):
    """A function encoding JSON values as compact text. JSONEncoder.encode
    builds its C encoder anew on every call, half the cost of encoding one
    event's data; this builds it once (json's own C encoder, where the
    Python build has it and takes these arguments)."""
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, allow_nan=allow_nan, separators=(",", ":"))
    try:
        from json.encoder import c_make_encoder, encode_basestring, encode_basestring_ascii
        # markers=None: parsed JSON and our answers hold no cycles to look for.
        make = c_make_encoder(None, encoder.default, encode_basestring_ascii if ensure_ascii else encode_basestring,
                              None, ":", ",", False, False, allow_nan)
        fast = lambda value: "".join(make(value, 0))  # noqa: E731
        if fast({"a": [1, 2.5, None, True, "é"]}) == encoder.encode({"a": [1, 2.5, None, True, "é"]}):
            return fast
    except (ImportError, TypeError):
        pass
    return encoder.encode


#: JSON answers: as json.dumps writes them (ASCII only; NaN written, not refused), without its spaces.
_answer_json = _compact_json_encoder(ensure_ascii=True, allow_nan=True)


STATUS_MESSAGES = {
    400: "Bad request",
    404: "No such endpoint",
    405: "Method not allowed",
    413: f"Request body too large: at most {MAX_BODY_BYTES} bytes",
    500: "Internal server error: the administrator will find the details in the server's log",
}


def error_fields(status, message, errors=None, allowed=None):
    """What every error answer holds, the app's and the built-in server's own
    (a request it cannot parse, or that did not arrive whole): its message,
    its status, what was wrong with each field, if that is known, and for a
    method not allowed (405), the methods that are."""
    fields = {"error": message, "status": status}
    if errors:
        fields["errors"] = errors
    if allowed:
        fields["allowed"] = allowed
    return fields


def error_json(status, message, errors=None, allowed=None):
    """error_fields as the JSON text of an answer."""
    return _answer_json(error_fields(status, message, errors, allowed))


###############################################################################
# Database ####################################################################
###############################################################################

# -- Writer turns and transactions --------------------------------------------

#: Seconds a connection waits for another writer before giving up (503).
BUSY_TIMEOUT = 10.0


class WriterTurns:
    """The writers of one database file, in turns before SQLite's write lock.

    Threads of this process queue on a lock; processes (gunicorn and mod_wsgi
    workers, CGI requests, the command line) on an flock of a file beside the
    database. Left to SQLite's lock alone, a writer that finds it taken sleeps
    1, 2, 5, 10... ms whatever happens meanwhile: among 8 threads that cost
    a third of the throughput and most of the p99 latency, between two
    gunicorn workers a quarter of the throughput. The kernel wakes a process
    waiting for an flock as soon as it is free. The wait is bounded as
    SQLite's is: a writer stopped mid-transaction (Ctrl+Z on an import)
    costs the others "database is locked" (503) after BUSY_TIMEOUT, not a hang."""

    def __init__(self, database_path):
        self.threads = threading.RLock()
        self.database_path = database_path  # None: no file lock (a database in memory, or no flock here)
        self.lock_file = None               # its descriptor once opened; -1 when it cannot be
        self.depth = 0                      # nested turns of the thread holding this one
        #: A thread of ours blocked in flock, at most one: it hands the lock to
        #: whoever waits for it then, or lets it go when they gave up.
        self.handover = threading.Condition()
        self.flock_waiter = None
        self.wanted = self.granted = False

    def acquire(self, deadline=None):
        """Wait for this process's turn, then for the file's, until `deadline`
        (time.monotonic(); by default BUSY_TIMEOUT from now)."""
        # One bound for the whole wait: behind a thread that waits for another
        # process, the threads queued here would otherwise wait a timeout each.
        if deadline is None:
            deadline = time.monotonic() + BUSY_TIMEOUT
        if not self.threads.acquire(blocking=False):
            LOCK_WAITS[0] += 1  # another thread of this process is writing: wait our turn
            if not self.threads.acquire(timeout=max(0, deadline - time.monotonic())):
                raise sqlite3.OperationalError(f"database is locked: waited {BUSY_TIMEOUT:g} s for another writer")
        self.depth += 1
        if self.depth == 1:
            try:
                self._lock_file(deadline)
            except BaseException:
                self.release()
                raise

    def release(self):
        self.depth -= 1
        if self.depth == 0 and self.lock_file is not None and self.lock_file >= 0:
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)
        self.threads.release()

    def _lock_file(self, deadline):
        if self.database_path is None:
            return
        if self.lock_file is None:
            try:
                self.lock_file = _open_lock_file(self.database_path)
            except OSError as error:
                log.warning("cannot open %s-lock (%s): writers of several processes will wait longer",
                            self.database_path, error)
                self.lock_file = -1
        if self.lock_file < 0:
            return
        with self.handover:
            if self.flock_waiter is None:
                try:
                    fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    LOCK_WAITS[0] += 1  # another process is writing
                    self.flock_waiter = threading.Thread(target=self._wait_for_file, daemon=True,
                                                         name="microticks lock file waiter")
                    self.flock_waiter.start()
            self.wanted = True
            granted = self.handover.wait_for(lambda: self.granted, deadline - time.monotonic())
            self.wanted = self.granted = False
        if not granted:
            raise sqlite3.OperationalError(f"database is locked: waited {BUSY_TIMEOUT:g} s for another"
                                           " process's writer")

    def _wait_for_file(self):
        fcntl.flock(self.lock_file, fcntl.LOCK_EX)
        with self.handover:
            self.flock_waiter = None
            if self.wanted:
                self.granted = True
                self.handover.notify()
            else:
                fcntl.flock(self.lock_file, fcntl.LOCK_UN)


def _open_lock_file(database_path):
    """The lock file beside a database, opened read-only (an flock needs no
    more, whoever made the file)."""
    return open_beside_database(database_path, "-lock", os.O_RDONLY)


def open_beside_database(database_path, suffix, flags):
    """A file of ours beside a database. A new one is made as SQLite makes
    its -wal and -shm files: with the database's permissions, whatever the
    umask, and by root with the database's owner, so that the service's
    user can use a file the command line made."""
    try:
        return os.open(database_path + suffix, flags)
    except FileNotFoundError:
        pass
    made = os.open(database_path + suffix, flags | os.O_CREAT, 0o644)
    try:
        database = os.stat(database_path)
        os.fchmod(made, database.st_mode & 0o666)
        if os.geteuid() == 0:
            os.fchown(made, database.st_uid, database.st_gid)
    except OSError:  # not ours to change (another user made it meanwhile), or no database yet
        pass
    return made


#: One WriterTurns per database file and process.
_WRITER_TURNS = {}


#: How often a writer had to wait for another's turn (for /metrics).
LOCK_WAITS = [0]


def _writer_turns(path):
    in_memory = path == ":memory:"
    path = path if in_memory else os.path.abspath(path)
    turns = _WRITER_TURNS.get(path)
    if turns is None:
        turns = _WRITER_TURNS.setdefault(path, WriterTurns(None if in_memory or not fcntl else path))
    return turns


class ReadOnlyDatabase(sqlite3.OperationalError):
    """A write asked of a database this process may only read."""


@contextlib.contextmanager
def write_transaction(conn, deadline=None):
    """A transaction that holds the write lock from its first statement,
    begun in the writers' turn (WriterTurns; waited for until `deadline`)."""
    if conn.read_only:
        raise ReadOnlyDatabase(f"cannot be written: {conn.read_only}")
    turns = conn.writer_turns
    if turns is not None:
        turns.acquire(deadline)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        if turns is not None:
            turns.release()


if hasattr(os, "register_at_fork"):
    # A forked worker takes its own turns: a lock file opened before the fork
    # would be shared with the parent (an flock belongs to the open file), and
    # a thread waiting for it does not exist in the child.
    os.register_at_fork(after_in_child=_WRITER_TURNS.clear)


# -- Schema and migrations ----------------------------------------------------

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

def _forget_kept_figures_trigger(*tables):
    """However a session is deleted (erasure, purge, retention), its kept
    figures in `tables` go with it: a migration that adds a table of them
    makes the trigger anew."""
    deletes = "".join(f" DELETE FROM {table} WHERE session_id = OLD.id;" for table in tables)
    return f"CREATE TRIGGER stats_forget_session AFTER DELETE ON sessions BEGIN{deletes} END"


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
        # Old frontends sometimes sent plain text as data. Stored as a JSON
        # string it reads back the same, and every row is valid JSON, so
        # queries can use SQLite's JSON functions without a guard per row.
        "UPDATE events SET data = json_quote(data) WHERE data IS NOT NULL AND NOT json_valid(data)",
        # Not UNIQUE: a first-generation file could hold a repeated token, and
        # an upgrade must never fail on old data. New tokens are random.
        "CREATE INDEX IF NOT EXISTS sessions_token ON sessions (token)",
        "CREATE INDEX IF NOT EXISTS sessions_started_utc ON sessions (started_utc)",
        "CREATE INDEX IF NOT EXISTS events_session ON events (session_id, id)",
        "CREATE INDEX IF NOT EXISTS events_time_utc ON events (time_utc)",
    ]),
    ("a record of imported files", [
        "CREATE TABLE imports (id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL UNIQUE,"
        " source TEXT NOT NULL, imported_at TEXT NOT NULL, events INTEGER NOT NULL)",
    ]),
    ("client ids for retries, event order, devices", [
        # uuid: chosen by the client, so that a retried request stores nothing twice.
        # seq: the event's number in its session; boot: the page load that sent it.
        "ALTER TABLE events ADD COLUMN uuid TEXT",
        "ALTER TABLE events ADD COLUMN seq INTEGER",
        "ALTER TABLE events ADD COLUMN boot TEXT",
        "CREATE UNIQUE INDEX events_uuid ON events (uuid) WHERE uuid IS NOT NULL",
        "ALTER TABLE sessions ADD COLUMN uuid TEXT",
        "ALTER TABLE sessions ADD COLUMN device_id INTEGER",
        "CREATE UNIQUE INDEX sessions_uuid ON sessions (uuid) WHERE uuid IS NOT NULL",
        # The server closes idle sessions: finding the open ones must not scan.
        "CREATE INDEX sessions_open ON sessions (id) WHERE stopped_at IS NULL",
        "CREATE TABLE devices (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " consumer_id INTEGER NOT NULL, name TEXT NOT NULL, app_version TEXT, ip TEXT,"
        " first_seen_at TEXT NOT NULL, last_seen_at TEXT NOT NULL, last_heartbeat_at TEXT,"
        " queue_depth INTEGER, UNIQUE (consumer_id, name))",
    ]),
    ("consumer keys stored hashed", [
        # A stolen database file must not hand out working keys. The old
        # plaintext keys are hashed in place and keep working.
        "UPDATE consumers SET key = mt_key_hash(key) WHERE key NOT LIKE 'sha256:%'",
        "CREATE UNIQUE INDEX consumers_key ON consumers (key)",
        "CREATE INDEX sessions_consumer ON sessions (consumer_id, id)",
    ]),
    ("per-session figures kept for /stats", [
        # Filled by /stats itself (see compute_stats), so that statistics over
        # a whole database add up a few rows per session instead of reading
        # every event again. Rows for each data key and heatmap bin asked for.
        "CREATE TABLE stats_sessions (session_id INTEGER NOT NULL, data_key TEXT NOT NULL,"
        " bin INTEGER NOT NULL, events INTEGER NOT NULL, last_event_id INTEGER,"
        " PRIMARY KEY (session_id, data_key, bin)) WITHOUT ROWID",
        # Clustered in the order /stats adds them up (no sorting), and indexed
        # by session, to replace or delete a session's rows.
        "CREATE TABLE stats_values (session_id INTEGER NOT NULL, data_key TEXT NOT NULL, bin INTEGER NOT NULL,"
        " value NOT NULL, events INTEGER, clicks INTEGER, page_turns INTEGER, visits INTEGER, first INTEGER,"
        " second INTEGER, third INTEGER, measured INTEGER, spent_min REAL, spent_sum REAL, spent_max REAL,"
        " PRIMARY KEY (data_key, bin, value, session_id)) WITHOUT ROWID",
        "CREATE INDEX stats_values_session ON stats_values (session_id)",
        "CREATE TABLE stats_heat (session_id INTEGER NOT NULL, data_key TEXT NOT NULL, bin INTEGER NOT NULL,"
        " screen NOT NULL, x NOT NULL, y NOT NULL, points INTEGER, max_x, max_y,"
        " PRIMARY KEY (data_key, bin, screen, x, y, session_id)) WITHOUT ROWID",
        "CREATE INDEX stats_heat_session ON stats_heat (session_id)",
        "CREATE TABLE stats_actions (session_id INTEGER NOT NULL, data_key TEXT NOT NULL, bin INTEGER NOT NULL,"
        " action TEXT NOT NULL, events INTEGER, PRIMARY KEY (data_key, bin, action, session_id)) WITHOUT ROWID",
        "CREATE INDEX stats_actions_session ON stats_actions (session_id)",
        # However a session is deleted (erasure, purge, retention), its figures go with it.
        _forget_kept_figures_trigger("stats_sessions", "stats_values", "stats_heat", "stats_actions"),
    ]),
    ("the data keys and bins whose figures /stats keeps", [
        # Each costs about a quarter of the file; see MAX_KEPT_STATS_KINDS.
        "CREATE TABLE stats_kinds (data_key TEXT NOT NULL, bin INTEGER NOT NULL,"
        " PRIMARY KEY (data_key, bin)) WITHOUT ROWID",
        "INSERT INTO stats_kinds SELECT DISTINCT data_key, bin FROM stats_sessions",
    ]),
    ("time on a screen ends where the next screen begins: the kept figures are computed again", [
        # They measured a session's last screen up to its stop, an idle timeout after the last touch.
        "DELETE FROM stats_values", "DELETE FROM stats_heat", "DELETE FROM stats_actions",
        "DELETE FROM stats_sessions",
    ]),
    ("what /stats' path figures add up, kept per session", [
        # A session's visits in order, and its touches per UTC minute: transitions,
        # common paths, funnels and touches per hour add these up instead of
        # reading every event again (over a million events: 4.3 s to 1.1-1.5 s).
        "CREATE TABLE stats_visits (session_id INTEGER NOT NULL, data_key TEXT NOT NULL, bin INTEGER NOT NULL,"
        " visit INTEGER NOT NULL, screen NOT NULL, arrived TEXT, ms INTEGER, touches INTEGER,"
        " PRIMARY KEY (data_key, bin, session_id, visit)) WITHOUT ROWID",
        "CREATE INDEX stats_visits_session ON stats_visits (session_id)",
        "CREATE TABLE stats_touches (session_id INTEGER NOT NULL, data_key TEXT NOT NULL, bin INTEGER NOT NULL,"
        " minute TEXT NOT NULL, touches INTEGER, PRIMARY KEY (data_key, bin, minute, session_id)) WITHOUT ROWID",
        "CREATE INDEX stats_touches_session ON stats_touches (session_id)",
        "DROP TRIGGER stats_forget_session",
        _forget_kept_figures_trigger("stats_sessions", "stats_values", "stats_heat", "stats_actions", "stats_visits",
                                     "stats_touches"),
        # The sessions kept so far have none: all are computed again.
        "DELETE FROM stats_values", "DELETE FROM stats_heat", "DELETE FROM stats_actions",
        "DELETE FROM stats_sessions",
    ]),
    ("annotations, and each session's engagement figures kept for /stats", [
        # What happened at a kiosk ("new ebook shelf", "school holidays"):
        # markers on the time charts, listed in exports. consumer_id NULL: every consumer.
        "CREATE TABLE annotations (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,"
        " time_utc TEXT NOT NULL, text TEXT NOT NULL, consumer_id INTEGER, site TEXT, created_at TEXT NOT NULL)",
        "CREATE INDEX annotations_time_utc ON annotations (time_utc)",
        # Touches, distinct screens and the first touch's milliseconds after the
        # start; its events and their latest time (an open session's duration ends there).
        "CREATE TABLE stats_engagement (session_id INTEGER NOT NULL, data_key TEXT NOT NULL, bin INTEGER NOT NULL,"
        " touches INTEGER, screens INTEGER, first_touch_ms INTEGER, events INTEGER, last_time TEXT,"
        " PRIMARY KEY (data_key, bin, session_id)) WITHOUT ROWID",
        "CREATE INDEX stats_engagement_session ON stats_engagement (session_id)",
        # When a session's figures were kept: a huge open one's are used for a while (OPEN_SESSION_LAG).
        "ALTER TABLE stats_sessions ADD COLUMN kept_at TEXT",
        "DROP TRIGGER stats_forget_session",
        _forget_kept_figures_trigger("stats_sessions", "stats_values", "stats_heat", "stats_actions", "stats_visits",
                                     "stats_touches", "stats_engagement"),
        # The sessions kept so far have none: they are computed again (their
        # other kept rows are replaced then).
        "DELETE FROM stats_sessions",
    ]),
    ("sites: sessions and consumers imported from other Microticks, with their ids there", [
        # site NULL: collected here (the local site, Settings.site). An imported
        # site's sessions and events get ids of their own; source_id is the
        # id they had at their site, which makes importing again idempotent.
        "ALTER TABLE sessions ADD COLUMN site TEXT",
        "ALTER TABLE sessions ADD COLUMN source_id INTEGER",
        "CREATE UNIQUE INDEX sessions_site_source ON sessions (site, source_id) WHERE site IS NOT NULL",
        "CREATE INDEX sessions_site ON sessions (site, id)",
        "ALTER TABLE events ADD COLUMN source_id INTEGER",
        "CREATE UNIQUE INDEX events_source ON events (session_id, source_id) WHERE source_id IS NOT NULL",
        "ALTER TABLE consumers ADD COLUMN site TEXT",
    ]),
    ("imports without a site never take a session or an event id another holds", [
        # An import without --site keeps a session's or event's id where it is
        # free, else gives it a new one; either way source_id is its id in the
        # file, and a later import of the same origin finds it by that.
        "CREATE UNIQUE INDEX sessions_local_source ON sessions (source_id)"
        " WHERE site IS NULL AND source_id IS NOT NULL",
        # What earlier imports brought (their sessions arrived with the
        # import's clock: received_at is its imported_at) is marked so too.
        "UPDATE sessions SET source_id = id WHERE site IS NULL AND source_id IS NULL"
        " AND received_at IN (SELECT imported_at FROM imports)",
        "UPDATE events SET source_id = id WHERE source_id IS NULL AND session_id IN"
        " (SELECT id FROM sessions WHERE site IS NULL AND source_id IS NOT NULL)",
    ]),
    ("screen images, and the navigating touches of the kept heatmaps", [
        # A picture of each screen (a value of the data key), which the
        # heatmaps are drawn over: in the database, so that a backup, a
        # restore and a research bundle carry it.
        "CREATE TABLE screen_images (screen TEXT PRIMARY KEY, type TEXT NOT NULL, width INTEGER NOT NULL,"
        " height INTEGER NOT NULL, image BLOB NOT NULL, updated_at TEXT NOT NULL)",
        # Of a bin's touch points, those that navigated (carry prevSubject):
        # /stats' touches=navigating. The kept figures are computed again.
        "ALTER TABLE stats_heat ADD COLUMN navigating INTEGER",
        "DELETE FROM stats_sessions",
    ]),
    ("heartbeats kept as history, and how long a session's last visit was seen", [
        # Each device's heartbeats, a row an hour (hours since 1970, UTC): a
        # bit for each minute of it in which one came (bit 0: minute 0).
        "CREATE TABLE heartbeat_hours (device_id INTEGER NOT NULL, hour INTEGER NOT NULL, minutes INTEGER NOT NULL,"
        " PRIMARY KEY (device_id, hour)) WITHOUT ROWID",
        # A visit's milliseconds from arriving on its screen to its last touch:
        # the last visit of a session, not measured to a next one, is seen that long
        # (holding power counts it so, censored). The kept figures are computed again.
        "ALTER TABLE stats_visits ADD COLUMN seen_ms INTEGER",
        "DELETE FROM stats_sessions",
    ]),
    ("each kiosk's heartbeat interval; heartbeats found by age", [
        # Seconds between a device's heartbeats, as its tracker last said (NULL: the default).
        "ALTER TABLE devices ADD COLUMN heartbeat_interval INTEGER",
        "CREATE INDEX heartbeat_hours_hour ON heartbeat_hours (hour)",
    ]),
]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn):
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn):
    """Apply the migrations this file has not seen yet, each in its own
    transaction together with its version number, so that an interrupted
    upgrade leaves the file at the last complete version."""
    new = conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None
    if new:
        log.info("creating the database (schema version %d)", SCHEMA_VERSION)
    while schema_version(conn) < SCHEMA_VERSION:
        with write_transaction(conn):
            version = schema_version(conn)  # another process may have been first
            if version >= SCHEMA_VERSION:
                break
            description, statements = MIGRATIONS[version]
            log.log(logging.DEBUG if new else logging.INFO,
                    "upgrading the database to version %d: %s", version + 1, description)
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1:d}")


# -- Times, keys and addresses, as stored -------------------------------------

def utc_now():
    """The server's clock as stored: ISO 8601 in UTC with milliseconds."""
    return format_utc(datetime.now(timezone.utc))


def format_utc(moment):
    """A datetime (aware, or naive in UTC) as 'YYYY-MM-DDTHH:MM:SS.mmmZ' (sorts as text)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    text = moment.isoformat()  # a third faster than isoformat(timespec="milliseconds")
    return (text[:23] if moment.microsecond else text + ".000") + "Z"


def key_hash(key):
    """How a consumer key is stored: its SHA-256, never the key itself."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _utc_or_none(text):
    """SQL function mt_utc(): a stored client time in UTC, or NULL."""
    if not isinstance(text, str):
        return None
    try:
        return utc_text(text)
    except (ValueError, OverflowError):
        return None


_ISO_TIME = LazyPattern(
    r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d{1,9}))?)?"
    r"(Z|[+-]\d\d(?::?\d\d)?)", re.IGNORECASE | re.ASCII)


class Timestamp(NamedTuple):
    """A client time: as sent (stored verbatim) and normalised to UTC."""
    text: str
    utc: str

    def shifted(self, offset):
        """The same client time, its UTC form corrected by a clock offset."""
        if not offset:
            return self
        try:
            return Timestamp(self.text, format_utc(datetime.fromisoformat(self.utc[:-1]) + offset))
        except OverflowError:  # a clock thousands of years off: nothing sensible to correct to
            return self


# What Date.toISOString() sends, which is already the stored UTC form.
_CANONICAL_UTC = LazyPattern(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", re.ASCII)


def utc_text(text):
    """A client time in the stored UTC form; ValueError or OverflowError otherwise."""
    if _CANONICAL_UTC.fullmatch(text):
        try:
            datetime.fromisoformat(text[:-1])  # a real date and time?
            return text
        except ValueError:
            pass  # parse_timestamp words the error
    return format_utc(parse_timestamp(text))


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


def address_allowed(ip, networks):
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n) for n in networks.split(",") if n)


@lru_cache(maxsize=4096)  # a building's kiosks come from a few addresses; parsing one cost 4% of a heartbeat
def kept_address(ip, mode):
    """What is stored of a client address: all of it, its network (/24 for
    IPv4, /48 for IPv6: still tells sites apart, no longer a person), or nothing."""
    if mode == "full":
        return ip
    if mode == "none":
        return ""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    return str(ipaddress.ip_network(f"{address}/{24 if address.version == 4 else 48}", strict=False))


# -- Connections --------------------------------------------------------------


def connect(path, site=None):
    """Open the database at `path`, creating and upgrading it as needed;
    `site` names the sessions collected here (mt_site(), DEFAULT_SITE).

    A file this user may read but not write (a copy on a read-only share, a
    folder the service's user cannot write) is opened for reading only: the
    connection's `read_only` says why, and a write on it raises
    ReadOnlyDatabase at once. A path that cannot work at all (a directory,
    a new file where none may be made) is refused with what is wrong."""
    if path == ":memory:":
        read_only = None
    else:
        read_only = _check_database_path(path)
    if read_only:
        conn = _connect_read_only(os.path.abspath(path))
    else:
        # isolation_level=None: we issue BEGIN ourselves, so that writes can start
        # with BEGIN IMMEDIATE (a deferred BEGIN that upgrades its lock fails at
        # once with "database is locked" when two writers race, whatever the timeout).
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False, factory=_Connection)
        conn.writer_turns = _writer_turns(path)
    conn.read_only = read_only
    conn.row_factory = sqlite3.Row
    try:
        conn.create_function("mt_utc", 1, _utc_or_none, deterministic=True)
        conn.create_function("mt_local_slot", 2, lambda text, zone: local_slot(text[:16], zone)
                             if isinstance(text, str) else None, deterministic=True)
        conn.create_function("mt_key_hash", 1, key_hash, deterministic=True)
        local_site = site or DEFAULT_SITE
        # A session's site: its own, or this installation's for those collected here.
        conn.create_function("mt_site", 1, lambda name: local_site if name is None else name)
        if read_only:
            _refuse_newer_schema(conn, path)
            version = schema_version(conn)
            if version < SCHEMA_VERSION:
                raise MicroticksError(503, f"The database {os.path.abspath(path)} has schema version {version}"
                                           f" and this Microticks needs {SCHEMA_VERSION}, but it cannot be"
                                           f" upgraded: {read_only}. Let it be written once (any command"
                                           " upgrades it), or open a copy where it can be.")
            return conn
        # WAL: readers never block the writer, and several processes
        # (gunicorn workers, CGI requests) can share the file.
        _use_wal(conn)
        if conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None:
            # A new file: purges can then give space back without a full VACUUM.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        # FULL: an acknowledged event survives a power cut too, not only a
        # crashed process; a kiosk gets unplugged at closing time. It costs
        # about 3x in raw SQLite speed, far above what HTTP can deliver.
        conn.execute("PRAGMA synchronous=FULL")
        _refuse_newer_schema(conn, path)
        migrate(conn)
    except sqlite3.OperationalError as error:
        conn.close()
        full = full_disk(path)  # SQLite says "disk I/O error" for some of it
        if full:
            raise MicroticksError(503, f"Cannot open the database {os.path.abspath(path)}: {full}: {error}") from None
        raise
    except Exception:
        conn.close()
        raise
    return conn


def _refuse_newer_schema(conn, path):
    """A file a newer Microticks has upgraded is not written (nor read) by
    this one: its figures and indexes would no longer be kept as that one
    keeps them."""
    version = schema_version(conn)
    if version > SCHEMA_VERSION:
        raise MicroticksError(503, f"The database {os.path.abspath(path)} was upgraded by a newer Microticks"
                                   f" (schema version {version}; this one, {__version__}, knows {SCHEMA_VERSION}"
                                   " at most): run that Microticks, or restore a backup this one made")


def _check_database_path(path):
    """Refuse a database path that cannot work, naming the problem (SQLite
    says "unable to open database file" for each); return why an existing
    file can only be read, or None when it can be written."""
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise MicroticksError(503, f"The database path {full} is a directory: name a file in it,"
                                   f" e.g. {os.path.join(full, 'microticks.db')}")
    if not os.path.isdir(folder):
        raise MicroticksError(503, f"The database's directory does not exist: {folder}")
    if not os.path.exists(full):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise MicroticksError(503, f"Cannot create the database {full}: permission denied"
                                       f" in its directory {folder}")
        return None
    if not os.access(full, os.R_OK):
        raise MicroticksError(503, f"Cannot read the database {full}: permission denied")
    if not os.access(full, os.W_OK):
        return "the file is read-only for this user"
    if not os.access(folder, os.W_OK | os.X_OK) and not all(
            os.access(full + suffix, os.W_OK) for suffix in ("-wal", "-shm")):
        return "its directory cannot be written by this user (SQLite keeps -wal and -shm files there)"
    return None


def _connect_read_only(full):
    """A connection that only reads the file at `full`. Where SQLite cannot
    make the -shm file that reading a WAL file takes (a directory that cannot
    be written), the file is read as it is (immutable): the changes still in
    a -wal file, if one was left behind, are not seen."""
    uri = pathlib.Path(full).as_uri()
    for options in ("mode=ro", "mode=ro&immutable=1"):
        conn = sqlite3.connect(f"{uri}?{options}", uri=True, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False, factory=_Connection)
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
        except sqlite3.OperationalError:
            conn.close()
            if "immutable" in options:
                raise
            continue
        if "immutable" in options and os.path.exists(full + "-wal") and os.path.getsize(full + "-wal"):
            log.warning("%s-wal holds changes that cannot be read without writing its directory: "
                        "they are missing from what is read", full)
        return conn


class _Connection(sqlite3.Connection):
    """A connection that knows its process's turns for its file, and why
    it may only read it (None: it may write)."""

    writer_turns = None
    read_only = None


def _use_wal(conn):
    """Switch the file to WAL (it stays so). The switch needs the file to
    itself and SQLite does not wait for that, so two processes opening a
    first-generation file at once retry here."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        if mode != "wal":  # e.g. a file system without shared memory
            log.warning("the database cannot use WAL (journal mode stays %s): "
                        "concurrent writers will wait longer", mode)
        return


#: Less room than this on the database's disk counts as full (/health, and
#: start-up's message): a batch and its WAL frames take up to about this.
MIN_FREE_BYTES = 2 * MAX_BODY_BYTES


def full_disk(path):
    """What is wrong when the disk holding the database at `path` has almost
    no room left, or None. Starting a write transaction needs no room, and
    the WAL reuses its file, so a write may even work for a while: this
    tells an operator before the kiosks' events are refused."""
    try:
        disk = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except (OSError, AttributeError):  # no statvfs on Windows
        return None
    free = disk.f_bavail * disk.f_frsize
    if free >= MIN_FREE_BYTES:
        return None
    return f"its disk is full ({free:,} bytes free)"


#: SQLite's largest id; AUTOINCREMENT numbers on from the largest given.
MAX_ROW_ID = 2**63 - 1


def write_problem(conn, path):
    """Why the database cannot take writes that a test transaction would
    not show, or None: a full disk, or ids used up (an id near MAX_ROW_ID,
    which an import of an earlier Microticks could bring)."""
    full = full_disk(path)
    if full:
        return full
    largest = conn.execute("SELECT max(seq) FROM sqlite_sequence").fetchone()[0] or 0
    if largest > MAX_ROW_ID - 2**32:
        return (f"its ids are used up (the largest is {largest:,}): no new event or session can be numbered;"
                " export the events and import them into a new database")
    return None


def check_writable(conn, path):
    """Raise unless the database can take writes (for /health)."""
    problem = write_problem(conn, path)
    if problem:
        raise MicroticksError(503, f"The database cannot be written: {problem}", headers={"Retry-After": "60"})
    with write_transaction(conn):
        pass


def shrink_database(conn):
    """Give the space of deleted rows back to the file system."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # incremental
        conn.execute("PRAGMA incremental_vacuum")
    else:
        # Set before the VACUUM that rewrites the file, the mode applies from
        # then on: a file of the first Microticks is rewritten once.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")


# -- Consumers, sessions and ingest -------------------------------------------

def _local_now():
    # Local time, as the first Microticks wrote it.
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def create_consumer(conn, name, allowed_networks=None):
    """Register a frontend; returns its new consumer key (stored hashed:
    it cannot be shown again)."""
    key = secrets.token_hex(16)
    try:
        with write_transaction(conn):
            conn.execute("INSERT INTO consumers (name, key, ip_filter, created_at) VALUES (?, ?, ?, ?)",
                         (name, key_hash(key), allowed_networks or None, _local_now()))
    except sqlite3.IntegrityError:
        raise MicroticksError(409, f"A consumer named {name!r} exists already") from None
    return key


def list_consumers(conn):
    rows = conn.execute(
        f"SELECT c.id, c.name, c.created_at, c.deleted_at, c.ip_filter AS allowed_networks, {_CONSUMER_LAST_EVENT},"
        " (SELECT count(*) FROM sessions s WHERE s.consumer_id = c.id) AS sessions, mt_site(c.site) AS site"
        " FROM consumers c ORDER BY c.id").fetchall()
    return [dict(row) for row in rows]


def _newest_event(column, session):
    """SQL: `column` of the newest event (the last stored) of the session
    whose id is the SQL `session`; NULL without events."""
    return f"(SELECT x.{column} FROM events x WHERE x.session_id = {session} ORDER BY x.id DESC LIMIT 1)"


# When a consumer's newest event arrived: computed when asked (status,
# metrics), not written with every event, which would cost ingest a second write.
_CONSUMER_LAST_EVENT = (f"(SELECT max({_newest_event('received_at', 's.id')}) FROM sessions s"
                        " WHERE s.consumer_id = c.id) AS last_event_at")


def _consumer_named(conn, name):
    row = conn.execute("SELECT id, deleted_at FROM consumers WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise MicroticksError(404, f"No consumer named {name!r}")
    return row


def revoke_consumer(conn, name):
    """Refuse new sessions from a consumer; its data stays."""
    with write_transaction(conn):
        row = _consumer_named(conn, name)
        if row["deleted_at"] is None:
            conn.execute("UPDATE consumers SET deleted_at = ? WHERE id = ?", (_local_now(), row["id"]))


def rotate_consumer_key(conn, name):
    """A new key for a consumer; the old one stops working, the data stays."""
    key = secrets.token_hex(16)
    with write_transaction(conn):
        row = _consumer_named(conn, name)
        conn.execute("UPDATE consumers SET key = ?, deleted_at = NULL WHERE id = ?", (key_hash(key), row["id"]))
    return key


def rename_consumer(conn, name, new_name):
    try:
        with write_transaction(conn):
            row = _consumer_named(conn, name)
            conn.execute("UPDATE consumers SET name = ? WHERE id = ?", (new_name, row["id"]))
    except sqlite3.IntegrityError:
        raise MicroticksError(409, f"A consumer named {new_name!r} exists already") from None


def set_allowed_networks(conn, name, networks):
    """Restrict a consumer to client addresses in `networks` (None: any)."""
    with write_transaction(conn):
        row = _consumer_named(conn, name)
        conn.execute("UPDATE consumers SET ip_filter = ? WHERE id = ?", (networks or None, row["id"]))


def _consumer_for_key(conn, consumer_key, ip):
    """The consumer a key belongs to, refused when unknown, revoked, or
    restricted to networks that `ip` is not in. Looked up by the key's hash:
    the comparison never touches the key itself."""
    consumer = conn.execute("SELECT id, deleted_at, ip_filter FROM consumers WHERE key = ?",
                            (key_hash(consumer_key),)).fetchone()
    if consumer is None:
        raise WrongKey(403, "Unknown consumer key: create one with "
                                   f"`{operator_command()} createconsumer NAME`")
    if consumer["deleted_at"] is not None:
        raise MicroticksError(403, "This consumer key was revoked")
    if consumer["ip_filter"] and not address_allowed(ip, consumer["ip_filter"]):
        raise MicroticksError(403, f"This consumer key is not allowed from {ip}")
    return consumer["id"]


def _record_device(conn, consumer_id, device, app_version, ip, now, queue_depth=None, heartbeat=False, interval=None):
    """Note that a kiosk was seen; returns the device's id (None without a name)."""
    if not device:
        return None
    return conn.execute(
        "INSERT INTO devices (consumer_id, name, app_version, ip, first_seen_at, last_seen_at,"
        " last_heartbeat_at, queue_depth, heartbeat_interval) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (consumer_id, name) DO UPDATE SET"
        " app_version = coalesce(excluded.app_version, app_version), ip = excluded.ip,"
        " last_seen_at = excluded.last_seen_at,"
        " last_heartbeat_at = coalesce(excluded.last_heartbeat_at, last_heartbeat_at),"
        " queue_depth = coalesce(excluded.queue_depth, queue_depth),"
        " heartbeat_interval = coalesce(excluded.heartbeat_interval, heartbeat_interval) RETURNING id",
        (consumer_id, device, app_version, ip, now, now, now if heartbeat else None, queue_depth, interval)
    ).fetchone()[0]


def start_session(conn, consumer_key, ts, ip, uuid=None, device=None, app_version=None, store_ip="truncated"):
    """Open a session for the consumer owning `consumer_key`; returns its
    token and whether it existed already. A session id chosen by the client
    (`uuid`) makes a retried start return the same token. The client's
    address is kept as `store_ip` says (full, truncated or none)."""
    token, now = secrets.token_hex(16), utc_now()
    with write_transaction(conn):
        consumer_id = _consumer_for_key(conn, consumer_key, ip)
        if uuid:
            existing = conn.execute("SELECT token, consumer_id FROM sessions WHERE uuid = ?", (uuid,)).fetchone()
            if existing is not None:
                if existing["consumer_id"] != consumer_id:
                    raise MicroticksError(409, "This session uuid belongs to another consumer")
                return existing["token"], True
        ip = kept_address(ip, store_ip)
        device_id = _record_device(conn, consumer_id, device, app_version, ip, now)
        conn.execute(
            "INSERT INTO sessions (token, ip, started_at, consumer_id, received_at, started_utc, uuid, device_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (token, ip, ts.text, consumer_id, now, ts.utc, uuid, device_id))
    return token, False


def start_sessions(conn, starts, ip, store_ip="truncated"):
    """start_session for each of a batch's starts ({uuid: clean fields}):
    {uuid: its token, or the MicroticksError that refused it}."""
    tokens = {}
    for uuid, start in starts.items():
        try:
            tokens[uuid], _ = start_session(conn, start["consumer_key"], start["ts"], ip, uuid, start["device"],
                                            start["app_version"], store_ip)
        except MicroticksError as error:
            tokens[uuid] = error
    return tokens


#: Seconds between a device's heartbeats when its tracker does not say (the tracker's default).
DEFAULT_HEARTBEAT_INTERVAL = 300


def heartbeat_write(consumer_key, device, app_version, queue_depth, ip, store_ip="truncated", minutes=(),
                    interval=None):
    """A kiosk's sign of life as a write (a function of a connection in a
    write transaction): its consumer key checked, then its device's last
    heartbeat, queue depth and heartbeat interval (seconds) recorded and
    the heartbeats' minutes (minutes since 1970, UTC) kept as history
    (heartbeat_hours). The write returns the device's id, or the
    MicroticksError (a WrongKey...) that refuses the heartbeat, so that a
    refusal never undoes what it is committed with: the HTTP API commits it
    with the events of other requests (CommitGroup), and the key is looked
    up on that group's connection, whose cache is warm (on the request's own
    connection, the lookup reread pages after every commit: a tenth of a
    heartbeat's cost)."""
    kept_ip, hours = kept_address(ip, store_ip), {}
    for minute in minutes:
        hours[minute // 60] = hours.get(minute // 60, 0) | 1 << minute % 60

    def write(writer):
        try:  # the consumer's networks hold the client's address, not what is kept of it
            consumer_id = _consumer_for_key(writer, consumer_key, ip)
        except MicroticksError as refusal:
            return refusal
        device_id = _record_device(writer, consumer_id, device, app_version, kept_ip, utc_now(), queue_depth,
                                   heartbeat=True, interval=interval)
        writer.executemany("INSERT INTO heartbeat_hours (device_id, hour, minutes) VALUES (?, ?, ?)"
                           " ON CONFLICT (device_id, hour) DO UPDATE SET minutes = minutes | excluded.minutes",
                           [(device_id, hour, bits) for hour, bits in hours.items()])
        return device_id
    return write


def record_heartbeat(conn, consumer_key, device, app_version, queue_depth, ip, store_ip="truncated", minutes=(),
                     interval=None):
    """heartbeat_write, written at once; the device's id."""
    with write_transaction(conn):
        device_id = heartbeat_write(consumer_key, device, app_version, queue_depth, ip, store_ip, minutes,
                                    interval)(conn)
    if isinstance(device_id, MicroticksError):
        raise device_id
    return device_id


def _session_for_token(conn, token):
    """The session a token names, refused when unknown."""
    session = conn.execute(
        "SELECT id, stopped_utc, stop_reason,"
        # Stopped for good: by its client (a stop without a reason is an old client's).
        " stopped_at IS NOT NULL AND coalesce(stop_reason, 'client') != 'timeout' AS final"
        " FROM sessions WHERE token = ?", (token,)).fetchone()
    if session is None:
        raise MicroticksError(404, "Could not find session: no session has this token (start one first)")
    return session


#: Rows per INSERT statement: 9 values each, within the 999 parameters old
#: SQLite builds allow. A statement per hundred rows instead of executemany's
#: one per row stores a batch in about two thirds of the time, and Python
#: releases and retakes the GIL once per statement, not once per row.
ROWS_PER_INSERT = 100


@lru_cache(maxsize=8)
def _insert_events_sql(rows):
    # Binding None costs Python's sqlite3 several times what a number does
    # (it looks for an adapter first), and a string costs SQLite a copy: many
    # events leave data, uuid, seq or boot out, and store_events sends the
    # number -1 for them, which validation never lets through (these texts
    # are strings, and -1 equals no string; seq counts from 0), and nullif()
    # stores NULL. 2% of the instructions of a batch, against '' for the texts.
    return ("INSERT INTO events (session_id, time, action, data, received_at, time_utc, uuid, seq, boot)"
            " VALUES " + ", ".join(["(?, ?, ?, nullif(?, -1), ?, ?, nullif(?, -1), nullif(?, -1), nullif(?, -1))"]
                                   * rows))


def _events_with_uuids(conn, uuids):
    """{uuid: event id} of the stored events among `uuids`: one query for a
    batch. A query per event cost a sixth of storing a tracker's batch, and
    a handoff of Python's GIL each."""
    if not uuids:
        return {}
    return dict(conn.execute("SELECT uuid, id FROM events WHERE uuid IN (SELECT value FROM json_each(?))",
                             (json.dumps(uuids),)).fetchall())


def store_events(conn, events, deadline=None, also=()):
    """Store events in one transaction (its turn waited for until
    `deadline`, as write_transaction), with the writes `also` (functions
    of the connection: heartbeats); one result per event, in order:
    {"event_id": N} (plus "duplicate": true when its uuid was stored before)
    or the MicroticksError that refuses it (from validation, or from here):
    the app answers it, alone or as one of a batch's results. A late event
    for a session the server closed for inactivity is stored and moves that
    session's stop; a client's stop is final."""
    results, values, sessions, new_uuids, now = [], [], {}, {}, utc_now()
    stored = 0  # rows in `values`; a stored event's result is its row number until the ids are known
    with write_transaction(conn, deadline):
        stored_uuids = _events_with_uuids(conn, [event["uuid"] for event in events
                                                 if not isinstance(event, MicroticksError) and event["uuid"]])
        for event in events:
            if isinstance(event, MicroticksError):
                results.append(event)
                continue
            uuid, token = event["uuid"], event["token"]
            if uuid:
                if uuid in new_uuids:  # twice in this very request
                    results.append({"duplicate_of": new_uuids[uuid]})
                    continue
                if uuid in stored_uuids:
                    results.append({"event_id": stored_uuids[uuid], "duplicate": True})
                    continue
            session = sessions.get(token)
            if session is None:
                try:
                    session = sessions[token] = dict(_session_for_token(conn, token))
                except MicroticksError as refusal:
                    results.append(refusal)
                    continue
            if session["final"]:
                results.append(MicroticksError(409, "Session was already stopped."))
                continue
            ts = event["ts"]
            if uuid:
                new_uuids[uuid] = stored
            results.append(stored)
            stored += 1
            seq = event["seq"]
            values += (session["id"], ts.text, event["action"], event["data"] or -1, now, ts.utc,
                       uuid or -1, -1 if seq is None else seq, event["boot"] or -1)
            if session["stop_reason"] == "timeout" and ts.utc > session["stopped_utc"]:
                conn.execute("UPDATE sessions SET stopped_at = ?, stopped_utc = ? WHERE id = ?",
                             (ts.text, ts.utc, session["id"]))
                session["stopped_utc"] = ts.utc
        if stored:
            # Inside this transaction nobody else inserts, so AUTOINCREMENT
            # numbers the rows one after another.
            width = len(values) // stored
            for start in range(0, stored, ROWS_PER_INSERT):
                part = values[start * width:(start + ROWS_PER_INSERT) * width]
                inserted = conn.execute(_insert_events_sql(len(part) // width), part)
            first_id = inserted.lastrowid - stored + 1
            for n, result in enumerate(results):
                if type(result) is int:
                    results[n] = {"event_id": first_id + result}
                elif type(result) is dict and "duplicate_of" in result:
                    results[n] = {"event_id": first_id + result["duplicate_of"], "duplicate": True}
        for write in also:
            write(conn)
    return results


def stop_session(conn, token, ts):
    """Close a session at the client's time. Stopping a stopped session
    changes nothing, so that a client may retry; a client's stop replaces
    the server's provisional one."""
    with write_transaction(conn):
        session = _session_for_token(conn, token)
        if session["final"]:
            return False
        conn.execute(
            "UPDATE sessions SET stopped_at = ?, stopped_utc = ?, stop_received_at = ?,"
            " stop_reason = 'client' WHERE id = ?",
            (ts.text, ts.utc, utc_now(), session["id"]))
    return True


# The newest event of a session: its time closes the session; its arrival
# tells how long the session has been idle.
_IDLE_SINCE = (f"coalesce({_newest_event('received_at', 'sessions.id')}, sessions.received_at,"
               f" {_newest_event('time_utc', 'sessions.id')}, sessions.started_utc)")


def close_idle_sessions(conn, timeout):
    """Close the sessions without an event for `timeout` seconds (by the
    server's clock) at their last event's time, reason 'timeout'. Cheap when
    there is nothing to close: one read over the open sessions."""
    if conn.read_only:  # a copy being read: its sessions stay as they were
        return 0
    cutoff = format_utc(datetime.now(timezone.utc) - timedelta(seconds=timeout))
    idle = f"stopped_at IS NULL AND {_IDLE_SINCE} < ?"
    if conn.execute(f"SELECT 1 FROM sessions WHERE {idle} LIMIT 1", (cutoff,)).fetchone() is None:
        return 0
    with write_transaction(conn):
        return conn.execute(
            "UPDATE sessions SET"
            f" stopped_at = coalesce({_newest_event('time', 'sessions.id')}, started_at),"
            f" stopped_utc = coalesce({_newest_event('time_utc', 'sessions.id')}, started_utc),"
            f" stop_received_at = ?, stop_reason = 'timeout' WHERE {idle}", (utc_now(), cutoff)).rowcount


class CommitGroup:
    """Events that arrive together are stored together: while one thread
    commits, the events of other requests gather, and the next of them to
    run commits them all in one transaction, one fsync for all. Under 8
    concurrent kiosks this multiplies what one SQLite file takes in; alone,
    a request commits at once as before."""

    def __init__(self):
        self.condition = threading.Condition()
        self.pending = []
        self.writing = False

    def store(self, connection, events, also=None):
        """store_events for this request's events, committed with others',
        on the connection that connection() returns (called by one writer at
        a time); `also`, another write of the request (a heartbeat's), runs
        in the same transaction."""
        mine = {"events": events, "also": also, "done": False, "results": None, "error": None,
                "deadline": time.monotonic() + BUSY_TIMEOUT}
        with self.condition:
            self.pending.append(mine)
            while self.writing and not mine["done"]:
                self.condition.wait()
            if mine["done"]:
                if mine["error"]:
                    raise mine["error"]
                return mine["results"]
            self.writing = True
            group, self.pending = self.pending, []
        try:
            # Bounded for the one that has waited longest: a request that
            # gathered behind a writer that waited for its turn waits one
            # busy timeout in all, not one more for its own group's turn.
            results = store_events(connection(), [event for request in group for event in request["events"]],
                                   min(request["deadline"] for request in group),
                                   [request["also"] for request in group if request["also"]])
            for request in group:
                request["results"], results = results[:len(request["events"])], results[len(request["events"]):]
        except Exception as error:  # a database error: every request of the group hears of it
            for request in group:
                request["error"] = error
        finally:
            with self.condition:
                self.writing = False
                for request in group:
                    request["done"] = True
                self.condition.notify_all()
        if mine["error"]:
            raise mine["error"]
        return mine["results"]


class Database:
    """One SQLite connection per thread (Bottle under gunicorn --threads,
    mod_wsgi and our own server runs requests on several threads), and one
    the commit group writes events with, each opened on first use in its
    process so that none is shared across a fork."""

    def __init__(self, path, site=None):
        self.path, self.site = path, site
        self._local = threading.local()
        #: The events of concurrent requests, committed together.
        self.commits = CommitGroup()
        self._writer = None  # (pid, connection): never used across a fork

    def store_events(self, events, also=None):
        return self.commits.store(self.writer_connection, events, also)

    def writer_connection(self):
        """The connection the commit group writes events with (one writer at
        a time uses it): its page cache stays warm from commit to commit,
        where each thread's own connection rereads the pages another thread's
        commit changed (half the reads of a batch under 8 clients)."""
        if self._writer is None or self._writer[0] != os.getpid():
            self._writer = (os.getpid(), connect(self.path, self.site))
        return self._writer[1]

    def connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path, self.site)
        return conn


# -- Reads and exports --------------------------------------------------------

def decode_data(text):
    """Stored data as the client meant it: parsed JSON, or the plain string
    that an old frontend sent."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


#: What a read may return and sort by, mapped to SQL. Nothing a client sends
#: reaches SQL as text: names are looked up here, values are bound.
EVENT_COLUMNS = {
    "id": "e.id", "session_id": "e.session_id", "time": "e.time", "action": "e.action",
    "data": "e.data",  # valid JSON text in every row (see the migrations)
    "time_utc": "e.time_utc", "received_at": "e.received_at",
    "ip": "s.ip", "consumer_id": "s.consumer_id", "consumer": "c.name",
    "uuid": "e.uuid", "seq": "e.seq", "boot": "e.boot",
    "site": "mt_site(s.site)", "source_id": "e.source_id",
}
#: The first Microticks' event shape, which analysis scripts read.
EVENT_DEFAULT_FIELDS = ("id", "session_id", "time", "action", "data")


class ReadQuery(NamedTuple):
    """A validated read of events or sessions: filters, order and page."""
    kind: str = "events"
    start_utc: str = None
    end_utc: str = None
    date: tuple = None
    ip: str = None
    consumer_id: int = None
    consumer_name: str = None
    action: str = None
    session_id: int = None
    #: A site's sessions (Settings.site: those collected here).
    site: str = None
    after_id: int = None
    #: Events up to this id only (export --position's snapshot).
    end_id: int = None
    #: (column, descending) pairs, most significant first.
    sort: tuple = (("id", False),)
    #: Rows in the page (None: every row).
    limit: int = None
    offset: int = 0
    format: str = "json"
    fields: tuple = EVENT_DEFAULT_FIELDS
    data_keys: tuple = ()
    #: The data key naming the screen in sessions' path fields.
    data_key: str = DEFAULT_DATA_KEY
    #: Times in these local weekday-hours only (weekday * 24 + hour, in
    #: `tz`; empty: any): weekday= and hours=, of events' times and sessions' starts.
    slots: tuple = ()
    tz: str = ""


EVENT_SORTS = {
    "id": ("e.id",), "session_id": ("e.session_id", "e.id"), "time": ("e.time_utc", "e.id"),
    "time_utc": ("e.time_utc", "e.id"), "received_at": ("e.received_at", "e.id"),
    "action": ("e.action", "e.id"),
    # A session's events in the order the tracker numbered them.
    "seq": ("e.session_id", "e.seq", "e.id"),
}

# A session's latest moment by its client's clock: the latest event time, not
# the newest event's (_newest_event), which a late retry may have sent.
_SESSION_LAST_EVENT = "(SELECT max(x.time_utc) FROM events x WHERE x.session_id = s.id)"
SESSION_COLUMNS = {
    "id": "s.id", "consumer_id": "s.consumer_id", "consumer": "c.name", "ip": "s.ip",
    "started_at": "s.started_at", "stopped_at": "s.stopped_at", "stop_reason": "s.stop_reason",
    "received_at": "s.received_at", "started_utc": "s.started_utc", "stopped_utc": "s.stopped_utc",
    "events": "(SELECT count(*) FROM events x WHERE x.session_id = s.id)",
    "clicks": "(SELECT count(*) FROM events x WHERE x.session_id = s.id AND x.action = 'click')",
    "last_action": "(SELECT x.action FROM events x WHERE x.session_id = s.id ORDER BY x.id DESC LIMIT 1)",
    "last_event_at": _SESSION_LAST_EVENT,
    # Seconds from the start to the stop, or to the last event while open.
    "duration": f"round((julianday(coalesce(s.stopped_utc, {_SESSION_LAST_EVENT}, s.started_utc))"
                " - julianday(s.started_utc)) * 86400, 3)",
    # Numbers the tracker gave (1, 2, 3...) that never arrived: lost events,
    # which no clock reset can hide.
    "missing_events": "(SELECT max(0, max(x.seq) - count(DISTINCT x.seq)) FROM events x"
                      " WHERE x.session_id = s.id AND x.seq IS NOT NULL)",
    "uuid": "s.uuid",
    "device": "(SELECT d.name FROM devices d WHERE d.id = s.device_id)",
    "site": "mt_site(s.site)", "source_id": "s.source_id",
}
SESSION_DEFAULT_FIELDS = tuple(SESSION_COLUMNS)
#: An annotation as listed (GET /annotations, /stats, research bundles).
ANNOTATION_FIELDS = ("id", "time", "time_utc", "text", "consumer_id", "consumer", "site", "created_at")
#: The actions that are a visitor touching the screen (the first Microticks'
#: analysis scripts call them clicks).
TOUCH_ACTIONS = ("click", "swipe")
#: Whether an events row is a touch (its table's name put before it where needed).
_IS_TOUCH = "action IN (" + ", ".join(f"'{action}'" for action in TOUCH_ACTIONS) + ")"


def _visits_sql(events, screen):
    """WITH clauses ending in `visits` (session_id, visit, screen, arrived,
    ms, touches): the visits of the sessions whose events `events` holds (a
    FROM clause naming them e), `screen` being the SQL of an event's screen.
    A visit is a run of a session's events with the same screen, events
    without one aside (VALUES_DEFINITION); `visit` numbers them from 1; `ms`
    is the whole milliseconds to the next visit's arrival (the times' own
    precision: julianday() is a float of days, a few hundredths of a
    millisecond off, which rounding removes), NULL for the last; `seen_ms`
    to its last touch (0 without one)."""
    return (f"valued AS (SELECT e.session_id, e.id, e.seq, e.time_utc, e.action, {screen} AS screen FROM {events}),"
            " marked AS (SELECT *, screen IS NOT lag(screen) OVER (PARTITION BY session_id ORDER BY seq, id)"
            " AS new_visit FROM valued WHERE screen IS NOT NULL),"
            " numbered AS (SELECT *, sum(new_visit) OVER (PARTITION BY session_id ORDER BY seq, id) AS visit"
            " FROM marked),"
            f" grouped AS (SELECT session_id, visit, screen, min(time_utc) AS arrived, sum({_IS_TOUCH}) AS touches,"
            f" max(CASE WHEN {_IS_TOUCH} THEN time_utc END) AS last_touch FROM numbered GROUP BY session_id, visit),"
            " visits AS (SELECT *, CAST(round((julianday(lead(arrived) OVER (PARTITION BY session_id ORDER BY visit))"
            " - julianday(arrived)) * 86400000) AS INTEGER) AS ms,"
            " CAST(round((julianday(coalesce(last_touch, arrived)) - julianday(arrived)) * 86400000) AS INTEGER)"
            " AS seen_ms FROM grouped)")


# The path fields' SQL names the screen's data key (ReadQuery.data_key) by
# these marks; _select binds each as a parameter, in the order they come.
_SCREEN_KEY, _SCREEN_PATH = "{screen_key}", "{screen_path}"
#: An event's screen in a session's path: the value of the data key.
_SCREEN = f"json_extract(e.data, {_SCREEN_PATH})"
# A closed session's visits are kept by /stats (stats_visits, for each data
# key asked for, with the default bin) while its events are unchanged: read
# there, a path costs a lookup instead of a pass over its events with three
# window functions.
_KEPT_VISITS_VALID = (
    "EXISTS (SELECT 1 FROM stats_sessions k WHERE k.session_id = s.id"
    f" AND k.data_key = {_SCREEN_KEY} AND k.bin = {DEFAULT_HEATMAP_BIN}"
    " AND k.last_event_id IS (SELECT max(x.id) FROM events x WHERE x.session_id = s.id))")
_PATH_OF_VISITS = "json_group_array(json_object('screen', screen, 'seconds', ms / 1000.0, 'touches', touches))"
_SCREEN_MARKS = LazyPattern("|".join(re.escape(mark) for mark in (_SCREEN_KEY, _SCREEN_PATH)))
#: What a session's path holds, computed when asked for (fields=...): not
#: among the default fields, and JSON (the path, the actions) where marked.
SESSION_PATH_COLUMNS = {
    "path": f"CASE WHEN {_KEPT_VISITS_VALID} THEN (SELECT {_PATH_OF_VISITS} FROM (SELECT * FROM stats_visits v"
            f" WHERE v.data_key = {_SCREEN_KEY} AND v.bin = {DEFAULT_HEATMAP_BIN} AND v.session_id = s.id"
            " ORDER BY v.visit))"
            f" ELSE (SELECT {_PATH_OF_VISITS} FROM (WITH {_visits_sql('events e WHERE e.session_id = s.id', _SCREEN)}"
            " SELECT * FROM visits ORDER BY visit)) END",
    "screens": f"(SELECT count(DISTINCT {_SCREEN}) FROM events e WHERE e.session_id = s.id)",
    "touches": f"(SELECT count(*) FROM events x WHERE x.session_id = s.id AND x.{_IS_TOUCH})",
    "page_changes": "(SELECT count(*) FROM events x WHERE x.session_id = s.id AND x.action = 'pageChange')",
    "actions": "(SELECT json_group_object(action, n) FROM (SELECT x.action, count(*) AS n FROM events x"
               " WHERE x.session_id = s.id GROUP BY x.action))",
}
SESSION_COLUMNS.update(SESSION_PATH_COLUMNS)
#: Fields whose SQL value is JSON text: parsed for JSON answers, embedded in NDJSON.
JSON_FIELDS = ("data", "path", "actions")
SESSION_SORTS = {
    "id": ("s.id",), "consumer_id": ("s.consumer_id", "s.id"), "ip": ("s.ip", "s.id"),
    "started_at": ("s.started_utc", "s.id"), "stopped_at": ("s.stopped_utc", "s.id"),
    "events": ("events", "s.id"), "clicks": ("clicks", "s.id"), "duration": ("duration", "s.id"),
    "last_event_at": ("last_event_at", "s.id"), "missing_events": ("missing_events", "s.id"),
    "touches": ("touches", "s.id"), "screens": ("screens", "s.id"),
}


# A data key's value in an export: its JSON text, as the client sent it
# (NULL when absent). json_extract() would turn a number beyond 64 bits into
# an approximation, or into Inf, which no JSON reader takes.
_DATA_KEY_VALUE = "e.data -> ?"


def _filters(query):
    """The WHERE clauses and parameters of a clean ReadQuery."""
    events = query.kind == "events"
    clauses, params = [], []

    def where(clause, *values):
        clauses.append(clause)
        params.extend(values)

    time_column = "e.time_utc" if events else "s.started_utc"
    if query.start_utc:
        where(f"{time_column} >= ?", query.start_utc)
    if query.end_utc:
        where(f"{time_column} < ?", query.end_utc)
    if query.date:  # the first Microticks' filter: sessions started that (UTC) day
        where("s.started_utc >= ? AND s.started_utc < ?", *query.date)
    if query.ip:
        where("s.ip = ?", query.ip)
    if query.consumer_id is not None:
        where("s.consumer_id = ?", query.consumer_id)
    if query.consumer_name:
        where("s.consumer_id IN (SELECT id FROM consumers WHERE name = ?)", query.consumer_name)
    if query.action:
        where("e.action = ?" if events else
              "EXISTS (SELECT 1 FROM events x WHERE x.session_id = s.id AND x.action = ?)", query.action)
    if query.session_id is not None:
        where("e.session_id = ?" if events else "s.id = ?", query.session_id)
    if query.site:
        where("mt_site(s.site) = ?", query.site)
    if query.end_id is not None:
        where("e.id <= ?" if events else "s.id <= ?", query.end_id)
    if query.slots:  # weekday= and hours=: local time, in the query's zone
        where(f"mt_local_slot({time_column}, ?) IN (SELECT value FROM json_each(?))", query.tz,
              json.dumps(query.slots))
    return clauses, params


def _select(query, fields, count=False):
    """The SQL and parameters for a ReadQuery: the rows, or their count."""
    events = query.kind == "events"
    columns = EVENT_COLUMNS if events else SESSION_COLUMNS
    clauses, params = _filters(query)
    table = "events e JOIN sessions s ON s.id = e.session_id" if events else "sessions s"
    needs_session = any(f in ("ip", "consumer_id", "consumer", "site") for f in fields) or any(
        getattr(query, f) for f in ("date", "ip", "consumer_name", "site")) or query.consumer_id is not None
    if events and not needs_session:
        table = "events e"  # a join per row costs a third of an export's time
    if "consumer" in fields:
        table += " LEFT JOIN consumers c ON c.id = s.consumer_id"
    if count:
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return f"SELECT count(*) FROM {table}{where}", params
    id_column = "e.id" if events else "s.id"
    if query.after_id is not None:  # cursor paging when sorted by id; a filter otherwise
        backwards = query.sort[0] == ("id", True)
        clauses.append(f"{id_column} {'<' if backwards else '>'} ?")
        params.append(query.after_id)
    screen = {_SCREEN_KEY: query.data_key, _SCREEN_PATH: f'$."{query.data_key}"'}
    select, select_params = [], []
    for name in fields:  # the screen's data key bound where the path fields name it
        select_params += [screen[mark] for mark in _SCREEN_MARKS.findall(columns[name])]
        select.append(f"{_SCREEN_MARKS.sub('?', columns[name])} AS {name}")
    select += [f"{_DATA_KEY_VALUE} AS data_key_{n}" for n in range(len(query.data_keys))]
    paths = [f'$."{key}"' for key in query.data_keys]
    params = select_params + paths + params  # the select list's come first
    order, ordered, order_params = [], set(), []
    for name, descending in query.sort:
        for part in (EVENT_SORTS if events else SESSION_SORTS)[name]:
            if part == id_column and name != "id":
                continue  # a tie-breaker: it goes last
            if part not in ordered:
                ordered.add(part)
                expression = columns.get(part, part)  # a path column names the screen's data key: bound here too
                order_params += [screen[mark] for mark in _SCREEN_MARKS.findall(expression)]
                order.append(_SCREEN_MARKS.sub("?", expression) + (" DESC" if descending else ""))
    if id_column not in ordered:
        order.append(id_column)
    params += order_params
    sql = (f"SELECT {', '.join(select)} FROM {table}"
           + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
           + " ORDER BY " + ", ".join(order))
    if query.limit is not None or query.offset:
        sql += " LIMIT ? OFFSET ?"
        params += [-1 if query.limit is None else query.limit, query.offset]
    return sql, params


def read_page(conn, query):
    """A page of events or sessions and how many match in all (paging
    parameters aside): {"events": [...], "count": N}."""
    fields = query.fields
    sql, params = _select(query, fields)
    rows = [dict(zip(fields, row)) for row in conn.execute(sql, params)]
    for name in JSON_FIELDS:
        if name in fields:
            for row in rows:
                row[name] = json.loads(row[name]) if row[name] is not None else None
    count_sql, count_params = _select(query, fields, count=True)
    count = conn.execute(count_sql, count_params).fetchone()[0]
    return {query.kind: rows, "count": count}


def page_document(conn, query, closing=None):
    """Every row a ReadQuery without a limit selects, as one JSON document
    in the first Microticks' shape, {"events": [...], "count": N} and the
    fields of `closing`, streamed as export_chunks streams: its readers
    (the first Microticks' analysis scripts among them) get every row, in
    flat memory. The count and the rows are read in one snapshot."""
    inner, params = _select(query, query.fields)
    count_sql, count_params = _select(query, query.fields, count=True)
    conn.execute("BEGIN")
    try:
        count = conn.execute(count_sql, count_params).fetchone()[0]
        yield f'{{"{query.kind}":['
        separator = ""
        for chunk in _export_lines(conn, inner, params, query.fields, query.fields, "json"):
            yield separator + chunk
            separator = ","
        yield "]," + _answer_json({"count": count, **(closing or {})})[1:]
    finally:
        if conn.in_transaction:  # a client gone midway closes the generator: the snapshot ends here
            conn.execute("COMMIT")


def export_chunks(conn, query):
    """The rows of a ReadQuery as CSV or NDJSON text, in chunks, reading the
    database as it goes: memory stays flat whatever the number of rows."""
    inner, params = _select(query, query.fields)
    columns = list(query.fields) + [f"data_key_{n}" for n in range(len(query.data_keys))]
    names = list(query.fields) + [f"data.{key}" for key in query.data_keys]
    return _export_lines(conn, inner, params, columns, names, query.format)


def _export_lines(conn, inner, params, columns, names, output_format):
    """The rows of the SQL `inner` (its `columns`, named `names` in the file)
    as CSV or NDJSON lines, in chunks; or, as `json`, JSON objects separated
    by commas (page_document's list). SQLite writes each line: C beats a
    Python call per field fivefold."""
    if output_format in ("ndjson", "json"):
        # data and the data keys are JSON text already: embedded as JSON, not as strings.
        pairs = ", ".join(f"?, json({c})" if c in JSON_FIELDS or c.startswith("data_key_") else f"?, {c}"
                          for c in columns)
        sql, params = f"SELECT json_object({pairs}) FROM ({inner})", list(names) + list(params)
        header, newline = None, "\n" if output_format == "ndjson" else ","
    else:
        # RFC 4180: numbers bare, text always quoted with quotes doubled, NULL empty.
        # Text a spreadsheet would run as a formula (=, +, -, @, tab, CR first:
        # anyone with the kiosks' key can send such an action or screen name)
        # gets a leading ' that shows it as text; `data` is JSON, which starts
        # so only as a number.
        def quoted(c, defuse=True):
            defused = "" if not defuse else (
                f"CASE WHEN substr({c}, 1, 1) IN ('=', '+', '-', '@', char(9), char(13)) THEN '''' ELSE '' END || ")
            return f"""'"' || {defused}replace({c}, '"', '""') || '"'"""

        def cell(c):
            if c.startswith("data_key_"):  # JSON text: a number bare as sent, a string's text, the rest quoted
                return (f"CASE WHEN {c} IS NULL OR {c} = 'null' THEN ''"
                        f" WHEN substr({c}, 1, 1) IN ('-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9') THEN {c}"
                        f""" WHEN substr({c}, 1, 1) = '"' THEN {quoted(f"({c} ->> '$')")}"""
                        f" ELSE {quoted(c, defuse=False)} END")
            return (f"CASE typeof({c}) WHEN 'null' THEN '' WHEN 'integer' THEN {c} WHEN 'real' THEN {c}"
                    f" ELSE {quoted(c, defuse=c not in JSON_FIELDS)} END")
        cells = " || ',' || ".join(cell(c) for c in columns)
        sql = f"SELECT {cells} FROM ({inner})"
        # The byte order mark makes spreadsheets read the file as UTF-8.
        header, newline = "\ufeff" + ",".join(names) + "\r\n", "\r\n"
    cursor = conn.execute(sql, params)
    if header:
        yield header
    while True:
        rows = cursor.fetchmany(2000)
        if not rows:
            break
        yield newline.join(row[0] for row in rows) + ("" if output_format == "json" else newline)


# -- Annotations --------------------------------------------------------------

def add_annotation(conn, time, text, consumer_name=None, site=None):
    """Store what happened at a kiosk at `time` (a Timestamp): a marker on
    the time charts, for every consumer or one; returns it as listed."""
    with write_transaction(conn):
        consumer_id = None
        if consumer_name:
            row = conn.execute("SELECT id FROM consumers WHERE name = ?", (consumer_name,)).fetchone()
            if row is None:
                message = f'"consumer": no consumer is named {consumer_name!r}'
                raise MicroticksError(404, message, {"consumer": [message]})
            consumer_id = row[0]
        annotation_id = conn.execute(
            "INSERT INTO annotations (time, time_utc, text, consumer_id, site, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (time.text, time.utc, text, consumer_id, site, utc_now())).lastrowid
    return read_annotations(conn, annotation_id=annotation_id)[0]


def read_annotations(conn, query=None, annotation_id=None):
    """The annotations in a ReadQuery's time range (from, to, date), in time
    order; with a consumer (or site) filter, that consumer's and those for
    every consumer (site)."""
    sql, params = _annotations_sql(query, annotation_id)
    return [dict(zip(ANNOTATION_FIELDS, row)) for row in conn.execute(sql, params)]


def _annotations_sql(query=None, annotation_id=None):
    """The SQL and parameters of read_annotations: ANNOTATION_FIELDS, by name."""
    clauses, params = [], []
    if annotation_id is not None:
        clauses.append("a.id = ?")
        params.append(annotation_id)
    if query is not None:
        for clause, value in (("a.time_utc >= ?", query.start_utc), ("a.time_utc < ?", query.end_utc),
                              ("a.time_utc >= ?", query.date and query.date[0]),
                              ("a.time_utc < ?", query.date and query.date[1]),
                              ("(a.consumer_id IS NULL OR a.consumer_id = ?)", query.consumer_id),
                              ("(a.consumer_id IS NULL OR a.consumer_id IN (SELECT id FROM consumers"
                               " WHERE name = ?))", query.consumer_name),
                              ("(a.site IS NULL OR a.site = ?)", query.site)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    return ("SELECT a.id AS id, a.time AS time, a.time_utc AS time_utc, a.text AS text, a.consumer_id AS consumer_id,"
            " c.name AS consumer, a.site AS site, a.created_at AS created_at"
            f" FROM annotations a LEFT JOIN consumers c ON c.id = a.consumer_id{where} ORDER BY a.time_utc, a.id",
            params)


def delete_annotation(conn, annotation_id):
    """Delete an annotation; whether there was one."""
    with write_transaction(conn):
        return conn.execute("DELETE FROM annotations WHERE id = ?", (annotation_id,)).rowcount == 1


def export_annotations(conn, query, output_format):
    """read_annotations' annotations as CSV or NDJSON text, as exports write it."""
    inner, params = _annotations_sql(query)
    return _export_lines(conn, inner, params, ANNOTATION_FIELDS, ANNOTATION_FIELDS, output_format)


# -- Statistics ---------------------------------------------------------------

class StatsQuery(NamedTuple):
    """A clean /stats request."""

    query: "ReadQuery"
    tz: str
    data_key: str
    bin: int
    #: Screen types are the part of a screen's name before this.
    type_separator: str = ":"
    #: The path figures: the common paths of this many first screens (0: none).
    path_length: int = 0
    #: The screens of a funnel, in order (none: no funnel).
    funnel: tuple = ()
    #: A session with at least this many touches is meaningful (ENGAGEMENT_DEFINITION).
    meaningful: int = DEFAULT_MEANINGFUL_TOUCHES
    #: The heatmaps' touches: all, or navigating (those that carry prevSubject).
    touches: str = "all"
    #: Holding power: survival curves of sessions and of time on each screen.
    holding: bool = False
    #: Coverage: whether the kiosks were on, and how much they were used.
    coverage: bool = False


DURATION_BUCKETS = [(0, "0-10s"), (10, "10-30s"), (30, "30-60s"), (60, "1-2min"), (120, "2-5min"),
                    (300, "5-10min"), (600, "10-30min"), (1800, "30min+")]
EVENT_COUNT_BUCKETS = [(0, "0"), (1, "1"), (2, "2-5"), (6, "6-10"), (11, "11-20"), (21, "21-50"), (51, "51+")]
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _distribution(values, buckets):
    counts, lows = [0] * len(buckets), [low for low, _ in buckets]
    for value in values:
        counts[bisect_right(lows, value) - 1] += 1
    return [{"bucket": label, "sessions": n} for (_, label), n in zip(buckets, counts)]


def _summary(values):
    ordered = sorted(values)
    if not ordered:
        return {"min": None, "median": None, "mean": None, "max": None}
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"min": ordered[0], "median": round(median, 3),
            "mean": round(sum(ordered) / len(ordered), 3), "max": ordered[-1]}


# What /stats keeps per session (besides stats_sessions, which records what
# the figures were computed from), and the temporary tables of this
# connection where a request's newly computed figures gather first.
KEPT_STATS = {"stats_values": "fresh_values", "stats_heat": "fresh_heat", "stats_actions": "fresh_actions",
              "stats_visits": "fresh_visits", "stats_touches": "fresh_touches",
              "stats_engagement": "fresh_engagement"}
MAX_HEATMAP_BIN = 10000
#: Besides the default's, the (data key, bin) pairs whose figures are kept:
#: each holds about a quarter of the file's size, and a researcher trying
#: bins, or anyone with the key, would otherwise grow the file without end.
#: Others are computed for every request.
MAX_KEPT_STATS_KINDS = 3
#: An open session with this many events has its figures kept too, and
#: used for OPEN_SESSION_LAG after they were kept, new events or not: one
#: client posting 200,000 events into one session made every /stats read
#: them all again (3 s each), for as long as it went on posting.
KEEP_OPEN_SESSIONS_FROM = 1000
OPEN_SESSION_LAG = timedelta(seconds=60)
#: Sessions whose figures keep_stats computes and keeps at a time: each part
#: is committed, SQLite's sorters hold a part, and a command or request
#: stopped midway (a gunicorn worker's timeout) leaves its work done.
STATS_CHUNK = 2000


def _few(part, whole):
    """Whether `part` sessions of `whole` are few enough to lead a join, each
    found by index, rather than be met in one pass over a whole table: a
    tenth, or a part of keep_stats. Spelled out in the SQL (CROSS JOIN):
    without ANALYZE, SQLite's planner takes the pass."""
    return part * 10 < whole or part <= STATS_CHUNK


def _compute_session_stats(conn, data_key, bin_size):
    """Figures per session, for the sessions in temp.stale, into the fresh_*
    tables: per value of the data key (events, clicks, page turns, visits,
    picks, time spent), heatmap bins per screen, events per action. A
    session's events are taken in the tracker's order (seq), else in the
    order they were stored."""
    stale, sessions = conn.execute("SELECT (SELECT count(*) FROM temp.stale), (SELECT count(*) FROM sessions)").fetchone()
    events = ("temp.stale st CROSS JOIN events e ON e.session_id = st.session_id" if _few(stale, sessions)
              else "events e JOIN temp.stale st ON st.session_id = e.session_id")
    key_path, prev_path = f'$."{data_key}"', f'$."prev{data_key[:1].upper()}{data_key[1:]}"'
    conn.execute(
        f"INSERT INTO temp.fresh_actions SELECT e.session_id, ?, ?, e.action, count(*) FROM {events}"
        " GROUP BY e.session_id, e.action", (data_key, bin_size))
    # The visits (VALUES_DEFINITION) in order, for the path figures
    # (path_statistics) and the per-value ones below; touches per minute.
    conn.execute(f"INSERT INTO temp.fresh_visits WITH {_visits_sql(events, 'json_extract(e.data, ?)')}"
                 " SELECT session_id, ?, ?, visit, screen, arrived, ms, touches, seen_ms FROM visits",
                 (key_path, data_key, bin_size))
    conn.execute(
        f"INSERT INTO temp.fresh_touches SELECT e.session_id, ?, ?, substr(e.time_utc, 1, 16), count(*) FROM {events}"
        f" WHERE e.{_IS_TOUCH} GROUP BY e.session_id, substr(e.time_utc, 1, 16)", (data_key, bin_size))
    # Per value: its events, and its visits: how many, how often a session's
    # first, second, third, and their time, to the next visit (the last
    # visit of a session is not measured: only idle time came after it).
    conn.execute(
        f"INSERT INTO temp.fresh_values WITH valued AS (SELECT e.session_id, e.action, json_extract(e.data, ?) AS value"
        f" FROM {events}),"
        " counts AS (SELECT session_id, value, count(*) AS events, sum(action = 'click') AS clicks,"
        " sum(action = 'pageChange') AS turns FROM valued WHERE value IS NOT NULL GROUP BY session_id, value),"
        " visits AS (SELECT session_id, screen AS value, count(*) AS visits, sum(visit = 1) AS first,"
        " sum(visit = 2) AS second, sum(visit = 3) AS third, count(ms) AS measured, min(ms) / 1000.0 AS low,"
        " sum(ms) / 1000.0 AS total, max(ms) / 1000.0 AS high FROM temp.fresh_visits GROUP BY session_id, screen)"
        " SELECT c.session_id, ?, ?, c.value, c.events, c.clicks, c.turns, coalesce(v.visits, 0),"
        " coalesce(v.first, 0), coalesce(v.second, 0), coalesce(v.third, 0), coalesce(v.measured, 0),"
        " v.low, v.total, v.high FROM counts c"
        " LEFT JOIN visits v ON v.session_id = c.session_id AND v.value = c.value",
        (key_path, data_key, bin_size))
    conn.execute(
        "INSERT INTO temp.fresh_heat WITH points AS (SELECT e.session_id, json_extract(e.data, '$.clickX') AS x,"
        f" json_extract(e.data, '$.clickY') AS y, e.data AS data FROM {events} WHERE x IS NOT NULL)"
        " SELECT session_id, ?, ?, coalesce(json_extract(data, ?), json_extract(data, ?), '') AS screen,"
        " CAST(x / ? AS INTEGER) * ? AS bx, CAST(y / ? AS INTEGER) * ? AS by, count(*), max(x), max(y),"
        " sum(json_extract(data, ?) IS NOT NULL)"
        " FROM points WHERE typeof(x) IN ('integer', 'real') AND typeof(y) IN ('integer', 'real')"
        " GROUP BY session_id, screen, bx, by",
        (data_key, bin_size, prev_path, key_path, bin_size, bin_size, bin_size, bin_size, prev_path))
    # Every stale session gets a row, its touches and screens 0 if it had none
    # (ENGAGEMENT_DEFINITION): /stats and /compare count sessions here.
    conn.execute(
        f"INSERT INTO temp.fresh_engagement WITH touched AS (SELECT e.session_id, count(*) AS touches,"
        f" min(e.time_utc) AS first_touch FROM {events} WHERE e.{_IS_TOUCH} GROUP BY e.session_id),"
        " viewed AS (SELECT session_id, count(DISTINCT screen) AS screens FROM temp.fresh_visits GROUP BY session_id),"
        f" timed AS (SELECT e.session_id, max(e.time_utc) AS last_time FROM {events} GROUP BY e.session_id)"
        " SELECT st.session_id, ?, ?, coalesce(t.touches, 0), coalesce(v.screens, 0),"
        " CAST(round((julianday(t.first_touch) - julianday(s.started_utc)) * 86400000) AS INTEGER),"
        " st.events, m.last_time FROM temp.stale st JOIN sessions s ON s.id = st.session_id"
        " LEFT JOIN touched t ON t.session_id = st.session_id LEFT JOIN viewed v ON v.session_id = st.session_id"
        " LEFT JOIN timed m ON m.session_id = st.session_id",
        (data_key, bin_size))


def _keep_session_stats(conn, data_key, bin_size, chunk=1000):
    """Keep the fresh figures of closed sessions for the next /stats, a chunk
    of sessions per write transaction (ingest waits a moment at most); returns
    how many sessions' figures were kept. On a read-only or busy file they
    are simply not kept."""
    ids = [row[0] for row in conn.execute("SELECT session_id FROM temp.stale WHERE closed ORDER BY session_id")]
    if ids and not _may_keep_stats(conn, data_key, bin_size):
        return 0
    for start in range(0, len(ids), chunk):
        low, high = ids[start], ids[min(start + chunk, len(ids)) - 1]
        bounds = (data_key, bin_size, low, high, low, high)
        closed = ("data_key = ? AND bin = ? AND session_id BETWEEN ? AND ? AND session_id IN"
                  " (SELECT session_id FROM temp.stale WHERE closed AND session_id BETWEEN ? AND ?)")
        try:
            with write_transaction(conn):
                for kept, fresh in [*KEPT_STATS.items(), ("stats_sessions", None)]:
                    conn.execute(f"DELETE FROM main.{kept} WHERE {closed}", bounds)
                    if fresh:
                        conn.execute(f"INSERT INTO main.{kept} SELECT * FROM temp.{fresh} WHERE {closed}", bounds)
                conn.execute("INSERT INTO main.stats_sessions SELECT session_id, ?, ?, events, last_event_id, ?"
                             " FROM temp.stale WHERE closed AND session_id BETWEEN ? AND ?",
                             (data_key, bin_size, utc_now(), low, high))
        except sqlite3.OperationalError as error:
            log.info("statistics computed but not kept (%s)", error)
            return start
    return len(ids)


#: The quota on kept kinds (MAX_KEPT_STATS_KINDS), as SQL with its
#: parameters: whether another kind besides the default's may be kept.
_ROOM_FOR_A_KIND = ("(SELECT count(*) FROM stats_kinds WHERE NOT (data_key = ? AND bin = ?)) < ?",
                    (DEFAULT_DATA_KEY, DEFAULT_HEATMAP_BIN, MAX_KEPT_STATS_KINDS))


def _room_for_stats(conn, data_key, bin_size):
    """Whether figures for this data key and bin are kept, or there is room
    to keep them (_may_keep_stats claims it)."""
    return figures_kept(conn, data_key, bin_size) or bool(
        conn.execute(f"SELECT {_ROOM_FOR_A_KIND[0]}", _ROOM_FOR_A_KIND[1]).fetchone()[0])


def figures_kept(conn, data_key, bin_size):
    """Whether figures for this data key and bin are kept (or, the
    default's, meant to be): else a /stats of them reads every event of its
    sessions, and keeps them if there is room (_may_keep_stats)."""
    return (data_key, bin_size) == (DEFAULT_DATA_KEY, DEFAULT_HEATMAP_BIN) or bool(conn.execute(
        "SELECT 1 FROM stats_kinds WHERE data_key = ? AND bin = ?", (data_key, bin_size)).fetchone())


def _may_keep_stats(conn, data_key, bin_size):
    """Whether figures for this data key and bin may be kept: the default's
    always, others while fewer than MAX_KEPT_STATS_KINDS are, if any event
    carries the key (a mistyped key in the dashboard takes no place)."""
    kind, default = (data_key, bin_size), (DEFAULT_DATA_KEY, DEFAULT_HEATMAP_BIN)
    if conn.execute("SELECT 1 FROM stats_kinds WHERE data_key = ? AND bin = ?", kind).fetchone():
        return True
    if kind != default and not conn.execute("SELECT 1 FROM temp.fresh_values LIMIT 1").fetchone():
        return False
    try:
        with write_transaction(conn):
            conn.execute(f"INSERT INTO stats_kinds SELECT ?, ? WHERE ? OR {_ROOM_FOR_A_KIND[0]}",
                         (*kind, kind == default, *_ROOM_FOR_A_KIND[1]))
            claimed = conn.execute("SELECT changes()").fetchone()[0] == 1
    except sqlite3.OperationalError as error:
        log.info("statistics computed but not kept (%s)", error)
        return False
    if not claimed:
        log.info("statistics for data key %r and bin %d computed but not kept: those of %d others are "
                 "(%s forgetstats frees room)", data_key, bin_size, MAX_KEPT_STATS_KINDS, operator_command())
    return claimed


def forget_stats(conn, data_key=None, bin_size=None):
    """Delete the kept figures (of one data key and/or bin, else all) and
    give their space back; /stats computes them again when asked. Returns
    the (data key, bin) pairs forgotten."""
    where, params = "WHERE (? IS NULL OR data_key = ?) AND (? IS NULL OR bin = ?)", (data_key,) * 2 + (bin_size,) * 2
    with write_transaction(conn):
        kinds = [tuple(row) for row in conn.execute(f"SELECT data_key, bin FROM stats_kinds {where}"
                                                    " ORDER BY data_key, bin", params)]
        for table in [*KEPT_STATS, "stats_sessions", "stats_kinds"]:
            conn.execute(f"DELETE FROM {table} {where}", params)
    shrink_database(conn)
    return kinds


def _find_stale_sessions(conn, selected, params, data_key, bin_size):
    """Into temp.stale: the sessions `selected` (a CTE named sel, with its
    parameters) whose figures for this data key and bin are not kept, or
    were kept before their events changed (but for a huge open session's,
    within OPEN_SESSION_LAG of being kept); and empty fresh_* tables."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS stale (session_id INTEGER PRIMARY KEY,"
                 " events INTEGER, last_event_id INTEGER, closed INTEGER)")
    conn.execute("DELETE FROM temp.stale")
    for kept, fresh in KEPT_STATS.items():
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {fresh} AS SELECT * FROM main.{kept} WHERE 0")
        conn.execute(f"CREATE INDEX IF NOT EXISTS temp.{fresh}_session ON {fresh} (session_id)")
        conn.execute(f"DELETE FROM temp.{fresh}")
    # Kept figures hold while the session's newest event id is the one they
    # were computed up to: ids only grow, and events go only with their
    # session (whose figures go too) or come by import, which forgets the
    # figures of the sessions it adds to. One index lookup a session: its
    # events are counted only when it is stale, and read then anyway.
    conn.execute(
        f"INSERT INTO temp.stale WITH {selected}, now AS (SELECT sel.id,"
        " (SELECT max(x.id) FROM events x WHERE x.session_id = sel.id) AS last_event_id FROM sel),"
        " found AS (SELECT now.id, now.last_event_id, s.stopped_at IS NOT NULL AS stopped FROM now"
        " JOIN sessions s ON s.id = now.id LEFT JOIN main.stats_sessions k"
        " ON k.session_id = now.id AND k.data_key = ? AND k.bin = ?"
        " WHERE k.session_id IS NULL OR (k.last_event_id IS NOT now.last_event_id"
        " AND NOT (s.stopped_at IS NULL AND k.events >= ? AND k.kept_at > ?))),"
        " counted AS (SELECT found.*, (SELECT count(*) FROM events x WHERE x.session_id = found.id) AS events"
        " FROM found)"
        " SELECT id, events, last_event_id, stopped OR events >= ? FROM counted",
        [*params, data_key, bin_size, KEEP_OPEN_SESSIONS_FROM, format_utc(datetime.now(timezone.utc) - OPEN_SESSION_LAG),
         KEEP_OPEN_SESSIONS_FROM])


class Selection(NamedTuple):
    """The sessions a ReadQuery selects: a WITH clause `sel` and its
    parameters; whether that is every session, and whether they are few
    (_few), which decides how their kept figures are met."""
    sql: str
    params: list
    everything: bool
    few: bool = False


def _selected_sessions(conn, query):
    """The Selection of a ReadQuery's sessions."""
    clauses, params = _filters(query._replace(kind="sessions"))
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"sel AS (SELECT s.id FROM sessions s{where})"
    if not clauses:
        return Selection(sql, params, True)
    selected, sessions = conn.execute(f"WITH {sql} SELECT (SELECT count(*) FROM sel), (SELECT count(*) FROM sessions)",
                                      params).fetchone()
    return Selection(sql, params, False, _few(selected, sessions))


def compute_stats(conn, stats_query, samples=None):
    """What researchers compute by hand from an export, for the sessions a
    StatsQuery selects: per day, hour and weekday (local time in its zone),
    durations, events per session and per action, engagement
    (ENGAGEMENT_DEFINITION), and for the data key (the screen): visits,
    picks, time spent, page turns, click heatmaps, and the visits per screen
    type (the part of its name before the type separator).

    The figures of each session are kept (stats_* tables) and used again
    while the session's events are unchanged: the newest event id is
    recorded with them, ids only grow, a deletion takes the session and its
    figures, and an import forgets the figures of the sessions it adds to.
    Sessions without valid kept figures are computed afresh, in this
    connection's temporary tables, and kept once closed (or once they hold
    KEEP_OPEN_SESSIONS_FROM events).

    With `holding`, the holding power (HOLDING_DEFINITION); with
    `coverage`, the kiosks' coverage (COVERAGE_DEFINITION).

    `samples`, a dict if given, receives what /compare tests: per session
    its duration (and whether it ended), touches and distinct screens, and
    per screen the measured times of its visits (seconds), and those with
    the last visits' seen times (censored)."""
    data_key, bin_size = stats_query.data_key, stats_query.bin
    if samples is None and stats_query.holding:
        samples = {}
    conn.execute("BEGIN")  # one snapshot for every figure
    try:
        selection = _selected_sessions(conn, stats_query.query)
        _find_stale_sessions(conn, selection.sql, selection.params, data_key, bin_size)
        low, high, closed = conn.execute("SELECT min(session_id), max(session_id), count(*)"
                                         " FROM temp.stale WHERE closed").fetchone()
        # Nothing kept yet (an upgraded database, another bin): part by part first.
        if closed > STATS_CHUNK and _room_for_stats(conn, data_key, bin_size):
            conn.execute("COMMIT")
            log.info("statistics: computing and keeping the figures of %d sessions, %d at a time",
                     closed, STATS_CHUNK)
            keep_stats(conn, low, high, data_key, bin_size)
            conn.execute("BEGIN")
            selection = _selected_sessions(conn, stats_query.query)
            _find_stale_sessions(conn, selection.sql, selection.params, data_key, bin_size)
        _compute_session_stats(conn, data_key, bin_size)
        stats = _add_up_stats(conn, stats_query, selection, samples)
        stats.update(_engagement(conn, stats_query, selection, samples))
        if stats_query.path_length or stats_query.funnel:
            stats.update(path_statistics(conn, stats_query, selection))
        if stats_query.coverage:
            stats["coverage"] = coverage_figures(conn, stats_query, selection)
    finally:
        if conn.in_transaction:  # else an error ended it (SQLite rolls back after some): that one is told
            conn.execute("COMMIT")
    _keep_session_stats(conn, data_key, bin_size)
    stats["screen_types"] = screen_types(stats["values"], stats_query.type_separator)
    if stats_query.holding:
        stats["holding"] = holding_power(samples)
    return stats


@contextlib.contextmanager
def _snapshot_with_fresh_figures(conn, stats_query):
    """One snapshot of the sessions a StatsQuery selects (their Selection),
    the figures of those without valid kept ones computed afresh into the
    fresh_* tables, as compute_stats computes them (and kept by /stats)."""
    conn.execute("BEGIN")
    try:
        selection = _selected_sessions(conn, stats_query.query)
        _find_stale_sessions(conn, selection.sql, selection.params, stats_query.data_key, stats_query.bin)
        if conn.execute("SELECT 1 FROM temp.stale LIMIT 1").fetchone():
            _compute_session_stats(conn, stats_query.data_key, stats_query.bin)
        yield selection
    finally:
        if conn.in_transaction:  # else an error ended it (SQLite rolls back after some): that one is told
            conn.execute("COMMIT")


def screen_heatmap(conn, stats_query, screen):
    """One screen's heatmap of the sessions a StatsQuery selects, in its bins
    and touches (all, or navigating), added up from the kept heatmap rows
    of that screen alone (_snapshot_with_fresh_figures): what a researcher
    draws their own from, without the rest of /stats."""
    with _snapshot_with_fresh_figures(conn, stats_query) as selection:
        points = "k.navigating" if stats_query.touches == "navigating" else "k.points"
        bins, width, height = [], 0, 0
        for x, y, n, max_x, max_y in _kept_and_fresh(
                conn, stats_query, selection, "stats_heat", f"k.x, k.y, sum({points}), max(k.max_x), max(k.max_y)",
                tail="GROUP BY k.x, k.y", where=("k.screen = ?", (screen,))):
            width, height = max(width, max_x or 0), max(height, max_y or 0)
            if n:
                bins.append([x, y, n])
    merged = {}  # a bin in both the kept rows and the fresh ones
    for x, y, n in bins:
        merged[x, y] = merged.get((x, y), 0) + n
    return {"screen": screen, "bin": stats_query.bin, "touches": stats_query.touches, "width": width, "height": height,
            "points": sum(merged.values()), "bins": [[x, y, n] for (x, y), n in sorted(merged.items())]}


def device_uptime(conn, stats_query):
    """GET /devices: each kiosk's coverage (COVERAGE_DEFINITION) over a
    StatsQuery's range and consumers, with its last sign of life, in one
    snapshot (_snapshot_with_fresh_figures)."""
    with _snapshot_with_fresh_figures(conn, stats_query) as selection:
        coverage = coverage_figures(conn, stats_query, selection)
        seen = {(row[0], row[1]): dict(zip(("app_version", "last_seen_at", "last_heartbeat_at", "queue_depth"),
                                           row[2:])) for row in conn.execute(
            "SELECT c.name, d.name, d.app_version, d.last_seen_at, d.last_heartbeat_at, d.queue_depth"
            " FROM devices d JOIN consumers c ON c.id = d.consumer_id")}
    for row in coverage["devices"]:
        row.update(seen.get((row["consumer"], row["device"]), {}))
        row["uptime"] = _share(row["minutes_on"], row["known_minutes"]) if row["heartbeats"] else None
    return {"from": coverage["from"], "to": coverage["to"], "timezone": stats_query.tz or "server",
            "gap_intervals": coverage["gap_intervals"], "devices": coverage["devices"]}


def stats_figures(conn, stats_query, samples=None):
    """The /stats answer for a clean StatsQuery: compute_stats' figures,
    and the annotations of its range and consumer."""
    figures = compute_stats(conn, stats_query, samples)
    figures["annotations"] = read_annotations(conn, stats_query.query)
    return figures


def _kept_and_fresh(conn, stats_query, selection, kept, columns, tail="", join="", where=("", ())):
    """`columns` of a kept stats table's rows (named k) for the selected
    sessions whose kept figures are valid, then of its fresh table (the
    stale sessions'), each followed by `tail` (a GROUP BY, an ORDER BY):
    inside compute_stats' snapshot. `join` joins other tables to k. A few
    sessions lead, their rows found by index; many are met in one pass
    over the kept table, in its order (_few). `where`: a condition on k's
    rows, and its parameters, for both."""
    kind = [stats_query.data_key, stats_query.bin]
    condition, condition_params = where
    also = f" AND {condition}" if condition else ""
    kept_where = f"WHERE k.data_key = ? AND k.bin = ? AND k.session_id NOT IN (SELECT session_id FROM temp.stale){also}"
    if selection.everything:
        rows = conn.execute(f"SELECT {columns} FROM main.{kept} k {join} {kept_where} {tail}", [*kind, *condition_params])
    else:
        # Many: a pass over the kept table, each row's session looked up in
        # the selection's ids (SQLite indexes them once for IN: three times
        # faster than a join with them over half a million sessions).
        source, kept_where = ((f"sel CROSS JOIN main.{kept} k ON k.session_id = sel.id", kept_where) if selection.few
                              else (f"main.{kept} k", f"{kept_where} AND k.session_id IN (SELECT id FROM sel)"))
        rows = conn.execute(f"WITH {selection.sql} SELECT {columns} FROM {source} {join} {kept_where} {tail}",
                            [*selection.params, *kind, *condition_params])
    # Both cursors read as one in C: a generator's step per row cost a third
    # of the path figures over a million events.
    fresh_where = f"WHERE {condition}" if condition else ""
    return itertools.chain(rows, conn.execute(f"SELECT {columns} FROM temp.{KEPT_STATS[kept]} k {join} {fresh_where}"
                                              f" {tail}", condition_params))


#: Seconds at which /stats' holding power says how many are still engaged.
HOLDING_CHECKPOINTS = (10, 30, 60, 120, 300)
#: Points of a survival curve /stats gives (the steps beyond are thinned out).
MAX_CURVE_POINTS = 400
#: The standard normal's 97.5th percentile: the 95% intervals' half width in standard errors.
Z_95 = 1.959963984540054


def kaplan_meier(times, observed):
    """The Kaplan-Meier estimate of the chance to last beyond t, from times
    that ended (observed) or were still going when last seen (censored):
    at each time where one ended, (t, S(t), lower, upper), the 95% bounds
    by Greenwood's variance, linear and clipped to [0, 1] (None where it is
    not defined: at a time that leaves no one at risk)."""
    ended, counted = {}, {}
    for t, seen in zip(times, observed):
        counted[t] = counted.get(t, 0) + 1
        if seen:
            ended[t] = ended.get(t, 0) + 1
    at_risk, survival, greenwood, steps = len(times), 1.0, 0.0, []
    for t in sorted(counted):
        d = ended.get(t, 0)
        if d:
            survival *= 1 - d / at_risk
            greenwood = greenwood + d / (at_risk * (at_risk - d)) if at_risk > d else None
            if greenwood is None:
                steps.append((t, survival, None, None))
            else:
                half = Z_95 * survival * math.sqrt(greenwood)
                steps.append((t, survival, max(0.0, survival - half), min(1.0, survival + half)))
        at_risk -= counted[t]
    return steps


def holding(times, observed):
    """A survival curve's figures (HOLDING_DEFINITION): its median and the
    median's 95% interval, the shares still engaged at the checkpoints, and
    the curve itself, as [seconds, share, lower, upper] from [0, 1, 1, 1]
    (at most MAX_CURVE_POINTS of its steps)."""
    steps = kaplan_meier(times, observed)

    def first(test):
        return next((round(t, 3) for t, *bounds in steps if test(*bounds)), None)

    longest = max(times, default=0)

    def at(seconds):
        last = (1.0, 1.0, 1.0)
        for t, survival, lower, upper in steps:
            if t > seconds:
                break
            last = (survival, lower, upper)
        if seconds > longest and last[0] > 0:  # nobody was followed that long: not known
            return (None, None, None)
        return last

    thin = max(1, math.ceil(len(steps) / MAX_CURVE_POINTS))
    curve = [[0, 1.0, 1.0, 1.0]] + [
        [round(t, 3), round(s, 4), None if lo is None else round(lo, 4), None if up is None else round(up, 4)]
        for n, (t, s, lo, up) in enumerate(steps) if n % thin == 0 or n == len(steps) - 1]
    return {"n": len(times), "ended": sum(map(bool, observed)), "censored": len(times) - sum(map(bool, observed)),
            "median": first(lambda s, lower, upper: s <= 0.5),
            # Brookmeyer and Crowley: the times whose band holds 0.5
            "median_ci": [first(lambda s, lower, upper: lower is not None and lower <= 0.5),
                          first(lambda s, lower, upper: upper is not None and upper <= 0.5)],
            "still_engaged": [{"seconds": seconds, **dict(zip(("share", "lower", "upper"),
                                                              (None if v is None else round(v, 4) for v in at(seconds))))}
                              for seconds in HOLDING_CHECKPOINTS],
            "curve": curve}


#: Screens whose holding power /stats draws as a curve (the most visited);
#: the others get its figures alone.
HOLDING_CURVES = 10


def holding_power(samples):
    """The holding power (HOLDING_DEFINITION) of compute_stats' samples:
    of the sessions' durations, and of the time on each screen (the most
    visited first; curves for HOLDING_CURVES of them)."""
    screens = sorted(samples["time_on_screen_seen"].items(), key=lambda item: (-len(item[1][0]), str(item[0])))
    per_screen = []
    for rank, (screen, (times, ended)) in enumerate(screens):
        figures = holding(times, ended)
        if rank >= HOLDING_CURVES:
            del figures["curve"]
        per_screen.append({"screen": screen, **figures})
    return {"checkpoints": list(HOLDING_CHECKPOINTS),
            "sessions": holding(samples["duration"], samples["duration_ended"]), "screens": per_screen}


#: A gap: a stretch without heartbeats longer than this many of the device's
#: heartbeat intervals (COVERAGE_DEFINITION).
GAP_INTERVALS = 3
#: A session counts as in use for at most this long (one a client never
#: stopped, and kept posting to, must not fill months).
MAX_IN_USE = timedelta(hours=24)
#: The usual hours of a device are found over the range, and at least this
#: long before its end (minutes).
USUAL_HOURS_FROM = 28 * 1440
#: Gaps listed per device (the most recent); all are counted.
LISTED_GAPS = 20
_HOUR_MASK = (1 << 60) - 1
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def _smear(bits, width):
    """The OR of bits << 0..width: each heartbeat's minute and the minutes
    after it that it vouches for."""
    result, shift, block, block_width, remaining = 0, 0, bits, 1, width + 1
    while remaining:
        if remaining & 1:
            result |= block << shift
            shift += block_width
        block |= block << block_width
        block_width *= 2
        remaining >>= 1
    return result


def _ones(bits):
    return bin(bits).count("1")


if hasattr(int, "bit_count"):  # Python 3.10 on: the same, in C
    _ones = int.bit_count  # noqa: F811


class _LocalHours:
    """The local day and hour of each UTC hour's minutes in a zone, in the
    query's weekday-hour slots: one part, or two where the zone's offset is
    not whole hours (India: a UTC hour's first 30 minutes belong to one
    local hour, the rest to the next). The offset is the zone's at the UTC
    hour's start (zones change on whole UTC hours). Cached per UTC hour."""

    def __init__(self, tz_name, slots):
        self.zone, self.slots, self.cache, self.counted = load_timezone(tz_name), frozenset(slots), {}, {}
        self.day_offsets, self.kind = {}, {}

    def _offset_at(self, hour):
        moment = datetime.fromtimestamp(hour * 3600, timezone.utc)
        return int(moment.astimezone(self.zone).utcoffset().total_seconds()) // 60

    def offset(self, hour):
        """The zone's offset (minutes) at a UTC hour's start: read once for a
        UTC day whose first and last hours agree (no zone changes its offset
        twice in a day), else hour by hour."""
        offset = self.day_offsets.get(hour // 24)
        if offset is None:
            first, last = self._offset_at(hour // 24 * 24), self._offset_at(hour // 24 * 24 + 23)
            offset = self.day_offsets[hour // 24] = first if first == last else ()
        return self._offset_at(hour) if offset == () else offset

    def every_part(self, hour):
        """[(mask of the hour's minutes, first minute, end minute, local day ordinal, local hour, in the slots)]."""
        parts = self.cache.get(hour)
        if parts is None:
            local = hour * 60 + self.offset(hour)
            split = (60 - local % 60) % 60
            parts = []
            for low, high in ([(0, 60)] if not split else [(0, split), (split, 60)]):
                day, of_day = divmod(local + low, 1440)
                ordinal = _EPOCH_ORDINAL + day
                parts.append((((1 << high) - 1) ^ ((1 << low) - 1), low, high, ordinal, of_day // 60,
                              not self.slots or ((ordinal - 1) % 7) * 24 + of_day // 60 in self.slots))
            self.cache[hour] = parts = tuple(parts)
        return parts

    def parts(self, hour):
        """every_part's parts in the query's slots, without the flag."""
        parts = self.counted.get(hour)
        if parts is None:
            parts = self.counted[hour] = tuple(part[:5] for part in self.every_part(hour) if part[5])
        return parts

    def kinds(self, hours):
        """How many of `hours` (whole UTC hours) there are of each kind: a
        kind is the hour's parts as (local hour, minutes, in the slots). A
        few hundred kinds stand for a year of hours, counted in C."""
        kind = self.kind
        for hour in set(hours).difference(kind):
            kind[hour] = tuple((of_day, high - low, counted) for _, low, high, _, of_day, counted
                               in self.every_part(hour))
        return collections.Counter(map(kind.__getitem__, hours))


def _epoch_seconds(text):
    return datetime.fromisoformat(text[:23]).replace(tzinfo=timezone.utc).timestamp()


#: _epoch_seconds in SQL, of a stored UTC time: whole milliseconds from
#: julianday() (exact: its double is within 50 microseconds), NULL if not a
#: time. Parsing each session's times in Python cost a tenth of coverage.
_SQL_EPOCH_SECONDS = "round((julianday(%s) - 2440587.5) * 86400000) / 1000.0"


def _minute_text(minute):
    return format_utc(datetime.fromtimestamp(minute * 60, timezone.utc))


def coverage_figures(conn, stats_query, selection, now=None):
    """Whether the kiosks were on, and how much they were used
    (COVERAGE_DEFINITION): for the devices of the selected consumers (and
    site) over the query's range, with the selected sessions; per device,
    per consumer, per local day and hour of the day. Inside compute_stats'
    snapshot."""
    query, now = stats_query.query, now or datetime.now(timezone.utc)
    local = _LocalHours(stats_query.tz, query.slots)
    conditions, params = [], []
    for condition, value in (("d.consumer_id = ?", query.consumer_id), ("c.name = ?", query.consumer_name),
                             ("d.id IN (SELECT device_id FROM sessions WHERE mt_site(site) = ?)", query.site)):
        if value is not None and value != "":
            conditions.append(condition)
            params.append(value)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    devices = {}
    for device_id, name, consumer, interval in conn.execute(
            f"SELECT d.id, d.name, c.name, d.heartbeat_interval FROM devices d JOIN consumers c ON c.id = d.consumer_id"
            f"{where}", params):
        first = conn.execute("SELECT hour, minutes FROM heartbeat_hours WHERE device_id = ? ORDER BY hour LIMIT 1",
                             (device_id,)).fetchone()
        devices[device_id] = {"consumer": consumer, "device": name,
                              "interval_s": interval or DEFAULT_HEARTBEAT_INTERVAL, "spans": [],
                              "first_beat": first and first[0] * 60 + ((first[1] & -first[1]).bit_length() - 1)}
    loose = {}  # consumer -> spans of its sessions without a device
    longest, consumer_names = MAX_IN_USE.total_seconds(), dict(conn.execute("SELECT id, name FROM consumers"))
    for device_id, consumer_id, start, end in _kept_and_fresh(
            conn, stats_query, selection, "stats_engagement",
            f"s.device_id, s.consumer_id, {_SQL_EPOCH_SECONDS % 's.started_utc'},"
            f" {_SQL_EPOCH_SECONDS % 'coalesce(s.stopped_utc, k.last_time, s.started_utc)'}",
            join="JOIN sessions s ON s.id = k.session_id"):
        if start is None or end is None:  # not a time
            continue
        end = min(max(end, start), start + longest)
        owner = devices.get(device_id)
        (owner["spans"] if owner else loose.setdefault(consumer_names.get(consumer_id), [])).append((start, end))

    # The range: the query's, else from the first heartbeat or session to now; never beyond now.
    beating = [d for d in devices.values() if d["first_beat"] is not None]
    every_span = [span for d in devices.values() for span in d["spans"]] + [s for v in loose.values() for s in v]
    start_utc = query.start_utc or (query.date[0] if query.date else None)
    end_utc = query.end_utc or (query.date[1] if query.date else None)
    begin = int(_epoch_seconds(start_utc) // 60) if start_utc else min(
        [d["first_beat"] for d in beating] + [int(start // 60) for start, _ in every_span], default=0)
    # Without heartbeats, nothing is known of the time after the last session.
    finish = int(now.timestamp() // 60) + 1 if beating else max(
        [math.ceil(end / 60) for _, end in every_span], default=begin)
    if end_utc:
        finish = min(finish, math.ceil(_epoch_seconds(end_utc) / 60))
    finish = max(finish, begin)

    def in_range(hour):
        """The mask of an hour's minutes inside [begin, finish)."""
        low, high = max(begin - hour * 60, 0), min(finish - hour * 60, 60)
        return 0 if low >= high else ((1 << high) - 1) ^ ((1 << low) - 1)

    per_day, per_hour = {}, [dict.fromkeys(("known", "on", "in_use", "sessions"), 0) for _ in range(24)]

    def day_row(ordinal):
        return per_day.setdefault(ordinal, dict.fromkeys(("known", "on", "in_use", "sessions"), 0))

    # Known: from each device's first heartbeat on; swept once over the hours, a count of devices known.
    starts = sorted(d["first_beat"] for d in beating)
    known_before = {}  # hour -> minutes known in range and slots before it (one device), for each device's share
    if starts:
        running, position, hour = 0, 0, max(starts[0], begin) // 60
        while hour * 60 < finish:
            mask = in_range(hour)
            known_before[hour] = running
            while position < len(starts) and starts[position] < hour * 60:
                position += 1
            full, partial, at = position, [], position
            while at < len(starts) and starts[at] < hour * 60 + 60:
                partial.append(_HOUR_MASK ^ ((1 << (starts[at] - hour * 60)) - 1))
                at += 1
            for part_mask, low, high, ordinal, of_day in local.parts(hour):
                minutes = high - low if mask == _HOUR_MASK else _ones(mask & part_mask)
                known = minutes * full + (sum(_ones(mask & part_mask & p) for p in partial) if partial else 0)
                if known:
                    row = per_day.get(ordinal) or day_row(ordinal)
                    row["known"] += known
                    per_hour[of_day]["known"] += known
                running += minutes
            hour += 1
        known_before[hour] = running
    last_hour = max(known_before, default=None)

    def known_minutes(first_beat):
        hour = max(first_beat, begin) // 60
        if hour not in known_before:
            return 0
        skipped = sum(_ones(in_range(hour) & p[0] & ((1 << (first_beat - hour * 60)) - 1))
                      for p in local.parts(hour)) if first_beat > hour * 60 else 0
        return known_before[last_hour] - known_before[hour] - skipped

    rows, hour_on, full_on, usual_minutes = [], {}, collections.Counter(), _UsualMinutes(local, begin, finish)
    for device_id, device in devices.items():
        row = {"consumer": device["consumer"], "device": device["device"], "interval_s": device["interval_s"],
               "heartbeats": device["first_beat"] is not None}
        if row["heartbeats"]:
            row.update(_device_on(conn, device_id, device, begin, finish, local, hour_on, full_on, usual_minutes))
            row["known_minutes"] = known_minutes(device["first_beat"])
        else:
            row.update(known_minutes=None, minutes_on=None, usual_hours=None, gaps=None, gap_minutes=None,
                       recent_gaps=[])
        row.update(_device_use(device["spans"], begin, finish, local, day_row, per_hour, row["minutes_on"]))
        rows.append(row)
    for consumer, spans in loose.items():
        row = {"consumer": consumer, "device": None, "interval_s": None, "heartbeats": False, "known_minutes": None,
               "minutes_on": None, "usual_hours": None, "gaps": None, "gap_minutes": None, "recent_gaps": []}
        row.update(_device_use(spans, begin, finish, local, day_row, per_hour, None))
        rows.append(row)
    for key, minutes in hour_on.items():  # the devices' minutes on, into the local days and hours
        _, _, _, ordinal, of_day, _ = local.every_part(key // 2)[key % 2]
        day_row(ordinal)["on"] += minutes
        per_hour[of_day]["on"] += minutes
    for hour, devices_on in full_on.items():  # and their whole hours on
        for _, low, high, ordinal, of_day, counted in local.every_part(hour):
            if counted:
                day_row(ordinal)["on"] += (high - low) * devices_on
                per_hour[of_day]["on"] += (high - low) * devices_on
    rows.sort(key=lambda r: (str(r["consumer"]), r["device"] is None, str(r["device"])))
    rows = [r for r in rows if r["heartbeats"] or r["sessions"]]

    consumers = {}
    for row in rows:
        total = consumers.setdefault(row["consumer"], {"consumer": row["consumer"], "devices": 0,
                                                       "devices_unknown": 0, "known_minutes": 0, "minutes_on": 0,
                                                       "minutes_in_use": 0.0, "in_use_while_known": 0.0,
                                                       "sessions": 0, "sessions_while_known": 0})
        total["devices"] += row["device"] is not None
        total["devices_unknown"] += row["device"] is not None and not row["heartbeats"]
        total["minutes_in_use"] += row["minutes_in_use"]
        total["sessions"] += row["sessions"]
        if row["heartbeats"]:
            total["known_minutes"] += row["known_minutes"]
            total["minutes_on"] += row["minutes_on"]
            total["in_use_while_known"] += row["minutes_in_use"]
            total["sessions_while_known"] += row["sessions"]
    for total in consumers.values():
        in_use, sessions = total.pop("in_use_while_known"), total.pop("sessions_while_known")
        if total["devices"] == total["devices_unknown"]:  # no heartbeats: whether it was on is not known
            total["known_minutes"] = total["minutes_on"] = None
        total["minutes_in_use"] = round(total["minutes_in_use"], 2)
        total["sessions_per_hour_on"] = round(sessions / (total["minutes_on"] / 60), 3) if total["minutes_on"] else None
        total["utilisation"] = _share(in_use, total["minutes_on"])
    return {
        "from": _minute_text(begin), "to": _minute_text(finish), "gap_intervals": GAP_INTERVALS,
        "devices": rows, "consumers": sorted(consumers.values(), key=lambda c: str(c["consumer"])),
        "per_day": [{"day": date.fromordinal(ordinal).isoformat(), "known_minutes": r["known"],
                     "minutes_on": r["on"], "minutes_in_use": round(r["in_use"] / 60, 2), "sessions": r["sessions"],
                     "state": "unknown" if not r["known"] else "off" if not r["on"] else "on"}
                    for ordinal, r in sorted(per_day.items())],
        "per_hour": [{"hour": hour, "known_minutes": r["known"], "minutes_on": r["on"],
                      "minutes_in_use": round(r["in_use"] / 60, 2), "sessions": r["sessions"]}
                     for hour, r in enumerate(per_hour)],
    }


def _on_hours(rows, width):
    """(hour, bits of the minutes on) in order, from a device's rows of
    heartbeat bits (in order): each heartbeat's minute and the `width`
    minutes after it, which may reach into the hours that follow."""
    carried, smeared = {}, {}  # bits reaching into later hours; each bitmap's smear, once
    if width < 60:  # the usual case: into the next hour at most
        carry_hour, carry = None, 0
        for hour, bits in rows:
            if carry_hour is not None and carry_hour != hour:
                yield carry_hour, carry
            spread = smeared.get(bits)
            if spread is None:
                spread = smeared[bits] = _smear(bits, width)
            yield hour, (spread & _HOUR_MASK) | (carry if carry_hour == hour else 0)
            carry = spread >> 60
            carry_hour = hour + 1 if carry else None
        if carry_hour is not None:
            yield carry_hour, carry
        return
    for hour, bits in rows:
        if carried and hour not in carried or len(carried) > 1:
            for earlier in sorted(h for h in carried if h < hour):
                yield earlier, carried.pop(earlier)
        spread = smeared.get(bits)
        if spread is None:
            spread = smeared[bits] = _smear(bits, width)
        yield hour, (spread & _HOUR_MASK) | carried.pop(hour, 0)
        step = 1
        spread >>= 60
        while spread:
            carried[hour + step] = carried.get(hour + step, 0) | (spread & _HOUR_MASK)
            spread >>= 60
            step += 1
    for later in sorted(carried):
        yield later, carried[later]


def _device_on(conn, device_id, device, begin, finish, local, hour_on, full_on, usual_minutes):
    """A device's minutes on (COVERAGE_DEFINITION) in the range, added into
    hour_on ({UTC hour * 2 + part: minutes}) and, its whole hours on in the
    range, full_on ({UTC hour: devices}); its usual hours and its gaps."""
    width = math.ceil(device["interval_s"] / 60)
    habit = min(begin, finish - USUAL_HOURS_FROM)  # the usual hours are found over at least 4 weeks
    total, by_hour, stretches, threshold = 0, [0] * 24, [], GAP_INTERVALS * width
    off_from = max(begin, device["first_beat"])  # where the minutes off since the last minute on began
    rows = conn.execute("SELECT hour, minutes FROM heartbeat_hours WHERE device_id = ? AND hour >= ? AND hour < ?"
                        " ORDER BY hour", (device_id, (habit - width) // 60 - 1, finish // 60 + 1))
    cache, every_part, full, whole_hours = local.cache, local.every_part, _HOUR_MASK, []
    keep_whole_hour = whole_hours.append
    for hour, bits in _on_hours(rows, width):
        start = hour * 60
        if bits == full and begin <= start and start + 60 <= finish:  # most hours: added up by kind below
            keep_whole_hour(hour)
            if start - off_from > threshold:
                stretches.append((off_from, start))
            off_from = start + 60
            continue
        if start + 60 <= habit:
            continue
        if start >= finish:
            break
        parts = cache.get(hour) or every_part(hour)
        ranged = bits & (((1 << min(finish - start, 60)) - 1) ^ ((1 << max(begin - start, 0)) - 1)) \
            if start + 60 > begin else 0
        for index, (mask, _, _, _, of_day, counted) in enumerate(parts):
            by_hour[of_day] += _ones(bits & mask)
            if counted and ranged & mask:
                minutes = _ones(ranged & mask)
                total += minutes
                hour_on[hour * 2 + index] = hour_on.get(hour * 2 + index, 0) + minutes
        if start + 60 <= off_from or not ranged:
            continue
        for minute in range(60):
            if ranged >> minute & 1 and start + minute >= off_from:
                if start + minute - off_from > threshold:
                    stretches.append((off_from, start + minute))
                off_from = start + minute + 1
    if finish - off_from > threshold:
        stretches.append((off_from, finish))
    for kind, hours in local.kinds(whole_hours).items():
        for of_day, minutes, counted in kind:
            by_hour[of_day] += minutes * hours
            total += minutes * hours if counted else 0
    full_on.update(whole_hours)
    most = max(by_hour)
    usual = frozenset(hour for hour in range(24) if most and by_hour[hour] * 2 >= most)
    found = []
    for low, high in stretches:  # a gap: more than the threshold of it in the usual hours
        missed = usual_minutes(low, high, usual)
        if missed > threshold:
            found.append({"from": _minute_text(low), "to": _minute_text(high), "minutes": high - low,
                          "usual_minutes": missed, "ongoing": high == finish})
    return {"minutes_on": total, "usual_hours": sorted(usual), "gaps": len(found),
            "gap_minutes": sum(g["minutes"] for g in found), "recent_gaps": found[-LISTED_GAPS:][::-1]}


class _UsualMinutes:
    """Minutes of a stretch of the range in a device's usual (local) hours
    and the query's slots: whole hours from a running count per set of
    usual hours, made once for the range, the two ends minute by minute."""

    def __init__(self, local, begin, finish):
        self.local, self.first, self.last, self.counts = local, begin // 60, -(-finish // 60), {}

    def __call__(self, low, high, usual):
        counts = self.counts.get(usual)
        if counts is None:
            counts, running = [0], 0
            for hour in range(self.first, self.last + 1):
                running += sum(high_ - low_ for _, low_, high_, _, of_day in self.local.parts(hour) if of_day in usual)
                counts.append(running)
            self.counts[usual] = counts
        inner_from, inner_to = -(-low // 60), high // 60  # the whole hours inside [low, high)
        if inner_from > inner_to:  # within one hour
            return self.edge(low, high, usual)
        return (counts[inner_to - self.first] - counts[inner_from - self.first]
                + self.edge(low, inner_from * 60, usual) + self.edge(inner_to * 60, high, usual))

    def edge(self, low, high, usual):
        """Minutes of [low, high), within one UTC hour, in the usual hours."""
        if low >= high:
            return 0
        hour = low // 60
        span = ((1 << (high - hour * 60)) - 1) ^ ((1 << (low - hour * 60)) - 1)
        return sum(_ones(span & mask) for mask, _, _, _, of_day in self.local.parts(hour) if of_day in usual)


def _device_use(spans, begin, finish, local, day_row, per_hour, minutes_on):
    """A device's (or a consumer's sessions without one) use in the range:
    the union of its sessions' spans, added into the days and hours, and
    how often more than one session ran at once."""
    low, high = begin * 60, finish * 60
    clipped = sorted((max(a, low), min(b, high)) for a, b in spans if a < high and b >= low)
    started = [a for a, _ in spans if low <= a < high]
    for start in started:
        for _, first, end, ordinal, of_day in local.parts(int(start // 3600)):
            if first <= (start % 3600) // 60 < end:
                day_row(ordinal)["sessions"] += 1
                per_hour[of_day]["sessions"] += 1
    merged = []
    for a, b in clipped:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    in_use = 0.0
    for a, b in merged:
        hour = int(a // 3600)
        while hour * 3600 < b:
            for _, first, end, ordinal, of_day in local.parts(hour):
                seconds = min(b, hour * 3600 + end * 60) - max(a, hour * 3600 + first * 60)
                if seconds > 0:
                    day_row(ordinal)["in_use"] += seconds
                    per_hour[of_day]["in_use"] += seconds
                    in_use += seconds
            hour += 1
    # More than one at once: a sweep over the starts and ends.
    changes = sorted([(a, 1) for a, b in clipped] + [(b, -1) for a, b in clipped])
    at_once, most, together, previous = 0, 0, 0.0, None
    for moment, change in changes:
        if at_once >= 2 and previous is not None:
            together += moment - previous
        at_once += change
        most = max(most, at_once)
        previous = moment
    minutes_in_use = in_use / 60
    return {"minutes_in_use": round(minutes_in_use, 2), "sessions": len(started),
            "utilisation": _share(minutes_in_use, minutes_on) if minutes_on else None,
            "sessions_per_hour_on": round(len(started) / (minutes_on / 60), 3) if minutes_on else None,
            "multi_user_share": _share(together, sum(b - a for a, b in merged)), "most_at_once": most}


def _share(part, whole):
    return round(part / whole, 4) if whole else None


def _engagement(conn, stats_query, selection, samples=None):
    """The engagement figures (ENGAGEMENT_DEFINITION) of the sessions a
    StatsQuery selects, from each one's kept or fresh stats_engagement row;
    into `samples` (compute_stats) the touches and screens of each, and the
    measured times of each screen's visits."""
    rows = list(_kept_and_fresh(conn, stats_query, selection, "stats_engagement",
                                "k.touches, k.screens, k.first_touch_ms"))
    touches, screens = [row[0] for row in rows], [row[1] for row in rows]
    first_touches = [row[2] / 1000 for row in rows if row[2] is not None]
    meaningful = sum(n >= stats_query.meaningful for n in touches)
    bounces = sum(n <= 1 for n in touches)
    if samples is not None:
        samples.update(touches=touches, screens=screens, time_on_screen={}, time_on_screen_seen={})
        # Each screen's visits as two JSON arrays, parsed in C: a row of Python per visit cost half of /compare.
        for screen, measured, seen in _kept_and_fresh(
                conn, stats_query, selection, "stats_visits",
                "k.screen, json_group_array(k.ms), json_group_array(k.seen_ms)", tail="GROUP BY k.screen"):
            measured, seen = json.loads(measured), json.loads(seen)
            samples["time_on_screen"].setdefault(screen, []).extend(ms / 1000 for ms in measured if ms is not None)
            if stats_query.holding:  # a session's last visit: seen to its last touch, and maybe beyond (censored)
                times, ended = samples["time_on_screen_seen"].setdefault(screen, ([], []))
                for ms, seen_ms in zip(measured, seen):
                    if ms is not None or seen_ms is not None:
                        times.append((seen_ms if ms is None else ms) / 1000)
                        ended.append(ms is not None)
    return {
        "meaningful_touches": stats_query.meaningful,
        "meaningful_sessions": meaningful, "meaningful_share": _share(meaningful, len(rows)),
        "bounces": bounces, "bounce_share": _share(bounces, len(rows)),
        "touches_per_session": _summary(touches),
        "screens_per_session": _summary(screens),
        "time_to_first_touch": {**_summary(first_touches), "unit": "seconds", "sessions": len(first_touches)},
    }


def screen_types(values, separator):
    """Visits per screen type: the part of a screen's name before `separator`
    (main, year, youtube, ebook in the real week), the whole name if it has none."""
    types = {}
    for value in values:
        name = str(value["value"]).split(separator, 1)[0]
        kind = types.setdefault(name, {"type": name, "visits": 0, "events": 0, "screens": 0})
        kind["visits"] += value["visits"]
        kind["events"] += value["events"]
        kind["screens"] += 1
    return sorted(types.values(), key=lambda kind: (-kind["visits"], kind["type"]))


#: Where transitions begin and end: a session's first screen comes from
#: ENTRY, its last goes to EXIT.
ENTRY, EXIT = "(entry)", "(exit)"
#: How many of the most common paths /stats lists.
COMMON_PATHS = 20


def path_statistics(conn, stats_query, selection):
    """What the selected sessions' paths add up to: touches per hour,
    transitions between screens, the most common paths of their first
    `path_length` screens, and the funnel of `funnel`'s screens. Visits are
    those of VALUES_DEFINITION. Added up from each session's kept visits and
    touches (stats_visits, stats_touches), or the fresh ones compute_stats
    has just made for the sessions it found stale (temp.stale): called by
    compute_stats, inside its snapshot."""
    touches = [0] * 24
    minutes = _kept_and_fresh(conn, stats_query, selection, "stats_touches", "k.minute, sum(k.touches)",
                              "GROUP BY k.minute")
    for _, of_day, n in _in_local_time(minutes, stats_query.tz):
        touches[of_day // 60] += n
    # Each session's visits in order, then a mark that ends the last session.
    visits = itertools.chain(
        _kept_and_fresh(conn, stats_query, selection, "stats_visits", "k.session_id, k.screen, k.ms",
                        "ORDER BY k.session_id, k.visit"),
        [(None, EXIT, None)])
    steps, length = stats_query.funnel, stats_query.path_length
    moves, paths, funnel, journeys = {}, {}, [[0, []] for _ in steps], {}
    session = first_row = object()
    for session_id, screen, ms in visits:  # ms: on the screen, to the next visit (None for the last)
        if session_id != session:
            if session is not first_row:  # the session read ends: its last screen goes to EXIT
                move = moves.get((before, EXIT))
                if move is None:
                    move = moves[before, EXIT] = [0, []]
                move[0] += 1
                if length:
                    first = tuple(first)
                    paths[first] = paths.get(first, 0) + 1
                    # Step by step (JOURNEYS_DEFINITION): its first screens, then (exit) if it ended sooner.
                    chain = (ENTRY, *first, EXIT) if visits < length else (ENTRY, *first)
                    for n in range(1, len(chain)):
                        journeys[n, chain[n - 1], chain[n]] = journeys.get((n, chain[n - 1], chain[n]), 0) + 1
            if session_id is None:
                break
            # before: the previous visit's screen and time on it; elapsed: ms
            # from arriving on the session's first screen to arriving on this one.
            session, before, before_ms, first, step, started, elapsed = session_id, ENTRY, None, [], 0, 0, 0
            visits = 0
        move = moves.get((before, screen))
        if move is None:
            move = moves[before, screen] = [0, []]
        move[0] += 1
        if before_ms is not None:
            move[1].append(before_ms / 1000)
        visits += 1
        if len(first) < length:
            first.append(screen)
        if step < len(steps) and screen == steps[step]:
            started = elapsed if step == 0 else started
            funnel[step][0] += 1
            funnel[step][1].append((elapsed - started) / 1000)
            step += 1
        elapsed += ms or 0
        before, before_ms = screen, ms
    figures = {"touches_per_hour": [{"hour": hour, "touches": n} for hour, n in enumerate(touches)]}
    if stats_query.path_length:
        figures["transitions"] = sorted(
            ({"from": a, "to": b, "count": n, "median_seconds": _summary(times)["median"]}
             for (a, b), (n, times) in moves.items()), key=lambda m: (-m["count"], str(m["from"]), str(m["to"])))
        figures["common_paths"] = [{"path": list(path), "sessions": n} for path, n in sorted(
            paths.items(), key=lambda item: (-item[1], [str(screen) for screen in item[0]]))[:COMMON_PATHS]]
        figures["journeys"] = [{"step": step, "from": a, "to": b, "sessions": n} for (step, a, b), n in sorted(
            journeys.items(), key=lambda item: (item[0][0], -item[1], str(item[0][1]), str(item[0][2])))]
    if stats_query.funnel:
        figures["funnel"] = [{"screen": screen, "sessions": n, "median_seconds": _summary(times)["median"]}
                             for screen, (n, times) in zip(stats_query.funnel, funnel)]
    return figures


def keep_stats(conn, first_session=0, last_session=None, data_key=DEFAULT_DATA_KEY, bin_size=DEFAULT_HEATMAP_BIN):
    """Compute and keep now the figures of the closed sessions with ids from
    `first_session` to `last_session` (an import's; by default every closed
    session without them), which /stats would otherwise compute on its
    first call: over years of events that first call would take as long as
    this. STATS_CHUNK sessions at a time; returns how many sessions'
    figures were kept."""
    low, high = conn.execute("SELECT min(id), max(id) FROM sessions WHERE id BETWEEN ? AND ?",
                             (first_session, sys.maxsize if last_session is None else last_session)).fetchone()
    kept = 0
    for first in range(low or 0, (high or -1) + 1, STATS_CHUNK):
        conn.execute("BEGIN")
        try:
            _find_stale_sessions(conn, "sel AS (SELECT id FROM sessions WHERE id BETWEEN ? AND ?)",
                                 [first, min(first + STATS_CHUNK - 1, high)], data_key, bin_size)
            _compute_session_stats(conn, data_key, bin_size)
            closed = conn.execute("SELECT count(*) FROM temp.stale WHERE closed").fetchone()[0]
        finally:
            if conn.in_transaction:  # as in compute_stats
                conn.execute("COMMIT")
        part = _keep_session_stats(conn, data_key, bin_size)
        kept += part
        if part < closed:  # not to be kept (a read-only file, or no room for this data key and bin)
            break
    return kept


def _in_local_time(minutes, tz_name):
    """(local day as a date ordinal, local minute of the day, n) for each
    (UTC minute as stored, n), in zone `tz_name`. Grouped by UTC minute in
    SQL (a row per minute: 150,000 touched over a million events), they are
    moved by the zone's offset in whole numbers, the offset looked up once a
    UTC day, or each half hour of a day in which it changes (zones change on
    whole UTC hours or half hours)."""
    zone, days = load_timezone(tz_name), {}

    def offset_at(day, of_day):
        return int((day + timedelta(minutes=of_day)).astimezone(zone).utcoffset().total_seconds()) // 60

    for minute, n in minutes:
        day_key = minute[:10]
        day = days.get(day_key)
        if day is None:
            try:
                start = datetime(int(minute[:4]), int(minute[5:7]), int(minute[8:10]), tzinfo=timezone.utc)
            except (TypeError, ValueError):
                continue
            first, last = offset_at(start, 0), offset_at(start, 1439)
            halves = None if first == last else [offset_at(start, half * 30) for half in range(48)]
            days[day_key] = day = (start.toordinal(), first, halves)
        try:
            of_day = int(minute[11:13]) * 60 + int(minute[14:16])
        except ValueError:
            continue
        ordinal, offset, halves = day
        local = of_day + (offset if halves is None else halves[of_day // 30])
        yield ordinal + local // 1440, local % 1440, n


def _add_up_stats(conn, stats_query, selection, samples=None):
    """The figures of the sessions a StatsQuery selects: their own, and the
    per-session ones (kept where valid, else fresh) added up; their
    durations into `samples` (compute_stats)."""
    tz_name, data_key, bin_size = stats_query.tz, stats_query.data_key, stats_query.bin
    selected, params = selection.sql, selection.params

    def add_up(kept, group, figures):
        """{group: figures} over the selected sessions' rows of a stats table;
        `figures` maps a column to how it adds up (sum, min, max). The kept
        and the fresh rows are added up apart (each in its table's order,
        without sorting) and then together."""
        columns = ", ".join([*(f"k.{column}" for column in group),
                             *(f"{how}(k.{column})" for column, how in figures.items()), "count(*)"])
        hows, grouping = [*figures.values(), "sum"], ", ".join(f"k.{column}" for column in group)
        totals = {}
        for row in _kept_and_fresh(conn, stats_query, selection, kept, columns, tail=f"GROUP BY {grouping}"):
            key, new = row[:len(group)], row[len(group):]
            old = totals.get(key)
            totals[key] = new if old is None else [_combine(how, a, b) for how, a, b in zip(hows, old, new)]
        return totals

    per_day, per_hour, per_weekday = {}, [0] * 24, [0] * 7
    for ordinal, of_day, n in _in_local_time(conn.execute(
            f"WITH {selected} SELECT substr(s.started_utc, 1, 16) AS m, count(*) FROM sessions s"
            " JOIN sel ON sel.id = s.id GROUP BY m", params), tz_name):
        per_day[ordinal] = per_day.get(ordinal, 0) + n
        per_hour[of_day // 60] += n
        per_weekday[(ordinal - 1) % 7] += n  # day 1 of the proleptic calendar was a Monday
    # Each session's events and duration, from its kept or fresh figures
    # (an open one's duration ends at its latest event): not its events read again.
    sessions = list(_kept_and_fresh(
        conn, stats_query, selection, "stats_engagement", "k.events, round((julianday(coalesce(s.stopped_utc, k.last_time,"
        " s.started_utc)) - julianday(s.started_utc)) * 86400, 3), s.stopped_utc IS NOT NULL",
        join="JOIN sessions s ON s.id = k.session_id"))
    event_counts = [row[0] for row in sessions]
    durations = [row[1] for row in sessions if row[1] is not None]
    if samples is not None:  # an open session's duration (to its last event) is censored: it goes on
        samples["duration"] = durations
        samples["duration_ended"] = [bool(row[2]) for row in sessions if row[1] is not None]

    actions = sorted(({"action": action, "events": n} for (action,), (n, _) in
                      add_up("stats_actions", ["action"], {"events": "sum"}).items()),
                     key=lambda a: (-a["events"], a["action"]))

    values = []
    for (value,), (n_events, clicks, turns, visits, first, second, third, measured, low, total, high,
                   n_sessions) in add_up("stats_values", ["value"], {
                       "events": "sum", "clicks": "sum", "page_turns": "sum", "visits": "sum", "first": "sum",
                       "second": "sum", "third": "sum", "measured": "sum", "spent_min": "min",
                       "spent_sum": "sum", "spent_max": "max"}).items():
        values.append({"value": value, "events": n_events, "clicks": clicks, "page_turns": turns,
                       "sessions": n_sessions, "visits": visits, "first": first, "second": second, "third": third,
                       "time_spent": {"min": _round(low), "mean": _round(total / measured) if measured else None,
                                      "max": _round(high), "measured": measured}})

    heatmaps, width, height = {}, 0, 0
    navigating = stats_query.touches == "navigating"
    bins = add_up("stats_heat", ["screen", "x", "y"], {"points": "sum", "max_x": "max", "max_y": "max",
                                                       "navigating": "sum"})
    screens_first = sorted(bins.items(), key=lambda item: (isinstance(item[0][0], str), item[0]))  # numbers, then text
    for (screen, x, y), (n, max_x, max_y, n_navigating, _) in screens_first:
        width, height = max(width, max_x), max(height, max_y)  # the screen's size, from every touch
        if navigating:
            n = n_navigating or 0
            if not n:
                continue
        heatmap = heatmaps.setdefault(str(screen), {"points": 0, "bins": []})
        heatmap["points"] += n
        heatmap["bins"].append([x, y, n])

    return {
        "sessions": len(sessions),
        "events": sum(event_counts),
        "timezone": tz_name or str(load_timezone(tz_name)),
        "sessions_per_day": [{"day": date.fromordinal(day).isoformat(), "sessions": n}
                             for day, n in sorted(per_day.items())],
        "sessions_per_hour": [{"hour": h, "sessions": n} for h, n in enumerate(per_hour)],
        "sessions_per_weekday": [{"weekday": WEEKDAYS[d], "sessions": n} for d, n in enumerate(per_weekday)],
        "duration": {**_summary(durations), "unit": "seconds",
                     "distribution": _distribution(durations, DURATION_BUCKETS)},
        "events_per_session": {**_summary(event_counts),
                               "distribution": _distribution(event_counts, EVENT_COUNT_BUCKETS)},
        "actions": actions,
        "data_key": data_key,
        "values": sorted(values, key=lambda v: (-v["events"], str(v["value"]))),
        "heatmaps": {"bin": bin_size, "width": width, "height": height, "touches": stats_query.touches,
                     "screens": heatmaps},
    }


def _combine(how, a, b):
    """Two partial figures as one: added, or the smaller or larger (NULL: none)."""
    if a is None or b is None:
        return b if a is None else a
    return a + b if how == "sum" else min(a, b) if how == "min" else max(a, b)


def _round(value):
    return None if value is None else round(value, 3)


# -- Comparisons of two sets of sessions --------------------------------------

class CompareQuery(NamedTuple):
    """A clean /compare request: the StatsQuery of each side."""

    a: StatsQuery
    b: StatsQuery


def compare_figures(conn, comparison):
    """GET /compare: the /stats figures of two sets of sessions (a
    CompareQuery's sides a and b) and their differences
    (COMPARE_DEFINITION): medians with a Mann-Whitney U test, shares with
    a chi-square or Fisher's exact test, and how many tests were made."""
    (a, samples_a), (b, samples_b) = [(stats_figures(conn, side, samples), samples)
                                      for side, samples in ((comparison.a, {}), (comparison.b, {}))]

    def medians(sample_a, sample_b):
        u, p_value = mann_whitney_u(sample_a, sample_b)
        median_a, median_b = _summary(sample_a)["median"], _summary(sample_b)["median"]
        return {"a_median": median_a, "b_median": median_b,
                "difference": None if None in (median_a, median_b) else _round(median_b - median_a),
                "a_n": len(sample_a), "b_n": len(sample_b), "u": u, "p_value": p_value,
                "test": "mann-whitney" if p_value is not None else None}

    def shares(hits_a, total_a, hits_b, total_b):
        p_value, test = proportion_test(hits_a, total_a, hits_b, total_b)
        share_a, share_b = _share(hits_a, total_a), _share(hits_b, total_b)
        return {"a": share_a, "b": share_b,
                "difference": None if None in (share_a, share_b) else round(share_b - share_a, 4),
                "a_count": hits_a, "a_total": total_a, "b_count": hits_b, "b_total": total_b,
                "p_value": p_value, "test": test}

    def per_screen(figure):
        """shares() of a per-screen figure (first picks, visits) on both sides."""
        counts_a = {value["value"]: value[figure] for value in a["values"]}
        counts_b = {value["value"]: value[figure] for value in b["values"]}
        total_a, total_b = sum(counts_a.values()), sum(counts_b.values())
        screens = sorted(set(counts_a) | set(counts_b),
                         key=lambda s: (-counts_a.get(s, 0) - counts_b.get(s, 0), str(s)))
        return [{"screen": screen, **shares(counts_a.get(screen, 0), total_a, counts_b.get(screen, 0), total_b)}
                for screen in screens if counts_a.get(screen) or counts_b.get(screen)]

    times_a, times_b = samples_a["time_on_screen"], samples_b["time_on_screen"]
    differences = {
        "duration": medians(samples_a["duration"], samples_b["duration"]),
        "duration_survival": logrank(samples_a["duration"], samples_a["duration_ended"],
                                     samples_b["duration"], samples_b["duration_ended"]) or {"p_value": None},
        "touches_per_session": medians(samples_a["touches"], samples_b["touches"]),
        "screens_per_session": medians(samples_a["screens"], samples_b["screens"]),
        "time_on_screen": [{"screen": screen, **medians(times_a.get(screen, []), times_b.get(screen, []))}
                           for screen in sorted(set(times_a) | set(times_b), key=lambda s: (
                               -len(times_a.get(s, ())) - len(times_b.get(s, ())), str(s)))],
        "meaningful_share": shares(a["meaningful_sessions"], a["sessions"], b["meaningful_sessions"], b["sessions"]),
        "first_picks": per_screen("first"),
        "visit_shares": per_screen("visits"),
    }
    p_values = [figure["p_value"] for figure in differences.values() if isinstance(figure, dict)]
    p_values += [row["p_value"] for figure in differences.values() if isinstance(figure, list) for row in figure]
    return {"a": a, "b": b, "differences": differences, "tests": sum(p is not None for p in p_values)}


def mann_whitney_u(sample_a, sample_b):
    """The two-sided Mann-Whitney U test of two samples: (U of sample_a, p
    value), by the normal approximation with the tie and the continuity
    corrections (scipy.stats.mannwhitneyu, method="asymptotic"); (None,
    None) when a sample is empty."""
    n_a, n_b = len(sample_a), len(sample_b)
    if not n_a or not n_b:
        return None, None
    # Plain numbers sorted and counted in C: pairs, a sort key and a group
    # per value cost /compare a tenth of its time.
    pooled, n = sorted(itertools.chain(sample_a, sample_b)), n_a + n_b
    # A value's rank, tied values sharing their mean rank: positions
    # bisect_left .. bisect_right - 1 hold it, ranks one more.
    rank_sum_a = sum(bisect_left(pooled, value) + bisect_right(pooled, value) + 1 for value in sample_a) / 2
    ties = sum(tied ** 3 - tied for tied in collections.Counter(pooled).values() if tied > 1)
    u_a = rank_sum_a - n_a * (n_a + 1) / 2
    spread = math.sqrt(n_a * n_b / 12 * ((n + 1) - ties / (n * (n - 1))))
    if spread == 0:  # every value the same: no evidence of a difference
        return u_a, 1.0
    z = (max(u_a, n_a * n_b - u_a) - n_a * n_b / 2 - 0.5) / spread
    return u_a, min(1.0, math.erfc(z / math.sqrt(2)))


def logrank(times_a, ended_a, times_b, ended_b):
    """The log-rank test of two survival curves (censored times, as
    kaplan_meier takes them): the observed and expected endings of side a
    and b, the chi-square of one degree of freedom and its two-sided p
    value (scipy.stats.logrank's statistic, squared); None where a side is
    empty or nothing ended."""
    pooled = sorted(itertools.chain(((t, bool(e), True) for t, e in zip(times_a, ended_a)),
                                    ((t, bool(e), False) for t, e in zip(times_b, ended_b))), key=lambda row: row[0])
    at_risk, at_risk_a = len(pooled), len(times_a)
    if not times_a or not times_b or not any(row[1] for row in pooled):
        return None
    observed_a = expected_a = variance = 0.0
    for _, group in itertools.groupby(pooled, key=lambda row: row[0]):
        group = list(group)
        ended = sum(e for _, e, _ in group)
        ended_in_a = sum(e and in_a for _, e, in_a in group)
        if ended:
            share_a = at_risk_a / at_risk
            observed_a += ended_in_a
            expected_a += ended * share_a
            if at_risk > 1:
                variance += ended * share_a * (1 - share_a) * (at_risk - ended) / (at_risk - 1)
        at_risk -= len(group)
        at_risk_a -= sum(in_a for _, _, in_a in group)
    ended_total = sum(row[1] for row in pooled)
    chi2 = (observed_a - expected_a) ** 2 / variance if variance else 0.0
    return {"a_observed": int(observed_a), "a_expected": round(expected_a, 3),
            "b_observed": ended_total - int(observed_a), "b_expected": round(ended_total - expected_a, 3),
            "chi2": round(chi2, 4), "p_value": math.erfc(math.sqrt(chi2 / 2)) if variance else 1.0, "test": "log-rank"}


def proportion_test(hits_a, total_a, hits_b, total_b):
    """Whether two shares differ: (p value, the test's name) of the 2x2 table
    of hits and misses, by the chi-square test with Yates' correction
    (scipy.stats.chi2_contingency), or Fisher's exact test where a cell's
    expected count is under 5; (None, None) when a side or a column is empty."""
    table = [[hits_a, total_a - hits_a], [hits_b, total_b - hits_b]]
    rows, columns = [total_a, total_b], [hits_a + hits_b, total_a + total_b - hits_a - hits_b]
    n = total_a + total_b
    if 0 in rows or 0 in columns:
        return None, None
    expected = [[row * column / n for column in columns] for row in rows]
    if min(min(cells) for cells in expected) < 5:
        return fisher_exact(table), "fisher"
    chi2 = 0.0
    for observed_row, expected_row in zip(table, expected):
        for observed, due in zip(observed_row, expected_row):
            gap = abs(due - observed)
            chi2 += max(gap - 0.5, 0) ** 2 / due  # Yates: each cell moved half a count towards its expected
    return math.erfc(math.sqrt(chi2 / 2)), "chi-square"  # the chi-square distribution of one degree of freedom


def fisher_exact(table):
    """The two-sided p value of Fisher's exact test of a 2x2 table: the
    probability of the tables with its margins no likelier than it
    (scipy.stats.fisher_exact)."""
    (a, b), (c, d) = table
    row, column, n = a + b, a + c, a + b + c + d

    def log_probability(x):  # of x hits in the first row: hypergeometric
        return _log_choose(column, x) + _log_choose(n - column, row - x) - _log_choose(n, row)

    observed = log_probability(a) + math.log1p(1e-7)  # scipy's tolerance for equally likely tables
    likelihoods = (log_probability(x) for x in range(max(0, row + column - n), min(row, column) + 1))
    return min(1.0, sum(math.exp(value) for value in likelihoods if value <= observed))


def _log_choose(n, k):
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


# -- Screen images ------------------------------------------------------------

class ScreenImage(NamedTuple):
    """A picture of a screen, as clean_image found it: its media type, its
    size in pixels, its bytes."""
    type: str
    width: int
    height: int
    data: bytes


def put_screen_image(conn, screen, image):
    """Give `screen` (a value of the data key) this ScreenImage, in place of
    any it had."""
    with write_transaction(conn):
        conn.execute("INSERT OR REPLACE INTO screen_images (screen, type, width, height, image, updated_at)"
                     " VALUES (?, ?, ?, ?, ?, ?)", (screen, image.type, image.width, image.height, image.data,
                                                    utc_now()))


def screen_image(conn, screen):
    """The ScreenImage of `screen`, or None."""
    row = conn.execute("SELECT type, width, height, image FROM screen_images WHERE screen = ?", (screen,)).fetchone()
    return ScreenImage(row[0], row[1], row[2], bytes(row[3])) if row else None


def delete_screen_image(conn, screen):
    """Delete the image of `screen`; whether it had one."""
    with write_transaction(conn):
        return conn.execute("DELETE FROM screen_images WHERE screen = ?", (screen,)).rowcount == 1


def list_screens(conn, data_key=DEFAULT_DATA_KEY):
    """The screens: the values of `data_key` that /stats has kept figures of,
    and those with an image, each with its image's type, size and bytes."""
    rows = conn.execute(
        "SELECT screen, type, width, height, length(image), updated_at FROM screen_images UNION ALL"
        " SELECT DISTINCT value, NULL, NULL, NULL, NULL, NULL FROM stats_values WHERE data_key = ? AND bin = ?"
        " AND typeof(value) = 'text' AND value NOT IN (SELECT screen FROM screen_images)",
        (data_key, DEFAULT_HEATMAP_BIN)).fetchall()
    return [{"screen": screen, "image": None if kind is None else
             {"type": kind, "width": width, "height": height, "bytes": size, "updated_at": updated}}
            for screen, kind, width, height, size, updated in sorted(rows, key=lambda row: row[0])]


# -- Import and maintenance ---------------------------------------------------

def import_events(conn, events, source, digest, consumer_name, site=None):
    """Load exported events (clean_exported_event of the GET /events shape:
    id, session_id, time, action, data) with their sessions and times, in
    one transaction; returns the numbers of events added and skipped, of
    sessions, and of sessions and events given new ids (new_ids).

    An import adds sessions and events and never changes one it did not
    bring: a session or event keeps the id it had in the file where that id
    is free, else gets a new one (after every id kept, so that no id the
    file holds is taken by one of its own), and either way its id in the
    file is kept as source_id. Imports of the same origin meet by
    source_id: a session split across two export files is one session, and
    an event brought before is skipped (one with other content stops the
    import). A file is imported once (by its SHA-256). The imported
    sessions' statistics are kept at once (see keep_stats).

    With `site`, the events are another site's (Settings.site there): they
    and their sessions always get ids of their own, and each session's
    consumer is the one its events name (an export with fields=all), else
    `consumer_name`, as consumer@site. What was imported for the site
    before is skipped: importing an export again, or a later one that
    overlaps it, adds only what is new. Without it, every session is
    `consumer_name`'s, and the origin is one earlier Microticks (import
    another's with --site)."""
    import_key = digest if site is None else f"{digest}@{site}"
    with write_transaction(conn):
        done = site is None and conn.execute("SELECT imported_at FROM imports WHERE sha256 = ?",
                                             (import_key,)).fetchone()
        if done:
            raise MicroticksError(409, f"{source} was imported already, on {done[0]}")
        consumers = {}

        def consumer_id_of(name):
            if site is not None:
                name = f"{name}@{site}"
            if name not in consumers:
                row = conn.execute("SELECT id FROM consumers WHERE name = ?", (name,)).fetchone()
                # A consumer for the data only: revoked, so it starts no
                # sessions and `status` does not wait for it to speak.
                consumers[name] = row[0] if row else conn.execute(
                    "INSERT INTO consumers (name, key, created_at, deleted_at, site) VALUES (?, ?, ?, ?, ?)",
                    (name, key_hash(secrets.token_hex(16)), _local_now(), _local_now(), site)).lastrowid
            return consumers[name]

        def taken(table, row_id):
            return site is not None or conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", (row_id,)).fetchone()
        # Sessions and events whose ids are taken wait here (a session under
        # a negative stand-in id) and get theirs once every kept id is in.
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS waiting_events (session_id INTEGER, time TEXT, action TEXT,"
                     " data TEXT, time_utc TEXT, source_id INTEGER, PRIMARY KEY (session_id, source_id))")
        conn.execute("DELETE FROM temp.waiting_events")
        find_session = ("SELECT id FROM sessions WHERE site IS NULL AND source_id = ?" if site is None else
                        "SELECT id FROM sessions WHERE site = ? AND source_id = ?")
        sessions, added, skipped = {}, 0, 0
        now = utc_now()
        session_ids, new_sessions, waiting_sessions = {}, set(), {}  # the file's session ids -> here; ...
        for event in events:
            source_session, source_event = event["session_id"], event["id"]
            if source_session not in session_ids:
                row = conn.execute(find_session, (source_session,) if site is None else (site, source_session)
                                   ).fetchone()
                if row is None:  # its times are set below, from its events
                    consumer_id = consumer_id_of(event["consumer"] or consumer_name if site else consumer_name)
                    if taken("sessions", source_session):
                        row = [-1 - len(waiting_sessions)]
                        waiting_sessions[row[0]] = (source_session, consumer_id)
                    else:
                        conn.execute("INSERT INTO sessions (id, token, ip, started_at, consumer_id, received_at,"
                                     " started_utc, source_id) VALUES (?, ?, '', ?, ?, ?, ?, ?)",
                                     (source_session, secrets.token_hex(16), event["time"], consumer_id, now,
                                      event["time_utc"], source_session))
                        row = [source_session]
                    new_sessions.add(row[0])
                session_ids[source_session] = row[0]
            event["session_id"] = session_id = session_ids[source_session]
            existing = conn.execute("SELECT time, action, data FROM events WHERE session_id = ? AND source_id = ?"
                                    " UNION ALL SELECT time, action, data FROM temp.waiting_events"
                                    " WHERE session_id = ? AND source_id = ?",
                                    (session_id, source_event) * 2).fetchone()
            if existing is not None:
                if (existing[0], existing[1], decode_data(existing[2])) != (
                        event["time"], event["action"], decode_data(event["data"])):
                    raise MicroticksError(409, f"event {source_event} ({event['record']}) was imported before"
                                               " with other content" + (f" for site {site!r}" if site else
                                                                        ": import into a new database (--db)"))
                skipped += 1
                continue
            values = (session_id, event["time"], event["action"], event["data"], event["time_utc"], source_event)
            if taken("events", source_event):
                conn.execute("INSERT INTO temp.waiting_events VALUES (?, ?, ?, ?, ?, ?)", values)
            else:
                conn.execute("INSERT INTO events (id, session_id, time, action, data, time_utc, source_id,"
                             " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (source_event, *values, now))
            added += 1
            span = sessions.setdefault(session_id, [event, event, None])
            if event["time_utc"] < span[0]["time_utc"]:
                span[0] = event
            if event["time_utc"] > span[1]["time_utc"]:
                span[1] = event
            if event["action"] == "stopSession":
                span[2] = event
        for stand_in, (source_session, consumer_id) in waiting_sessions.items():
            first = sessions[stand_in][0]
            session_id = conn.execute(
                "INSERT INTO sessions (token, ip, started_at, consumer_id, received_at, started_utc, site, source_id)"
                " VALUES (?, '', ?, ?, ?, ?, ?, ?)", (secrets.token_hex(16), first["time"], consumer_id, now,
                                                      first["time_utc"], site, source_session)).lastrowid
            conn.execute("UPDATE events SET session_id = ? WHERE session_id = ?", (session_id, stand_in))
            conn.execute("UPDATE temp.waiting_events SET session_id = ? WHERE session_id = ?", (session_id, stand_in))
            sessions[session_id] = sessions.pop(stand_in)
            new_sessions.add(session_id)
        new_ids = {"sessions": 0 if site else len(waiting_sessions),
                   "events": 0 if site else conn.execute("SELECT count(*) FROM temp.waiting_events").fetchone()[0]}
        conn.execute("INSERT INTO events (session_id, time, action, data, time_utc, source_id, received_at)"
                     " SELECT *, ? FROM temp.waiting_events ORDER BY rowid", (now,))
        conn.execute("DELETE FROM temp.waiting_events")
        for session_id, (first, last, stop) in sessions.items():
            end = stop or last
            if session_id in new_sessions:
                conn.execute("UPDATE sessions SET started_at = ?, started_utc = ?, stopped_at = ?, stopped_utc = ?,"
                             " stop_reason = ? WHERE id = ?", (first["time"], first["time_utc"], end["time"],
                                                               end["time_utc"], "client" if stop else "import",
                                                               session_id))
            else:  # an imported session split across two export files
                conn.execute(
                    "UPDATE sessions SET started_at = CASE WHEN ? < started_utc THEN ? ELSE started_at END,"
                    " started_utc = min(started_utc, ?),"
                    " stopped_at = CASE WHEN ? > coalesce(stopped_utc, '') THEN ? ELSE stopped_at END,"
                    " stopped_utc = max(coalesce(stopped_utc, ''), ?) WHERE id = ?",
                    (first["time_utc"], first["time"], first["time_utc"], end["time_utc"], end["time"],
                     end["time_utc"], session_id))
        # Their kept figures, if any, were computed without these events: an
        # event imported with its id may lie below the newest (_find_stale_sessions).
        conn.executemany("DELETE FROM stats_sessions WHERE session_id = ?", [(session,) for session in sessions])
        conn.execute("INSERT OR IGNORE INTO imports (sha256, source, imported_at, events) VALUES (?, ?, ?, ?)",
                     (import_key, source, now, added))
    if sessions:
        keep_stats(conn, min(sessions), max(sessions))
    return {"events": added, "skipped": skipped, "sessions": len(sessions), "new_ids": new_ids}


def delete_sessions(conn, session_ids):
    """Erase sessions and their events (an erasure request); returns the
    numbers of sessions and events removed."""
    with write_transaction(conn):
        marks = ",".join("?" * len(session_ids))
        events = conn.execute(f"DELETE FROM events WHERE session_id IN ({marks})", session_ids).rowcount
        sessions = conn.execute(f"DELETE FROM sessions WHERE id IN ({marks})", session_ids).rowcount
    return sessions, events


def backup_database(conn, target_path):
    """A consistent copy of the live database (SQLite's online backup: the
    service keeps writing meanwhile). Written beside the target, then moved
    in place, so an interrupted backup never leaves half a file. Replaces an
    earlier backup, never a file of another kind (a mistyped path)."""
    if os.path.isdir(target_path):
        raise MicroticksError(400, f"{target_path} is a directory: name the backup's file")
    if os.path.exists(target_path) and os.path.getsize(target_path):
        with open(target_path, "rb") as existing:
            if existing.read(16) != b"SQLite format 3\0":
                raise MicroticksError(400, f"{target_path} exists and is not a database: not overwritten")
    partial = target_path + ".partial"
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial)
    try:
        target = sqlite3.connect(partial)
        target.execute("PRAGMA user_version")  # opens the file: a directory missing or not ours fails here
    except sqlite3.Error as error:
        raise MicroticksError(400, f"Cannot write the backup to {target_path}: {error}") from None
    try:
        conn.backup(target, pages=1024, sleep=0.005)  # in steps: writers wait only a moment
        target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        ok = target.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        target.close()
    if ok != "ok":
        raise MicroticksError(500, f"The copy failed its integrity check: {ok}")
    os.replace(partial, target_path)
    return os.path.getsize(target_path)


def restore_database(conn, backup_path):
    """Replace the database's content with a backup's (checked first)."""
    source = sqlite3.connect(f"file:{backup_path}?mode=ro", uri=True)
    try:
        ok = source.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            raise MicroticksError(400, f"{backup_path} fails its integrity check: {ok}")
        source.backup(conn)
    except sqlite3.DatabaseError as error:
        raise MicroticksError(400, f"{backup_path} is not a Microticks backup: {error}") from None
    finally:
        source.close()
    migrate(conn)


def purge_older_than(conn, cutoff_utc, chunk=2000, max_chunks=None):
    """Delete sessions started before `cutoff_utc`, and their events, a chunk
    of sessions per transaction so that ingest waits a moment at most, and
    the heartbeats of the hours before it.
    Returns the numbers of sessions and events removed."""
    sessions = events = chunks = 0
    while max_chunks is None or chunks < max_chunks:
        with write_transaction(conn):
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM sessions WHERE coalesce(started_utc, started_at) < ? LIMIT ?", (cutoff_utc, chunk))]
            if not ids:
                break
            marks = ",".join("?" * len(ids))
            events += conn.execute(f"DELETE FROM events WHERE session_id IN ({marks})", ids).rowcount
            sessions += conn.execute(f"DELETE FROM sessions WHERE id IN ({marks})", ids).rowcount
        chunks += 1
    hour = int(datetime.fromisoformat(cutoff_utc[:19]).replace(tzinfo=timezone.utc).timestamp() // 3600)
    if conn.execute("SELECT 1 FROM heartbeat_hours WHERE hour < ? LIMIT 1", (hour,)).fetchone():
        with write_transaction(conn):  # all at once: a row an hour and device
            conn.execute("DELETE FROM heartbeat_hours WHERE hour < ?", (hour,))
    return sessions, events


def prepare_read(conn, session_timeout, retention_days=0):
    """What comes before sessions are read or counted, by the HTTP API and
    the commands alike, so that both tell the same: the sessions of
    vanished kiosks closed (idle over `session_timeout` seconds), and with
    a retention, one chunk of the sessions older than it deleted (`purge`
    deletes all at once). A read-only file is read as it is."""
    if conn.read_only:
        return
    close_idle_sessions(conn, session_timeout)
    if retention_days:
        cutoff = format_utc(datetime.now(timezone.utc) - timedelta(days=retention_days))
        purge_older_than(conn, cutoff, chunk=500, max_chunks=1)


def database_status(conn, path, silent_after):
    """What an operator on the phone needs: sizes, counts, open sessions,
    each consumer's and kiosk's last sign of life, and which are silent."""
    now = datetime.now(timezone.utc)

    def age(stamp):
        try:
            return round((now - parse_timestamp(stamp)).total_seconds())
        except (TypeError, ValueError, AttributeError):
            return None

    def size(file):
        with contextlib.suppress(OSError):
            return os.path.getsize(file)
        return 0

    consumers = [dict(r) for r in conn.execute(
        f"SELECT c.name, c.deleted_at, {_CONSUMER_LAST_EVENT} FROM consumers c ORDER BY c.name")]
    devices = [dict(r) for r in conn.execute(
        "SELECT c.name AS consumer, d.name AS device, d.app_version, d.last_seen_at, d.last_heartbeat_at,"
        " d.queue_depth FROM devices d JOIN consumers c ON c.id = d.consumer_id ORDER BY c.name, d.name")]
    limit = silent_after.total_seconds()
    for consumer in consumers:
        consumer["last_event_age_s"] = age(consumer["last_event_at"])
        consumer["silent"] = consumer["deleted_at"] is None and (
            consumer["last_event_age_s"] is None or consumer["last_event_age_s"] > limit)
    for device in devices:
        device["last_seen_age_s"] = age(device["last_seen_at"])
        device["silent"] = device["last_seen_age_s"] is None or device["last_seen_age_s"] > limit
    return {
        "database": os.path.abspath(path), "database_bytes": size(path), "wal_bytes": size(path + "-wal"),
        "read_only": conn.read_only,
        "schema_version": schema_version(conn),
        "events": conn.execute("SELECT count(*) FROM events").fetchone()[0],
        "sessions": conn.execute("SELECT count(*) FROM sessions").fetchone()[0],
        "open_sessions": conn.execute("SELECT count(*) FROM sessions WHERE stopped_at IS NULL").fetchone()[0],
        "last_event_at": max((c["last_event_at"] for c in consumers if c["last_event_at"]), default=None),
        "consumers": consumers, "devices": devices, "silent_after_s": round(limit),
    }


###############################################################################
# Validation ##################################################################
###############################################################################

def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return number


#: Built once: json.loads with these arguments builds a decoder per call.
_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


class IntegerBeyond64Bits:
    """What parse_json makes of an integer that 64 bits cannot hold. SQLite's
    JSON functions read one as an approximation or as Inf, which would
    break statistics and exports; no JSON encoder takes this, so the event
    whose data holds one is refused (_data) and nothing else is."""

    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text


def _integer_of_64_bits(text):
    number = int(text)
    return number if -2**63 <= number < 2**63 else IntegerBeyond64Bits(text)


_CHECKING_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                                  parse_int=_integer_of_64_bits)
#: Maps every digit to "0" and every other byte to " ": a text without 19
#: zeros in a row then holds no integer beyond 64 bits, and is parsed with
#: the decoder that calls no Python function per integer (a third faster).
_DIGITS_AS_ZEROS = bytes(48 if 48 <= byte <= 57 else 32 for byte in range(256))


def may_hold_long_integers(text):
    return b"0000000000000000000" in text.encode("utf-8", "surrogatepass").translate(_DIGITS_AS_ZEROS)


def parse_json(text, max_depth=MAX_DATA_DEPTH):
    """Strict JSON (no NaN or Infinity, which other readers refuse), nesting
    at most `max_depth` levels (None: as deep as the parser goes); ValueError
    otherwise."""
    try:
        value = (_CHECKING_JSON if may_hold_long_integers(text) else _STRICT_JSON).decode(text)
    except RecursionError:
        raise ValueError(f"nests deeper than {max_depth} levels" if max_depth else "nests too deeply") from None
    return checked_json(text, value, max_depth)


def checked_json(text, value, max_depth=MAX_DATA_DEPTH):
    """`value`, parsed from `text`, unless it holds half a surrogate pair or
    nests deeper than `max_depth` (ValueError): parse_json's checks."""
    # An escape can name half a surrogate pair, which no database can store.
    # Most bodies hold no backslash at all: looking for one character is a
    # memchr (0.1 us for a batch of 100), for two a scan of 13 us.
    if "\\" in text and "\\u" in text:
        try:
            json.dumps(value, ensure_ascii=False, default=lambda beyond_64_bits: 0).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("holds a \\u escape of half a surrogate pair (not a character)") from None
    if max_depth is not None and nests_deeper(text, value, max_depth):
        raise ValueError(f"nests deeper than {max_depth} levels")
    return value


def nests_deeper(text, value, levels):
    """Whether parsed JSON nests deeper than `levels`. Every level opens and
    closes a bracket, so a short text, or one with few of them, is not walked."""
    return (len(text) > 2 * levels and text.count("{") + text.count("[") > levels
            and json_depth(value) > levels)


def json_depth(value):
    """How many containers deep a parsed JSON value nests (a level at a time)."""
    depth, level = 0, [value]
    while True:
        level = [item for item in level if type(item) is dict or type(item) is list]
        if not level:
            return depth
        depth += 1
        children = []
        for container in level:
            children.extend(container.values() if type(container) is dict else container)
        level = children


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
    if "\0" in value:  # C readers of the file (and many a CSV tool) end the text there
        raise ValueError(f'"{name}" holds a NUL character')
    return value


def _timestamp(fields, name):
    text = _text(fields, name, MAX_TIMESTAMP_CHARS)
    try:
        return Timestamp(text, utc_text(text))
    except OverflowError:
        raise ValueError(f'"{name}" is out of range') from None
    except ValueError as error:
        raise ValueError(f'"{name}" {error}') from None


_compact_json = _compact_json_encoder()
class _RepeatedKey(Exception):
    pass


def _refuse_repeated_keys(pairs):
    value = dict(pairs)
    if len(value) < len(pairs):
        raise _RepeatedKey
    return value


_KEY_CHECKING_JSON = json.JSONDecoder(object_pairs_hook=_refuse_repeated_keys)


def repeats_a_key(text):
    """Whether JSON text (valid) gives a key twice in one object."""
    try:
        _KEY_CHECKING_JSON.decode(text)
    except _RepeatedKey:
        return True
    return False


def _compact_json_of_data(value, name):
    try:
        return _compact_json(value)
    except TypeError:  # an IntegerBeyond64Bits
        raise ValueError(f'"{name}" holds an integer beyond 64 bits (from -2**63 to 2**63 - 1):'
                         ' send such a number as a string') from None


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
            parsed = parse_json(value)
        except ValueError:
            return json.dumps(value, ensure_ascii=False)
        if may_hold_long_integers(value):
            _compact_json_of_data(parsed, name)
        if isinstance(parsed, (dict, list)) and repeats_a_key(value):
            # Stored as parsed, with the key once (its last value, as
            # JSON.parse reads it): SQLite's JSON functions would read the first.
            return _compact_json_of_data(parsed, name)
        return value
    text = _compact_json_of_data(value, name)
    if len(text) * 4 > MAX_DATA_BYTES and len(text.encode("utf-8")) > MAX_DATA_BYTES:
        raise ValueError(f'"{name}" is larger than {MAX_DATA_BYTES} bytes')
    if nests_deeper(text, value, MAX_DATA_DEPTH):
        raise ValueError(f'"{name}" nests deeper than {MAX_DATA_DEPTH} levels')
    return text


def _check(fields, checks):
    """Run each field's check; one 400 listing every field that failed."""
    try:  # the usual case, at the speed a batch of a thousand events needs
        return {name: check(fields, name) for name, check in checks.items()}
    except ValueError:
        pass
    errors = {}
    for name, check in checks.items():
        try:
            check(fields, name)
        except ValueError as error:
            message = str(error)
            errors[name] = [message if f'"{name}"' in message else f'"{name}": {message}']
    raise MicroticksError(400, next(iter(errors.values()))[0], errors)


def clean_session_start(fields, received):
    clean = _check(fields, {"consumer_key": lambda f, n: _text(f, n, MAX_TOKEN_CHARS * 2),
                            "ts": _timestamp, "uuid": _client_id, "sent_at": _optional_timestamp,
                            "device": lambda f, n: _text(f, n, MAX_DEVICE_CHARS, required=False),
                            "app_version": lambda f, n: _text(f, n, MAX_DEVICE_CHARS, required=False)})
    clean["ts"] = clean["ts"].shifted(clock_offset(clean.pop("sent_at"), received))
    return clean


_CLIENT_ID = LazyPattern(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)


def _client_id(fields, name):
    """A client-chosen id (uuid, boot): up to 64 letters, digits and ._:-"""
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _CLIENT_ID.fullmatch(value):
        raise ValueError(f'"{name}" must be up to 64 letters, digits, dots, colons, dashes or underscores')
    return value


def _sequence_number(fields, name):
    value = fields.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = _whole(value, 2**53 - 1)
    if isinstance(value, float) and value.is_integer():  # JSON Schema counts 3.0 as an integer
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise ValueError(f'"{name}" must be a whole number from 0')
    return value


def _optional_timestamp(fields, name):
    return _timestamp(fields, name) if fields.get(name) not in (None, "") else None


def clock_offset(sent_at, received):
    """How far the client's clock is behind the server's, from the time the
    client says it sent a request and the time it arrived (None: unknown or
    too small to be more than network delay)."""
    if sent_at is None:
        return None
    offset = received - datetime.fromisoformat(sent_at.utc[:-1]).replace(tzinfo=timezone.utc)
    if abs(offset) > MAX_AGE:  # no clock is that far off: a wrong field, or a kiosk whose clock was never set
        message = (f'"sent_at" is {abs(offset).days // 365:,} years from the server\'s clock:'
                   ' send the time the request is sent, from the kiosk\'s clock')
        raise MicroticksError(400, message, errors={"sent_at": [message]})
    return offset if abs(offset) >= MIN_CLOCK_CORRECTION else None


_SENT_AT_CHECK = {"sent_at": _optional_timestamp}


def request_clock_offset(fields, received):
    """clock_offset of a request (or batch) from its sent_at field."""
    return clock_offset(_check(fields, _SENT_AT_CHECK)["sent_at"], received)


def _event_checks(from_form):
    return {"token": lambda fields, name: _text(fields, name, MAX_TOKEN_CHARS),
            "action": lambda fields, name: _text(fields, name, MAX_ACTION_CHARS),
            "data": lambda fields, name: _data(fields, name, from_form),
            "ts": _timestamp, "uuid": _client_id, "seq": _sequence_number,
            "boot": _client_id, "sent_at": _optional_timestamp}


# Built once: a batch runs them a thousand times.
_EVENT_CHECKS = {True: _event_checks(from_form=True), False: _event_checks(from_form=False)}


def clean_event(fields, from_form, offset=None):
    """One event's fields, validated, its time corrected by `offset`.

    The checks of _EVENT_CHECKS, called one by one: a batch runs this a
    thousand times, and without _check's table, its lambdas and the checks
    of the optional fields an event leaves out, it takes three quarters of
    the instructions. An invalid field takes the table's way, which words
    one 400 with every failing field."""
    get = fields.get
    try:
        clean = {"token": _text(fields, "token", MAX_TOKEN_CHARS),
                 "action": _text(fields, "action", MAX_ACTION_CHARS),
                 "data": _data(fields, "data", from_form),
                 "ts": _timestamp(fields, "ts").shifted(offset),
                 "uuid": None if get("uuid") is None else _client_id(fields, "uuid"),
                 "seq": None if get("seq") is None else _sequence_number(fields, "seq"),
                 "boot": None if get("boot") is None else _client_id(fields, "boot")}
        if get("sent_at") is not None:  # checked; the request's (or batch's) sent_at measured the offset
            _optional_timestamp(fields, "sent_at")
    except ValueError:
        _check(fields, _EVENT_CHECKS[from_form])
        raise
    return clean


def check_batch(body):
    """Refuse a batch of the wrong shape before any of it is stored (the
    sessions it starts included): "events" a list of at most MAX_BATCH_EVENTS."""
    events = body["events"]
    if not isinstance(events, list):
        raise MicroticksError(400, '"events" must be a list of events (a batch); a single event sends its fields'
                                   ' without "events"', {"events": ["not a list"]})
    if len(events) > MAX_BATCH_EVENTS:
        raise MicroticksError(413, f"A batch holds at most {MAX_BATCH_EVENTS} events; this one has "
                                   f"{len(events)}: send it in parts")


def clean_batch_sessions(body, received):
    """The session starts a batch carries ({"sessions": [...]}, each a POST
    /sessions body with its uuid): {uuid: clean fields}; a malformed one
    refuses the request. A page that closes before the server's token for
    its new session came back sends the start and the events in one beacon,
    the events naming their session by its uuid."""
    if "sessions" not in body:
        return {}
    sessions = body["sessions"]
    if not isinstance(sessions, list) or len(sessions) > MAX_BATCH_SESSIONS:
        raise MicroticksError(400, f'"sessions" must be a list of at most {MAX_BATCH_SESSIONS} session starts',
                              {"sessions": ["not a list, or too long"]})
    starts = {}
    for number, fields in enumerate(sessions):
        if not isinstance(fields, dict) or not isinstance(fields.get("uuid"), str):
            raise MicroticksError(400, f"Session {number} is not an object of fields with a uuid",
                                  {"sessions": [f"session {number}: no uuid"]})
        try:
            starts[fields["uuid"]] = clean_session_start({"sent_at": body.get("sent_at"), **fields}, received)
        except MicroticksError as error:
            raise MicroticksError(400, f"Session {number}: {error.message}", error.errors) from None
    return starts


def clean_batch(body, received, session_tokens=None):
    """A batch {"events": [...], "sent_at": ...}: a list with, per event,
    its clean fields or the MicroticksError that refuses it alone. An event
    without a token may name a session the batch started ("session": its
    uuid): `session_tokens` maps those uuids to tokens or to the error that
    refused the start. Its shape is check_batch's."""
    offset = request_clock_offset(body, received)
    cleaned = []
    for number, event in enumerate(body["events"]):
        if not isinstance(event, dict):
            cleaned.append(MicroticksError(400, f"Event {number} is not an object of fields"))
            continue
        if session_tokens and not event.get("token") and isinstance(event.get("session"), str):
            token = session_tokens.get(event["session"])
            if isinstance(token, MicroticksError):
                cleaned.append(MicroticksError(token.status_code, f"Event {number}: its session could not be"
                                                                  f" started: {token.message}"))
                continue
            if token:
                event = dict(event, token=token)
        try:
            cleaned.append(clean_event(event, from_form=False, offset=offset))
        except MicroticksError as error:
            cleaned.append(error)
    return cleaned


def clean_networks(text):
    """A comma-separated list of addresses or networks (10.0.0.0/24,
    2001:db8::/48), normalised; ValueError otherwise."""
    networks = []
    for part in (p.strip() for p in (text or "").split(",")):
        if part:
            try:
                networks.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                raise ValueError(f"{part!r} is not an IP address or network") from None
    return ",".join(networks)


def clean_proxies(text):
    """MICROTICKS_TRUSTED_PROXIES' value, as --trusted-proxies takes it."""
    problems = []
    proxies = proxies_setting(text, problems)
    if problems:
        raise ValueError(problems[0].split(": ", 1)[1])
    return proxies


def plain_address(text):
    """An address as stored and compared: an IPv4 client of a server listening
    on :: arrives as ::ffff:a.b.c.d, and is a.b.c.d."""
    if text[:7].lower() == "::ffff:" and "." in text:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(text).ipv4_mapped or text)
    return text


class TrustedProxies:
    """The reverse proxies whose word on the client's address is taken."""

    def __init__(self, entries):
        self.addresses = frozenset(e for e in entries if "/" not in e)
        self.networks = tuple(ipaddress.ip_network(e) for e in entries if "/" in e)

    def __contains__(self, address):
        if address in self.addresses:
            return True
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


def _forwarded_for(forwarded):
    """The for= addresses of a Forwarded header (RFC 7239), left to right."""
    hops = []
    for element in forwarded.split(","):
        for pair in element.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.strip().lower() == "for":
                value = value.strip().strip('"')
                if value.startswith("["):  # [IPv6]:port
                    value = value[1:].partition("]")[0]
                elif value.count(":") == 1:  # IPv4:port
                    value = value.partition(":")[0]
                hops.append(value)
    return hops


def client_address(peer, trusted, named="", header=PROXY_HEADER_CHOICES[0]):
    """The client's address: the connecting peer's, unless the peer is a
    trusted proxy: then, walking the entries of the one header the proxies
    name clients in (`named`, the value of `header`: x-forwarded-for or
    forwarded) from the right, the first that is not a trusted proxy. A
    client that connects directly cannot pose as another with these
    headers; a proxy appends the address it saw to the right."""
    peer = plain_address(peer)
    if peer not in trusted or not named:
        return peer
    hops = _forwarded_for(named) if header == "forwarded" else [h.strip() for h in named.split(",")]
    for hop in reversed(hops):
        hop = plain_address(hop)
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return "unknown"  # "unknown", an obfuscated name, or garbage: no address to go by
        if hop not in trusted:
            return hop
    return plain_address(hops[0]) if hops else peer


def parse_age(text):
    """An age like 365d, 12w, 2y or 48h, as a timedelta; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*([hdwy]?)\s*", text or "", re.ASCII)
    if not match:
        raise ValueError(f"{text!r} is not an age like 365d, 12w, 2y or 48h")
    number, unit = int(match.group(1)), match.group(2) or "d"
    age = timedelta(hours=number) if unit == "h" else timedelta(days=number * {"d": 1, "w": 7, "y": 365}[unit])
    if age > MAX_AGE:
        raise ValueError(f"{text!r} is more than {MAX_AGE.days // 365} years")
    return age


#: Heartbeats a request may carry in beats= (a tracker's queue from offline
#: time): a week of 5-minute ones.
MAX_QUEUED_BEATS = 2016
#: How old a heartbeat may be to be kept (older ones are counted, not kept),
#: and how far ahead of the server's clock it may be, after sent_at's correction.
HEARTBEAT_MAX_AGE = timedelta(days=31)
HEARTBEAT_MAX_LEAD = timedelta(minutes=10)
#: Seconds between heartbeats a tracker may say it sends (interval=).
HEARTBEAT_INTERVALS = (10, 86400)


def _queued_beats(fields, name):
    value = fields.get(name)
    if value is None or value == "":
        return []
    if not isinstance(value, list) or len(value) > MAX_QUEUED_BEATS:
        raise ValueError(f'"{name}" is a list of up to {MAX_QUEUED_BEATS:,} times (ISO 8601 with a zone) of'
                         ' heartbeats queued while offline')
    return [_timestamp({name: beat}, name) for beat in value]


def _heartbeat_interval(fields, name):
    value = _sequence_number(fields, name)
    low, high = HEARTBEAT_INTERVALS
    if value is not None and not low <= value <= high:
        raise ValueError(f'"{name}" is the seconds between heartbeats, {low} to {high:,}')
    return value


def clean_heartbeat(fields, received):
    """A heartbeat: its device, and the minutes (since 1970, UTC) of its
    heartbeats: `ts` (default: when it arrived) and those queued in
    `beats`, corrected by `sent_at` as events are."""
    clean = _check(fields, {"consumer_key": lambda f, n: _text(f, n, MAX_TOKEN_CHARS * 2),
                            "device": lambda f, n: _text(f, n, MAX_DEVICE_CHARS),
                            "app_version": lambda f, n: _text(f, n, MAX_DEVICE_CHARS, required=False),
                            "queue": _sequence_number, "ts": _optional_timestamp, "sent_at": _optional_timestamp,
                            "beats": _queued_beats, "interval": _heartbeat_interval})
    offset, ts = clock_offset(clean.pop("sent_at"), received), clean.pop("ts")
    beats = ([ts] if ts else []) + clean.pop("beats")
    minutes, clean["too_old"] = set(), 0
    for beat in beats:
        moment = datetime.fromisoformat(beat.shifted(offset).utc[:-1]).replace(tzinfo=timezone.utc)
        if moment > received + HEARTBEAT_MAX_LEAD:
            name = "ts" if beat is ts else "beats"
            message = (f'"{name}": {beat.text!r} is more than {HEARTBEAT_MAX_LEAD.seconds // 60} minutes ahead of'
                       " the server's clock: send the kiosk's time, and sent_at if its clock may be wrong")
            raise MicroticksError(400, message, errors={name: [message]})
        if moment < received - HEARTBEAT_MAX_AGE:  # a clock far behind, or a queue kept too long: counted, not kept
            clean["too_old"] += 1
        else:
            minutes.add(int(moment.timestamp() // 60))
    if not beats:
        minutes.add(int(received.timestamp() // 60))
    clean["minutes"] = sorted(minutes)
    return clean


def clean_session_stop(fields, received):
    clean = _check(fields, {"token": lambda f, n: _text(f, n, MAX_TOKEN_CHARS),
                            "ts": _timestamp, "sent_at": _optional_timestamp})
    clean["ts"] = clean["ts"].shifted(clock_offset(clean.pop("sent_at"), received))
    return clean


#: Filters every read takes; `key` is the API key, not a filter.
READ_FILTERS = ("from", "to", "date", "ip", "consumer", "consumer_name", "action", "session", "site", "weekday", "hours",
                "key")
#: weekday='s values: a day's first three letters (or its whole name).
WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PAGE_PARAMETERS = ("after_id", "sort", "sort.desc", "limit", "offset", "format", "fields", "data_keys", "data_key")
STATS_PARAMETERS = ("data_key", "bin", "tz", "type_separator", "paths", "funnel", "meaningful", "touches", "holding",
                    "coverage")
#: The values of /stats' touches= (the heatmaps'), the default first.
TOUCHES_CHOICES = ("all", "navigating")
#: The longest common path (paths=) and funnel (funnel=) /stats takes.
MAX_PATH_STEPS = 10
EXPORT_FORMATS = ("json", "csv", "ndjson")
_DATA_KEY = LazyPattern(r"[A-Za-z0-9_:-]{1,64}", re.ASCII)
_DAY = LazyPattern(r"(\d{4})-(\d\d)-(\d\d)", re.ASCII)
_LOCAL_TIME = LazyPattern(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d([.,]\d{1,9})?)?", re.ASCII)


def time_bound(text, tz_name, end=False):
    """A from/to value as a UTC string: a day (YYYY-MM-DD; as `to`, the
    whole day is included), or a time, read in `tz_name` when it has no zone."""
    try:
        return _time_bound(text.strip(), tz_name, end)
    except OverflowError:  # the year 9999 moved on by a day or a zone, or year 1 moved back
        raise ValueError(f"{text.strip()!r} is out of range: leave it out for no bound") from None


def _time_bound(text, tz_name, end):
    zone = load_timezone(tz_name)
    day = _DAY.fullmatch(text)
    if day:
        try:
            moment = datetime(*map(int, day.groups()))
        except ValueError:
            raise ValueError(f"{text!r} is not a real date") from None
        if end:
            moment += timedelta(days=1)
        return format_utc(moment.replace(tzinfo=zone))
    if _LOCAL_TIME.fullmatch(text):
        try:
            moment = datetime.fromisoformat(text.replace(",", ".")[:26])
        except ValueError:
            raise ValueError(f"{text!r} is not a real date and time") from None
        return format_utc(moment.replace(tzinfo=zone))
    if not _ISO_TIME.fullmatch(text):
        raise ValueError(f"{text!r} is neither a day (2017-05-22) nor a time (2017-05-22T14:00,"
                         " or with a zone: 2017-05-22T14:00Z)")
    return utc_text(text)


def _whole(text, maximum):
    """`text` as a whole number from 0 to `maximum`, or None if it is not one
    (ASCII digits only: int() would take '٣' and ' 3')."""
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > maximum:
        return None
    return int(text)


def _id_parameter(params, name):
    text = params.get(name)
    if text is None or text == "":
        return None
    number = _whole(text, 10**18 - 1)
    if number is None:
        raise ValueError(f'"{name}" must be a whole number from 0 to 10^18 - 1')
    return number


def _data_key_parameter(params, name):
    """The data key naming the screen (/stats, sessions' paths)."""
    value = params.get(name) or DEFAULT_DATA_KEY
    if not _DATA_KEY.fullmatch(value):
        raise ValueError(f'"{name}" is a key of letters, digits, _, : and -, like subject or target')
    return value


def refuse_unknown_parameters(params, allowed):
    """A 400 naming the parameters that are not `allowed`, and those that are
    ("key", the API key, is allowed everywhere but not listed)."""
    unknown = sorted(set(params) - {*allowed, "key"})
    if unknown:
        listed = ", ".join(name for name in allowed if name != "key")
        raise MicroticksError(400, f"Unknown parameter {unknown[0]!r}; allowed: {listed}",
                              {name: ["unknown parameter"] for name in unknown})


def clean_read_query(params, kind, tz_name="", export=False):
    """Turn query parameters (a dict of strings, from a URL or the CLI) into
    a ReadQuery, or refuse with a 400 that names the parameter and what is
    allowed. Without a limit, every row: a JSON answer streams them all
    (page_document), as the first Microticks answered."""
    refuse_unknown_parameters(params, READ_FILTERS + PAGE_PARAMETERS)
    events = kind == "events"
    columns = EVENT_COLUMNS if events else SESSION_COLUMNS
    sorts = EVENT_SORTS if events else SESSION_SORTS

    def bound(end):
        def check(p, name):
            if not p.get(name):
                return None
            try:
                return time_bound(p[name], tz_name, end)
            except ValueError as error:
                raise ValueError(f'"{name}": {error}') from None
        return check

    def date(p, name):
        text = p.get(name)
        if not text:
            return None
        if not _DAY.fullmatch(text):
            raise ValueError('"date" must be a day as YYYY-MM-DD')
        try:  # the UTC day, as from=DAY&to=DAY reads it in UTC
            return time_bound(text, "UTC"), time_bound(text, "UTC", end=True)
        except ValueError as error:
            raise ValueError(f'"date" {error}') from None

    def text(limit):
        def check(p, name):
            value = p.get(name) or None
            if value is not None and len(value) > limit:
                raise ValueError(f'"{name}" is longer than {limit} characters')
            return value
        return check

    def sort(p, name):
        """sort=a (ascending), sort.desc=b (descending); both: by a, then b."""
        order = tuple((p[key], key == "sort.desc") for key in ("sort", "sort.desc") if p.get(key))
        for column, _ in order:
            if column not in sorts:
                raise ValueError(f'cannot sort by {column!r}; sort by one of: {", ".join(sorts)}')
        return order or (("id", False),)

    def limit(p, name):
        value = p.get(name)
        if value is None or value == "":
            return None
        number = _whole(value, 2**62 if export else MAX_PAGE_LIMIT)
        if number is None:
            raise ValueError(f'"limit" must be a whole number from 0 to {MAX_PAGE_LIMIT}'
                             + (" (leave it out for every row)" if not export else ""))
        return number

    def output_format(p, name):
        value = p.get(name) or "json"
        if value not in EXPORT_FORMATS:
            raise ValueError(f'"format" must be one of: {", ".join(EXPORT_FORMATS)}')
        return value

    def fields(p, name):
        value = p.get(name)
        if not value:
            return EVENT_DEFAULT_FIELDS if events else SESSION_DEFAULT_FIELDS
        if value == "all":
            return tuple(columns)
        names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
        wrong = [n for n in names if n not in columns]
        if wrong or not names:
            raise ValueError(f'unknown field {wrong[0] if wrong else value!r}; choose from: '
                             f'{", ".join(columns)} (or all)')
        return names

    def data_keys(p, name):
        value = p.get(name)
        if not value:
            return ()
        if not events:
            raise ValueError('"data_keys" applies to events only')
        keys = tuple(k.strip() for k in value.split(",") if k.strip())
        wrong = [k for k in keys if not _DATA_KEY.fullmatch(k)]
        if wrong or len(keys) > 20:
            raise ValueError('"data_keys" is a comma-separated list of up to 20 keys of'
                             ' letters, digits, _, : and -')
        return keys

    def data_key(p, name):
        if events and p.get(name):
            raise ValueError('"data_key" names the screen in sessions\' path fields; events take data_keys')
        return _data_key_parameter(p, name)

    def weekday(p, name):
        if not p.get(name):
            return ()
        days = [day.strip().lower() for day in p[name].split(",")]
        wrong = [day for day in days if day[:3] not in WEEKDAY_NAMES or not "monday tuesday wednesday thursday"
                 " friday saturday sunday".split()[WEEKDAY_NAMES.index(day[:3])].startswith(day)]
        if wrong or len(p[name]) > 100:
            raise ValueError(f'"weekday" is days, comma-separated, like sat,sun (mon, tue, wed, thu, fri, sat, sun),'
                             f' not {wrong[0][:20] if wrong else p[name][:20]!r}')
        return tuple(sorted({WEEKDAY_NAMES.index(day[:3]) for day in days}))

    def hours(p, name):
        if not p.get(name):
            return ()
        chosen = set()
        for part in p[name].split(","):
            first, dash, last = part.strip().partition("-")
            start, end = _whole(first.strip(), 23), _whole(last.strip(), 24)
            if not dash or start is None or end is None or len(p[name]) > 100:
                raise ValueError('"hours" is local hours from-to, like 10-12 (10:00 to 12:00), comma-separated'
                                 ' (10-12,14-16); 22-2 runs past midnight, 10-10 is the whole day')
            chosen.update(hour % 24 for hour in range(start, end if end > start else end + 24))
        return tuple(sorted(chosen))

    clean = _check(params, {
        "from": bound(False), "to": bound(True), "date": date, "ip": text(64),
        "consumer": _id_parameter, "consumer_name": text(200),
        "action": text(MAX_ACTION_CHARS), "session": _id_parameter, "site": text(MAX_CONSUMER_NAME_CHARS),
        "after_id": _id_parameter, "sort": sort, "limit": limit,
        "offset": _id_parameter, "format": output_format, "fields": fields,
        "data_keys": data_keys, "data_key": data_key, "weekday": weekday, "hours": hours,
    })
    slots = ()
    if clean["weekday"] or clean["hours"]:
        slots = tuple(day * 24 + hour for day in clean["weekday"] or range(7) for hour in clean["hours"] or range(24))
    return ReadQuery(
        kind=kind, start_utc=clean["from"], end_utc=clean["to"], date=clean["date"], ip=clean["ip"],
        consumer_id=clean["consumer"], consumer_name=clean["consumer_name"], action=clean["action"],
        session_id=clean["session"], site=clean["site"], after_id=clean["after_id"], sort=clean["sort"],
        limit=clean["limit"], offset=clean["offset"] or 0, format=clean["format"],
        fields=clean["fields"], data_keys=clean["data_keys"], data_key=clean["data_key"], slots=slots, tz=tz_name)


#: What GET /devices takes.
DEVICES_PARAMETERS = ("from", "to", "date", "consumer", "consumer_name", "site", "weekday", "hours", "tz")


def clean_devices_query(params, settings_tz):
    """GET /devices' range, consumers, local times and zone: a StatsQuery."""
    refuse_unknown_parameters(params, DEVICES_PARAMETERS)
    return clean_stats_query(params, settings_tz)


def clean_stats_query(params, settings_tz):
    """The filters of a statistics request, the data key, the heatmap bin
    size in pixels, the time zone and what the path figures are asked for:
    a StatsQuery."""
    stats_params = {k: v for k, v in params.items() if k in STATS_PARAMETERS}
    filters = {k: v for k, v in params.items() if k not in STATS_PARAMETERS}
    refuse_unknown_parameters(params, READ_FILTERS + STATS_PARAMETERS)

    def tz(p, name):
        value = p.get(name, settings_tz) or ""
        load_timezone(value)
        return value

    def bin_size(p, name):
        number = _whole(p.get(name) or str(DEFAULT_HEATMAP_BIN), MAX_HEATMAP_BIN)
        if not number:  # None, or 0
            raise ValueError(f'"bin" must be a whole number of pixels from 1 to {MAX_HEATMAP_BIN}')
        return number

    # An empty value counts as absent, as everywhere (HTML forms send them).
    def type_separator(p, name):
        value = p.get(name) or ":"
        if len(value) > 3:
            raise ValueError('"type_separator" is 1 to 3 characters, like : (the default) or /')
        return value

    def path_length(p, name):
        if not p.get(name):
            return 0
        number = _whole(p[name], MAX_PATH_STEPS)
        if not number:
            raise ValueError(f'"paths" is how many first screens a common path has: 1 to {MAX_PATH_STEPS}')
        return number

    def funnel(p, name):
        if not p.get(name):
            return ()
        steps = tuple(p[name].split(","))  # screen names as sent, spaces included
        if not 2 <= len(steps) <= MAX_PATH_STEPS or not all(steps) or len(p[name]) > 2000:
            raise ValueError(f'"funnel" is 2 to {MAX_PATH_STEPS} screens in order, comma-separated, like'
                             ' main,year:2017,ebook:nash')
        return steps

    def meaningful(p, name):
        if not p.get(name):
            return DEFAULT_MEANINGFUL_TOUCHES
        number = _whole(p[name], MAX_MEANINGFUL_TOUCHES)
        if not number:
            raise ValueError(f'"meaningful" is how many touches make a session meaningful: 1 to {MAX_MEANINGFUL_TOUCHES}')
        return number

    def touches(p, name):
        value = p.get(name) or TOUCHES_CHOICES[0]
        if value not in TOUCHES_CHOICES:
            raise ValueError('"touches" is all (every touch on the heatmaps) or navigating (only those that moved to'
                             ' another screen: they carry prevSubject)')
        return value

    def switch(meaning):
        def check(p, name):
            if p.get(name, "") not in ("", "0", "1"):
                raise ValueError(f'"{name}" is 1 (add {meaning}) or 0')
            return p.get(name) == "1"
        return check

    extra = _check(stats_params, {"tz": tz, "data_key": _data_key_parameter, "bin": bin_size, "type_separator": type_separator,
                                  "paths": path_length, "funnel": funnel, "meaningful": meaningful, "touches": touches,
                                  "holding": switch("the holding power: survival curves"),
                                  "coverage": switch("the coverage: whether the kiosks were on, and their use")})
    query = clean_read_query(filters, "sessions", extra["tz"], export=True)
    return StatsQuery(query, extra["tz"], extra["data_key"], extra["bin"], extra["type_separator"], extra["paths"],
                      extra["funnel"], extra["meaningful"], extra["touches"], extra["holding"], extra["coverage"])


#: The filters one side of /compare takes, each prefixed with its side (a.from, b.consumer).
SIDE_FILTERS = tuple(name for name in READ_FILTERS if name != "key")


def clean_compare_query(params, settings_tz):
    """Two sets of /stats filters, prefixed a. and b., and the other /stats
    parameters shared by both: a CompareQuery. A side without a filter, an
    unknown prefix or parameter: a 400 naming it."""
    sides, shared = {"a": {}, "b": {}}, {}
    refuse_unknown_parameters(params, [f"{side}.{name}" for side in sides for name in SIDE_FILTERS]
                              + list(STATS_PARAMETERS) + ["key"])
    for name, value in params.items():
        prefix, _, filter_name = name.partition(".")
        if prefix in sides and filter_name in SIDE_FILTERS:
            sides[prefix][filter_name] = value
        else:
            shared[name] = value
    queries = {}
    for side, filters in sides.items():
        if not any(filters.values()):
            message = (f'Side {side} has no filter: give at least one of {side}.from, {side}.to, {side}.consumer,'
                       f' ... (a side without one is every session)')
            raise MicroticksError(400, message, {side: [message]})
        try:
            queries[side] = clean_stats_query({**filters, **shared}, settings_tz)
        except MicroticksError as refusal:  # name the side's parameter: "from" is "a.from"
            errors = {(f"{side}.{name}" if name in filters else name): [
                message.replace(f'"{name}"', f'"{side}.{name}"') if name in filters else message
                for message in messages] for name, messages in refusal.errors.items()}
            raise MicroticksError(400, next(iter(errors.values()))[0] if errors else refusal.message, errors) from None
    return CompareQuery(queries["a"], queries["b"])


def clean_screen_name(text):
    """A screen's name as a path names it: 1 to MAX_SCREEN_CHARS characters,
    without / or control characters (NUL among them), and not . or ..
    (ValueError otherwise)."""
    if not isinstance(text, str) or not text or len(text) > MAX_SCREEN_CHARS:
        raise ValueError(f"a screen's name is 1 to {MAX_SCREEN_CHARS} characters")
    if "/" in text or text in (".", "..") or _CONTROL_CHARACTERS.search(text):
        raise ValueError(f"{text[:60]!r} is not a screen's name: it holds a / or a control character (a NUL,"
                         " a line break...), or is . or ..")
    return text


_CONTROL_CHARACTERS = LazyPattern("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


_PNG_SIGNATURE, _PNG_END = b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82"


def clean_image(data):
    """A PNG, JPEG or WebP image, known by its bytes (not by a name or a
    header), whole, as a ScreenImage; ValueError naming what it is not."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"the image is larger than {MAX_IMAGE_BYTES:,} bytes")
    if data.startswith(_PNG_SIGNATURE):
        if len(data) < 33 or data[12:16] != b"IHDR" or not data.endswith(_PNG_END):
            raise ValueError("the PNG is cut short or damaged (no IHDR first or no IEND last)")
        width, height = struct.unpack(">II", data[16:24])
        kind = "image/png"
    elif data.startswith(b"\xff\xd8\xff"):
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise ValueError("the JPEG is cut short (no end of image marker)")
        width = height = 0
        at = 2
        while at + 9 < len(data):  # the segments up to a frame header (SOF0 to SOF15 but DHT, JPG, DAC)
            if data[at] != 0xFF:
                raise ValueError("the JPEG is damaged (a segment does not start with 0xFF)")
            marker = data[at + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                at += 1 if marker == 0xFF else 2
                continue
            length = struct.unpack(">H", data[at + 2:at + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[at + 5:at + 9])
                break
            at += 2 + length
        kind = "image/jpeg"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        if struct.unpack("<I", data[4:8])[0] + 8 != len(data):
            raise ValueError("the WebP is cut short (its RIFF size is not the file's)")
        chunk = data[12:16]
        if chunk == b"VP8X":
            width = 1 + int.from_bytes(data[24:27], "little")
            height = 1 + int.from_bytes(data[27:30], "little")
        elif chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif chunk == b"VP8 ":
            width, height = (struct.unpack("<H", data[26:28])[0] & 0x3FFF, struct.unpack("<H", data[28:30])[0] & 0x3FFF)
        else:
            width = height = 0
        kind = "image/webp"
    else:
        raise ValueError("the file is not a PNG, JPEG or WebP image (told by its first bytes, not by its name)")
    if not (0 < width <= 65535 and 0 < height <= 65535):
        raise ValueError("the image's size in pixels cannot be read")
    return ScreenImage(kind, width, height, bytes(data))


def clean_annotation(fields):
    """An annotation to store: its time (ISO 8601 with a zone), text, and
    optionally the consumer (a name) and site it belongs to."""
    return _check(fields, {"time": _timestamp,
                           "text": lambda f, n: _text(f, n, MAX_ANNOTATION_CHARS),
                           "consumer": lambda f, n: _text(f, n, MAX_CONSUMER_NAME_CHARS, required=False),
                           "site": lambda f, n: _text(f, n, MAX_CONSUMER_NAME_CHARS, required=False)})


#: The filters GET /annotations takes.
ANNOTATION_FILTERS = ("from", "to", "date", "consumer", "consumer_name", "site", "format", "key")


def clean_annotation_query(params, tz_name):
    """The filters of GET /annotations, as a ReadQuery (read_annotations)."""
    refuse_unknown_parameters(params, ANNOTATION_FILTERS)
    return clean_read_query(params, "sessions", tz_name, export=True)


#: The largest id an import keeps (JavaScript's largest exact integer):
#: SQLite's ids grow from the largest there is, and one near 2**63 would
#: leave no room for the next event or session.
MAX_IMPORTED_ID = 2**53 - 1


def _imported_id(fields, name):
    value = fields.get(name)
    if value is None:
        raise ValueError(f'"{name}" is missing')
    if type(value) is not int or not 1 <= value <= MAX_IMPORTED_ID:
        raise ValueError(f'"{name}" must be a whole number from 1 to {MAX_IMPORTED_ID:,}')
    return value


#: An exported event's fields, through the checks POST /events makes of them.
_EXPORTED_EVENT_CHECKS = {"id": _imported_id, "session_id": _imported_id, "time": _timestamp,
                          "action": lambda fields, name: _text(fields, name, MAX_ACTION_CHARS),
                          "data": lambda fields, name: _data(fields, name, from_form=False)}


def clean_exported_event(record, where):
    """One event of an export file (`where` it is, e.g. "line 12"), ready
    to insert: its fields checked as POST /events checks an event's."""
    if not isinstance(record, dict):
        raise MicroticksError(400, f"{where} is not an object (an event)")
    try:
        clean = _check(record, _EXPORTED_EVENT_CHECKS)
    except MicroticksError as refusal:
        raise MicroticksError(400, f"{where}: {refusal.message}") from None
    consumer = record.get("consumer")  # in an export with fields=all
    try:
        consumer = clean_consumer_name(consumer) if isinstance(consumer, str) else None
    except ValueError:
        consumer = None
    return {"id": clean["id"], "session_id": clean["session_id"], "time": clean["time"].text,
            "time_utc": clean["time"].utc, "action": clean["action"], "data": clean["data"], "consumer": consumer,
            "record": where}


def clean_exported_events(records):
    """clean_exported_event of each (where, record) an export file holds, one at a time."""
    return (clean_exported_event(record, where) for where, record in records)


###############################################################################
# HTTP app ####################################################################
###############################################################################


def content_length(text):
    """A Content-Length header's number of bytes (none: 0), or None unless it
    is all digits: int() also takes "-5", "+5" and other scripts' digits."""
    text = (text or "0").strip()
    return int(text) if text.isascii() and text.isdigit() else None


_IMAGE_PATH = LazyPattern(r"/screens/.+/image")


def body_length(environ):
    """The length of a request's body, refused unless the service would read
    it: chunked (411), or over MAX_BODY_BYTES (413; a screen's image: over
    MAX_IMAGE_BYTES)."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        raise MicroticksError(411, "Send the body with a Content-Length, not chunked")
    length = content_length(environ.get("CONTENT_LENGTH"))
    if length is None:
        raise MicroticksError(400, "Content-Length is not a number of bytes")
    image = environ.get("REQUEST_METHOD") == "PUT" and _IMAGE_PATH.fullmatch(environ.get("PATH_INFO", ""))
    if length > (MAX_IMAGE_BYTES if image else MAX_BODY_BYTES):
        raise MicroticksError(413, f"An image is at most {MAX_IMAGE_BYTES:,} bytes" if image else STATUS_MESSAGES[413])
    return length


def request_fields(request):
    """The fields of a write request, and whether they came from a form.

    Form bodies (what the first frontends' jQuery sent) and JSON objects,
    also sent as text/plain (navigator.sendBeacon cannot set a JSON type)."""
    length = body_length(request.environ)
    try:
        raw = request.body.read(MAX_BODY_BYTES + 1) if length > 0 else b""
    except OSError:  # the client stopped sending the body (a timeout), or went away
        raise MicroticksError(408, "The body did not arrive whole in time") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MicroticksError(400, "The body is not valid UTF-8") from None
    content_type = request.content_type.split(";")[0].strip().lower()
    if content_type in ("", "application/x-www-form-urlencoded") and text.lstrip()[:1] == "{":
        # curl -d '{...}' sends JSON as a form; a form is never one JSON object: read as what it is.
        try:
            value = parse_json(text, max_depth=None)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value, False
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
            # Of a body's fields only `data` is stored as JSON; its depth is
            # checked with it (_data), a batch's event by event.
            value = parse_json(text, max_depth=None)
        except ValueError as error:
            raise MicroticksError(400, f"The body is not valid JSON: {error}") from None
        if not isinstance(value, dict):
            raise MicroticksError(400, "The JSON body must be an object of fields")
        return value, False
    raise MicroticksError(415, f"Unsupported Content-Type {content_type!r}: send "
                               "application/x-www-form-urlencoded or application/json")


def query_params(request):
    """The query string as a dict of strings (the last of repeated names)."""
    try:
        return dict(parse_qsl(request.query_string, keep_blank_values=True, errors="strict",
                              max_num_fields=50))
    except UnicodeDecodeError:
        raise MicroticksError(400, "The query string holds percent-escapes that are not UTF-8") from None
    except ValueError:
        raise MicroticksError(400, "The query string has too many parameters") from None


#: Paths that need no API key: a health check and pages without data.
PUBLIC_PATHS = ("/health", "/", "/dash", "/openapi.json", "/favicon.ico")
EXPORT_CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}


def supplied_api_key(request):
    """The API key a request carries, as bytes ('' when none): an
    X-Microticks-Key header, Authorization: Bearer, or ?key= (the first
    Microticks' way). Headers, because Apache drops Authorization unless
    told otherwise (WSGIPassAuthorization On / CGIPassAuth On)."""
    # From the environ, not through request.get_header(): the header dict
    # Bottle makes for that links back to the environ, and every request's
    # environ (its body included) was left for the garbage collector to find.
    supplied = request.environ.get("HTTP_X_MICROTICKS_KEY")
    if not supplied:
        scheme, _, credentials = request.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "bearer":
            supplied = credentials.strip()
    if not supplied:
        supplied = request.query.get("key", "")
    # WSGI strings are latin-1 decoded bytes: encoding back restores them.
    return supplied.encode("latin-1", "replace")


def cors_headers(settings, origin, preflight=False):
    """CORS headers for a request from `origin` (none when not allowed).
    What a browser may send (methods, headers, how long to remember it)
    matters only in the answer to a preflight, so only that carries it."""
    if "*" in settings.cors_origins:
        allowed = "*"
    elif origin in settings.cors_origins:
        allowed = origin
    else:
        return {"Vary": "Origin"}
    headers = {"Access-Control-Allow-Origin": allowed}
    if allowed != "*":
        headers["Vary"] = "Origin"
    if preflight:
        headers.update({"Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                        "Access-Control-Allow-Headers": "Content-Type, Authorization, X-Microticks-Key",
                        "Access-Control-Max-Age": "86400"})
    return headers


def prometheus_metrics(status, counters):
    """The status and this process's counters in Prometheus' text format."""
    def label(value):
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    lines = []

    def metric(name, kind, help_text, samples):
        lines.extend([f"# HELP microticks_{name} {help_text}", f"# TYPE microticks_{name} {kind}"])
        for labels, value in samples:
            where = ",".join(f'{k}="{label(v)}"' for k, v in labels.items())
            lines.append(f"microticks_{name}{{{where}}} {value}" if where else f"microticks_{name} {value}")

    # Each worker process (gunicorn, mod_wsgi) counts its own, and a scrape
    # reaches any of them: labelled, each worker's counts are a series of
    # their own, which sum() adds up, not one series jumping between workers.
    this_process = {"process": os.getpid()}
    for name, help_text in [("events_stored", "Events stored by this process."),
                            ("events_refused", "Events refused by this process (bad input, unknown session)."),
                            ("events_duplicate", "Events answered as duplicates (retries) by this process."),
                            ("requests_refused", "Requests answered 4xx by this process."),
                            ("database_errors", "Requests answered 503 by this process (database busy, full"
                                                " or unwritable, or busy with expensive reads)."),
                            ("reads_shared", "Statistics or comparisons answered with the work of an identical"
                                             " request under way at the same time."),
                            ("reads_refused", "Statistics or comparisons answered 503 while as many as this"
                                              " process takes at once were under way.")]:
        metric(f"{name}_total", "counter", help_text, [(this_process, counters[name])])
    metric("lock_waits_total", "counter", "Write transactions of this process that waited for another"
           " writer's turn (a thread of this process or another process).",
           [(this_process, LOCK_WAITS[0])])
    metric("events", "gauge", "Events in the database.", [({}, status["events"])])
    metric("sessions", "gauge", "Sessions in the database.", [({}, status["sessions"])])
    metric("sessions_open", "gauge", "Sessions not stopped yet.", [({}, status["open_sessions"])])
    metric("database_bytes", "gauge", "Size of the database file.", [({}, status["database_bytes"])])
    metric("wal_bytes", "gauge", "Size of the write-ahead log.", [({}, status["wal_bytes"])])
    metric("consumer_last_event_age_seconds", "gauge", "Seconds since a consumer's last event (-1: never).",
           [({"consumer": c["name"]}, -1 if c["last_event_age_s"] is None else c["last_event_age_s"])
            for c in status["consumers"] if c["deleted_at"] is None])
    metric("device_last_seen_age_seconds", "gauge", "Seconds since a kiosk was last heard from.",
           [({"consumer": d["consumer"], "device": d["device"]}, d["last_seen_age_s"]) for d in status["devices"]])
    metric("device_queue_depth", "gauge", "Events waiting in a kiosk's queue at its last heartbeat.",
           [({"consumer": d["consumer"], "device": d["device"]}, d["queue_depth"] or 0) for d in status["devices"]])
    metric("silent", "gauge", f"Consumers and kiosks silent for over {status['silent_after_s']} seconds.",
           [({}, sum(c["silent"] for c in status["consumers"]) + sum(d["silent"] for d in status["devices"]))])
    return "\n".join(lines) + "\n"


class RateLimiter:
    """Requests per second per client address, with bursts of four seconds'
    worth: a runaway kiosk cannot flood the box. Per process (a gunicorn
    worker or mod_wsgi daemon each count on their own; CGI counts nothing).
    The addresses last seen are kept, the longest unseen forgotten first:
    the cost of a request stays the same however many addresses call."""

    max_addresses = 10000

    def __init__(self, rate):
        self.rate, self.burst = float(rate), 4.0 * rate
        self.buckets = collections.OrderedDict()  # address -> (tokens, when), the longest unseen first
        self.lock = threading.Lock()

    def allow(self, address):
        now = time.monotonic()
        with self.lock:
            tokens, then = self.buckets.pop(address, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            allowed = tokens >= 1
            self.buckets[address] = (tokens - 1 if allowed else tokens, now)
            if len(self.buckets) > self.max_addresses:
                self.buckets.popitem(last=False)  # a forgotten address starts again with a full burst
            return allowed


class KeyFailures:
    """Wrong API and consumer keys per client address and minute, counted by
    every process serving one database (gunicorn and mod_wsgi workers each
    kept their own count: four workers let four times the guesses through)
    in a small file beside it, `-keyfailures`, mapped into memory: a lookup
    costs a microsecond, whatever the number of addresses. Where that file
    cannot be made, this process counts alone. Beyond MAX_KEY_FAILURES in a
    minute, an address's wrong keys are answered 429 until the minute is
    over; a right key always gets in, so that nobody can lock a kiosk out
    by sending wrong keys from its address (a shared NAT, a visitor on the
    museum's network). A guess that hits would get in too: guessing is
    made hopeless by the keys themselves (consumer keys are 128 random
    bits; a weak MICROTICKS_KEY is refused at start-up: api_key_problem)."""

    slots = 8192
    slot = struct.Struct("<QQI4x")  # address hash, minute, failures
    probes = 4

    def __init__(self, database_path=None):
        self.database_path, self.lock, self.file, self.counts = database_path, threading.Lock(), None, None

    def _open(self):
        """The counts, made on the first wrong key (most CGI processes, a
        request each, never see one)."""
        size, database_path = self.slots * self.slot.size, self.database_path
        if database_path and database_path != ":memory:" and fcntl:
            try:
                self.file = open_beside_database(database_path, "-keyfailures", os.O_RDWR)
                # Its blocks allocated now: a write to a hole of a mapped file on
                # a full disk is a SIGBUS, which would end the service.
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(self.file, 0, size)
                elif os.fstat(self.file).st_size < size:
                    os.ftruncate(self.file, size)
                import mmap  # lazily: see the imports
                self.counts = mmap.mmap(self.file, size)
                return
            except (OSError, ValueError) as error:
                log.warning("cannot keep %s-keyfailures (%s): each process counts wrong keys on its own",
                            database_path, error)
                if self.file is not None:
                    os.close(self.file)
                self.file = None
        self.counts = bytearray(size)

    def _find(self, address, minute):
        """The slot of `address` (its own, or the first free or stale one)
        and what it holds."""
        key = int.from_bytes(hashlib.blake2b(address.encode("utf-8", "replace"), digest_size=8).digest(), "little")
        key = key or 1  # 0 marks a free slot
        first = key % self.slots
        choice = None
        for n in range(self.probes):
            offset = (first + n) % self.slots * self.slot.size
            held_key, held_minute, failures = self.slot.unpack_from(self.counts, offset)
            if held_key == key:
                return offset, key, (failures if held_minute == minute else 0)
            if choice is None and (held_key == 0 or held_minute != minute):
                choice = offset
        return (first * self.slot.size if choice is None else choice), key, 0

    def record(self, address):
        """Count a wrong key from `address`; returns its wrong keys this
        minute, and the seconds left of the minute."""
        now = time.time()
        minute = int(now // 60)
        with self.lock:
            if self.counts is None:
                self._open()
            if self.file is not None:
                fcntl.lockf(self.file, fcntl.LOCK_EX)  # a lock per process (an flock is shared across a fork)
            try:
                offset, key, failures = self._find(address, minute)
                self.slot.pack_into(self.counts, offset, key, minute, failures + 1)
            finally:
                if self.file is not None:
                    fcntl.lockf(self.file, fcntl.LOCK_UN)
        return failures + 1, 60 - int(now % 60)


#: Seconds /health answers 503 after a write failed, unless one works before.
WRITE_FAILURE_SHOWN = 60
class ServerContract:
    """How the built-in server (its section, below) and this app talk
    besides WSGI: keys of the app's config, which say what the app offers,
    and of a request's environ, which carry what one side tells the other
    about that request. Any other WSGI server knows none of them, and gets
    a plain WSGI app.

    - ANSWERS_HEADS (app.config, True): the app answers a request's head
      alone, before the server reads a body still to come. The server then
      calls it with HEAD_ONLY set in the environ and an empty body; the app
      answers a refusal (a wrong key, an unknown path, a body over the
      limit), which the server sends and then drops the body unread, or
      raises a 100 response left at GO_ON: read the body, and ask again.
    - COMMON_HEADERS (app.config): a function of a request's Origin giving
      the headers (CORS, nosniff) the server adds to answers it writes
      itself (400 and 431 for what it cannot parse, 408, 413).
    - CLIENT_GONE (environ): a function telling whether the request's
      client has closed its connection; the app stops expensive work for
      it then (SharedReads)."""

    ANSWERS_HEADS = "microticks.answers_heads"
    COMMON_HEADERS = "microticks.common_headers"
    HEAD_ONLY = "microticks.head_only"
    GO_ON = "microticks.go_on"
    CLIENT_GONE = "microticks.client_gone"


class SharedReads:
    """Expensive reads (statistics, comparisons, sessions with their paths)
    kept from starving cheap ones (ingest, /health), per process:

    - identical requests at once are computed once, their answer shared;
    - at most `limit` are under way (computed or awaited), the others
      answered 503 with Retry-After, so that some of the server's workers
      are always free for the kiosks;
    - figures never kept before (a new data key or bin, which read every
      event) are computed for one request at a time (new_figures);
    - work whose clients have all gone stops at its next step (`wanted`)."""

    def __init__(self, limit, counters):
        self.lock = threading.Lock()
        self.under_way = {}  # request key -> its flight
        self.slots = threading.BoundedSemaphore(limit)
        self.new_figures = threading.Lock()
        self.counters = counters  # reads_shared, reads_refused: for /metrics

    def answer(self, key, compute, wanted):
        """compute(still_wanted)'s answer for the request `key`, or another's
        computing it at the same time; `wanted()` says whether this request's
        client still waits."""
        if not self.slots.acquire(blocking=False):
            self.counters["reads_refused"] += 1
            raise MicroticksError(HTTPStatus.SERVICE_UNAVAILABLE, "The server is busy with other statistics or"
                                  " comparisons; try again in a moment", headers={"Retry-After": "2"})
        try:
            while True:
                with self.lock:
                    flight = self.under_way.get(key)
                    leading = flight is None
                    if leading:
                        flight = self.under_way[key] = {"done": threading.Event(), "answer": None, "waiting": 0}
                    else:
                        flight["waiting"] += 1
                if leading:
                    try:
                        flight["answer"] = compute(lambda: flight["waiting"] > 0 or wanted())
                        return flight["answer"]
                    finally:
                        with self.lock:
                            del self.under_way[key]
                        flight["done"].set()
                try:
                    while not flight["done"].wait(0.25):
                        if not wanted():
                            raise ClientGone
                finally:
                    with self.lock:
                        flight["waiting"] -= 1
                if flight["answer"] is not None:
                    self.counters["reads_shared"] += 1
                    return flight["answer"]
                # It failed, or stopped: this request computes its own (an error is not shared).
        finally:
            self.slots.release()

# nosniff: a browser takes a JSON or CSV answer for nothing else (an event's
# text, shown as HTML, would be a way in for script).
FIXED_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class Service:
    """What the app's hooks and routes share, for one Settings: its database,
    the limits on clients, this process's counters. make_app gives its app
    one; a hook or route finds it as service()."""

    def __init__(self, settings):
        self.settings = settings
        self.sentry = init_sentry(settings)
        self.db = Database(settings.db_path, settings.site)
        self.api_key = settings.api_key.encode("utf-8")
        self.rate_limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None
        self.key_failures = KeyFailures(settings.db_path)
        self.trusted_proxies = TrustedProxies(settings.trusted_proxies)
        self.proxy_header = "HTTP_" + settings.proxy_header.upper().replace("-", "_")
        #: When this process's last write failed, and why (None: it worked).
        self.write_failure = None
        #: This process's counters for /metrics (each worker process counts its own).
        self.counters = {"events_stored": 0, "events_refused": 0, "events_duplicate": 0, "requests_refused": 0,
                         "database_errors": 0, "reads_shared": 0, "reads_refused": 0}
        #: Half the built-in server's workers at most for expensive reads.
        self.reads = SharedReads(max(1, settings.threads // 2), self.counters)
        # Allowing any origin, every answer has the same headers: built once.
        self.any_origin = ({**cors_headers(settings, None), **FIXED_HEADERS} if "*" in settings.cors_origins
                           else None)

    def common_headers(self, origin, preflight=False):
        """CORS headers for `origin`, and FIXED_HEADERS."""
        if self.any_origin and not preflight:
            return self.any_origin
        return {**cors_headers(self.settings, origin, preflight), **FIXED_HEADERS}

    def client_ip(self):
        """The client's address, worked out once per request. Not Bottle's
        request.remote_addr, which believes any X-Forwarded-For."""
        environ = bottle.request.environ
        address = environ.get("microticks.client")
        if address is None:
            address = environ["microticks.client"] = client_address(
                environ.get("REMOTE_ADDR") or "unknown", self.trusted_proxies,
                environ.get(self.proxy_header, ""), self.settings.proxy_header)
        return address

    def connection(self):
        return self.db.connection()

    def prepare_read(self):
        """prepare_read before a read, and before a session starts: a chunk
        of retention each time keeps up without ever holding up ingest long."""
        prepare_read(self.db.connection(), self.settings.session_timeout, self.settings.retention_days)

    def current_status(self):
        self.prepare_read()  # vanished kiosks' sessions are not counted open
        return database_status(self.db.connection(), self.settings.db_path,
                               timedelta(hours=self.settings.silent_hours))

    def count(self, results):
        """Count store_events' results for /metrics; returns them."""
        refused = sum(isinstance(result, MicroticksError) for result in results)
        duplicate = sum(isinstance(result, dict) and "duplicate" in result for result in results)
        self.counters["events_refused"] += refused
        self.counters["events_duplicate"] += duplicate
        self.counters["events_stored"] += len(results) - refused - duplicate
        return results

    def expensive_read(self, compute, kinds=()):
        """compute(connection) for this request as SharedReads bounds it;
        `kinds`: the (data key, bin) pairs whose figures it reads, any of
        which, never kept before, makes it wait for no other such work."""
        request = bottle.request
        key = (request.path, tuple(sorted((name, value) for name, value in query_params(request).items()
                                          if name != "key")))
        client_gone = request.environ.get(ServerContract.CLIENT_GONE)
        return self.reads.answer(key, lambda still_wanted: self._computed(compute, kinds, still_wanted),
                                 (lambda: not client_gone()) if client_gone else (lambda: True))

    def _computed(self, compute, kinds, still_wanted):
        conn = self.connection()
        new = any(not figures_kept(conn, *kind) for kind in kinds)
        if new and not self.reads.new_figures.acquire(blocking=False):
            raise MicroticksError(HTTPStatus.SERVICE_UNAVAILABLE, "Another request is computing figures of a data"
                                  " key or bin never asked for before, which reads every event: try again in a"
                                  " minute", headers={"Retry-After": "10"})
        checked = time.monotonic()

        def stop_unless_wanted():  # SQLite calls it as it works: a true answer interrupts the statement
            nonlocal checked
            if time.monotonic() - checked < 0.1:
                return 0
            checked = time.monotonic()
            return 0 if still_wanted() else 1
        conn.set_progress_handler(stop_unless_wanted, 100000)
        try:
            return compute(conn)
        except sqlite3.OperationalError as error:
            if "interrupt" in str(error) and not still_wanted():
                raise ClientGone from None
            raise
        finally:
            conn.set_progress_handler(None, 0)
            if new:
                self.reads.new_figures.release()

    def wrong_key(self, refusal):
        """A WrongKey, counted for the client's address: itself, or beyond
        MAX_KEY_FAILURES in a minute, a 429 in its place (KeyFailures)."""
        failures, wait = self.key_failures.record(self.client_ip())
        if failures <= MAX_KEY_FAILURES:
            return refusal
        return MicroticksError(429, f"Too many wrong keys from this address: over {MAX_KEY_FAILURES} in a minute."
                                    f" Try again in {wait} s", headers={"Retry-After": str(wait)})

    @contextlib.contextmanager
    def counting_wrong_keys(self):
        """Around a consumer key's check: a WrongKey is raised as wrong_key says."""
        try:
            yield
        except WrongKey as refusal:
            raise self.wrong_key(refusal) from None


def service():
    """The Service of the app answering this request."""
    return bottle.request.app.service


# -- The error handler, the plugin and the hooks ------------------------------

def render_error(error):
    """Every error, Bottle's own (404, 405, 413...) included, as JSON."""
    # Where it was raised and what it replaced are of no more use, and
    # their frames (Bottle's among them) hold the error itself: a cycle
    # that kept the request's environ and body until the garbage
    # collector ran, which a server runs seldom (settle_for_serving).
    error.__traceback__ = error.__context__ = error.__cause__ = None
    request, response, counters = bottle.request, bottle.response, service().counters
    response.headers.update(service().common_headers(request.environ.get("HTTP_ORIGIN")))
    response.content_type = "application/json"
    status = error.status_code
    if isinstance(error, MicroticksError):
        message = error.message
    elif status == 500 and getattr(error, "traceback", None):
        # Raised where no plugin sees it (a streamed answer's first part).
        log.error("unexpected error on %s %s:\n%s", request.method, request.path, error.traceback)
        message = STATUS_MESSAGES[500]
    elif status == 404:
        message = f"No such endpoint: {request.method} {request.path}"
    else:
        message = STATUS_MESSAGES.get(status, error.status_line)
    allowed = None
    if status == 405:
        allowed = [method for method in error.headers.get("Allow", "").split(",") if method]
        message = f"{request.method} is not allowed on {request.path}: use {' or '.join(allowed)}"
    if 400 <= status < 500:
        counters["requests_refused"] += 1
    elif status == 503:
        counters["database_errors"] += 1
    return error_json(status, message, getattr(error, "errors", None), allowed)


def refuse_failures(callback):
    """Plugin: the one place where a failure below a route becomes an
    answer. Database trouble is a 503 the client may retry; anything else
    unexpected is logged (and sent to Sentry) and answered 500."""
    def wrapper(*args, **kwargs):
        own, writes = service(), bottle.request.method != "GET"
        try:
            answer = callback(*args, **kwargs)
            if writes:
                own.write_failure = None
            return answer
        except bottle.HTTPResponse:
            raise
        except ClientGone:
            log.info("%s %s: the client went away; its work stopped", bottle.request.method, bottle.request.path)
            raise MicroticksError(HTTPStatus.SERVICE_UNAVAILABLE, "The client went away") from None
        except sqlite3.Error as error:
            # Not the client's fault, and the operator must hear of it
            # (a full disk, a file that lost its write permission).
            log.error("database error on %s %s: %s", bottle.request.method, bottle.request.path, error)
            if own.sentry:
                own.sentry.capture_exception(error)
            problem = None
            if not isinstance(error, ReadOnlyDatabase):
                with contextlib.suppress(sqlite3.Error):
                    problem = write_problem(own.connection(), own.settings.db_path)
            message = (f"The database {error}" if isinstance(error, ReadOnlyDatabase) else
                       f"The database cannot be written: {problem}" if problem else
                       f"The database is unavailable ({error}); try again later")
            if writes:  # /health tells it until a write works again
                own.write_failure = (time.monotonic(), message)
            raise MicroticksError(503, message, headers={"Retry-After": "5"}) from None
        except Exception as error:
            log.exception("unexpected error on %s %s", bottle.request.method, bottle.request.path)
            if service().sentry:
                service().sentry.capture_exception(error)
            raise MicroticksError(500, STATUS_MESSAGES[500]) from None
    return wrapper


def preflight_and_authenticate():
    """Before every request: CORS preflights answered, then the rate limit
    and the API key; for a head alone (the built-in server's question before
    a body still to come), an answer now or a go-on."""
    request, own = bottle.request, service()
    request.environ["microticks.started"] = time.perf_counter()
    if request.method == "OPTIONS":
        # CORS preflights carry no credentials, whatever the path.
        raise bottle.HTTPResponse(status=204, headers=own.common_headers(request.environ.get("HTTP_ORIGIN"),
                                                                         preflight=True))
    # The built-in server asks with a request's head alone, before it
    # reads a body still to come: a refused one is then never held.
    head_only = request.environ.get(ServerContract.HEAD_ONLY)
    if head_only:
        body_length(request.environ)
    if request.path not in PUBLIC_PATHS and not request.path.startswith("/examples/"):
        # Not monitoring, nor a page that holds no data (pages ask for the key themselves).
        if own.rate_limiter and not head_only and not own.rate_limiter.allow(own.client_ip()):
            raise MicroticksError(429, f"Too many requests from this address: at most {own.settings.rate_limit}"
                                       " a second; send events in batches", headers={"Retry-After": "1"})
        if own.api_key and not hmac.compare_digest(supplied_api_key(request), own.api_key):
            raise own.wrong_key(WrongKey(401, "Missing or wrong API key: send it as ?key=, an X-Microticks-Key"
                                              " header or Authorization: Bearer",
                                         headers={"WWW-Authenticate": 'Bearer realm="microticks"'}))
    if head_only:  # go on: the body is read, and the request answered with it
        request.app.router.match(request.environ)  # else an unknown path or method is answered now (404, 405)
        # Kept where answer_to_head finds it: Bottle's frame holds what was
        # raised, whose traceback holds that frame (and the environ), a cycle.
        raise request.environ.setdefault(ServerContract.GO_ON, bottle.HTTPResponse(status=100))


def finish():
    """After every request: the common headers, and a line in the log."""
    request, response = bottle.request, bottle.response
    response.headers.update(service().common_headers(request.environ.get("HTTP_ORIGIN")))
    if log.isEnabledFor(logging.INFO) and response.status_code != 100:
        started = request.environ.get("microticks.started", time.perf_counter())
        # The path only: the query string may carry the API key.
        log.info("%s %s %s %d %.1fms", service().client_ip(), request.method,
                 request.path, response.status_code, (time.perf_counter() - started) * 1000)


# -- The routes, in the order of ROUTES ---------------------------------------

PAGE_SECURITY = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
                 "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


#: The demo runs only its own files' scripts; it may send to any service URL typed into it.
EXAMPLES_SECURITY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
                     " connect-src *; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page(text, nonce=None):
    """An HTML page, with a policy that lets no script run but its own."""
    bottle.response.content_type = "text/html; charset=utf-8"
    policy = PAGE_SECURITY + (f"; script-src 'nonce-{nonce}'" if nonce else "")
    bottle.response.set_header("Content-Security-Policy", policy)  # nosniff comes with every answer's headers
    return text


def documentation():
    request = bottle.request
    base = request.urlparts.scheme + "://" + request.urlparts.netloc + request.script_name.rstrip("/")
    return page(render_docs(openapi_spec(), base))


def openapi():
    return openapi_spec()


def dashboard():
    # A fresh nonce per answer: only our own script may run on the page.
    nonce = secrets.token_urlsafe(16)
    return page(fill(DASHBOARD_HTML, NONCE=nonce, EMBEDDED="null"), nonce)


def favicon():
    bottle.response.status = 204  # none; saves a 404 line in the log per page view


def examples_index():
    bottle.redirect(bottle.request.script_name + "examples/index.html")


def examples(filename):
    # static_file refuses paths that leave the folder (404 JSON otherwise).
    answer = bottle.static_file(filename, root=EXAMPLES_DIR)
    answer.set_header("Content-Security-Policy", EXAMPLES_SECURITY)
    if isinstance(answer, bottle.HTTPError):
        raise MicroticksError(answer.status_code, f"No such example file: {filename}"
                              + ("" if os.path.isdir(EXAMPLES_DIR) else f" (there is no folder {EXAMPLES_DIR})"))
    return answer


def health():
    own = service()
    check_writable(own.connection(), own.settings.db_path)
    if own.write_failure and time.monotonic() - own.write_failure[0] < WRITE_FAILURE_SHOWN:
        raise MicroticksError(503, f"The last write failed: {own.write_failure[1]}", headers={"Retry-After": "5"})
    return {"status": "ok", "version": __version__}


def consumers():
    return {"consumers": list_consumers(service().connection()), "status": 200}


def status():
    return dict(service().current_status(), status=200)


def metrics():
    bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
    return prometheus_metrics(service().current_status(), service().counters)


def post_session():
    own, received = service(), datetime.now(timezone.utc)
    fields, _ = request_fields(bottle.request)
    clean = clean_session_start(fields, received)
    own.prepare_read()
    with own.counting_wrong_keys():
        token, existed = start_session(own.connection(), clean["consumer_key"], clean["ts"], own.client_ip(),
                                       clean["uuid"], clean["device"], clean["app_version"], own.settings.store_ip)
    return {"token": token, "status": 200, **({"duplicate": True} if existed else {})}


def post_events():
    own, received = service(), datetime.now(timezone.utc)
    fields, from_form = request_fields(bottle.request)
    if not from_form and "events" in fields:
        check_batch(fields)
        starts = clean_batch_sessions(fields, received)
        tokens = start_sessions(own.connection(), starts, own.client_ip(), own.settings.store_ip)
        tokens = {uuid: own.wrong_key(token) if isinstance(token, WrongKey) else token
                  for uuid, token in tokens.items()}
        results = own.count(own.db.store_events(clean_batch(fields, received, tokens)))
        return {"results": [result.fields() if isinstance(result, MicroticksError) else result
                            for result in results], "status": 200}
    offset = request_clock_offset(fields, received)
    result = own.count(own.db.store_events([clean_event(fields, from_form, offset)]))[0]
    if isinstance(result, MicroticksError):
        raise result
    return {**result, "status": 200}


def post_session_stop():
    fields, _ = request_fields(bottle.request)
    clean = clean_session_stop(fields, datetime.now(timezone.utc))
    stopped = stop_session(service().connection(), clean["token"], clean["ts"])
    return {"stopped": True, "already_stopped": not stopped, "status": 200}


def post_heartbeat():
    own = service()
    fields, _ = request_fields(bottle.request)
    clean = clean_heartbeat(fields, datetime.now(timezone.utc))
    write = heartbeat_write(clean["consumer_key"], clean["device"], clean["app_version"], clean["queue"],
                            own.client_ip(), own.settings.store_ip, clean["minutes"], clean["interval"])
    device = []  # committed with the events of concurrent requests, as theirs are
    own.db.store_events([], also=lambda conn: device.append(write(conn)))
    if isinstance(device[0], MicroticksError):
        with own.counting_wrong_keys():
            raise device[0]
    return {"device_id": device[0], "minutes": len(clean["minutes"]), "too_old": clean["too_old"], "status": 200}


def read_answer(kind):
    """GET /events and GET /sessions: every row as one JSON document, a page
    (limit=), or a streamed export."""
    own, request = service(), bottle.request
    query = clean_read_query(query_params(request), kind, own.settings.tz,
                             export=request.query.get("format") in ("csv", "ndjson"))
    own.prepare_read()
    if query.format == "json" and query.limit is None:  # every row, streamed: the first Microticks' answer
        bottle.response.content_type = "application/json"
        return page_document(own.connection(), query, {"status": 200})
    if query.format == "json":
        return dict(read_page(own.connection(), query), status=200)
    return download(kind, query.format, export_chunks(own.connection(), query))


def download(kind, output_format, chunks):
    """An export's text as a file to save: microticks-KIND-TIME.FORMAT."""
    bottle.response.content_type = EXPORT_CONTENT_TYPES[output_format]
    bottle.response.set_header("Content-Disposition", f'attachment; filename="microticks-{kind}-'
                               f'{datetime.now().strftime("%Y%m%d-%H%M%S")}.{output_format}"')
    return chunks


def get_events():
    return read_answer("events")


def get_sessions():
    return read_answer("sessions")


def get_session(session_id):
    own, screen_key = service(), query_params(bottle.request).get("data_key")
    query = clean_read_query({"session": str(session_id), "fields": "all", **({"data_key": screen_key} if screen_key
                                                                              else {})}, "sessions", own.settings.tz)
    own.prepare_read()
    sessions = read_page(own.connection(), query)["sessions"]
    if not sessions:
        raise MicroticksError(404, f"No session {session_id}")
    return {"session": sessions[0], "status": 200}


def get_stats():
    own = service()
    stats_query = clean_stats_query(query_params(bottle.request), own.settings.tz)
    own.prepare_read()
    return dict(own.expensive_read(lambda conn: stats_figures(conn, stats_query),
                                   [(stats_query.data_key, stats_query.bin)]), status=200)


def get_compare():
    own = service()
    comparison = clean_compare_query(query_params(bottle.request), own.settings.tz)
    own.prepare_read()
    return dict(own.expensive_read(lambda conn: compare_figures(conn, comparison),
                                   {(side.data_key, side.bin) for side in comparison}), status=200)


def post_annotation():
    fields, _ = request_fields(bottle.request)
    clean = clean_annotation(fields)
    annotation = add_annotation(service().connection(), clean["time"], clean["text"], clean["consumer"],
                                clean["site"])
    bottle.response.status = 201
    return {"annotation": annotation, "status": 201}


def get_annotations():
    query = clean_annotation_query(query_params(bottle.request), service().settings.tz)
    if query.format == "json":
        return {"annotations": read_annotations(service().connection(), query), "status": 200}
    return download("annotations", query.format, export_annotations(service().connection(), query, query.format))


def screen_named(screen):
    try:
        return clean_screen_name(screen)
    except ValueError as error:
        raise MicroticksError(400, f"The screen's name: {error}", {"screen": [str(error)]}) from None


def get_screens():
    params = query_params(bottle.request)
    refuse_unknown_parameters(params, ("data_key", "key"))
    data_key = _check(params, {"data_key": _data_key_parameter})["data_key"]
    return {"screens": list_screens(service().connection(), data_key), "status": 200}


def put_image(screen):
    screen, request = screen_named(screen), bottle.request
    body_length(request.environ)
    try:
        image = clean_image(request.body.read(MAX_IMAGE_BYTES + 1))
    except OSError:  # the client stopped sending (a timeout), or went away
        raise MicroticksError(408, "The image did not arrive whole in time") from None
    except ValueError as error:
        raise MicroticksError(400, f"Not stored: {error}", {"image": [str(error)]}) from None
    put_screen_image(service().connection(), screen, image)
    return {"screen": screen, "image": {"type": image.type, "width": image.width, "height": image.height,
                                        "bytes": len(image.data)}, "status": 200}


def get_image(screen):
    image = screen_image(service().connection(), screen_named(screen))
    if image is None:
        raise MicroticksError(404, f"The screen {screen!r} has no image: give it one with PUT")
    # Served as what it is, never read as anything else, nor allowed to load or run anything.
    return bottle.HTTPResponse(image.data, headers={"Content-Type": image.type,
                                                    "Content-Security-Policy": "default-src 'none'"})


def remove_image(screen):
    if not delete_screen_image(service().connection(), screen_named(screen)):
        raise MicroticksError(404, f"The screen {screen!r} has no image")
    return {"deleted": screen, "status": 200}


def get_screen_touches(screen):
    own, screen = service(), screen_named(screen)
    stats_query = clean_stats_query(query_params(bottle.request), own.settings.tz)
    own.prepare_read()
    return dict(own.expensive_read(lambda conn: screen_heatmap(conn, stats_query, screen),
                                   [(stats_query.data_key, stats_query.bin)]), status=200)


def get_devices():
    own = service()
    stats_query = clean_devices_query(query_params(bottle.request), own.settings.tz)
    own.prepare_read()
    return dict(own.expensive_read(lambda conn: device_uptime(conn, stats_query)), status=200)


def get_report():
    own = service()
    own.prepare_read()
    html, name = own.expensive_read(lambda conn: report_document(conn, query_params(bottle.request), own.settings.tz))
    bottle.response.set_header("Content-Disposition", f'attachment; filename="{name}"')
    return page(html)


def remove_annotation(annotation_id):
    if not delete_annotation(service().connection(), annotation_id):
        raise MicroticksError(404, f"No annotation {annotation_id}")
    return {"deleted": annotation_id, "status": 200}


#: Every route: method, path, handler (the API description lists them too).
ROUTES = [
    ("GET", "/", documentation),
    ("GET", "/openapi.json", openapi),
    ("GET", "/dash", dashboard),
    ("GET", "/favicon.ico", favicon),
    ("GET", "/examples", examples_index),
    ("GET", "/examples/", examples_index),
    ("GET", "/examples/<filename:path>", examples),
    ("GET", "/health", health),
    ("GET", "/consumers", consumers),
    ("GET", "/status", status),
    ("GET", "/metrics", metrics),
    ("POST", "/sessions", post_session),
    ("POST", "/events", post_events),
    ("POST", "/sessions/stop", post_session_stop),
    ("POST", "/heartbeat", post_heartbeat),
    ("GET", "/events", get_events),
    ("GET", "/sessions", get_sessions),
    ("GET", "/sessions/<session_id:int>", get_session),
    ("GET", "/stats", get_stats),
    ("GET", "/compare", get_compare),
    ("POST", "/annotations", post_annotation),
    ("GET", "/annotations", get_annotations),
    ("DELETE", "/annotations/<annotation_id:int>", remove_annotation),
    ("GET", "/report", get_report),
    ("GET", "/screens", get_screens),
    ("PUT", "/screens/<screen:path>/image", put_image),
    ("GET", "/screens/<screen:path>/image", get_image),
    ("GET", "/screens/<screen:path>/touches", get_screen_touches),
    ("GET", "/devices", get_devices),
    ("DELETE", "/screens/<screen:path>/image", remove_image),
]


def make_app(settings, only_path=None):
    """The WSGI application for `settings`; MicroticksError for settings it
    cannot serve with (a weak API key). With `only_path` (a CGI process,
    which answers one request), only the routes that could match that path
    are made: Bottle compiles each route's pattern, 3 ms of a CGI request."""
    configure_logging(settings)
    problem = api_key_problem(settings.api_key)
    if problem:
        raise MicroticksError(HTTPStatus.SERVICE_UNAVAILABLE, problem)
    app = bottle.Bottle()
    app.service = own = Service(settings)
    # Bottle's own JSONPlugin calls json.dumps, which builds an encoder per
    # answer: 1.1% of the instructions of a batch of 100.
    app.uninstall("json")
    app.install(bottle.JSONPlugin(json_dumps=_answer_json))
    app.install(refuse_failures)
    app.default_error_handler = render_error
    app.add_hook("before_request", preflight_and_authenticate)
    app.add_hook("after_request", finish)
    for method, path, handler in ROUTES:
        if only_path is None or only_path.startswith(path.split("<")[0]):
            app.route(path, method, handler)
    app.config[ServerContract.ANSWERS_HEADS] = True  # see preflight_and_authenticate
    app.config[ServerContract.COMMON_HEADERS] = own.common_headers
    return app


###############################################################################
# Built-in server #############################################################
###############################################################################

# Our own server (`serve`'s default), on the standard library's wsgiref and
# http.server. Its classes hold our parts, joined to the classes they build
# on when a server is made (on_stdlib), and rely on these of their parts,
# which are not all public: the tests check them on every Python from 3.9 to
# 3.13.
STDLIB_PARTS = {
    "wsgiref.handlers.BaseHandler": ("run", "cleanup_headers", "send_headers", "finish_content", "log_exception",
                                     "close", "headers_sent", "os_environ", "http_version"),
    "wsgiref.handlers.SimpleHandler": ("_write", "_flush"),
    "wsgiref.simple_server.WSGIRequestHandler": ("get_stderr", "server_version"),
    "http.server.BaseHTTPRequestHandler": ("handle_expect_100", "send_response", "send_header", "end_headers"),
    "wsgiref.simple_server.WSGIServer": ("set_app", "get_app", "setup_environ"),
    "socketserver.TCPServer": ("server_activate", "server_close", "shutdown_request", "close_request",
                               "handle_error", "request_queue_size", "address_family"),
}


# -- Reading requests ahead ---------------------------------------------------

_HTTP_VERSION = LazyPattern(r"HTTP/\d{1,10}\.\d{1,10}", re.ASCII)


def request_line_words(line):
    """A request line's method, target and version, or None for a line that
    is not one."""
    words = line.split()
    return words if len(words) == 3 and _HTTP_VERSION.fullmatch(words[2]) else None


def header_fields(lines):
    """A head's header lines (bytes, after the request line) as they were
    sent, [(name, value)], and by lower-case name, {name: [values]}: the one
    reading of a head that the selector, its question to the app and the
    worker share. ValueError names a malformed line: no field name, or a
    folded one."""
    header_lines, fields = [], {}
    for line in lines:
        name, colon, value = str(line, "iso-8859-1").partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError(f"Bad header line ({line[:100]!r})")
        value = value.strip()
        header_lines.append((name, value))
        fields.setdefault(name.lower(), []).append(value)
    return header_lines, fields


def framing_problem(fields):
    """What makes a head's framing (where its body ends) ambiguous, as
    (status, message), or None. Such a request is answered from its head
    and the connection closed, its body never awaited: a proxy in front may
    have read it otherwise (request smuggling), and a client that sends no
    body would hold a worker waiting for one."""
    lengths, encodings = fields.get("content-length", []), fields.get("transfer-encoding", [])
    if len(lengths) > 1:
        return HTTPStatus.BAD_REQUEST, "Content-Length given more than once"
    if encodings and lengths:
        return HTTPStatus.BAD_REQUEST, "Transfer-Encoding and Content-Length both given"
    if encodings and ",".join(encodings).strip().lower() != "chunked":
        return HTTPStatus.NOT_IMPLEMENTED, f"Transfer-Encoding {','.join(encodings)[:100]!r} is not supported"
    return None


class _ReadAhead:
    """A connection's input: the bytes read ahead of the worker, then the
    socket's. The server's selector thread reads each request whole
    (read_now, request_ready) before a worker thread takes it, so a client
    that sends half a request and stalls, or connects and says nothing,
    holds no worker: eight such clients used to hold all eight for 15 s.
    A body that has not come with its head is read only once the app has
    seen the head and would not refuse it whatever the body holds (a wrong
    API key, a body over the limit): a refused body is read and dropped
    (dropping), so it costs neither a worker nor memory, and the answer is
    not destroyed by a reset, as closing a socket with unread data makes
    one. The selector also answers Expect: 100-continue itself. A worker
    reads from the socket itself only what a request's framing leaves
    unknown (a chunked body, which the app refuses)."""

    #: Unfinished heads (request line and headers) are handed to a worker
    #: beyond this size, to be refused (414, 431) as the limits say.
    max_head = 2 * 65536
    head_end = re.compile(rb"\n\r?\n")

    def __init__(self, sock, timeout):
        self.sock, self.ahead, self.closed = sock, bytearray(), False
        self.started = 0.0  # time.monotonic() when the first byte read ahead came
        #: Seconds a request has to arrive whole, from its first byte.
        self.timeout = timeout
        #: The request being read: whether its head was shown to the app (and
        #: 100 Continue sent, if asked for), and how many bytes of a refused
        #: one's body are still to be dropped (None: none refused).
        self.head_checked = self.continued = False
        self.dropping = None
        #: The size of the request being read, once its head is let through
        #: and its body is still to come; how much of the server's buffer
        #: budget it has (PooledWSGIServer).
        self.due = self.reserved = 0

    def next_request(self):
        """Forget the request just taken: what is read ahead is the next one."""
        self.head_checked = self.continued = False
        self.due = 0

    def time_left(self):
        """Seconds the request being read has left to arrive whole."""
        return self.started + self.timeout - time.monotonic()

    def _recv(self, timeout, size=65536):
        """One recv, waiting at most `timeout` seconds (0: not at all); the
        socket's own timeout (for writing the answer) is kept."""
        kept = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(size)
        finally:
            self.sock.settimeout(kept)

    def read_now(self, size=65536):
        """Read what the client has sent (up to `size` bytes), without waiting;
        False once it has closed, or once a refused request's body has been
        dropped whole."""
        try:
            data = self._recv(0, size)  # a timeout would wait on a socket select() called readable in error
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if self.dropping is not None:
            self.dropping -= len(data)
            return bool(data) and self.dropping > 0
        if data and not self.ahead:
            self.started = time.monotonic()
        self.ahead += data
        return bool(data)

    def request_ready(self, answer_to_head):
        """Whether the bytes read ahead hold the next request whole, or as much
        of it as the server waits for before a worker takes it. A body still
        to come is awaited only if answer_to_head(head, length) has no
        answer to the head alone; else that is sent, and the body dropped."""
        if self.dropping is not None:
            return False
        end = self.head_end.search(self.ahead)
        if end is None:
            return len(self.ahead) > self.max_head
        try:
            fields = header_fields(self.ahead[:end.start()].split(b"\n")[1:])[1]
        except ValueError:
            return True  # the worker refuses it
        if "content-length" not in fields or framing_problem(fields):
            return True  # no body, or one the worker refuses from the head (chunked: 411)
        length = content_length(fields["content-length"][0])
        if length is None or len(self.ahead) >= end.end() + length:
            return True
        if not self.head_checked:
            self.head_checked = True
            answer = answer_to_head(bytes(self.ahead[:end.end()]), length)
            if answer is not None:  # refused: drop the body as it comes, then close
                self.dropping = end.end() + length - len(self.ahead)
                del self.ahead[:]
                self._send_now(answer)
                return False
            if (fields.get("expect", [""])[0].lower() == "100-continue"
                    and self.ahead[:end.start()].split(b"\n", 1)[0].rstrip().endswith(b"HTTP/1.1")):
                self._send_now(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.continued = True
            self.due = end.end() + length
        return False

    def _send_now(self, data):
        """Send without waiting (the selector thread must not): an answer
        this small fits the socket's buffer; a client that reads nothing
        loses it, as it deserves."""
        kept = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            with contextlib.suppress(OSError):
                self.sock.send(data)
        finally:
            self.sock.settimeout(kept)

    def _take(self, size):
        data = bytes(self.ahead[:size])
        del self.ahead[:size]
        return data

    def _more(self):
        """Wait for more bytes, as long as the request's time lasts (then
        TimeoutError: a client trickling a byte at a time has no longer than
        one that stalls); False at the end."""
        data = self._recv(max(0.001, self.time_left()))
        self.ahead += data
        return bool(data)

    def readline(self, size=-1):
        start = 0
        while True:
            end = self.ahead.find(b"\n", start)
            if end >= 0 and (size is None or size < 0 or end < size):
                return self._take(end + 1)
            if size is not None and 0 <= size <= len(self.ahead):
                return self._take(size)
            start = len(self.ahead)
            if not self._more():
                return self._take(len(self.ahead))

    def read(self, size=-1):
        while (size is None or size < 0 or len(self.ahead) < size) and self._more():
            pass
        return self._take(len(self.ahead) if size is None or size < 0 else size)

    def close(self):
        self.closed = True


class _BodyReader:
    """wsgi.input of one request on a kept-alive connection: reads no further
    than its Content-Length, so the next request's bytes stay unread."""

    def __init__(self, stream, length):
        self.stream, self.left = stream, length

    def read(self, size=-1):
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.stream.read(size) if size else b""
        self.left -= len(data)
        return data

    def readline(self, size=-1):
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.stream.readline(size) if size else b""
        self.left -= len(data)
        return data

    def readlines(self, hint=-1):
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")


# -- Connections --------------------------------------------------------------

@lru_cache(maxsize=None)
def on_stdlib(ours):
    """One of our server's classes (_ResponseWriter, ConnectionHandler,
    PooledWSGIServer) joined to the standard library's class it builds on
    (its stdlib_base, of wsgiref.simple_server), made on first use: a CGI
    request never makes a server, and importing wsgiref.simple_server
    (http.server, socketserver, platform, html) was a twentieth of its cost."""
    from wsgiref import simple_server
    return type(ours.__name__, (ours, getattr(simple_server, ours.stdlib_base)),
                {"__module__": __name__, "__doc__": ours.__doc__})


class _ResponseWriter:
    """wsgiref's response writer, noting whether the response said where it
    ends (then the connection can carry another request). A streamed answer
    of unknown length (an export) goes to an HTTP/1.1 client in chunks, so
    that one cut short by an error lacks its last chunk and the client can
    tell: a connection closed after a partial body reads as a whole one."""

    stdlib_base = "ServerHandler"
    http_version = "1.1"
    length_known = False
    chunked = False
    #: Set when the application failed after the answer had begun.
    broken = False
    #: wsgiref copies the process's environment into every request's
    #: environ (MICROTICKS_KEY included); the app reads its settings once.
    os_environ = {}

    def cleanup_headers(self):
        super().cleanup_headers()  # a Content-Length where the whole body is known
        if ("Content-Length" not in self.headers and self.environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
                and self.environ.get("REQUEST_METHOD") != "HEAD" and self.status[:3] not in ("204", "304")):
            self.headers["Transfer-Encoding"] = "chunked"
            self.chunked = True

    def write(self, data):
        if self.status and not self.headers_sent:
            self.send_headers()  # decides on chunks; goes out with the first part, in one packet
        if self.chunked and data:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        super().write(data)

    def finish_content(self):
        if self.chunked and self.headers_sent:
            self._write(b"0\r\n\r\n")
            self._flush()
        else:
            super().finish_content()

    def log_exception(self, exc_info):
        self.broken = self.headers_sent
        log.error("%s %s failed after its answer began: the client gets it cut short",
                  self.environ.get("REQUEST_METHOD"), self.environ.get("PATH_INFO"), exc_info=exc_info)

    def close(self):
        self.length_known = self.headers is not None and ("Content-Length" in self.headers or self.chunked)
        super().close()  # forgets the headers


def _closing_answer(status, headers, body):
    """The bytes of an answer the server writes itself (no app between, or
    the app's answer to a head alone), after which the connection closes."""
    return (f"HTTP/1.1 {status}\r\n".encode("latin-1") + "".join(f"{k}: {v}\r\n" for k, v in headers).encode("latin-1")
            + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


class ConnectionHandler:
    """One client connection, answering requests one at a time (HTTP/1.1
    keep-alive). The server hands it to a worker thread whenever the client
    has sent something, so an idle connection holds no thread."""

    stdlib_base = "WSGIRequestHandler"
    protocol_version = "HTTP/1.1"
    #: Seconds a client may take to send a request it has started.
    timeout = 15
    #: A buffered response goes out in one packet when flushed; unbuffered,
    #: its headers and body leave as two, and Nagle's algorithm holds the
    #: second until the client's delayed ACK: 40 ms per request.
    wbufsize = 64 * 1024
    #: Unread request bodies up to this size are drained, not cut off.
    drain_limit = 2 * MAX_BODY_BYTES
    #: Whether an answer failed midway: the connection is reset, not closed.
    aborted = False

    def __init__(self, request, client_address, server):
        # Not BaseRequestHandler's __init__, which would handle the request at once.
        self.request, self.client_address, self.server = request, client_address, server
        self.setup()

    def setup(self):
        self.connection = self.request
        self.connection.settimeout(self.timeout)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = _ReadAhead(self.connection, self.timeout)
        self.wfile = self.connection.makefile("wb", self.wbufsize)

    #: Limits on a request's header lines (as the standard library's).
    max_headers, max_line = 100, 65536

    def parse_request(self):
        """BaseHTTPRequestHandler.parse_request for HTTP/1.0 and 1.1, with
        the header lines read by a plain loop: the email parser the standard
        library uses for them takes 30 us, a tenth of a small request's time.
        Sends the error and returns False for what it refuses."""
        self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if not self.requestline.strip():
            return False
        words = request_line_words(self.requestline)
        if words is None:
            self.send_error(400, f"Bad request syntax ({self.requestline!r})")
            return False
        self.command, self.path, self.request_version = words
        major, minor = (int(n) for n in self.request_version[5:].split("."))
        if major != 1:
            self.send_error(505 if major > 1 else 400, f"Unsupported HTTP version ({self.request_version})")
            return False
        if self.path.startswith("//"):  # as the standard library: no open redirects via //host
            self.path = "/" + self.path.lstrip("/")
        lines = []
        for _ in range(self.max_headers + 1):
            line = self.rfile.readline(self.max_line + 1)
            if len(line) > self.max_line:
                self.send_error(431, "Line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            lines.append(line.rstrip(b"\r\n"))
        else:
            self.send_error(431, "Too many headers")
            return False
        try:
            # [(name, value)] as sent; {lower-case name: [values]}
            self.header_lines, self.fields = header_fields(lines)
        except ValueError as error:
            self.send_error(400, str(error))
            return False
        connection = self.header("connection").lower()
        self.close_connection = connection == "close" or (minor == 0 and connection != "keep-alive")
        if minor >= 1 and self.header("expect").lower() == "100-continue" and not self.rfile.continued:
            self.handle_expect_100()
            self.wfile.flush()  # buffered: the client (curl, for a body over 1 KB) waits for it
        return True

    def header(self, name):
        """The first value of a header (its lower-case name), or ''."""
        values = self.fields.get(name)
        return values[0] if values else ""

    def get_environ(self):
        """wsgiref's environ, from the header lines parse_request read
        (wsgiref's reads them through an email message, whose every lookup
        lower-cases every header's name)."""
        return self.environ_of(self.command, self.path, self.request_version, self.header_lines, self.fields)

    def environ_of(self, method, target, version, header_lines, fields):
        env = self.server.base_environ.copy()
        path, _, query = target.partition("?")
        env.update(SERVER_PROTOCOL=version, SERVER_SOFTWARE=self.server_version,
                   REQUEST_METHOD=method, PATH_INFO=unquote(path, "iso-8859-1"), QUERY_STRING=query,
                   REMOTE_ADDR=self.client_address[0])
        env["CONTENT_TYPE"] = fields["content-type"][0] if "content-type" in fields else "text/plain"
        if fields.get("content-length", [""])[0]:
            env["CONTENT_LENGTH"] = fields["content-length"][0]
        for name, value in header_lines:
            key = name.replace("-", "_").upper()
            if key in env:  # Content-Type and Content-Length, set above
                continue
            key = "HTTP_" + key
            env[key] = env[key] + "," + value if key in env else value  # repeated lines, comma-separated
        return env

    def answer_to_head(self, head, length):
        """The whole answer (bytes) to a request refused on its head alone, its
        body still to come, or None. The app decides, where it can (it sets
        ServerContract.ANSWERS_HEADS): a wrong API key, an unknown path, a body
        over the limit; another app is only held to the limit."""
        app = self.server.get_app()
        if not getattr(app, "config", {}).get(ServerContract.ANSWERS_HEADS):
            if length <= MAX_BODY_BYTES:
                return None
            body = error_json(413, STATUS_MESSAGES[413]).encode()
            return _closing_answer("413 Content Too Large", [("Content-Type", "application/json")], body)
        lines = head.rstrip(b"\r\n").split(b"\n")
        words = request_line_words(lines[0].decode("iso-8859-1"))
        try:
            header_lines, fields = header_fields(line.rstrip(b"\r") for line in lines[1:])
        except ValueError:
            words = None
        if words is None:
            return None  # malformed: the worker refuses it
        environ = self.environ_of(*words, header_lines, fields)
        environ.update({"wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
                        "wsgi.url_scheme": "http", "wsgi.multithread": True, "wsgi.multiprocess": False,
                        "wsgi.run_once": False, ServerContract.HEAD_ONLY: True})
        answer = []

        def start_response(status, headers, exc_info=None):
            answer[:] = [status, headers]

        try:
            body = b"".join(app(environ, start_response))
        except Exception:  # the selector thread must go on: the worker will answer it
            log.exception("answering the head of %s %s", words[0], words[1][:200])
            return None
        finally:
            go_on = environ.pop(ServerContract.GO_ON, None)
            if go_on is not None:
                go_on.__traceback__ = None  # see preflight_and_authenticate
        status, headers = answer
        if status.startswith("100"):
            return None  # the app takes the body: read it
        return _closing_answer(status, [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")],
                               body)

    def send_error(self, code, message=None, explain=None):
        """BaseHTTPRequestHandler's answer to a request it cannot parse, in the
        app's JSON shape instead of an HTML page; the connection closes."""
        self.close_connection = True
        body = error_json(code, message or http.HTTPStatus(code).phrase).encode()
        self.send_response(code)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        # As the app's answers: a page on another origin can read what went wrong.
        app_headers = getattr(self.server.get_app(), "config", {}).get(ServerContract.COMMON_HEADERS)
        headers = getattr(self, "headers", None)
        for name, value in (app_headers(headers.get("Origin") if headers else None) if app_headers else {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_next(self):
        """Answer one request; True when the connection stays open."""
        self.close_connection = True
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            return False
        if len(self.raw_requestline) > 65536:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)
            return False
        if not self.parse_request():  # answers malformed requests itself
            return False
        problem = framing_problem(self.fields)
        if problem:
            self.send_error(*problem)
            return False
        length = content_length(self.header("content-length"))
        if length is None:  # the app answers 400, and the body's end is unknown: the
            length = 0      # connection closes rather than read the body as a request
            self.close_connection = True
        body = _BodyReader(self.rfile, length)
        environ = self.get_environ()
        environ["wsgi.input"] = body
        environ[ServerContract.CLIENT_GONE] = self.client_gone
        handler = on_stdlib(_ResponseWriter)(body, self.wfile, self.get_stderr(), environ, multithread=True)
        handler.request_handler = self
        handler.run(self.server.get_app())
        chunked = "chunked" in self.header("transfer-encoding").lower()
        if 0 < body.left <= self.drain_limit and not chunked:
            # What the app did not read (a refused upload) is read and dropped:
            # closing a socket with unread data makes the kernel send a reset,
            # which can destroy the answer before the client has read it.
            with contextlib.suppress(OSError):
                while body.read(65536):
                    pass
        if body.left or chunked or not handler.length_known:
            self.close_connection = True  # the body's end is the connection's end
        self.rfile.next_request()
        if handler.broken:  # closed with a reset, which no client takes for the end of the answer
            self.aborted = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return not self.close_connection

    #: Seconds a worker waits for a busy client's next request before it
    #: hands the connection back: a kiosk sending a backlog (or a load
    #: test) then costs no trip through the selector per request.
    linger = 0.002

    def has_pending_input(self):
        """Whether the next request is here whole (pipelined, or arriving
        within `linger`)."""
        self.rfile.started = time.monotonic()  # the next request's `timeout` counts from this answer
        if self.rfile.request_ready(self.answer_to_head):
            return True
        if not self.rfile.read_now():
            return False
        if self.rfile.request_ready(self.answer_to_head):
            return True
        if self.server.waiting:  # others wait for a worker: do not hold this one
            return False
        return (bool(select.select([self.connection], [], [], self.linger)[0]) and self.rfile.read_now()
                and self.rfile.request_ready(self.answer_to_head))

    def refuse_late_request(self):
        """Answer 408 to a request that did not arrive whole in `timeout`
        seconds, from the selector thread, so without waiting (the server
        closes the connection then)."""
        # An operator's clue to a kiosk whose network drops mid-request.
        log.info("%s sent part of a request and not the rest within %s s: answered 408",
                 self.client_address[0], self.rfile.timeout)
        body = error_json(408, f"The request did not arrive whole within {self.rfile.timeout} s")
        origin = re.search(rb"\n[Oo][Rr][Ii][Gg][Ii][Nn][ \t]*:[ \t]*([^\r\n]*)", self.rfile.ahead)
        app_headers = getattr(self.server.get_app(), "config", {}).get(ServerContract.COMMON_HEADERS)
        headers = app_headers(origin.group(1).decode("latin-1").strip() if origin else None) if app_headers else {}
        self.rfile._send_now(_closing_answer("408 Request Timeout", [("Content-Type", "application/json"),
                                                                     *headers.items()], body.encode()))

    def client_gone(self):
        """Whether the client has closed its connection: what it asked for
        would go nowhere (ServerContract.CLIENT_GONE). A client that sends its next request
        (pipelined) has not gone; one that only half-closes after its
        request, waiting for the answer, looks gone (no HTTP client we know
        of does)."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def address_string(self):  # no reverse DNS lookup per request
        return self.client_address[0]

    def log_message(self, format, *args):
        pass  # the app logs each request, without the query string (it may carry the key)


# -- Process tuning -----------------------------------------------------------

def keep_to_one_cpu():
    """Keep the calling thread, and the threads it starts from then on, to
    one CPU core: the last one it may use (the first takes most hardware
    interrupts on some boards, the Raspberry Pi's among them). Returns the
    core, or None where there is no choice or no way to make it.

    Python runs one thread at a time (the GIL), and a worker hands it on at
    every socket and SQLite call. Between two cores each handoff wakes the
    other core; on one, it is a plain switch. Under 8 clients on a 2-core
    machine, that was a third of a request's CPU time (the benchmark: 1.3 to
    1.5 times the requests/s on one core)."""
    if not hasattr(os, "sched_setaffinity"):  # Linux only
        return None
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    cpu = max(allowed)
    try:
        os.sched_setaffinity(0, {cpu})  # 0: the calling thread (threads it starts inherit it)
    except OSError:
        return None
    return cpu


#: Container objects (dicts, lists...) made and not yet freed between two
#: runs of the cyclic garbage collector on the youngest ones (Python: 700).
GC_YOUNG_THRESHOLD = 5000


def settle_for_serving():
    """Ready the process for its life as a server, once its app is built.

    Python's cyclic garbage collector runs whenever 700 more containers have
    been made than freed. Eight batches in flight hold a few thousand (their
    parsed events), alive: it ran every other request, walked them and moved
    them on to the older generations, whose runs walk every object of the
    process, start-up's 20,000 included: 6% of `serve`'s CPU time for
    batches of 100. Start-up's objects live as long as the process, so they
    are frozen out of every later run; and since a request's objects are
    freed by reference counting (an answered request leaves no cycle: see
    supplied_api_key and render_error), the youngest generation is
    collected every GC_YOUNG_THRESHOLD instead."""
    gc.collect()  # start-up's garbage, before the rest is frozen
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    release_freed_memory()


def release_freed_memory():
    """Give the pages that glibc's malloc holds free back to the system.
    Starting up (imports, and compiling this file where its bytecode cannot
    be cached) frees megabytes that malloc keeps; a server would carry them
    for its whole life, and its load would come on top (where nothing can
    be cached, serve peaked at 40.4 MB under load, now 36.5)."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError, TypeError):  # not glibc: nothing to give back this way
        pass


# Imports this file by path (it may be renamed) and runs main() on the rest of argv.
_MODULE_BOOT = ("import importlib.util, sys; sys.argv = sys.argv[1:]; "
                "spec = importlib.util.spec_from_file_location('microticks', sys.argv[0]); "
                "module = sys.modules['microticks'] = importlib.util.module_from_spec(spec); "
                "spec.loader.exec_module(module); sys.exit(module.main())")


def serve_as_imported_module():
    """Replace this process (same PID, same arguments) by one that imports this
    file, when a plain `python microticks.py serve` started it.

    CPython keeps a script's syntax tree until the script returns: for a server,
    its whole life, 8 MB of its 40 under load. An imported module's tree is
    freed once compiled, and its bytecode is cached in __pycache__ (when the
    directory is writable) for the next start. Interpreter options, wrappers
    (coverage, pdb), Python 3.9 and Windows, where exec starts a separate
    process, run the script as it is.
    """
    if (os.name == "posix" and "serve" in sys.argv[1:] and sys.executable
            and getattr(sys, "orig_argv", [])[1:] == sys.argv):
        with contextlib.suppress(OSError):
            os.execv(sys.executable, [sys.executable, "-c", _MODULE_BOOT,
                                      os.path.abspath(__file__), *sys.argv[1:]])


# -- The pool -----------------------------------------------------------------

class PooledWSGIServer:
    """The standard library's WSGI server, made fit for a building of kiosks:
    HTTP/1.1 keep-alive, a fixed pool of worker threads (a pool, not a thread
    per request, whose threads fight over the GIL), and one selector thread
    that watches the connections and reads each request whole before a worker
    takes it (_ReadAhead), so that neither idle nor slow clients stall the
    others."""

    stdlib_base = "WSGIServer"
    #: The listen backlog; the stdlib's 5 drops connections under 8 clients.
    request_queue_size = 128
    threads = 8
    #: Whether the server and its workers keep to one CPU core (keep_to_one_cpu).
    one_cpu = True
    #: Seconds a kept-alive connection may stay idle.
    idle_timeout = 30
    #: Bytes of bodies still arriving that the selector holds for all
    #: connections together (a thousand clients sending a megabyte each
    #: took a gigabyte). A body larger than buffer_per_connection (a kiosk's
    #: batch or two) is read once there is room for all of it; until then
    #: it waits in the kernel, and the client with it.
    buffer_budget = 16 * MAX_BODY_BYTES
    buffer_per_connection = 64 * 1024
    pool = None

    def server_activate(self):
        super().server_activate()
        import queue
        from concurrent.futures import ThreadPoolExecutor  # lazily: see the imports
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="microticks")
        self.waiting = 0  # connections handed to the pool and not yet picked up (roughly)
        self.selector = selectors.DefaultSelector()
        self.returned = queue.SimpleQueue()  # connections the workers hand back
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.stopping = threading.Event()
        self.stopped = threading.Event()

    def serve_forever(self, poll_interval=0.5):
        if self.one_cpu:  # before the workers start: they keep to it too
            cpu = keep_to_one_cpu()
            if cpu is not None:
                log.info("serving on CPU core %d, where Python's threads take turns fastest"
                         " (MICROTICKS_CPUS=all: on any)", cpu)
        self.selector.register(self.socket, selectors.EVENT_READ, None)
        self.selector.register(self.wake_reader, selectors.EVENT_READ, "wake")
        watched = {}  # connection: since when it waits for its next request
        waiting = {}  # connections whose body waits for room in the buffer budget, first come first
        reserved = 0  # bytes of the bodies being read, each reserved whole once its head was let through
        trim = False  # whether much was read since freed memory last went back to the system

        def admit_or_wait(connection):
            """Reserve room for a body still to come, or leave it in the kernel
            (not read) until there is: each body let in can arrive whole, so
            the clients let in finish and make room for the next."""
            nonlocal reserved, trim
            rfile = connection.rfile
            if not rfile.due or rfile.reserved:
                return
            if rfile.due <= self.buffer_per_connection or reserved + rfile.due <= self.buffer_budget or not reserved:
                rfile.reserved = rfile.due
                reserved += rfile.due
                trim = trim or reserved > self.buffer_per_connection * 64
            else:
                self.selector.unregister(connection.connection)
                waiting[connection] = True

        def forget(connection):
            nonlocal reserved
            if waiting.pop(connection, None) is None:
                self.selector.unregister(connection.connection)
            del watched[connection]
            reserved -= connection.rfile.reserved
            connection.rfile.reserved = 0

        try:
            while not self.stopping.is_set():
                events = self.selector.select(poll_interval)
                now = time.monotonic()
                if not events and trim and not reserved:  # a quiet moment after a rush of bodies
                    release_freed_memory()
                    trim = False
                for key, _ in events:
                    if key.data is None:
                        connection = self._accept()
                        if connection is not None:
                            self.selector.register(connection.connection, selectors.EVENT_READ, connection)
                            watched[connection] = now
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self.wake_reader.recv(4096)
                    else:
                        connection = key.data
                        # While bodies wait for room, a head takes a small read: a
                        # thousand clients' first 64 KiB would be 64 MB.
                        closed = not connection.rfile.read_now(4096 if waiting and not connection.rfile.reserved
                                                               else 65536)
                        if closed or connection.rfile.request_ready(connection.answer_to_head):
                            forget(connection)
                            if closed:
                                self._close(connection)
                            else:
                                self._submit(connection)
                        else:
                            admit_or_wait(connection)
                while not self.returned.empty():
                    connection = self.returned.get()
                    self.selector.register(connection.connection, selectors.EVENT_READ, connection)
                    watched[connection] = now
                    admit_or_wait(connection)
                while waiting:
                    connection = next(iter(waiting))
                    if reserved and reserved + connection.rfile.due > self.buffer_budget:
                        break
                    del waiting[connection]
                    self.selector.register(connection.connection, selectors.EVENT_READ, connection)
                    admit_or_wait(connection)
                for connection, since in list(watched.items()):
                    rfile = connection.rfile
                    if rfile.ahead or rfile.dropping is not None:  # it has `timeout` seconds to arrive whole
                        late, idle = rfile.time_left() < 0, False
                    else:
                        late, idle = False, now - since > self.idle_timeout
                    if late or idle:
                        forget(connection)
                        if late and rfile.dropping is None:  # a refused one has its answer
                            connection.refuse_late_request()
                        self._close(connection)
        finally:
            for connection in watched:
                self._close(connection)
            self.stopped.set()

    def _accept(self):
        """A new connection, to watch until its first request has arrived."""
        try:
            sock, address = self.socket.accept()
        except OSError:
            return None
        try:
            return self.RequestHandlerClass(sock, address, self)
        except OSError:
            sock.close()
            return None

    def _submit(self, connection):
        self.waiting += 1
        self.pool.submit(self._serve_connection, connection)

    def _serve_connection(self, connection):
        self.waiting -= 1
        try:
            while connection.handle_next():
                connection.wfile.flush()
                if not connection.has_pending_input():
                    self.returned.put(connection)  # wait for the next request without a thread
                    self.wake_writer.send(b"\0")
                    return
                if self.waiting:  # its next request is here, but others were first
                    self._submit(connection)
                    return
        except (OSError, ValueError):
            pass  # the client went away, or timed out mid-request
        except Exception:
            self.handle_error(connection.request, connection.client_address)
        self._close(connection)

    def _close(self, connection):
        del connection.rfile.ahead[:]  # now, not when the handler is collected: it may hold a megabyte
        with contextlib.suppress(Exception):
            connection.finish()
        if connection.aborted:  # no FIN first (shutdown_request sends one): the client would read an end
            self.close_request(connection.connection)
        else:
            self.shutdown_request(connection.connection)

    def shutdown(self):
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.wake_writer.send(b"\0")
        self.stopped.wait(10)

    def server_close(self):
        super().server_close()
        if self.pool is not None:  # else binding failed, before server_activate
            self.pool.shutdown(wait=False)
            for sock in (self.wake_reader, self.wake_writer):
                sock.close()


def make_http_server(app, host, port, threads=8, one_cpu=True):
    """Our default server, bound and ready for serve_forever()."""
    server_class = type("Server", (on_stdlib(PooledWSGIServer),), {"threads": threads, "one_cpu": one_cpu})
    if ":" in host:
        server_class.address_family = socket.AF_INET6
    server = server_class((host, port), on_stdlib(ConnectionHandler))
    server.set_app(app)
    return server


###############################################################################
# Command line ################################################################
###############################################################################

def open_database(settings):
    """The database for an admin command, created and upgraded if needed."""
    return connect(settings.db_path, settings.site)


def open_for_reading(settings):
    """open_database, ready to be read as the HTTP API reads it (prepare_read)."""
    conn = open_database(settings)
    prepare_read(conn, settings.session_timeout, settings.retention_days)
    return conn


def cmd_initdb(args, settings):
    conn = open_database(settings)
    print(f"Database ready: {os.path.abspath(settings.db_path)} (schema version {schema_version(conn)})")


def cmd_createconsumer(args, settings):
    key = create_consumer(open_database(settings), args.name, args.allow)
    print(f"Consumer key: {key}")
    print("Give this key to the frontend as consumer_key; it is not shown again.", file=sys.stderr)


def cmd_consumers(args, settings):
    consumers = list_consumers(open_database(settings))
    if not consumers:
        print(f"No consumers yet: {operator_command()} createconsumer NAME")
        return
    print(f"{'ID':>4}  {'NAME':<24} {'CREATED':<19}  {'SESSIONS':>8}  STATUS")
    for c in consumers:
        status = f"revoked {c['deleted_at']}" if c["deleted_at"] else "active"
        if c["allowed_networks"]:
            status += f", only from {c['allowed_networks'].replace(',', ', ')}"
        print(f"{c['id']:>4}  {c['name']:<24} {c['created_at']:<19}  {c['sessions']:>8}  {status}")


def cmd_revokeconsumer(args, settings):
    revoke_consumer(open_database(settings), args.name)
    print(f"Consumer {args.name!r} revoked: its key starts no new sessions; its data stays.")


def consumer_filter(text):
    """--consumer as the HTTP API's filters: a number is a consumer's id,
    anything else its name."""
    return {"consumer": text} if text.isascii() and text.isdigit() else {"consumer_name": text}


def consumer_named(conn, text):
    """The name of the consumer --consumer means: a number is an existing
    consumer's id; anything else (or an id nobody has) is a name."""
    if text and text.isascii() and text.isdigit():
        row = conn.execute("SELECT name FROM consumers WHERE id = ?", (int(text),)).fetchone()
        if row is not None:
            return row[0]
    return text


def read_params(args):
    """The read filters given on the command line, as the query parameters
    the HTTP API takes, so both are validated by the same function."""
    names = {"from_": "from", "to": "to", "date": "date", "ip": "ip",
             "consumer_name": "consumer_name", "action": "action", "session": "session", "site": "site",
             "weekday": "weekday", "hours": "hours",
             "after_id": "after_id", "limit": "limit", "offset": "offset", "format": "format",
             "fields": "fields", "data_keys": "data_keys", "data_key": "data_key"}
    params = {param: str(getattr(args, attr)) for attr, param in names.items()
              if getattr(args, attr, None) is not None}
    if getattr(args, "consumer", None) is not None:
        params.update(consumer_filter(args.consumer))
    if getattr(args, "sort", None):
        params["sort.desc" if args.desc else "sort"] = args.sort
    return params


def write_export(conn, query, stream):
    """Write an export into `stream`; returns its number of lines (an
    NDJSON export's rows: a text in CSV may hold line breaks)."""
    lines = 0
    for chunk in export_chunks(conn, query):
        stream.write(chunk)
        lines += chunk.count("\n")
    return lines


def cmd_read(args, settings):
    """`events` and `sessions`: every matching row as JSON, or a page
    (--limit), like the HTTP API; or every matching row as CSV or NDJSON
    (`export`)."""
    params = read_params(args)
    if getattr(args, "bundle", None):
        filters = {k: v for k, v in params.items() if k in READ_FILTERS}
        bundle = write_research_bundle(open_for_reading(settings), filters, args.bundle, settings.tz,
                                       settings.session_timeout, os.path.abspath(settings.db_path), settings.site)
        print(f"Wrote {bundle['folder']}: {', '.join(bundle['files'])} ({bundle['sessions']:,} sessions,"
              f" {bundle['events']:,} events)")
        return
    export = params["format"] in ("csv", "ndjson")
    kind = getattr(args, "kind", None) or args.command
    if getattr(args, "position", None):
        export_since_position(open_for_reading(settings), params, args, settings)
        return
    query = clean_read_query(params, kind, settings.tz, export=export)
    conn = open_for_reading(settings)
    try:
        output = open(args.output, "w", encoding="utf-8", newline="") if args.output else None
    except OSError as error:
        raise MicroticksError(400, f"Cannot write {args.output}: {error.strerror or error}") from None
    with output or contextlib.nullcontext(sys.stdout) as stream:
        if query.format == "json" and query.limit is None:  # every row, as GET /events answers it
            stream.writelines(page_document(conn, query))
            stream.write("\n")
        elif query.format == "json":
            json.dump(read_page(conn, query), stream, indent=2, ensure_ascii=False)
            stream.write("\n")
        else:
            if not output:
                sys.stdout.reconfigure(newline="")  # csv writes its own \r\n
            write_export(conn, query, stream)
    if output:
        print(f"Wrote {args.output}", file=sys.stderr)


def export_since_position(conn, params, args, settings):
    """`export --position FILE`: the events after the id FILE holds (none
    yet: every event), into --output (written under a temporary name, then
    renamed) or stdout; then FILE holds the newest id written. A run that
    fails midway leaves FILE as it was: the next one exports the same events
    again, which an import for the same site skips."""
    if getattr(args, "kind", "events") != "events" or params.get("after_id") or params.get("sort.desc") \
            or params.get("sort", "id") != "id":
        raise MicroticksError(400, "--position exports events in the order they were stored: without --after-id,"
                                   " --sort or sessions")
    try:
        with open(args.position, encoding="utf-8") as stream:
            text = stream.read().strip()
    except FileNotFoundError:
        text = "0"
    except OSError as error:
        raise MicroticksError(400, f"Cannot read {args.position}: {error.strerror or error}") from None
    if not text.isascii() or not text.isdigit():
        raise MicroticksError(400, f"{args.position} should hold the id of the last event exported, not {text[:40]!r}")
    after = int(text)
    conn.execute("BEGIN")  # one snapshot: the newest id read is the export's last
    try:
        newest = conn.execute("SELECT max(id) FROM events WHERE id > ?", (after,)).fetchone()[0]
        if newest is None:
            print(f"No events after id {after}: nothing written", file=sys.stderr)
            return
        query = clean_read_query({**params, "after_id": str(after)}, "events", settings.tz, export=True)
        query = query._replace(end_id=newest)
        write_export_text(export_chunks(conn, query), args.output)
    finally:
        conn.execute("COMMIT")
    _write_atomically(args.position, lambda stream: stream.write(f"{newest}\n"))
    print(f"Exported the events after id {after} to {newest}" + (f" into {args.output}" if args.output else "")
          + f"; {args.position} now holds {newest}", file=sys.stderr)


def write_export_text(chunks, output=None):
    """An export's text into the file `output` (written under a temporary
    name, then renamed: it holds the whole export or what it held before),
    or to stdout."""
    if output:
        _write_atomically(output, lambda stream: stream.writelines(chunks))
    else:
        sys.stdout.reconfigure(newline="")  # a CSV writes its own \r\n
        sys.stdout.writelines(chunks)
        sys.stdout.flush()


def _write_atomically(path, write):
    """Call write(stream) on a temporary file beside `path`, then put it in
    `path`'s place (synced first): `path` holds the old content or the new."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    except OSError as error:
        raise MicroticksError(400, f"Cannot write in {folder}: {error.strerror or error}") from None
    try:
        with open(handle, "w", encoding="utf-8", newline="") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _current_umask():
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


#: The version of the research bundle's layout (bundle.json's format):
#: raised when a change would mislead an older reader.
BUNDLE_FORMAT = 1


def write_research_bundle(conn, filters, directory, tz_name, timeout, database, database_site=DEFAULT_SITE):
    """Write the bundle of the sessions `filters` selects (GET /sessions'
    query parameters) into the new folder `directory`: exports, statistics,
    a data dictionary and DuckDB SQL (BUNDLE_README). It is written under a
    temporary name beside it and renamed at the end: a folder either holds a
    whole bundle or does not exist. Returns the files' names and counts."""
    target = os.path.abspath(directory)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise MicroticksError(400, f"{target} exists and is not an empty folder: nothing was written")
    parent = os.path.dirname(target)
    try:
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
        os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes it private: the bundle is made to be handed on
    except OSError as error:
        raise MicroticksError(400, f"Cannot write in {parent}: {error.strerror or error}") from None
    try:
        rows = {}  # as written: bundle.json announces them, and an import counts them
        for kind in ("events", "sessions"):
            for fmt in ("ndjson", "csv"):
                query = clean_read_query({**filters, "fields": "all", "format": fmt}, kind, tz_name, export=True)
                with open(os.path.join(staging, f"{kind}.{fmt}"), "w", encoding="utf-8", newline="") as stream:
                    lines = write_export(conn, query, stream)
                rows.setdefault(kind, lines)
        figures = stats_figures(conn, clean_stats_query({**filters, "paths": "3"}, tz_name))
        with open(os.path.join(staging, "stats.json"), "w", encoding="utf-8") as stream:
            json.dump(figures, stream, indent=1, ensure_ascii=False)
        screens = {}
        for listed in list_screens(conn):
            image = listed["image"] and screen_image(conn, listed["screen"])
            if image:  # a file name of its own, whatever characters the screen's name holds
                name = (re.sub(r"[^A-Za-z0-9._-]+", "_", listed["screen"])[:80] + "-"
                        + hashlib.sha256(listed["screen"].encode()).hexdigest()[:8] + "." + image.type.split("/")[1])
                os.makedirs(os.path.join(staging, "screens"), exist_ok=True)
                with open(os.path.join(staging, "screens", name), "wb") as stream:
                    stream.write(image.data)
                screens[name] = listed["screen"]
        with open(os.path.join(staging, "bundle.json"), "w", encoding="utf-8") as stream:
            json.dump({"format": BUNDLE_FORMAT, "microticks": __version__, "written": utc_now(),
                       "site": database_site, "selection": filters, "sessions": rows["sessions"],
                       "events": rows["events"], "screens": screens}, stream, indent=1, ensure_ascii=False)
        with open(os.path.join(staging, "annotations.ndjson"), "w", encoding="utf-8") as stream:
            stream.writelines(export_annotations(conn, clean_annotation_query(
                {k: v for k, v in filters.items() if k in ANNOTATION_FILTERS}, tz_name), "ndjson"))
        with open(os.path.join(staging, "analysis.sql"), "w", encoding="utf-8") as stream:
            stream.write(fill(BUNDLE_ANALYSIS_SQL, KEY=DEFAULT_DATA_KEY))
        selection = ", ".join(f"{name}={value}" for name, value in sorted(filters.items())) or "all"
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as stream:
            stream.write(fill(
                BUNDLE_README, VERSION=__version__, WRITTEN=utc_now(), DATABASE=os.path.basename(database),
                SELECTION=selection,
                SESSIONS=f"{figures['sessions']:,}", EVENTS=f"{figures['events']:,}", TIMEOUT=str(timeout),
                DATA_KEY=DEFAULT_DATA_KEY, TZ=figures["timezone"], PATH=SESSION_PATH_DEFINITION,
                VALUES=VALUES_DEFINITION, PATHS=PATH_FIGURES_DEFINITION, ENGAGEMENT=ENGAGEMENT_DEFINITION,
                BUNDLE_FORMAT=str(BUNDLE_FORMAT)))
        if os.path.isdir(target):
            os.rmdir(target)  # empty, as checked
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"folder": target, "files": sorted(os.listdir(target)), "sessions": figures["sessions"],
            "events": figures["events"]}


#: The longest line of an NDJSON file `import` reads, and the largest event
#: of a JSON export, in bytes: an event the API takes is under 70 KiB, and
#: a file is read a record at a time, in this much memory or little more.
MAX_IMPORT_RECORD_BYTES = 2 * MAX_BODY_BYTES
#: How deeply a record may nest before the parser refuses it: an event nests
#: a level deeper than its data, whose own check (MAX_DATA_DEPTH) then names
#: the field; beyond this, the parser would recurse as deep as the text goes.
MAX_IMPORT_RECORD_DEPTH = 2 * MAX_DATA_DEPTH
_JSON_SPACE = LazyPattern(r"[ \t\n\r]*")


def open_import_file(path):
    """The regular file at `path`, open for reading in binary. A device or a
    pipe (a symlink to /dev/zero, a FIFO) would be read for ever: refused at
    once, opened without waiting for a pipe's writer."""
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise MicroticksError(400, f"Cannot read {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise MicroticksError(400, f"{path} is not a regular file (a device, a pipe or a socket): import reads"
                                   " export files")
    if hasattr(os, "set_blocking"):
        os.set_blocking(handle, True)
    return os.fdopen(handle, "rb")


class JsonPieces:
    """A JSON document read from a binary stream a value at a time, each at
    most `limit` bytes: a first Microticks' export of any size ({"events":
    [...]}, one line or many) is read in bounded memory."""

    def __init__(self, stream, name, limit):
        self.stream, self.name, self.limit = stream, name, limit
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.at, self.ended = "", 0, False
        self.passed = 0  # characters read before self.text, for messages

    def _more(self):
        if self.ended:
            return False
        chunk = self.stream.read(65536)
        self.passed += self.at
        self.text = self.text[self.at:] + self.decoder.decode(chunk, final=not chunk)
        self.at, self.ended = 0, not chunk
        return True

    def where(self):
        return f"character {self.passed + self.at + 1:,}"

    def peek(self):
        """The next character that is not white space ('' at the end)."""
        if self.at < len(self.text) and self.text[self.at] not in " \t\n\r":
            return self.text[self.at]
        while True:
            self.at = _JSON_SPACE.match(self.text, self.at).end()
            if self.at < len(self.text) or not self._more():
                return self.text[self.at:self.at + 1]

    def take(self, expected):
        """The next character, one of `expected` (ValueError otherwise)."""
        char = self.peek()
        if not char or char not in expected:
            raise ValueError(f"expected {' or '.join(map(repr, expected))} at {self.where()}, found "
                             + (repr(char) if char else "the end"))
        self.at += 1
        return char

    def value(self, max_depth):
        """The next value whole, checked as parse_json checks a text."""
        self.peek()
        while True:
            start = self.at
            try:
                value, end = _STRICT_JSON.raw_decode(self.text, start)
                if end < len(self.text) or self.ended:
                    self.at = end
                    break
            except RecursionError:
                raise ValueError(f"the value at {self.where()} nests deeper than {max_depth} levels") from None
            except ValueError:
                if self.ended:
                    raise
            if len(self.text) - start > self.limit:
                raise MicroticksError(400, f"{self.name}: the value at {self.where()} is longer than {self.limit:,} bytes"
                                           " (an event is under 70 KiB): nothing was imported")
            self._more()
        text = self.text[start:end]
        return checked_json(text, parse_json(text, None) if may_hold_long_integers(text) else value, max_depth)


def read_export_file(stream, name, expected_events=None):
    """The events of an export file, (where, record) one at a time, in
    bounded memory: a GET /events JSON document ({"events": [...]}) or
    NDJSON, one event a line. `expected_events`: how many there must be
    (a research bundle's count); otherwise nothing is imported."""
    first = stream.readline(MAX_IMPORT_RECORD_BYTES + 1)
    try:  # what the first line is, told leniently: each line is checked as it is read
        first_record = json.loads(first)
        one_per_line = isinstance(first_record, dict) and "events" not in first_record
    except (ValueError, RecursionError):
        one_per_line = False
    if len(first) > MAX_IMPORT_RECORD_BYTES and not re.match(rb'\s*\{\s*"events"', first):
        one_per_line = True  # a long first line, not a JSON export's: refused below
    stream.seek(0)
    count = 0
    if one_per_line:
        for number, line in enumerate(iter(lambda: stream.readline(MAX_IMPORT_RECORD_BYTES + 1), b""), 1):
            if len(line) > MAX_IMPORT_RECORD_BYTES:
                raise MicroticksError(400, f"{name} line {number} is longer than {MAX_IMPORT_RECORD_BYTES:,} bytes"
                                           " (an event is under 70 KiB): nothing was imported")
            if line.strip():
                try:
                    record = parse_json(line.decode("utf-8"), MAX_IMPORT_RECORD_DEPTH)
                except ValueError as error:
                    raise MicroticksError(400, f"{name} line {number} is not JSON: {error}") from None
                count += 1
                yield f"line {number}", record
    else:
        # Strict JSON, as the API takes: NaN or Infinity stored in `data` would
        # break SQLite's JSON functions (statistics, exports) for the whole file.
        document = JsonPieces(stream, name, MAX_IMPORT_RECORD_BYTES)
        found = False
        try:
            document.take("{")
            more = document.peek() != "}"
            if not more:
                document.take("}")
            while more:
                key = document.value(0)
                if not isinstance(key, str):
                    raise ValueError(f"expected a name before {document.where()}")
                document.take(":")
                if key == "events" and not found:
                    found = True
                    document.take("[")
                    if document.peek() == "]":
                        document.take("]")
                    else:
                        while True:
                            count += 1
                            yield f"event {count}", document.value(MAX_IMPORT_RECORD_DEPTH)
                            if document.take(",]") == "]":
                                break
                else:
                    document.value(MAX_IMPORT_RECORD_DEPTH)
                more = document.take(",}") == ","
            if document.peek():
                raise ValueError(f"more after the document's end, at {document.where()}")
        except ValueError as error:
            raise MicroticksError(400, f"{name} is neither a JSON export nor NDJSON: {error}") from None
        if not found:
            raise MicroticksError(400, f'{name} has no "events" list (the GET /events shape)')
    if expected_events is not None and count != expected_events:
        raise MicroticksError(400, f"{name} holds {count:,} events where its bundle.json announces"
                                   f" {expected_events:,}: the bundle is incomplete; nothing was imported")


def _lines_in(path):
    with open_import_file(path) as stream:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 20), b""))


def export_file_of(path):
    """The events file to import from `path`, and how many events it must
    hold (None: any): the file itself, or a research bundle's events.ndjson,
    once its bundle.json says this Microticks reads it and the sessions
    file holds as many as it announces."""
    if not os.path.isdir(path):
        return path, None
    manifest = os.path.join(path, "bundle.json")
    try:
        with open_import_file(manifest) as stream:
            text = stream.read(MAX_IMPORT_RECORD_BYTES + 1).decode("utf-8")
        written = parse_json(text, max_depth=8) if len(text) <= MAX_IMPORT_RECORD_BYTES else None
    except MicroticksError:
        if not os.path.lexists(manifest):
            raise MicroticksError(400, f"{path} is a folder but not a research bundle: it has no bundle.json") from None
        raise
    except ValueError as error:
        raise MicroticksError(400, f"Cannot read {manifest}: {error}") from None
    bundle_format = written.get("format") if isinstance(written, dict) else None
    if type(bundle_format) is not int or bundle_format < 1:
        raise MicroticksError(400, f"{manifest} is not a research bundle's (no format number)")
    if bundle_format > BUNDLE_FORMAT:
        raise MicroticksError(400, f"{path} was written by a newer Microticks ({written.get('microticks')}, bundle"
                                   f" format {bundle_format}); this one ({__version__}) reads format"
                                   f" {BUNDLE_FORMAT}: import it with that Microticks, or upgrade this one")
    counts = {kind: written.get(kind) for kind in ("events", "sessions")}
    if any(type(count) is not int or count < 0 for count in counts.values()):
        raise MicroticksError(400, f"{manifest} does not say how many events and sessions the bundle holds")
    sessions = _lines_in(os.path.join(path, "sessions.ndjson"))
    if sessions != counts["sessions"]:
        raise MicroticksError(400, f"{path}/sessions.ndjson holds {sessions:,} sessions where bundle.json announces"
                                   f" {counts['sessions']:,}: the bundle is incomplete; nothing was imported")
    return os.path.join(path, "events.ndjson"), counts["events"]


def cmd_import(args, settings):
    path, expected_events = export_file_of(args.file)
    with open_import_file(path) as stream:
        try:
            digest = hashlib.file_digest(stream, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
                else _sha256_of(stream)
            stream.seek(0)
        except OSError as error:
            raise MicroticksError(400, f"Cannot read {path}: {error.strerror or error}") from None
        records = read_export_file(stream, os.path.basename(path), expected_events)
        conn = open_database(settings)
        consumer = args.consumer if args.site else consumer_named(conn, args.consumer)
        result = import_events(conn, clean_exported_events(records), os.path.basename(path), digest, consumer,
                               args.site)
    renumbered = [f"{n:,} {kind}" for kind, n in result["new_ids"].items() if n]
    print(f"Imported {result['events']} events in {result['sessions']} sessions from {args.file}"
          + (f" ({result['skipped']} already present, skipped)" if result["skipped"] else "")
          + (f" of site {args.site!r} (its consumers as NAME@{args.site}; unnamed: {args.consumer}@{args.site})"
             if args.site else f" as consumer {consumer!r}")
          + (f"; {' and '.join(renumbered)} got new ids, theirs being taken here (the file's ids are kept as"
             " source_id)" if renumbered else ""))


def _sha256_of(stream):
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def cmd_stats(args, settings):
    params = read_params(args)
    params.update({k: str(v) for k, v in (("data_key", args.data_key), ("bin", args.bin), ("tz", args.tz),
                                          ("paths", args.paths), ("funnel", args.funnel),
                                          ("type_separator", args.type_separator),
                                          ("meaningful", args.meaningful)) if v is not None})
    for switch in ("holding", "coverage"):
        if getattr(args, switch):
            params[switch] = "1"
    print_answer(args, stats_figures(open_for_reading(settings), clean_stats_query(params, settings.tz)), print_stats)


def print_answer(args, answer, as_tables):
    """A command's answer: the JSON the HTTP API answers (--json), or tables."""
    if args.json:
        json.dump(answer, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        as_tables(answer)


def as_count(value):
    """A number as the commands and the dashboard show it: thousands separated."""
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def as_percent(share):
    """A share (the JSON's fraction) as a percentage."""
    return "-" if share is None else f"{share * 100:.1f}%"


def plural(n, one, many):
    return f"{as_count(n)} {one if n == 1 else many}"


def _print_table(title, rows, header):
    """A titled table: the first column left-aligned, the others right."""
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)] if rows else []
    for row in [header, *rows]:
        print("  " + "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                               for i, (x, w) in enumerate(zip(row, widths))))


def print_stats(stats):
    table = _print_table
    duration, per_session = stats["duration"], stats["events_per_session"]
    print(f"{plural(stats['sessions'], 'session', 'sessions')}, {plural(stats['events'], 'event', 'events')}"
          f" (times in {stats['timezone']})")
    print(f"Session duration: median {duration['median']} s, mean {duration['mean']} s, "
          f"max {duration['max']} s")
    print(f"Events per session: median {per_session['median']}, mean {per_session['mean']}, "
          f"max {per_session['max']}")
    touches, screens, first = stats["touches_per_session"], stats["screens_per_session"], stats["time_to_first_touch"]
    print(f"Meaningful sessions (>= {stats['meaningful_touches']} touches): {as_count(stats['meaningful_sessions'])}"
          f" ({as_percent(stats['meaningful_share'])}); bounces (one touch or none): {as_count(stats['bounces'])}"
          f" ({as_percent(stats['bounce_share'])})")
    print(f"Touches per session: median {touches['median']}, mean {touches['mean']}; distinct screens: median"
          f" {screens['median']}, mean {screens['mean']}; first touch after the start: median {first['median']} s")
    table("Sessions per day", [(d["day"], d["sessions"]) for d in stats["sessions_per_day"]], ("day", "sessions"))
    table("Sessions per weekday", [(d["weekday"], d["sessions"]) for d in stats["sessions_per_weekday"]],
          ("weekday", "sessions"))
    table("Sessions per hour", [(f"{d['hour']:02d}:00", d["sessions"]) for d in stats["sessions_per_hour"]
                                if d["sessions"]], ("hour", "sessions"))
    table("Session duration", [(d["bucket"], d["sessions"]) for d in duration["distribution"]],
          ("duration", "sessions"))
    table("Events per action", [(a["action"], a["events"]) for a in stats["actions"]], ("action", "events"))
    table(f"Per {stats['data_key']}", [
        (v["value"], v["events"], v["clicks"], v["visits"], v["sessions"], v["first"], v["second"], v["third"],
         v["time_spent"]["mean"] if v["time_spent"]["mean"] is not None else "-", v["page_turns"])
        for v in stats["values"]],
        (stats["data_key"], "events", "clicks", "visits", "sessions", "1st", "2nd", "3rd", "mean s", "pages"))
    table(f"Screen types (the part before {stats.get('type_separator', ':')!r})",
          [(t["type"], t["screens"], t["visits"], t["events"]) for t in stats["screen_types"]],
          ("type", "screens", "visits", "events"))
    if "touches_per_hour" in stats:
        table("Touches per hour", [(f"{h['hour']:02d}:00", h["touches"]) for h in stats["touches_per_hour"]
                                   if h["touches"]], ("hour", "touches"))
    if "transitions" in stats:
        table("Transitions (the 30 most frequent)", [
            (m["from"], m["to"], m["count"], "-" if m["median_seconds"] is None else m["median_seconds"])
            for m in stats["transitions"][:30]], ("from", "to", "count", "median s"))
        table("Common paths", [(" > ".join(map(str, p["path"])), p["sessions"]) for p in stats["common_paths"]],
              ("path", "sessions"))
    if "funnel" in stats:
        table("Funnel", [(f["screen"], f["sessions"], "-" if f["median_seconds"] is None else f["median_seconds"])
                         for f in stats["funnel"]], ("step", "sessions", "median s from the first step"))
    if "holding" in stats:
        holding_figures = stats["holding"]

        def engaged(figures):
            def median():
                low, high = figures["median_ci"]
                return "-" if figures["median"] is None else (
                    f"{as_count(figures['median'])} s ({as_count(low)} to {as_count(high)})")
            return (as_count(figures["n"]), as_count(figures["censored"]), median(),
                    *(as_percent(point["share"]) for point in figures["still_engaged"]))

        header = ("n", "censored", "median (95% CI)", *(f"at {s} s" for s in holding_figures["checkpoints"]))
        table("Holding power (Kaplan-Meier: the share still engaged; censored: still going when last seen)",
              [("sessions", *engaged(holding_figures["sessions"]))]
              + [(str(row["screen"]), *engaged(row)) for row in holding_figures["screens"]], ("", *header))
    if "coverage" in stats:
        coverage = stats["coverage"]
        table(f"Coverage from {coverage['from'][:16]} to {coverage['to'][:16]} UTC (from heartbeats; unknown: the"
              " kiosk sent none)", [
                  (f"{row['consumer']}/{row['device'] or '(no device)'}", *coverage_columns(row),
                   as_count(row["most_at_once"]), as_count(row["gaps"])) for row in coverage["devices"]],
              ("device", "on (h)", "uptime", "in use (h)", "utilisation", "sessions", "per hour on", "most at once",
               "gaps"))
        table("Coverage per day (off: no kiosk on; unknown: none sending heartbeats)", [
            (day["day"], day["state"], f"{day['minutes_on'] / 60:,.1f}", f"{day['minutes_in_use'] / 60:,.1f}",
             as_count(day["sessions"])) for day in coverage["per_day"]], ("day", "state", "on (h)", "in use (h)",
                                                                           "sessions"))
    if stats["annotations"]:
        table("Annotations", [(a["time"], a["consumer"] or "(all)", a["text"]) for a in stats["annotations"]],
              ("time", "consumer", "text"))
    screens = stats["heatmaps"]["screens"]
    table("Touch points per screen (GET /stats has the heatmap bins)",
          sorted(((screen or "(none)", h["points"]) for screen, h in screens.items()), key=lambda r: -r[1]),
          ("screen", "points"))


def cmd_compare(args, settings):
    params = {name: str(value) for name, value in vars(args).items()
              if name[:2] in ("a.", "b.") and name[2:] != "consumer" and value is not None}
    for side in "ab":
        if vars(args)[f"{side}.consumer"] is not None:
            params.update({f"{side}.{name}": value for name, value in
                           consumer_filter(vars(args)[f"{side}.consumer"]).items()})
    params.update({k: str(v) for k, v in (("data_key", args.data_key), ("tz", args.tz),
                                          ("meaningful", args.meaningful)) if v is not None})
    print_answer(args, compare_figures(open_for_reading(settings), clean_compare_query(params, settings.tz)),
                 print_comparison)


def print_comparison(comparison):
    a, b, differences = comparison["a"], comparison["b"], comparison["differences"]

    def p_value(value):
        return "-" if value is None else "< 0.001" if value < 0.001 else f"{value:.3f}"

    def medians(label, figure):
        return (label, as_count(figure["a_median"]), as_count(figure["b_median"]), as_count(figure["difference"]),
                p_value(figure["p_value"]), f"{as_count(figure['a_n'])}/{as_count(figure['b_n'])}")

    def shares(label, figure):  # shares as percentages, their difference in percentage points
        difference = figure["difference"]
        return (label, as_percent(figure["a"]), as_percent(figure["b"]),
                "-" if difference is None else f"{difference * 100:+.1f} points", p_value(figure["p_value"]),
                f"{as_count(figure['a_count'])}/{as_count(figure['b_count'])}")

    print(f"A: {plural(a['sessions'], 'session', 'sessions')}, {plural(a['events'], 'event', 'events')};"
          f" B: {plural(b['sessions'], 'session', 'sessions')}, {plural(b['events'], 'event', 'events')}"
          f" (times in {a['timezone']})")
    _print_table("Sessions (medians; p: Mann-Whitney U)", [
        medians("duration (s)", differences["duration"]),
        medians("touches per session", differences["touches_per_session"]),
        medians("screens per session", differences["screens_per_session"]),
        shares(f"meaningful share (>= {a['meaningful_touches']} touches)", differences["meaningful_share"])],
        ("figure", "A", "B", "B - A", "p", "n A/B"))
    survival = differences["duration_survival"]
    if survival["p_value"] is not None:
        print(f"Session durations as survival curves (log-rank): chi-square {survival['chi2']}, p"
              f" {p_value(survival['p_value'])}; ended A {as_count(survival['a_observed'])} (expected"
              f" {as_count(survival['a_expected'])}), B {as_count(survival['b_observed'])} (expected"
              f" {as_count(survival['b_expected'])})")
    _print_table("Time on screen (median s; p: Mann-Whitney U)",
                 [medians(str(row["screen"]), row) for row in differences["time_on_screen"]],
                 ("screen", "A", "B", "B - A", "p", "visits A/B"))
    _print_table("First picks (share of sessions' first screens; p: chi-square or Fisher)",
                 [shares(str(row["screen"]), row) for row in differences["first_picks"]],
                 ("screen", "A", "B", "B - A", "p", "sessions A/B"))
    _print_table("Visit shares (share of all visits; p: chi-square or Fisher)",
                 [shares(str(row["screen"]), row) for row in differences["visit_shares"]],
                 ("screen", "A", "B", "B - A", "p", "visits A/B"))
    tests = comparison["tests"]
    print(f"\n{plural(tests, 'test', 'tests')} made: even with no real difference, about {tests * 0.05:.1f} of them would"
          " come out below p = 0.05 by chance (see the README, Comparing two periods)")


def cmd_report(args, settings):
    params = {name: getattr(args, attr) for attr, name in (
        ("from_", "from"), ("to", "to"), ("site", "site"), ("data_key", "data_key"), ("touches", "touches"),
        ("b_from", "b.from"), ("b_to", "b.to"), ("b_site", "b.site")) if getattr(args, attr) is not None}
    for prefix, value in (("", args.consumer), ("b.", args.b_consumer)):
        if value is not None:
            params.update({prefix + name: text for name, text in consumer_filter(value).items()})
    html, name = report_document(open_for_reading(settings), params, args.tz or settings.tz)
    write_export_text([html], args.output or name)
    print(f"Wrote {args.output or name}: the dashboard of that range, its charts and screens' images inside;"
          " it opens in any browser, with no network", file=sys.stderr)


def cmd_devices(args, settings):
    params = {name: value for name, value in (("from", args.from_), ("to", args.to), ("tz", args.tz))
              if value is not None}
    if args.consumer is not None:
        params.update(consumer_filter(args.consumer))
    print_answer(args, device_uptime(open_for_reading(settings), clean_devices_query(params, settings.tz)),
                 print_devices)


def print_devices(answer):
    print(f"From {answer['from'][:16]} to {answer['to'][:16]} UTC; a gap: over {answer['gap_intervals']}"
          " heartbeat intervals without one, in the kiosk's usual hours")
    _print_table("Devices", [
        (f"{row['consumer']}/{row['device'] or '(no device)'}", *coverage_columns(row),
         as_count(row["gaps"]),
         (row.get("last_heartbeat_at") or "-")[:16]) for row in answer["devices"]],
        ("device", "on (h)", "uptime", "in use (h)", "utilisation", "sessions", "per hour on", "gaps",
         "last heartbeat"))


def coverage_columns(row):
    """A coverage row's hours on, uptime, hours in use, utilisation, sessions and sessions per hour on."""
    def hours(minutes):
        return "unknown" if minutes is None else f"{minutes / 60:,.1f}"
    uptime = _share(row["minutes_on"], row["known_minutes"]) if row.get("known_minutes") else None
    return (hours(row["minutes_on"]), as_percent(uptime), hours(row["minutes_in_use"]), as_percent(row["utilisation"]),
            as_count(row["sessions"]), as_count(row["sessions_per_hour_on"]))


def cmd_screenshot(args, settings):
    try:
        screen = clean_screen_name(args.screen)
    except ValueError as error:
        raise MicroticksError(400, f"SCREEN: {error}") from None
    conn = open_database(settings)
    if args.delete:
        if not delete_screen_image(conn, screen):
            raise MicroticksError(404, f"The screen {screen!r} has no image")
        print(f"The image of {screen!r} deleted")
        return
    if not args.file:
        raise MicroticksError(400, "Give the image's FILE (or --delete)")
    with open_import_file(args.file) as stream:
        data = stream.read(MAX_IMAGE_BYTES + 1)
    try:
        image = clean_image(data)
    except ValueError as error:
        raise MicroticksError(400, f"{args.file}: {error}; nothing was stored") from None
    put_screen_image(conn, screen, image)
    print(f"{screen!r} has its image: {image.type}, {image.width} x {image.height} pixels, {len(image.data):,} bytes")


def cmd_annotate(args, settings):
    try:
        clean = clean_annotation({"time": args.at, "text": args.text, "consumer": args.consumer, "site": args.site})
    except MicroticksError as refusal:  # named as on the command line
        raise MicroticksError(400, refusal.message.replace('"time"', "--at")) from None
    conn = open_database(settings)
    annotation = add_annotation(conn, clean["time"], clean["text"], consumer_named(conn, clean["consumer"]),
                                clean["site"])
    print(f"annotation {annotation['id']} at {annotation['time_utc']}: {annotation['text']}")


def cmd_annotations(args, settings):
    conn = open_database(settings)
    if args.delete is not None:
        if not delete_annotation(conn, args.delete):
            raise MicroticksError(404, f"No annotation {args.delete}")
        print(f"annotation {args.delete} deleted")
        return
    params = {name: value for name, value in (("from", args.from_), ("to", args.to)) if value is not None}
    if args.consumer is not None:
        params.update(consumer_filter(args.consumer))
    if args.format:
        query = clean_annotation_query(params, settings.tz)
        write_export_text(export_annotations(conn, query, args.format), args.output)
        return
    print_answer(args, read_annotations(conn, clean_annotation_query(params, settings.tz)), lambda annotations:
                 _print_table(f"{len(annotations)} annotations", [
                     (a["id"], a["time"], a["consumer"] or "(all)", a["site"] or "", a["text"]) for a in annotations],
                     ("id", "time", "consumer", "site", "text")))


def cmd_rotatekey(args, settings):
    key = rotate_consumer_key(open_database(settings), args.name)
    print(f"Consumer key: {key}")
    print(f"The old key of {args.name!r} stops working now; its sessions keep their data.", file=sys.stderr)


def cmd_renameconsumer(args, settings):
    rename_consumer(open_database(settings), args.name, args.new_name)
    print(f"Consumer {args.name!r} is now {args.new_name!r}.")


def whole_argument(low, high, of=""):
    """An argparse type: a whole number from `low` to `high` (of seconds, ...)."""
    def whole(text):
        number = _whole(text.strip(), high)
        if number is None or number < low:
            import argparse  # lazily: see the imports
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number{of} from {low} to {high}")
        return number
    return whole


def argument(clean):
    """An argparse type from a validator that raises ValueError (the clean_*
    functions): its message is what argparse tells."""
    def argument_type(text):
        try:
            return clean(text)
        except ValueError as error:
            import argparse  # lazily: see the imports
            raise argparse.ArgumentTypeError(str(error)) from None
    argument_type.__name__ = clean.__name__.replace("clean_", "")  # argparse names the type in its messages
    return argument_type


def cmd_allowips(args, settings):
    set_allowed_networks(open_database(settings), args.name, args.networks)
    print(f"Consumer {args.name!r} may start sessions from "
          + (args.networks.replace(",", ", ") if args.networks else "any address") + ".")


def cmd_delete(args, settings):
    sessions, events = delete_sessions(open_database(settings), args.session)
    print(f"Deleted {sessions} session{'s' if sessions != 1 else ''} and {events} event{'s' if events != 1 else ''}.")


def cmd_backup(args, settings):
    size = backup_database(open_database(settings), args.file)
    print(f"Backed up {os.path.abspath(settings.db_path)} to {args.file} ({size:,} bytes, integrity checked).")


def cmd_restore(args, settings):
    if not os.path.isfile(args.file):
        raise MicroticksError(404, f"No such backup: {args.file}")
    restore_database(open_database(settings), args.file)
    print(f"Restored {os.path.abspath(settings.db_path)} from {args.file}.")


def cmd_purge(args, settings):
    try:
        age = parse_age(args.older_than) if args.older_than else timedelta(days=settings.retention_days)
    except ValueError as error:
        raise MicroticksError(400, str(error)) from None
    if not age:
        raise MicroticksError(400, "Say how old: --older-than 365d (or set MICROTICKS_RETENTION_DAYS)")
    cutoff = format_utc(datetime.now(timezone.utc) - age)
    conn = open_database(settings)
    before = os.path.getsize(settings.db_path)
    sessions, events = purge_older_than(conn, cutoff)
    if sessions and not args.no_vacuum:
        shrink_database(conn)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"Deleted {sessions} sessions and {events} events started before {cutoff}; "
          f"the file went from {before:,} to {os.path.getsize(settings.db_path):,} bytes.")


def cmd_status(args, settings):
    silent_after = timedelta(hours=args.silent_hours or settings.silent_hours)
    status = database_status(open_for_reading(settings), settings.db_path, silent_after)
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        print()
        return
    print(f"Database {status['database']}: {status['database_bytes']:,} bytes (+{status['wal_bytes']:,} in the WAL),"
          f" schema version {status['schema_version']}"
          + (f"; read-only: {status['read_only']}" if status["read_only"] else ""))
    print(f"{status['events']:,} events in {status['sessions']:,} sessions, {status['open_sessions']} open;"
          f" last event {status['last_event_at'] or 'never'}")
    for consumer in status["consumers"]:
        state = "revoked" if consumer["deleted_at"] else "SILENT" if consumer["silent"] else "ok"
        print(f"  consumer {consumer['name']:<24} last event {consumer['last_event_at'] or 'never':<26} {state}")
    for device in status["devices"]:
        print(f"  kiosk {device['consumer']}/{device['device']:<20} seen {device['last_seen_at']:<26}"
              f" queue {device['queue_depth'] if device['queue_depth'] is not None else '-':<6}"
              f" {'SILENT' if device['silent'] else 'ok'}")
    silent = [c["name"] for c in status["consumers"] if c["silent"]] + \
             [f"{d['consumer']}/{d['device']}" for d in status["devices"] if d["silent"]]
    if silent:
        print(f"WARNING: silent for over {silent_after.total_seconds() / 3600:g} hours: {', '.join(silent)}")


def cmd_closestale(args, settings):
    timeout = args.timeout or settings.session_timeout
    conn = open_database(settings)
    closed = close_idle_sessions(conn, timeout)
    print(f"Closed {closed} session{'s' if closed != 1 else ''} without an event for {timeout} seconds.")
    # Run from cron, this keeps the first /stats after a long time quick.
    kept = keep_stats(conn)
    print(f"Kept the statistics of {kept} closed session{'s' if kept != 1 else ''} for /stats.")


def cmd_forgetstats(args, settings):
    conn = open_database(settings)
    kinds = forget_stats(conn, args.data_key, args.bin)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"Forgot the statistics kept for {len(kinds)} data key{'s' if len(kinds) != 1 else ''} "
          f"and bin{'s' if len(kinds) != 1 else ''}" + "".join(f"\n  {key}, bin {size}" for key, size in kinds))


def cmd_serve(args, settings):
    # Create or upgrade the file now, so that a problem shows at start-up;
    # the app opens its own connections (per thread, after any fork).
    conn = open_database(settings)
    read_only = f"; read-only, so writes are answered 503: {conn.read_only}" if conn.read_only else ""
    conn.close()
    app = make_app(settings)
    settle_for_serving()
    where = f"http://{settings.host}:{settings.port}/"
    if settings.server == "threads":
        try:
            server = make_http_server(app, settings.host, settings.port, settings.threads,
                                      one_cpu=settings.cpus == "one")
        except (OSError, OverflowError) as error:  # the port taken, out of range; an unknown host
            raise MicroticksError(400, f"Cannot listen on {settings.host} port {settings.port}: "
                                       f"{getattr(error, 'strerror', None) or error}") from None
        where = f"http://{settings.host}:{server.server_port}/"
        print(f"Microticks {__version__} listening on {where} "
              f"(database: {os.path.abspath(settings.db_path)}{read_only}); Ctrl+C stops it", flush=True)
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
          f"(database: {os.path.abspath(settings.db_path)}{read_only})", flush=True)
    try:
        bottle.run(app, server=settings.server, host=settings.host, port=settings.port, quiet=True)
    except ImportError as error:
        raise MicroticksError(400, f"The {settings.server} server is not installed ({error}): "
                                   f"pip install {settings.server}, or use --server threads") from None


def build_parser():
    import argparse  # lazily: see the imports
    common = argparse.ArgumentParser(add_help=False)
    # Given before or after the command: `microticks --db x.db status` and
    # `microticks status --db x.db`. SUPPRESS keeps the command's unset
    # option from overwriting the one given before it.
    db_option = dict(default=argparse.SUPPRESS, metavar="FILE",
                     help=f"SQLite database file (default: $MICROTICKS_DB, else {DEFAULT_DB_PATH})")
    common.add_argument("--db", **db_option)
    parser = argparse.ArgumentParser(
        prog=operator_command().replace("python ", ""),
        description="Microticks: simple analytics for kiosk and touch-table apps.",
        epilog="Settings also come from environment variables (MICROTICKS_DB, ...: see the README); "
               "a flag given wins.")
    parser.add_argument("--version", action="version", version=f"Microticks {__version__}")
    parser.add_argument("--db", **db_option)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name, func, help):
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    command("initdb", cmd_initdb, "create the database, or upgrade it in place; never deletes data")
    sub = command("serve", cmd_serve, "run the HTTP service")
    sub.add_argument("--host", help=f"address to listen on (default: $MICROTICKS_HOST, else {DEFAULTS.host};"
                                    " 0.0.0.0 for every network)")
    sub.add_argument("--port", type=int, help=f"port (default: $MICROTICKS_PORT, else {DEFAULTS.port})")
    sub.add_argument("--server", help="threads (the built-in pool; default), or any server Bottle "
                                      "supports and you installed: waitress, gunicorn, cheroot, ...")
    sub.add_argument("--threads", type=whole_argument(1, 256),
                     help=f"worker threads of the built-in server (default: $MICROTICKS_THREADS, else {DEFAULTS.threads})")
    sub.add_argument("--cpus", choices=CPUS_CHOICES,
                     help="one: the built-in server keeps to one CPU core, where Python's threads take"
                          f" turns fastest; all: it runs on any (default: $MICROTICKS_CPUS, else {DEFAULTS.cpus})")
    sub.add_argument("--trusted-proxies", type=argument(clean_proxies), metavar="LIST",
                     help="reverse proxies whose header (--proxy-header) names the client:"
                          " addresses or networks, comma-separated; '' for none"
                          f" (default: $MICROTICKS_TRUSTED_PROXIES, else {','.join(DEFAULTS.trusted_proxies)})")
    sub.add_argument("--proxy-header", choices=PROXY_HEADER_CHOICES,
                     help="the header those proxies name the client in: x-forwarded-for (what nginx and Apache"
                          " append to), or forwarded (RFC 7239) where the proxy is set up to write it"
                          f" (default: $MICROTICKS_PROXY_HEADER, else {DEFAULTS.proxy_header})")
    sub = command("createconsumer", cmd_createconsumer, "register a frontend and print its consumer key")
    sub.add_argument("name", type=argument(clean_consumer_name), help="a name for the frontend, e.g. the kiosk's location")
    sub.add_argument("--allow", type=argument(clean_networks), metavar="NETWORKS",
                     help="only from these addresses or networks, comma-separated (e.g. 10.1.2.0/24)")
    command("consumers", cmd_consumers, "list the consumers")
    sub = command("revokeconsumer", cmd_revokeconsumer, "stop a consumer's key from starting sessions")
    sub.add_argument("name", help="the consumer's name")
    sub = command("rotatekey", cmd_rotatekey, "give a consumer a new key; the old one stops working")
    sub.add_argument("name", help="the consumer's name")
    sub = command("renameconsumer", cmd_renameconsumer, "rename a consumer")
    sub.add_argument("name", help="the consumer's name")
    sub.add_argument("new_name", type=argument(clean_consumer_name), help="its new name")
    sub = command("allowips", cmd_allowips, "restrict a consumer to addresses or networks (none given: any)")
    sub.add_argument("name", help="the consumer's name")
    sub.add_argument("networks", nargs="?", default="", type=argument(clean_networks),
                     help="comma-separated addresses or networks, e.g. 10.1.2.0/24,2001:db8::/48")
    sub = command("delete", cmd_delete, "erase sessions and their events (an erasure request)")
    sub.add_argument("--session", type=whole_argument(1, 10**18 - 1), action="append", required=True, metavar="ID",
                     help="a session's id; repeat for more")
    sub = command("backup", cmd_backup, "write a consistent copy of the database while the service runs")
    sub.add_argument("file", help="the copy to write (replaced if it exists)")
    sub = command("restore", cmd_restore, "replace the database's content with a backup's")
    sub.add_argument("file", help="a file written by backup")
    sub = command("purge", cmd_purge, "delete sessions (and their events) older than an age; shrink the file")
    sub.add_argument("--older-than", metavar="AGE", help="e.g. 365d, 52w, 2y, 48h "
                                                         "(default: $MICROTICKS_RETENTION_DAYS days)")
    sub.add_argument("--no-vacuum", action="store_true", help="do not shrink the file afterwards")
    sub = command("status", cmd_status, "sizes, counts, open sessions, last sign of life per consumer and kiosk")
    sub.add_argument("--silent-hours", type=whole_argument(1, MAX_AGE // timedelta(hours=1), " of hours"),
                     help="call a consumer or kiosk silent after this many hours "
                          f"(default: $MICROTICKS_SILENT_HOURS, else {DEFAULTS.silent_hours})")
    sub.add_argument("--json", action="store_true", help="print the JSON of GET /status")
    def read_filters(sub, formats=EXPORT_FORMATS):
        group = sub.add_argument_group("filters (as the HTTP API's query parameters)")
        group.add_argument("--from", dest="from_", metavar="TIME",
                           help="from this day (YYYY-MM-DD) or ISO 8601 time on")
        group.add_argument("--to", metavar="TIME", help="up to this day (included) or time (excluded)")
        group.add_argument("--date", help="sessions started on this UTC day, YYYY-MM-DD")
        group.add_argument("--ip", help="sessions from this client address")
        group.add_argument("--consumer", metavar="NAME|ID", help="a consumer's sessions: its name, or its id")
        group.add_argument("--consumer-name", help=argparse.SUPPRESS)  # the first name of --consumer NAME
        group.add_argument("--action", help="events with this action (sessions: having one)")
        group.add_argument("--session", type=int, help="session id")
        group.add_argument("--site", help="a site's sessions (this installation's: $MICROTICKS_SITE, else the host"
                                          " name; others: import --site)")
        group.add_argument("--weekday", metavar="DAYS", help="local weekdays only, comma-separated: sat,sun")
        group.add_argument("--hours", metavar="FROM-TO", help="local hours only, e.g. 10-12 (10:00 to 12:00),"
                                                              " comma-separated")
        if formats:
            group.add_argument("--sort", help="column to sort by (default: id)")
            group.add_argument("--desc", action="store_true", help="sort descending")
            group.add_argument("--limit", type=int, help="at most this many rows")
            group.add_argument("--offset", type=int, help="skip this many rows")
            group.add_argument("--after-id", type=int, help="rows after this id (cursor paging)")
            group.add_argument("--fields", help="comma-separated fields, or all")
            group.add_argument("--data-keys", help="CSV: add columns for these data keys, e.g. subject,clickX")
            group.add_argument("--data-key", help=f"sessions: the data key naming screens in the path fields"
                                                  f" (default: {DEFAULT_DATA_KEY})")
            what = {"json": "a page, as the HTTP API answers", "csv": "every row", "ndjson": "every row"}
            sub.add_argument("--format", choices=formats, default=formats[0],
                             help=", ".join(f"{name} ({what[name]})" for name in formats)
                             + "; default: %(default)s")
            sub.add_argument("--output", "-o", metavar="FILE", help="write CSV or NDJSON here, not to stdout")

    read_filters(command("events", cmd_read, "list events as the HTTP API does (JSON, CSV or NDJSON)"))
    read_filters(command("sessions", cmd_read, "list sessions as the HTTP API does (JSON, CSV or NDJSON)"))
    sub = command("export", cmd_read, "write every matching event or session as CSV (default) or NDJSON")
    sub.add_argument("kind", nargs="?", choices=("events", "sessions"), default="events",
                     help="what to export (default: events)")
    read_filters(sub, formats=("csv", "ndjson"))
    sub.add_argument("--position", metavar="FILE",
                     help="export only the events after the id this file holds (every event if it does not exist"
                          " yet), then save the newest id exported in it: for a cron job that ships new events")
    sub.add_argument("--bundle", metavar="DIR", help="write a research bundle into this new folder instead: the"
                     " events and sessions as NDJSON and CSV, stats.json, a data dictionary (README.md) and DuckDB"
                     " SQL for the headline figures (analysis.sql); takes the filters")
    sub = command("import", cmd_import, "load a GET /events JSON export, an NDJSON export or a research bundle,"
                                        " with its sessions, times and data, adding only (ids kept where free;"
                                        " a file loads once), or another site's with --site")
    sub.add_argument("file", help="the export file, or a research bundle's folder")
    sub.add_argument("--consumer", default="import", metavar="NAME|ID",
                     help="consumer the sessions belong to: its name (created if missing), or its id"
                          " (default: %(default)s)")
    sub.add_argument("--site", type=argument(clean_site_name), metavar="NAME",
                     help="the export is of another site (its MICROTICKS_SITE): its events and sessions get ids of"
                          " their own, the consumer is named CONSUMER@NAME, and what was imported for the site"
                          " before is skipped, so a later export that overlaps adds only what is new")
    sub = command("stats", cmd_stats, "print the statistics of GET /stats as readable tables")
    read_filters(sub, formats=())
    sub.add_argument("--data-key", help=f"the data key naming screens (default: {DEFAULT_DATA_KEY})")
    sub.add_argument("--bin", type=int, help=f"heatmap bin size in pixels (default: {DEFAULT_HEATMAP_BIN})")
    sub.add_argument("--tz", help="time zone, e.g. Europe/Berlin (default: $MICROTICKS_TZ, else the server's)")
    sub.add_argument("--type-separator", help="screen types are the part of a name before this (default: :)")
    sub.add_argument("--paths", type=int, metavar="N",
                     help=f"add touches per hour, transitions, and the common paths of the first N screens"
                          f" (1 to {MAX_PATH_STEPS})")
    sub.add_argument("--funnel", metavar="SCREENS", help="add the funnel of these screens, in order, comma-separated")
    sub.add_argument("--meaningful", type=int, metavar="N", help="sessions with N touches or more are"
                     f" meaningful (default: {DEFAULT_MEANINGFUL_TOUCHES})")
    sub.add_argument("--holding", action="store_true", help="add the holding power: how many are still engaged"
                     " after 10 s, 30 s, ... (Kaplan-Meier), of sessions and per screen")
    sub.add_argument("--coverage", action="store_true", help="add the coverage: whether the kiosks were on (from"
                     " their heartbeats), their use, per device, day and hour")
    sub.add_argument("--json", action="store_true", help="print the JSON that GET /stats answers")
    sub = command("compare", cmd_compare, "compare two sets of sessions (two periods, consumers, ...): both"
                  " sides' medians and shares, their differences and p values, as GET /compare answers")
    for side in "ab":
        group = sub.add_argument_group(f"side {side.upper()} (at least one filter; as /compare's {side}.*)")
        group.add_argument(f"--{side}-from", dest=f"{side}.from", metavar="TIME", help="from this day or time on")
        group.add_argument(f"--{side}-to", dest=f"{side}.to", metavar="TIME",
                           help="up to this day (included) or time (excluded)")
        group.add_argument(f"--{side}-consumer", dest=f"{side}.consumer", metavar="NAME|ID",
                           help="a consumer's sessions: its name, or its id")
        group.add_argument(f"--{side}-consumer-name", dest=f"{side}.consumer_name", help=argparse.SUPPRESS)
        group.add_argument(f"--{side}-ip", dest=f"{side}.ip", metavar="ADDRESS", help="client address")
        group.add_argument(f"--{side}-site", dest=f"{side}.site", metavar="NAME", help="site")
        group.add_argument(f"--{side}-weekday", dest=f"{side}.weekday", metavar="DAYS",
                           help="local weekdays, comma-separated: sat,sun")
        group.add_argument(f"--{side}-hours", dest=f"{side}.hours", metavar="FROM-TO", help="local hours: 10-12")
    sub.add_argument("--data-key", help=f"the data key naming screens (default: {DEFAULT_DATA_KEY})")
    sub.add_argument("--tz", help="time zone of days and times (default: $MICROTICKS_TZ, else the server's)")
    sub.add_argument("--meaningful", type=int, metavar="N", help="sessions with N touches or more are"
                     f" meaningful (default: {DEFAULT_MEANINGFUL_TOUCHES})")
    sub.add_argument("--json", action="store_true", help="print the JSON that GET /compare answers")
    sub = command("annotate", cmd_annotate, "note what happened at a time (new content, a kiosk moved):"
                  " a marker on the dashboard's time charts")
    sub.add_argument("text", help=f"what happened (up to {MAX_ANNOTATION_CHARS} characters)")
    sub.add_argument("--at", required=True, metavar="TIME", help="when: an ISO 8601 time with a zone,"
                     " e.g. 2017-05-24T10:00+02:00")
    sub.add_argument("--consumer", metavar="NAME|ID", help="the consumer it concerns: its name, or its id"
                                                          " (default: every one)")
    sub.add_argument("--site", help="the site it concerns")
    sub = command("report", cmd_report, "write the dashboard of a range as one HTML file (its charts and the"
                  " screens' images inside; prints on A4): for a director, an archive, a mail")
    sub.add_argument("--from", dest="from_", metavar="TIME", help="from this day or time on")
    sub.add_argument("--to", metavar="TIME", help="up to this day (included) or time (excluded)")
    sub.add_argument("--consumer", metavar="NAME|ID", help="one consumer's sessions: its name, or its id")
    sub.add_argument("--site", help="one site's sessions")
    sub.add_argument("--data-key", help=f"the data key naming screens (default: {DEFAULT_DATA_KEY})")
    sub.add_argument("--touches", choices=TOUCHES_CHOICES, help="the heatmaps' touches (default: all)")
    sub.add_argument("--tz", help="time zone of days and hours (default: $MICROTICKS_TZ, else the server's)")
    for side in ("from", "to", "consumer", "site"):
        sub.add_argument(f"--b-{side}", dest=f"b_{side}", metavar="NAME|ID" if side == "consumer" else
                         ("TIME" if side in ("from", "to") else None), help=f"compare with side B: its {side}")
    sub.add_argument("--output", "-o", metavar="FILE", help="where to write it (default:"
                                                            " microticks-report-FROM-TO.html)")
    sub = command("devices", cmd_devices, "each kiosk's uptime (from its heartbeats), use and gaps, as GET /devices"
                  " answers")
    sub.add_argument("--from", dest="from_", metavar="TIME", help="from this day or time on (default: its first"
                                                                  " heartbeat)")
    sub.add_argument("--to", metavar="TIME", help="up to this day (included) or time (excluded); default: now")
    sub.add_argument("--consumer", metavar="NAME|ID", help="that consumer's devices: its name, or its id")
    sub.add_argument("--tz", help="time zone of the usual hours (default: $MICROTICKS_TZ, else the server's)")
    sub.add_argument("--json", action="store_true", help="print the JSON that GET /devices answers")
    sub = command("screenshot", cmd_screenshot, "give a screen (a value of the data key) an image, which the"
                  " heatmaps are drawn over (or --delete it)")
    sub.add_argument("screen", metavar="SCREEN", help="the screen, e.g. main or year:2017")
    sub.add_argument("file", metavar="FILE", nargs="?", help=f"a PNG, JPEG or WebP image, up to {MAX_IMAGE_BYTES:,}"
                                                             " bytes")
    sub.add_argument("--delete", action="store_true", help="delete the screen's image")
    sub = command("annotations", cmd_annotations, "list or export the annotations (or delete one)")
    sub.add_argument("--from", dest="from_", metavar="TIME", help="from this day or time on")
    sub.add_argument("--to", metavar="TIME", help="up to this day (included) or time (excluded)")
    sub.add_argument("--consumer", metavar="NAME|ID", help="that consumer's (its name, or its id), and those for"
                                                          " every consumer")
    sub.add_argument("--delete", type=whole_argument(1, 10**18 - 1), metavar="ID", help="delete this annotation")
    sub.add_argument("--json", action="store_true", help="print the JSON of GET /annotations")
    sub.add_argument("--format", choices=("csv", "ndjson"), help="write them as CSV or NDJSON, as exports do")
    sub.add_argument("--output", "-o", metavar="FILE", help="with --format: write here, not to stdout")
    sub = command("closestale", cmd_closestale, "close sessions without an event for a while (the "
                                                "service does this too, on requests; this is for cron)")
    sub.add_argument("--timeout", type=whole_argument(1, MAX_AGE // timedelta(seconds=1), " of seconds"),
                     help=f"seconds without an event (default: $MICROTICKS_SESSION_TIMEOUT, else {DEFAULTS.session_timeout})")
    sub = command("forgetstats", cmd_forgetstats, "delete the statistics /stats keeps (all, or of one data "
                                                  "key or bin) and shrink the file; they are computed again")
    sub.add_argument("--data-key", help="only those of this data key")
    sub.add_argument("--bin", type=whole_argument(1, MAX_HEATMAP_BIN), help="only those of this heatmap bin size")
    return parser


###############################################################################
# Page text ###################################################################
###############################################################################

# The pages, the API description and the documents Microticks writes, as
# data: the code above takes them from here, as bottle.py keeps its
# templates at its end. Each template marks what is filled in as __NAME__.

def fill(template, **values):
    """`template` with each __NAME__ mark replaced by values[NAME] (text
    escaped for where it goes, by the caller)."""
    for name, value in values.items():
        template = template.replace(f"__{name}__", value)
    return template


#: What a session's path fields mean (the API description).
SESSION_PATH_DEFINITION = (
    "Not among the default fields; ask for them with fields= (or all): path, the session's visits in order,"
    " each {screen, seconds, touches}: a visit is a run of events with the same screen (the data key"
    f" data_key=, default {DEFAULT_DATA_KEY}), events without one aside; seconds, from its first event to the next visit's"
    " (null for the last visit: only idle time came after it); touches, its click and swipe events."
    " screens: distinct screens; touches: click and swipe events; page_changes: pageChange events;"
    " actions: events per action.")


#: What /stats' path figures mean (the API description).
PATH_FIGURES_DEFINITION = (
    "With paths= or funnel=; added up from each session's kept visits. touches_per_hour: click and swipe"
    " events per hour of the day, in tz. transitions (paths=): {from, to, count, median_seconds} for each"
    " move from one visit's screen to the next visit's (VALUES_DEFINITION), a session's first coming from"
    " (entry) and its last going to (exit); median_seconds, of the time on the from screen (none for entry"
    " and exit). common_paths (paths=N): the 20 most common sequences of a session's first N visited screens,"
    " with how many sessions had each. journeys (paths=N): the same first N screens step by step,"
    " {step, from, to, sessions}: at step 1 every session moves from (entry) to its first screen, at step k"
    " from its (k-1)th screen to its kth, or to (exit) if it had no more (then it takes no further step):"
    " the bands of a journey diagram, and each step's sessions add up to those still in after the step"
    " before. funnel (funnel=a,b,c): per step, how many sessions visited its"
    " screen after the steps before it, in order (other screens between allowed), and the median seconds"
    " from arriving on the first step's screen to arriving on this step's; an unknown screen reaches 0.")


#: What /stats' engagement figures mean (the API description and the docs page).
ENGAGEMENT_DEFINITION = (
    "Per session: its touches (click and swipe events); its screens (the distinct values of the data key"
    " among its events); its time to first touch (seconds from the session's start to its first touch;"
    " sessions without a touch are not counted, and a tracker that starts the session with the first touch"
    " makes it 0). meaningful_sessions: sessions with at least meaningful_touches touches (meaningful=,"
    f" default {DEFAULT_MEANINGFUL_TOUCHES}), meaningful_share their share of all sessions; bounces: sessions"
    " with one touch or none, bounce_share theirs. touches_per_session, screens_per_session and"
    " time_to_first_touch: min, median, mean and max over the sessions. The median and mean session"
    " duration are duration's (from the start to the stop, else to the last event).")


#: What /stats' holding power means (the API description and the docs page).
HOLDING_DEFINITION = (
    "With holding=1, holding: how long the exhibit holds people, as Kaplan-Meier survival curves. sessions:"
    " of the session durations (start to stop); a session not yet stopped counts as lasting at least to its"
    " last event (censored). screens: per screen, most visited first, of the time on it: a visit is measured"
    " to the next visit's arrival, and a session's last visit, which has no next, counts as lasting at least"
    " to its last touch on that screen (censored). Censoring matters because dropping those visits, or counting"
    " them as ended, would make the visitors who stayed longest look as if they left early. Each has n (all"
    " times), ended and censored; median: the first time at which the share still engaged is 0.5 or less"
    " (null if it never falls that far); median_ci: its 95% confidence interval (the times whose 95% band holds"
    " 0.5, Brookmeyer and Crowley; null where the band does not reach 0.5); still_engaged: at each of"
    f" {', '.join(map(str, HOLDING_CHECKPOINTS))} seconds, the share still engaged (the curve's value then)"
    " with its 95% bounds (Greenwood's variance, linear, clipped to 0..1), null beyond the longest time"
    " observed unless everyone had left by then (nobody was followed that long); curve: [seconds, share, lower, upper]"
    f" at each time someone left, from [0, 1, 1, 1] (at most {MAX_CURVE_POINTS} points, evenly thinned;"
    f" screens: for the {HOLDING_CURVES} most visited). In /compare, differences.duration_survival: the"
    " log-rank test of the two sides' session curves (observed and expected endings per side, chi2 of one"
    " degree of freedom, p_value).")


#: What /stats' coverage and GET /devices mean (the API description and the docs page).
COVERAGE_DEFINITION = (
    "With coverage=1, coverage: whether the kiosks were on, and how much they were used, from their heartbeats"
    " (kept per device to the minute) and the selected sessions, over the range (from= and to=, else from the"
    " first heartbeat or session to now) in the selected local weekdays and hours. A heartbeat vouches that"
    " its device was on in its minute and in the minutes of one heartbeat interval after it (interval=, as"
    f" the tracker says; default {DEFAULT_HEARTBEAT_INTERVAL} s; one minute's slack for the timer). Per device:"
    " known_minutes, from its first heartbeat on (before it, and for a device that never sent one, whether it"
    " was on is unknown: null, not off); minutes_on; minutes_in_use, the union of its sessions' spans (start"
    " to stop, else to the last event; at most a day each), overlaps merged; utilisation, in use / on;"
    " sessions (started in the range) and sessions_per_hour_on; multi_user_share, the share of the in-use"
    " time with two or more sessions at once, and most_at_once; usual_hours, the local hours of the day in"
    " which it was on at least half as long as in its most-on hour, over the range and at least the 4"
    " weeks before its end; gaps, the stretches without heartbeats longer than gap_intervals"
    f" ({GAP_INTERVALS}) intervals of which more than that lies in its usual hours (a kiosk switched off"
    " every night has none), with gap_minutes and the most recent recent_gaps (from, to, minutes,"
    " usual_minutes, ongoing: it lasts to the range's end). Sessions without a device are listed per"
    " consumer (device null). consumers: the same added up per consumer (utilisation over its devices"
    " with heartbeats). per_day and per_hour (local, in tz): known_minutes and minutes_on (summed over the"
    " devices), minutes_in_use, sessions; per_day's state: unknown (no device known), off (none on) or on."
    " GET /devices answers the devices' rows, with uptime (minutes_on / known_minutes) and each one's last"
    " sign of life.")


#: What /compare answers (the API description and the docs page).
COMPARE_DEFINITION = (
    "a and b: the /stats answer for each side's filters (a.from, b.consumer_name, ...; the other /stats"
    " parameters are shared). differences: for duration (seconds), touches_per_session, screens_per_session"
    " and time_on_screen (per screen, over its measured visits): a_median, b_median, difference (b - a),"
    " a_n and b_n (sessions or visits), u (the Mann-Whitney U of side a) and p_value, two-sided, by the"
    " normal approximation with tie and continuity correction. For meaningful_share (of the sessions),"
    " first_picks (per screen, its share of the sessions' first visits) and visit_shares (per screen, its"
    " share of all visits): a and b (the shares), difference (b - a), the counts and totals, and the p_value"
    " of their 2x2 table by the chi-square test with Yates' correction, or by Fisher's exact test (test:"
    " fisher) where an expected count is under 5. p_value is null where a side has nothing to test (an"
    " empty side). tests: how many p values were computed: where nothing differs, about one in twenty"
    " still comes out under 0.05 by chance. A session's visits are not independent of each other, so the"
    " visit-level tests (time_on_screen, visit_shares) overstate their certainty. duration_survival: the"
    " log-rank test of the two sides' session durations as survival curves (open sessions censored at their"
    " last event; see holding): observed and expected endings per side, chi2 and p_value.")


#: What /stats' per-screen figures mean (the API description and the docs page).
VALUES_DEFINITION = (
    "Per value of the data key (the screen), in the selected sessions: events carrying it, clicks,"
    " page_turns (pageChange events), sessions, and visits. A visit is a run of a session's events with"
    " this value, in the tracker's order (seq, else as stored); events without a value (stopSession)"
    " neither begin nor end one. first, second, third: how often it was a session's first, second or"
    " third visit. time_spent (seconds): a visit's time on the screen, from its first event (arriving on"
    " it) to the first event of the next visit (the next screen change); min, mean, max over the visits"
    " measured (measured: how many). A session's last visit is not measured: after its last touch came"
    " only the idle time until the kiosk stopped the session.")


def _years_pattern(first, last):
    """A regular expression for the four-digit years from `first` to `last`."""
    parts, year = [], first
    while year <= last:
        if year % 10 == 0 and year + 9 <= last:
            parts.append(f"{year // 10}[0-9]")
            year += 10
        else:
            parts.append(str(year))
            year += 1
    return "|".join(parts)


def openapi_spec():
    """The OpenAPI 3.1 description of every endpoint (GET /openapi.json);
    the documentation page at / is rendered from it."""
    def ref(name):
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(description, schema=None, content_type="application/json"):
        body = {"description": description}
        if schema is not None:
            body["content"] = {content_type: {"schema": schema}}
        return body

    def errors(*codes):
        reasons = {400: "A field or parameter is missing or malformed; `errors` names each.",
                   401: "MICROTICKS_KEY is set and the request does not carry it.",
                   403: "Unknown or revoked consumer key.",
                   404: "Unknown session token, session, annotation, or consumer named.",
                   409: "The session was stopped by its client.",
                   411: "A chunked body: send a Content-Length.",
                   413: f"A body over {MAX_BODY_BYTES} bytes or a batch over {MAX_BATCH_EVENTS} events.",
                   415: "A body that is neither a form nor JSON.",
                   429: "Too many requests from this address (MICROTICKS_RATE_LIMIT); see Retry-After.",
                   503: "The database is busy or cannot be written; see Retry-After."}
        return {str(c): answer(reasons[c], ref("Error")) for c in codes}

    def body(schema, form_name):
        return {"required": True, "description": "A form, or JSON (text/plain is read as JSON: "
                                                 "navigator.sendBeacon sends that)", "content": {
            "application/x-www-form-urlencoded": {"schema": ref(form_name + "Form")},
            "application/json": {"schema": schema},
            "text/plain": {"schema": schema}}}

    def param(name, description, schema=None, location="query"):
        # An empty value counts as absent, as HTML forms send them.
        return {"name": name, "in": location, "required": location == "path", "description": description,
                "schema": {"anyOf": [schema, {"const": ""}]} if schema else {"type": "string"}}

    whole = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}
    day_or_time = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}

    def optional(schema, description=None):
        """An optional field: null and "" count as absent."""
        described = {"description": description} if description else {}
        return {"anyOf": [schema, {"type": "null"}, {"const": ""}], **described}

    timestamp = {"type": "string", "format": "date-time", "maxLength": MAX_TIMESTAMP_CHARS,
                 "examples": ["2017-08-25T17:09:19.438Z"],
                 "description": "ISO 8601 with a zone (Z or an offset); seconds and fractions optional"}
    client_id = {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"}

    def text(max_chars, min_chars=1):
        """A text field: no NUL, which C readers of the file take for its end."""
        return {"type": "string", "minLength": min_chars, "maxLength": max_chars, "pattern": "^[^\\u0000]*$"}

    this_year = datetime.now().year
    sent_at = {**timestamp, "pattern": f"^({_years_pattern(this_year - 98, this_year + 98)})-",
               "description": "The client's clock when sending: corrects a wrong clock; within"
                              f" {MAX_AGE.days // 365} years of the server's"}
    filters = [
        param("from", "From this day (YYYY-MM-DD) or time on (events: their time; sessions: their start)",
              day_or_time),
        param("to", "Up to this day (included) or time (excluded)", day_or_time),
        param("date", "Sessions started on this UTC day, YYYY-MM-DD", {"type": "string", "format": "date"}),
        param("ip", "Sessions from this client address", {"type": "string", "maxLength": 64}),
        param("consumer", "Consumer id", whole),
        param("consumer_name", "Consumer name", {"type": "string", "maxLength": 200}),
        param("action", "Events with this action (sessions: having one)",
              {"type": "string", "maxLength": MAX_ACTION_CHARS}),
        param("session", "One session's id", whole),
        param("site", "One site's sessions (this installation's: MICROTICKS_SITE; others: import --site)",
              {"type": "string", "maxLength": MAX_CONSUMER_NAME_CHARS}),
        param("weekday", "Local weekdays only (events: their time; sessions: their start, in tz), comma-separated",
              {"type": "string", "pattern": "^(mon|tue|wed|thu|fri|sat|sun)(,(mon|tue|wed|thu|fri|sat|sun))*$",
               "maxLength": 100, "examples": ["sat,sun"]}),
        param("hours", "Local hours only, from-to (to excluded), comma-separated; 22-2 runs past midnight",
              {"type": "string", "pattern": "^([01]?[0-9]|2[0-3])-([01]?[0-9]|2[0-4])(,([01]?[0-9]|2[0-3])-([01]?[0-9]|2[0-4]))*$",
               "maxLength": 100, "examples": ["10-12", "10-12,14-16"]}),
    ]
    screen_name = {"name": "screen", "in": "path", "required": True,
                   "description": f"A value of the data key: 1 to {MAX_SCREEN_CHARS} characters, no /",
                   "schema": {"type": "string", "minLength": 1, "maxLength": MAX_SCREEN_CHARS,
                              "pattern": "^[^/\\u0000-\\u001f\\u007f-\\u009f]+$", "not": {"enum": [".", ".."]}}}
    screen_key = param("data_key", f"The data key naming screens in the path fields (default {DEFAULT_DATA_KEY})",
                       {"type": "string", "pattern": "^[A-Za-z0-9_:-]{1,64}$"})
    stats_params = [
        param("data_key", f"The data key naming screens (default {DEFAULT_DATA_KEY})",
              {"type": "string", "pattern": "^[A-Za-z0-9_:-]{1,64}$"}),
        param("bin", f"Heatmap bin size in pixels (default {DEFAULT_HEATMAP_BIN})",
              {"type": "integer", "minimum": 1, "maximum": 10000}),
        param("tz", "Time zone, e.g. Europe/Berlin (default MICROTICKS_TZ)",
              {"type": "string", "enum": ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Asia/Kolkata"],
               "description": "Any IANA zone name; these are examples"}),
        param("type_separator", "Screen types are the part of a screen's name before this (default :)",
              {"type": "string", "minLength": 1, "maxLength": 3}),
        param("paths", "Add the path figures (touches_per_hour, transitions, common_paths): common paths of this"
                       " many first screens", {"type": "integer", "minimum": 1, "maximum": MAX_PATH_STEPS}),
        param("funnel", f"Add a funnel of these 2 to {MAX_PATH_STEPS} screens, in order, comma-separated",
              {"type": "string", "pattern": "^[^,]+(,[^,]+){1,9}$", "maxLength": 2000,
               "examples": ["main,year:2017"]}),
        param("meaningful", f"Sessions with this many touches or more are meaningful (default"
                            f" {DEFAULT_MEANINGFUL_TOUCHES})",
              {"type": "integer", "minimum": 1, "maximum": MAX_MEANINGFUL_TOUCHES}),
        param("touches", "The heatmaps' touch points: all (default), or navigating: those that moved to another"
                         " screen (they carry prevSubject)", {"type": "string", "enum": list(TOUCHES_CHOICES)}),
        param("holding", "1: add the holding power (Kaplan-Meier survival curves of sessions and of time on each"
                         " screen); 0 or absent: not", {"type": "string", "enum": ["0", "1"]}),
        param("coverage", "1: add the coverage (whether the kiosks were on, from their heartbeats, and how much"
                          " they were used); 0 or absent: not", {"type": "string", "enum": ["0", "1"]}),
    ]
    paging = [
        param("after_id", "Rows with a larger id (with sort.desc=id: smaller): cursor paging", whole),
        param("limit", f"Rows in a page, 0 to {MAX_PAGE_LIMIT}; without it, every row, streamed (as the first"
                       " Microticks answered)", {"type": "integer", "minimum": 0, "maximum": MAX_PAGE_LIMIT}),
        param("offset", "Rows to skip", whole),
        param("format", "json (every matching row, or a page with limit=), csv or ndjson (a download of every"
                        " matching row)",
              {"type": "string", "enum": list(EXPORT_FORMATS)}),
    ]

    def read_params(sorts, columns):
        return filters + paging + [
            param("sort", "Sort ascending by", {"type": "string", "enum": list(sorts)}),
            param("sort.desc", "Sort descending by (after sort, if both)", {"type": "string", "enum": list(sorts)}),
            param("fields", f"Comma-separated fields, or all: {', '.join(columns)}",
                  {"type": "string", "pattern": f"^(all|({'|'.join(columns)})(,({'|'.join(columns)}))*)$"}),
        ]

    exports = {"text/csv": {"schema": {"type": "string"}}, "application/x-ndjson": {"schema": {"type": "string"}}}
    event_fields = {
        "token": {**text(MAX_TOKEN_CHARS), "description": "From POST /sessions"},
        "action": {**text(MAX_ACTION_CHARS), "examples": ["click"]},
        "data": {"description": f"Forms: a JSON string (plain text is kept as a string). JSON bodies: any"
                                f" JSON value. At most {MAX_DATA_BYTES} bytes, {MAX_DATA_DEPTH} levels deep."},
        "ts": timestamp,
        "uuid": optional(client_id, "Chosen by the client: a retry with the same uuid stores nothing twice"),
        "seq": optional({"type": "integer", "minimum": 0, "maximum": 2**53 - 1},
                        "The event's number in its session: 1, 2, 3..."),
        "boot": optional(client_id, "The page load that sent the event"),
        "sent_at": optional(sent_at),
    }
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "Microticks", "version": __version__,
                 "description": "Simple analytics for kiosk and touch-table apps. With MICROTICKS_KEY set, every "
                                "request but OPTIONS, /health and the pages needs the key.",
                 "license": {"name": "MIT", "identifier": "MIT"}},
        "components": {
            "securitySchemes": {
                "queryKey": {"type": "apiKey", "in": "query", "name": "key"},
                "headerKey": {"type": "apiKey", "in": "header", "name": "X-Microticks-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error", "status"], "properties": {
                    "error": {"type": "string"}, "status": {"type": "integer"},
                    "errors": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}}}},
                "SessionStart": {"type": "object", "required": ["consumer_key", "ts"], "properties": {
                    "consumer_key": text(MAX_TOKEN_CHARS * 2),
                    "ts": timestamp, "uuid": event_fields["uuid"], "sent_at": event_fields["sent_at"],
                    "device": optional(text(MAX_DEVICE_CHARS, 0)),
                    "app_version": optional(text(MAX_DEVICE_CHARS, 0))}},
                "Event": {"type": "object", "required": ["token", "action", "ts"], "properties": event_fields},
                "Batch": {"type": "object", "required": ["events"], "properties": {
                    "events": {"type": "array", "maxItems": MAX_BATCH_EVENTS,
                               "items": {"description": "An Event. Each is checked on its own: a bad one"
                                                        " (not even an object) gets an error result"}},
                    "sent_at": event_fields["sent_at"],
                    "sessions": {"type": "array", "maxItems": MAX_BATCH_SESSIONS,
                                 "description": "Sessions to start first (a SessionStart each, with its uuid);"
                                                " an event without a token may then name one by \"session\":"
                                                " its uuid. For a page closing before its token came back.",
                                 "items": {"allOf": [ref("SessionStart"),
                                                     {"required": ["uuid"], "properties": {"uuid": client_id}}]}}}},
                "Stored": {"type": "object", "required": ["event_id"], "properties": {
                    "event_id": {"type": "integer"}, "duplicate": {"type": "boolean"}}},
                "BatchResults": {"type": "object", "required": ["results"], "properties": {
                    "results": {"type": "array", "items": {"oneOf": [ref("Stored"), ref("Error")]}},
                    "status": {"type": "integer"}}},
                "Stop": {"type": "object", "required": ["token", "ts"], "properties": {
                    "token": event_fields["token"], "ts": timestamp, "sent_at": event_fields["sent_at"]}},
                "Heartbeat": {"type": "object", "required": ["consumer_key", "device"], "properties": {
                    "consumer_key": text(MAX_TOKEN_CHARS * 2),
                    "device": text(MAX_DEVICE_CHARS),
                    "app_version": optional(text(MAX_DEVICE_CHARS, 0)),
                    "queue": optional({"type": "integer", "minimum": 0, "maximum": 2**53 - 1}),
                    "ts": optional({**timestamp, "description": "When it beat, by the kiosk's clock (default: when"
                                                                " it arrives)"}),
                    "sent_at": event_fields["sent_at"],
                    "beats": optional({"type": "array", "maxItems": MAX_QUEUED_BEATS, "items": timestamp,
                                       "description": "Heartbeats queued while offline, by the kiosk's clock"}),
                    "interval": optional({"type": "integer", "minimum": HEARTBEAT_INTERVALS[0],
                                          "maximum": HEARTBEAT_INTERVALS[1],
                                          "description": "Seconds between its heartbeats"})}},
                "EventsPage": {"type": "object", "required": ["events", "count"], "properties": {
                    "events": {"type": "array", "items": {"type": "object", "properties": {
                        "id": {"type": "integer"}, "session_id": {"type": "integer"}, "time": {"type": "string"},
                        "action": {"type": "string"}, "data": {}}}},
                    "count": {"type": "integer", "description": "Rows matching the filters, not the page length"},
                    "status": {"type": "integer"}}},
                "Session": {"type": "object", "description": SESSION_PATH_DEFINITION,
                            "properties": {name: {} for name in SESSION_COLUMNS}},
                "SessionsPage": {"type": "object", "required": ["sessions", "count"], "properties": {
                    "sessions": {"type": "array", "items": ref("Session")},
                    "count": {"type": "integer"}, "status": {"type": "integer"}}},
                "Stats": {"type": "object", "required": ["sessions", "events"], "properties": {
                    "sessions": {"type": "integer"}, "events": {"type": "integer"}, "timezone": {"type": "string"},
                    "sessions_per_day": {"type": "array"}, "sessions_per_hour": {"type": "array"},
                    "sessions_per_weekday": {"type": "array"}, "duration": {"type": "object"},
                    "events_per_session": {"type": "object"}, "actions": {"type": "array"},
                    "data_key": {"type": "string"}, "heatmaps": {"type": "object"},
                    "values": {"type": "array", "description": VALUES_DEFINITION},
                    "screen_types": {"type": "array", "description": "Per screen type (the part of a screen's name"
                                     " before type_separator): visits, events and screens of that type"},
                    "touches_per_hour": {"type": "array", "description": PATH_FIGURES_DEFINITION},
                    "transitions": {"type": "array"}, "common_paths": {"type": "array"}, "funnel": {"type": "array"},
                    "journeys": {"type": "array"},
                    "meaningful_sessions": {"type": "integer", "description": ENGAGEMENT_DEFINITION},
                    "meaningful_touches": {"type": "integer"}, "meaningful_share": {"type": ["number", "null"]},
                    "bounces": {"type": "integer"}, "bounce_share": {"type": ["number", "null"]},
                    "touches_per_session": {"type": "object"}, "screens_per_session": {"type": "object"},
                    "time_to_first_touch": {"type": "object"},
                    "holding": {"type": "object", "description": HOLDING_DEFINITION},
                    "coverage": {"type": "object", "description": COVERAGE_DEFINITION},
                    "annotations": {"type": "array", "items": ref("Annotation"),
                                    "description": "The annotations in the range, for every consumer or the"
                                                   " one filtered for"},
                    "status": {"type": "integer"}}},
                "NewAnnotation": {"type": "object", "required": ["time", "text"], "properties": {
                    "time": {**timestamp, "description": "When it happened: ISO 8601 with a zone"},
                    "text": text(MAX_ANNOTATION_CHARS),
                    "consumer": optional(text(MAX_CONSUMER_NAME_CHARS), "The consumer it concerns (a name;"
                                                                        " default: every consumer)"),
                    "site": optional(text(MAX_CONSUMER_NAME_CHARS), "The site it concerns")}},
                "Annotation": {"type": "object", "properties": {name: {} for name in ANNOTATION_FIELDS}},
            },
        },
        "security": [{}, {"queryKey": []}, {"headerKey": []}, {"bearer": []}],
        "paths": {
            "/sessions": {
                "post": {"summary": "Start a session", "operationId": "startSession",
                         "description": "Answers the session's token. A retried start with the same uuid answers"
                                        " the same token.",
                         "requestBody": body(ref("SessionStart"), "SessionStart"),
                         "responses": {"200": answer("The session's token", {"type": "object", "required": ["token"],
                                                     "properties": {"token": {"type": "string"},
                                                                    "duplicate": {"type": "boolean"},
                                                                    "status": {"type": "integer"}}}),
                                       **errors(400, 401, 403, 409, 411, 413, 415, 429, 503)}},
                "get": {"summary": "List sessions", "operationId": "listSessions",
                        "parameters": read_params(SESSION_SORTS, SESSION_COLUMNS) + [screen_key],
                        "responses": {"200": {"description": "A page of sessions, or a CSV/NDJSON download",
                                              "content": {"application/json": {"schema": ref("SessionsPage")},
                                                          **exports}},
                                      **errors(400, 401, 429, 503)}},
            },
            "/events": {
                "post": {"summary": "Store an event, or a batch of events", "operationId": "storeEvents",
                         "description": "A batch is a JSON object with an events list: each event is stored or"
                                        " refused on its own. An event whose uuid was stored before is answered"
                                        " with the first one's id and duplicate: true.",
                         "requestBody": body({"oneOf": [ref("Event"), ref("Batch")]}, "Event"),
                         "responses": {"200": answer("The event's id, or one result per event of a batch",
                                                     {"oneOf": [ref("Stored"), ref("BatchResults")]}),
                                       **errors(400, 401, 404, 409, 411, 413, 415, 429, 503)}},
                "get": {"summary": "List events", "operationId": "listEvents",
                        "parameters": read_params(EVENT_SORTS, EVENT_COLUMNS) + [
                            param("data_keys", "CSV/NDJSON: a column per data key, e.g. subject,clickX",
                                  {"type": "string", "pattern": "^[A-Za-z0-9_:-]{1,64}(,[A-Za-z0-9_:-]{1,64}){0,19}$"})],
                        "responses": {"200": {"description": "A page of events, or a CSV/NDJSON download",
                                              "content": {"application/json": {"schema": ref("EventsPage")},
                                                          **exports}},
                                      **errors(400, 401, 429, 503)}},
            },
            "/sessions/{session_id}": {
                "get": {"summary": "One session, with every field: its path among them", "operationId": "getSession",
                        "parameters": [{"name": "session_id", "in": "path", "required": True, "schema": whole},
                                       screen_key],
                        "responses": {"200": answer("The session", {"type": "object", "required": ["session"],
                                                                    "properties": {"session": ref("Session"),
                                                                                   "status": {"type": "integer"}}}),
                                      **errors(400, 401, 404, 429, 503)}},
            },
            "/sessions/stop": {
                "post": {"summary": "Stop a session", "operationId": "stopSession",
                         "description": "Stopping a stopped session changes nothing (already_stopped: true).",
                         "requestBody": body(ref("Stop"), "Stop"),
                         "responses": {"200": answer("Stopped", {"type": "object", "properties": {
                             "stopped": {"type": "boolean"}, "already_stopped": {"type": "boolean"},
                             "status": {"type": "integer"}}}),
                             **errors(400, 401, 404, 411, 413, 415, 429, 503)}},
            },
            "/heartbeat": {
                "post": {"summary": "Report that a kiosk is alive", "operationId": "heartbeat",
                         "description": "Kept as history, to the minute, per device: the coverage of /stats and"
                                        " GET /devices. beats (JSON only): heartbeats the tracker queued while"
                                        f" offline. Heartbeats over {HEARTBEAT_MAX_AGE.days} days old are counted"
                                        " (too_old) but not kept; one more than"
                                        f" {HEARTBEAT_MAX_LEAD.seconds // 60} minutes ahead of the server's clock"
                                        " (after sent_at's correction) is refused.",
                         "requestBody": body(ref("Heartbeat"), "Heartbeat"),
                         "responses": {"200": answer("Recorded", {"type": "object", "properties": {
                             "device_id": {"type": "integer"}, "minutes": {"type": "integer"},
                             "too_old": {"type": "integer"}, "status": {"type": "integer"}}}),
                             **errors(400, 401, 403, 411, 413, 415, 429, 503)}},
            },
            "/devices": {
                "get": {"summary": "Each kiosk's uptime: its coverage from its heartbeats, and its last sign of"
                                   " life", "operationId": "devices", "description": COVERAGE_DEFINITION,
                        "parameters": [p for p in filters if p["name"] in DEVICES_PARAMETERS]
                        + [p for p in stats_params if p["name"] == "tz"],
                        "responses": {"200": answer("The devices", {"type": "object", "properties": {
                            "from": {"type": "string"}, "to": {"type": "string"}, "timezone": {"type": "string"},
                            "gap_intervals": {"type": "integer"}, "devices": {"type": "array"},
                            "status": {"type": "integer"}}}), **errors(400, 401, 429, 503)}},
            },
            "/stats": {
                "get": {"summary": "Statistics of the selected sessions", "operationId": "stats",
                        "parameters": filters + stats_params,
                        "responses": {"200": answer("The statistics", ref("Stats")), **errors(400, 401, 429, 503)}},
            },
            "/compare": {
                "get": {"summary": "Compare two sets of sessions: both sides' statistics, their differences and"
                                   " p values", "operationId": "compare", "description": COMPARE_DEFINITION,
                        "parameters": [{**p, "name": f"{side}.{p['name']}", "description": f"Side {side}: "
                                        + p["description"]} for side in "ab" for p in filters] + stats_params,
                        "responses": {"200": answer("Both sides' statistics and their differences", {
                            "type": "object", "required": ["a", "b", "differences", "tests"], "properties": {
                                "a": ref("Stats"), "b": ref("Stats"), "differences": {"type": "object"},
                                "tests": {"type": "integer"}, "status": {"type": "integer"}}}),
                            **errors(400, 401, 429, 503)}},
            },
            "/annotations": {
                "post": {"summary": "Note what happened at a time (new content, a kiosk moved)",
                         "operationId": "addAnnotation", "requestBody": body(ref("NewAnnotation"), "NewAnnotation"),
                         "responses": {"201": answer("The annotation stored", {"type": "object", "properties": {
                             "annotation": ref("Annotation"), "status": {"type": "integer"}}}),
                             **errors(400, 401, 404, 411, 413, 415, 429, 503)}},
                "get": {"summary": "List annotations, in time order", "operationId": "listAnnotations",
                        "parameters": [p for p in filters + paging if p["name"] in ANNOTATION_FILTERS],
                        "responses": {"200": {"description": "The annotations, or a CSV/NDJSON download", "content": {
                            "application/json": {"schema": {"type": "object", "properties": {
                                "annotations": {"type": "array", "items": ref("Annotation")},
                                "status": {"type": "integer"}}}}, **exports}}, **errors(400, 401, 429, 503)}},
            },
            "/annotations/{annotation_id}": {
                "delete": {"summary": "Delete an annotation", "operationId": "deleteAnnotation",
                           "parameters": [{"name": "annotation_id", "in": "path", "required": True, "schema": whole}],
                           "responses": {"200": answer("Deleted", {"type": "object", "properties": {
                               "deleted": {"type": "integer"}, "status": {"type": "integer"}}}),
                               **errors(401, 404, 429, 503)}},
            },
            "/report": {
                "get": {"summary": "The dashboard of a range as one HTML file to keep, print or send",
                        "operationId": "report",
                        "description": "Self-contained: the figures, charts and screens' images inside, no network"
                                       " needed to open it; with b.* parameters, a comparison with side B too.",
                        "parameters": [p for p in filters if p["name"] in REPORT_PARAMETERS]
                        + [p for p in stats_params if p["name"] in ("data_key", "touches", "tz")]
                        + [{**p, "name": f"b.{p['name']}", "description": "Side B: " + p["description"]}
                           for p in filters if f"b.{p['name']}" in REPORT_PARAMETERS],
                        "responses": {"200": {"description": "The report, as a download", "content": {
                            "text/html": {"schema": {"type": "string"}}}}, **errors(400, 401, 429, 503)}},
            },
            "/screens": {
                "get": {"summary": "List the screens: those /stats has figures of, and those with an image",
                        "operationId": "listScreens", "parameters": [screen_key],
                        "responses": {"200": answer("The screens, each with its image's type, size and bytes (or"
                                                    " null)", {"type": "object", "properties": {
                            "screens": {"type": "array"}, "status": {"type": "integer"}}}),
                            **errors(400, 401, 429, 503)}},
            },
            "/screens/{screen}/touches": {
                "get": {"summary": "One screen's heatmap: its touch points in bins (bin=1: every point), for the"
                                   " selected sessions", "operationId": "screenTouches",
                        "parameters": [screen_name, *filters, *(p for p in stats_params
                                                                if p["name"] in ("data_key", "bin", "touches"))],
                        "responses": {"200": answer("The screen's bins, [x, y, touches], and its size from the"
                                                    " touches", {"type": "object", "properties": {
                            "screen": {"type": "string"}, "bin": {"type": "integer"}, "touches": {"type": "string"},
                            "width": {"type": "number"}, "height": {"type": "number"},
                            "points": {"type": "integer"}, "bins": {"type": "array"},
                            "status": {"type": "integer"}}}), **errors(400, 401, 429, 503)}},
            },
            "/screens/{screen}/image": {
                "put": {"summary": "Give a screen an image, which the heatmaps are drawn over",
                        "operationId": "putScreenImage", "parameters": [screen_name],
                        "description": f"A PNG, JPEG or WebP image, known by its bytes, up to {MAX_IMAGE_BYTES:,}"
                                       " bytes; it replaces the screen's image, if it had one.",
                        "requestBody": {"required": True, "content": {
                            media: {"schema": {"type": "string", "format": "binary"}}
                            for media in ("image/png", "image/jpeg", "image/webp", "application/octet-stream")}},
                        "responses": {"200": answer("Stored: the image's type, size and bytes", {
                            "type": "object", "properties": {"screen": {"type": "string"},
                                                             "image": {"type": "object"},
                                                             "status": {"type": "integer"}}}),
                            **errors(400, 401, 411, 413, 429, 503)}},
                "get": {"summary": "A screen's image, as it was given", "operationId": "getScreenImage",
                        "parameters": [screen_name], "responses": {"200": {"description": "The image", "content": {
                            media: {"schema": {"type": "string", "format": "binary"}}
                            for media in ("image/png", "image/jpeg", "image/webp")}},
                            **errors(400, 401, 404, 429, 503)}},
                "delete": {"summary": "Delete a screen's image", "operationId": "deleteScreenImage",
                           "parameters": [screen_name], "responses": {"200": answer("Deleted", {"type": "object", "properties": {
                               "deleted": {"type": "string"}, "status": {"type": "integer"}}}),
                               **errors(400, 401, 404, 429, 503)}},
            },
            "/consumers": {
                "get": {"summary": "List consumers", "operationId": "listConsumers",
                        "responses": {"200": answer("The consumers", {"type": "object", "properties": {
                            "consumers": {"type": "array"}, "status": {"type": "integer"}}}),
                            **errors(401, 429, 503)}},
            },
            "/status": {
                "get": {"summary": "Sizes, counts, open sessions, and each consumer's and kiosk's last sign of life",
                        "operationId": "status",
                        "responses": {"200": answer("The status", {"type": "object", "properties": {
                            "events": {"type": "integer"}, "sessions": {"type": "integer"},
                            "open_sessions": {"type": "integer"}, "consumers": {"type": "array"},
                            "read_only": {"type": ["string", "null"],
                                          "description": "why the database can only be read; null: writable"},
                            "devices": {"type": "array"}}}), **errors(401, 429, 503)}},
            },
            "/metrics": {
                "get": {"summary": "The status and this process's counters for Prometheus",
                        "operationId": "metrics",
                        "responses": {"200": answer("Prometheus text format", {"type": "string"},
                                                    "text/plain"), **errors(401, 429, 503)}},
            },
            "/health": {
                "get": {"summary": "Whether the service can write its database (no key needed)",
                        "operationId": "health", "security": [{}],
                        "responses": {"200": answer("Healthy", {"type": "object", "properties": {
                            "status": {"const": "ok"}, "version": {"type": "string"}}}), **errors(503)}},
            },
            "/openapi.json": {
                "get": {"summary": "This description", "operationId": "openapi", "security": [{}],
                        "responses": {"200": answer("OpenAPI 3.1", {"type": "object"})}},
            },
            "/": {
                "get": {"summary": "The API documentation (HTML)", "operationId": "documentation", "security": [{}],
                        "responses": {"200": answer("HTML", {"type": "string"}, "text/html")}},
            },
            "/dash": {
                "get": {"summary": "The dashboard (HTML; it asks for the key itself)", "operationId": "dashboard",
                        "security": [{}],
                        "responses": {"200": answer("HTML", {"type": "string"}, "text/html")}},
            },
            "/favicon.ico": {
                "get": {"summary": "No icon (answers 204 to spare the log)", "operationId": "favicon",
                        "security": [{}], "responses": {"204": answer("No content")}},
            },
        },
    }
    # Forms cannot say null: their schemas are the JSON ones without it.
    schemas = spec["components"]["schemas"]
    for name in ("SessionStart", "Event", "Stop", "Heartbeat", "NewAnnotation"):
        properties = {}
        for field_name, field_schema in schemas[name]["properties"].items():
            if "anyOf" in field_schema:
                field_schema = dict(field_schema, anyOf=[o for o in field_schema["anyOf"] if o != {"type": "null"}])
            properties[field_name] = field_schema
        properties.pop("beats", None)  # a list: JSON only
        schemas[name + "Form"] = dict(schemas[name], properties=properties)
    return spec


#: What a report takes: /stats' filters and parameters, and those of a side B.
REPORT_PARAMETERS = ("from", "to", "date", "consumer", "consumer_name", "site", "weekday", "hours", "data_key",
                     "touches", "tz", "b.from", "b.to", "b.consumer", "b.consumer_name", "b.site", "b.weekday",
                     "b.hours", "key")


def report_document(conn, params, settings_tz, tz_name=None):
    """The dashboard of a range as one self-contained HTML file: the answers
    its page asks for, computed now, and the screens' images, inside it (no
    network, no service needed: it opens from a disk or a mail), and a
    print stylesheet for A4. `params`: REPORT_PARAMETERS; with b.*, the
    comparison too. Returns (html, file name)."""
    refuse_unknown_parameters(params, REPORT_PARAMETERS)
    given = {name: value for name, value in params.items() if value not in (None, "") and name != "key"}
    side_b = {name: value for name, value in given.items() if name.startswith("b.")}
    asked = {name: value for name, value in given.items() if not name.startswith("b.")}
    asked.setdefault("data_key", DEFAULT_DATA_KEY)
    stats = stats_figures(conn, clean_stats_query(asked, settings_tz))
    answers = {("/consumers", ()): {"consumers": list_consumers(conn), "status": 200},
               ("/stats", tuple(sorted(asked.items()))): dict(stats, status=200)}
    with_paths = {**asked, "paths": "4", "holding": "1", "coverage": "1"}
    answers["/stats", tuple(sorted(with_paths.items()))] = dict(
        stats_figures(conn, clean_stats_query(with_paths, settings_tz)), status=200)
    screens = set(stats["heatmaps"]["screens"])
    if side_b:
        compared = {name: value for name, value in asked.items() if name in ("data_key", "touches", "tz")}
        compared.update({f"a.{name}": value for name, value in asked.items() if name in SIDE_FILTERS})
        compared.update(side_b)
        figures = compare_figures(conn, clean_compare_query(compared, settings_tz))
        answers["/compare", tuple(sorted(compared.items()))] = dict(figures, status=200)
        screens |= set(figures["b"]["heatmaps"]["screens"])
    images = {}
    for screen in screens:
        image = screen_image(conn, screen)
        if image:
            images[screen] = f"data:{image.type};base64," + base64.b64encode(image.data).decode("ascii")
    embedded = {"answers": {json.dumps([path, [list(pair) for pair in pairs]], separators=(",", ":"),
                                       ensure_ascii=False): answer for (path, pairs), answer in answers.items()},
                "images": images, "state": urlencode({**asked, **side_b}),
                "title": f"Report of {given.get('from', 'the start')} to {given.get('to', 'the end')}"
                         + (f" against {side_b.get('b.from', 'the start')} to {side_b.get('b.to', 'the end')}"
                            if side_b else "") + f", written {utc_now()[:16].replace('T', ' ')} UTC by Microticks"
                                                 f" {__version__}"}
    # Inside a script element, "<" as \u003c: no text of the data can end the element.
    text = json.dumps(embedded, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    html = fill(DASHBOARD_HTML, NONCE=secrets.token_urlsafe(16), EMBEDDED=text)
    return html, f"microticks-report-{given.get('from', 'start')}-{given.get('to', 'end')}.html"


def render_docs(spec, base):
    """The API documentation page (GET /), rendered from the OpenAPI
    description so that the two never disagree. Everything is escaped."""
    import html  # lazily: see the imports
    e = html.escape
    out = [fill(DOCS_HEAD, BASE=e(base), VERSION=e(__version__), COMMAND=e(operator_command()))]
    out.append('<h2 id="endpoints">Endpoints</h2>')
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            out.append(f'<section class="endpoint"><h3><span class="method">{e(method.upper())}</span> '
                       f'<code>{e(path)}</code> <small>{e(operation["summary"])}</small></h3>')
            if operation.get("description"):
                out.append(f"<p>{e(operation['description'])}</p>")
            if operation.get("parameters"):
                out.append("<table><tr><th>Parameter</th><th>Meaning</th></tr>")
                for parameter in operation["parameters"]:
                    out.append(f"<tr><td><code>{e(parameter['name'])}</code></td>"
                               f"<td>{e(parameter.get('description', ''))}</td></tr>")
                out.append("</table>")
            if operation.get("requestBody"):
                schema = next(iter(operation["requestBody"]["content"].values()))["schema"]
                out.append("<p>Body: the image's bytes (PNG, JPEG or WebP).</p>" if schema.get("format") == "binary"
                           else "<p>Body: a form (<code>application/x-www-form-urlencoded</code>) or JSON"
                                " (<code>application/json</code>, or <code>text/plain</code> from sendBeacon).</p>")
                for name in _schema_names(schema):
                    fields = spec["components"]["schemas"][name]
                    out.append(f"<table><tr><th>{e(name)} field</th><th>Required</th><th>Meaning</th></tr>")
                    for field_name, field_schema in fields["properties"].items():
                        meaning = field_schema.get("description") or field_schema.get("type", "")
                        if "$ref" in field_schema.get("items", {}):
                            meaning = "a list of " + field_schema["items"]["$ref"].rsplit("/", 1)[1]
                        out.append(f"<tr><td><code>{e(field_name)}</code></td>"
                                   f"<td>{'yes' if field_name in fields.get('required', ()) else ''}</td>"
                                   f"<td>{e(str(meaning))}</td></tr>")
                    out.append("</table>")
            out.append("<table><tr><th>Answer</th><th>When</th></tr>")
            for code, response in operation["responses"].items():
                out.append(f"<tr><td><code>{e(code)}</code></td><td>{e(response['description'])}</td></tr>")
            out.append("</table></section>")
    out.append("</main></body></html>")
    return "\n".join(out)


def _schema_names(schema):
    """The component names a request schema refers to."""
    refs = [schema] if "$ref" in schema else schema.get("oneOf", [])
    return [r["$ref"].rsplit("/", 1)[1] for r in refs if "$ref" in r]


DOCS_HEAD = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Microticks API</title>
<style>
  body { margin: 0; font: 15px/1.5 system-ui, sans-serif; color: #1f2937; background: #f8fafc; }
  main { max-width: 980px; margin: 0 auto; padding: 24px; }
  h1 { margin-bottom: 0; } h2 { margin-top: 36px; border-bottom: 1px solid #e5e7eb; padding-bottom: 4px; }
  h3 { font-size: 16px; } h3 small { color: #6b7280; font-weight: normal; }
  .method { display: inline-block; min-width: 48px; padding: 1px 6px; border-radius: 4px; background: #2563eb;
            color: #fff; font-size: 12px; text-align: center; }
  code { background: #eef2f7; padding: 1px 4px; border-radius: 3px; }
  pre { background: #0f172a; color: #e2e8f0; padding: 12px; border-radius: 8px; overflow-x: auto; }
  pre code { background: none; padding: 0; }
  table { border-collapse: collapse; width: 100%; margin: 8px 0; font-size: 14px; }
  th, td { text-align: left; vertical-align: top; padding: 4px 8px; border-bottom: 1px solid #e5e7eb; }
  .endpoint { background: #fff; border: 1px solid #e5e7eb; border-radius: 10px; padding: 4px 16px 12px; margin: 12px 0; }
  nav a { margin-right: 16px; }
</style></head><body><main>
<h1>Microticks API</h1>
<p>Version __VERSION__. Simple analytics for kiosk and touch-table apps: a frontend starts a session on the
first touch, posts events, and stops the session when nobody has touched the screen for a while.</p>
<nav><a href="dash">Dashboard</a><a href="openapi.json">OpenAPI description</a>
<a href="examples/">Tracker demo</a><a href="#endpoints">Endpoints</a></nav>

<h2>Quick start</h2>
<p>Register the frontend once on the server: <code>__COMMAND__ createconsumer lobby-table</code>
prints its consumer key. Then, from the kiosk:</p>
<pre><code>curl -d 'consumer_key=KEY&amp;ts=2017-08-25T17:09:19.438Z' __BASE__/sessions
# {"token": "TOKEN", "status": 200}
curl -d 'token=TOKEN&amp;action=click&amp;data={"target":"map"}&amp;ts=2017-08-25T17:09:21.000Z' __BASE__/events
# {"event_id": 1, "status": 200}
curl -H 'Content-Type: application/json'      -d '{"events": [{"token": "TOKEN", "action": "click", "data": {"subject": "main"}, "ts": "2017-08-25T17:09:22Z", "uuid": "e-1"}]}'      __BASE__/events
# {"results": [{"event_id": 2}], "status": 200}
curl -d 'token=TOKEN&amp;ts=2017-08-25T17:11:00.000Z' __BASE__/sessions/stop
curl '__BASE__/events?from=2017-08-25&amp;action=click&amp;limit=10'
curl -o week.csv '__BASE__/events?format=csv&amp;from=2017-08-21&amp;to=2017-08-27'</code></pre>
<p>From a page, with <code>fetch</code> (or use the tracker, <code>examples/microticks.js</code>, which queues,
batches and retries for you):</p>
<pre><code>const started = await fetch("__BASE__/sessions", {method: "POST",
  body: new URLSearchParams({consumer_key: KEY, ts: new Date().toISOString()})}).then((r) =&gt; r.json());
await fetch("__BASE__/events", {method: "POST", body: new URLSearchParams({
  token: started.token, action: "click", data: JSON.stringify({target: "map"}), ts: new Date().toISOString()})});</code></pre>

<h2>Keys</h2>
<p>When the server has <code>MICROTICKS_KEY</code> set, every request except <code>OPTIONS</code>,
<code>/health</code> and the pages (this one, <code>/dash</code>, <code>/openapi.json</code>, <code>/examples/</code>)
needs it: <code>?key=KEY</code>, <code>X-Microticks-Key: KEY</code> or <code>Authorization: Bearer KEY</code>.
The consumer key (<code>consumer_key</code>) is another thing: it tells which frontend a session belongs to.</p>

<h2>Answers and errors</h2>
<p>Every answer is JSON with CORS headers for any origin (configurable) and <code>Cache-Control: no-store</code>.
An error is <code>{"error": "what is wrong", "status": 400}</code>, with <code>"errors": {"field": ["..."]}</code>
when fields were wrong; a refused request changes nothing stored. 503 and 429 answers carry
<code>Retry-After</code>: retry them; other 4xx answers will not change on a retry.</p>
<p>Times are ISO 8601 with a zone, as <code>new Date().toISOString()</code> gives. The server keeps the
client's time as sent, its own receive time, and a UTC time corrected for the client's clock when the request
carried <code>sent_at</code>.</p>
"""


DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Microticks dashboard</title>
<style>
  :root { --ink: #1f2937; --muted: #6b7280; --line: #e5e7eb; --paper: #f8fafc; --card: #fff;
          --accent: #2563eb; --accent-soft: #dbeafe; --warm: #c2410c; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); background: var(--paper); }
  header { display: flex; flex-wrap: wrap; gap: 12px 24px; align-items: end; padding: 16px 24px;
           background: var(--card); border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2; }
  header h1 { font-size: 20px; margin: 0 12px 4px 0; }
  header h1 a { color: inherit; text-decoration: none; }
  label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); gap: 2px; }
  input, select, button { font: inherit; padding: 6px 8px; border: 1px solid #cbd5e1; border-radius: 6px; background: #fff; color: var(--ink); }
  button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
  button.quiet { background: #fff; color: var(--accent); }
  button:disabled { opacity: .5; cursor: default; }
  main { padding: 20px 24px 40px; max-width: 1800px; margin: 0 auto; }
  .cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; margin-bottom: 16px; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 16px; }
  .card .value { font-size: 28px; font-weight: 650; display: block; }
  .card .label { color: var(--muted); font-size: 13px; }
  .grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 460px), 1fr)); gap: 16px; }
  section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; min-width: 0; }
  section h2 { font-size: 15px; margin: 0 0 10px; }
  section h3 { font-size: 13px; margin: 8px 0 6px; color: var(--muted); }
  section.wide { grid-column: 1 / -1; }
  svg { width: 100%; height: auto; display: block; }
  svg .bar { fill: var(--accent); }
  svg .value { font-size: 11px; fill: var(--ink); text-anchor: middle; }
  svg .axis { font-size: 11px; fill: var(--muted); text-anchor: middle; }
  .bars { display: grid; grid-template-columns: minmax(80px, max-content) 1fr max-content; gap: 4px 10px; align-items: center; font-size: 13px; }
  .bars .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; max-width: 40vw; }
  .bars .track { background: var(--accent-soft); border-radius: 3px; height: 14px; }
  .bars .fill { background: var(--accent); border-radius: 3px; height: 14px; }
  table { border-collapse: collapse; width: 100%; font-size: 13px; }
  th, td { text-align: right; padding: 5px 6px; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th:first-child, td:first-child { text-align: left; white-space: normal; overflow-wrap: anywhere; min-width: 12em; }
  th { color: var(--muted); font-weight: 600; }
  th button.sort { background: none; border: 0; color: var(--accent); padding: 0; font: inherit; font-weight: 600; cursor: pointer; }
  th button.sort[aria-sort]::after { content: " ↓"; }
  tr.picked td { background: var(--accent-soft); }
  tbody tr[data-session] { cursor: pointer; }
  .scroll { overflow-x: auto; }
  .controls { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 10px; align-items: end; }
  .controls label, .controls select { max-width: 100%; }
  .picture { position: relative; max-width: 1100px; }
  canvas { width: 100%; height: auto; border-radius: 6px; display: block; background: #f1f5f9; }
  canvas.legend { height: 12px; border-radius: 3px; background: none; }
  .legend-row { display: grid; grid-template-columns: max-content minmax(120px, 320px) max-content; gap: 8px; align-items: center;
                font-size: 12px; color: var(--muted); margin-top: 6px; max-width: 100%; }
  .pair { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 420px), 1fr)); gap: 16px; }
  .note { color: var(--muted); font-size: 13px; }
  #journeys-wrap { display: grid; grid-template-columns: minmax(0, 3fr) minmax(min(100%, 280px), 1fr); gap: 16px; align-items: start; }
  #journeys-picture { overflow-x: auto; }
  #journeys svg { min-width: 720px; }
  #journeys .band { fill: none; stroke-opacity: .35; }
  #journeys .band.lit { stroke-opacity: .8; }
  #journeys .band.dim { stroke-opacity: .08; }
  #journeys .node { cursor: pointer; }
  #journeys text { font-size: 12px; fill: var(--ink); }
  #journeys text.count { fill: var(--muted); font-size: 11px; }
  #journeys text.step { font-size: 12px; fill: var(--muted); font-weight: 600; }
  #journeys-table-box { max-height: 460px; overflow: auto; }
  #journey-focus { min-height: 1.4em; }
  #explore-timeline svg { min-width: 560px; }
  #explore-timeline .visit { cursor: pointer; }
  #explore-timeline .visit.chosen { stroke: var(--ink); stroke-width: 2; }
  #explore-timeline text { font-size: 11px; fill: var(--ink); }
  #explore-timeline .tick { stroke: var(--line); }
  #explore-timeline .touch { stroke: var(--warm); stroke-width: 2; }
  #live ol { list-style: none; padding: 0; margin: 0; }
  #live li.session { border-bottom: 1px solid var(--line); padding: 8px 0; }
  #live .head { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 13px; }
  #live .badge { border-radius: 10px; padding: 0 8px; font-size: 12px; background: #dcfce7; color: #166534; }
  #live .badge.closed { background: #f1f5f9; color: var(--muted); }
  #live .events { margin: 4px 0 0; padding-left: 14px; font: 12px/1.4 ui-monospace, monospace; color: #334155;
                  max-height: 140px; overflow: auto; word-break: break-all; }
  #error { display: none; margin: 0 0 12px; padding: 10px 14px; border-radius: 8px; background: #fee2e2; color: #991b1b; }
  #report-note { display: none; }
  .stale { opacity: .35; }
  svg .marker { stroke: var(--warm); stroke-dasharray: 3 3; }
  svg .shade.off { fill: #64748b; }
  svg .shade.unknown { fill: #e2e8f0; }
  .swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -2px; margin: 0 2px 0 8px; }
  .swatch.off { background: #64748b; opacity: .45; }
  .swatch.unknown { background: #e2e8f0; }
  #holding-curve svg .band { fill: var(--accent-soft); }
  #holding-curve svg .curve { fill: none; stroke: var(--accent); stroke-width: 2; }
  #holding-curve svg .grid { stroke: var(--line); }
  #holding-curve svg .median { stroke: var(--warm); stroke-dasharray: 4 3; }
  #holding-curve svg text { font-size: 11px; fill: var(--muted); }
  #holding-curve svg text.median-label { fill: var(--warm); font-weight: 600; }
  svg .marker-label { font-size: 11px; fill: var(--warm); }
  #compare-controls { display: contents; }
  #compare-controls[hidden], label[hidden], [hidden] { display: none !important; }
  td.small-p { color: var(--warm); font-weight: 650; }
  #keyform { display: none; position: fixed; inset: 0; background: rgba(15,23,42,.55); z-index: 5; align-items: center; justify-content: center; }
  #keyform form { background: #fff; padding: 24px; border-radius: 12px; width: min(420px, 92vw); display: grid; gap: 12px; }
  @media (max-width: 600px) { header, main { padding-left: 12px; padding-right: 12px; } .card .value { font-size: 22px; }
                              header { position: static; } }  /* on a phone it would cover a third of the screen */
  /* A report written to a file: the figures of one range, no controls, and on paper, A4. */
  body.report header label, body.report header #apply, body.report header #report { display: none; }
  body.report #report-note { display: inline; }
  @media print {
    @page { size: A4; margin: 14mm; }
    body { background: #fff; font-size: 11pt; }
    header { position: static; border: 0; padding: 0 0 8px; }
    header label, header button, .controls, #live, #kiosks, #keyform, #explore-list-box, #explore-play-row { display: none !important; }
    #report-note { display: inline !important; }
    main { padding: 0; max-width: none; }
    .grid { display: block; }
    section, .card { break-inside: avoid; margin-bottom: 10px; border-color: #cbd5e1; }
    .cards { grid-template-columns: repeat(5, 1fr); }
    .scroll, #journeys-picture, #journeys-table-box { overflow: visible; max-height: none; }
    #journeys-wrap { display: block; }
  }
</style>
</head>
<body>
<header>
  <h1><a href="./">Microticks</a></h1>
  <span class="note" id="report-note"></span>
  <label>From <input type="date" id="from"></label>
  <label>To <input type="date" id="to"></label>
  <label>Consumer <select id="consumer"><option value="">All consumers</option></select></label>
  <label class="sites" hidden>Site <select id="site"><option value="">All sites</option></select></label>
  <label>Days <select id="weekday"><option value="">Every day</option><option value="mon,tue,wed,thu,fri">Weekdays</option><option value="sat,sun">Weekends</option><option value="mon">Mondays</option><option value="tue">Tuesdays</option><option value="wed">Wednesdays</option><option value="thu">Thursdays</option><option value="fri">Fridays</option><option value="sat">Saturdays</option><option value="sun">Sundays</option></select></label>
  <label>Hours <input id="hours" size="8" placeholder="10-12" title="Local hours, from-to, comma-separated: 10-12,14-16 (22-2 runs past midnight)"></label>
  <label>Screens are named by <input id="data_key" value="subject" size="10"></label>
  <label><span><input type="checkbox" id="compare"> Compare with</span></label>
  <span id="compare-controls" hidden>
    <label>B from <input type="date" id="from-b"></label>
    <label>B to <input type="date" id="to-b"></label>
    <label>B consumer <select id="consumer-b"><option value="">All consumers</option></select></label>
    <label class="sites" hidden>B site <select id="site-b"><option value="">All sites</option></select></label>
    <label>B days <select id="weekday-b"><option value="">Every day</option><option value="mon,tue,wed,thu,fri">Weekdays</option><option value="sat,sun">Weekends</option><option value="mon">Mondays</option><option value="tue">Tuesdays</option><option value="wed">Wednesdays</option><option value="thu">Thursdays</option><option value="fri">Fridays</option><option value="sat">Saturdays</option><option value="sun">Sundays</option></select></label>
    <label>B hours <input id="hours-b" size="8" placeholder="14-16"></label>
  </span>
  <button id="apply">Show</button>
  <button id="report" class="quiet" title="One HTML file of this page's figures: for a director, an archive, or print">Report</button>
  <span class="note" id="updated"></span>
</header>
<main>
  <div id="error" role="alert"></div>
  <div class="cards">
    <div class="card"><span class="value" data-figure="sessions">–</span><span class="label">sessions</span></div>
    <div class="card"><span class="value" data-figure="events">–</span><span class="label">events</span></div>
    <div class="card"><span class="value" data-figure="median-duration">–</span><span class="label">median session</span></div>
    <div class="card"><span class="value" data-figure="median-events">–</span><span class="label">median events per session</span></div>
    <div class="card"><span class="value" data-figure="busiest-day-sessions">–</span><span class="label">sessions on the busiest day, <span data-figure="busiest-day">–</span></span></div>
    <div class="card"><span class="value" data-figure="top-screen" style="font-size:18px;word-break:break-all">–</span><span class="label">most used screen</span></div>
    <div class="card"><span class="value" data-figure="meaningful-share">–</span><span class="label">meaningful sessions (<span data-figure="meaningful-touches">2</span>+ touches)</span></div>
    <div class="card"><span class="value" data-figure="bounce-share">–</span><span class="label">bounces: <span data-figure="bounces">–</span> of one touch or none</span></div>
    <div class="card"><span class="value" data-figure="median-touches">–</span><span class="label">median touches per session</span></div>
    <div class="card"><span class="value" data-figure="median-screens">–</span><span class="label">median screens per session</span></div>
  </div>
  <div class="grid">
    <section class="wide" id="empty-range" hidden><h2>No sessions in this range</h2>
      <p class="note" id="data-range"></p><button id="show-all" hidden>Show the range with data</button></section>
    <section class="wide" id="comparison" hidden><h2>Comparison: A (<span id="label-a"></span>) and B (<span id="label-b"></span>)</h2>
      <p class="note">Medians are compared by the Mann-Whitney U test, shares by the chi-square test (Fisher's exact test for small counts). A p value is the chance of a difference at least this large if A and B did not differ at all; under 0.05 is marked. <span id="compare-tests"></span></p>
      <div class="scroll"><table id="compare-table"><thead><tr><th>Figure</th><th>A</th><th>B</th><th>B − A</th><th>p</th><th>n (A / B)</th></tr></thead><tbody></tbody></table></div>
      <div class="pair"><div><h2>A: sessions per day</h2><div id="per-day-a"></div></div><div><h2>B: sessions per day</h2><div id="per-day-b"></div></div></div></section>
    <section class="wide"><h2>Sessions per day</h2><div id="per-day"></div><p class="note coverage-legend" hidden><span class="swatch off"></span> kiosks off (no heartbeats) <span class="swatch unknown"></span> not known (no kiosk sending heartbeats yet)</p><ul class="note" id="annotations"></ul></section>
    <section><h2>Sessions by hour of day (<span id="tz"></span>)</h2><div id="per-hour"></div><p class="note coverage-legend" hidden><span class="swatch off"></span> the darker, the longer the kiosks were off in that hour</p></section>
    <section><h2>Touches by hour of day (clicks and swipes)</h2><div id="touches-per-hour"></div></section>
    <section><h2>Sessions by weekday</h2><div id="per-weekday"></div></section>
    <section><h2>Session duration</h2><div id="durations"></div></section>
    <section><h2>Events per session</h2><div id="per-session"></div></section>
    <section><h2>Top actions</h2><div id="actions" class="bars"></div></section>
    <section><h2>Screen types</h2><div id="screen-types" class="bars"></div></section>
    <section class="wide"><h2>Screens</h2><p class="note">Visits count repeated touches on the same screen once; 1st, 2nd and 3rd: how often people picked it first, second, third in a session; time: seconds from arriving on it to the next screen change (a session's last screen is not measured: only idle time came after it).</p>
      <div class="scroll"><table id="screens"><thead><tr><th>Screen</th><th>Events</th><th>Visits</th><th>Sessions</th><th>1st</th><th>2nd</th><th>3rd</th><th>Measured</th><th>Min (s)</th><th>Mean (s)</th><th>Max (s)</th><th>Page turns</th></tr></thead><tbody></tbody></table></div></section>
    <section class="wide" id="holding"><h2>Holding power: how long people stay</h2>
      <div class="controls"><label>Curve of <select id="holding-of"></select></label></div>
      <div id="holding-curve"></div>
      <p class="note" id="holding-note"></p>
      <div class="scroll"><table id="holding-table"><thead><tr><th>Of</th><th>n</th><th>Censored</th><th>Median (95% CI)</th><th>10 s</th><th>30 s</th><th>1 min</th><th>2 min</th><th>5 min</th></tr></thead><tbody></tbody></table></div>
      <p class="note">Kaplan-Meier: the share of sessions (or of visits to a screen) still going after a time, with its 95% band. A session still open, and a session's last screen, count as lasting at least until last seen (censored), instead of being dropped or ended early: otherwise those who stayed longest would look as if they left first. A dash: nobody was followed that long.</p></section>
    <section class="wide" id="coverage"><h2>Kiosks: on, and in use</h2>
      <p class="note" id="coverage-note"></p>
      <div class="scroll"><table id="coverage-table"><thead><tr><th>Kiosk</th><th>On</th><th>Uptime</th><th>In use</th><th>Utilisation</th><th>Sessions</th><th>Per hour on</th><th>Most at once</th><th>Gaps</th><th>Latest gap</th></tr></thead><tbody></tbody></table></div></section>
    <section class="wide" id="heat"><h2>Touches on a screen</h2>
      <div class="controls">
        <label>Screen <select id="heat-screen"></select></label>
        <label>Touches <select id="heat-touches"><option value="all">every touch</option><option value="navigating">navigating touches only</option></select></label>
        <label>Smoothing radius <input type="range" id="heat-radius" min="10" max="200" step="5" value="60"></label>
        <label>Image <input type="range" id="heat-opacity" min="0" max="1" step="0.05" value="1"></label>
        <label id="heat-size-w">Width (px) <input type="number" id="heat-width" min="1" style="width:90px"></label>
        <label id="heat-size-h">Height (px) <input type="number" id="heat-height" min="1" style="width:90px"></label>
        <label>Screen image <input type="file" id="heat-upload" accept="image/png,image/jpeg,image/webp"></label>
        <button id="heat-download" class="quiet">Download PNG</button>
      </div>
      <p class="note"><span data-figure="heatmap-points">0</span> <span id="heat-what">touch points</span>; <span id="heat-image-note"></span></p>
      <div id="heat-single" class="picture"><canvas id="heatmap" width="960" height="540"></canvas>
        <div class="legend-row"><span>0</span><canvas class="legend" id="heat-legend" width="256" height="12"></canvas><span id="heat-legend-max"></span></div></div>
      <div id="heat-compare" hidden>
        <div class="pair"><div class="picture"><h3>A (<span id="heat-sessions-a"></span>)</h3><canvas id="heatmap-a" width="960" height="540"></canvas></div>
          <div class="picture"><h3>B (<span id="heat-sessions-b"></span>)</h3><canvas id="heatmap-b" width="960" height="540"></canvas></div></div>
        <div class="legend-row"><span>0</span><canvas class="legend" id="heat-legend-ab" width="256" height="12"></canvas><span id="heat-legend-ab-max"></span></div>
        <div class="picture"><h3>B − A: where touches rose (red) and fell (blue), per session</h3><canvas id="heatmap-diff" width="960" height="540"></canvas>
          <div class="legend-row"><span id="heat-legend-diff-min"></span><canvas class="legend" id="heat-legend-diff" width="256" height="12"></canvas><span id="heat-legend-diff-max"></span></div></div>
      </div></section>
    <section class="wide" id="journeys-section"><h2>Journeys: the first screens of a session, step by step</h2>
      <p class="note">Each column is a step: the screen people were on at their first, second, third and fourth screen change, or (exit) where their session ended. Bands are as wide as their sessions; touch or hover over a screen to follow the paths through it.</p>
      <div id="journeys-wrap"><div id="journeys-picture"><div id="journeys"></div><p class="note" id="journey-focus"></p></div>
        <div id="journeys-table-box"><table id="journeys-table"><thead><tr><th>Step: from → to</th><th>Sessions</th></tr></thead><tbody></tbody></table></div></div></section>
    <section class="wide"><h2>Most common paths (first four screens)</h2><div id="common-paths" class="bars"></div></section>
    <section class="wide" id="explorer"><h2>Session explorer</h2>
      <div class="controls"><label>Open a session by its id <input id="explore-id" inputmode="numeric" size="8"></label><button id="explore-open" class="quiet">Open</button>
        <span class="note" id="explore-count"></span></div>
      <div id="explore-list-box" class="scroll"><table id="explore-list"><thead><tr>
        <th><button class="sort" data-sort="id">Session</button></th><th><button class="sort" data-sort="started_at">Start</button></th>
        <th><button class="sort" data-sort="duration">Duration</button></th><th><button class="sort" data-sort="touches">Touches</button></th>
        <th><button class="sort" data-sort="screens">Screens</button></th></tr></thead><tbody></tbody></table></div>
      <div class="controls"><button id="explore-prev" class="quiet">← Newer</button><button id="explore-next" class="quiet">Older →</button></div>
      <p class="note" id="explore-hint">Pick a session in the list, or open one by its id, to see its path on a time line and replay it.</p>
      <p id="explore-summary"></p>
      <div id="explore-timeline" class="scroll"></div>
      <div class="controls" id="explore-play-row" hidden><button id="explore-play">▶ Replay</button>
        <label>Speed <select id="explore-speed"><option value="1">real time</option><option value="5">5 ×</option><option value="10" selected>10 ×</option><option value="30">30 ×</option></select></label>
        <span class="note" id="explore-now"></span></div>
      <div class="picture"><canvas id="explore-canvas" width="960" height="540" hidden></canvas></div></section>
    <section class="wide" id="kiosks"><h2>Kiosks</h2>
      <div class="scroll"><table><thead><tr><th>Kiosk</th><th>Consumer</th><th>App version</th><th>Last seen</th><th>Queue</th><th>State</th></tr></thead><tbody></tbody></table></div>
      <p class="note" id="kiosks-note"></p></section>
    <section class="wide" id="live"><h2>Latest sessions (live)</h2><ol></ol></section>
  </div>
</main>
<div id="keyform"><form>
  <strong>This Microticks needs its API key</strong>
  <span class="note" id="keynote">It is kept for this browser tab only.</span>
  <input type="text" autocomplete="username" value="microticks" hidden aria-hidden="true">
  <input type="password" id="key" autocomplete="current-password" placeholder="API key" required>
  <button type="submit">Open the dashboard</button>
</form></div>
<script type="application/json" id="embedded">__EMBEDDED__</script>
<script nonce="__NONCE__">
"use strict";
// Everything from the server is put on the page with textContent or as SVG
// text: data a kiosk sent can never become markup.
const BASE = location.pathname.replace(/\/dash\/?$/, "");
const NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
// A report written to a file carries its answers (and images) here; the live page asks the service.
const EMBEDDED = JSON.parse(document.getElementById("embedded").textContent);
let key = sessionStorage.getItem("microticks-key") || "";
let stats = null, paths = null, comparison = null;
let statsAsked = 0;  // the latest loadStats: an older one's late answers are dropped (back, back, back)

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function figure(name, value) {
  for (const node of document.querySelectorAll(`[data-figure="${name}"]`)) node.textContent = value;
}

// One way to show numbers: thousands separated, shares as percentages, words in the plural they need.
const NUMBER = new Intl.NumberFormat("en");
function count(value) { return value === null || value === undefined ? "–" : NUMBER.format(value); }
function percent(share) { return share === null || share === undefined ? "–" : `${NUMBER.format(Math.round(share * 1000) / 10)}%`; }
function plural(n, one, many) { return `${count(n)} ${n === 1 ? one : many}`; }
function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 90) return `${NUMBER.format(Math.round(value))} s`;
  return `${NUMBER.format(Math.round(value / 6) / 10)} min`;
}
function clock(ms) {  // mm:ss from a session's start
  const s = Math.max(0, Math.round(ms / 1000));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}
// A long name shortened in the middle, where screen names differ least.
function shorten(name, most) {
  name = String(name);
  if (name.length <= most) return name;
  const head = Math.ceil((most - 1) * 0.6);
  return name.slice(0, head) + "…" + name.slice(name.length - (most - 1 - head));
}

// How a report finds an answer: the path and the parameters given, sorted (report_answers writes the same).
function answerKey(path, params) {
  return JSON.stringify([path, Object.entries(params || {}).filter(([, v]) => v !== "" && v !== undefined && v !== null)
    .map(([k, v]) => [k, String(v)]).sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))]);
}

function query(params) {
  return new URLSearchParams(Object.entries(params || {}).filter(([, v]) => v !== "" && v !== undefined && v !== null));
}

async function api(path, params, attempt = 0) {
  if (EMBEDDED) {
    const answer = EMBEDDED.answers[answerKey(path, params)];
    if (answer === undefined) throw new Error(`This report holds no answer for ${path}`);
    return answer;
  }
  const response = await fetch(`${BASE}${path}?${query(params)}`, {headers: key ? {"X-Microticks-Key": key} : {}, cache: "no-store"});
  if (response.status === 401) { askForKey(Boolean(key)); throw new Error("The API key is needed"); }
  if (response.status === 503 && attempt < 6) {  // busy with other statistics: as the server says, a little later
    const wait = Math.min(10, Number(response.headers.get("Retry-After")) || 2);
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    return api(path, params, attempt + 1);
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function askForKey(wrong) {
  $("keynote").textContent = wrong ? "That key was not accepted; try again." : "It is kept for this browser tab only.";
  $("keyform").style.display = "flex";
  $("key").focus();
}

$("keyform").querySelector("form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem("microticks-key", key);
  $("keyform").style.display = "none";
  start();
});

function showError(error) {
  $("error").textContent = error ? String(error.message || error) : "";
  $("error").style.display = error ? "block" : "none";
}

function filters() {
  return {from: $("from").value, to: $("to").value, consumer: $("consumer").value, site: $("site").value,
          weekday: $("weekday").value, hours: $("hours").value.trim()};
}

function sideB() {
  return {from: $("from-b").value, to: $("to-b").value, consumer: $("consumer-b").value, site: $("site-b").value,
          weekday: $("weekday-b").value, hours: $("hours-b").value.trim()};
}

// ---- The address bar follows the page: a reload, a bookmark or a link shows the same.
const STATE_KEYS = ["from", "to", "consumer", "site", "weekday", "hours", "data_key", "b.from", "b.to", "b.consumer",
                    "b.site", "b.weekday", "b.hours", "screen", "touches", "session"];

function pageState() {
  const state = Object.assign(filters(), {data_key: $("data_key").value.trim() === "subject" ? "" : $("data_key").value.trim(),
                                           screen: $("heat-screen").value, session: explorer.session || "",
                                           touches: $("heat-touches").value === "all" ? "" : $("heat-touches").value});
  if ($("compare").checked) for (const [name, value] of Object.entries(sideB())) state[`b.${name}`] = value;
  return state;
}

function remember(replace) {
  if (EMBEDDED) return;
  const url = `${location.pathname}?${query(pageState())}`;
  if (url === `${location.pathname}${location.search}`) return;
  if (replace) history.replaceState(null, "", url); else history.pushState(null, "", url);
}

function isoDay(date) { return new Date(date.getTime() - date.getTimezoneOffset() * 60000).toISOString().slice(0, 10); }

function restore(params) {
  const today = new Date();
  $("to").value = params.get("to") ?? isoDay(today);
  $("from").value = params.get("from") ?? isoDay(new Date(today.getTime() - 6 * 86400000));
  $("data_key").value = params.get("data_key") || "subject";
  $("consumer").value = params.get("consumer") || "";
  $("site").value = params.get("site") || "";
  $("weekday").value = params.get("weekday") || "";
  $("hours").value = params.get("hours") || "";
  $("heat-touches").value = params.get("touches") === "navigating" ? "navigating" : "all";
  wantedScreen = params.get("screen") || "";
  const compared = ["b.from", "b.to", "b.consumer", "b.site", "b.weekday", "b.hours"].some((name) => params.get(name));
  $("compare").checked = compared;
  $("compare-controls").hidden = !compared;
  $("from-b").value = params.get("b.from") || "";
  $("to-b").value = params.get("b.to") || "";
  $("consumer-b").value = params.get("b.consumer") || "";
  $("site-b").value = params.get("b.site") || "";
  $("weekday-b").value = params.get("b.weekday") || "";
  $("hours-b").value = params.get("b.hours") || "";
  explorer.session = params.get("session") || "";
}

window.addEventListener("popstate", () => {
  restore(new URLSearchParams(location.search));
  loadStats(false);
  loadLive();
});

// ---- Charts

function columnChart(target, items, options) {
  options = Object.assign({height: 190}, options);
  // Drawn at the size it is shown, so that its text reads like the page's.
  const width = Math.max(280, target.clientWidth || 480), top = 18, bottom = 34, height = options.height;
  const longest = Math.max(1, ...items.map((i) => Math.max(String(i.label).length, String(i.sub || "").length)));
  options.labelEvery = Math.max(1, Math.ceil((longest * 6.5 + 6) * items.length / width));
  const max = Math.max(1, ...items.map((i) => i.value));
  const slot = width / Math.max(1, items.length), bar = Math.max(4, slot * 0.7);
  const chart = el("svg:svg", {viewBox: `0 0 ${width} ${height}`, role: "img"});
  items.forEach((item, n) => {
    if (item.shade) {  // the kiosks off (or not known) in that slot: behind the bar
      const shade = el("svg:rect", {class: `shade ${item.shade.kind}`, x: n * slot, y: 2, width: slot, height: height - bottom - 2,
                                    "fill-opacity": item.shade.amount});
      shade.appendChild(el("svg:title", {}, item.shade.title));
      chart.appendChild(shade);
    }
    const h = (height - top - bottom) * item.value / max, x = n * slot + (slot - bar) / 2;
    const rect = el("svg:rect", {class: "bar", x, y: height - bottom - h, width: bar, height: Math.max(h, item.value ? 1 : 0), rx: 2});
    rect.appendChild(el("svg:title", {}, `${item.label}: ${item.value}`));
    chart.appendChild(rect);
    // A bar's value above it where there is room for the text (its title says it always).
    if (item.value && count(item.value).length * 6.5 + 2 <= slot) {
      chart.appendChild(el("svg:text", {class: "value", x: x + bar / 2, y: height - bottom - h - 4}, count(item.value)));
    }
    if (n % options.labelEvery === 0) chart.appendChild(el("svg:text", {class: "axis", x: x + bar / 2, y: height - bottom + 14}, item.label));
    if (item.sub && n % options.labelEvery === 0) chart.appendChild(el("svg:text", {class: "axis", x: x + bar / 2, y: height - bottom + 27}, item.sub));
    // Annotations: a dashed line at their slot, the first one's text beside it.
    const notes = (options.markers || []).filter((marker) => marker.key === item.key);
    if (notes.length) {
      const line = el("svg:line", {class: "marker", x1: n * slot + 1, x2: n * slot + 1, y1: 2, y2: height - bottom});
      line.appendChild(el("svg:title", {}, notes.map((marker) => marker.text).join("\n")));
      chart.appendChild(line);
      chart.appendChild(el("svg:text", {class: "marker-label", x: n * slot + 4, y: 11}, shorten(notes[0].text, 24)));
    }
  });
  target.replaceChildren(chart);
}

// The day of an annotation in the zone the figures are in.
function localDay(utc, zone) {
  try { return new Intl.DateTimeFormat("en-CA", {timeZone: zone, year: "numeric", month: "2-digit", day: "2-digit"}).format(new Date(utc)); }
  catch (error) { return utc.slice(0, 10); }
}

// Whether any kiosk sent heartbeats in the range: else "on" or "off" is not known, and nothing is shaded.
function coverageKnown(coverage) {
  return Boolean(coverage && coverage.per_day.some((d) => d.known_minutes > 0));
}

function dayChart(target, data, coverage) {
  const sessions = new Map(data.sessions_per_day.map((d) => [d.day, d.sessions]));
  const states = new Map(coverageKnown(coverage) ? coverage.per_day.map((d) => [d.day, d]) : []);
  // With coverage, the days the kiosks were on without a visitor show too (an empty slot), and the off ones shaded.
  const keys = [...new Set([...sessions.keys(), ...states.keys()])].sort();
  const days = keys.map((day) => {
    const state = states.get(day);
    const shade = !state || state.state === "on" ? null : state.state === "off"
      ? {kind: "off", amount: 0.45, title: `${day}: no kiosk was on (no heartbeats)`}
      : {kind: "unknown", amount: 1, title: `${day}: not known whether the kiosks were on (none sent heartbeats yet)`};
    return {key: day, label: day.slice(5), sub: new Date(day + "T12:00:00Z").toLocaleDateString("en", {weekday: "short", timeZone: "UTC"}),
            value: sessions.get(day) || 0, shade};
  });
  const markers = (data.annotations || []).map((a) => ({key: localDay(a.time_utc, data.timezone), text: a.text}));
  columnChart(target, days, {markers});
}

function hourChart(data, coverage) {
  const known = coverageKnown(coverage);
  columnChart($("per-hour"), data.sessions_per_hour.map((h) => {
    const hour = known ? coverage.per_hour[h.hour] : null;
    const off = hour && hour.known_minutes ? 1 - hour.minutes_on / hour.known_minutes : 0;
    return {label: String(h.hour).padStart(2, "0"), value: h.sessions,
            shade: off > 0.005 ? {kind: "off", amount: 0.6 * off, title: `${String(h.hour).padStart(2, "0")}:00: kiosks off ${percent(off)} of the time`} : null};
  }));
  for (const note of document.querySelectorAll(".coverage-legend")) note.hidden = !known;
}

function barList(target, items) {
  const max = Math.max(1, ...items.map((i) => i.value));
  target.replaceChildren();
  for (const item of items) {
    const fill = el("div", {class: "fill", style: `width:${(100 * item.value / max).toFixed(1)}%`});
    const track = el("div", {class: "track"});
    track.appendChild(fill);
    target.append(el("span", {class: "name", title: item.label}, item.label), track, el("span", {}, count(item.value)));
  }
}

function render(data) {
  stats = data;
  figure("sessions", count(data.sessions));
  figure("events", count(data.events));
  figure("median-duration", seconds(data.duration.median));
  figure("median-events", count(data.events_per_session.median));
  const busiest = data.sessions_per_day.reduce((best, d) => (!best || d.sessions > best.sessions ? d : best), null);
  figure("busiest-day", busiest ? busiest.day : "–");
  figure("busiest-day-sessions", busiest ? count(busiest.sessions) : "–");
  figure("top-screen", data.values.length ? data.values[0].value : "–");
  figure("meaningful-share", percent(data.meaningful_share));
  figure("meaningful-touches", data.meaningful_touches);
  figure("bounce-share", percent(data.bounce_share));
  figure("bounces", plural(data.bounces, "session", "sessions"));
  figure("median-touches", count(data.touches_per_session.median));
  figure("median-screens", count(data.screens_per_session.median));
  $("tz").textContent = data.timezone;
  dayChart($("per-day"), data);  // renderPaths shades it with the coverage
  $("annotations").replaceChildren(...data.annotations.map((a) => el("li", {"data-annotation": a.id},
    `${localDay(a.time_utc, data.timezone)}: ${a.text}` + (a.consumer ? ` (${a.consumer})` : ""))));
  hourChart(data, null);
  columnChart($("per-weekday"), data.sessions_per_weekday.map((d) => ({label: d.weekday.slice(0, 3), value: d.sessions})));
  columnChart($("durations"), data.duration.distribution.map((b) => ({label: b.bucket, value: b.sessions})));
  columnChart($("per-session"), data.events_per_session.distribution.map((b) => ({label: b.bucket, value: b.sessions})));
  barList($("actions"), data.actions.slice(0, 12).map((a) => ({label: a.action, value: a.events})));
  barList($("screen-types"), data.screen_types.map((t) => ({label: t.type, value: t.visits})));
  const body = $("screens").querySelector("tbody");
  body.replaceChildren();
  const time = (value) => (value === null ? "–" : NUMBER.format(Math.round(value * 10) / 10));
  for (const v of data.values) {
    const row = el("tr");
    for (const cell of [v.value, count(v.events), count(v.visits), count(v.sessions), count(v.first), count(v.second),
                        count(v.third), count(v.time_spent.measured), time(v.time_spent.min), time(v.time_spent.mean),
                        time(v.time_spent.max), count(v.page_turns)]) {
      row.appendChild(el("td", {}, cell));
    }
    body.appendChild(row);
  }
  $("empty-range").hidden = data.sessions > 0;
  if (!data.sessions) showDataRange();
  const screens = Object.entries(data.heatmaps.screens).sort((a, b) => b[1].points - a[1].points);
  const select = $("heat-screen"), previous = wantedScreen || select.value;
  select.replaceChildren();
  for (const [name, heat] of screens) select.appendChild(el("option", {value: name}, `${shorten(name || "(no screen)", 48)} (${count(heat.points)})`));
  if (screens.some(([name]) => name === previous)) select.value = previous;
  wantedScreen = "";
  drawHeatmaps();
  $("updated").textContent = EMBEDDED ? "" : `Updated ${new Date().toLocaleTimeString()}`;
}

// The path figures come in a second answer: over a big range they take a
// second the rest need not wait for.
function renderPaths(data) {
  paths = data;
  columnChart($("touches-per-hour"), data.touches_per_hour.map((h) => ({label: String(h.hour).padStart(2, "0"), value: h.touches})));
  drawJourneys(data.journeys || []);
  barList($("common-paths"), data.common_paths.map((p) => ({label: p.path.join(" → "), value: p.sessions})));
  if (data.coverage) {
    dayChart($("per-day"), stats, data.coverage);
    hourChart(stats, data.coverage);
    renderCoverage(data.coverage);
  }
  if (data.holding) renderHolding(data.holding);
}

// ---- Coverage: were the kiosks on, and how much were they used?

function renderCoverage(coverage) {
  const hours = (minutes) => (minutes === null ? "unknown" : minutes < 60 ? `${NUMBER.format(Math.round(minutes))} min`
                              : `${NUMBER.format(Math.round(minutes / 6) / 10)} h`);
  const body = $("coverage-table").querySelector("tbody");
  body.replaceChildren(...coverage.devices.map((d) => {
    const row = el("tr", {"data-device": d.device || ""});
    const latest = d.recent_gaps[0];
    const gap = latest ? `${new Date(latest.from).toLocaleString()}, ${hours(latest.minutes)}${latest.ongoing ? " (still)" : ""}` : "–";
    for (const cell of [`${d.device || "(no device)"} · ${d.consumer}`, hours(d.minutes_on),
                        percent(d.heartbeats && d.known_minutes ? d.minutes_on / d.known_minutes : null),
                        hours(d.minutes_in_use), percent(d.utilisation), count(d.sessions), count(d.sessions_per_hour_on),
                        count(d.most_at_once), d.gaps === null ? "–" : count(d.gaps), gap]) row.appendChild(el("td", {}, cell));
    return row;
  }));
  const beating = coverage.devices.filter((d) => d.heartbeats).length;
  $("coverage-note").textContent = (beating
    ? `${plural(beating, "kiosk sends", "kiosks send")} heartbeats: uptime is the share of the time since its first one that it was on; in use, its sessions' time; a gap, over ${coverage.gap_intervals} heartbeat intervals without one in the hours it is usually on.`
    : "No kiosk sent heartbeats in this range (the tracker sends them when it has a device name): whether the kiosks were on is not known.")
    + ` From ${new Date(coverage.from).toLocaleString()} to ${new Date(coverage.to).toLocaleString()}.`;
}

// ---- Holding power: Kaplan-Meier curves, sessions' or a screen's.

function renderHolding(holding) {
  const select = $("holding-of"), previous = select.value;
  const curves = [["", "Sessions", holding.sessions],
                  ...holding.screens.filter((s) => s.curve).map((s) => [s.screen, `Time on ${shorten(s.screen, 40)}`, s])];
  select.replaceChildren(...curves.map(([value, label]) => el("option", {value}, label)));
  if (curves.some(([value]) => value === previous)) select.value = previous;
  select.onchange = () => drawHoldingCurve(curves.find(([value]) => value === select.value));
  drawHoldingCurve(curves.find(([value]) => value === select.value));
  const median = (f) => f.median === null ? "–" : `${seconds(f.median)} (${f.median_ci[0] === null ? "–" : seconds(f.median_ci[0])} to ${f.median_ci[1] === null ? "–" : seconds(f.median_ci[1])})`;
  const rows = [["Sessions", holding.sessions], ...holding.screens.slice(0, 15).map((s) => [s.screen, s])];
  $("holding-table").querySelector("tbody").replaceChildren(...rows.map(([label, f]) => {
    const row = el("tr");
    row.append(el("td", {}, label), el("td", {}, count(f.n)), el("td", {}, count(f.censored)), el("td", {}, median(f)),
               ...f.still_engaged.map((point) => el("td", {title: point.lower === null ? "" : `95%: ${percent(point.lower)} to ${percent(point.upper)}`}, percent(point.share))));
    return row;
  }));
}

function drawHoldingCurve(choice) {
  const [, label, figures] = choice, curve = figures.curve || [];
  const target = $("holding-curve"), width = Math.max(320, target.clientWidth || 640), height = 240;
  const left = 44, right = 26, top = 12, bottom = 30;
  // Up to the first round time by which nearly everyone has left (or the last one seen).
  const gone = curve.find((point) => point[1] <= 0.05), last = curve.length ? curve[curve.length - 1][0] : 60;
  const span = [30, 60, 120, 300, 600, 1200, 1800, 3600, 7200].find((t) => t >= (gone ? gone[0] : last)) || Math.ceil(last);
  const x = (t) => left + (width - left - right) * Math.min(t, span) / span, y = (share) => top + (height - top - bottom) * (1 - share);
  const chart = el("svg:svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${label}: share still engaged over time`});
  for (const share of [0, 0.25, 0.5, 0.75, 1]) {
    chart.append(el("svg:line", {class: "grid", x1: left, x2: width - right, y1: y(share), y2: y(share)}),
                 el("svg:text", {x: left - 6, y: y(share) + 4, "text-anchor": "end"}, `${share * 100}%`));
  }
  const ticks = [];  // at least 48 pixels apart
  for (const t of [0, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200]) {
    if (t <= span && (!ticks.length || x(t) - x(ticks[ticks.length - 1]) >= 48)) ticks.push(t);
  }
  for (const t of ticks) {
    chart.append(el("svg:line", {class: "grid", x1: x(t), x2: x(t), y1: top, y2: height - bottom}),
                 el("svg:text", {x: x(t), y: height - bottom + 16, "text-anchor": "middle"}, t < 60 ? `${t} s` : `${t / 60} min`));
  }
  // The 95% band and the curve, as steps: the share holds until the next time someone leaves.
  const steps = curve.filter((point) => point[0] <= span);
  const upper = [], lower = [], line = [];
  steps.forEach(([t, share, low, high], n) => {
    const next = n + 1 < steps.length ? steps[n + 1][0] : span;
    line.push(`${x(t)},${y(share)}`, `${x(next)},${y(share)}`);
    if (low !== null) { upper.push(`${x(t)},${y(high)}`, `${x(next)},${y(high)}`); lower.unshift(`${x(next)},${y(low)}`, `${x(t)},${y(low)}`); }
  });
  if (upper.length) chart.appendChild(el("svg:polygon", {class: "band", points: [...upper, ...lower].join(" ")}));
  chart.appendChild(el("svg:polyline", {class: "curve", points: line.join(" ")}));
  if (figures.median !== null && figures.median <= span) {
    chart.append(el("svg:line", {class: "median", x1: left, x2: x(figures.median), y1: y(0.5), y2: y(0.5)}),
                 el("svg:line", {class: "median", x1: x(figures.median), x2: x(figures.median), y1: y(0.5), y2: height - bottom}),
                 el("svg:text", {class: "median-label", x: x(figures.median) + 6, y: y(0.5) - 6}, `half gone after ${seconds(figures.median)}`));
  }
  target.replaceChildren(chart);
  $("holding-note").textContent = `${label}: ${choice[0] === "" ? plural(figures.n, "session", "sessions") : plural(figures.n, "visit", "visits")}, ${count(figures.censored)} censored (still going when last seen).`
    + (figures.median === null ? " More than half were still going at the end." : "");
}

// ---- Heatmaps: a smooth density of the touches over the screen's own image.

let wantedScreen = "";
const images = new Map();  // screen -> Promise of {image, width, height} or null

let withImages = null;  // Promise of the set of screens that have an image (GET /screens)
function screensWithImages(again) {
  if (EMBEDDED) return Promise.resolve(new Set(Object.keys(EMBEDDED.images || {})));
  if (!withImages || again) {
    withImages = api("/screens").then((answer) => new Set(answer.screens.filter((s) => s.image).map((s) => s.screen)))
      .catch(() => new Set());
  }
  return withImages;
}

function screenImage(screen) {
  if (!images.has(screen)) {
    images.set(screen, (async () => {
      let url = null;
      if (!(await screensWithImages()).has(screen)) return null;  // asked for, it would be a 404 in the console
      if (EMBEDDED) url = (EMBEDDED.images || {})[screen] || null;
      else {
        const response = await fetch(`${BASE}/screens/${encodeURIComponent(screen)}/image`,
                                     {headers: key ? {"X-Microticks-Key": key} : {}, cache: "no-store"});
        if (response.ok) url = URL.createObjectURL(await response.blob());
      }
      if (!url) return null;
      const image = new Image();
      image.src = url;
      await image.decode();
      return {image, width: image.naturalWidth, height: image.naturalHeight};
    })().catch(() => null));
  }
  return images.get(screen);
}

// Touches per grid cell, smoothed by a Gaussian of the chosen radius: the
// value near a point is about how many touches fell within the radius.
function density(bins, bin, width, height, radius, weight) {
  const cell = Math.max(2, Math.ceil(Math.max(width, height) / 480));
  const cols = Math.ceil(width / cell), rows = Math.ceil(height / cell);
  let grid = new Float32Array(cols * rows);
  for (const [x, y, n] of bins) {
    const cx = Math.min(cols - 1, Math.max(0, Math.floor((x + bin / 2) / cell)));
    const cy = Math.min(rows - 1, Math.max(0, Math.floor((y + bin / 2) / cell)));
    grid[cy * cols + cx] += n * weight;
  }
  const sigma = Math.max(0.5, radius / 2 / cell), reach = Math.ceil(3 * sigma);
  const kernel = Array.from({length: 2 * reach + 1}, (_, i) => Math.exp(-((i - reach) ** 2) / (2 * sigma * sigma)));
  for (const [across, along, step, lineStep] of [[cols, rows, 1, cols], [rows, cols, cols, 1]]) {
    const out = new Float32Array(cols * rows);
    for (let line = 0; line < along; line++) {
      for (let i = 0; i < across; i++) {
        const value = grid[line * lineStep + i * step];
        if (!value) continue;
        for (let k = Math.max(0, i - reach); k <= Math.min(across - 1, i + reach); k++) {
          out[line * lineStep + k * step] += value * kernel[k - i + reach];
        }
      }
    }
    grid = out;
  }
  return {grid, cols, rows};
}

// The colour scale: nothing where there are no touches (the image shows
// through), then blue, green, yellow, to the hot end at the most touches.
const RAMP = [[0, 0, 90, 255, 0], [0.12, 0, 110, 255, 0.45], [0.35, 0, 190, 110, 0.6], [0.6, 250, 215, 0, 0.75],
              [0.8, 250, 120, 0, 0.88], [1, 215, 25, 28, 1]];
function heatColour(t) {
  if (t < 0.02) return [0, 0, 0, 0];
  for (let n = 1; n < RAMP.length; n++) {
    if (t <= RAMP[n][0]) {
      const [t0, ...a] = RAMP[n - 1], [t1, ...b] = RAMP[n], f = (t - t0) / (t1 - t0);
      return a.map((v, i) => v + (b[i] - v) * f);
    }
  }
  return RAMP[RAMP.length - 1].slice(1);
}
// For differences: blue where touches fell, red where they rose.
function differenceColour(t) {
  const m = Math.min(1, Math.abs(t));
  if (m < 0.03) return [0, 0, 0, 0];
  return t > 0 ? [215, 25, 28, 0.2 + 0.8 * m] : [33, 102, 172, 0.2 + 0.8 * m];
}

function paintDensity(canvas, picture, field, colour, scale, opacity) {
  const {width, height} = picture;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, width, height);
  if (picture.image) {
    context.globalAlpha = opacity;
    context.drawImage(picture.image, 0, 0, width, height);
    context.globalAlpha = 1;
  } else {
    context.fillStyle = "#e2e8f0";
    context.fillRect(0, 0, width, height);
  }
  const layer = document.createElement("canvas");
  layer.width = field.cols;
  layer.height = field.rows;
  const pixels = layer.getContext("2d").createImageData(field.cols, field.rows);
  for (let i = 0; i < field.grid.length; i++) {
    const [r, g, b, a] = colour(field.grid[i] / scale);
    pixels.data.set([r, g, b, Math.round(a * 255)], i * 4);
  }
  layer.getContext("2d").putImageData(pixels, 0, 0);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(layer, 0, 0, width, height);
}

function paintLegend(canvas, colour, from) {
  const context = canvas.getContext("2d"), width = canvas.width;
  context.clearRect(0, 0, width, canvas.height);
  for (let x = 0; x < width; x++) {
    const [r, g, b, a] = colour(from + (1 - from) * x / (width - 1));
    context.fillStyle = `rgba(${r},${g},${b},${Math.max(a, 0.08)})`;
    context.fillRect(x, 0, 1, canvas.height);
  }
}

// The screen's size: its image's, else the one set on the page (the touches' extent at first).
async function pictureOf(screen, heatmaps) {
  const found = await screenImage(screen);
  const hasImage = Boolean(found);
  $("heat-size-w").hidden = $("heat-size-h").hidden = hasImage;
  if (!$("heat-width").dataset.set) $("heat-width").value = roundUp(heatmaps.width, 1920);
  if (!$("heat-height").dataset.set) $("heat-height").value = roundUp(heatmaps.height, 1080);
  const picture = found || {image: null, width: Number($("heat-width").value) || 1920, height: Number($("heat-height").value) || 1080};
  $("heat-image-note").textContent = found ? `drawn over the screen's image (${count(found.width)} × ${count(found.height)} px)`
    : "this screen has no image yet: give it one (a screenshot) with the field above";
  return {image: picture.image, width: Math.min(8192, picture.width), height: Math.min(8192, picture.height)};
}

// No touch points yet: a full-HD screen, the touch tables' most common.
function roundUp(size, otherwise) { return size ? Math.ceil(size / 10) * 10 : otherwise; }

// The largest of many values (spread into Math.max, a grid's would overflow the stack).
function largest(values, floor) {
  let top = floor;
  for (const value of values) if (value > top) top = value;
  return top;
}

let heatDrawn = 0;
async function drawHeatmaps() {
  if (!stats) return;
  const turn = ++heatDrawn;  // a later redraw wins over one still loading its image
  const screen = $("heat-screen").value, radius = Number($("heat-radius").value), opacity = Number($("heat-opacity").value);
  const heat = stats.heatmaps.screens[screen];
  figure("heatmap-points", count(heat ? heat.points : 0));
  $("heat-what").textContent = stats.heatmaps.touches === "navigating" ? "navigating touch points (those that moved to another screen)" : "touch points";
  const picture = await pictureOf(screen, stats.heatmaps);
  if (turn !== heatDrawn) return;
  const compared = comparison && $("compare").checked;
  $("heat-single").hidden = Boolean(compared);
  $("heat-compare").hidden = !compared;
  if (!compared) {
    const field = density(heat ? heat.bins : [], stats.heatmaps.bin, picture.width, picture.height, radius, 1);
    const top = largest(field.grid, 1e-9);
    paintDensity($("heatmap"), picture, field, heatColour, top, opacity);
    paintLegend($("heat-legend"), heatColour, 0.02);
    $("heat-legend-max").textContent = `${plural(Math.round(top * 10) / 10, "touch", "touches")} within about ${radius} px`;
    $("heatmap").dataset.scaleMax = top;
    return;
  }
  // Both sides on one scale, per session, and their difference.
  const side = (data) => {
    const found = data.heatmaps.screens[screen];
    return density(found ? found.bins : [], data.heatmaps.bin, picture.width, picture.height, radius, 1 / Math.max(1, data.sessions));
  };
  const a = side(comparison.a), b = side(comparison.b);
  const top = Math.max(largest(a.grid, 1e-9), largest(b.grid, 1e-9));
  paintDensity($("heatmap-a"), picture, a, heatColour, top, opacity);
  paintDensity($("heatmap-b"), picture, b, heatColour, top, opacity);
  $("heat-sessions-a").textContent = plural(comparison.a.sessions, "session", "sessions");
  $("heat-sessions-b").textContent = plural(comparison.b.sessions, "session", "sessions");
  paintLegend($("heat-legend-ab"), heatColour, 0.02);
  $("heat-legend-ab-max").textContent = `${NUMBER.format(Math.round(top * 1000) / 1000)} touches per session within about ${radius} px`;
  const difference = {cols: a.cols, rows: a.rows, grid: b.grid.map((value, i) => value - a.grid[i])};
  const spread = largest(difference.grid.map(Math.abs), 1e-9);
  paintDensity($("heatmap-diff"), picture, difference, differenceColour, spread, opacity);
  paintLegend($("heat-legend-diff"), (t) => differenceColour(2 * t - 1), 0);
  $("heat-legend-diff-min").textContent = `−${NUMBER.format(Math.round(spread * 1000) / 1000)}`;
  $("heat-legend-diff-max").textContent = `+${NUMBER.format(Math.round(spread * 1000) / 1000)} touches per session`;
}

$("heat-screen").addEventListener("change", () => { drawHeatmaps(); remember(); });
for (const id of ["heat-radius", "heat-opacity"]) $(id).addEventListener("input", drawHeatmaps);
for (const id of ["heat-width", "heat-height"]) {
  $(id).addEventListener("input", () => { $(id).dataset.set = "1"; drawHeatmaps(); });
}
$("heat-touches").addEventListener("change", () => { remember(); loadStats(false); });

$("heat-download").addEventListener("click", () => {
  const canvas = $("compare").checked && comparison ? $("heatmap-diff") : $("heatmap");
  canvas.toBlob((blob) => {
    const link = el("a", {href: URL.createObjectURL(blob), download: `heatmap-${$("heat-screen").value.replace(/[^\w.-]+/g, "_") || "screen"}.png`});
    document.body.appendChild(link);
    link.click();
    link.remove();
  }, "image/png");
});

$("heat-upload").addEventListener("change", async () => {
  const file = $("heat-upload").files[0], screen = $("heat-screen").value;
  if (!file || !screen) return;
  try {
    const response = await fetch(`${BASE}/screens/${encodeURIComponent(screen)}/image`, {
      method: "PUT", body: file, headers: key ? {"X-Microticks-Key": key} : {}});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    images.delete(screen);
    await screensWithImages(true);
    showError(null);
    drawHeatmaps();
  } catch (error) { showError(error); }
  $("heat-upload").value = "";
});

// ---- Journeys: a visit's first screens as steps, column after column.

// Screens' colours: a palette of ten that tell apart, given to the screens with the most
// sessions in this range first (the rest share a grey); the same screen, the same colour, in every chart.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#2f4b7c"];
let colourRank = new Map();
function rankColours(journeys) {
  const sessions = new Map();
  for (const j of journeys) if (j.to !== "(exit)") sessions.set(j.to, (sessions.get(j.to) || 0) + j.sessions);
  colourRank = new Map([...sessions.entries()].sort((a, b) => b[1] - a[1]).slice(0, PALETTE.length).map(([name], n) => [name, n]));
}
function screenColour(name) {
  if (name === "(exit)") return "#94a3b8";
  if (name === "(entry)") return "#1f2937";
  return colourRank.has(name) ? PALETTE[colourRank.get(name)] : "#b8c2cc";
}

const SHOWN_PER_STEP = 8;
function drawJourneys(journeys) {
  rankColours(journeys);
  const steps = Math.max(0, ...journeys.map((j) => j.step));
  // Per step, the screens with the most sessions arriving, the rest as "other screens"; (exit) last.
  const columns = [[{name: "(entry)", sessions: journeys.filter((j) => j.step === 1).reduce((sum, j) => sum + j.sessions, 0)}]];
  const kept = [new Set(["(entry)"])];
  for (let step = 1; step <= steps; step++) {
    const arriving = new Map();
    for (const j of journeys.filter((j) => j.step === step)) arriving.set(j.to, (arriving.get(j.to) || 0) + j.sessions);
    const ranked = [...arriving.entries()].filter(([name]) => name !== "(exit)").sort((a, b) => b[1] - a[1]);
    const shown = ranked.slice(0, SHOWN_PER_STEP), rest = ranked.slice(SHOWN_PER_STEP);
    const column = shown.map(([name, sessions]) => ({name, sessions}));
    if (rest.length) column.push({name: "other screens", sessions: rest.reduce((sum, [, n]) => sum + n, 0), others: rest.length});
    if (arriving.has("(exit)")) column.push({name: "(exit)", sessions: arriving.get("(exit)")});
    columns.push(column);
    kept.push(new Set(shown.map(([name]) => name).concat(["(exit)"])));
  }
  const node = (step, name) => (kept[step].has(name) ? name : "other screens");
  const bands = new Map();  // step|from|to -> sessions, with names folded into "other screens"
  for (const j of journeys) {
    const id = `${j.step}\u0000${node(j.step - 1, j.from)}\u0000${node(j.step, j.to)}`;
    bands.set(id, (bands.get(id) || 0) + j.sessions);
  }
  const total = Math.max(1, columns[0][0].sessions);
  // A node as tall as its sessions, and apart from the next by at least its two lines of text.
  const width = Math.max(720, $("journeys").clientWidth || 900), unit = 420 / total, label = 200, pitch = 30;
  const x = (step) => 10 + step * (width - 20 - label) / Math.max(1, steps);
  const place = columns.map((column) => {
    let y = 24;
    const at = new Map();
    for (const box of column) {
      const h = Math.max(3, box.sessions * unit);
      at.set(box.name, {y, h, out: 0, in: 0, box});
      y += Math.max(h + 6, pitch);
    }
    return at;
  });
  const height = 10 + Math.max(...place.map((at) => [...at.values()].reduce((end, b) => Math.max(end, b.y + b.h), 40)));
  const chart = el("svg:svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Journeys, step by step"});
  for (let step = 0; step <= steps; step++) {
    chart.appendChild(el("svg:text", {class: "step", x: x(step), y: 14}, step === 0 ? "start" : `step ${step}`));
  }
  const drawn = [];
  for (const [id, sessions] of [...bands.entries()].sort((a, b) => b[1] - a[1])) {
    const [step, from, to] = id.split("\u0000");
    const a = place[step - 1].get(from), b = place[step].get(to);
    if (!a || !b) continue;
    const h = Math.max(1, sessions * unit);
    const y1 = a.y + a.out + h / 2, y2 = b.y + b.in + h / 2;
    a.out += h; b.in += h;
    const x1 = x(step - 1) + 8, x2 = x(step);
    const band = el("svg:path", {class: "band", d: `M${x1},${y1} C${(x1 + x2) / 2},${y1} ${(x1 + x2) / 2},${y2} ${x2},${y2}`,
                                 stroke: screenColour(to === "(exit)" ? from : to), "stroke-width": h,
                                 "data-step": step, "data-from": from, "data-to": to, "data-sessions": sessions});
    band.appendChild(el("svg:title", {}, `step ${step}: ${from} → ${to}: ${plural(sessions, "session", "sessions")}`));
    chart.appendChild(band);
    drawn.push(band);
  }
  place.forEach((at, step) => {
    for (const [name, spot] of at) {
      const group = el("svg:g", {class: "node", tabindex: 0, "data-step": step, "data-name": name});
      // The node and its two lines of text take the pointer, above the bands that pass under them.
      group.appendChild(el("svg:rect", {x: x(step), y: spot.y, width: 150, height: Math.max(spot.h, 28), fill: "#000", "fill-opacity": 0}));
      group.appendChild(el("svg:rect", {x: x(step), y: spot.y, width: 8, height: spot.h, fill: screenColour(name), rx: 2}));
      const words = el("svg:text", {x: x(step) + 12, y: spot.y + 11},
                       shorten(name, 24) + (spot.box.others ? ` (${spot.box.others})` : ""));
      words.appendChild(el("svg:title", {}, `${name}: ${plural(spot.box.sessions, "session", "sessions")}`));
      group.appendChild(words);
      group.appendChild(el("svg:text", {class: "count", x: x(step) + 12, y: spot.y + 24}, plural(spot.box.sessions, "session", "sessions")));
      const focus = () => focusJourney(drawn, step, name, spot.box.sessions);
      group.addEventListener("mouseenter", focus);
      group.addEventListener("click", focus);
      group.addEventListener("focus", focus);
      chart.appendChild(group);
    }
  });
  chart.addEventListener("mouseleave", () => focusJourney(drawn, null));
  $("journeys").replaceChildren(chart);
  $("journey-focus").textContent = journeys.length ? "" : "No paths in this range.";
  $("journeys-table").querySelector("tbody").replaceChildren(...journeys.map((j) => {
    const row = el("tr", {"data-step": j.step});
    row.append(el("td", {}, `${j.step}: ${j.from} → ${j.to}`), el("td", {}, count(j.sessions)));
    return row;
  }));
}

function focusJourney(bands, step, name, sessions) {
  if (step === null) {
    for (const band of bands) band.classList.remove("lit", "dim");
    $("journey-focus").textContent = "";
    return;
  }
  const into = [], out = [];
  for (const band of bands) {
    const inbound = Number(band.dataset.step) === step && band.dataset.to === name;
    const outbound = Number(band.dataset.step) === step + 1 && band.dataset.from === name;
    band.classList.toggle("lit", inbound || outbound);
    band.classList.toggle("dim", !inbound && !outbound);
    if (inbound) into.push(`${plural(Number(band.dataset.sessions), "session", "sessions")} from ${band.dataset.from}`);
    if (outbound) out.push(`${count(Number(band.dataset.sessions))} to ${band.dataset.to}`);
  }
  $("journey-focus").textContent = `${name}${step ? ` at step ${step}` : ""}: ${plural(sessions, "session", "sessions")}`
    + (into.length ? `; came ${into.join(", ")}` : "") + (out.length ? `; went on: ${out.join(", ")}` : "");
}

// ---- An empty range says where the data is.
async function showDataRange() {
  if (EMBEDDED) { $("data-range").textContent = "No sessions in this report's range."; return; }
  try {
    const first = await api("/sessions", {limit: 1, sort: "started_at", fields: "started_utc", consumer: $("consumer").value, site: $("site").value});
    if (!first.count) { $("data-range").textContent = "This Microticks has no sessions yet."; $("show-all").hidden = true; return; }
    const last = await api("/sessions", {limit: 1, "sort.desc": "started_at", fields: "started_utc", consumer: $("consumer").value, site: $("site").value});
    const from = first.sessions[0].started_utc.slice(0, 10), to = last.sessions[0].started_utc.slice(0, 10);
    $("data-range").textContent = `The ${plural(first.count, "session", "sessions")} there are run from ${from} to ${to}.`;
    $("show-all").hidden = false;
    $("show-all").onclick = () => { $("from").value = from; $("to").value = to; remember(); loadStats(); };
  } catch (error) { showError(error); }
}

// ---- The session explorer: the range's sessions, one on a time line, replayed.

const explorer = {session: "", sort: "started_at", descending: true, offset: 0, page: 15, events: [], visits: [], timer: null};

async function loadExplorerList() {
  if (EMBEDDED) { $("explorer").hidden = true; return; }
  try {
    const order = explorer.descending ? {"sort.desc": explorer.sort} : {sort: explorer.sort};
    const answer = await api("/sessions", Object.assign(filters(), order, {limit: explorer.page, offset: explorer.offset,
      data_key: $("data_key").value.trim(), fields: "id,started_utc,duration,touches,screens"}));
    $("explore-count").textContent = answer.count ? `Sessions ${count(explorer.offset + 1)} to ${count(explorer.offset + answer.sessions.length)} of ${count(answer.count)} in this range`
      : "No sessions in this range";
    $("explore-prev").disabled = explorer.offset === 0;
    $("explore-next").disabled = explorer.offset + answer.sessions.length >= answer.count;
    for (const button of document.querySelectorAll("#explore-list th button.sort")) {
      if (button.dataset.sort === explorer.sort) button.setAttribute("aria-sort", explorer.descending ? "descending" : "ascending");
      else button.removeAttribute("aria-sort");
    }
    $("explore-list").querySelector("tbody").replaceChildren(...answer.sessions.map((s) => {
      const row = el("tr", {"data-session": s.id, class: String(s.id) === explorer.session ? "picked" : ""});
      row.append(el("td", {}, `#${s.id}`), el("td", {}, new Date(s.started_utc).toLocaleString()),
                 el("td", {}, seconds(s.duration)), el("td", {}, count(s.touches)), el("td", {}, count(s.screens)));
      row.addEventListener("click", () => openSession(String(s.id)));
      return row;
    }));
  } catch (error) { showError(error); }
}

for (const button of document.querySelectorAll("#explore-list th button.sort")) {
  button.addEventListener("click", () => {
    explorer.descending = button.dataset.sort === explorer.sort ? !explorer.descending : true;
    explorer.sort = button.dataset.sort;
    explorer.offset = 0;
    loadExplorerList();
  });
}
$("explore-prev").addEventListener("click", () => { explorer.offset = Math.max(0, explorer.offset - explorer.page); loadExplorerList(); });
$("explore-next").addEventListener("click", () => { explorer.offset += explorer.page; loadExplorerList(); });
$("explore-open").addEventListener("click", () => { const id = $("explore-id").value.trim(); if (/^\d+$/.test(id)) openSession(id); });
$("explore-id").addEventListener("keydown", (event) => { if (event.key === "Enter") $("explore-open").click(); });

async function openSession(id) {
  stopReplay();
  explorer.session = id;
  remember();
  for (const row of document.querySelectorAll("#explore-list tbody tr")) row.classList.toggle("picked", row.dataset.session === id);
  try {
    const screenKey = $("data_key").value.trim();
    const [{session}, events] = await Promise.all([api(`/sessions/${id}`, {data_key: screenKey}),
                                                   api("/events", {session: id, sort: "seq", fields: "id,time_utc,action,data"})]);
    explorer.events = events.events;
    // The visits, as /stats counts them: runs of events with the same screen, events without one aside.
    const start = Date.parse(session.started_utc);
    const visits = [];
    for (const event of explorer.events) {
      const data = event.data && typeof event.data === "object" ? event.data : {};
      const screen = data[screenKey];
      const at = Date.parse(event.time_utc) - start;
      if (screen !== undefined && screen !== null && (!visits.length || visits[visits.length - 1].screen !== String(screen))) {
        visits.push({screen: String(screen), at, touches: []});
      }
      if (typeof data.clickX === "number" && typeof data.clickY === "number") {
        // Drawn on the screen the touch was made on: the one it left, for a navigating touch.
        const prev = data[`prev${screenKey[0].toUpperCase()}${screenKey.slice(1)}`];
        const on = prev !== undefined && prev !== null ? String(prev) : screen !== undefined && screen !== null ? String(screen) : "";
        const visit = prev !== undefined && prev !== null && visits.length > 1 ? visits[visits.length - 2] : visits[visits.length - 1];
        const touch = {x: data.clickX, y: data.clickY, at, on};
        if (visit && visit.screen === on) visit.touches.push(touch);
        else if (visits.length) visits[visits.length - 1].touches.push(touch);
      }
    }
    explorer.visits = visits;
    explorer.duration = Math.max(1, (session.duration || 0) * 1000, ...explorer.events.map((e) => Date.parse(e.time_utc) - start));
    $("explore-hint").hidden = true;
    $("explore-summary").textContent = `Session #${id}: ${plural(session.path.length, "visit", "visits")} to ${plural(session.screens, "screen", "screens")}, `
      + `${plural(session.touches, "touch", "touches")}, ${seconds(session.duration)}; started ${new Date(session.started_utc).toLocaleString()}`;
    drawTimeline(visits);
    $("explore-play-row").hidden = !visits.length;
    if (visits.length) showVisit(0);
  } catch (error) { showError(error); }
}

function drawTimeline(visits) {
  const width = Math.max(560, $("explore-timeline").clientWidth || 900), left = 10, right = 10, rowHeight = 26;
  const height = visits.length * rowHeight + 40;
  const span = explorer.duration, px = (ms) => left + (width - left - right) * ms / span;
  const chart = el("svg:svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "The session's visits on a time line"});
  // The axis: minutes and seconds from the session's start.
  const stepMs = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800].map((s) => s * 1000).find((s) => span / s <= 10) || 3600000;
  for (let ms = 0; ms <= span; ms += stepMs) {
    chart.appendChild(el("svg:line", {class: "tick", x1: px(ms), x2: px(ms), y1: 14, y2: height - 6}));
    chart.appendChild(el("svg:text", {x: px(ms) + 2, y: 11}, clock(ms)));
  }
  visits.forEach((visit, n) => {
    const end = n + 1 < visits.length ? visits[n + 1].at : Math.max(visit.at, ...visit.touches.map((t) => t.at)) + 500;
    const y = 20 + n * rowHeight;
    const bar = el("svg:rect", {class: "visit", x: px(visit.at), y, width: Math.max(3, px(end) - px(visit.at)), height: rowHeight - 8, rx: 3,
                                fill: screenColour(visit.screen), "data-visit": n, "fill-opacity": n + 1 < visits.length ? 0.85 : 0.45});
    bar.appendChild(el("svg:title", {}, `${visit.screen}: from ${clock(visit.at)}` + (n + 1 < visits.length ? ` to ${clock(end)}` : " (the last: not measured)")
                                        + `, ${plural(visit.touches.length, "touch", "touches")}`));
    bar.addEventListener("click", () => showVisit(n));
    chart.appendChild(bar);
    for (const touch of visit.touches) {
      chart.appendChild(el("svg:line", {class: "touch", x1: px(touch.at), x2: px(touch.at), y1: y + 2, y2: y + rowHeight - 10}));
    }
    const text = el("svg:text", {x: Math.min(px(visit.at) + 4, width - 220), y: y + rowHeight - 12},
                    `${shorten(visit.screen, 36)} · ${plural(visit.touches.length, "touch", "touches")}`);
    text.addEventListener("click", () => showVisit(n));
    chart.appendChild(text);
  });
  $("explore-timeline").replaceChildren(chart);
}

// One visit's touches on its screen's image (up to `upTo` of them, in a replay).
async function showVisit(n, upTo) {
  const visit = explorer.visits[n];
  if (!visit) return;
  for (const bar of document.querySelectorAll("#explore-timeline .visit")) bar.classList.toggle("chosen", Number(bar.dataset.visit) === n);
  $("explore-now").textContent = `${visit.screen} (visit ${n + 1} of ${explorer.visits.length})`;
  $("explore-now").dataset.screen = visit.screen;
  const found = await screenImage(visit.screen);
  const picture = found || {image: null, width: Number($("heat-width").value) || 1920, height: Number($("heat-height").value) || 1080};
  const canvas = $("explore-canvas");
  canvas.hidden = false;
  canvas.width = Math.min(4096, picture.width);
  canvas.height = Math.min(4096, picture.height);
  const context = canvas.getContext("2d");
  context.fillStyle = "#e2e8f0";
  context.fillRect(0, 0, canvas.width, canvas.height);
  if (picture.image) context.drawImage(picture.image, 0, 0, canvas.width, canvas.height);
  const scale = canvas.width / picture.width, touches = visit.touches.slice(0, upTo === undefined ? visit.touches.length : upTo);
  touches.forEach((touch, i) => {
    context.beginPath();
    context.arc(touch.x * scale, touch.y * scale, Math.max(10, canvas.width / 80), 0, 2 * Math.PI);
    context.fillStyle = i === touches.length - 1 ? "rgba(215, 25, 28, 0.85)" : "rgba(215, 25, 28, 0.45)";
    context.fill();
    context.lineWidth = Math.max(2, canvas.width / 600);
    context.strokeStyle = "#fff";
    context.stroke();
  });
  context.font = `${Math.max(16, canvas.width / 60)}px system-ui, sans-serif`;
  context.fillStyle = "rgba(15, 23, 42, 0.75)";
  context.fillRect(0, 0, canvas.width, Math.max(28, canvas.width / 40));
  context.fillStyle = "#fff";
  context.fillText(`${visit.screen}  ·  ${clock(visit.at)}  ·  ${plural(touches.length, "touch", "touches")}`, 12, Math.max(20, canvas.width / 55));
}

function stopReplay() {
  clearTimeout(explorer.timer);
  explorer.timer = null;
  $("explore-play").textContent = "▶ Replay";
}

// Screen by screen, touch by touch, in time (faster than real time, as chosen).
$("explore-play").addEventListener("click", () => {
  if (explorer.timer) { stopReplay(); return; }
  // In the session's order: each visit, then its touches (the one that left a screen last), waits as in time.
  const moments = [];
  explorer.visits.forEach((visit, n) => {
    moments.push({at: visit.at, visit: n, touches: 0});
    visit.touches.forEach((touch, i) => moments.push({at: touch.at, visit: n, touches: i + 1}));
  });
  const speed = Number($("explore-speed").value) || 10;
  let next = 0;
  $("explore-play").textContent = "■ Stop";
  const step = () => {
    const moment = moments[next];
    showVisit(moment.visit, moment.touches);
    next += 1;
    if (next >= moments.length) { explorer.timer = null; $("explore-play").textContent = "▶ Replay"; return; }
    explorer.timer = setTimeout(step, Math.min(1500, Math.max(30, (moments[next].at - moment.at) / speed)));  // no wait back in time
  };
  step();
});

// ---- Resizing draws the charts again at the new size.
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    if (stats) render(stats);
    if (paths) renderPaths(paths);
    if (comparison && $("compare").checked) renderComparison(comparison, lastLabels);
    if (explorer.visits.length) drawTimeline(explorer.visits);
  }, 200);
});

// A query the service refused leaves the last figures on screen: dimmed,
// and said so, lest they be read as the answer to the new one.
function showStatsError(error) {
  const message = String(error.message || error);
  showError(stats ? `${message} (the figures below are still those of the last query shown)` : message);
  markStale(Boolean(stats));
}

function markStale(stale) {
  for (const part of document.querySelectorAll(".cards, .grid > section:not(#kiosks):not(#live)")) {
    part.classList.toggle("stale", stale);
  }
}

let lastLabels = {a: "", b: ""};
function renderComparison(data, labels) {
  comparison = data;
  lastLabels = labels;
  $("comparison").hidden = false;
  $("label-a").textContent = labels.a;
  $("label-b").textContent = labels.b;
  const number = (value) => (value === null || value === undefined ? "–" : NUMBER.format(Math.round(value * 1000) / 1000));
  const points = (value) => (value === null || value === undefined ? "–" : `${value > 0 ? "+" : ""}${NUMBER.format(Math.round(value * 1000) / 10)} points`);
  const rows = [], d = data.differences;
  const medians = (label, f) => rows.push([label, number(f.a_median), number(f.b_median), number(f.difference), f.p_value, `${count(f.a_n)} / ${count(f.b_n)}`]);
  const shares = (label, f) => rows.push([label, percent(f.a), percent(f.b), points(f.difference), f.p_value, `${count(f.a_count)} / ${count(f.b_count)}`]);
  medians("Session duration, median (s)", d.duration);
  medians("Touches per session, median", d.touches_per_session);
  medians("Distinct screens per session, median", d.screens_per_session);
  shares(`Meaningful sessions (${data.a.meaningful_touches}+ touches), share`, d.meaningful_share);
  if (d.duration_survival.p_value !== null) {
    const s = d.duration_survival;
    rows.push(["Sessions still going over time (log-rank test)", `${count(s.a_observed)} ended`, `${count(s.b_observed)} ended`,
               `χ² ${NUMBER.format(s.chi2)}`, s.p_value, ""]);
  }
  for (const f of d.time_on_screen.slice(0, 15)) medians(`Time on ${f.screen}, median (s)`, f);
  for (const f of d.first_picks.slice(0, 10)) shares(`Picked ${f.screen} first, share of sessions`, f);
  for (const f of d.visit_shares.slice(0, 10)) shares(`Visits to ${f.screen}, share`, f);
  const body = $("compare-table").querySelector("tbody");
  body.replaceChildren(...rows.map(([label, a, b, difference, p, n]) => {
    const row = el("tr");
    row.append(el("td", {}, label), el("td", {}, a), el("td", {}, b), el("td", {}, difference),
               el("td", p !== null && p < 0.05 ? {class: "small-p"} : {}, p === null ? "–" : p < 0.001 ? "< 0.001" : p.toFixed(3)),
               el("td", {}, n));
    return row;
  }));
  $("compare-tests").textContent = `${plural(data.tests, "test was", "tests were")} made (the table shows the largest screens): where nothing differs, about one in twenty still comes out under 0.05.`;
  dayChart($("per-day-a"), data.a);
  dayChart($("per-day-b"), data.b);
  drawHeatmaps();
}

async function loadComparison(params, mine = statsAsked) {
  if (!$("compare").checked) { $("comparison").hidden = true; comparison = null; return; }
  const side = sideB(), a = filters(), asked = {data_key: params.data_key, touches: params.touches};
  for (const [name, value] of Object.entries(a)) asked[`a.${name}`] = value;
  for (const [name, value] of Object.entries(side)) asked[`b.${name}`] = value;
  const label = (f, select) => `${f.from || "…"} to ${f.to || "…"}` + (f.consumer ? `, ${select.selectedOptions[0] ? select.selectedOptions[0].textContent : f.consumer}` : "")
    + (f.site ? `, site ${f.site}` : "") + (f.weekday ? `, ${f.weekday}` : "") + (f.hours ? `, ${f.hours} h` : "");
  const answer = await api("/compare", asked);
  if (mine === statsAsked) renderComparison(answer, {a: label(a, $("consumer")), b: label(side, $("consumer-b"))});
}

$("compare").addEventListener("change", () => {
  $("compare-controls").hidden = !$("compare").checked;
  if (!$("compare").checked) { $("comparison").hidden = true; comparison = null; drawHeatmaps(); remember(); }
});

function statsQuery() {
  return Object.assign(filters(), {data_key: $("data_key").value.trim(), touches: $("heat-touches").value === "all" ? "" : "navigating"});
}

async function loadStats(keepExplorer = true) {
  const range = filters();
  if (range.from && range.to && range.from > range.to) {  // the API answers that with nothing at all
    showStatsError("From is after To: no day lies between them");
    return;
  }
  const mine = ++statsAsked;
  try {
    const asked = statsQuery();
    const answer = await api("/stats", asked);
    if (mine !== statsAsked) return;
    paths = null;  // a new range: its coverage comes with the second answer
    render(answer);
    await loadComparison(asked, mine);
    if (mine !== statsAsked) return;
    showError(null);
    markStale(false);
    if (!keepExplorer) explorer.offset = 0;
    loadExplorerList();
    if (explorer.session && !explorer.visits.length) openSession(explorer.session);
    const figures = await api("/stats", Object.assign(asked, {paths: 4, holding: 1, coverage: 1}));
    if (mine === statsAsked) renderPaths(figures);
  } catch (error) { if (mine === statsAsked) showStatsError(error); }
}

async function loadLive() {
  if (EMBEDDED) return;
  try {
    const page = await api("/sessions", {limit: 10, "sort.desc": "id", consumer: $("consumer").value, site: $("site").value,
                                         fields: "id,consumer,device,started_utc,stopped_at,stop_reason,events,missing_events"});
    const list = $("live").querySelector("ol");
    const items = await Promise.all(page.sessions.map(async (session) => {
      const events = await api("/events", {session: session.id, sort: "seq", limit: 30, fields: "time_utc,action,data"});
      const item = el("li", {class: "session", "data-session": session.id});
      const head = el("div", {class: "head"});
      head.append(el("strong", {}, `#${session.id}`),
                  el("span", {}, new Date(session.started_utc).toLocaleString()),
                  el("span", {}, session.consumer || ""), el("span", {}, session.device || ""),
                  el("span", {}, plural(session.events, "event", "events")),
                  el("span", {class: session.stop_reason ? "badge closed" : "badge"},
                     session.stop_reason ? `closed (${session.stop_reason})` : "open"));
      if (session.missing_events) head.appendChild(el("span", {class: "badge closed"}, `${count(session.missing_events)} missing`));
      const lines = el("ol", {class: "events"});
      for (const event of events.events) {
        lines.appendChild(el("li", {}, `${event.time_utc ? event.time_utc.slice(11, 19) : ""} ${event.action} ${JSON.stringify(event.data)}`));
      }
      item.append(head, lines);
      return item;
    }));
    list.replaceChildren(...items);
  } catch (error) { showError(error); }
}

async function loadKiosks() {
  if (EMBEDDED) return;
  const status = await api("/status");
  const body = $("kiosks").querySelector("tbody");
  body.replaceChildren();
  for (const d of status.devices) {
    const row = el("tr", {"data-device": d.device});
    for (const cell of [d.device, d.consumer, d.app_version || "", d.last_seen_at ? new Date(d.last_seen_at).toLocaleString() : "",
                        d.queue_depth ?? "", d.silent ? "silent" : "ok"]) row.appendChild(el("td", {}, cell));
    body.appendChild(row);
  }
  $("kiosks-note").textContent = status.devices.length ? `Silent: no sign of life for over ${plural(status.silent_after_s / 3600, "hour", "hours")}.`
    : "No kiosk has reported a device name yet (the tracker's device option).";
}

async function loadConsumers() {
  const answer = await api("/consumers");
  for (const select of [$("consumer"), $("consumer-b")]) {
    const chosen = select.value;
    select.replaceChildren(el("option", {value: ""}, "All consumers"));
    for (const consumer of answer.consumers) select.appendChild(el("option", {value: consumer.id}, consumer.name));
    select.value = chosen;
  }
  // Sites: those of the consumers (a central Microticks imports others'); shown when there are two or more.
  const sites = [...new Set(answer.consumers.map((consumer) => consumer.site))].sort();
  for (const select of [$("site"), $("site-b")]) {
    const chosen = select.value;
    select.replaceChildren(el("option", {value: ""}, "All sites"), ...sites.map((site) => el("option", {value: site}, site)));
    select.value = chosen;
  }
  for (const label of document.querySelectorAll("label.sites")) label.hidden = sites.length < 2;
}

// The same figures as one HTML file: the service writes it (GET /report), with the images in it.
$("report").addEventListener("click", async () => {
  try {
    const asked = Object.assign(statsQuery(), $("compare").checked ? Object.fromEntries(Object.entries(sideB()).map(([k, v]) => [`b.${k}`, v])) : {});
    const response = await fetch(`${BASE}/report?${query(asked)}`, {headers: key ? {"X-Microticks-Key": key} : {}});
    if (!response.ok) throw new Error((await response.json()).error || `HTTP ${response.status}`);
    const link = el("a", {href: URL.createObjectURL(await response.blob()), download: `microticks-report-${$("from").value || "all"}-${$("to").value || "all"}.html`});
    document.body.appendChild(link);
    link.click();
    link.remove();
  } catch (error) { showError(error); }
});

let liveTimer = null;
async function start() {
  if (EMBEDDED) {
    document.body.classList.add("report");
    restore(new URLSearchParams(EMBEDDED.state));
    $("report-note").textContent = EMBEDDED.title;
    for (const id of ["live", "kiosks"]) $(id).hidden = true;
    await loadConsumers().catch(() => null);
    restore(new URLSearchParams(EMBEDDED.state));
    await loadStats();
    return;
  }
  try { await loadConsumers(); } catch (error) { showError(error); return; }
  restore(new URLSearchParams(location.search));
  await Promise.all([loadStats(), loadLive(), loadKiosks().catch(showError)]);
  clearInterval(liveTimer);
  liveTimer = setInterval(() => { loadLive(); loadKiosks().catch(showError); }, 3000);
}

restore(new URLSearchParams(location.search));
$("apply").addEventListener("click", () => { remember(); loadStats(false); loadLive(); });
start();
</script>
</body>
</html>
"""


#: The files of a research bundle (write_research_bundle), and the DuckDB SQL
#: that computes its headline figures from them: run in the folder,
#: `duckdb < analysis.sql`. Its definitions are /stats' (VALUES_DEFINITION),
#: and the tests hold it to /stats on the real week.
BUNDLE_ANALYSIS_SQL = """\
-- The headline figures of this bundle, from its NDJSON files, with DuckDB:
--     cd this-folder && duckdb < analysis.sql
-- Days are UTC days. Definitions: README.md in this folder.
CREATE OR REPLACE VIEW events AS SELECT * FROM read_json('events.ndjson', format = 'newline_delimited',
    columns = {id: 'BIGINT', session_id: 'BIGINT', time: 'VARCHAR', time_utc: 'VARCHAR', action: 'VARCHAR',
               data: 'JSON', seq: 'BIGINT'});
CREATE OR REPLACE VIEW sessions AS SELECT * FROM read_json('sessions.ndjson', format = 'newline_delimited',
    columns = {id: 'BIGINT', started_utc: 'VARCHAR', stopped_utc: 'VARCHAR', events: 'BIGINT', duration: 'DOUBLE'});
CREATE OR REPLACE VIEW sessions_per_day AS
    SELECT substr(started_utc, 1, 10) AS day, count(*) AS sessions FROM sessions GROUP BY day ORDER BY day;
CREATE OR REPLACE VIEW events_per_action AS
    SELECT action, count(*) AS events FROM events GROUP BY action ORDER BY events DESC, action;
-- A visit: a run of a session's events with the same screen, events without one aside.
CREATE OR REPLACE VIEW visits AS
    WITH valued AS (
        SELECT session_id, id, seq, CAST(time_utc AS TIMESTAMP) AS t, json_extract_string(data, '$.__KEY__') AS screen
        FROM events WHERE json_extract_string(data, '$.__KEY__') IS NOT NULL),
    marked AS (
        SELECT *, screen IS DISTINCT FROM lag(screen) OVER (PARTITION BY session_id ORDER BY seq NULLS FIRST, id)
            AS new_visit
        FROM valued),
    numbered AS (
        SELECT *, sum(CAST(new_visit AS INTEGER)) OVER (PARTITION BY session_id ORDER BY seq NULLS FIRST, id) AS visit
        FROM marked)
    SELECT session_id, visit, first(screen) AS screen, min(t) AS arrived FROM numbered GROUP BY session_id, visit;
-- Time on a screen: up to the next visit's arrival. A session's last visit is not measured.
CREATE OR REPLACE VIEW screens AS
    WITH timed AS (
        SELECT *, epoch(lead(arrived) OVER (PARTITION BY session_id ORDER BY visit)) - epoch(arrived) AS seconds
        FROM visits)
    SELECT screen, count(*) AS visits, count(seconds) AS measured, round(avg(seconds), 3) AS mean_seconds,
           count(*) FILTER (WHERE visit = 1) AS first_picks
    FROM timed GROUP BY screen ORDER BY visits DESC, screen;
SELECT * FROM sessions_per_day;
SELECT * FROM events_per_action;
SELECT * FROM screens;
"""


BUNDLE_README = """\
# Microticks research bundle

Written by Microticks __VERSION__ on __WRITTEN__ (UTC) from `__DATABASE__`.
Sessions selected: __SELECTION__. __SESSIONS__ sessions, __EVENTS__ events.

Touch-table or kiosk analytics: a session starts on a visitor's first touch
and ends when the kiosk stops it, after its idle timeout (`stop_reason`
`client`), or when the server closes it after `__TIMEOUT__` seconds without an
event (`timeout`). Each event has an action (`click`, `swipe`, `pageChange`,
`stopSession`, ...) and a JSON `data` object; the screen is its data key
`__DATA_KEY__`.

## Files

| File | What |
| --- | --- |
| `events.ndjson`, `events.csv` | every event of the selected sessions, one a line / row |
| `sessions.ndjson`, `sessions.csv` | the sessions, each with its path |
| `stats.json` | the figures of `GET /stats` for the same sessions, in time zone `__TZ__`, with the path figures (`paths=3`) |
| `bundle.json` | what wrote it: `format` (of the bundle: __BUNDLE_FORMAT__), `microticks` (its version), `written`, `site`, the `selection` and the counts; `import` reads a bundle folder, and refuses one of a newer format |
| `annotations.ndjson` | what happened at the kiosks in the selected range (new content, a kiosk moved): `id`, `time` (as given), `time_utc`, `text`, `consumer_id` and `consumer` (empty: every consumer), `site`, `created_at` |
| `analysis.sql` | the headline figures again, from the NDJSON files, with DuckDB: `duckdb < analysis.sql` in this folder (the command comes with `pip install duckdb-cli`) |
| `screens/` | the screens' images, which heatmaps are drawn over; `bundle.json`'s `screens` names the screen of each file |

CSV: UTF-8 with a byte order mark, a header row, text quoted; a text cell
starting with `=`, `+`, `-`, `@`, a tab or a carriage return has a leading
`'` (so that a spreadsheet shows it, not runs it); the NDJSON files have the
text exactly as sent.

## Events

| Field | Type | Meaning |
| --- | --- | --- |
| `id` | integer | the event's id (ascending in the order events were stored) |
| `session_id` | integer | its session |
| `time` | text | the client's time, exactly as the kiosk sent it (ISO 8601) |
| `time_utc` | text | the client's time in UTC, `YYYY-MM-DDTHH:MM:SS.mmmZ`, corrected for the kiosk's clock when it sent `sent_at` |
| `received_at` | text | the server's time (UTC) when the event arrived |
| `action` | text | what happened |
| `data` | JSON | the event's data as the kiosk sent it (CSV: JSON text) |
| `ip` | text | the kiosk's address as kept (by default its /24 or /48 network) |
| `consumer_id`, `consumer` | integer, text | the frontend (kiosk app) that sent it |
| `uuid`, `seq`, `boot` | text, integer, text | the tracker's event id, number in its session, and page load |
| `site`, `source_id` | text, integer | the site it was collected at (MICROTICKS_SITE there), and its id there when it was imported from another site |

## Sessions

| Field | Type | Meaning |
| --- | --- | --- |
| `id` | integer | the session's id |
| `consumer_id`, `consumer`, `ip`, `device` | | who sent it |
| `started_at`, `stopped_at` | text | the client's times as sent |
| `started_utc`, `stopped_utc` | text | the same in UTC, corrected for the kiosk's clock |
| `received_at` | text | when the server saw it start (UTC) |
| `stop_reason` | text | `client` (the kiosk stopped it), `timeout` (the server did), `import`, or empty while open |
| `duration` | seconds | from the start to the stop (to the last event while open) |
| `events`, `clicks`, `touches`, `page_changes` | integers | its events; `click` events; `click` and `swipe` events; `pageChange` events |
| `actions` | JSON object | events per action |
| `screens` | integer | distinct screens visited |
| `path` | JSON array | __PATH__ |
| `last_action`, `last_event_at`, `missing_events`, `uuid` | | its last event's action and time; tracker numbers that never arrived; the tracker's session id |
| `site`, `source_id` | text, integer | the site it was collected at, and its id there when it was imported from another site |

## Figures (`stats.json`)

Days, hours and weekdays are in time zone `__TZ__`.

- __VALUES__
- __PATHS__
- __ENGAGEMENT__
"""


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
                    try:
                        self._app = make_app(load_settings(environ),
                                             environ.get("PATH_INFO", "") if running_as_cgi() else None)
                    except MicroticksError as refusal:  # every request is told what the operator must mend
                        log.error("cannot serve: %s", refusal.message)
                        self._app = self.refusing(refusal)
                    if not running_as_cgi():  # a CGI process answers one request: 7 ms saved
                        settle_for_serving()  # a gunicorn worker or mod_wsgi process serves from here on
        return self._app(environ, start_response)

    @staticmethod
    def refusing(refusal):
        body = error_json(refusal.status_code, refusal.message).encode()

        def answer(environ, start_response):
            start_response(refusal.status_line, [("Content-Type", "application/json"),
                                                 ("Content-Length", str(len(body))), *FIXED_HEADERS.items()])
            return [body]
        return answer


#: For gunicorn (microticks:application), mod_wsgi and any WSGI server.
application = DeferredApplication()


def discard_unread_body(stream, length):
    """Read to its end what a CGI request's body (`length` bytes) has left
    unread: Apache gives up on a script that stopped reading before it sent
    all of the body, and the answer already written (a 413 for a body too
    large) would reach nobody."""
    left = content_length(length) or 0
    while left > 0:
        chunk = stream.read(min(left, 65536))
        if not chunk:  # the app read the rest
            return
        left -= len(chunk)


def main(argv=None):
    if argv is None and running_as_cgi():
        # Under CGI, stdout is the response: nothing may print on this path.
        bottle.CGIServer().run(application)
        discard_unread_body(sys.stdin.buffer, os.environ.get("CONTENT_LENGTH"))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # what there is to do, a line each
        parser.print_help()
        return 0
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "server", "threads", "cpus", "trusted_proxies",
                                                    "proxy_header")}
    settings = load_settings(db_path=getattr(args, "db", None), **overrides)
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
    serve_as_imported_module()
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader stopped early (`microticks.py export | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(141)  # what a shell reports for SIGPIPE
