// geogate status page. No framework, no external resources: the world JSON arrives over
// Server-Sent Events (/geogate/v1/events) and the page re-renders in place. If the stream
// cannot be opened it falls back to polling /geogate/v1/world. Load history for the
// sparklines is kept here in the browser (the gateway serves only the current figures).
"use strict";

const HISTORY_S = 300;          // sparkline window: at most the last 5 minutes...
const MIN_WINDOW_S = 30;        // ...and at least this, so a freshly opened page draws a line, not a dot
const STALE_AFTER_MS = 5000;    // no update for this long: say so in the top bar
const POLL_INTERVAL_MS = 1000;  // fallback when EventSource does not work
const SSE_FAILURES_BEFORE_POLLING = 3;
const SITE_STALE_AFTER_S = 15;  // a sync agent publishes every few seconds; older is worth a look
const MAP_TOP_LAT = 75, MAP_BOTTOM_LAT = -56;  // crop the poles: nobody runs a region there

const history = new Map();      // region -> [{t, rps, p50, p99, inflight}]
let lastWorld = null;
let lastUpdateMs = 0;
let lastGeneratedAt = 0;

// ------------------------------------------------------------------ tiny DOM helpers
const SVG_NS = "http://www.w3.org/2000/svg";
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  return fill(el, attrs, children);
}
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  return fill(el, attrs, children);
}
function fill(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ formatting
function fmtNum(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Math.abs(v) >= 1000) return (v / 1000).toFixed(1) + "k";
  return Number(v).toFixed(digits);
}
function fmtMs(v) {
  if (v === null || v === undefined) return "–";
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}
function fmtClock(unixS) {
  const d = new Date(unixS * 1000);
  return d.toTimeString().slice(0, 8);
}
function fmtAgo(unixS) {
  const s = Math.max(0, Date.now() / 1000 - unixS);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}
function versionSort(a, b) {
  const na = /^\d+$/.test(a), nb = /^\d+$/.test(b);
  if (na && nb) return Number(a) - Number(b);
  if (na !== nb) return na ? -1 : 1;
  return String(a).localeCompare(String(b));
}

// ------------------------------------------------------------------ map
function project(lat, lon) {
  const x = lon + 180;  // equirectangular: one SVG unit per degree
  const y = MAP_TOP_LAT - Math.max(MAP_BOTTOM_LAT, Math.min(MAP_TOP_LAT, lat));
  return [x, y];
}

async function loadCoastline() {
  try {
    const resp = await fetch("/ui/static/coastline.json");
    const data = await resp.json();
    const scale = data.scale || 10;
    const parts = [];
    for (const ring of data.rings) {
      // Unwrap longitudes so a ring crossing the antimeridian (Chukotka, Fiji) stays continuous
      // instead of streaking across the map; then draw it again shifted by 360 degrees so the
      // part beyond the edge shows on the other side (the SVG clips the rest).
      let lon = ring[0] / scale, lat = ring[1] / scale, prev = lon;
      const pts = [[lon, lat]];
      for (let i = 2; i < ring.length; i += 2) {
        lon += ring[i] / scale; lat += ring[i + 1] / scale;
        let l = lon;
        while (l - prev > 180) l -= 360;
        while (l - prev < -180) l += 360;
        pts.push([l, lat]);
        prev = l;
      }
      const minLon = Math.min(...pts.map((p) => p[0])), maxLon = Math.max(...pts.map((p) => p[0]));
      const shifts = [0];
      if (maxLon > 180) shifts.push(-360);
      if (minLon < -180) shifts.push(360);
      for (const shift of shifts) {
        parts.push("M" + pts.map(([lo, la]) => {
          const [x, y] = project(la, lo + shift);
          return `${x.toFixed(1)},${y.toFixed(1)}`;
        }).join("L") + "Z");
      }
    }
    $("land").setAttribute("d", parts.join(""));
  } catch (err) {
    console.warn("coastline not loaded", err);
  }
  const g = $("graticule");
  for (let lon = -150; lon <= 150; lon += 30) {
    const [x] = project(0, lon);
    g.append(s("line", { x1: x, y1: 0, x2: x, y2: MAP_TOP_LAT - MAP_BOTTOM_LAT }));
  }
  for (let lat = -30; lat <= 60; lat += 30) {
    const [, y] = project(lat, 0);
    g.append(s("line", { x1: 0, y1: y, x2: 360, y2: y }));
  }
}

