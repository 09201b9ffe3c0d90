/*
 * Microticks browser tracker: analytics for kiosk and touch-table apps.
 * No dependencies, no build step. Include it and start it:
 *
 *   <script src="microticks.js"></script>
 *   <script>
 *     const tracker = Microticks.start({host: "http://127.0.0.1:8080", consumerKey: "...", autoTrack: true});
 *     tracker.track("pageChange", {subject: "ebook:1", currentPage: 3});
 *   </script>
 *
 * As an ES module: import Microticks from "./microticks.mjs".
 *
 * What it does: starts a session on the first event and stops it after
 * `idleTimeout` ms without one (posting a stopSession event with reason
 * "timeout", as the first Microticks frontend did). Every event waits in a
 * queue in localStorage until the server acknowledged it, so nothing is lost
 * while the server is down or the page reloads. Events go in batches, with
 * retries and exponential backoff; each has a uuid, so a retry never stores
 * it twice. When the page is hidden or closed, the queue goes out with
 * navigator.sendBeacon as well (with the start of a session whose token has
 * not come back yet), and requests in flight (sent with keepalive) still
 * arrive: a browser may lose the last localStorage writes of a page that
 * navigates away at once, so the queue alone is not enough.
 *
 * Options (all but consumerKey optional):
 *   host             the service's URL (default: this page's origin)
 *   consumerKey      from `python microticks.py createconsumer NAME`
 *   apiKey           the service's MICROTICKS_KEY, if it has one (sent as ?key=)
 *   idleTimeout      ms without an event before the session stops (120000)
 *   autoTrack        true: every click/touch is an event "click" with its
 *                    target (data-microticks attribute, else the element's id)
 *                    and clickX/clickY in screen pixels; or an element: the
 *                    clicks inside it
 *   screen           a function returning the current screen's name, added
 *                    to every event's data as `subject`
 *   device, appVersion  reported with sessions and heartbeats
 *   heartbeatInterval   ms between heartbeats (300000; 0: none); the first
 *                    goes at start, and those that could not be sent (the
 *                    network down) are queued and sent with the next one, so
 *                    that the server can tell "off" from "offline"
 *   batchSize        events per request (100)
 *   batchBytes       bytes per request at most (500000; the server takes 1 MiB)
 *   flushInterval    ms between sends (1000)
 *   legacy           true: talk to a first-generation server (one form
 *                    POST per event, no batches, no uuids)
 *   debug            log what happens to the console
 *   dryRun           no server at all: log and pretend (the old "dummy host")
 *   storageKey       localStorage key ("microticks")
 *   onSend           called with (what, payload, answer) after every send
 *   onError          called with (error, ms until the next try) when a send
 *                    fails and will be tried again (server down, wrong key...)
 */
