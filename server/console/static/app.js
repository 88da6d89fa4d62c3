// quiver console: plain JavaScript, no build step, no dependencies (server/console/README.md says why).
// Every call goes to quiver's public API with the signed-in key; the DOM is built with textContent only.
"use strict";

const KEY = "quiver.key";
const state = { key: sessionStorage.getItem(KEY), admin: false, base: null, timers: [] };
const $main = () => document.getElementById("main");

// ---- DOM helper: h("tag.class", {attr}, ...children); strings become text nodes (never HTML) ----
function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag);
  if (classes.length) el.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c.nodeType ? c : String(c));
  return el;
}
const svg = (tag, attrs) => {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
};
const fmtBytes = (n) => n >= 1048576 ? (n / 1048576).toFixed(1) + " MiB" : n >= 1024 ? (n / 1024).toFixed(1) + " KiB" : n + " B";
const fmtTime = (s) => s ? new Date(s * 1000).toLocaleString() : "";

// ---- the API: errors arrive in OpenAI's envelope and are thrown as ApiError ----
class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    Object.assign(this, { status, code: e.code || null, param: e.param || null });
  }
}
async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (state.key) headers.Authorization = "Bearer " + state.key;
  let body = opts.body;
  if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(opts.json); }
  const res = await fetch(path, { method: opts.method || "GET", headers, body });
  if (opts.raw) { if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null)); return res; }
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}
const errorBox = (err) => h("div.errorbox", { role: "alert" },
  err.code ? h("code", {}, err.code) : null, err.code ? ": " : null, err.message);

// ---- sign-in ----
async function signIn(key) {
  state.key = key;
  await api("/v1/models");  // 401 for a wrong key
  try { await api("/v1/adapters"); state.admin = true; }
  catch (err) { if (err.status !== 403) throw err; state.admin = false; }
  sessionStorage.setItem(KEY, key);
}
function signOut() {
  sessionStorage.removeItem(KEY);
  Object.assign(state, { key: null, admin: false });
  location.hash = "";
  render();
}
function signInPage(message) {
  const input = h("input", { id: "key", type: "password", autocomplete: "current-password", required: true, size: 40 });
  const out = h("div", { "aria-live": "polite" }, message ? errorBox({ message }) : null);
  const form = h("form.card", { onsubmit: async (ev) => {
    ev.preventDefault();
    out.replaceChildren();
    try { await signIn(input.value.trim()); location.hash = "#/adapters"; render(); }
    catch (err) { state.key = null; out.append(errorBox(err)); }
  } },
    h("h1", {}, "Sign in"),
    h("label", { for: "key" }, "API key ", h("span.hint", {}, "(admin, API or tenant key; kept in this browser tab only)")),
    input, " ", h("button", { type: "submit" }, "Sign in"), out);
  $main().replaceChildren(form);
  input.focus();
}

// ---- small SVG charts ----
function lineChart({ series, width = 220, height = 70, label, yFormat = (v) => v }) {
  const all = series.flatMap((s) => s.points).filter((p) => p[1] !== null && p[1] !== undefined);
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label });
  const title = svg("title"); title.textContent = label; root.append(title);
  root.append(svg("rect", { x: 0, y: 0, width, height, fill: "#fafbfc", stroke: "#c9ccd4" }));
  if (!all.length) {
    const t = svg("text", { x: 8, y: height / 2 }); t.textContent = "no data yet"; root.append(t);
    return root;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(0, ...ys), Math.max(...ys)];
  const pad = 14, sx = (x) => pad + (x1 === x0 ? (width - 2 * pad) / 2 : (x - x0) / (x1 - x0) * (width - 2 * pad));
  const sy = (y) => height - pad - (y1 === y0 ? 0 : (y - y0) / (y1 - y0) * (height - 2 * pad));
  for (const s of series) {
    const pts = s.points.filter((p) => p[1] !== null && p[1] !== undefined);
    if (!pts.length) continue;
    root.append(svg("polyline", { points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
      fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.name, "data-points": pts.length }));
    for (const p of pts.length < 40 ? pts : []) root.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.2, fill: s.color }));
  }
  const top = svg("text", { x: 3, y: 11 }); top.textContent = yFormat(y1); root.append(top);
  const bottom = svg("text", { x: 3, y: height - 3 }); bottom.textContent = yFormat(y0); root.append(bottom);
  return root;
}
const figure = (caption, chart) => h("figure.chart", {}, chart, h("figcaption", {}, caption));

