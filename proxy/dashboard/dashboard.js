// openai-proxy dashboard: polls /cache/dashboard and renders it with plain DOM APIs.
// API data is only ever written through textContent / attributes, never as HTML.

const DASHBOARD_URL = "/cache/dashboard";
const KEY_STORAGE = "openai-proxy-admin-key";
// Every 5 seconds, or as often as `?refresh=SECONDS` asks (1 to 3600).
const POLL_INTERVAL_MS = pollIntervalFromUrl(5);
const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_HEIGHT = 220;
const CHART_MARGIN = { top: 12, right: 14, bottom: 28, left: 40 };
const SERIES = ["requests", "hits", "misses"];
const PROMPT_MAX_CHARS = 80;
const CACHE_BADGE_CLASSES = {
  HIT: "badge-hit", MISS: "badge-miss", BYPASS: "badge-neutral",
  REFRESH: "badge-neutral", STALE: "badge-stale", EXPIRED: "badge-stale",
};
const WEEKDAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

const state = { data: null, range: "hour", pollTimer: null, hoverIndex: null, chart: null };
const byId = (id) => document.getElementById(id);
const integerFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const compactFormat = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });

// ---------- formatting ----------

const formatInteger = (value) => integerFormat.format(value);
const formatPercent = (ratio) => `${(ratio * 100).toFixed(1)}%`;
const pad2 = (value) => String(value).padStart(2, "0");

function formatBytes(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${formatInteger(value)} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function formatUsd(usd) {
  if (usd === 0) return "$0.00";
  if (Math.abs(usd) < 0.0001) {
    // A few cached calls of a cheap model: show the two significant digits rather than $0.0000.
    return `$${usd.toLocaleString("en-US", { maximumSignificantDigits: 2 })}`;
  }
  const digits = Math.abs(usd) >= 1 ? 2 : 4;
  return `$${usd.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits })}`;
}

function formatDuration(seconds) {
  if (seconds < 60) return `${Number(seconds.toFixed(1))} s`;
  const total = Math.round(seconds);
  const [days, hours, minutes, secs] = [Math.floor(total / 86400), Math.floor(total / 3600) % 24,
    Math.floor(total / 60) % 60, total % 60];
  if (days > 0) return `${days} d ${hours} h`;
  if (hours > 0) return `${hours} h ${minutes} min`;
  return `${minutes} min ${secs} s`;
}

function formatClock(unixSeconds, withSeconds = true) {
  const date = new Date(unixSeconds * 1000);
  const hm = `${pad2(date.getHours())}:${pad2(date.getMinutes())}`;
  return withSeconds ? `${hm}:${pad2(date.getSeconds())}` : hm;
}

function formatDay(unixSeconds) {
  const date = new Date(unixSeconds * 1000);
  return `${WEEKDAYS[date.getDay()]} ${date.getDate()}`;
}

function truncateText(text, maxChars) {
  const chars = Array.from(text);
  return chars.length > maxChars ? `${chars.slice(0, maxChars).join("")}…` : text;
}

// ---------- fetching and polling ----------

function pollIntervalFromUrl(defaultSeconds) {
  const asked = Number(new URLSearchParams(location.search).get("refresh"));
  const seconds = Number.isFinite(asked) && asked >= 1 ? Math.min(asked, 3600) : defaultSeconds;
  return seconds * 1000;
}

function schedulePoll() {
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(refresh, POLL_INTERVAL_MS);
}

async function readErrorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return String(body.error.message);
  } catch {
    // not JSON: fall back to the status line
  }
  return `${response.status} ${response.statusText}`.trim();
}

async function refresh() {
  clearTimeout(state.pollTimer);
  const key = sessionStorage.getItem(KEY_STORAGE);
  let response;
  let data;
  try {
    response = await fetch(DASHBOARD_URL, {
      cache: "no-store",
      headers: key ? { Authorization: `Bearer ${key}` } : {},
    });
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_STORAGE);
      showKeyForm(key ? await readErrorMessage(response) : "");
      return; // polling resumes once a key is submitted
    }
    if (response.status === 403) {
      showAccessError(await readErrorMessage(response));
      schedulePoll();
      return;
    }
    if (!response.ok) {
      // The proxy answers but cannot read its figures (the cache store is down, say): say why.
      showConnectionLost(await readErrorMessage(response));
      schedulePoll();
      return;
    }
    data = await response.json();
  } catch {
    showConnectionLost("Connection lost");
    schedulePoll();
    return;
  }
  schedulePoll();
  showDashboard(data);
}

