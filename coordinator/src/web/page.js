// The sweep page's script: polls the JSON behind the page (`data-api` on <body>) every 2 s and
// redraws the tables from it. Data is always set as text (textContent); the only markup inserted
// is the server's SVG figures (plotters' output, its text XML-escaped), and only when the sweep's
// `results_key` changed. No framework, no build step.
"use strict";

(function () {
  const body = document.body;
  const api = body.dataset.api;
  if (!api) return;
  const view = body.dataset.view;
  let key = body.dataset.key || "";
  let polls = 0;

  // An element with attributes and children (strings become text nodes).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function duration(s) {
    if (s === null || s === undefined || !isFinite(s) || s < 0) return "–";
    s = Math.round(s);
    const two = (n) => String(n).padStart(2, "0");
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + two(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + two(Math.floor((s % 3600) / 60)) + "m";
    return Math.floor(s / 86400) + "d " + two(Math.floor((s % 86400) / 3600)) + "h";
  }
  const ago = (now, t) => duration(Math.max(0, now - t) / 1000) + " ago";
  const opt = (v, f) => (v === null || v === undefined ? "–" : f ? f(v) : String(v));
  const gib = (b) => (b / 2 ** 30).toFixed(1) + " GiB";
  const state = (s) => el("span", { class: "state " + s }, s);
  const num = (v) => el("td", { class: "num" }, v);
  const sweepHref = (name) => "/sweeps/" + encodeURIComponent(name);

  function bar(fraction, small) {
    const pct = Math.max(0, Math.min(100, 100 * fraction));
    const inner = el("div", { style: "width:" + pct.toFixed(1) + "%" });
    return el("div", { class: small ? "bar small" : "bar", title: pct.toFixed(0) + "%" }, inner);
  }

  function fill(id, rows, render) {
    const tbody = document.querySelector("#" + id + " tbody");
    if (!tbody) return;
    tbody.replaceChildren(...rows.map(render));
  }

  function sweepRow(s) {
    const c = s.counts;
    const done = el("td", { class: "done", "data-done": String(s.done) }, s.done + " / " + s.total);
    return el(
      "tr",
      { "data-sweep": s.name },
      el("td", { class: "name" }, el("a", { href: sweepHref(s.name) }, s.name)),
      el("td", {}, state(s.state)),
      el("td", {}, bar(s.total ? s.done / s.total : 0)),
      done,
      num(c.leased),
      num(c.blocked + c.pending),
      el("td", { class: "num failed" }, c.failed),
      num(c.cancelled),
      el("td", { class: "eta" }, opt(s.eta_seconds, duration)),
    );
  }

  function workerRow(w, now) {
    let job = "–";
    if (w.job_id !== null && w.sweep !== null) {
      job = el("span", {}, w.job_id + " (", el("a", { href: sweepHref(w.sweep) }, w.sweep), ")");
    } else if (w.job_id !== null) {
      job = String(w.job_id);
    }
    const live = w.live ? "live" : "gone";
    return el(
      "tr",
      {},
      el("td", { class: "name" }, w.name),
      el("td", {}, state(live)),
      el("td", {}, w.device),
      num(opt(w.memory_bytes, gib)),
      num(opt(w.free_memory_bytes, gib)),
      el("td", {}, job),
      el("td", {}, w.phase === null ? "–" : w.phase + (w.progress === null ? "" : " " + (100 * w.progress).toFixed(0) + "%")),
      num(opt(w.tokens_per_second, (r) => r.toFixed(0))),
      el("td", {}, ago(now, w.last_seen_ms)),
      el("td", {}, w.version),
    );
  }

  function jobRow(j, now) {
    let progress = "–";
    if (j.progress !== null) {
      progress = el("span", {}, bar(j.progress, true), " " + (100 * j.progress).toFixed(0) + "%");
    }
    return el(
      "tr",
      { "data-job": String(j.id) },
      num(j.id),
      el("td", {}, j.kind),
      el("td", {}, j.cell),
      el("td", {}, state(j.state)),
      el("td", {}, opt(j.worker)),
      el("td", {}, opt(j.phase)),
      el("td", {}, progress),
      num(opt(j.tokens_per_second, (r) => r.toFixed(0))),
      el("td", {}, opt(j.heartbeat_at_ms, (t) => ago(now, t))),
      num(j.attempts + "/" + j.max_attempts),
      num(opt(j.seconds, duration)),
      el("td", { class: "results" }, j.results),
      el("td", { class: "error" }, opt(j.error)),
    );
  }

  function figures(id, list, none) {
    const box = document.getElementById(id);
    if (!box || !list) return;
    if (list.length === 0) {
      box.replaceChildren(el("p", { class: "hint" }, none));
      return;
    }
    box.replaceChildren(
      ...list.map((f) => {
        const svg = el("div", { class: "svg" });
        svg.innerHTML = f.svg; // plotters' SVG: its text is XML-escaped on the server
        return el("figure", {}, svg, el("figcaption", {}, f.title));
      }),
    );
  }

  function summary(s) {
    const box = document.getElementById("summary");
    if (!box) return;
    const c = s.counts;
    const done = el("span", { class: "done", "data-done": String(s.done) }, s.done + " / " + s.total);
    box.replaceChildren(
      state(s.state), " ", done, " done · ",
      el("span", { class: "running" }, c.leased), " running · ",
      el("span", { class: "waiting" }, c.blocked + c.pending), " waiting · ",
      el("span", { class: "failed" }, c.failed), " failed · ",
      el("span", { class: "cancelled" }, c.cancelled), " cancelled · mean job ",
      el("span", { class: "mean" }, opt(s.mean_job_seconds, duration)), " · ETA ",
      el("span", { class: "eta" }, opt(s.eta_seconds, duration)),
    );
    const old = box.nextElementSibling;
    if (old && old.classList.contains("bar")) old.replaceWith(bar(s.total ? s.done / s.total : 0));
  }

  function render(d) {
    if (view === "overview") {
      fill("sweeps", d.sweeps, sweepRow);
    } else {
      summary(d.sweep);
      fill("jobs", d.jobs, (j) => jobRow(j, d.now_ms));
      if (d.charts) figures("charts", d.charts, "No results yet: the charts appear as jobs finish.");
      if (d.heatmaps) figures("heatmaps", d.heatmaps, "No model scored yet.");
      key = d.results_key;
      body.dataset.key = key;
    }
    fill("workers", d.workers, (w) => workerRow(w, d.now_ms));
  }

  function status(text, failed) {
    const box = document.getElementById("updated");
    if (!box) return;
    box.textContent = text;
    box.classList.toggle("stale", !!failed);
  }

  async function poll() {
    try {
      const url = view === "sweep" && key ? api + "?known=" + encodeURIComponent(key) : api;
      const reply = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (!reply.ok) {
        status("update failed: " + reply.status + " " + (await reply.text()), true);
        return;
      }
      const d = await reply.json();
      render(d);
      polls += 1;
      body.dataset.polls = String(polls);
      status("updated " + new Date(d.now_ms).toLocaleTimeString() + " · every 2 s", false);
    } catch (e) {
      status("update failed: " + e, true);
    } finally {
      setTimeout(poll, 2000);
    }
  }

  poll();
})();