(function (root) {
  "use strict";

  var VERSION = "1.0.0";

  /**
   * A UUID version 7 (RFC 9562): the time in ms, then random bits. Ids made
   * one after another sort together, so the server's index of them grows at
   * its end; random ids (version 4) wrote a page of that index per event
   * and made a batch take 2.5 to 3 times as long to store.
   */
  function newId() {
    var bytes = new Uint8Array(16);
    root.crypto.getRandomValues(bytes);
    for (var i = 5, ms = Date.now(); i >= 0; i--, ms = Math.floor(ms / 256)) bytes[i] = ms % 256;
    bytes[6] = (bytes[6] & 0x0f) | 0x70;  // version 7
    bytes[8] = (bytes[8] & 0x3f) | 0x80;  // the RFC's variant
    var hex = Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
    return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20), hex.slice(20)].join("-");
  }

  function isoNow() { return new Date().toISOString(); }

  function utf8Bytes(text) { return new root.TextEncoder().encode(text).length; }

  /** The first items of `items` whose JSON fits in `budget` bytes (at least one). */
  function fitting(items, budget) {
    var taken = [], bytes = 0;
    for (var i = 0; i < items.length; i++) {
      bytes += utf8Bytes(JSON.stringify(items[i])) + 1;
      if (taken.length && bytes > budget) break;
      taken.push(items[i]);
    }
    return taken;
  }

  function Tracker(options) {
    if (!options || !options.consumerKey) throw new Error("Microticks: consumerKey is required");
    var given = {};  // an option passed as undefined keeps its default
    Object.keys(options).forEach(function (name) { if (options[name] !== undefined) given[name] = options[name]; });
    this.options = Object.assign({
      host: root.location ? root.location.origin : "",
      idleTimeout: 120000,
      heartbeatInterval: 300000,
      batchSize: 100,
      batchBytes: 500000,
      flushInterval: 1000,
      maxBackoff: 60000,
      storageKey: "microticks",
      autoTrack: false,
      legacy: false,
      debug: false,
      dryRun: false
    }, given);
    this.options.host = String(this.options.host).replace(/\/+$/, "");
    this.boot = newId();
    this.backoff = 0;
    this.nextTry = 0;
    this.sending = false;
    this.state = this.load();
    if (!this.state.device) this.state.device = this.options.device || "device-" + newId().slice(0, 8);
    if (this.options.device) this.state.device = this.options.device;
    this.closeStaleSession();
    this.save();
    this.installListeners();
    this.log("started", {boot: this.boot, queued: this.state.queue.length, session: this.state.session});
  }

  Tracker.prototype = {
    version: VERSION,

    // -- Public API ---------------------------------------------------------

    /** Record an event; starts a session if none is open. */
    track: function (action, data) {
      if (!action) throw new Error("Microticks: track() needs an action");
      var session = this.state.session || this.startSession();
      data = Object.assign({}, data || {});
      if (this.options.screen && data.subject === undefined) data.subject = this.options.screen();
      session.seq += 1;
      session.lastActivity = Date.now();
      this.enqueue({kind: "event", session: session.uuid, uuid: newId(), action: String(action),
                    data: data, ts: isoNow(), seq: session.seq, boot: this.boot});
      this.armIdleTimer();
      return this;
    },

    /** Stop the session now (reason: "stop", or what you pass). */
    stop: function (reason) {
      var session = this.state.session;
      if (!session) return this;
      this.track("stopSession", {reason: reason || "stop"});
      this.enqueue({kind: "stop", session: session.uuid, ts: isoNow()});
      this.state.session = null;
      this.save();
      clearTimeout(this.idleTimer);
      return this;
    },

    /** Send what is queued now; resolves when the queue is empty or sending failed. */
    flush: function () {
      this.nextTry = 0;
      return this.sendQueue();
    },

    /** Events and session calls still waiting for the server. */
    pending: function () { return this.state.queue.length; },

    /** Remove listeners and timers (the queue stays in localStorage). */
    destroy: function () {
      clearTimeout(this.idleTimer);
      clearInterval(this.flushTimer);
      clearInterval(this.heartbeatTimer);
      var self = this;
      this.listeners.forEach(function (l) { l[0].removeEventListener(l[1], l[2], l[3]); });
      self.listeners = [];
    },

    // -- Sessions -----------------------------------------------------------

    startSession: function () {
      var session = {uuid: newId(), seq: 0, lastActivity: Date.now()};
      this.state.session = session;
      this.enqueue({kind: "start", session: session.uuid, ts: isoNow()});
      // At once, not at the next flush: until the server's token is here,
      // a closing page cannot hand this session's events to sendBeacon.
      this.flush();
      return session;
    },

    /** A session left open by a page that closed: stop it as the idle timer would have. */
    closeStaleSession: function () {
      var session = this.state.session;
      if (!session) return;
      var idleSince = Date.now() - session.lastActivity;
      if (idleSince < this.options.idleTimeout) {
        this.armIdleTimer(this.options.idleTimeout - idleSince);
        return;
      }
      var when = new Date(session.lastActivity + this.options.idleTimeout).toISOString();
      session.seq += 1;
      this.state.queue.push({kind: "event", session: session.uuid, uuid: newId(), action: "stopSession",
                             data: {reason: "timeout"}, ts: when, seq: session.seq, boot: this.boot});
      this.state.queue.push({kind: "stop", session: session.uuid, ts: when});
      this.state.session = null;
    },

    armIdleTimer: function (delay) {
      var self = this;
      clearTimeout(this.idleTimer);
      this.idleTimer = setTimeout(function () {
        self.log("idle: stopping the session");
        self.stop("timeout");
      }, delay === undefined ? this.options.idleTimeout : delay);
    },

    // -- The queue ----------------------------------------------------------

    load: function () {
      try {
        var saved = JSON.parse(root.localStorage.getItem(this.options.storageKey) || "null");
        if (saved && Array.isArray(saved.queue)) return Object.assign({tokens: {}, beats: []}, saved);
      } catch (e) { /* unreadable: start afresh */ }
      return {queue: [], tokens: {}, session: null, beats: []};
    },

    save: function () {
      try {
        root.localStorage.setItem(this.options.storageKey, JSON.stringify(this.state));
      } catch (e) {
        this.log("cannot save the queue", e);
      }
    },

    enqueue: function (item) {
      this.state.queue.push(item);
      this.save();
      this.log("queued", item);
    },

    /** Drop the items the server answered for (kept: everything else). */
    forget: function (items) {
      var done = new Set(items);
      this.state.queue = this.state.queue.filter(function (item) { return !done.has(item); });
      this.save();
    },

    sendQueue: function () {
      var self = this;
      if (this.sending) return this.sending;
      if (Date.now() < this.nextTry || !this.state.queue.length) return Promise.resolve();
      this.sending = (function loop() {
        var item = self.state.queue[0];
        if (!item) return Promise.resolve();
        return self.sendNext(item).then(function () {
          self.backoff = 0;
          return loop();
        });
      })().catch(function (error) {
        // The server is down or busy: try again later, waiting longer each time.
        self.backoff = Math.min(self.options.maxBackoff, self.backoff ? self.backoff * 2 : 1000);
        self.nextTry = Date.now() + self.backoff;
        self.log("send failed; retrying in " + self.backoff + " ms", error && error.message);
        self.notify("onError", error, self.backoff);
      }).then(function () { self.sending = false; });
      return this.sending;
    },

    sendNext: function (item) {
      var self = this, token = this.state.tokens[item.session];
      if (item.kind === "start") {
        if (token) { this.forget([item]); return Promise.resolve(); }
        return this.post("/sessions", {consumer_key: this.options.consumerKey, ts: item.ts, uuid: item.session,
                                       device: this.state.device, app_version: this.options.appVersion,
                                       sent_at: isoNow()})
          .then(function (answer) {
            if (answer.token) self.state.tokens[item.session] = answer.token;
            else self.dropSession(item.session, answer);
            self.forget([item]);
          });
      }
      if (!token) {  // its session could not be started: nothing to attach it to
        this.dropSession(item.session, {error: "no session"});
        return Promise.resolve();
      }
      if (item.kind === "stop") {
        return this.post("/sessions/stop", {token: token, ts: item.ts, sent_at: isoNow()}).then(function () {
          self.forget([item]);
          delete self.state.tokens[item.session];
          self.save();
        });
      }
      if (this.options.legacy) {
        return this.post("/events", {token: token, action: item.action, data: JSON.stringify(item.data),
                                     ts: item.ts}).then(function () { self.forget([item]); });
      }
      var ready = [];
      for (var i = 0; i < this.state.queue.length && ready.length < (this.maxBatch || this.options.batchSize); i++) {
        var next = this.state.queue[i];
        if (next.kind !== "event" || !this.state.tokens[next.session]) break;
        ready.push(next);
      }
      // Kiosks that were offline send their backlog: a batch of large `data`
      // could exceed what the server takes in one body (refused whole, 413).
      var events = fitting(ready.map(function (e) { return self.wireEvent(e); }), this.options.batchBytes - 100);
      var batch = ready.slice(0, events.length);
      return this.post("/events", {events: events, sent_at: isoNow()})
        .then(function (answer) {
          if (answer.status === 413 && batch.length > 1) {
            // Still too large (a proxy before the server may take less): halves, nothing dropped.
            self.maxBatch = Math.ceil(batch.length / 2);
            self.log("the server refused a batch of " + batch.length + " events as too large; sending halves");
            return;
          }
          if (!answer.results) self.log("the server refused the batch; dropping its events", answer.error);
          var unknown = [];  // events of sessions the server no longer knows
          (answer.results || []).forEach(function (result, n) {
            if (result.status === 404 && !batch[n].restarted) unknown.push(batch[n]);
            else if (result.error) self.log("the server refused an event", batch[n], result.error);
          });
          self.forget(batch.filter(function (item) { return unknown.indexOf(item) < 0; }));
          if (unknown.length) self.restartSessions(unknown);
        });
    },

    /**
     * The server answered "Could not find session" (its database was
     * restored from a backup or replaced): start those sessions again, by
     * the same uuid, ahead of their events, which wait for the new token.
     * Once: an event refused so again is dropped.
     */
    restartSessions: function (items) {
      var self = this, starts = [];
      items.forEach(function (item) {
        item.restarted = true;
        if (!self.state.tokens[item.session]) return;  // its session's start is queued already
        delete self.state.tokens[item.session];
        starts.push({kind: "start", session: item.session, ts: item.ts});
      });
      this.state.queue = starts.concat(this.state.queue);
      this.save();
      this.log("the server does not know " + starts.length + " session(s); starting them again");
    },

    wireEvent: function (item) {
      var token = this.state.tokens[item.session];
      return {token: token, session: token ? undefined : item.session, action: item.action, data: item.data,
              ts: item.ts, uuid: item.uuid, seq: item.seq, boot: item.boot};
    },

    dropSession: function (sessionUuid, answer) {
      this.log("the server refused the session; dropping its events", answer);
      this.state.queue = this.state.queue.filter(function (item) { return item.session !== sessionUuid; });
      if (this.state.session && this.state.session.uuid === sessionUuid) this.state.session = null;
      this.save();
    },

    // -- HTTP ---------------------------------------------------------------

    url: function (path) {
      var key = this.options.apiKey ? "?key=" + encodeURIComponent(this.options.apiKey) : "";
      return this.options.host + path + key;
    },

    /**
     * POST and resolve with the JSON answer. A refusal (4xx) resolves too,
     * with {error}: retrying would not help. Network errors, 408 (a request
     * that did not arrive whole in time), 429 and 5xx reject, so the item
     * stays queued for a retry; so do a wrong API key
     * (401, a changed MICROTICKS_KEY) and a wrong address (404 for the call
     * itself, a `host` without the service's path): the operator's to fix,
     * and the events wait for it instead of being dropped.
     */
    post: function (path, payload) {
      var self = this, options = this.options;
      if (options.dryRun) {
        var answer = path === "/sessions" ? {token: "dry-" + newId()} :
          payload.events ? {results: payload.events.map(function () { return {event_id: 0}; })} : {};
        this.log("dry run: POST " + path, payload);
        this.notify("onSend", path, payload, answer);
        return Promise.resolve(answer);
      }
      var init = {method: "POST", mode: "cors", cache: "no-store"};
      if (options.legacy) {
        var form = new URLSearchParams();
        Object.keys(payload).forEach(function (k) {
          if (payload[k] !== undefined && payload[k] !== null && k !== "uuid" && k !== "sent_at" &&
              k !== "device" && k !== "app_version") form.append(k, payload[k]);
        });
        if (path === "/sessions") form.append("token", "");
        init.body = form;
      } else {
        // text/plain: a "simple" request, no CORS preflight; the server reads it as JSON.
        init.headers = {"Content-Type": "text/plain;charset=UTF-8"};
        init.body = JSON.stringify(payload);
      }
      // keepalive: a request in flight when the page closes (a kiosk app that
      // navigates on a touch) still arrives. Browsers allow it up to 64 KB.
      init.keepalive = new Blob([String(init.body)]).size <= 60000;
      return root.fetch(this.url(path), init).then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (answer) {
          // A first-generation server answers an unknown session with a 404
          // for the whole call, as does ours for a stop: those are refusals.
          var misaddressed = response.status === 404 && !options.legacy && path !== "/sessions/stop";
          var retry = response.status === 408 || response.status === 429 || response.status >= 500;
          if (response.status === 401 || misaddressed || retry) {
            throw new Error("HTTP " + response.status + ": " + (answer.error || ""));
          }
          if (!response.ok) answer = {error: answer.error || "HTTP " + response.status, status: response.status};
          self.log("POST " + path + " -> " + response.status, answer);
          self.notify("onSend", path, payload, answer);
          return answer;
        });
      });
    },

    /** The page is going away: hand what we can to sendBeacon. */
    beacon: function () {
      if (this.options.dryRun || this.options.legacy || !root.navigator || !root.navigator.sendBeacon) return;
      var self = this, tokens = this.state.tokens;
      // Sessions whose token has not come back yet go along, started by the
      // same request (10 at most, the server's limit): their events name them by uuid.
      var starts = this.state.queue.filter(function (item) {
        return item.kind === "start" && !tokens[item.session];
      }).slice(0, 10);
      var started = {};
      starts.forEach(function (item) { started[item.session] = true; });
      // Browsers take about 64 KB of beacons at a time; what does not fit waits for the next page load.
      var events = fitting(this.state.queue.filter(function (item) {
        return item.kind === "event" && (tokens[item.session] || started[item.session]);
      }).slice(0, 1000).map(function (e) { return self.wireEvent(e); }), 60000);
      if (!events.length) return;
      // Kept in the queue all the same: the next page load sends them again,
      // and their uuids make the server answer "duplicate" instead of storing twice.
      var body = JSON.stringify({
        sessions: starts.map(function (item) {
          return {uuid: item.session, consumer_key: self.options.consumerKey, ts: item.ts,
                  device: self.state.device, app_version: self.options.appVersion};
        }),
        events: events, sent_at: isoNow()});
      root.navigator.sendBeacon(this.url("/events"), new Blob([body], {type: "text/plain;charset=UTF-8"}));
      this.log("beacon with " + events.length + " events");
    },

    /** Say the kiosk is on: this heartbeat, and those queued while the server
     * could not be reached (a week's worth at most: the server takes 2,016). */
    heartbeat: function () {
      if (this.options.legacy) return Promise.resolve();
      var self = this, beats = (this.state.beats || []).concat(isoNow()).slice(-2016);
      this.state.beats = beats;
      this.save();
      var interval = Math.min(86400, Math.max(10, Math.round(this.options.heartbeatInterval / 1000)));
      return this.post("/heartbeat", {consumer_key: this.options.consumerKey, device: this.state.device,
                                      app_version: this.options.appVersion, queue: this.state.queue.length,
                                      beats: beats, interval: interval, sent_at: isoNow()})
        .then(function () {  // stored, or refused (retrying would not help): not sent again
          var sent = new Set(beats);
          self.state.beats = self.state.beats.filter(function (beat) { return !sent.has(beat); });
          self.save();
        })
        .catch(function () { /* kept: they go with the next one */ });
    },

    // -- Listeners ----------------------------------------------------------

    installListeners: function () {
      var self = this, doc = root.document;
      this.listeners = [];
      function listen(target, type, fn, capture) {
        target.addEventListener(type, fn, capture);
        self.listeners.push([target, type, fn, capture]);
      }
      if (this.options.autoTrack && doc) {
        listen(this.options.autoTrack === true ? doc : this.options.autoTrack, "click", function (event) {
          var element = event.target && event.target.closest ? event.target : null;
          var marked = element && element.closest("[data-microticks]");
          var target = marked ? marked.getAttribute("data-microticks") : element && element.id || null;
          self.track("click", {target: target, clickX: Math.round(event.screenX), clickY: Math.round(event.screenY)});
        }, true);
      }
      if (doc) {
        listen(doc, "visibilitychange", function () { if (doc.visibilityState === "hidden") self.beacon(); });
      }
      listen(root, "pagehide", function () { self.beacon(); });
      listen(root, "online", function () { self.flush(); });
      this.flushTimer = setInterval(function () { self.sendQueue(); }, this.options.flushInterval);
      if (this.options.heartbeatInterval) {
        this.heartbeatTimer = setInterval(function () { self.heartbeat(); }, this.options.heartbeatInterval);
        self.heartbeat();
      }
    },

    /** Call the page's callback `name` (onSend, onError): a bug in it must
     * neither stop the sending nor make it send what was stored again. */
    notify: function (name) {
      if (!this.options[name]) return;
      try {
        this.options[name].apply(null, Array.prototype.slice.call(arguments, 1));
      } catch (failure) {
        this.log(name + " threw", failure && failure.message);
      }
    },

    log: function () {
      if (this.options.debug && root.console) {
        root.console.log.apply(root.console, ["[microticks]"].concat(Array.prototype.slice.call(arguments)));
      }
    }
  };

  var Microticks = {
    version: VERSION,
    Tracker: Tracker,
    /** Create a tracker and start sending. */
    start: function (options) { return new Tracker(options); }
  };
  root.Microticks = Microticks;
})(typeof globalThis !== "undefined" ? globalThis : window);
