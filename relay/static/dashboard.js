// relay dashboard: polls /status?peers=1 every second and draws one region.
// Plain browser JavaScript, no build step, no dependencies.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || "";
  const POLL_MS = 1000;
  const TIMEOUT_MS = 4000;
  const LAG_WARN_S = 3;
  const LAG_BAD_S = 10;
  const SVGNS = "http://www.w3.org/2000/svg";
  const PALETTE = [
    "#2f6fdb", "#e8772e", "#2ca05a", "#c43d7a", "#8a5cd1", "#1aa3a3",
    "#c9a227", "#d64545", "#5a7d2a", "#7a4f2b", "#3d4fa8", "#e05fc0",
  ];
  const colours = new Map();

  const $ = (sel) => document.querySelector(sel);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v;
      else if (k === "bg") e.style.background = v; // CSSOM: allowed by the page's CSP
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === undefined || c === null) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function badge(state) {
    return el("span", { class: "badge", "data-state": state }, state);
  }

  function colourOf(id) {
    return colours.get(id) || "#999";
  }

  function assignColours(ids) {
    for (const id of [...ids].sort()) {
      if (!colours.has(id)) colours.set(id, PALETTE[colours.size % PALETTE.length]);
    }
  }

  const fmt = {
    int: (n) => (n === undefined || n === null ? "–" : Number(n).toLocaleString("en")),
    s: (n) => (n === undefined || n === null ? "–" : `${Number(n).toFixed(n < 10 ? 2 : 1)} s`),
    bytes: (n) => {
      if (n === undefined || n === null) return "–";
      const units = ["B", "kB", "MB", "GB", "TB"];
      let i = 0;
      let v = Number(n);
      while (v >= 1000 && i < units.length - 1) {
        v /= 1000;
        i += 1;
      }
      return `${v.toFixed(i && v < 10 ? 1 : 0)} ${units[i]}`;
    },
    uptime: (s) => {
      if (s === undefined || s === null) return "–";
      if (s < 120) return `${Math.round(s)} s`;
      if (s < 7200) return `${Math.round(s / 60)} min`;
      return `${(s / 3600).toFixed(1)} h`;
    },
  };

  // -- the model: one region as seen from this node and the peers it could reach --

  function build(doc) {
    const view = doc.view || {};
    const statuses = new Map([[doc.node, doc]]);
    const unreachable = new Map();
    for (const [id, d] of Object.entries(doc.peers || {})) {
      if (d && !d.error && d.view) statuses.set(id, d);
      else unreachable.set(id, (d && d.error) || "unreachable");
    }
    const members = new Map();
    for (const m of view.members || []) members.set(m.id, { ...m });
    for (const d of statuses.values()) {
      for (const m of (d.view && d.view.members) || []) {
        if (!members.has(m.id)) members.set(m.id, { ...m });
      }
    }
    if (!members.has(doc.node)) {
      members.set(doc.node, { id: doc.node, state: "alive", admin: view.admin });
    }
    const slots = view.slots || 0;
    const actual = new Array(slots).fill(null);
    const conflicts = new Set();
    for (const [id, d] of statuses) {
      for (const s of (d.view && d.view.owned) || []) {
        if (s >= slots) continue;
        if (actual[s] !== null && actual[s] !== id) conflicts.add(s);
        actual[s] = id;
      }
    }
    const ringNodes = view.ring_nodes || [];
    const planned = (view.ring_owner || []).map((i) => ringNodes[i] || null);
    const links = new Map();
    for (const [id, d] of statuses) {
      for (const l of (d.cluster && d.cluster.links) || []) {
        const cur = links.get(l.dest);
        if (l.holder) links.set(l.dest, { ...l, holder_node: id });
        else if (!cur) links.set(l.dest, { ...l, holder_node: null });
      }
    }
    for (const l of links.values()) {
      // Nobody we can read holds it: down, unless the holder may be a node we cannot read.
      if (!l.holder_node) l.state = unreachable.size ? "unknown" : "down";
    }
    return { doc, view, statuses, unreachable, members, slots, actual, conflicts, planned, links };
  }

  // -- the ring ------------------------------------------------------------------

  let ringSize = -1;
  let outer = [];
  let inner = [];
  let centreBig = null;
  let centreSmall = null;

  function arcPath(r0, r1, a0, a1) {
    const p = (r, a) => `${(r * Math.sin(a)).toFixed(3)} ${(-r * Math.cos(a)).toFixed(3)}`;
    const large = a1 - a0 > Math.PI ? 1 : 0;
    return (
      `M ${p(r1, a0)} A ${r1} ${r1} 0 ${large} 1 ${p(r1, a1)} ` +
      `L ${p(r0, a1)} A ${r0} ${r0} 0 ${large} 0 ${p(r0, a0)} Z`
    );
  }

  function buildRing(slots) {
    const svg = $("#ring");
    svg.replaceChildren();
    outer = [];
    inner = [];
    const step = (2 * Math.PI) / Math.max(1, slots);
    for (let s = 0; s < slots; s += 1) {
      const a0 = s * step;
      const a1 = Math.min(a0 + step, a0 + 2 * Math.PI - 1e-4);
      const o = document.createElementNS(SVGNS, "path");
      o.setAttribute("d", arcPath(68, 100, a0, a1));
      o.setAttribute("class", "slot");
      o.dataset.slot = String(s);
      o.append(document.createElementNS(SVGNS, "title"));
      const i = document.createElementNS(SVGNS, "path");
      i.setAttribute("d", arcPath(56, 64, a0, a1));
      i.setAttribute("class", "slot planned");
      svg.append(o, i);
      outer.push(o);
      inner.push(i);
    }
    centreBig = document.createElementNS(SVGNS, "text");
    centreBig.setAttribute("class", "center-big");
    centreBig.setAttribute("text-anchor", "middle");
    centreBig.setAttribute("y", "2");
    centreSmall = document.createElementNS(SVGNS, "text");
    centreSmall.setAttribute("class", "center-small");
    centreSmall.setAttribute("text-anchor", "middle");
    centreSmall.setAttribute("y", "16");
    svg.append(centreBig, centreSmall);
    ringSize = slots;
  }

  function drawRing(m) {
    if (m.slots !== ringSize) buildRing(m.slots);
    if (!m.slots) {
      centreBig.textContent = "no ring";
      centreSmall.textContent = "standalone node";
      return;
    }
    let owned = 0;
    for (let s = 0; s < m.slots; s += 1) {
      const owner = m.actual[s];
      const plan = m.planned[s] || null;
      const o = outer[s];
      if (m.conflicts.has(s)) {
        o.setAttribute("class", "slot conflict");
        o.removeAttribute("fill");
      } else if (owner) {
        owned += 1;
        o.setAttribute("class", "slot");
        o.setAttribute("fill", colourOf(owner));
      } else {
        o.setAttribute("class", "slot unowned");
        o.removeAttribute("fill");
      }
      o.dataset.owner = owner || "";
      o.firstChild.textContent =
        `slot ${s}: ${owner || "no owner"}` + (plan && plan !== owner ? ` (ring: ${plan})` : "");
      if (plan) inner[s].setAttribute("fill", colourOf(plan));
      else inner[s].setAttribute("fill", "#e3e6ea");
    }
    centreBig.textContent = `${owned}/${m.slots}`;
    centreSmall.textContent = "slots owned";
  }

  function drawLegend(m) {
    const counts = new Map();
    for (const o of m.actual) if (o) counts.set(o, (counts.get(o) || 0) + 1);
    const items = [];
    for (const id of [...m.members.keys()].sort()) {
      const n = counts.get(id) || 0;
      const st = m.members.get(id).state;
      if (!n && (st === "left" || st === "dead")) continue;
      items.push(
        el(
          "li",
          { "data-node": id },
          el("span", { class: "swatch", bg: colourOf(id) }),
          `${id} · ${n} slots`,
        ),
      );
    }
    const unowned = m.actual.filter((o) => !o).length;
    if (unowned) {
      items.push(el("li", {}, el("span", { class: "swatch", bg: "#e3e6ea" }), `no owner · ${unowned}`));
    }
    $("#legend").replaceChildren(...items);
  }

  // -- tables ----------------------------------------------------------------------

  function nodeState(m, id) {
    const st = m.members.get(id).state;
    const d = m.statuses.get(id);
    if (d && d.view && d.view.draining && (st === "alive" || st === "suspect")) return "draining";
    return st;
  }

  function drawNodes(m) {
    const rows = [];
    for (const id of [...m.members.keys()].sort()) {
      const mem = m.members.get(id);
      const d = m.statuses.get(id);
      const c = (d && d.cluster) || {};
      const state = nodeState(m, id);
      const gone = state === "left" || state === "dead";
      const lease = d && d.view && d.view.lease ? d.view.lease : null;
      const note = m.unreachable.has(id) ? badge("unreachable") : null;
      const stateCell = el("td", { "data-field": "state" }, badge(state));
      if (note) stateCell.append(" ", note);
      const leaseText = lease && lease.age_s !== null ? fmt.s(lease.age_s) : "–";
      rows.push(
        el(
          "tr",
          { "data-node": id, class: gone ? "gone" : "" },
          el("td", {}, el("span", { class: "swatch", bg: colourOf(id) }), id,
            id === m.doc.node ? " (this page)" : ""),
          stateCell,
          el("td", { class: "num" }, mem.epoch ?? "–"),
          el("td", { class: "num" }, mem.weight ?? "–"),
          el("td", { class: "num", "data-field": "slots" }, d ? fmt.int(c.owned_slots) : "–"),
          el("td", { class: "num" }, d ? fmt.int(c.replica_slots) : "–"),
          el("td", { class: "num", "data-field": "lease" }, leaseText),
          el("td", { class: "num" }, d ? fmt.int(d.pending.messages) : "–"),
          el("td", { class: "num" }, d ? fmt.bytes(d.pending.bytes) : "–"),
          el("td", { class: "num" }, d ? fmt.int(d.connections) : "–"),
          el("td", { class: "num" }, d ? fmt.bytes(d.memory.rss_bytes) : "–"),
          el("td", { class: "num" }, d ? fmt.uptime(d.uptime_s) : "–"),
        ),
      );
    }
    $("#nodes tbody").replaceChildren(...rows);
  }

  function drawLinks(m) {
    const region = m.view.region;
    const rows = [];
    for (const dest of [...m.links.keys()].sort()) {
      const l = m.links.get(dest);
      rows.push(
        el(
          "tr",
          { "data-link": `${region}>${dest}` },
          el("td", {}, `${region} → ${dest}`),
          el("td", { "data-field": "state" }, badge(l.state)),
          el("td", {}, l.holder_node || "nobody"),
          el("td", { class: "num", "data-field": "lag" }, l.holder_node ? fmt.s(l.lag_s) : "–"),
          el("td", { class: "num", "data-field": "backlog" }, l.holder_node ? fmt.int(l.backlog_entries) : "–"),
          el("td", { class: "num" }, l.holder_node ? fmt.int(l.copied_entries) : "–"),
          el("td", { class: "num" }, l.holder_node ? fmt.bytes(l.bytes_total) : "–"),
          el("td", { class: "num" }, l.holder_node ? fmt.int(l.gaps_total) : "–"),
          el("td", { class: "num", "data-field": "rtt" }, l.holder_node && l.rtt_ms != null ? `${l.rtt_ms} ms` : "–"),
          el("td", { class: "num", "data-field": "inflight" }, l.holder_node ? fmt.int(l.inflight_windows || 0) : "–"),
          el("td", { class: "num", "data-field": "bpm" }, l.holder_node && l.bytes_per_message != null ? `${l.bytes_per_message}` : "–"),
          el("td", { class: "num", "data-field": "ratio" }, l.holder_node && l.compression_ratio != null ? `${l.compression_ratio}×` : "–"),
          el("td", { class: "err" }, l.last_error || ""),
        ),
      );
    }
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colspan: "13" }, "no links: this region has no peers")));
    }
    $("#links tbody").replaceChildren(...rows);
  }

  function drawRisk(m) {
    const region = m.view.region;
    const rows = [];
    let unlogged = 0;
    let unsaved = 0;
    let waiting = 0;
    for (const [id, d] of [...m.statuses].sort()) {
      const r = (d.cluster && d.cluster.data_at_risk) || {};
      unlogged += r.unlogged_events || 0;
      unsaved += r.unsaved_slots || 0;
      waiting += (d.view && d.view.at_risk && d.view.at_risk.remote_waiting) || 0;
      rows.push(
        el(
          "tr",
          { "data-risk": `unlogged:${id}` },
          el("td", {}, `${id}: events not yet in the slot log`),
          el("td", { class: "num" }, fmt.int(r.unlogged_events || 0)),
          el("td", {}, `${id} crashes (only what was published with ack=mem)`),
        ),
      );
      if (r.unsaved_slots !== undefined) {
        const age = r.unsaved_slots ? `, oldest change ${fmt.s(r.snapshot_age_s)} ago` : "";
        rows.push(
          el(
            "tr",
            { "data-risk": `unsaved:${id}` },
            el("td", {}, `${id}: slots changed since their snapshot${age}`),
            el("td", { class: "num" }, fmt.int(r.unsaved_slots)),
            el("td", {}, `the region's Redis loses its data and ${id} restarts`),
          ),
        );
      }
    }
    let backlog = 0;
    for (const dest of [...m.links.keys()].sort()) {
      const l = m.links.get(dest);
      backlog += l.backlog_entries || 0;
      rows.push(
        el(
          "tr",
          { "data-risk": `link:${dest}` },
          el("td", {}, `${region} → ${dest}: entries not yet copied (lag ${fmt.s(l.lag_s)})`),
          el("td", { class: "num" }, fmt.int(l.backlog_entries || 0)),
          el("td", {}, `region ${region} is lost (only what was published below ack=remote)`),
        ),
      );
    }
    rows.push(
      el(
        "tr",
        {},
        el("td", {}, "publishes waiting for ack=remote"),
        el("td", { class: "num" }, fmt.int(waiting)),
        el("td", {}, "not acknowledged yet: the client keeps them and retries"),
      ),
    );
    $("#risk tbody").replaceChildren(...rows);
    return { unlogged, unsaved, backlog, waiting };
  }

  function tile(id, value, detail, level) {
    const t = $(`#${id}`);
    t.querySelector(".value").textContent = value;
    t.querySelector(".detail").textContent = detail || "";
    t.dataset.level = level || "";
  }

  function alarmsOf(m) {
    const out = [];
    const add = (level, text) => out.push({ level, text });
    for (const [id, mem] of m.members) {
      const st = nodeState(m, id);
      if (st === "dead") add("bad", `${id} is dead: its lease expired; the next nodes took its slots`);
      if (st === "suspect") add("warn", `${id} is suspect: it does not answer mesh pings (it keeps its slots)`);
      if (st === "draining") add("warn", `${id} is draining: it hands its slots over and leaves`);
      if ((st === "alive" || st === "suspect") && m.unreachable.has(id)) {
        add("warn", `${id}: its admin /status cannot be read (${m.unreachable.get(id)})`);
      }
      void mem;
    }
    const unowned = m.actual.filter((o) => !o).length;
    if (m.slots && unowned) add("warn", `${unowned} slots have no owner right now: publishes to them are answered unavailable until a node claims them`);
    if (m.view && m.view.held_slots) add("warn", `a planned ring change is under way: ${m.view.held_slots} slots wait to move (if it was interrupted, relay ring apply --resume finishes it)`);
    if (m.conflicts.size) add("bad", `${m.conflicts.size} slots are claimed by two nodes (fencing refuses the stale one's writes)`);
    for (const [id, d] of m.statuses) {
      if (d.memory && d.memory.overloaded) add("bad", `${id} is overloaded: it refuses publishes (RSS above the high-watermark)`);
      else if (d.memory && d.memory.rss_bytes > 0.9 * d.memory.high_watermark_bytes) add("warn", `${id} is near its memory high-watermark`);
      if (d.cluster && d.cluster.lease_fresh === false && !(d.view && d.view.draining)) add("bad", `${id} is not sure of its lease: it serves nothing until it renews`);
      const c = d.counters || {};
      if (c.evicted) add("warn", `${id} evicted ${c.evicted} messages at a channel cap: a recipient is far behind`);
      if (c.expired) add("warn", `${id} expired ${c.expired} messages at their TTL`);
      const snaps = (d.cluster && d.cluster.snapshots) || {};
      if (snaps.failures) add("warn", `${id}: ${snaps.failures} snapshot writes failed (disk full or failing?); a restart will need the region to rebuild`);
      if (snaps.refused) add("warn", `${id} refused ${snaps.refused} corrupt snapshots at start; those slots were rebuilt from the region`);
      const internal = (d.errors || {}).internal;
      if (internal) add("bad", `${id} answered ${internal} internal errors: a bug, see its log`);
    }
    for (const [dest, l] of m.links) {
      if (l.state === "down") add("bad", `link → ${dest} is down: no node of the region holds it`);
      else if (l.state === "unknown") add("warn", `link → ${dest}: no node whose status can be read holds it`);
      else if (l.state === "stalled") add("bad", `link → ${dest} is stalled: copies make no progress (WAN cut or ${dest}'s Redis down); ack=remote publishes wait`);
      else if (l.state === "error") add("bad", `link → ${dest} is failing: ${l.last_error || "error"}`);
      if (l.lag_s >= LAG_BAD_S) add("bad", `link → ${dest} lags ${fmt.s(l.lag_s)}`);
      else if (l.lag_s >= LAG_WARN_S) add("warn", `link → ${dest} lags ${fmt.s(l.lag_s)}`);
      if (l.gaps_total) add("warn", `link → ${dest} resynchronised ${l.gaps_total} slots from a checkpoint (it was down longer than the logs are kept)`);
    }
    return out;
  }

  function drawAlarms(alarms) {
    const items = alarms.map((a) => el("li", { "data-level": a.level }, a.text));
    if (!items.length) items.push(el("li", { class: "none" }, "none"));
    $("#alarms").replaceChildren(...items);
  }

  function render(doc) {
    const m = build(doc);
    assignColours(m.members.keys());
    $("#region").textContent = m.view.region || doc.region;
    $("#viewer").textContent = doc.node;
    document.title = `relay · ${m.view.region || doc.region}`;
    drawRing(m);
    drawLegend(m);
    drawNodes(m);
    drawLinks(m);
    const risk = drawRisk(m);
    const alarms = alarmsOf(m);
    drawAlarms(alarms);

    const states = [...m.members.keys()].map((id) => nodeState(m, id));
    const alive = states.filter((s) => s === "alive").length;
    const live = states.filter((s) => s !== "left" && s !== "dead").length;
    tile("tile-nodes", `${alive}/${live}`, `${states.length - live} left or dead`, alive < live ? "warn" : "");
    const owned = m.actual.filter((o) => o).length;
    tile(
      "tile-slots",
      m.slots ? `${owned}/${m.slots}` : "–",
      m.slots ? `R=${m.view.replicas} · ${m.slots - owned} unowned` : "standalone",
      m.slots && owned < m.slots ? "warn" : "",
    );
    let copies = 0;
    let bytes = 0;
    for (const d of m.statuses.values()) {
      copies += d.pending.messages;
      bytes += d.pending.bytes;
    }
    const holders = Math.max(1, Math.min(m.view.replicas || 1, live || 1));
    tile("tile-pending", fmt.int(Math.round(copies / holders)),
      `≈ ${fmt.int(copies)} copies in RAM / ${holders} per message · ${fmt.bytes(bytes)}`);
    const atRisk = risk.unlogged + risk.backlog;
    tile("tile-risk", fmt.int(atRisk),
      `${fmt.int(risk.unlogged)} not in the slot log · ${fmt.int(risk.backlog)} not in other regions` +
        ` · ${fmt.int(risk.unsaved)} slots unsaved`,
      atRisk ? "warn" : "");
    const links = [...m.links.values()];
    const running = links.filter((l) => l.state === "running").length;
    tile("tile-links", links.length ? `${running}/${links.length}` : "–", links.length ? "" : "no other regions",
      running < links.length ? "bad" : "");
    const worst = links.reduce((w, l) => Math.max(w, l.lag_s || 0), 0);
    tile("tile-lag", links.length ? fmt.s(worst) : "–",
      links.length ? `max backlog ${fmt.int(links.reduce((w, l) => Math.max(w, l.backlog_entries || 0), 0))}` : "",
      worst >= LAG_BAD_S ? "bad" : worst >= LAG_WARN_S ? "warn" : "");
  }

  function setConn(state, text) {
    const c = $("#conn");
    c.dataset.state = state;
    c.textContent = text;
    document.body.dataset.conn = state;
  }

  let polls = 0;

  async function poll() {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
    try {
      const headers = token ? { Authorization: `Bearer ${token}` } : {};
      const r = await fetch("/status?peers=1", { headers, cache: "no-store", signal: ctrl.signal });
      if (r.status === 401) throw new Error("unauthorized: open this page with ?token=<admin token>");
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const doc = await r.json();
      render(doc);
      polls += 1;
      document.body.dataset.polls = String(polls);
      setConn("ok", `live · ${new Date().toLocaleTimeString("en-GB")}`);
    } catch (e) {
      const why = e && e.name === "AbortError" ? "timed out" : (e && e.message) || String(e);
      setConn("error", `cannot read /status: ${why} (showing the last data)`);
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (token) $("#demo-link").href = `/demo?token=${encodeURIComponent(token)}`;
    poll();
  });
})();