// ---- pages ----
async function adaptersPage() {
  const root = h("div", {}, h("h1", {}, "Adapters"));
  $main().replaceChildren(root);
  const [adapters, summary] = await Promise.all([loadAdapters(), api("/v1/metrics/summary").catch(() => null)]);
  if (state.admin) root.append(registerCard());
  if (!adapters.length) root.append(h("p", {}, "No adapters yet."));
  const jobs = state.admin ? (await api("/v1/fine_tuning/jobs?limit=100").catch(() => ({ data: [] }))).data : [];
  for (const a of adapters) {
    const card = adapterCard(a, summary && summary.adapters[a.name]);
    const job = jobs.find((j) => j.fine_tuned_model === a.name);
    // the training manifest (data hash, hyperparameters, losses) lives with the job that trained it
    if (job) card.querySelector("h2").after(h("p", {}, "Trained by job ", h("a", { href: `#/jobs/${job.id}` }, job.id), " (manifest, loss curve)"));
    root.append(card);
  }
  if (summary && summary.adapters[state.base]) {
    root.append(h("h2", {}, `Base model ${state.base}`), metricCharts(summary.adapters[state.base]));
  }
}

// Admin keys read the registry; other keys see only what /v1/models shows them (their own adapters).
async function loadAdapters() {
  const models = (await api("/v1/models")).data;
  state.base = (models.find((m) => !m.parent) || {}).id;
  if (state.admin) return (await api("/v1/adapters")).data.sort((x, y) => x.name.localeCompare(y.name));
  const byName = {};
  for (const m of models) {
    if (!m.parent) continue;
    const [name, version] = m.id.split("@");
    const a = byName[name] || (byName[name] = { name, versions: [], current_version: null });
    if (version) a.versions.push({ id: m.id, version: Number(version), created_at: m.created, current: false });
    else a.current_version = Number(m.root.split("@")[1]);
  }
  for (const a of Object.values(byName)) for (const v of a.versions) v.current = v.version === a.current_version;
  return Object.values(byName).sort((x, y) => x.name.localeCompare(y.name));
}

function metricCharts(points) {
  points = points || [];
  const xy = (key) => points.map((p) => [p.t, p[key]]);
  const s = (v) => v === null || v === undefined ? "–" : (v < 1 ? (v * 1000).toFixed(0) + " ms" : v.toFixed(1) + " s");
  return h("div.charts", {},
    figure("requests / interval", lineChart({ label: "requests", series: [{ name: "requests", color: "#0b57d0", points: xy("requests") }] })),
    figure("completion tokens / s", lineChart({ label: "tokens per second", series: [{ name: "tokens", color: "#146c2e", points: xy("tokens_per_s") }], yFormat: (v) => v.toFixed(1) })),
    figure("latency p50 (blue) / p99 (red)", lineChart({ label: "latency", yFormat: s, series: [
      { name: "p50", color: "#0b57d0", points: xy("p50_s") }, { name: "p99", color: "#b3261e", points: xy("p99_s") }] })),
    figure("error rate", lineChart({ label: "error rate", series: [{ name: "errors", color: "#b3261e", points: xy("error_rate") }], yFormat: (v) => (v * 100).toFixed(0) + "%" })));
}