function renderMap(world) {
  const links = $("links"), markers = $("markers");
  links.replaceChildren();
  markers.replaceChildren();
  const pts = world.regions.map((r) => ({ r, xy: project(r.location[0], r.location[1]) }));
  // Peer links: every gateway can fail over to every other one.
  for (let i = 0; i < pts.length; i++) {
    for (let j = i + 1; j < pts.length; j++) {
      const [x1, y1] = pts[i].xy, [x2, y2] = pts[j].xy;
      const mx = (x1 + x2) / 2, my = (y1 + y2) / 2 - Math.hypot(x2 - x1, y2 - y1) * 0.18;
      links.append(s("path", { d: `M${x1},${y1} Q${mx},${my} ${x2},${y2}` }));
    }
  }
  for (const { r, xy: [x, y] } of pts) {
    const sum = r.summary;
    const reps = sum && sum.replicas ? `${sum.replicas.healthy}/${sum.replicas.total}` : "—";
    const rps = sum && sum.load ? `${fmtNum(sum.load.requests_per_s)} req/s` : "unreachable";
    const labelLeft = x > 300;  // keep labels of far-east regions on the map
    const tx = labelLeft ? x - 4 : x + 4;
    const anchor = labelLeft ? "end" : "start";
    markers.append(s("g", { class: `marker ${r.health}${r.local ? " local" : ""}`, "data-marker": r.name,
                            "data-health": r.health },
      s("title", { text: `${r.name}: ${r.health}${r.reason ? " — " + r.reason : ""}` }),
      s("circle", { class: "halo", cx: x, cy: y, r: 5.5 }),
      s("circle", { class: "core", cx: x, cy: y, r: 2.4 }),
      s("text", { x: tx, y: y - 0.2, "text-anchor": anchor, text: r.name }),
      s("text", { class: "sub", x: tx, y: y + 3.6, "text-anchor": anchor, text: `${reps} · ${rps}` })));
  }
}

// ------------------------------------------------------------------ totals bar
function renderTotals(world) {
  let up = 0, healthy = 0, total = 0, rps = 0, worstP99 = null;
  for (const r of world.regions) {
    if (r.health === "healthy") up++;
    const sum = r.summary;
    if (!sum) continue;
    healthy += sum.replicas?.healthy ?? 0;
    total += sum.replicas?.total ?? 0;
    rps += sum.load?.requests_per_s ?? 0;
    const p99 = sum.load?.requests_per_s ? sum.load.p99_ms : undefined;
    if (p99 !== undefined && p99 !== null && (worstP99 === null || p99 > worstP99)) worstP99 = p99;
  }
  const item = (v, label, cls) => h("div", { class: "total" + (cls ? " " + cls : "") }, h("b", { text: v }), h("span", { text: label }));
  $("totals").replaceChildren(
    item(`${up}/${world.regions.length}`, "regions healthy"),
    item(`${healthy}/${total}`, "replicas healthy"),
    item(fmtNum(rps), "requests / s"),
    item(worstP99 === null ? "–" : fmtMs(worstP99) + " ms", "worst p99"));
  $("deployment").textContent = world.deployment ? `· ${world.deployment}` : "";
  $("served-by").textContent = `— served by ${world.served_by}, ${fmtClock(world.generated_at)}`;
}

// ------------------------------------------------------------------ events
function renderEvents(world) {
  const list = $("events");
  const items = (world.events || []).map((e) => h("li", { "data-kind": e.kind },
    h("span", { class: "when", title: fmtAgo(e.time), text: fmtClock(e.time) }),
    h("span", null, h("span", { class: `kind ${e.kind}`, text: e.kind }), h("span", { class: "region-tag", text: e.region })),
    h("span", { class: "msg", text: e.message })));
  list.replaceChildren(...(items.length ? items : [h("li", { class: "empty", text: "no failovers, promotions or ejections recently" })]));
}

