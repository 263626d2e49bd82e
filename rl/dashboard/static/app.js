// The streamrl dashboard page: one server-sent-events stream (/events) brings a snapshot of each run, then
// deltas with what its files gained; every chart is redrawn from that state (coalesced to a few per second).
// With several runs their curves are overlaid (legend: run name); the header, heatmap, timeline, errors and
// samples show the run picked in the header. An exported file (streamrl dashboard --export) carries the same
// snapshots in window.STREAMRL_EXPORT and opens without a server.
"use strict";

const S = {           // the runs as this page knows them; window.streamrlDashboard for tests and the console
  runs: [], focus: 0, snapshots: 0, deltas: 0, renders: 0, ended: false, lastEvent: null, exported: false,
};
window.streamrlDashboard = S;

const CONFIG = {displayModeBar: "hover", displaylogo: false, responsive: true,
                modeBarButtonsToRemove: ["lasso2d", "select2d"]};
const KIND_COLORS = {generate: "#2f6fde", load_weights: "#f28e2b", train: "#3a9e4f", sync: "#d1495b",
                     reward: "#8c6bc8", idle: "#c9ced8", wait: "#c9ced8", checkpoint: "#8d6e63"};
const PALETTE = ["#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#9edae5", "#ff9896"];
const RUN_COLORS = ["#2f6fde", "#d1495b", "#3a9e4f", "#f28e2b", "#8c6bc8", "#17becf", "#8d6e63", "#e377c2"];
const DASHES = ["solid", "dot", "dash", "dashdot", "longdash", "longdashdot"];
const MAX_SPANS = 200000;
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- state from the stream
function applySnapshot(d) {
  S.runs[d.run || 0] = {
    name: d.name, runDir: d.run_dir, metrics: d.metrics, spans: d.spans, rewards: d.rewards, status: d.status,
    samplesTotal: d.samples_total, pace: d.pace, labels: d.labels || {}, errors: d.errors || [],
    errorsTotal: d.errors_total || 0, view: [],
  };
  S.runs.length = Math.min(S.runs.length, d.runs || 1);
  S.snapshots += 1;
}

function applyDelta(d) {
  const r = S.runs[d.run || 0];
  if (!r) return;  // a delta before its snapshot cannot happen on one stream; ignore rather than break
  r.metrics.push(...d.metrics);
  r.spans.push(...d.spans);
  if (r.spans.length > MAX_SPANS) r.spans.splice(0, r.spans.length - MAX_SPANS);  // as the server keeps
  if (d.rewards) r.rewards = d.rewards;
  Object.assign(r, {name: d.name, status: d.status, samplesTotal: d.samples_total, pace: d.pace,
                    labels: d.labels || r.labels, errors: d.errors || r.errors, errorsTotal: d.errors_total || 0});
  S.deltas += 1;
}