function adapterCard(a, points) {
  const rows = [...a.versions].sort((x, y) => y.version - x.version).map((v) => h("tr", { "data-version": v.version },
    h("td", {}, h("code", {}, v.id || `${a.name}@${v.version}`)),
    h("td", {}, v.current ? h("span.badge.current", {}, "current") : h("span.badge.staged", {}, "staged")),
    h("td", {}, v.rank ?? "–"), h("td", {}, v.alpha ?? "–"),
    h("td", {}, v.target_modules ? v.target_modules.join(", ") : "–"),
    h("td", {}, v.size_bytes ? fmtBytes(v.size_bytes) : "–"), h("td", {}, fmtTime(v.created_at)),
    h("td", {}, state.admin ? [
      v.current ? null : h("button.secondary", { type: "button", onclick: () => act(`Make ${a.name}@${v.version} current?`,
        () => api(`/v1/adapters/${a.name}/promote`, { method: "POST", json: { version: v.version } })) },
        v.version < a.current_version ? "Roll back to this" : "Promote"), " ",
      h("button.danger", { type: "button", onclick: () => act(`Delete ${a.name}@${v.version}? Requests can no longer use it.`,
        () => api(`/v1/adapters/${a.name}@${v.version}`, { method: "DELETE" })) }, "Delete"),
      v.files ? h("details", {}, h("summary", {}, "manifest"), h("pre", {}, JSON.stringify(v, null, 2))) : null,
    ] : null)));
  return h("section.card", { "data-adapter": a.name, "aria-label": `adapter ${a.name}` },
    h("h2", {}, a.name, " ", h("span.hint", {}, `current version ${a.current_version} · base ${state.base}`)),
    h("div.scroll", {}, h("table", {}, h("thead", {}, h("tr", {}, ["version", "state", "rank", "alpha", "target modules", "size", "created", ""].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows))),
    state.admin ? h("button.danger", { type: "button", onclick: () => act(`Delete ${a.name} and all its versions?`,
      () => api(`/v1/adapters/${a.name}`, { method: "DELETE" })) }, `Delete ${a.name}`) : null,
    h("h2", {}, "Last hour"), metricCharts(points));
}

async function act(question, call) {
  if (!confirm(question)) return;
  try { await call(); render(); }
  catch (err) { $main().prepend(errorBox(err)); }
}

function registerCard() {
  let files = [];
  const list = h("ul.files", { "aria-live": "polite" });
  const out = h("div", { "aria-live": "polite" });
  const name = h("input", { id: "reg-name", required: true, pattern: "[a-z0-9][a-z0-9._\\-]{0,63}", placeholder: "support-bot" });
  const input = h("input", { id: "reg-files", type: "file", multiple: true });
  const show = (err) => {
    // The API refuses the upload as a whole: its reason is shown right under the file(s) it is about.
    // next to the file its message names, else under the list.
    const named = err && files.find((f) => err.message.includes(f.name));
    const refusal = () => h("span.error.upload-error", { role: "alert" }, " ✗ refused: ", h("code", {}, err.code || "error"), " ", err.message);
    list.replaceChildren(...files.map((f) => h("li", { "data-file": f.name }, h("code", {}, f.name), ` (${fmtBytes(f.size)})`,
      named === f ? refusal() : null)), err && !named ? h("li", {}, refusal()) : "");
  };
  const take = (fl) => { files = [...fl]; out.replaceChildren(); show(); };
  input.addEventListener("change", () => take(input.files));
  const drop = h("div.drop", {
    ondragover: (e) => { e.preventDefault(); drop.classList.add("over"); },
    ondragleave: () => drop.classList.remove("over"),
    ondrop: (e) => { e.preventDefault(); drop.classList.remove("over"); take(e.dataTransfer.files); },
  }, "Drop adapter_config.json + adapter_model.safetensors, or one .tar.gz / .zip, here — or ",
    h("label.inline", { for: "reg-files" }, "choose files"), input);
  const current = h("input", { id: "reg-current", type: "checkbox", checked: true });
  const form = h("form.card", { onsubmit: async (ev) => {
    ev.preventDefault();
    if (!files.length) { out.replaceChildren(errorBox({ message: "choose the adapter's files first" })); return; }
    const body = new FormData();
    body.append("name", name.value.trim());
    body.append("make_current", current.checked ? "true" : "false");
    for (const f of files) body.append("files", f, f.name);
    try {
      const v = await api("/v1/adapters", { method: "POST", body });
      out.replaceChildren(h("p.ok", { role: "status" }, `Registered ${v.id}`));
      setTimeout(render, 600);
    } catch (err) {
      // The admission check's refusal goes next to the files it is about (the API names no single file).
      show(err);
      out.replaceChildren();
    }
  } },
    h("h2", {}, "Register an adapter"),
    h("label", { for: "reg-name" }, "Name ", h("span.hint", {}, "a new name, or an existing one for a new version")), name,
    drop, list,
    h("label.inline", { for: "reg-current" }, current, " make it current (serve it right away)"), " ",
    h("button", { type: "submit" }, "Register"), out);
  return form;
}

// ---- data and fine-tuning ----
async function dataPage() {
  const root = h("div", {}, h("h1", {}, "Data & fine-tuning"));
  $main().replaceChildren(root);
  let chosen = null;
  const report = h("div", { "aria-live": "polite" });
  const jobForm = h("div");
  const input = h("input", { id: "data-file", type: "file", accept: ".jsonl,application/jsonl,application/json" });
  const check = async (file) => {
    chosen = file; report.replaceChildren(h("p", {}, `Checking ${file.name}…`)); jobForm.replaceChildren();
    const body = new FormData(); body.append("file", file, file.name);
    try {
      const r = await api("/v1/files/check", { method: "POST", body });
      report.replaceChildren(checkReport(r));
      if (r.ok) jobForm.replaceChildren(newJobForm(() => chosen, r));
    } catch (err) { report.replaceChildren(errorBox(err)); }
  };
  input.addEventListener("change", () => input.files[0] && check(input.files[0]));
  const drop = h("div.drop", {
    ondragover: (e) => { e.preventDefault(); drop.classList.add("over"); }, ondragleave: () => drop.classList.remove("over"),
    ondrop: (e) => { e.preventDefault(); drop.classList.remove("over"); e.dataTransfer.files[0] && check(e.dataTransfer.files[0]); },
  }, "Drop a JSONL file of examples here — or ", h("label.inline", { for: "data-file" }, "choose a file"), input);
  root.append(h("section.card", {}, h("h2", {}, "1. Check the data"),
    h("p.hint", {}, "Nothing is stored or trained until you start a job: this is `quiver data check` on the server."), drop, report), jobForm);
  const jobs = (await api("/v1/fine_tuning/jobs?limit=50")).data;
  root.append(h("h2", {}, "Jobs"), jobs.length ? h("div.scroll", {}, h("table", {},
    h("thead", {}, h("tr", {}, ["job", "status", "created", "model"].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, jobs.map((j) => h("tr", {}, h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)),
      h("td", {}, j.status), h("td", {}, fmtTime(j.created_at)), h("td", {}, j.fine_tuned_model || "–")))))) : h("p", {}, "No jobs yet."));
}