// ------------------------------------------------------------------ sparklines
function recordHistory(world) {
  if (world.generated_at === lastGeneratedAt) return;  // same cached snapshot: no new point
  lastGeneratedAt = world.generated_at;
  const t = world.generated_at;
  for (const r of world.regions) {
    if (!history.has(r.name)) history.set(r.name, []);
    const hist = history.get(r.name);
    const load = r.summary?.load;
    const busy = load && load.requests_per_s > 0;  // no traffic: no latency to plot
    hist.push({ t, rps: load ? load.requests_per_s : null, p50: busy ? load.p50_ms : null,
                p99: busy ? load.p99_ms : null });
    while (hist.length && hist[0].t < t - HISTORY_S) hist.shift();
  }
}

function windowS(hist, now) {
  return hist.length ? Math.max(MIN_WINDOW_S, Math.min(HISTORY_S, now - hist[0].t)) : MIN_WINDOW_S;
}
function fmtWindow(sec) {
  return sec >= 90 ? `${Math.round(sec / 60)} min` : `${Math.round(sec)} s`;
}

function sparkline(hist, keys, now) {
  const W = 100, H = 30;
  const span = windowS(hist, now);
  let max = 0;
  for (const p of hist) for (const k of keys) if (p[k] !== null && p[k] > max) max = p[k];
  max = max > 0 ? max * 1.15 : 1;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  keys.forEach((k, idx) => {
    const pts = hist.filter((p) => p[k] !== null)
      .map((p) => [W - ((now - p.t) / span) * W, H - (p[k] / max) * (H - 2) - 1]);
    if (!pts.length) return;
    const line = pts.map(([x, y]) => `${x.toFixed(2)},${y.toFixed(2)}`).join(" ");
    if (idx === 0 && keys.length === 1) {
      svg.append(s("polygon", { points: `${pts[0][0].toFixed(2)},${H} ${line} ${pts[pts.length - 1][0].toFixed(2)},${H}` }));
    }
    svg.append(s("polyline", { class: k, points: line }));
  });
  return svg;
}

// ------------------------------------------------------------------ regions
function replicaState(rep) {
  if (rep.draining) return ["draining", "degraded", "removed from discovery; finishing in-flight requests"];
  if (rep.ejected) {
    const why = rep.eject_reason || "outlier detection";
    return ["ejected", "down", `${why} (back in ${fmtNum(rep.ejected_for_s)} s, ejection #${rep.ejection_count})`];
  }
  if (!rep.healthy) return ["unhealthy", "down", rep.health_reason || rep.last_probe_error || rep.reason || "no successful probe yet"];
  if (rep.routable === false) return [rep.reason || "not routable", "degraded", rep.reason || ""];
  const models = Object.entries(rep.ready_versions || {}).map(([m, vs]) => `${m}: ${vs.join(", ")}`).join("; ");
  return ["healthy", "healthy", models ? `ready ${models}` : ""];
}

function renderReplicas(sum) {
  const rows = [];
  for (const pool of sum.pools || []) {
    rows.push(h("tr", { class: "pool-row" }, h("td", { colspan: 4 },
      `pool ${pool.name} · ${pool.kind} · ${pool.healthy}/${pool.total} healthy`,
      pool.panic ? h("span", { class: "panic", text: "PANIC: routing over all replicas" }) : null)));
    for (const rep of pool.replicas || []) {
      const [label, cls, why] = replicaState(rep);
      rows.push(h("tr", { class: "replica", "data-url": rep.url, "data-state": label },
        h("td", null, h("span", { class: `state ${cls}`, text: label })),
        h("td", { class: "url" }, h("span", { class: "mono", text: rep.url }),
          why ? h("div", { class: "replica-reason", text: why }) : null),
        h("td", { class: "num", text: rep.outstanding ?? rep.in_flight ?? "–" }),
        h("td", { class: "num", text: rep.probe_rtt_ms !== undefined ? fmtMs(rep.probe_rtt_ms) : "–" })));
    }
  }
  return h("table", { class: "replicas" },
    h("thead", null, h("tr", null, h("th", { text: "state" }), h("th", { text: "replica · detail" }),
      h("th", { class: "num", text: "outst.", title: "requests outstanding" }),
      h("th", { class: "num", text: "rtt ms", title: "health probe round trip (EWMA)" }))),
    h("tbody", null, rows));
}

