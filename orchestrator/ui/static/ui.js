// The orchestrator UI's only script: live updates and confirmed actions.
// Pages work without it (forms post to a confirmation page; a reload shows news).
"use strict";
(function () {
  let source = null;

  function notice(text, bad) {
    const el = document.getElementById("notice");
    if (!el) return;
    el.textContent = text;
    el.classList.toggle("bad", !!bad);
    el.hidden = false;
    clearTimeout(notice.timer);
    notice.timer = setTimeout(function () { el.hidden = true; }, 6000);
  }

  function live() { return document.querySelector("[data-live]"); }

  // Fetch the region again and swap it in: it renders exactly as a reload would.
  async function refresh() {
    const region = live();
    if (!region) return;
    let response;
    try {
      response = await fetch(region.dataset.fragment, {
        headers: { "Accept": "text/html" }, credentials: "same-origin", cache: "no-store" });
    } catch (err) {
      return;  // the server is away; the stream reconnects and announces the next change
    }
    if (!response.ok) return;
    const template = document.createElement("template");
    template.innerHTML = await response.text();
    const fresh = template.content.querySelector("[data-live]");
    if (!fresh) return;
    const kept = keep(region);
    region.replaceWith(fresh);
    restore(kept);
    follow();
  }

  // What a person did inside the region (a log folded or unfolded, a log scrolled)
  // survives the swap; a log scrolled to its end keeps following its new lines.
  function keep(region) {
    const kept = new Map();
    region.querySelectorAll("[data-keep][id]").forEach(function (el) {
      kept.set(el.id, {
        open: el.tagName === "DETAILS" ? el.open : null,
        top: el.scrollTop,
        atEnd: el.scrollHeight - el.scrollTop - el.clientHeight < 8,
      });
    });
    return kept;
  }

  function restore(kept) {
    kept.forEach(function (was, id) {
      const el = document.getElementById(id);
      if (!el) return;
      if (was.open !== null) el.open = was.open;
    });
    kept.forEach(function (was, id) {
      const el = document.getElementById(id);
      if (!el || was.open !== null) return;
      el.scrollTop = was.atEnd ? el.scrollHeight : was.top;
    });
    tail(kept);
  }

  // A running attempt's log opens at its last line, as `tail -f` would show it.
  function tail(kept) {
    document.querySelectorAll("[data-tail]").forEach(function (el) {
      if (!kept || !kept.has(el.id)) el.scrollTop = el.scrollHeight;
    });
  }

  // While the page can change, listen for its changes; then stop.
  function follow() {
    const region = live();
    if (!region) return;
    // The page says whether anything it shows can still change: a batch page while
    // the batch runs, a task page also while an attempt outlives its batch.
    const running = region.dataset.following === "1";
    if (!running) {
      if (source) { source.close(); source = null; }
      return;
    }
    if (source) return;
    source = new EventSource(region.dataset.stream);
    source.addEventListener("change", function (event) {
      const data = JSON.parse(event.data);
      const now = live();
      if (!now) return;
      if (String(data.version) !== now.dataset.version || data.status !== now.dataset.status) {
        refresh();
      }
    });
    source.addEventListener("gone", function () { source.close(); source = null; });
  }

  // Every action asks first, in a dialog that says exactly what will happen.
  function ask(form) {
    const dialog = document.getElementById("confirm");
    let text = form.dataset.confirm;
    text = text.replace(/\{(\w+)\}/g, function (_, name) {
      const field = form.elements.namedItem(name);
      return field && "value" in field ? field.value : "";
    });
    dialog.querySelector(".message").textContent = text;
    document.getElementById("confirm-ok").textContent = form.dataset.confirmLabel || "OK";
    return new Promise(function (resolve) {
      dialog.addEventListener("close", function () { resolve(dialog.returnValue === "ok"); },
                              { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  async function submit(form) {
    const body = new URLSearchParams(new FormData(form));
    body.set("confirmed", "1");
    let response;
    try {
      response = await fetch(form.action, {
        method: "POST", body: body, credentials: "same-origin",
        headers: { "Accept": "application/json" } });
    } catch (err) {
      notice("The server cannot be reached: " + err.message, true);
      return;
    }
    let data = {};
    try { data = await response.json(); } catch (err) { data = { error: response.statusText }; }
    if (!response.ok || !data.ok) {
      notice(data.error || ("refused: " + response.status), true);
      return;
    }
    notice(data.message, false);
    const region = live();
    const here = region && region.dataset.stream.replace(/\/stream$/, "");
    if (data.location && data.location !== here && !window.location.pathname.startsWith(data.location)) {
      window.location.assign(data.location);
      return;
    }
    await refresh();
  }

  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
    event.preventDefault();
    if (!form.reportValidity()) return;
    ask(form).then(function (ok) { if (ok) submit(form); });
  });

  function start() {
    tail(null);
    follow();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
