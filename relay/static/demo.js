// relay chat demo: one WebSocket (subprotocol relay.v1.json) straight from the browser.
// You subscribe to inbox:<your name>; you publish to inbox:<their name>. Plain JavaScript.
//
// Query string: regions (JSON: {"sg": "<WebSocket URL of sg>", …}, or a list of [name, url]),
// region, name, to, connect=1 (connect on load), token (the admin token, for /demo/config).
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const adminToken = params.get("token") || "";
  const NAME_RE = /^[A-Za-z0-9_.-]{1,40}$/;
  const RETRY_CODES = new Set(["unavailable", "overloaded", "rate_limited"]);
  const MAX_RETRIES = 20;
  const LOG_LINES = 200;

  const $ = (sel) => document.querySelector(sel);
  let regions = new Map(); // region name → WebSocket URL
  let ws = null;
  let me = "";
  let storedLeft = 0; // messages still to come from the pending store after `subscribed`
  const seen = new Set();
  const outbox = new Map(); // pub id → {frame, attempts}

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === undefined || c === null) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function log(dir, obj) {
    const pre = $("#log");
    const line = `${new Date().toLocaleTimeString("en-GB")} ${dir} ${typeof obj === "string" ? obj : JSON.stringify(obj)}\n`;
    pre.append(line);
    while (pre.childNodes.length > LOG_LINES) pre.removeChild(pre.firstChild);
    pre.scrollTop = pre.scrollHeight;
  }

  function setStatus(state, text) {
    const s = $("#status");
    s.dataset.state = state;
    s.textContent = text;
    const c = $("#conn");
    c.dataset.state = state === "open" ? "ok" : state === "error" ? "error" : "closed";
    c.textContent = state === "open" ? `connected · ${$("#region").value}` : state === "connecting" ? "connecting…" : "not connected";
    document.body.dataset.ws = state;
  }

  function isLoopback(host) {
    return host === "127.0.0.1" || host === "localhost" || host === "[::1]" || host === "::1";
  }

  // The node reports its own URL as it listens; seen from another machine, a loopback
  // URL means "this host".
  function reachable(url) {
    try {
      const u = new URL(url);
      if (isLoopback(u.hostname) && !isLoopback(location.hostname)) {
        u.hostname = location.hostname;
        return u.toString();
      }
    } catch (_e) {
      // not a URL: leave it for the user to fix
    }
    return url;
  }

  function parseRegions(raw) {
    const out = new Map();
    if (!raw) return out;
    let v;
    try {
      v = JSON.parse(raw);
    } catch (_e) {
      log("!!", `?regions= is not JSON: ${raw}`);
      return out;
    }
    if (Array.isArray(v)) {
      for (const item of v) {
        if (Array.isArray(item) && item.length === 2) out.set(String(item[0]), String(item[1]));
        else if (item && typeof item === "object" && item.name && item.url) out.set(String(item.name), String(item.url));
        else if (typeof item === "string") out.set(item, item);
      }
    } else if (v && typeof v === "object") {
      for (const [k, u] of Object.entries(v)) out.set(String(k), String(u));
    }
    return out;
  }

  async function loadConfig() {
    const headers = adminToken ? { Authorization: `Bearer ${adminToken}` } : {};
    try {
      const r = await fetch("/demo/config", { headers, cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      return await r.json();
    } catch (e) {
      log("!!", `cannot read /demo/config: ${e.message || e}`);
      return null;
    }
  }

  function fillRegions(selected) {
    const sel = $("#region");
    sel.replaceChildren(...[...regions.keys()].map((r) => el("option", { value: r }, r)));
    if (selected && regions.has(selected)) sel.value = selected;
    $("#ws-url").value = regions.get(sel.value) || "";
  }

  function send(obj) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    log("→", obj);
    ws.send(JSON.stringify(obj));
    return true;
  }

  function newId() {
    const b = new Uint8Array(8);
    crypto.getRandomValues(b);
    return `${Date.now().toString(36)}-${[...b].map((x) => x.toString(16).padStart(2, "0")).join("")}`;
  }

  function parseBody(body) {
    try {
      const v = JSON.parse(body);
      if (v && typeof v === "object" && typeof v.text === "string") return v;
    } catch (_e) {
      // a body from another client: show it as it is
    }
    return { text: String(body) };
  }

  function showMessage(o) {
    const stored = storedLeft > 0;
    if (stored) storedLeft -= 1;
    if (seen.has(o.id)) {
      if ($("#auto-ack").checked) send({ op: "ack", ch: o.ch, ids: [o.id] });
      return;
    }
    seen.add(o.id);
    const b = parseBody(o.body);
    // Who sent it is the node's `from` (the token's subject, or "anon"); a name written
    // in the body is only a claim, shown as one.
    const from = String(o.from || "anon");
    const claimed = b.from && b.from !== from ? String(b.from) : null;
    const when = o.ts ? new Date(o.ts).toLocaleTimeString("en-GB") : "";
    const ackTag = el("span", { class: "tag", "data-field": "ack" }, "not acked");
    const li = el(
      "li",
      { class: "msg", "data-id": o.id, "data-from": from, "data-claimed": claimed, "data-origin": o.origin || "", "data-how": stored ? "stored" : "live" },
      el("div", { class: "meta" },
        el("span", { class: "who" }, from),
        claimed ? el("span", { class: "tag claimed", title: "written in the message, not verified" }, `says "${claimed}" (unverified)`) : null,
        ` · ${when} · from region ${o.origin || "?"}`,
        el("span", { class: stored ? "tag stored" : "tag" }, stored ? "from the pending store" : "live"),
        ackTag),
      el("div", { class: "text" }, b.text),
    );
    $("#inbox").prepend(li);
    if ($("#auto-ack").checked && send({ op: "ack", ch: o.ch, ids: [o.id] })) {
      ackTag.textContent = "acked";
      ackTag.className = "tag ok";
    }
  }

  function onPuback(o) {
    outbox.delete(o.id);
    const li = document.querySelector(`#sent li[data-id="${CSS.escape(o.id)}"]`);
    if (!li) return;
    const t = li.querySelector("[data-field=state]");
    t.textContent = `✓ ${o.ack}${o.dup ? " (dup)" : ""} · origin ${o.origin}`;
    t.className = "tag ok";
    li.dataset.state = "acked";
  }

  function onError(o) {
    const li = o.id ? document.querySelector(`#sent li[data-id="${CSS.escape(o.id)}"]`) : null;
    const pending = o.id ? outbox.get(o.id) : null;
    if (pending && RETRY_CODES.has(o.code) && pending.attempts < MAX_RETRIES) {
      pending.attempts += 1; // the same id: the relay answers a repeat with dup
      setTimeout(() => send(pending.frame), Math.min(2000, 100 * 2 ** pending.attempts));
      if (li) li.querySelector("[data-field=state]").textContent = `${o.code}: retrying…`;
      return;
    }
    if (li) {
      const t = li.querySelector("[data-field=state]");
      t.textContent = `${o.code}: ${o.reason}`;
      t.className = "tag err";
    }
    if (o.code === "unauthorized") setStatus("error", `unauthorized: ${o.reason} (give a token)`);
    else if (!o.id) setStatus("error", `${o.code}: ${o.reason}`);
  }

  function handle(o) {
    log("←", o);
    switch (o.op) {
      case "welcome":
        setStatus("open", `connected to ${o.node} (region ${o.region}) as ${me}; subscribing to inbox:${me}…`);
        send({ op: "sub", ch: `inbox:${me}` });
        break;
      case "subscribed":
        storedLeft = o.pending;
        setStatus("open", `connected to ${$("#region").value} as ${me}: ${o.pending} pending from the store, then live`);
        $("#send").disabled = false;
        for (const p of outbox.values()) send(p.frame); // unconfirmed publishes, same ids
        break;
      case "msg":
        showMessage(o);
        break;
      case "puback":
        onPuback(o);
        break;
      case "error":
        onError(o);
        break;
      default:
        break;
    }
  }

  function disconnect() {
    if (ws) {
      const old = ws;
      ws = null;
      old.onclose = null;
      old.close(1000, "bye");
    }
    $("#send").disabled = true;
    $("#disconnect").disabled = true;
    setStatus("idle", "disconnected");
  }

  function remember() {
    // A reload reconnects with the same name and region.
    const p = new URLSearchParams(location.search);
    p.set("name", me);
    p.set("region", $("#region").value);
    if ($("#to").value) p.set("to", $("#to").value);
    p.set("connect", "1");
    history.replaceState(null, "", `${location.pathname}?${p}`);
  }

  function connect() {
    const name = $("#name").value.trim();
    if (!name) {
      setStatus("error", "type your name first: you receive what is sent to inbox:<your name>");
      $("#name").focus();
      return;
    }
    if (!NAME_RE.test(name)) {
      setStatus("error", "a name is 1–40 letters, digits, '_', '.' or '-'");
      $("#name").focus();
      return;
    }
    disconnect();
    me = name;
    storedLeft = 0;
    const url = $("#ws-url").value.trim();
    setStatus("connecting", `connecting to ${url}…`);
    remember();
    let sock;
    try {
      sock = new WebSocket(url, "relay.v1.json");
    } catch (e) {
      setStatus("error", `bad WebSocket URL: ${e.message || e}`);
      return;
    }
    ws = sock;
    $("#disconnect").disabled = false;
    sock.onopen = () => {
      const hello = { op: "hello", client: "relay-demo" };
      const jwt = $("#jwt").value.trim();
      if (jwt) hello.token = jwt;
      send(hello);
    };
    sock.onmessage = (ev) => {
      let data;
      try {
        data = JSON.parse(ev.data);
      } catch (_e) {
        log("!!", `not JSON: ${ev.data}`);
        return;
      }
      for (const o of Array.isArray(data) ? data : [data]) handle(o);
    };
    sock.onerror = () => log("!!", "WebSocket error");
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      $("#send").disabled = true;
      $("#disconnect").disabled = true;
      setStatus("error", `connection closed (${ev.code}${ev.reason ? ": " + ev.reason : ""})`);
    };
  }

  function publish() {
    const to = $("#to").value.trim();
    const text = $("#text").value;
    if (!NAME_RE.test(to)) {
      setStatus("error", "the recipient is 1–40 letters, digits, '_', '.' or '-'");
      return;
    }
    if (!text) return;
    const id = newId();
    const frame = {
      op: "pub",
      id,
      ch: `inbox:${to}`,
      body: JSON.stringify({ from: me, text }),
      ack: $("#ack-level").value,
    };
    outbox.set(id, { frame, attempts: 0 });
    const li = el(
      "li",
      { class: "msg", "data-id": id, "data-state": "sent" },
      el("div", { class: "meta" }, `to ${to}`, el("span", { class: "tag", "data-field": "state" }, "sent")),
      el("div", { class: "text" }, text),
    );
    $("#sent").prepend(li);
    send(frame);
    $("#text").value = "";
    $("#text").focus();
    remember();
  }

  document.addEventListener("DOMContentLoaded", async () => {
    if (adminToken) $("#dashboard-link").href = `/?token=${encodeURIComponent(adminToken)}`;
    const cfg = await loadConfig();
    regions = new Map();
    if (cfg && cfg.region && cfg.ws) regions.set(cfg.region, reachable(cfg.ws));
    for (const [r, u] of parseRegions(params.get("regions"))) regions.set(r, u);
    fillRegions(params.get("region") || (cfg && cfg.region));
    $("#name").value = params.get("name") || "";
    $("#to").value = params.get("to") || "";
    if (cfg && cfg.anonymous === false) $("#jwt").placeholder = "required by this node";
    $("#region").addEventListener("change", () => {
      $("#ws-url").value = regions.get($("#region").value) || "";
    });
    $("#connect-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      connect();
    });
    $("#disconnect").addEventListener("click", disconnect);
    $("#send-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      publish();
    });
    document.body.dataset.ready = "1";
    if (params.get("connect") === "1" && $("#name").value) connect();
  });
})();
