// The streamrl dashboard page: one server-sent-events stream (/events) brings a snapshot of the run, then
// deltas with what its files gained; every chart is redrawn from that state (coalesced to a few per second).
"use strict";

const S = {           // the run as this page knows it; window.streamrlDashboard for tests and the console
  metrics: [], spans: [], rewards: {versions: []}, status: {}, samplesTotal: 0,
  snapshots: 0, deltas: 0, renders: 0, ended: false, lastEvent: null,
};
window.streamrlDashboard = S;

const CONFIG = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"]};
const KIND_COLORS = {generate: "#2f6fde", load_weights: "#f28e2b", train: "#3a9e4f", sync: "#d1495b",
                     reward: "#8c6bc8", idle: "#c9ced8", wait: "#c9ced8", checkpoint: "#8d6e63"};
const PALETTE = ["#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#9edae5", "#ff9896"];
const MAX_SPANS = 200000;
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- state from the stream
function applySnapshot(d) {
  S.metrics = d.metrics; S.spans = d.spans; S.rewards = d.rewards; S.status = d.status;
  S.samplesTotal = d.samples_total; S.runDir = d.run_dir; S.snapshots += 1;
}

function applyDelta(d) {
  S.metrics.push(...d.metrics);
  S.spans.push(...d.spans);
  if (S.spans.length > MAX_SPANS) S.spans.splice(0, S.spans.length - MAX_SPANS);  // as the server keeps
  if (d.rewards) S.rewards = d.rewards;
  S.status = d.status; S.samplesTotal = d.samples_total; S.deltas += 1;
}

function connect() {
  const es = new EventSource("/events");
  es.onopen = () => setConn("live", "live");
  es.addEventListener("snapshot", (e) => { applySnapshot(JSON.parse(e.data)); seen(); });
  es.addEventListener("delta", (e) => { applyDelta(JSON.parse(e.data)); seen(); });
  es.addEventListener("end", () => {
    S.ended = true; es.close();
    setConn("down", "run ended, server stopped (streamrl dashboard RUN_DIR shows it again)");
  });
  es.onerror = () => { if (!S.ended) setConn("down", "reconnecting…"); };
}

function seen() { S.lastEvent = Date.now(); schedule(); }
function setConn(cls, text) { const c = $("conn"); c.className = "conn " + cls; c.textContent = text; }

let pending = null;
function schedule() { if (!pending) pending = setTimeout(() => { pending = null; render(); }, 250); }

// ---------------------------------------------------------------- helpers
const finite = (v) => typeof v === "number" && isFinite(v);

let VIEW = [];  // the metrics by step, the last record of a step winning (a resumed run repeats the steps
               // after its checkpoint), sorted by step; rebuilt on each render

function byStep(records) {
  const last = new Map();
  for (const r of records) last.set(r.step, r);
  return [...last.values()].sort((a, b) => a.step - b.step);
}

function series(key) {
  const x = [], y = [];
  for (const r of VIEW) if (finite(r[key])) { x.push(r.step); y.push(r[key]); }
  return {x, y};
}

function keys(re) {
  const out = new Set();
  for (const r of VIEW) for (const k in r) if (re.test(k) && finite(r[k])) out.add(k);
  return [...out].sort();
}

function lines(ks, extra = {}) {
  return ks.map((k) => ({...series(k), name: k, type: "scatter", mode: "lines+markers", marker: {size: 4}, ...extra}));
}

function draw(id, traces, layout = {}) {
  const points = traces.reduce((n, t) => n + ((t.x || t.z || []).length), 0);
  const base = {
    margin: {l: 55, r: 55, t: 8, b: 40}, showlegend: true, legend: {orientation: "h", y: -0.3, font: {size: 10}},
    xaxis: {title: {text: "step", standoff: 4}, automargin: true}, yaxis: {automargin: true},
    paper_bgcolor: "#fff", plot_bgcolor: "#fff", font: {size: 11},
    annotations: points ? [] : [{text: layout.emptyText || "waiting for data", showarrow: false,
                                  xref: "paper", yref: "paper", x: 0.5, y: 0.5, font: {color: "#999"}}],
  };
  delete layout.emptyText;
  Plotly.react($(id), traces, {...base, ...layout, xaxis: {...base.xaxis, ...(layout.xaxis || {})}});
}

function fmtDuration(s) {
  if (!finite(s) || s < 0) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}

// ---------------------------------------------------------------- header
function stepsDone() {
  const st = S.status;
  return finite(st.steps_done) ? st.steps_done : VIEW.length;
}