function checkReport(r) {
  const t = r.tokens;
  return h("div", { "data-check": r.ok ? "ok" : "errors" },
    h("p", { class: r.ok ? "ok" : "error" }, r.ok ? `✓ ${r.examples} examples can be trained on` :
      `✗ ${r.findings.filter((f) => f.severity === "error").length} error(s): fix them before training`),
    h("dl.kv", {},
      h("dt", {}, "lines / examples"), h("dd", {}, `${r.lines} / ${r.examples}`),
      t ? [h("dt", {}, "tokens"), h("dd", {}, `${t.total} total, ${t.trained} trained; per example min ${t.min}, median ${t.median}, max ${t.max} (max_seq_len ${r.max_seq_len})`)] : null,
      r.split ? [h("dt", {}, "split"), h("dd", {}, `${r.split.train} train / ${r.split.validation} validation / ${r.split.test} test (seed ${r.split_seed})`)] : null,
      h("dt", {}, "auto epochs"), h("dd", {}, r.auto_epochs ?? "–")),
    r.findings.length ? h("div.scroll", {}, h("table.findings", {},
      h("thead", {}, h("tr", {}, ["line", "", "code", "finding"].map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, r.findings.map((f) => h("tr", { class: "sev-" + f.severity, "data-line": f.line ?? "" },
        h("td", {}, f.line ? `line ${f.line}` : "file"), h("td", {}, f.severity), h("td", {}, h("code", {}, f.code)), h("td", {}, f.message)))))) : null);
}

function newJobForm(file, report) {
  const field = (id, label, value, hint) => [h("label", { for: id }, label, " ", h("span.hint", {}, hint)),
    h("input", { id, value, size: 10 })];
  const out = h("div", { "aria-live": "polite" });
  const form = h("form.card", { onsubmit: async (ev) => {
    ev.preventDefault();
    const val = (id) => form.querySelector("#" + id).value.trim();
    const num = (v, parse) => v === "" || v === "auto" ? "auto" : parse(v);
    try {
      const body = new FormData(); body.append("purpose", "fine-tune"); body.append("file", file(), file().name);
      const uploaded = await api("/v1/files", { method: "POST", body });
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: {
        model: state.base, training_file: uploaded.id, suffix: val("job-suffix") || undefined,
        seed: val("job-seed") === "" ? undefined : Number(val("job-seed")),
        hyperparameters: { n_epochs: num(val("job-epochs"), Number), batch_size: num(val("job-batch"), Number),
          learning_rate_multiplier: num(val("job-lr"), Number) } } });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) { out.replaceChildren(errorBox(err)); }
  } },
    h("h2", {}, "2. Start a fine-tuning job"),
    h("p.hint", {}, `"auto" lets the data decide: ${report.auto_epochs} epochs for this file, batch size 4, learning rate 1e-3 × multiplier 1.`),
    h("div.row", {},
      h("div", {}, field("job-suffix", "Suffix", "", "part of the adapter's name")),
      h("div", {}, field("job-epochs", "n_epochs", "auto", "integer or auto")),
      h("div", {}, field("job-batch", "batch_size", "auto", "integer or auto")),
      h("div", {}, field("job-lr", "learning_rate_multiplier", "auto", "number or auto")),
      h("div", {}, field("job-seed", "seed", "42", "the data split and training order"))),
    h("button", { type: "submit" }, "Upload and start"), out);
  return form;
}