// ---------- page states ----------

const PANELS = ["loading", "content", "auth-panel", "access-error"];

// One of the page's panels at a time; the connection notice goes with any change of panel.
function showPanel(shown) {
  for (const id of PANELS) byId(id).hidden = id !== shown;
  byId("connection").hidden = true;
}

function showKeyForm(message) {
  showPanel("auth-panel");
  const error = byId("auth-error");
  error.textContent = message;
  error.hidden = !message;
  byId("admin-key").focus();
}

function submitKey(event) {
  event.preventDefault();
  const input = byId("admin-key");
  const key = input.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  input.value = "";
  byId("auth-panel").hidden = true;
  refresh();
}

function showAccessError(message) {
  showPanel("access-error");
  byId("access-error-message").textContent = message;
}

function showConnectionLost(reason) {
  const notice = byId("connection");
  notice.textContent = `${reason} (retrying…)`;
  notice.hidden = false;
  if (!state.data) setText("loading", `${reason} (retrying every few seconds…)`);
}

function isCacheEmpty(data) {
  const { stats } = data;
  return stats.hits + stats.misses === 0 && stats.entries === 0 && data.recent.length === 0;
}

function showDashboard(data) {
  state.data = data;
  showPanel("content");
  renderHealth(data.health);
  renderCards(data.stats);
  renderCapacity(data.capacity, data.stats, data.health);
  const empty = isCacheEmpty(data);
  byId("empty-state").hidden = !empty;
  byId("activity").hidden = empty;
  byId("tables").hidden = empty;
  if (empty) {
    renderEmptyInstructions();
  } else {
    renderChart();
    renderTables(data);
  }
  byId("updated").textContent = `Last updated ${formatClock(Date.now() / 1000)}`;
}

// ---------- header, cards, capacity ----------

function renderHealth(health) {
  const badge = byId("health");
  badge.hidden = false;
  badge.textContent = health.ok ? "healthy" : `degraded: ${health.reason ?? "unknown"}`;
  badge.classList.toggle("ok", Boolean(health.ok));
  badge.classList.toggle("bad", !health.ok);
  badge.title = `Storage backend: ${health.backend}`;
}

function setFigure(id, value, text) {
  const element = byId(id);
  element.textContent = text;
  element.dataset.value = String(value);
}

function setText(id, text) {
  byId(id).textContent = text;
}

function renderCards(stats) {
  setFigure("hit-ratio", stats.hit_ratio, formatPercent(stats.hit_ratio));
  setText("hit-ratio-detail", `${formatInteger(stats.hits)} of ${formatInteger(stats.hits + stats.misses)} lookups`);
  setFigure("hits", stats.hits, formatInteger(stats.hits));
  setFigure("misses", stats.misses, formatInteger(stats.misses));
  setFigure("entries", stats.entries, formatInteger(stats.entries));
  setText("entries-detail", `${formatInteger(stats.stale)} stale, ${formatInteger(stats.evictions)} evicted`);
  setFigure("bytes", stats.bytes, formatBytes(stats.bytes));
  setText("bytes-detail", stats.entries > 0 ? `about ${formatBytes(stats.bytes / stats.entries)} per entry` : "nothing stored");
  const tokens = stats.tokens_saved;
  setFigure("tokens-saved", tokens.total, formatInteger(tokens.total));
  setText("tokens-saved-detail", `${formatInteger(tokens.input)} in / ${formatInteger(tokens.output)} out`);
  setFigure("cost-saved", stats.cost_saved_usd, formatUsd(stats.cost_saved_usd));
  const unpriced = stats.hits_without_price;
  setText("cost-saved-detail", unpriced > 0
    ? `${formatInteger(unpriced)} ${unpriced === 1 ? "hit" : "hits"} without a price` : "at list prices");
  setFigure("time-saved", stats.upstream_seconds_saved, formatDuration(stats.upstream_seconds_saved));
}