function renderHeader() {
  const st = S.status;
  $("run-name").textContent = st.name || "";
  const state = st.state || "waiting";
  $("state").textContent = state; $("state").className = "badge " + state;
  $("step").textContent = stepsDone();
  $("total").textContent = finite(st.total_steps) ? st.total_steps : "?";
  $("run-dir").textContent = st.run_dir || S.runDir || "";
  $("error").textContent = st.error || "";
  const links = $("links"); links.replaceChildren();
  for (const [name, url] of Object.entries(st.links || {})) {
    const a = document.createElement("a"); a.href = url; a.textContent = name; a.target = "_blank"; links.append(a);
  }
  tick();
}

function tick() {
  const st = S.status;
  if (!finite(st.started_at)) return;
  const end = finite(st.finished_at) ? st.finished_at : Date.now() / 1000;
  const elapsed = end - st.started_at;
  $("elapsed").textContent = fmtDuration(elapsed);
  const done = stepsDone() - (st.start_step || 0), left = (st.total_steps || 0) - stepsDone();
  $("eta").textContent = st.state !== "running" ? "–" : done > 0 ? fmtDuration(elapsed / done * left) : "…";
}

// ---------------------------------------------------------------- charts
function renderReward() {
  const m = series("reward/mean"), sd = series("reward/std");
  const std = new Map(sd.x.map((x, i) => [x, sd.y[i]]));
  const lo = m.y.map((v, i) => v - (std.get(m.x[i]) || 0)), hi = m.y.map((v, i) => v + (std.get(m.x[i]) || 0));
  draw("chart-reward", [
    {x: m.x, y: lo, type: "scatter", mode: "lines", line: {width: 0}, showlegend: false, hoverinfo: "skip"},
    {x: m.x, y: hi, type: "scatter", mode: "lines", line: {width: 0}, fill: "tonexty",
     fillcolor: "rgba(47,111,222,0.15)", name: "± std", hoverinfo: "skip"},
    {...m, type: "scatter", mode: "lines+markers", marker: {size: 4}, name: "reward/mean", line: {color: "#2f6fde"}},
  ]);
}

function renderRewardDist() {
  const r = S.rewards;
  if (!r.versions || !r.versions.length) {
    draw("chart-reward-dist", [], {emptyText: "no rollout log yet (<run_dir>/datastore)"});
    return;
  }
  const rows = r.discrete ? r.bins.map(String) : r.bins;  // distinct rewards: one equal-height row each
  const z = r.bins.map((_, b) => r.share.map((row) => row[b]));
  draw("chart-reward-dist", [
    {type: "heatmap", x: r.versions, y: rows, z, zmin: 0, zmax: 1, name: "share",
     colorscale: [[0, "#ffffff"], [0.05, "#dbe7fb"], [1, "#1f5fbf"]],
     colorbar: {thickness: 10, len: 0.8, x: 1.12, title: {text: "share", side: "right"}},
     hovertemplate: "version %{x}<br>reward ≈ %{y:.3g}<br>share %{z:.1%}<extra></extra>"},
    {x: r.versions, y: r.mean, type: "scatter", mode: "lines+markers", name: "mean reward", yaxis: "y2",
     line: {color: "#d1495b"}, customdata: r.n,
     hovertemplate: "version %{x}: mean %{y:.3f} over %{customdata} samples<extra></extra>"},
  ], {xaxis: {title: {text: "policy version that generated the sample"}},
      yaxis: {title: {text: "reward"}, type: r.discrete ? "category" : "linear", automargin: true},
      yaxis2: {overlaying: "y", side: "right", showgrid: false, title: {text: "mean"}, automargin: true,
               range: r.discrete ? catRange(r.bins) : undefined}});
}

function catRange(bins) {  // the value range that puts evenly spaced values on their category rows
  const lo = bins[0], hi = bins[bins.length - 1], half = bins.length > 1 ? (hi - lo) / (bins.length - 1) / 2 : 0.5;
  return [lo - half, hi + half];
}

function renderSimple(id, re, layout = {}) { draw(id, lines(keys(re)), layout); }

function renderThroughput() {
  const t = [
    {...series("throughput/gen_tokens_per_s"), name: "tokens/s generated", type: "scatter", mode: "lines+markers",
     marker: {size: 4}},
    {...series("throughput/rewarded_per_s"), name: "samples/s rewarded", yaxis: "y2", type: "scatter",
     mode: "lines+markers", marker: {size: 4}},
    {...series("throughput/samples_per_s"), name: "samples/s trained", yaxis: "y2", type: "scatter",
     mode: "lines+markers", marker: {size: 4}},
  ];
  draw("chart-throughput", t, {yaxis: {title: {text: "tokens/s"}, automargin: true},
                               yaxis2: {title: {text: "samples/s"}, overlaying: "y", side: "right", automargin: true}});
}