async function jobPage(id) {
  const root = h("div", {}, h("h1", {}, "Job ", h("code", {}, id)));
  const head = h("div", { id: "job-head", "aria-live": "polite" }), chart = h("div"), warnings = h("div"), log = h("div");
  const manifest = h("div");
  root.append(head, h("h2", {}, "Loss"), chart, warnings, manifest, h("h2", {}, "Events"), log);
  $main().replaceChildren(root);
  const refresh = async () => {
    const [job, events] = await Promise.all([api(`/v1/fine_tuning/jobs/${id}`), api(`/v1/fine_tuning/jobs/${id}/events?limit=1000`)]);
    const ev = events.data.slice().reverse();  // oldest first
    const metrics = ev.filter((e) => e.type === "metrics" && e.data);
    const train = metrics.filter((e) => e.data.train_loss !== undefined).map((e) => [e.data.step, e.data.train_loss]);
    const valid = metrics.filter((e) => e.data.valid_loss !== undefined).map((e) => [e.data.step, e.data.valid_loss]);
    const finished = ["succeeded", "failed", "cancelled"].includes(job.status);
    const model = job.fine_tuned_model;
    head.replaceChildren(...[h("dl.kv", {},
      h("dt", {}, "status"), h("dd", { id: "job-status", class: job.status === "failed" ? "error" : job.status === "succeeded" ? "ok" : "" }, job.status),
      h("dt", {}, "training file"), h("dd", {}, job.training_file),
      h("dt", {}, "hyperparameters"), h("dd", {}, JSON.stringify(job.hyperparameters)),
      job.error ? [h("dt", {}, "error"), h("dd.error", {}, `${job.error.code}: ${job.error.message}`)] : null,
      model ? [h("dt", {}, "adapter"), h("dd", {}, h("a", { href: "#/adapters", id: "job-adapter" }, model), " · ",
        h("a", { href: `#/playground?model=${encodeURIComponent(model)}` }, "try it in the playground"))] : null),
      // Pause stops the worker at its next step boundary; resume continues from that step (docs/fine-tuning.md).
      ...[["running", "pause", "Pause job"], ["paused", "resume", "Resume job"]].filter(([status]) => job.status === status)
        .map(([, action, label]) => h("button", { type: "button", id: `job-${action}`, onclick: async () => {
          try { await api(`/v1/fine_tuning/jobs/${id}/${action}`, { method: "POST" }); refresh(); } catch (err) { head.append(errorBox(err)); }
        } }, label)),
      finished ? null : h("button.danger", { type: "button", onclick: async () => {
        if (!confirm("Cancel this job?")) return;
        try { await api(`/v1/fine_tuning/jobs/${id}/cancel`, { method: "POST" }); refresh(); } catch (err) { head.append(errorBox(err)); }
      } }, "Cancel job")].filter(Boolean));
    chart.replaceChildren(h("div.legend", {}, h("span.sw1", {}, `— train loss (${train.length})`), h("span.sw2", {}, `— validation loss (${valid.length})`)),
      lineChart({ width: 640, height: 240, label: "loss curve", yFormat: (v) => v.toFixed(3), series: [
        { name: "train", color: "#0b57d0", points: train }, { name: "validation", color: "#b3261e", points: valid }] }));
    const warns = ev.filter((e) => e.level === "warn");
    warnings.replaceChildren(...warns.map((e) => h("p.warn", {}, "⚠ ", e.message)));
    log.replaceChildren(h("ul", {}, ev.filter((e) => e.type !== "metrics").map((e) =>
      h("li", { class: e.level === "error" ? "error" : e.level === "warn" ? "warn" : "" }, `${fmtTime(e.created_at)} — ${e.message}`))));
    if (job.status === "succeeded" && !manifest.childElementCount) {
      const m = await api(`/v1/fine_tuning/jobs/${id}/manifest`).catch(() => null);
      if (m) manifest.replaceChildren(h("h2", {}, "Manifest"), h("dl.kv", {},
        h("dt", {}, "training data sha256"), h("dd", {}, h("code", {}, m.dataset.train_file_sha256)),
        h("dt", {}, "split"), h("dd", {}, `${m.dataset.counts.train} train / ${m.dataset.counts.validation} validation / ${m.dataset.counts.test} test (seed ${m.dataset.split_seed})`),
        h("dt", {}, "hyperparameters"), h("dd", {}, `rank ${m.hyperparameters.rank}, alpha ${m.hyperparameters.alpha}, lr ${m.hyperparameters.learning_rate}, batch ${m.hyperparameters.batch_size}, ${m.hyperparameters.resolved_epochs} epoch(s)`),
        h("dt", {}, "curve warnings"), h("dd", { id: "job-curve-warnings" }, (m.training.warnings || []).join("; ") || "none")),
        h("details", {}, h("summary", {}, "full manifest.json"), h("pre", {}, JSON.stringify(m, null, 2))));
    }
    return finished;
  };
  const finished = await refresh();
  if (!finished) poll(async () => refresh(), 2000);
}

