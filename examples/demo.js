// The demo page's touch table and its tracker settings (examples/index.html).
"use strict";
// A touch table of prize winners by year, each with documents to page through.
const YEARS = {
  "2017": ["Meyer_award_news.pdf", "Meyer_Noiselets.pdf"],
  "2016": ["Wiles_ModularEllipticCurves.pdf", "Diamond_FirstCourseModularForms.pdf"],
  "2015": ["Nash_EquilibriumPoints.pdf"],
  "2014": ["Sinai_TheoryOfProbability.pdf"],
};
let screen = "main", page = 0, tracker = null;
const view = document.getElementById("view");

function tile(label, note, marker, onTouch) {
  const button = document.createElement("button");
  button.className = "tile";
  button.dataset.microticks = marker;
  button.textContent = label;
  const small = document.createElement("small");
  small.textContent = note;
  button.appendChild(small);
  // After the tracker's own click listener (capture phase) saw the old screen.
  button.addEventListener("click", onTouch);
  return button;
}

function show(next) {
  screen = next;
  view.replaceChildren();
  const [kind, name] = next.split(":");
  document.getElementById("title").textContent = kind === "main" ? "Prize winners" : name;
  document.getElementById("crumb").textContent = kind === "main" ? "Touch a year to begin" : "Touch Back to return";
  if (kind === "main") {
    const tiles = document.createElement("div");
    tiles.className = "tiles";
    for (const year of Object.keys(YEARS)) {
      tiles.appendChild(tile(year, YEARS[year].length + (YEARS[year].length === 1 ? " document" : " documents"), "year:" + year, () => show("year:" + year)));
    }
    view.appendChild(tiles);
    return;
  }
  const controls = document.createElement("div");
  controls.className = "controls";
  const back = document.createElement("button");
  back.textContent = "Back";
  back.dataset.microticks = "back";
  back.addEventListener("click", () => show(kind === "ebook" ? "year:" + findYear(name) : "main"));
  controls.appendChild(back);
  if (kind === "year") {
    const tiles = document.createElement("div");
    tiles.className = "tiles";
    for (const doc of YEARS[name]) {
      tiles.appendChild(tile(doc.replace(".pdf", "").replace("_", ": "), "Read", "ebook:" + doc, () => show("ebook:" + doc)));
    }
    view.append(tiles, controls);
  } else {
    page = 1;
    const sheet = document.createElement("div");
    sheet.className = "page";
    sheet.id = "page";
    sheet.textContent = "Page 1 of " + name;
    const next = document.createElement("button");
    next.textContent = "Next page";
    next.id = "next-page";
    next.dataset.microticks = "next-page";
    next.addEventListener("click", () => {
      page += 1;
      sheet.textContent = "Page " + page + " of " + name;
      if (tracker) tracker.track("pageChange", {subject: screen, currentPage: page, prevPage: page - 1});
    });
    controls.appendChild(next);
    view.append(sheet, controls);
  }
}

function findYear(doc) { return Object.keys(YEARS).find((y) => YEARS[y].includes(doc)); }

function status(text) { document.getElementById("status").textContent = text; }

function logSent(path, payload, answer) {
  const item = document.createElement("li");
  const what = payload.events ? payload.events.length + " event(s): " + payload.events.map((e) => e.action).join(", ") : "";
  item.textContent = "POST " + path + " " + what + " → " + JSON.stringify(answer).slice(0, 120);
  const list = document.getElementById("sent");
  list.prepend(item);
  while (list.children.length > 50) list.lastChild.remove();
  // onSend runs before the tracker drops what the server answered for: count after that.
  setTimeout(() => status("Tracking. Waiting to send: " + tracker.pending()));
}

function logFailed(error, retryInMs) {
  status("Send failed (" + (error && error.message || error) + "); trying again in " +
         Math.round(retryInMs / 1000) + " s. Waiting to send: " + tracker.pending());
}

function start(settings) {
  if (tracker) tracker.destroy();
  localStorage.setItem("microticks-demo", JSON.stringify(settings));
  tracker = Microticks.start({
    host: settings.host, consumerKey: settings.consumerKey, apiKey: settings.apiKey || undefined,
    idleTimeout: settings.idle * 1000, autoTrack: document.querySelector("main"), screen: () => screen, device: "demo-table",
    appVersion: "demo-1", flushInterval: Number(settings.flush) || 1000, debug: true, onSend: logSent, onError: logFailed,
  });
  window.tracker = tracker;
  status("Tracking. Waiting to send: " + tracker.pending());
}

// Settings: from the URL (?consumerKey=...&host=...), else as saved, else the form.
const form = document.getElementById("settings");
const saved = JSON.parse(localStorage.getItem("microticks-demo") || "{}");
const fromUrl = Object.fromEntries(new URLSearchParams(location.search));
const settings = Object.assign({host: location.protocol.startsWith("http") ? location.origin : "http://127.0.0.1:8080", idle: 120}, saved, fromUrl);
for (const name of ["consumerKey", "apiKey", "host"]) form.elements[name].value = settings[name] || "";
form.elements.idle.value = settings.idle;
form.addEventListener("submit", (event) => {
  event.preventDefault();
  start({consumerKey: form.elements.consumerKey.value.trim(), apiKey: form.elements.apiKey.value.trim(),
         host: form.elements.host.value.trim(), idle: Number(form.elements.idle.value) || 120, flush: settings.flush});
});
document.getElementById("stop").addEventListener("click", () => tracker && tracker.stop());
show("main");
if (settings.consumerKey) start(settings);