function renderStaleness() {
  const total = new Map();
  let last = null;
  for (const r of VIEW) {
    const h = r["staleness/hist"];
    if (h && typeof h === "object") {
      last = h;
      for (const [lag, n] of Object.entries(h)) if (finite(n)) total.set(+lag, (total.get(+lag) || 0) + n);
    }
  }
  const lags = [...total.keys()].sort((a, b) => a - b);
  const sum = (f) => lags.reduce((n, l) => n + f(l), 0);
  const nAll = sum((l) => total.get(l)), nLast = sum((l) => (last && last[l]) || 0);
  if (!lags.length) {  // a controller that writes no staleness/hist yet: its mean and max per step
    renderSimple("chart-staleness", /^staleness\/(mean|max)$/, {yaxis: {title: {text: "versions"}, automargin: true},
                 emptyText: "no staleness metrics yet"});
    $("staleness-note").textContent = "(no staleness/hist in the metrics: mean and max per step)";
    return;
  }
  const traces = [
    {x: lags, y: lags.map((l) => total.get(l) / nAll), type: "bar", name: `whole run (${nAll} samples)`,
     customdata: lags.map((l) => total.get(l)), hovertemplate: "lag %{x}: %{y:.1%} (%{customdata})<extra></extra>"},
    {x: lags, y: lags.map((l) => ((last && last[l]) || 0) / (nLast || 1)), type: "bar",
     name: `last step (${nLast} samples)`, marker: {color: "#f28e2b"}, hovertemplate: "lag %{x}: %{y:.1%}<extra></extra>"},
  ];
  draw("chart-staleness", traces, {
    barmode: "group", xaxis: {title: {text: "lag (versions)"}, dtick: 1},
    yaxis: {title: {text: "share of samples"}, tickformat: ".0%", automargin: true},
  });
  const mean = series("staleness/mean"), max = series("staleness/max");
  $("staleness-note").textContent = mean.y.length
    ? `last step: mean ${mean.y[mean.y.length - 1].toFixed(2)}, max ${max.y.length ? max.y[max.y.length - 1] : "?"}` : "";
}

function renderQueues() {
  // queues per consumer; of the per-field counts only rows waiting for their reward (the rest move together)
  const ks = keys(/^datastore\/[^/]+\/(depth|in_flight)\/|^datastore\/[^/]+\/unready\/reward$|^datastore\/waiting_(puts|takes)$/);
  const traces = lines(ks);
  const held = series("datastore/rows_held");
  if (held.x.length) traces.push({...held, name: "datastore/rows_held", yaxis: "y2", type: "scatter", mode: "lines",
                                  line: {dash: "dot", color: "#999"}});
  draw("chart-queues", traces, {yaxis: {title: {text: "rows"}, automargin: true},
                                yaxis2: {title: {text: "rows held"}, overlaying: "y", side: "right", automargin: true}});
}

function renderStepTime() {  // lines, not stacks: the trainer's times (time/update_s, ...) lie inside time/train_s
  draw("chart-steptime", lines(keys(/^time\/.+_s$/)), {yaxis: {title: {text: "seconds"}, automargin: true}});
}

// ---------------------------------------------------------------- timeline
function actorOrder(a) {
  const rank = a === "controller" ? 0 : a.startsWith("trainer") ? 1 : a.startsWith("rollout") ? 2 : a.startsWith("reward") ? 3 : 4;
  return [rank, a];
}

function busyShare(spans, from, to) {
  const iv = spans.map((s) => [Math.max(s[2], from), Math.min(s[3], to)]).filter(([a, b]) => b > a).sort((p, q) => p[0] - q[0]);
  let busy = 0, curA = null, curB = null;
  for (const [a, b] of iv) {
    if (curB === null || a > curB) { if (curB !== null) busy += curB - curA; curA = a; curB = b; }
    else curB = Math.max(curB, b);
  }
  if (curB !== null) busy += curB - curA;
  return to > from ? busy / (to - from) : 0;
}