// ---- playground ----
function playgroundPage(params) {
  const models = h("div.row");
  const root = h("div", {}, h("h1", {}, "Playground"));
  $main().replaceChildren(root);
  loadAdapters().then((adapters) => {
    const opts = (sel) => [h("option", { value: "" }, "—"), ...adapters.map((a) => h("option", { value: a.name, selected: a.name === sel }, a.name))];
    models.replaceChildren(
      h("div", {}, h("label", { for: "pg-m0" }, "Base model"), h("input", { id: "pg-m0", value: state.base, readonly: true })),
      h("div", {}, h("label", { for: "pg-m1" }, "Adapter 1"), h("select", { id: "pg-m1" }, opts(params.get("model") || (adapters[0] || {}).name))),
      h("div", {}, h("label", { for: "pg-m2" }, "Adapter 2 (optional)"), h("select", { id: "pg-m2" }, opts(""))));
  }).catch((err) => root.append(errorBox(err)));
  const num = (id, label, value, attrs) => h("div", {}, h("label", { for: id }, label), h("input", Object.assign({ id, type: "number", value }, attrs)));
  const answers = h("div.row", { id: "pg-answers" });
  const code = h("div");
  const form = h("form", { onsubmit: (ev) => { ev.preventDefault(); run(); } },
    models,
    h("label", { for: "pg-system" }, "System message ", h("span.hint", {}, "(optional)")), h("textarea", { id: "pg-system" }),
    h("label", { for: "pg-prompt" }, "Prompt"), h("textarea", { id: "pg-prompt", required: true }),
    h("details", {}, h("summary", {}, "Tools (optional, OpenAI `tools` JSON)"), h("textarea", { id: "pg-tools", placeholder: "[]" })),
    h("div.row", {}, num("pg-temperature", "temperature", "0.7", { min: 0, max: 2, step: 0.1 }),
      num("pg-top_p", "top_p", "1", { min: 0, max: 1, step: 0.05 }), num("pg-max_tokens", "max_tokens", "128", { min: 1, step: 1 }),
      num("pg-seed", "seed", "", { step: 1 })),
    h("p", {}, h("button", { type: "submit" }, "Run"), " ",
      h("button.secondary", { type: "button", onclick: () => showCode("curl") }, "Copy as curl"), " ",
      h("button.secondary", { type: "button", onclick: () => showCode("python") }, "Copy as Python")));
  root.append(form, code, answers);

  function request(model) {
    const v = (id) => document.getElementById(id).value.trim();
    const messages = [];
    if (v("pg-system")) messages.push({ role: "system", content: v("pg-system") });
    messages.push({ role: "user", content: v("pg-prompt") });
    const body = { model, messages, temperature: Number(v("pg-temperature")), top_p: Number(v("pg-top_p")), max_tokens: Number(v("pg-max_tokens")) };
    if (v("pg-seed") !== "") body.seed = Number(v("pg-seed"));
    if (v("pg-tools")) body.tools = JSON.parse(v("pg-tools"));  // a SyntaxError is shown to the user
    return body;
  }
  const chosen = () => ["pg-m0", "pg-m1", "pg-m2"].map((id) => document.getElementById(id)).filter((el) => el && el.value).map((el) => el.value);
  function showCode(kind) {
    let body;
    try { body = request(chosen()[1] || chosen()[0]); } catch (err) { code.replaceChildren(errorBox(err)); return; }
    const origin = location.origin;
    const text = kind === "curl"
      ? `curl ${origin}/v1/chat/completions \\\n  -H "Authorization: Bearer $QUIVER_API_KEY" -H "Content-Type: application/json" \\\n  -d '${JSON.stringify(body).replace(/'/g, "'\\''")}'`
      : `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${origin}/v1", api_key=os.environ["QUIVER_API_KEY"])\n` +
        `reply = client.chat.completions.create(**${JSON.stringify(body, null, 4).replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False").replace(/\bnull\b/g, "None")})\nprint(reply.choices[0].message.content)`;
    code.replaceChildren(h("pre", { id: "pg-code", "data-kind": kind }, text));
    if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});  // the text stays shown either way
  }
  async function run() {
    answers.replaceChildren();
    for (const model of chosen()) {
      const text = h("div.answer", { "aria-live": "polite" }), stats = h("p.stats");
      answers.append(h("section.card", { "data-model": model }, h("h2", {}, model), text, stats));
      let body;
      try { body = request(model); } catch (err) { text.replaceChildren(errorBox(err)); continue; }
      stream(Object.assign(body, { stream: true, stream_options: { include_usage: true } }), text, stats);
    }
  }
}