function renderMeter(id, used, limit, usedText) {
  const meter = byId(id);
  meter.dataset.value = String(used);
  meter.querySelector(".meter-text").textContent = usedText;
  const fraction = limit > 0 ? Math.min(1, used / limit) : 0;
  const fill = meter.querySelector(".meter-fill");
  fill.style.width = `${(fraction * 100).toFixed(2)}%`;
  fill.classList.toggle("warn", fraction >= 0.75 && fraction < 0.9);
  fill.classList.toggle("full", fraction >= 0.9);
  meter.classList.toggle("unlimited", limit <= 0);
  meter.title = limit > 0 ? `${formatPercent(fraction)} used` : "no limit configured";
}

function renderCapacity(capacity, stats, health) {
  const { bytes, max_bytes: maxBytes, entries, max_entries: maxEntries } = capacity;
  renderMeter("capacity-bytes", bytes, maxBytes,
    maxBytes > 0 ? `${formatBytes(bytes)} of ${formatBytes(maxBytes)}` : `${formatBytes(bytes)}, no limit`);
  renderMeter("capacity-entries", entries, maxEntries,
    maxEntries > 0 ? `${formatInteger(entries)} of ${formatInteger(maxEntries)} entries`
      : `${formatInteger(entries)} ${entries === 1 ? "entry" : "entries"}, no limit`);
  setText("backend-name", health.backend);
  setText("stale-count", formatInteger(stats.stale));
  setText("eviction-count", formatInteger(stats.evictions));
}

function renderEmptyInstructions() {
  const origin = window.location.origin;
  setText("empty-sdk-example", `from openai import OpenAI\n\nclient = OpenAI(base_url="${origin}/v1")`);
  setText("empty-curl-example", `curl ${origin}/v1/chat/completions \\\n`
    + '  -H "Authorization: Bearer $OPENAI_API_KEY" \\\n'
    + '  -H "Content-Type: application/json" \\\n'
    + `  -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}'`);
}

// ---------- chart ----------

function svgElement(name, attributes = {}, text = "") {
  const element = document.createElementNS(SVG_NS, name);
  for (const [attribute, value] of Object.entries(attributes)) element.setAttribute(attribute, String(value));
  if (text) element.textContent = text;
  return element;
}

function niceScale(maxValue, tickCount = 4) {
  if (maxValue <= 0) return { max: tickCount, step: 1 };
  const rough = maxValue / tickCount;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const step = Math.max(1, [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= rough));
  return { max: Math.ceil(maxValue / step) * step, step };
}

function pickTimeLabels(points, rangeName, xOf, minSpacing) {
  const isBoundary = (at) => {
    const date = new Date(at * 1000);
    return rangeName === "hour" ? date.getMinutes() % 10 === 0 : date.getHours() === 0;
  };
  const picked = [];
  let lastX = -Infinity;
  points.forEach((point, index) => {
    const x = xOf(index);
    if (isBoundary(point.at) && x - lastX >= minSpacing) {
      picked.push(index);
      lastX = x;
    }
  });
  return picked;
}