function renderRegionCard(r, now) {
  const sum = r.summary;
  const hist = history.get(r.name) || [];
  const load = sum?.load || {};
  const count = sum?.replicas ? `${sum.replicas.healthy}/${sum.replicas.total} replicas` : "";
  const stat = (v, label) => h("div", { class: "stat" }, h("b", { text: v }), h("span", { text: label }));
  const win = `last ${fmtWindow(windowS(hist, now))}`;
  return h("article", { class: `region ${r.health}`, "data-region": r.name, "data-health": r.health },
    h("div", { class: "region-head" },
      h("h2", { text: r.name }),
      h("span", { class: "badge", text: r.reachable ? r.health : "unreachable" }),
      r.local ? h("span", { class: "local-tag", text: "this gateway" }) : null,
      h("span", { class: "count", text: count })),
    h("div", { class: "reason", text: r.reason || (r.health === "healthy" ? "serving" : "") }),
    sum ? [
      h("div", { class: "stats" },
        stat(fmtNum(load.requests_per_s), "req/s"),
        stat(load.requests_per_s ? fmtMs(load.p50_ms) : "–", "p50 ms"),
        stat(load.requests_per_s ? fmtMs(load.p99_ms) : "–", "p99 ms"),
        stat(load.in_flight ?? "–", "in flight")),
      h("div", { class: "sparks" },
        h("div", { class: "spark" }, h("div", { class: "label" }, h("span", { text: "requests/s" }), h("span", { text: win })),
          sparkline(hist, ["rps"], now)),
        h("div", { class: "spark" }, h("div", { class: "label" }, h("span", { text: "latency p50 / p99 (ms)" }), h("span", { text: win })),
          sparkline(hist, ["p50", "p99"], now))),
      renderReplicas(sum),
    ] : h("div", { class: "empty", text: "no summary from this region" }));
}

function renderRegions(world) {
  const now = world.generated_at;
  $("regions").replaceChildren(...world.regions.map((r) => renderRegionCard(r, now)));
}