// Reads the SSE stream with fetch (EventSource cannot POST or send a key).
async function stream(body, text, stats) {
  const started = performance.now();
  let ttft = null, usage = null, chunks = 0;
  try {
    const res = await api("/v1/chat/completions", { method: "POST", json: body, raw: true });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const data = JSON.parse(line.slice(6));
          if (data.error) throw new ApiError(500, data);
          if (data.usage) usage = data.usage;
          const delta = data.choices && data.choices[0] && data.choices[0].delta;
          const piece = delta && (delta.content || (delta.tool_calls ? JSON.stringify(delta.tool_calls) : ""));
          if (piece) { if (ttft === null) ttft = performance.now() - started; chunks++; text.append(piece); }
        }
      }
      stats.textContent = `streaming… ${chunks} chunks`;
    }
    stats.textContent = `TTFT ${ttft === null ? "–" : Math.round(ttft) + " ms"} · ` +
      (usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : `${chunks} chunks`) +
      ` · ${Math.round(performance.now() - started)} ms total`;
    stats.dataset.done = "1";
  } catch (err) { text.append(errorBox(err)); stats.dataset.done = "1"; }
}

// ---- health ----
async function healthPage() {
  const root = h("div", {}, h("h1", {}, "Health"));
  $main().replaceChildren(root);
  const box = h("div", { "aria-live": "polite" });
  root.append(box);
  const refresh = async () => {
    const ready = await fetch("/ready").then((r) => r.json().then((b) => ({ ok: r.ok, b }))).catch(() => ({ ok: false, b: {} }));
    const s = await api("/v1/metrics/summary");
    const rejected = Object.entries(s.rejected_requests);
    box.replaceChildren(h("dl.kv.card", {},
      h("dt", {}, "engine"), h("dd", { id: "health-engine", class: s.engine.up ? "ok" : "error" },
        s.engine.up ? "up" : (s.engine.restarts ? "restarting" : "down"), ` (restarts: ${s.engine.restarts})`),
      h("dt", {}, "ready"), h("dd", {}, ready.ok ? "ready" : (ready.b.error ? ready.b.error.message : "not ready")),
      h("dt", {}, "queue depth"), h("dd", {}, s.queue_depth),
      h("dt", {}, "rejected requests"), h("dd", {}, rejected.length ? rejected.map(([r, n]) => `${r}: ${n}`).join(", ") : "none"),
      h("dt", {}, "adapters"), h("dd", {}, `${s.adapter_versions_loaded} of ${s.adapter_versions_registered} registered versions loaded in the engine (${s.adapters_registered} adapters)`)));
  };
  await refresh();
  poll(refresh, 5000);
}

