/* pplex dashboard: polls the admin API's JSON routes, draws the tables and the charts.
 *
 * One cycle every two seconds (skipped while the tab is hidden): GET /stats, /upstreams and one
 * page of /connections, and /info every tenth cycle. Every two seconds, not every one: the page
 * must not cost the proxy measurable throughput (bench.dashboard), and each request is work on
 * pplex's reactor thread and its admin threads. Rates (messages/s, bytes/s, accepted/closed per
 * second, each worker's routed messages/s) are counter deltas between two cycles, computed here,
 * so pplex keeps no history for the page. Data only ever enters the page through textContent.
 */
(function () {
  "use strict";

  const POLL_MS = 2000;
  const HISTORY_POINTS = 150;  // 5 minutes of two-second samples per chart
  const MIN_WINDOW_POINTS = 30;
  const PAGE_SIZE = 20;        // connections per page
  const INFO_EVERY = 10;       // cycles between two reads of /info (and /cluster)
  const TOKEN_KEY = "pplex.adminToken";

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let locked = false;          // the token prompt is up: no polling
  let polling = false;         // a cycle is in flight
  let again = false;           // a button asked for a fresh cycle while one was in flight
  let cycles = 0;
  let previous = null;         // {at, stats, routed: Map id -> messages_routed}
  let info = null, infoAt = 0;
  let search = "", offset = 0, shown = 0;
  let hasCluster = null;       // null: not asked yet; false: this pplex has no /cluster route
  const history = {messagesIn: [], messagesOut: [], bytesIn: [], bytesOut: []};

  class AuthError extends Error {}

  async function api(method, path, body) {
    const headers = {};
    if (token) headers.Authorization = "Bearer " + token;
    const init = {method, headers, cache: "no-store"};
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (ignored) { data = null; }
    if (response.status === 401) throw new AuthError((data && data.error) || "the admin token is needed");
    if (!response.ok) {
      const error = new Error((data && data.error) || `${method} ${path}: HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  // -- the cycle ---------------------------------------------------------------------------------
  async function poll() {
    if (locked) return;
    if (polling) { again = true; return; }
    polling = true;
    try {
      const page = `/connections?limit=${PAGE_SIZE}&offset=${offset}` +
                   (search ? "&q=" + encodeURIComponent(search) : "");
      const wantInfo = cycles % INFO_EVERY === 0;
      const [stats, upstreams, connections, newInfo] = await Promise.all([
        api("GET", "/stats"), api("GET", "/upstreams"), api("GET", page),
        wantInfo ? api("GET", "/info") : null]);
      if (locked) return;
      const now = performance.now();
      if (newInfo) { info = newInfo; infoAt = now; renderInfo(); }
      renderStats(stats, now);
      renderWorkers(upstreams.upstreams, now);
      renderConnections(connections);
      remember(stats, upstreams.upstreams, now);
      if (wantInfo) cluster();
      cycles += 1;
      $("dashboard").hidden = false;
      $("sign-out").hidden = !token;
      fresh();
    } catch (error) {
      if (error instanceof AuthError) lock(token ? "Wrong token: the admin API refused it." : null);
      else stale(error.message);
    } finally {
      polling = false;
      if (again) { again = false; poll(); }
    }
  }

  function loop() {
    const run = document.visibilityState === "hidden" ? Promise.resolve() : poll();
    run.finally(() => setTimeout(loop, POLL_MS));
  }

  function fresh() {
    const badge = $("freshness");
    badge.classList.remove("stale");
    badge.textContent = "live · " + new Date().toLocaleTimeString();
  }

  function stale(why) {
    const badge = $("freshness");
    badge.classList.add("stale");
    badge.textContent = "no answer: " + why;
  }

  // -- the token ---------------------------------------------------------------------------------
  function lock(message) {
    locked = true;
    if (token) sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    clearData();
    $("login-message").textContent = message ||
      "This pplex asks for its admin token (management_server.token).";
    $("login").hidden = false;
    $("token").value = "";
    $("token").focus();
  }

  function clearData() {
    $("dashboard").hidden = true;
    $("sign-out").hidden = true;
    for (const table of ["workers", "connections", "counters", "drops", "cluster"]) {
      $(table).querySelector("tbody").replaceChildren();
    }
    $("plugins").replaceChildren();
    for (const dd of document.querySelectorAll("dd")) dd.textContent = "–";
    for (const series of Object.values(history)) series.length = 0;
    previous = null; info = null; cycles = 0; hasCluster = null;
    $("notice").hidden = true;
    $("cluster-section").hidden = true;
    document.title = "pplex";
    $("freshness").classList.add("stale");
    $("freshness").textContent = "token needed";
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value;
    sessionStorage.setItem(TOKEN_KEY, token);
    locked = false;
    $("login").hidden = true;
    poll();
  });

  $("sign-out").addEventListener("click", () => lock("Token forgotten."));

  // -- rendering helpers ---------------------------------------------------------------------------
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function button(label, action, key, className) {
    const node = el("button", className || "quiet", label);
    node.type = "button";
    node.dataset.action = action;
    node.dataset.key = key;
    return node;
  }

  /* Keeps one <tr> per key, updated in place, so a button under the pointer survives a refresh. */
  function syncRows(tbody, items, keyOf, build, update, emptyText, columns) {
    const existing = new Map();
    for (const row of tbody.querySelectorAll("tr[data-key]")) existing.set(row.dataset.key, row);
    const empty = tbody.querySelector("tr.empty");
    if (empty) empty.remove();
    items.forEach((item, index) => {
      const key = String(keyOf(item));
      let row = existing.get(key);
      if (row) existing.delete(key);
      else { row = build(item); row.dataset.key = key; }
      update(row, item);
      if (tbody.children[index] !== row) tbody.insertBefore(row, tbody.children[index] || null);
    });
    for (const row of existing.values()) row.remove();
    if (!items.length) {
      const row = el("tr", "empty");
      const cell = el("td", null, emptyText);
      cell.colSpan = columns;
      row.append(cell);
      tbody.append(row);
    }
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "–" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function rate(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    if (value < 10) return value.toFixed(1);
    if (value < 10000) return Math.round(value).toString();
    if (value < 1e6) return (value / 1e3).toFixed(1) + "k";
    return (value / 1e6).toFixed(2) + "M";
  }

  function bytes(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return (unit && value < 10 ? value.toFixed(1) : Math.round(value)) + " " + units[unit];
  }

  function millis(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    return (seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1) + " ms";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    seconds = Math.floor(seconds);
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " m " + (seconds % 60) + " s";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor(seconds % 3600 / 60) + " m";
    return Math.floor(seconds / 86400) + " d " + Math.floor(seconds % 86400 / 3600) + " h";
  }

  /* Per second, between this cycle and the last; null on the first cycle or after a counter reset. */
  function perSecond(current, before, seconds) {
    if (before === undefined || before === null || seconds <= 0 || current < before) return null;
    return (current - before) / seconds;
  }

  // -- sections ----------------------------------------------------------------------------------
  function renderInfo() {
    setText($("info-version"), info.version);
    setText($("info-transport"), info.transport);
    setText($("info-node"), info.node);
    setText($("info-listen"), info.listen);
    const list = $("plugins");
    list.replaceChildren(...info.plugins.map((plugin) => {
      const item = el("li", null, plugin.name);
      item.append(el("span", null, plugin.slot || "observer"));
      return item;
    }));
  }

  function renderStats(stats, now) {
    if (info) setText($("info-uptime"), duration(info.uptime_seconds + (now - infoAt) / 1000));
    const seconds = previous ? (now - previous.at) / 1000 : 0;
    const before = previous ? previous.stats : {};
    setText($("clients-open"), stats.connections_open);
    setText($("clients-refused"), stats.connections_refused);
    setText($("clients-accepted-rate"), rate(perSecond(stats.connections_opened, before.connections_opened, seconds)));
    setText($("clients-closed-rate"), rate(perSecond(stats.connections_closed, before.connections_closed, seconds)));
    const series = [
      ["messagesIn", "messages_in", "rate-messages-in", "chart-messages-in", rate],
      ["messagesOut", "messages_out", "rate-messages-out", "chart-messages-out", rate],
      ["bytesIn", "bytes_in", "rate-bytes-in", "chart-bytes-in", (v) => bytes(v) + "/s"],
      ["bytesOut", "bytes_out", "rate-bytes-out", "chart-bytes-out", (v) => bytes(v) + "/s"],
    ];
    for (const [name, counter, label, canvas, format] of series) {
      const value = perSecond(stats[counter], before[counter], seconds);
      if (value !== null) {
        history[name].push(value);
        if (history[name].length > HISTORY_POINTS) history[name].shift();
      }
      setText($(label), value === null ? "–" : format(value));
      drawChart($(canvas), history[name], format);
    }
    const counters = [
      ["messages in", stats.messages_in], ["messages out", stats.messages_out],
      ["bytes in", bytes(stats.bytes_in)], ["bytes out", bytes(stats.bytes_out)],
      ["re-routed", stats.rerouted], ["unconfirmed", stats.unconfirmed],
      ["broadcasts", stats.broadcasts], ["batches", stats.batches],
      ["clients accepted", stats.connections_opened], ["clients closed", stats.connections_closed],
    ];
    const known = new Set(["connections_open", "connections_opened", "connections_closed", "connections_refused",
      "messages_in", "messages_out", "bytes_in", "bytes_out", "rerouted", "unconfirmed", "broadcasts",
      "batches", "drops"]);
    for (const [key, value] of Object.entries(stats)) {  // counters a newer pplex adds show up as they are
      if (known.has(key)) continue;
      if (value !== null && typeof value === "object") {
        for (const [inner, count] of Object.entries(value)) counters.push([key + ": " + inner, count]);
      } else {
        counters.push([key.replace(/_/g, " "), value]);
      }
    }
    syncRows($("counters").querySelector("tbody"), counters, (row) => row[0],
      () => { const row = el("tr"); row.append(el("td"), el("td", "num")); return row; },
      (row, item) => { setText(row.cells[0], item[0]); setText(row.cells[1], item[1]); }, "", 2);
    const drops = Object.entries(stats.drops || {}).sort((a, b) => b[1] - a[1]);
    syncRows($("drops").querySelector("tbody"), drops, (row) => row[0],
      () => { const row = el("tr"); row.append(el("td", "mono"), el("td", "num")); return row; },
      (row, item) => { setText(row.cells[0], item[0]); setText(row.cells[1], item[1]); },
      "nothing dropped", 2);
  }

  function renderWorkers(upstreams, now) {
    const seconds = previous ? (now - previous.at) / 1000 : 0;
    const routedBefore = previous ? previous.routed : new Map();
    const ready = upstreams.filter((u) => u.state === "ready").length;
    setText($("workers-summary"), `${ready} of ${upstreams.length} ready`);
    document.title = `pplex · ${ready}/${upstreams.length} ready`;
    syncRows($("workers").querySelector("tbody"), upstreams, (u) => u.id,
      (u) => {
        const row = el("tr");
        row.append(el("td", "mono"), el("td", "mono"), el("td"), el("td", "num"), el("td", "num"),
                   el("td", "num"), el("td", "num"), el("td", "error"), el("td", "actions"));
        row.cells[2].append(el("span", "state"));
        row.cells[8].append(button("Drain", "drain", u.id), button("Remove", "remove", u.id, "danger"));
        return row;
      },
      (row, u) => {
        setText(row.cells[0], u.id);
        setText(row.cells[1], u.address);
        const badge = row.cells[2].firstChild;
        setText(badge, u.state);
        badge.className = "state " + u.state;
        setText(row.cells[3], millis(u.live_rtt_seconds));
        setText(row.cells[4], millis(u.ready_probe_seconds));
        setText(row.cells[5], rate(perSecond(u.messages_routed, routedBefore.get(u.id), seconds)));
        setText(row.cells[6], u.messages_routed);
        setText(row.cells[7], u.last_error || "");
        row.cells[8].querySelector("[data-action=drain]").disabled = u.state !== "ready";
        row.dataset.address = u.address;
      }, "no workers: add one below", 9);
  }

  function renderConnections(page) {
    const total = page.matched !== undefined ? page.matched : page.count;
    shown = page.connections.length;
    const first = shown ? page.offset + 1 : 0;
    setText($("page-label"), `${first}–${page.offset + shown} of ${total}` +
            (page.matched !== undefined ? ` matching (${page.count} open)` : ""));
    $("prev-page").disabled = page.offset === 0;
    $("next-page").disabled = page.offset + shown >= total;
    if (!shown && page.offset > 0 && total > 0) {  // the page emptied under us: step back
      offset = Math.max(0, Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE);
    }
    syncRows($("connections").querySelector("tbody"), page.connections, (c) => c.uuid,
      (c) => {
        const row = el("tr");
        row.append(el("td", "mono"), el("td", "mono"), el("td", "mono"), el("td", "num"), el("td"),
                   el("td", "num"), el("td", "num"), el("td", "actions"));
        row.cells[7].append(button("Close", "close", c.uuid, "danger"));
        return row;
      },
      (row, c) => {
        setText(row.cells[0], c.uuid);
        setText(row.cells[1], c.remote);
        setText(row.cells[2], c.worker);
        setText(row.cells[3], duration(c.age));
        setText(row.cells[4], c.active ? "active" : "idle");
        setText(row.cells[5], bytes(c.bytes_in));
        setText(row.cells[6], bytes(c.bytes_out));
      }, search ? "no connection matches" : "no client connected", 8);
  }

  function remember(stats, upstreams, now) {
    previous = {at: now, stats, routed: new Map(upstreams.map((u) => [u.id, u.messages_routed]))};
  }

  async function cluster() {
    if (hasCluster === false) return;
    try {
      const data = await api("GET", "/cluster");
      hasCluster = true;
      const nodes = Array.isArray(data.nodes) ? data.nodes : [];
      const columns = [...new Set(nodes.flatMap((n) => Object.keys(n).filter((k) => typeof n[k] !== "object")))];
      const head = el("tr");
      head.append(...columns.map((c) => el("th", null, c)));
      $("cluster").querySelector("thead").replaceChildren(head);
      syncRows($("cluster").querySelector("tbody"), nodes, (n) => n.node || n.id || JSON.stringify(n),
        () => { const row = el("tr"); row.append(...columns.map(() => el("td"))); return row; },
        (row, n) => columns.forEach((c, i) => row.cells[i] && setText(row.cells[i], n[c])),
        "no node", Math.max(1, columns.length));
      $("cluster-section").hidden = false;
    } catch (error) {
      if (error.status === 404) hasCluster = false;  // else: try again at the next /info read
    }
  }

  // -- charts ------------------------------------------------------------------------------------
  const css = getComputedStyle(document.documentElement);
  const lineColour = css.getPropertyValue("--accent").trim() || "#2f5fc6";
  const mutedColour = css.getPropertyValue("--muted").trim() || "#6a7385";

  /* A sparkline of `points` (newest at the right edge, one slot per cycle). */
  function drawChart(canvas, points, format) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    if (points.length < 2) return;
    let top = 0;
    for (const value of points) if (value > top) top = value;
    const scale = (height - 16) / (top > 0 ? top * 1.1 : 1);
    // The window grows from one minute to five as history builds up (one point per cycle).
    const step = width / (Math.min(HISTORY_POINTS, Math.max(MIN_WINDOW_POINTS, points.length)) - 1);
    const x0 = width - (points.length - 1) * step;
    g.beginPath();
    points.forEach((value, i) => {
      const x = x0 + i * step, y = height - 2 - value * scale;
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.strokeStyle = lineColour;
    g.lineWidth = 1.5;
    g.stroke();
    g.lineTo(width, height);
    g.lineTo(x0, height);
    g.closePath();
    g.globalAlpha = 0.12;
    g.fillStyle = lineColour;
    g.fill();
    g.globalAlpha = 1;
    g.fillStyle = mutedColour;
    g.font = "10px sans-serif";
    g.fillText("max " + format(top), 4, 11);
  }

  // -- actions -----------------------------------------------------------------------------------
  function notice(text, isError) {
    const box = $("notice");
    box.textContent = text;
    box.className = isError ? "notice error" : "notice";
    box.hidden = false;
  }

  async function act(run, done) {
    try {
      const result = await run();
      notice(done(result));
    } catch (error) {
      if (error instanceof AuthError) lock("The admin API refused the token.");
      else notice(error.message, true);
    }
    poll();
  }

  document.addEventListener("click", (event) => {
    const target = event.target.closest("button[data-action]");
    if (!target || target.disabled) return;
    const key = target.dataset.key;
    if (target.dataset.action === "drain") {
      act(() => api("POST", `/upstreams/${encodeURIComponent(key)}/drain`),
          () => `${key} is draining: no new messages; it leaves once it has answered what it was given.`);
    } else if (target.dataset.action === "remove") {
      const address = target.closest("tr").dataset.address;
      if (!window.confirm(`Remove worker ${key} (${address})? What it was given and never wrote goes to the other workers.`)) return;
      act(() => api("DELETE", `/upstreams/${encodeURIComponent(key)}`), () => `${key} removed.`);
    } else if (target.dataset.action === "close") {
      act(() => api("DELETE", `/connections/${encodeURIComponent(key)}`), () => `connection ${key} closed.`);
    }
  });

  $("add-worker").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    const body = {host: form.host.value.trim(), port: Number(form.port.value)};
    for (const name of ["alive_timeout", "ready_timeout"]) {
      if (form[name].value.trim() !== "") body[name] = Number(form[name].value);
    }
    act(() => api("POST", "/upstreams", body), (added) => {
      form.reset();
      return `${added.id} added (${added.address}); it joins rotation once it answers ready.`;
    });
  });

  let searchTimer = null;
  $("search").addEventListener("input", (event) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      search = event.target.value.trim();
      offset = 0;
      poll();
    }, 250);
  });
  $("prev-page").addEventListener("click", () => { offset = Math.max(0, offset - PAGE_SIZE); poll(); });
  $("next-page").addEventListener("click", () => { offset += PAGE_SIZE; poll(); });

  loop();
}());