function renderTimeline() {
  const spans = S.spans;
  if (!spans.length) { draw("chart-timeline", [], {emptyText: "no spans in timeline.jsonl yet"}); return; }
  const t0 = finite(S.status.started_at) ? Math.min(S.status.started_at, spans[0][2]) : spans[0][2];
  let tEnd = 0;
  for (const s of spans) if (s[3] > tEnd) tEnd = s[3];
  const win = +$("timeline-window").value;
  const from = win > 0 ? Math.max(t0, tEnd - win) : t0;
  const shown = spans.filter((s) => s[3] >= from);
  const byActor = new Map();
  for (const s of shown) { if (!byActor.has(s[0])) byActor.set(s[0], []); byActor.get(s[0]).push(s); }
  const actors = [...byActor.keys()].sort((a, b) => {
    const [ra, na] = actorOrder(a), [rb, nb] = actorOrder(b);
    return ra - rb || na.localeCompare(nb);
  });
  const label = new Map(actors.map((a) => [a, `${a} · ${Math.round(100 * busyShare(byActor.get(a), from, tEnd))}% busy`]));
  const kinds = [...new Set(shown.map((s) => s[1]))].sort();
  const traces = kinds.map((k, i) => {
    const ks = shown.filter((s) => s[1] === k);
    return {type: "bar", orientation: "h", name: k, y: ks.map((s) => label.get(s[0])),
            base: ks.map((s) => s[2] - t0), x: ks.map((s) => Math.max(s[3] - s[2], 1e-3)),
            marker: {color: KIND_COLORS[k] || PALETTE[i % PALETTE.length]}, width: 0.7,
            hovertemplate: `%{y}<br>${k} at %{base:.2f}s for %{x:.3f}s<extra></extra>`};
  });
  draw("chart-timeline", traces, {
    barmode: "overlay", xaxis: {title: {text: "seconds since the run started"}, range: [from - t0, tEnd - t0]},
    yaxis: {categoryorder: "array", categoryarray: actors.map((a) => label.get(a)).reverse(), automargin: true},
    margin: {l: 10, r: 20, t: 8, b: 38},
  });
}

// ---------------------------------------------------------------- samples table
let samplesShownFor = -1, samplesQuery = "", samplesTimer = null, samplesBusy = false;

async function loadSamples() {
  if (samplesBusy) return;
  samplesBusy = true;
  try {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 10000);
    const res = await fetch(`/api/samples?limit=100&q=${encodeURIComponent(samplesQuery)}`, {signal: ctl.signal});
    clearTimeout(timer);
    const d = await res.json();
    const body = $("samples").tBodies[0];
    body.replaceChildren(...d.rows.map(sampleRow));
    $("samples-info").textContent = !d.has_log
      ? "no rollout log in <run_dir>/datastore (datastore.log off, or nothing finished yet)"
      : `${d.rows.length} shown${samplesQuery ? " matching" : ""} · newest ${d.kept} of ${d.total} samples searched`;
    S.samplesShown = d.rows.length;
  } catch (e) {
    $("samples-info").textContent = "samples: " + e;
  } finally {
    samplesBusy = false;
  }
}

function cell(text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; }

function sampleRow(s) {
  const tr = document.createElement("tr");
  const r = finite(s.reward) ? s.reward : null;
  if (r !== null && r > 0) tr.className = "good";
  tr.append(cell(s.version ?? "", "num"), cell(r === null ? "" : r.toFixed(3), "num reward"), cell(s.length ?? "", "num"),
            cell(s.prompt ?? "", "text"), cell(s.response ?? "", "text"), cell(s.finish_reason ?? ""), cell(s.worker ?? ""));
  return tr;
}

function maybeLoadSamples() {
  if (S.samplesTotal !== samplesShownFor) { samplesShownFor = S.samplesTotal; loadSamples(); }
}

// ---------------------------------------------------------------- all of it
function render() {
  VIEW = byStep(S.metrics);
  renderHeader();
  renderReward();
  renderRewardDist();
  renderSimple("chart-length", /^response\/len/, {yaxis: {title: {text: "tokens"}, automargin: true}});
  renderSimple("chart-kl", /^actor\/kl/);
  renderSimple("chart-entropy", /^actor\/entropy/);
  renderSimple("chart-clip", /^actor\/clip/);
  renderSimple("chart-gradnorm", /grad_norm$/);
  renderSimple("chart-loss", /^(actor|critic)\/.*loss$/);
  renderThroughput();
  renderStaleness();
  renderQueues();
  renderStepTime();
  renderTimeline();
  maybeLoadSamples();
  S.renders += 1;
}

$("search").addEventListener("input", (e) => {
  clearTimeout(samplesTimer);
  samplesTimer = setTimeout(() => { samplesQuery = e.target.value; loadSamples(); }, 250);
});
$("timeline-window").addEventListener("change", renderTimeline);
setInterval(tick, 1000);
connect();