function renderChart() {
  const svg = byId("activity-chart");
  const { step_seconds: stepSeconds, points } = state.data.activity[state.range];
  const width = Math.round(svg.getBoundingClientRect().width) || 640;
  const plot = {
    left: CHART_MARGIN.left, top: CHART_MARGIN.top,
    width: Math.max(1, width - CHART_MARGIN.left - CHART_MARGIN.right),
    height: CHART_HEIGHT - CHART_MARGIN.top - CHART_MARGIN.bottom,
  };
  const scale = niceScale(Math.max(0, ...points.flatMap((p) => SERIES.map((s) => p[s]))));
  const xOf = (i) => plot.left + (points.length > 1 ? (i * plot.width) / (points.length - 1) : plot.width / 2);
  const yOf = (v) => plot.top + plot.height - (v / scale.max) * plot.height;
  state.chart = { width, plot, points, stepSeconds, xOf };

  svg.setAttribute("viewBox", `0 0 ${width} ${CHART_HEIGHT}`);
  svg.setAttribute("aria-label", `Requests, hits and misses over the ${state.range === "hour" ? "last hour" : "last 7 days"}`);
  svg.replaceChildren();
  for (let value = 0; value <= scale.max; value += scale.step) {
    const y = yOf(value).toFixed(1);
    svg.append(svgElement("line", { class: value === 0 ? "axis" : "grid", x1: plot.left, x2: plot.left + plot.width, y1: y, y2: y }));
    svg.append(svgElement("text", { class: "y-label", x: plot.left - 8, y, "dominant-baseline": "middle" }, compactFormat.format(value)));
  }
  const formatTick = state.range === "hour" ? (at) => formatClock(at, false) : formatDay;
  for (const index of pickTimeLabels(points, state.range, xOf, width < 500 ? 56 : 64)) {
    const x = xOf(index).toFixed(1);
    const bottom = plot.top + plot.height;
    svg.append(svgElement("line", { class: "tick", x1: x, x2: x, y1: bottom, y2: bottom + 4 }));
    // A label at the right edge ends there rather than being cut off by it.
    const atEnd = xOf(index) > width - CHART_MARGIN.right - 24;
    svg.append(svgElement("text", { class: atEnd ? "x-label at-end" : "x-label", x, y: bottom + 18 }, formatTick(points[index].at)));
  }
  for (const series of SERIES) {
    const coordinates = points.map((p, i) => `${xOf(i).toFixed(1)},${yOf(p[series]).toFixed(1)}`).join(" ");
    svg.append(svgElement("polyline", { class: `line series-${series}`, "data-series": series, points: coordinates }));
  }
  svg.append(svgElement("line", { id: "chart-guide", class: "guide", x1: 0, x2: 0, y1: plot.top, y2: plot.top + plot.height, visibility: "hidden" }));
  renderLegendTotals(points);
  if (state.hoverIndex !== null) showTooltip(Math.min(state.hoverIndex, points.length - 1));
}

function renderLegendTotals(points) {
  for (const total of document.querySelectorAll(".legend-total")) {
    const field = total.dataset.field;
    total.textContent = formatInteger(points.reduce((sum, p) => sum + p[field], 0));
  }
}

function describePointTime(at, stepSeconds) {
  if (stepSeconds >= 3600) return `${formatDay(at)}, ${formatClock(at, false)}–${formatClock(at + stepSeconds, false)}`;
  return formatClock(at, false);
}

function showTooltip(index) {
  const { points, xOf, width, stepSeconds } = state.chart;
  const point = points[index];
  const x = xOf(index);
  const guide = byId("chart-guide");
  guide.setAttribute("x1", x.toFixed(1));
  guide.setAttribute("x2", x.toFixed(1));
  guide.setAttribute("visibility", "visible");
  const tooltip = byId("chart-tooltip");
  setText("tooltip-time", describePointTime(point.at, stepSeconds));
  for (const value of tooltip.querySelectorAll(".tooltip-value")) value.textContent = formatInteger(point[value.dataset.field]);
  tooltip.hidden = false;
  const onRightHalf = x > width / 2;
  tooltip.style.left = onRightHalf ? "auto" : `${x + 12}px`;
  tooltip.style.right = onRightHalf ? `${width - x + 12}px` : "auto";
}

function trackPointer(event) {
  if (!state.chart) return;
  const { plot, points, width } = state.chart;
  const rect = event.currentTarget.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * width) / rect.width;
  const position = Math.round(((x - plot.left) / plot.width) * (points.length - 1));
  state.hoverIndex = Math.min(points.length - 1, Math.max(0, position));
  showTooltip(state.hoverIndex);
}

function hideTooltip() {
  state.hoverIndex = null;
  byId("chart-tooltip").hidden = true;
  const guide = byId("chart-guide");
  if (guide) guide.setAttribute("visibility", "hidden");
}

