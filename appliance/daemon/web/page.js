// Live camera page: polls the daemon's JSON once a second and updates the page in place.
// Plain script, no libraries (the plant network is offline); text goes in with textContent only.
"use strict";

(function () {
  const POLL_MS = 1000;
  const TIMEOUT_MS = 3000;
  const LOST_MS = 4000; // no answer for this long: say so, and stop showing a verdict that may be stale
  const SVG = "http://www.w3.org/2000/svg";

  const body = document.body;
  const camera = body.dataset.camera;
  const history = Math.max(1, parseInt(body.dataset.history, 10) || 300);
  const camApi = "../api/cameras/" + encodeURIComponent(camera) + "/";
  const $ = (id) => document.getElementById(id);

  const opened = Date.now();
  let lastAnswer = 0;
  let imageKey = null;
  let shownImage = null; // what the image on screen shows: latest_image as /recent named it when it loaded
  let lastShown = null; // the result whose verdict is on screen

  function text(id, value) {
    const el = $(id);
    if (el.textContent !== value) el.textContent = value;
  }

  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function fmt(v, digits) { return isNum(v) ? v.toFixed(digits) : "\u2014"; }
  function obj(v) { return v && typeof v === "object" ? v : {}; }

  function clockTime(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
  }

  function ago(seconds) {
    const s = Math.max(0, Date.now() / 1000 - seconds);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  // Colour class for a state word whose vocabulary belongs to the daemon: known good and bad words, else amber.
  function stateClass(state) {
    if (typeof state !== "string" || !state) return "s-unknown";
    const s = state.toLowerCase();
    if (/^(ok|running|connected|up|ready|serving|listening|idle|healthy|sent)$/.test(s)) return "s-good";
    if (/(fail|error|down|dead|disconnect|stopped|closed|unhealthy)/.test(s)) return "s-bad";
    return "s-warn";
  }

  async function getJson(url) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    try {
      const res = await fetch(url, { cache: "no-store", signal: ctl.signal });
      if (!res.ok) throw new Error(url + ": HTTP " + res.status);
      return await res.json();
    } finally {
      clearTimeout(timer);
    }
  }

  // ---------------------------------------------------------------- rendering

  function renderVerdict(last) {
    const box = $("verdict");
    if (!last) {
      box.className = "verdict v-none";
      text("verdict-text", "NO RESULT");
      text("verdict-meta", "waiting for the first inspection");
      $("error").hidden = true;
      return;
    }
    const v = ["ok", "ng", "error"].includes(last.verdict) ? last.verdict : "none";
    box.className = "verdict v-" + v;
    text("verdict-text", v === "none" ? "?" : v.toUpperCase());
    const meta = ["#" + last.seq];
    if (isNum(last.time)) meta.push(clockTime(last.time), ago(last.time));
    if (last.trigger_id) meta.push("trigger " + last.trigger_id);
    text("verdict-meta", meta.join(" \u00b7 "));
    const err = $("error");
    err.hidden = !last.error;
    if (last.error) { err.textContent = last.error; err.title = last.error; }
  }

  function renderScore(last, cam) {
    const thr = obj(cam.threshold);
    const threshold = last && isNum(last.threshold) ? last.threshold : thr.value;
    const source = last && last.threshold_source ? last.threshold_source : thr.source;
    const score = last ? last.score : null;
    text("score", fmt(score, 3));
    text("threshold", fmt(threshold, 3));
    text("threshold-source", source ? "from " + source : "");
    const scale = Math.max(1, isNum(score) ? score : 0);
    const fill = $("gauge-fill");
    fill.style.width = (isNum(score) ? Math.min(100, (100 * score) / scale) : 0) + "%";
    fill.classList.toggle("over", isNum(score) && isNum(threshold) && score >= threshold);
    const mark = $("gauge-mark");
    mark.hidden = !isNum(threshold);
    if (isNum(threshold)) mark.style.left = Math.min(100, (100 * threshold) / scale) + "%";
  }

  function renderCounts(cam, recent) {
    // The daemon's counts cover every frame; the page's own tally misses records its output queue dropped.
    const counts = Object.keys(obj(cam.counts)).length ? obj(cam.counts) : obj(recent.counts);
    for (const k of ["ok", "ng", "error"]) text("count-" + k, isNum(counts[k]) ? counts[k].toLocaleString("en-US") : "0");
  }

  function renderStatus(status, cam, last) {
    const state = $("state");
    const word = typeof cam.state === "string" ? cam.state : "unknown";
    state.className = "pill " + stateClass(cam.state);
    text("state", word);
    text("fps", isNum(cam.fps) ? cam.fps.toFixed(1) + " fps" : "\u2014");
    const lat = obj(cam.latency_ms);
    text("latency", isNum(lat.p50) || isNum(lat.p99) ? fmt(lat.p50, 1) + " / " + fmt(lat.p99, 1) + " ms" : "\u2014");
    const q = isNum(cam.queue_depth) ? String(cam.queue_depth) : "\u2014";
    text("queue", q + " / " + (isNum(cam.drops) ? String(cam.drops) : "\u2014"));
    const model = obj(cam.bundle).model_id || (last && last.model_id) || "\u2014";
    text("model", String(model));
    $("model").title = String(model);
    renderOutputs(obj(status.outputs));
  }

  function renderOutputs(outputs) {
    const list = $("outputs");
    const names = Object.keys(outputs).sort();
    const items = names.map((name) => {
      const o = obj(outputs[name]);
      const li = document.createElement("li");
      li.className = stateClass(o.state);
      const dot = document.createElement("span");
      dot.className = "dot";
      const label = document.createElement("span");
      label.className = "oname";
      label.textContent = name;
      const st = document.createElement("span");
      st.className = "ostate";
      let word = typeof o.state === "string" ? o.state : "unknown";
      if (isNum(o.backlog) && o.backlog > 0) word += " \u00b7 " + o.backlog + " queued";
      st.textContent = word;
      li.title = name + ": " + word;
      li.append(dot, label, st);
      return li;
    });
    list.replaceChildren(...items);
    list.hidden = items.length === 0;
  }

  // The image beside the verdict must be that inspection's. The overlay output may not have drawn it
  // (OK overlays are rate-limited, a busy device draws only the newest of a burst): then the image shown
  // is another inspection's, and it is dimmed, striped and captioned as such, never passed off as current.
  function renderImage(recent, last) {
    const info = recent.latest_image;
    const img = $("overlay");
    if (!info || typeof info.url !== "string") {
      img.hidden = true;
      $("noimage").hidden = false;
      imageKey = null;
      shownImage = null;
    } else {
      const key = camApi + info.url.split("/").pop(); // latest.png?id=<the inspection it shows>
      if (key !== imageKey) {
        imageKey = key;
        const next = new Image(); // load off-screen first, so the panel never flashes an empty frame
        next.onload = () => {
          if (imageKey !== key) return;
          img.src = next.src;
          img.hidden = false;
          $("noimage").hidden = true;
          shownImage = info;
          renderStale(lastShown);
        };
        next.onerror = () => { if (imageKey === key) imageKey = null; }; // gone already: ask again next poll
        next.src = key;
      }
    }
    lastShown = last;
    renderStale(last);
  }

  function renderStale(last) {
    const view = $("view");
    const shown = shownImage;
    if (!shown) {
      view.classList.remove("stale");
      text("imgcaption", "");
      return;
    }
    const stale = !!last && shown.inspection_id !== last.id;
    view.classList.toggle("stale", stale);
    const which = isNum(shown.seq) ? "#" + shown.seq : "an unknown inspection";
    const word = typeof shown.verdict === "string" ? " (" + shown.verdict.toUpperCase() + ")" : "";
    if (!stale) {
      text("imgcaption", "image " + which + (isNum(shown.captured_at) ? " \u00b7 " + clockTime(shown.captured_at) : ""));
      return;
    }
    let when = "";
    const at = isNum(last.captured_at) ? last.captured_at : last.time;
    if (isNum(shown.captured_at) && isNum(at)) {
      const dt = at - shown.captured_at;
      when = ", " + span(Math.abs(dt)) + (dt >= 0 ? " before" : " after") + " this verdict";
    }
    text("imgcaption", "image of " + which + word + when);
  }

  function span(seconds) {
    if (seconds < 10) return seconds.toFixed(1) + " s";
    if (seconds < 120) return Math.round(seconds) + " s";
    if (seconds < 7200) return (seconds / 60).toFixed(1) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  // A daemon alarm (a disk below its floor, ...) needs a person: a red banner over everything.
  function renderAlarms(daemon) {
    const box = $("alarms");
    const alarms = Array.isArray(daemon.alarms) ? daemon.alarms : [];
    const rows = alarms.map((a) => {
      const row = document.createElement("div");
      row.className = "alarm";
      row.setAttribute("role", "alert");
      const title = document.createElement("b");
      title.textContent = String(a.kind || "alarm").replace(/_/g, " ").toUpperCase();
      const detail = document.createElement("span");
      detail.textContent = " " + String(a.detail || "");
      row.append(title, detail);
      return row;
    });
    box.replaceChildren(...rows);
    box.hidden = rows.length === 0;
  }

  // READY is what a PLC may act on (the daemon's flag); NOT READY says why.
  function renderReady(ready) {
    const r = obj(ready);
    const ok = r.ready === true;
    const pill = $("ready");
    pill.className = "pill " + (ok ? "s-good" : r.ready === false ? "s-bad" : "s-unknown");
    text("ready", ok ? "READY" : r.ready === false ? "NOT READY" : "\u2026");
    const why = Array.isArray(r.why) ? r.why.join("; ") : "";
    pill.title = why;
    const line = $("ready-why");
    line.hidden = ok || !why;
    text("ready-why", why ? "Not ready: " + why : "");
  }

  // Score trend: one point per inspection (newest right), the threshold in force as a dashed step line.
  function renderTrend(items) {
    const svg = $("trend-svg");
    const w = Math.max(50, svg.clientWidth);
    const h = Math.max(30, svg.clientHeight);
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    const nodes = [];
    const add = (tag, attrs, content) => {
      const el = document.createElementNS(SVG, tag);
      for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
      if (content !== undefined) el.textContent = content;
      nodes.push(el);
      return el;
    };
    const top = 6, bottom = h - 6, left = 34, right = w - 8;
    const scores = items.map((i) => i.score).filter(isNum);
    const ymax = Math.max(1, ...scores);
    const y = (v) => bottom - ((bottom - top) * Math.min(v, ymax)) / ymax;
    const n = Math.max(items.length, 2);
    const x = (i) => left + ((right - left) * (i + (n - items.length))) / (n - 1);
    for (const v of [0, 0.5, 1]) {
      add("line", { class: "grid-line", x1: left, x2: right, y1: y(v), y2: y(v) });
      add("text", { class: "axis-label", x: 4, y: y(v) + 4 }, v.toFixed(1));
    }
    let thr = "", series = "";
    items.forEach((it, i) => {
      if (isNum(it.threshold)) thr += (thr ? " L" : "M") + x(i).toFixed(1) + " " + y(it.threshold).toFixed(1);
      if (isNum(it.score)) series += (series ? " L" : "M") + x(i).toFixed(1) + " " + y(it.score).toFixed(1);
    });
    if (thr && items.length === 1) thr += " L" + right + " " + y(items[0].threshold).toFixed(1);
    if (thr) add("path", { class: "thr", d: thr });
    if (series) add("path", { class: "series", d: series });
    const r = items.length > 120 ? 2.5 : 3.5;
    items.forEach((it, i) => {
      if (it.verdict === "ng" && isNum(it.score)) add("circle", { class: "pt-ng", cx: x(i), cy: y(it.score), r: r + 0.5 });
      if (it.verdict === "error") add("rect", { class: "pt-error", x: x(i) - r, y: bottom - 2 * r, width: 2 * r, height: 2 * r });
    });
    const last = items[items.length - 1];
    if (last && isNum(last.score)) {
      add("circle", { class: "pt-last pt-" + last.verdict, cx: x(items.length - 1), cy: y(last.score), r: r + 1.5 });
    }
    svg.replaceChildren(...nodes);
    const ng = items.filter((i) => i.verdict === "ng").length;
    text("trend-info", items.length ? "last " + items.length + " inspections \u00b7 " + ng + " NG" : "no inspections yet");
  }

  // ---------------------------------------------------------------- drift and labels

  function renderDrift(cam) {
    const d = obj(cam.drift);
    const el = $("drift");
    el.hidden = !d.state || d.state === "off";
    if (el.hidden) return;
    el.className = "pill " + (d.state === "drift" ? "s-bad" : d.state === "ok" ? "s-good" : "s-warn");
    const last = obj(d.last);
    text("drift", d.state === "drift" ? "DRIFT" : "drift " + d.state.replace("_", " "));
    el.title = isNum(last.p_value) ? "last window: " + last.size + " frames, p " + last.p_value.toPrecision(2) : "";
  }

  // Labelling is a write: the page asks for an operator token once (kept for this tab only) and sends it with
  // each label; without one the buttons stay hidden and the page is read-only.
  const TOKEN_KEY = "appliance-label-token";
  let shown = null; // the inspection the verdict box shows
  let labelled = {}; // inspection id -> label id, from this page's own labels

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  function renderLabelling(last) {
    shown = last;
    const signed = !!token();
    const can = signed && last && last.verdict !== "error";
    $("sign-in").textContent = signed ? "Sign out" : "Sign in to label";
    $("label-good").hidden = !can || last.verdict !== "ng";
    $("label-defect").hidden = !can || last.verdict === "ng";
    $("label-undo").hidden = !signed || !last || !labelled[last.id];
  }

  async function post(url, payload) {
    const res = await fetch(url, {
      method: "POST", cache: "no-store",
      headers: { "Content-Type": "application/json", Authorization: "Bearer " + token() },
      body: JSON.stringify(payload || {}),
    });
    const answer = await res.json().catch(() => ({}));
    if (res.status === 401) sessionStorage.removeItem(TOKEN_KEY);
    if (!res.ok) throw new Error(answer.error || "HTTP " + res.status);
    return answer;
  }

  async function label(kind) {
    if (!shown) return;
    const id = shown.id;
    text("label-result", "labelling…");
    try {
      const r = await post("../api/inspections/" + encodeURIComponent(id) + "/label", { label: kind });
      labelled[id] = r.label_id;
      const learned = obj(r.learned);
      text("label-result", "#" + shown.seq + " labelled " + kind + (isNum(learned.rows)
        ? ": learned " + learned.rows + " patches (score " + fmt(learned.score_before, 3) + " → "
          + fmt(learned.score_after, 3) + ")" : r.note ? ": " + r.note : ""));
    } catch (err) {
      text("label-result", "not labelled: " + err.message);
    }
    renderLabelling(shown);
  }

  async function undo() {
    if (!shown || !labelled[shown.id]) return;
    try {
      await post("../api/labels/" + encodeURIComponent(labelled[shown.id]) + "/undo");
      delete labelled[shown.id];
      text("label-result", "label undone");
    } catch (err) {
      text("label-result", "not undone: " + err.message);
    }
    renderLabelling(shown);
  }

  $("label-good").addEventListener("click", () => label("good"));
  $("label-defect").addEventListener("click", () => label("defect"));
  $("label-undo").addEventListener("click", undo);
  $("sign-in").addEventListener("click", () => {
    if (token()) sessionStorage.removeItem(TOKEN_KEY);
    else {
      const given = window.prompt("Operator token (from the appliance's http output, label_tokens)");
      if (given) sessionStorage.setItem(TOKEN_KEY, given.trim());
    }
    renderLabelling(shown);
  });

  function render(status, recent) {
    const cam = obj(obj(status.cameras)[camera]);
    const items = Array.isArray(recent.items) ? recent.items : [];
    const last = items.length ? items[items.length - 1] : null;
    renderDrift(cam);
    renderLabelling(last);
    renderVerdict(last);
    renderScore(last, cam);
    renderCounts(cam, recent);
    renderStatus(status, cam, last);
    renderImage(recent, last);
    renderAlarms(obj(status.daemon));
    renderReady(recent.ready);
    renderTrend(items);
  }

  function renderConnection() {
    const lost = Date.now() - Math.max(lastAnswer, opened) > LOST_MS;
    body.classList.toggle("is-lost", lost);
    $("lost").hidden = !lost;
    const conn = $("conn");
    conn.className = "conn" + (lost ? " s-bad" : lastAnswer ? " s-good" : "");
    if (lost) conn.textContent = lastAnswer ? "no data since " + clockTime(lastAnswer / 1000) : "no data";
    else conn.textContent = lastAnswer ? "live" : "connecting\u2026";
    text("clock", new Date().toLocaleTimeString([], { hour12: false }));
  }

  async function poll() {
    try {
      const [status, recent] = await Promise.all([
        getJson("../api/status"),
        getJson(camApi + "recent?n=" + history),
      ]);
      lastAnswer = Date.now();
      render(obj(status), obj(recent));
    } catch (err) {
      console.warn("poll failed:", err);
    }
    renderConnection();
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