// ------------------------------------------------------------------ models
function renderModels(world) {
  const models = world.models || {};
  const names = Object.keys(models).sort();
  const sites = world.regions.map((r) => r.name);
  for (const m of names) for (const site of Object.keys(models[m].sites || {})) if (!sites.includes(site)) sites.push(site);
  if (!names.length) {
    $("models").replaceChildren(h("div", { class: "empty", text: "no model reported by any reachable region" }));
    return;
  }
  const reachable = new Map(world.regions.map((r) => [r.name, r.reachable]));
  const rows = names.map((m) => {
    const info = models[m];
    const stable = info.stable, canary = info.canary;
    const canaryText = canary && canary.version ? `${canary.version} @ ${Math.round((canary.weight ?? 0) * (canary.weight > 1 ? 1 : 100))}%` : null;
    const cells = sites.map((site) => {
      const st = (info.sites || {})[site];
      if (!st) {
        const why = reachable.get(site) === false ? "unreachable" : reachable.get(site) ? "none ready" : "–";
        return h("td", { "data-site": site }, h("span", { class: why === "–" ? "muted" : "site-down", text: why }));
      }
      const chips = [];
      for (const v of [...(st.ready || [])].sort(versionSort)) {
        const role = v === stable ? " is-stable" : canary && v === canary.version ? " is-canary" : "";
        chips.push(h("i", { class: `chip ready${role}`, "data-version": v, "data-state": "ready",
                            title: `version ${v} ready${role ? " (" + role.trim().slice(3) + ")" : ""}`, text: v }));
      }
      for (const v of [...(st.loading || [])].sort(versionSort)) chips.push(h("i", { class: "chip loading", "data-version": v, "data-state": "loading", title: `version ${v} loading`, text: v }));
      for (const v of [...(st.failed || [])].sort(versionSort)) {
        const err = (st.errors || {})[v];
        chips.push(h("i", { class: "chip failed", "data-version": v, "data-state": "failed",
                            title: `version ${v} failed to load${err ? ": " + err : ""}`, text: v }));
      }
      const stale = st.heartbeat_age_s !== undefined && st.heartbeat_age_s > SITE_STALE_AFTER_S
        ? h("span", { class: "site-down", title: "the site's sync agent has not published its status recently",
                      text: ` sync stale ${fmtNum(st.heartbeat_age_s, 0)} s` }) : null;
      return h("td", { "data-site": site }, chips.length ? chips : h("span", { class: "muted", text: "none ready" }), stale);
    });
    return h("tr", { "data-model": m },
      h("td", { class: "mono", text: m }),
      h("td", { "data-field": "stable" }, stable ? h("i", { class: "chip stable", text: stable }) : h("span", { class: "muted", text: "–" }),
        info.effective && stable && info.effective !== stable
          ? h("span", { class: "muted pending", title: "global cutover: unversioned traffic switches once every healthy site has it ready",
                        text: ` serving ${info.effective} until ${stable} is ready everywhere` }) : null),
      h("td", { "data-field": "canary" }, canaryText ? h("i", { class: "chip canary", text: canaryText }) : h("span", { class: "muted", text: "–" })),
      cells);
  });
  $("models").replaceChildren(h("table", { class: "models" },
    h("thead", null, h("tr", null, h("th", { text: "model" }), h("th", { text: "stable" }), h("th", { text: "canary" }),
      sites.map((site) => h("th", { text: site })))),
    h("tbody", null, rows)));
}

// ------------------------------------------------------------------ update loop
function render(world) {
  lastWorld = world;
  lastUpdateMs = Date.now();
  recordHistory(world);
  renderTotals(world);
  renderMap(world);
  renderEvents(world);
  renderRegions(world);
  renderModels(world);
  document.body.dataset.updated = String(world.generated_at);
}

function setConn(state, text) {
  const el = $("conn");
  el.dataset.state = state;
  $("conn-text").textContent = text;
}

function startPolling() {
  setConn("polling", "polling");
  const tick = async () => {
    try {
      const resp = await fetch("/geogate/v1/world", { cache: "no-store" });
      if (resp.status === 401) {  // admin credentials configured and no (or an expired) session
        window.location.assign("/ui/login");
        return;
      }
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      render(await resp.json());
      setConn("polling", "live (polling)");
    } catch (err) {
      setConn("stale", `gateway unreachable: ${err.message}`);
    }
    setTimeout(tick, POLL_INTERVAL_MS);
  };
  tick();
}

function startStream() {
  if (!window.EventSource) return startPolling();
  let failures = 0, opened = false;
  const es = new EventSource("/geogate/v1/events");
  es.addEventListener("world", (ev) => {
    opened = true;
    failures = 0;
    render(JSON.parse(ev.data));
    setConn("live", "live");
  });
  es.onerror = () => {
    failures++;
    setConn("stale", "reconnecting…");
    if (!opened && failures >= SSE_FAILURES_BEFORE_POLLING) {
      es.close();
      startPolling();
    }
  };
}

setInterval(() => {
  if (lastUpdateMs && Date.now() - lastUpdateMs > STALE_AFTER_MS) {
    setConn("stale", `no update for ${((Date.now() - lastUpdateMs) / 1000).toFixed(0)} s`);
  }
}, 1000);

loadCoastline().then(() => { if (lastWorld) renderMap(lastWorld); });
startStream();