function selectRange(range) {
  state.range = range;
  byId("range-hour").setAttribute("aria-pressed", String(range === "hour"));
  byId("range-week").setAttribute("aria-pressed", String(range === "week"));
  hideTooltip();
  if (state.data) renderChart();
}

function redrawChartOnResize() {
  const chartVisible = state.data && !byId("content").hidden && !byId("activity").hidden;
  const width = Math.round(byId("activity-chart").getBoundingClientRect().width);
  if (chartVisible && state.chart && width !== state.chart.width) renderChart();
}

// ---------- tables ----------

function cell(content, className = "") {
  const td = document.createElement("td");
  if (content === null || content === undefined || content === "") {
    td.textContent = "-";
    td.classList.add("none");
  } else if (content instanceof Node) {
    td.append(content);
  } else {
    td.textContent = content;
  }
  if (className) td.classList.add(...className.split(" "));
  return td;
}

function fillTable(tableId, items, buildCells) {
  const table = byId(tableId);
  const rows = items.map((item) => {
    const row = document.createElement("tr");
    row.append(...buildCells(item, row));
    return row;
  });
  table.tBodies[0].replaceChildren(...rows);
  table.parentElement.querySelector(".no-rows").hidden = items.length > 0;
}

function savingsCells(figures) {
  const saved = cell(formatUsd(figures.cost_usd), "num");
  if (figures.hits_without_price > 0) {
    saved.title = `${figures.hits_without_price} hits without a price`;
    saved.classList.add("partial");
  }
  return [
    cell(formatInteger(figures.hits), "num"),
    cell(formatInteger(figures.input_tokens), "num"),
    cell(formatInteger(figures.output_tokens), "num"),
    saved,
    cell(formatDuration(figures.upstream_seconds), "num"),
  ];
}

function cacheBadge(cacheStatus) {
  if (!cacheStatus) return null;
  const badge = document.createElement("span");
  badge.className = `badge ${CACHE_BADGE_CLASSES[cacheStatus] ?? "badge-neutral"}`;
  badge.textContent = cacheStatus;
  return badge;
}

function renderTables(data) {
  const providers = Object.entries(data.stats.by_provider).sort((a, b) => b[1].hits - a[1].hits);
  fillTable("by-provider", providers, ([provider, figures]) => [cell(provider), ...savingsCells(figures)]);
  fillTable("by-model", data.stats.by_model, (row) => [cell(row.provider), cell(row.model, "mono"), ...savingsCells(row)]);

  byId("prompt-column").hidden = !data.show_prompts;
  fillTable("top-entries", data.top_entries, (entry, row) => {
    row.title = `key ${entry.key}`;
    const cells = [cell(entry.provider), cell(entry.endpoint, "mono"), cell(entry.model, "mono"),
      cell(entry.namespace), cell(formatInteger(entry.hits), "num"), cell(formatBytes(entry.size), "num")];
    if (data.show_prompts) {
      cells.push(cell(entry.prompt ? truncateText(entry.prompt, PROMPT_MAX_CHARS) : null, "prompt"));
    }
    return cells;
  });

  fillTable("recent", data.recent, (request) => [
    cell(formatClock(request.at), "time"),
    cell(request.method),
    cell(request.path, "mono path"),
    cell(request.model, "mono"),
    cell(String(request.status), request.status >= 400 ? "num status-error" : "num"),
    cell(cacheBadge(request.cache_status)),
    cell(`${request.duration_ms.toFixed(1)} ms`, "num"),
    cell(formatBytes(request.bytes), "num"),
  ]);
}

// ---------- start ----------

byId("key-form").addEventListener("submit", submitKey);
byId("range-hour").addEventListener("click", () => selectRange("hour"));
byId("range-week").addEventListener("click", () => selectRange("week"));
byId("activity-chart").addEventListener("pointermove", trackPointer);
byId("activity-chart").addEventListener("pointerleave", hideTooltip);
new ResizeObserver(redrawChartOnResize).observe(byId("chart-frame"));
refresh();