// ---- routing ----
function poll(fn, ms) {
  const id = setInterval(() => fn().then((stop) => { if (stop === true) clearInterval(id); }).catch(() => {}), ms);
  state.timers.push(id);
}
async function render() {
  state.timers.forEach(clearInterval); state.timers = [];
  const nav = document.getElementById("nav");
  if (!state.key) {
    nav.hidden = true; document.getElementById("signout").hidden = true; document.getElementById("who").textContent = "";
    return signInPage();
  }
  if (state.admin === false && state.checked !== state.key) {
    try { await signIn(state.key); } catch (err) { state.key = null; sessionStorage.removeItem(KEY); return signInPage(err.message); }
  }
  state.checked = state.key;
  nav.hidden = false;
  document.getElementById("signout").hidden = false;
  document.getElementById("who").textContent = state.admin ? "admin key" : "API key (no admin actions)";
  for (const a of nav.querySelectorAll("[data-admin]")) a.hidden = !state.admin;
  const [path, query] = (location.hash.slice(1) || "/adapters").split("?");
  const params = new URLSearchParams(query || "");
  for (const a of nav.querySelectorAll("a")) a.toggleAttribute("aria-current", false);
  const link = nav.querySelector(`a[href="#/${path.split("/")[1]}"]`) || (path.startsWith("/jobs") ? nav.querySelector('a[href="#/data"]') : null);
  if (link) link.setAttribute("aria-current", "page");
  try {
    if (path.startsWith("/jobs/")) await jobPage(decodeURIComponent(path.slice(6)));
    else if (path === "/data" && state.admin) await dataPage();
    else if (path === "/playground") playgroundPage(params);
    else if (path === "/health") await healthPage();
    else await adaptersPage();
  } catch (err) {
    if (err.status === 401) return signOut();
    $main().append(errorBox(err));
  }
}
window.addEventListener("hashchange", render);
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signout").addEventListener("click", signOut);
  render();
});