function connect() {
  if (window.STREAMRL_EXPORT) { loadExport(window.STREAMRL_EXPORT); return; }
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

function loadExport(data) {
  for (const snap of data.runs) applySnapshot(snap);
  S.exported = true; S.exportSamples = data.samples;
  setConn("export", "exported file: a copy of the run as it was, no server");
  render();
}

function seen() { S.lastEvent = Date.now(); schedule(); }
function setConn(cls, text) { const c = $("conn"); c.className = "conn " + cls; c.textContent = text; }

let pending = null;
function schedule() { if (!pending) pending = setTimeout(() => { pending = null; render(); }, 250); }

// ---------------------------------------------------------------- helpers
const finite = (v) => typeof v === "number" && isFinite(v);
const focus = () => S.runs[S.focus] || S.runs[0] || {metrics: [], spans: [], rewards: {versions: []}, status: {},
                                                     labels: {}, errors: [], view: []};
const multi = () => S.runs.length > 1;

function byStep(records) {  // the metrics by step, the last record of a step winning (a resumed run repeats the
  const last = new Map();   // steps after its checkpoint), sorted by step; rebuilt on each render
  for (const r of records) last.set(r.step, r);
  return [...last.values()].sort((a, b) => a.step - b.step);
}

function runNames() {  // the legend's run names: status.json's name, the directory's where two runs share one
  const names = S.runs.map((r) => r.name || "run");
  const dup = (n) => names.filter((x) => x === n).length > 1;
  const dirs = S.runs.map((r, i) => dup(names[i]) ? (r.runDir || "").split("/").filter(Boolean).pop() || names[i] : names[i]);
  return dirs.map((n, i) => dirs.filter((x) => x === n).length > 1 ? `${n} #${i + 1}` : n);
}

function series(run, key) {
  const x = [], y = [];
  for (const r of run.view) if (finite(r[key])) { x.push(r.step); y.push(r[key]); }
  return {x, y};
}

function keys(re) {
  const out = new Set();
  for (const run of S.runs) for (const r of run.view) for (const k in r) if (re.test(k) && finite(r[k])) out.add(k);
  return [...out].sort();
}

function label(k) {
  for (const run of S.runs) if (run.labels[k]) return run.labels[k];
  return k;
}

// Line traces of `ks` for every run. One run: one trace per key, named by `names[k]` or the key's label.
// Several: colour = run, dash = key; named by the run (and the key, when the chart has several or `keyInName`).
function lines(ks, {names = {}, extra = {}, perKey = {}, keyInName = ks.length > 1} = {}) {
  const out = [], runNamesNow = runNames();
  S.runs.forEach((run, i) => ks.forEach((k, j) => {
    const what = names[k] || label(k);
    const t = {...series(run, k), type: "scatter", mode: "lines+markers", marker: {size: 4}, ...extra, ...(perKey[k] || {})};
    if (!multi()) { out.push({...t, name: what}); return; }
    const color = RUN_COLORS[i % RUN_COLORS.length];
    out.push({...t, name: keyInName ? `${runNamesNow[i]} · ${what}` : runNamesNow[i], legendgroup: runNamesNow[i],
              line: {...(t.line || {}), color, dash: DASHES[j % DASHES.length]}, marker: {...t.marker, color}});
  }));
  return out;
}

// A right-hand axis with round ticks of its own: plotly otherwise aligns them to the left axis's grid
// ("sync"), which puts them at values such as 15.573.
function rightAxis(title, extra = {}) {
  return {title: {text: title}, overlaying: "y", side: "right", showgrid: false, tickmode: "auto", nticks: 6,
          rangemode: "tozero", automargin: true, ...extra};
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
  Plotly.react($(id), traces, {...base, ...layout, xaxis: {...base.xaxis, ...(layout.xaxis || {})}}, CONFIG);
}

function fmtDuration(s) {
  if (!finite(s) || s < 0) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
}

// ---------------------------------------------------------------- header
function stepsDone(run) {
  const st = run.status;
  return finite(st.steps_done) ? st.steps_done : run.view.length;
}

function renderHeader() {
  const run = focus(), st = run.status;
  $("run-name").textContent = multi() ? runNames().join(" vs ") : st.name || run.name || "";
  const state = st.state || "waiting";
  $("state").textContent = state; $("state").className = "badge " + state;
  $("step").textContent = stepsDone(run);
  $("total").textContent = finite(st.total_steps) ? st.total_steps : "?";
  $("run-dir").textContent = st.run_dir || run.runDir || "";
  $("error").textContent = st.error || "";
  const links = $("links"); links.replaceChildren();
  for (const [name, url] of Object.entries(st.links || {})) {
    const a = document.createElement("a"); a.href = url; a.textContent = name; a.target = "_blank"; links.append(a);
  }
  const pick = $("run-select"), names = runNames();
  $("run-pick").hidden = !multi();
  if (pick.options.length !== names.length || [...pick.options].some((o, i) => o.text !== names[i])) {
    pick.replaceChildren(...names.map((n, i) => new Option(n, String(i))));
  }
  pick.value = String(S.focus);
  for (const el of document.querySelectorAll(".run-of")) el.textContent = multi() ? `(run ${names[S.focus]})` : "";
  tick();
}

// Seconds left: steps left times the pace of the last steps (the server's `pace`: the whole-run average would
// count the slow start-up), less the time the current step has run; the whole-run average only without it.
function timeLeft(run, now) {
  const st = run.status, left = (st.total_steps || 0) - stepsDone(run);
  if (st.state !== "running") return {text: "–"};
  if (left <= 0) return {text: "0s"};
  const p = run.pace;
  if (p && finite(p.s_per_step)) {
    const since = Math.max(now - p.last_time, 0);
    const s = Math.max(p.s_per_step * left - since, p.s_per_step * (left - 1));
    return {text: fmtDuration(s), title: `${left} steps at ${p.s_per_step.toFixed(2)} s/step (the pace of the last ${p.steps} steps)`};
  }
  const done = stepsDone(run) - (st.start_step || 0), elapsed = now - st.started_at;
  return done > 0 ? {text: fmtDuration(elapsed / done * left), title: "at the whole run's average pace"} : {text: "…"};
}

function tick() {
  const run = focus(), st = run.status;
  if (!finite(st.started_at)) return;
  const now = Date.now() / 1000, end = finite(st.finished_at) ? st.finished_at : now;
  $("elapsed").textContent = fmtDuration(end - st.started_at);
  const eta = timeLeft(run, now);
  $("eta").textContent = eta.text;
  $("eta-stat").title = eta.title || "";
}

// ---------------------------------------------------------------- charts
function renderReward() {
  if (multi()) {  // one mean line per run; the ± std bands would hide each other
    draw("chart-reward", lines(["reward/mean"]));
    return;
  }
  const run = focus(), m = series(run, "reward/mean"), sd = series(run, "reward/std");
  const std = new Map(sd.x.map((x, i) => [x, sd.y[i]]));
  const lo = m.y.map((v, i) => v - (std.get(m.x[i]) || 0)), hi = m.y.map((v, i) => v + (std.get(m.x[i]) || 0));
  draw("chart-reward", [
    {x: m.x, y: lo, type: "scatter", mode: "lines", line: {width: 0}, showlegend: false, hoverinfo: "skip"},
    {x: m.x, y: hi, type: "scatter", mode: "lines", line: {width: 0}, fill: "tonexty",
     fillcolor: "rgba(47,111,222,0.15)", name: "± std", hoverinfo: "skip"},
    {...m, type: "scatter", mode: "lines+markers", marker: {size: 4}, name: "reward/mean", line: {color: "#2f6fde"}},
  ]);
}

function versionColumns(r) {  // each heatmap column's x (its centre) and its versions in words
  const x = r.versions.map((v, i) => (v + (r.last ? r.last[i] : v)) / 2);
  const span = r.versions.map((v, i) => (r.last && r.last[i] !== v ? `versions ${v}–${r.last[i]}` : `version ${v}`));
  return {x, span};
}

function renderRewardDist() {
  const r = focus().rewards;
  if (!r.versions || !r.versions.length) {
    draw("chart-reward-dist", [], {emptyText: "no rollout log yet (<run_dir>/datastore)"});
    return;
  }
  const rows = r.discrete ? r.bins.map(String) : r.bins;  // distinct rewards: one equal-height row each
  const z = r.bins.map((_, b) => r.share.map((row) => row[b]));
  const {x, span} = versionColumns(r);
  const traces = [
    {type: "heatmap", x, y: rows, z, zmin: 0, zmax: 1, name: "share", customdata: r.bins.map(() => span),
     colorscale: [[0, "#ffffff"], [0.05, "#dbe7fb"], [1, "#1f5fbf"]],
     colorbar: {thickness: 10, len: 0.8, x: 1.12, title: {text: "share", side: "right"}},
     hovertemplate: "%{customdata}<br>reward ≈ %{y:.3g}<br>share %{z:.1%}<extra></extra>"},
  ];
  const names = runNames();
  S.runs.forEach((run, i) => {
    const d = run.rewards;
    if (!d.versions || !d.versions.length || (i !== S.focus && !multi())) return;
    const cols = versionColumns(d);
    traces.push({x: cols.x, y: d.mean, type: "scatter", mode: "lines+markers", yaxis: "y2",
                 name: multi() ? `${names[i]}: mean reward` : "mean reward",
                 line: {color: multi() ? RUN_COLORS[i % RUN_COLORS.length] : "#d1495b"},
                 customdata: d.n.map((n, k) => [cols.span[k], n]),
                 hovertemplate: "%{customdata[0]}: mean %{y:.3f} over %{customdata[1]} samples<extra></extra>"});
  });
  const pooled = r.width > 1 ? ` (${r.width} versions a column)` : "";
  draw("chart-reward-dist", traces,
       {xaxis: {title: {text: `policy version that generated the sample${pooled}`}},
        yaxis: {title: {text: "reward"}, type: r.discrete ? "category" : "linear", automargin: true},
        yaxis2: rightAxis("mean", r.discrete ? {range: catRange(r.bins), rangemode: "normal"} : {rangemode: "normal"})});
}

function catRange(bins) {  // the value range that puts evenly spaced values on their category rows
  const lo = bins[0], hi = bins[bins.length - 1], half = bins.length > 1 ? (hi - lo) / (bins.length - 1) / 2 : 0.5;
  return [lo - half, hi + half];
}

function renderSimple(id, re, layout = {}) { draw(id, lines(keys(re)), layout); }

function renderThroughput() {
  const ks = ["throughput/gen_tokens_per_s", "throughput/rewarded_per_s", "throughput/samples_per_s"];
  const names = {"throughput/gen_tokens_per_s": "tokens/s generated", "throughput/rewarded_per_s": "samples/s rewarded",
                 "throughput/samples_per_s": "samples/s trained"};
  const right = {yaxis: "y2"};
  draw("chart-throughput", lines(ks, {names, perKey: {"throughput/rewarded_per_s": right, "throughput/samples_per_s": right}}),
       {yaxis: {title: {text: "tokens/s"}, automargin: true, rangemode: "tozero"}, yaxis2: rightAxis("samples/s")});
}

function stalenessTotals(run) {
  const total = new Map();
  let last = null;
  for (const r of run.view) {
    const h = r["staleness/hist"];
    if (h && typeof h === "object") {
      last = h;
      for (const [lag, n] of Object.entries(h)) if (finite(n)) total.set(+lag, (total.get(+lag) || 0) + n);
    }
  }
  return {total, last};
}

function renderStaleness() {
  const per = S.runs.map(stalenessTotals), names = runNames();
  const lags = [...new Set(per.flatMap((p) => [...p.total.keys()]))].sort((a, b) => a - b);
  if (!lags.length) {  // a controller that writes no staleness/hist yet: its mean and max per step
    renderSimple("chart-staleness", /^staleness\/(mean|max)$/, {yaxis: {title: {text: "versions"}, automargin: true},
                 emptyText: "no staleness metrics yet"});
    $("staleness-note").textContent = "(no staleness/hist in the metrics: mean and max per step)";
    return;
  }
  const share = (m, l, n) => ((m && (m.get ? m.get(l) : m[l])) || 0) / (n || 1);
  const count = (m) => lags.reduce((n, l) => n + ((m && (m.get ? m.get(l) : m[l])) || 0), 0);
  const traces = [];
  per.forEach(({total, last}, i) => {
    const nAll = count(total), nLast = count(last);
    if (!nAll) return;
    const who = multi() ? `${names[i]}: ` : "";
    traces.push({x: lags, y: lags.map((l) => share(total, l, nAll)), type: "bar", name: `${who}whole run (${nAll} samples)`,
                 ...(multi() ? {marker: {color: RUN_COLORS[i % RUN_COLORS.length]}} : {}),
                 customdata: lags.map((l) => total.get(l) || 0), hovertemplate: "lag %{x}: %{y:.1%} (%{customdata})<extra></extra>"});
    if (!multi()) {
      traces.push({x: lags, y: lags.map((l) => share(last, l, nLast)), type: "bar", name: `last step (${nLast} samples)`,
                   marker: {color: "#f28e2b"}, hovertemplate: "lag %{x}: %{y:.1%}<extra></extra>"});
    }
  });
  draw("chart-staleness", traces, {
    barmode: "group", xaxis: {title: {text: "lag (versions)"}, dtick: 1},
    yaxis: {title: {text: "share of samples"}, tickformat: ".0%", automargin: true},
  });
  const run = focus(), mean = series(run, "staleness/mean"), max = series(run, "staleness/max");
  $("staleness-note").textContent = mean.y.length
    ? `last step${multi() ? ` of ${names[S.focus]}` : ""}: mean ${mean.y[mean.y.length - 1].toFixed(2)}, `
      + `max ${max.y.length ? max.y[max.y.length - 1] : "?"}` : "";
}

function renderQueues() {
  // queues per consumer; of the per-field counts only rows waiting for their reward (the rest move together).
  // The legend says each in words (rl/dashboard/labels.py); rows held, on the right axis, is of another scale.
  const ks = keys(/^datastore\/[^/]+\/(depth|in_flight)\/|^datastore\/[^/]+\/unready\/reward$|^datastore\/waiting_(puts|takes)$/);
  const traces = lines(ks);
  if (keys(/^datastore\/rows_held$/).length) {
    traces.push(...lines(["datastore/rows_held"], {keyInName: true, extra: {yaxis: "y2", mode: "lines",
                                                           line: multi() ? {} : {dash: "dot", color: "#999"}}}));
  }
  draw("chart-queues", traces, {yaxis: {title: {text: "rows, calls"}, automargin: true, rangemode: "tozero"},
                                yaxis2: rightAxis("rows held")});
}

function renderStepTime() {  // lines, not stacks: the trainer's times (time/update_s, ...) lie inside time/train_s
  draw("chart-steptime", lines(keys(/^time\/.+_s$/)), {yaxis: {title: {text: "seconds"}, automargin: true}});
}

function renderErrors() {
  const traces = lines(["reward/errors"], {names: {"reward/errors": "errors"},
                                           extra: multi() ? {} : {type: "bar", marker: {color: "#b3261e"}}})
    .concat(lines(["reward/abandoned_calls"], {names: {"reward/abandoned_calls": "calls abandoned at their timeout (so far)"}})
      .filter((t) => t.y.some((v) => v > 0)));  // only where a call was given up
  draw("chart-errors", traces, {yaxis: {title: {text: "samples"}, automargin: true, rangemode: "tozero"},
                                margin: {l: 55, r: 55, t: 8, b: 30}, showlegend: multi(),
                                emptyText: "no reward/errors in the metrics yet"});
  const run = focus(), total = series(run, "reward/errors").y.reduce((n, v) => n + v, 0);
  const abandoned = series(run, "reward/abandoned_calls").y, gaveUp = abandoned.length ? abandoned[abandoned.length - 1] : 0;
  $("errors-note").textContent = `${total} in the run` + (run.errorsTotal ? `, ${run.errorsTotal} in the rollout log` : "")
    + (gaveUp ? `; ${gaveUp} calls abandoned at their timeout` : "");
  const list = $("errors-list");
  list.replaceChildren(...run.errors.map((e) => {
    const li = document.createElement("li"), msg = document.createElement("span"), where = document.createElement("span");
    msg.className = "msg"; msg.textContent = e.error;
    where.className = "where"; where.textContent = ` (version ${e.version ?? "?"}, sample ${e.index ?? "?"})`;
    li.title = `prompt: ${e.prompt ?? ""}\nresponse: ${e.response ?? ""}`;
    li.append(msg, where);
    return li;
  }));
  if (!run.errors.length) {
    const li = document.createElement("li"); li.className = "where none";
    li.textContent = total ? "messages: in the rollout log's reward_info (<run_dir>/datastore), none read yet"
                           : "no reward errors";
    list.append(li);
  }
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
  const run = focus(), spans = run.spans;
  if (!spans.length) { draw("chart-timeline", [], {emptyText: "no spans in timeline.jsonl yet"}); return; }
  const t0 = finite(run.status.started_at) ? Math.min(run.status.started_at, spans[0][2]) : spans[0][2];
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
let samplesShownFor = "", samplesQuery = "", samplesTimer = null, samplesBusy = false;

function exportedSamples(run, query) {  // an exported file's search: the same match as the server's, here
  const d = S.exportSamples[run], q = query.trim().toLowerCase();
  const hay = (x) => ["prompt", "response", "version", "reward", "worker"].map((k) => String(x[k] ?? "")).join(" ").toLowerCase();
  return {...d, rows: d.rows.filter((x) => !q || hay(x).includes(q)).slice(0, 100)};
}

async function loadSamples() {
  if (samplesBusy) return;
  samplesBusy = true;
  try {
    let d;
    if (S.exported) {
      d = exportedSamples(S.focus, samplesQuery);
    } else {
      const ctl = new AbortController();
      const timer = setTimeout(() => ctl.abort(), 10000);
      const res = await fetch(`/api/samples?run=${S.focus}&limit=100&q=${encodeURIComponent(samplesQuery)}`, {signal: ctl.signal});
      clearTimeout(timer);
      d = await res.json();
    }
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
  const now = `${S.focus}:${focus().samplesTotal}`;
  if (now !== samplesShownFor) { samplesShownFor = now; loadSamples(); }
}

// ---------------------------------------------------------------- all of it
function render() {
  for (const run of S.runs) run.view = byStep(run.metrics);
  renderHeader();
  renderReward();
  renderRewardDist();
  renderSimple("chart-length", /^response\/len/, {yaxis: {title: {text: "tokens"}, automargin: true}});
  renderSimple("chart-kl", /^actor\/kl/);
  renderSimple("chart-entropy", /^actor\/entropy/);
  renderSimple("chart-clip", /^actor\/clip/);
  renderSimple("chart-gradnorm", /grad_norm$/);
  renderSimple("chart-loss", /^(actor|critic)\/.*loss$/);
  renderSimple("chart-eval", /^eval\/(reward_mean|pass@\d+)$/, {yaxis: {title: {text: "held-out reward, pass@k"}, automargin: true},
                                                                   emptyText: "no eval rounds (recipe key eval.every)"});
  renderThroughput();
  renderStaleness();
  renderQueues();
  renderStepTime();
  renderErrors();
  renderTimeline();
  maybeLoadSamples();
  S.renders += 1;
}

$("search").addEventListener("input", (e) => {
  clearTimeout(samplesTimer);
  samplesTimer = setTimeout(() => { samplesQuery = e.target.value; loadSamples(); }, 250);
});
$("timeline-window").addEventListener("change", renderTimeline);
$("run-select").addEventListener("change", (e) => { S.focus = +e.target.value; render(); });
setInterval(tick, 1000);
connect();
