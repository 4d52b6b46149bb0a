// Kiln dashboard: polls the REST API. Server data is never rendered as HTML: textContent and DOM APIs only
// (charts are SVG elements built with createElementNS).
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = sessionStorage.getItem("kiln-key") || "";
keyInput.addEventListener("change", () => { sessionStorage.setItem("kiln-key", keyInput.value); refresh(); loadWorkers(); });
let selected = null;
let jobsById = new Map();
let rendered = { id: null, updated: null };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function api(path, opts) {
  const o = Object.assign({}, opts || {});
  o.headers = headers(o.headers);
  const r = await fetch(path, o);
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (!r.ok) throw Object.assign(new Error(body?.error?.message || r.statusText), { error: body?.error, status: r.status });
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function bar(progress) {
  const b = el("div", null, "bar"), fill = el("div");
  fill.style.width = Math.round(100 * progress) + "%";
  b.appendChild(fill);
  b.title = Math.round(100 * progress) + "%";
  return b;
}

const num = (v) => typeof v === "number" && Number.isFinite(v);
const fmt = (v, digits = 3) => num(v) ? (Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v.toPrecision(digits)).toString()) : "n/a";

// -- charts: horizontal bars in inline SVG ----------------------------------------------------

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

// rows: [{label, key, bars: [{value, text, cls}], max?, marker?: {value, text}}]; each row scaled to its own max
function hbarChart(name, title, rows, legend) {
  rows = rows.filter((r) => r.bars.some((b) => num(b.value)));
  if (!rows.length) return null;
  const labelW = 220, plotW = 300, valueW = 150, per = rows[0].bars.length, barH = per > 1 ? 11 : 16;
  const rowH = per * barH + 10, top = title ? 22 : 4, legendH = legend ? 18 : 0;
  const width = labelW + plotW + valueW, height = top + rows.length * rowH + legendH + 4;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title || name,
    "data-chart": name, class: "hbar" });
  if (title) root.appendChild(svg("text", { x: 0, y: 14, class: "chart-title" }, title));
  rows.forEach((row, i) => {
    const y0 = top + i * rowH;
    const g = svg("g", { "data-metric": row.key || row.label });
    const max = row.max || Math.max(...row.bars.map((b) => (num(b.value) ? Math.abs(b.value) : 0)),
      row.marker && num(row.marker.value) ? row.marker.value : 0) * 1.1 || 1;
    g.appendChild(svg("text", { x: 0, y: y0 + rowH / 2 + 2, class: "chart-label" }, row.label));
    row.bars.forEach((b, j) => {
      const y = y0 + 4 + j * barH, w = num(b.value) ? Math.max(1, plotW * Math.min(1, Math.abs(b.value) / max)) : 0;
      const rect = svg("rect", { x: labelW, y, width: w.toFixed(1), height: barH - 2, class: "b " + (b.cls || "b0") });
      rect.appendChild(svg("title", {}, `${row.label}: ${b.text ?? fmt(b.value)}`));
      g.appendChild(rect);
      g.appendChild(svg("text", { x: labelW + w + 4, y: y + barH - 4, class: "chart-value" }, b.text ?? fmt(b.value)));
    });
    if (row.marker && num(row.marker.value)) {
      const x = labelW + plotW * Math.min(1, row.marker.value / max);
      const line = svg("line", { x1: x, x2: x, y1: y0 + 1, y2: y0 + rowH - 3, class: "marker" });
      line.appendChild(svg("title", {}, row.marker.text));
      g.appendChild(line);
    }
    root.appendChild(g);
  });
  if (legend) {
    let x = labelW;
    legend.forEach((name, j) => {
      const y = top + rows.length * rowH + 4;
      root.appendChild(svg("rect", { x, y, width: 10, height: 10, class: "b b" + j }));
      root.appendChild(svg("text", { x: x + 14, y: y + 9, class: "chart-value" }, name));
      x += 14 + 8 * name.length + 20;
    });
  }
  return root;
}

function place(container, ...charts) {
  container.replaceChildren(...charts.filter(Boolean));
}

// -- workers: the backends and targets they advertise feed the build section ------------------

async function loadWorkers() {
  let workers = [];
  try { workers = (await api("/v1/workers")).workers; } catch (e) { $("workers-summary").textContent = ""; return; }
  const backends = new Set(), targets = new Set();
  for (const w of workers) {
    (w.backends || []).forEach((b) => backends.add(b));
    for (const q of w.queues || []) {
      if (q === "cpu") targets.add("cpu");
      else if (q.startsWith("build.")) targets.add(q.slice(6));
    }
    (w.gpus || []).forEach((g) => g.sm && targets.add(g.sm));
  }
  fillSelect($("b-backend"), [...backends].sort((a, b) => (a === "torch" ? -1 : b === "torch" ? 1 : a.localeCompare(b))));
  fillSelect($("b-target"), [...targets].sort((a, b) => (a === "cpu" ? -1 : b === "cpu" ? 1 : a.localeCompare(b))));
  $("workers-summary").textContent = workers.length
    ? `${workers.length} worker${workers.length > 1 ? "s" : ""}: ${[...backends].join(", ")} · ${[...targets].join(", ")}`
    : "no live workers";
  $("b-workers-note").textContent = workers.length ? "choices: what live workers advertise" : "no live worker: builds cannot run";
  updateEquivalents();
}

function fillSelect(select, values) {
  const keep = select.value;
  const current = [...select.options].map((o) => o.value).join(",");
  if (current === values.join(",")) return;
  select.replaceChildren(...values.map((v) => { const o = el("option", v); o.value = v; return o; }));
  if (values.includes(keep)) select.value = keep;
}

// -- the submit form -> a JobSpec ---------------------------------------------------------------

function numberField(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const n = Number(raw);
  return Number.isFinite(n) ? n : raw;  // the API names what is wrong with a non-number
}

function parseLabels(text) {
  const labels = {};
  for (const pair of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const [k, ...v] = pair.split("="); labels[k.trim()] = v.join("=").trim();
  }
  return labels;
}

// the model source: a Hugging Face repo id (spec.model), or a GGUF file / Meta folder under the service's
// sources root (spec.source; the API names the job after it)
const SOURCE_FIELDS = {
  hf: { label: "Model (Hugging Face repo id)", path: "model", placeholder: "HuggingFaceTB/SmolLM2-135M-Instruct" },
  gguf: { label: "GGUF file, relative to the sources root", path: "source.path",
    placeholder: "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" },
  meta: { label: "Meta checkpoint folder, relative to the sources root", path: "source.path",
    placeholder: "llama-3.2-1b" },
};

function showSource() {
  const f = SOURCE_FIELDS[$("f-source").value];
  $("f-model-label").textContent = f.label;
  $("f-model").dataset.path = f.path;
  $("f-model").placeholder = f.placeholder;
  $("f-revision").disabled = $("f-source").value !== "hf";  // revisions are Hugging Face's
}
$("f-source").addEventListener("change", () => { showSource(); updateEquivalents(); });

function specFromForm() {
  const kind = $("f-source").value, name = $("f-model").value.trim();
  const spec = kind === "hf" ? { model: name } : { source: { kind, path: name } };
  const revision = $("f-revision").value.trim();
  if (revision && kind === "hf") spec.revision = revision;
  spec.dtype = $("f-dtype").value;
  const tp = numberField("f-tp") ?? 1, pp = numberField("f-pp") ?? 1, split = $("f-pp-split").value;
  if (tp !== 1 || pp !== 1 || split !== "even") spec.mapping = { tp_size: tp, pp_size: pp, pp_split: split };
  if ($("q-on").checked) {
    const q = { algo: $("q-algo").value, kv_cache: $("q-kv").value };
    const group = numberField("q-group");
    if (group !== undefined) q.group_size = group;
    if ($("q-zero").checked) q.has_zero_point = true;
    const alpha = numberField("q-alpha");
    if (alpha !== undefined) q.smoothquant_alpha = alpha;
    const exclude = $("q-exclude").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (exclude.length) q.exclude_modules = exclude;
    if ($("q-cal-method").value && q.algo === "FP8") q.calibration_method = $("q-cal-method").value;
    q.calibration = { dataset: "bundled" };
    for (const [key, id] of [["samples", "q-cal-samples"], ["seq_len", "q-cal-seq"]]) {
      const v = numberField(id); if (v !== undefined) q.calibration[key] = v;
    }
    q.thresholds = {};
    for (const [key, id] of [["max_perplexity_increase_pct", "q-th-ppl"], ["min_top1_agreement", "q-th-top1"],
      ["max_kl_divergence", "q-th-kl"], ["min_rouge_l", "q-th-rouge"]]) {
      const v = numberField(id); if (v !== undefined) q.thresholds[key] = v;
    }
    spec.quantization = q;
  }
  if ($("b-on").checked) {
    const b = { backend: $("b-backend").value, target: $("b-target").value };
    for (const [key, id] of [["max_batch_size", "b-batch"], ["max_input_len", "b-input"], ["max_seq_len", "b-seq"]]) {
      const v = numberField(id); if (v !== undefined) b[key] = v;
    }
    spec.build = b;
  }
  if ($("e-on").checked) {
    const e = { metrics: [...document.querySelectorAll("input[name=e-metric]:checked")].map((c) => c.value) };
    for (const [key, id] of [["max_samples", "e-samples"], ["seq_len", "e-seq"], ["max_new_tokens", "e-new"],
      ["min_rouge1", "e-min-rouge1"], ["min_top1_agreement", "e-min-top1"]]) {
      const v = numberField(id); if (v !== undefined) e[key] = v;
    }
    spec.evaluation = e;
  }
  const labels = parseLabels($("f-labels").value);
  if (Object.keys(labels).length) spec.labels = labels;
  const hook = $("f-webhook").value.trim();
  if (hook) spec.webhook_url = hook;
  return spec;
}

for (const [box, fs] of [["q-on", "fs-quant"], ["b-on", "fs-build"], ["e-on", "fs-eval"]]) {
  $(box).addEventListener("change", () => { $(fs).disabled = !$(box).checked; updateEquivalents(); });
  $(fs).disabled = !$(box).checked;
}

// -- copyable curl / kiln submit equivalents ---------------------------------------------------

function shq(s) {
  s = String(s);
  return /^[A-Za-z0-9_./:=@%+,-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'";
}

function curlCommand(spec) {
  const lines = [`curl -sS -X POST ${shq(location.origin + "/v1/jobs")}`, `-H 'Content-Type: application/json'`];
  if (keyInput.value) lines.push(`-H "Authorization: Bearer $KILN_API_KEY"`);
  lines.push(`-d ${shq(JSON.stringify(spec))}`);
  return lines.join(" \\\n  ");
}

const FLAG_KEYS = new Set(["model", "source", "revision", "dtype", "mapping", "labels"]);

function kilnCommand(spec) {
  const server = location.origin === "http://127.0.0.1:8080" ? [] : ["--server", location.origin];
  // kiln submit has flags for the model, revision, dtype, tp/pp and labels; every other section goes
  // through a JSON JobSpec file (--spec)
  const flagsOnly = Object.keys(spec).every((k) => FLAG_KEYS.has(k)) && (!spec.mapping || spec.mapping.pp_split === "even");
  if (flagsOnly) {
    const args = spec.source ? ["kiln", "submit", "--" + spec.source.kind, spec.source.path, ...server]
      : ["kiln", "submit", spec.model, ...server];
    if (spec.revision) args.push("--revision", spec.revision);
    if (spec.dtype !== "auto") args.push("--dtype", spec.dtype);
    if (spec.mapping) args.push("--tp-size", spec.mapping.tp_size, "--pp-size", spec.mapping.pp_size);
    for (const [k, v] of Object.entries(spec.labels || {})) args.push("--label", `${k}=${v}`);
    return args.map(shq).join(" ");
  }
  return `cat > kiln-job.json <<'EOF'\n${JSON.stringify(spec, null, 2)}\nEOF\n` +
    ["kiln", "submit", "--spec", "kiln-job.json", ...server].map(shq).join(" ");
}

function updateEquivalents() {
  const spec = specFromForm();
  $("cmd-curl").textContent = curlCommand(spec);
  $("cmd-kiln").textContent = kilnCommand(spec);
}

async function copyText(button, text) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (e) {  // no clipboard permission (plain http off loopback): select the text instead
    const range = document.createRange();
    range.selectNodeContents(button.closest(".cmd").querySelector("pre"));
    getSelection().removeAllRanges(); getSelection().addRange(range);
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 2000);
}
$("copy-curl").addEventListener("click", () => copyText($("copy-curl"), $("cmd-curl").textContent));
$("copy-kiln").addEventListener("click", () => copyText($("copy-kiln"), $("cmd-kiln").textContent));
$("submit-form").addEventListener("reset", () => setTimeout(() => {  // after the browser restored the defaults
  showSource();
  for (const [box, fs] of [["q-on", "fs-quant"], ["b-on", "fs-build"], ["e-on", "fs-eval"]]) $(fs).disabled = !$(box).checked;
  clearErrors();
  updateEquivalents();
}));
$("submit-form").addEventListener("input", updateEquivalents);
$("submit-form").addEventListener("change", updateEquivalents);

// -- validation errors, next to the field they are about ----------------------------------------

function clearErrors() {
  document.querySelectorAll(".field-error").forEach((e) => e.remove());
  document.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
  $("form-error").hidden = true;
  $("form-error").replaceChildren();
}

const stripPrefix = (m) => String(m).replace(/^(Value error|Assertion failed),\s*/, "");

// [{path, message}] from an error body: a structured list when the API sends one, else the
// "invalid request: a.b: message; c: message" form of its message, else the field the message names
function errorLocations(err) {
  const list = err.fields || err.details || err.errors;
  if (Array.isArray(list) && list.length) {
    return list.map((f) => ({
      path: Array.isArray(f.loc) ? f.loc.filter((p) => p !== "body" && typeof p === "string").join(".")
        : String(f.loc ?? f.field ?? f.path ?? "").replace(/\[\d+\]/g, ""),
      message: stripPrefix(f.message ?? f.msg ?? ""),
    }));
  }
  const message = String(err.message || "");
  const m = message.match(/^invalid request:\s*/);
  if (m) {
    return message.slice(m[0].length).split(/;\s+(?=[A-Za-z_][\w.[\]]*: )/).map((part) => {
      const i = part.indexOf(": "), loc = i > 0 ? part.slice(0, i).replace(/\[\d+\]/g, "") : "";
      return /^[A-Za-z_][\w.]*$/.test(loc) && loc !== "body"
        ? { path: loc, message: stripPrefix(part.slice(i + 2)) }
        : { path: guessPath(err.code, part), message: stripPrefix(i > 0 ? part.slice(i + 2) : part) };
    });
  }
  return [{ path: guessPath(err.code, message), message: stripPrefix(message) }];
}

// an error without a location (a submit-time check of the service or the compiler): the field it names
function namedField(message, prefix) {
  const leaves = [...document.querySelectorAll("#submit-form input[data-path], #submit-form select[data-path]")]
    .map((e) => e.dataset.path).filter((p) => p.startsWith(prefix))
    .sort((a, b) => b.split(".").pop().length - a.split(".").pop().length);
  for (const p of leaves) {
    const word = p.split(".").pop();
    if (word.length > 3 && new RegExp("\\b" + word + "\\b").test(message)) return p;
  }
  return null;
}

function guessPath(code, message) {
  const named = namedField(message, "");
  if (named) return named;
  if (/backend/.test(message)) return "build.backend";
  if (/target|compute capability/.test(message)) return "build.target";
  if (/KV cache|kv_cache/.test(message)) return "quantization.kv_cache";
  const byCode = { no_worker: "build", invalid_build_config: "build", engine_does_not_fit: "build", unknown_backend: "build.backend",
    backend_unavailable: "build.backend", target_unavailable: "build.target", invalid_mapping: "mapping.tp_size",
    model_not_found: "model", unsupported_architecture: "model", unsafe_weights: "model", malformed_weights: "model",
    weights_mismatch: "model", invalid_checkpoint: "model" };
  if (byCode[code]) return byCode[code];
  for (const section of ["quantization", "evaluation", "build", "webhook", "labels", "revision", "model"]) {
    if (new RegExp("\\b" + section).test(message)) return section === "webhook" ? "webhook_url" : section;
  }
  return "";
}

function targetFor(path) {
  // errors about the model name mean the one name field, whichever source it holds
  if ((path === "model" || path.startsWith("source")) && path !== "source.kind") return $("f-model");
  let p = path;
  while (p) {
    const found = document.querySelector(`#submit-form [data-path="${CSS.escape(p)}"]`);
    if (found) return found;
    p = p.includes(".") ? p.slice(0, p.lastIndexOf(".")) : "";
  }
  if (path.startsWith("mapping")) return $("f-tp");
  return null;
}

function showErrors(err) {
  clearErrors();
  const general = [];
  for (const located of errorLocations(err)) {
    const message = located.message;
    let path = located.path, target = targetFor(path);
    if (target && !target.matches("input, select")) {  // a section-level check: the field its message names
      const named = namedField(message, path ? path + "." : "");
      if (named) { path = named; target = targetFor(path); }
    }
    const box = el("div", message, "field-error");
    box.setAttribute("role", "alert");
    box.dataset.errorFor = path;
    if (!target) { general.push(box); continue; }
    if (target.matches("input, select")) {
      target.setAttribute("aria-invalid", "true");
      (target.closest("label") || target).after(box);
    } else if (target.tagName === "FIELDSET") {
      target.querySelector("legend").after(box);
    } else {
      target.appendChild(box);
    }
  }
  const located = document.querySelectorAll("#submit-form .field-error").length;
  const fe = $("form-error");
  fe.replaceChildren(el("strong", err.code || "error"), ...general.map((g) => { g.className = ""; return g; }));
  if (err.hint) fe.appendChild(el("div", "hint: " + err.hint, "hint"));
  fe.hidden = false;
  return general.length ? 0 : located;
}

$("submit-form").addEventListener("input", (ev) => {  // editing a field clears its error
  const path = ev.target.dataset?.path;
  if (!path) return;
  ev.target.removeAttribute("aria-invalid");
  document.querySelectorAll(".field-error").forEach((e) => { if (e.dataset.errorFor === path) e.remove(); });
});

$("submit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("submit-result");
  clearErrors();
  out.textContent = "submitting…";
  try {
    const job = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(specFromForm()) });
    out.textContent = "submitted " + job.id; selected = job.id; rendered = { id: null, updated: null }; refresh();
  } catch (e) {
    const located = e.error ? showErrors(e.error) : 0;
    out.textContent = (e.error?.code || "error") + ": " + (located ? `${located} problem${located > 1 ? "s" : ""}, marked next to the field${located > 1 ? "s" : ""}` : e.message);
  }
});

// -- the job list -------------------------------------------------------------------------------

function jobKind(spec) {
  const parts = ["convert"];
  const quantized = !!spec.quantization && (spec.quantization.algo !== "none" || spec.quantization.kv_cache !== "none");
  if (quantized) {
    parts.push([spec.quantization.algo, spec.quantization.kv_cache !== "none" ? "KV " + spec.quantization.kv_cache : ""]
      .filter((s) => s && s !== "none").join("+"));
  }
  if (spec.build) parts.push(`build ${spec.build.backend}/${spec.build.target}`);
  if (spec.evaluation || quantized) parts.push("evaluate");  // a quantized job is always evaluated
  return parts.join(" → ");
}

async function refresh() {
  try {
    const state = $("state-filter").value;
    const data = await api("/v1/jobs?limit=100" + (state ? "&state=" + encodeURIComponent(state) : ""));
    $("conn").textContent = "live";
    jobsById = new Map(data.jobs.map((j) => [j.id, j]));
    const tbody = $("jobs").querySelector("tbody");
    tbody.replaceChildren(...data.jobs.map((job) => {
      const tr = el("tr");
      tr.dataset.id = job.id;
      if (job.id === selected) tr.className = "selected";
      tr.appendChild(el("td", job.id.slice(0, 8)));
      tr.appendChild(el("td", job.spec.model));
      tr.appendChild(el("td", jobKind(job.spec), "muted"));
      const st = el("td", job.state, "state " + job.state);
      st.dataset.role = "state";
      tr.appendChild(st);
      tr.appendChild(el("td", job.stage || ""));
      const td = el("td"); td.appendChild(bar(job.progress)); tr.appendChild(td);
      tr.appendChild(el("td", new Date(job.created_at * 1000).toLocaleTimeString()));
      tr.appendChild(el("td", Object.entries(job.spec.labels).map(([k, v]) => k + "=" + v).join(", ")));
      tr.addEventListener("click", () => { selected = job.id; rendered = { id: null, updated: null }; showDetail(job); refresh(); });
      return tr;
    }));
    updateCompareChoices(data.jobs);
    if (selected && jobsById.has(selected)) showDetail(jobsById.get(selected));
  } catch (e) {
    $("conn").textContent = e.status === 401 ? "API key required" : "disconnected: " + e.message;
  }
}

// -- one job --------------------------------------------------------------------------------------

const stageOf = (job, name) => job.stages.find((s) => s.name === name);

async function showDetail(job) {
  $("detail").hidden = false;
  $("d-id").textContent = job.id;
  $("d-state").textContent = job.state;
  $("d-state").className = "state " + job.state;
  $("d-message").textContent = job.reason || job.message || "";
  $("d-progress").style.width = Math.round(100 * job.progress) + "%";
  $("d-cancel").hidden = !(job.state === "queued" || job.state === "running");
  if (rendered.id === job.id && rendered.updated === job.updated_at) return;  // nothing changed since the last poll
  rendered = { id: job.id, updated: job.updated_at };
  const err = $("d-error");
  err.hidden = !job.error;
  err.textContent = job.error ? `${job.error.code}: ${job.error.message}${job.error.hint ? " (hint: " + job.error.hint + ")" : ""}` : "";
  $("d-spec").textContent = JSON.stringify(job.spec, null, 2);
  $("d-stages").replaceChildren(...job.stages.map((s) => {
    const li = el("li", `${s.name}: ${s.state}${s.seconds != null ? " · " + s.seconds.toFixed(2) + " s" : ""}`);
    if (s.cache_hit) li.appendChild(el("span", " cache hit", "hit"));
    return li;
  }));
  place($("d-stage-chart"), hbarChart("stage-seconds", "seconds per stage",
    job.stages.filter((s) => num(s.seconds) && s.name !== "publish").map((s) => ({
      label: s.name + (s.cache_hit ? " (cache hit)" : ""), key: s.name,
      bars: [{ value: s.seconds, text: s.seconds.toFixed(2) + " s" }],
      max: Math.max(...job.stages.map((x) => x.seconds || 0)) * 1.1 || 1,
    }))));
  showQuantization(job);
  showPerformance(job);
  showEngineAccuracy(job);
  // the report link only when the job has a report artifact (the evaluate stage's; kept on a failed gate)
  const hasReport = job.artifacts.includes("report");
  $("d-report-line").hidden = !hasReport;
  $("d-report").href = hasReport ? job.links.report : "#";
  $("d-report").onclick = (ev) => { ev.preventDefault(); download(job.links.report, "report-" + job.id + ".json"); };
  const list = $("d-artifacts");
  if (!job.artifacts.length) { list.replaceChildren(el("li", job.state === "succeeded" ? "none" : "none (" + job.state + ")", "muted")); return; }
  try {
    const arts = await api(job.links.artifacts);
    list.replaceChildren(...arts.artifacts.flatMap((a) => a.files.map((f) => {
      const li = el("li"), link = el("a", `${a.name}/${f.path}`);
      link.href = `/v1/jobs/${job.id}/artifacts/${encodeURIComponent(a.name)}/files/${f.path.split("/").map(encodeURIComponent).join("/")}`;
      link.onclick = (ev) => { ev.preventDefault(); download(link.href, f.path.split("/").pop()); };
      li.appendChild(link);
      li.appendChild(el("span", `  ${f.size} bytes  sha256 ${f.sha256.slice(0, 16)}…`, "muted"));
      return li;
    })));
  } catch (e) { list.replaceChildren(el("li", e.message)); }
}

function kvRows(tbody, rows) {
  tbody.replaceChildren(...rows.map(([label, value, key, cls]) => {
    const tr = el("tr");
    if (key) tr.dataset.key = key;
    tr.appendChild(el("th", label));
    tr.appendChild(el("td", value, cls || ""));
    return tr;
  }));
}

// the quantize stage's summary + the evaluate stage's accuracy (quantized vs unquantized) and the thresholds
function showQuantization(job) {
  const q = stageOf(job, "quantize"), ev = stageOf(job, "evaluate");
  const acc = ev?.summary?.accuracy;
  const section = $("d-quant-section");
  section.hidden = !(q && (q.summary || acc));
  if (section.hidden) return;
  const th = job.spec.quantization?.thresholds || {};
  const qs = q.summary || {};
  const rows = [["algorithm", qs.quant_algo || job.spec.quantization.algo, "quant_algo"],
    ["KV cache", qs.kv_cache_quant_algo || job.spec.quantization.kv_cache || "none", "kv_cache"],
    ["quantize time", num(qs.seconds) ? qs.seconds.toFixed(2) + " s" : "n/a", "seconds"]];
  for (const [k, v] of Object.entries(qs.record || {})) {
    if (k === "quant_algo" || k === "kv_cache_quant_algo") continue;
    rows.push([k.replace(/_/g, " "), typeof v === "object" && v !== null ? JSON.stringify(v).slice(0, 160) : String(v), "record." + k]);
  }
  if (acc) {
    rows.push(["perplexity", `${fmt(acc.perplexity, 4)} (unquantized ${fmt(acc.perplexity_reference, 4)})`, "perplexity"],
      ["perplexity increase", num(acc.perplexity_increase_pct) ? acc.perplexity_increase_pct.toFixed(2) + " % (max " + th.max_perplexity_increase_pct + " %)" : "n/a", "perplexity_increase_pct"],
      ["recovery", num(acc.recovery_pct) ? acc.recovery_pct.toFixed(2) + " %" : "n/a", "recovery_pct"],
      ["top-1 agreement", `${fmt(acc.top1_agreement)} (min ${th.min_top1_agreement})`, "top1_agreement"],
      ["KL divergence", `${fmt(acc.kl_divergence)} (max ${th.max_kl_divergence})`, "kl_divergence"],
      ["ROUGE-L", `${fmt(acc.rouge_l)} (min ${th.min_rouge_l})`, "rouge_l"]);
  }
  kvRows($("d-quant").querySelector("tbody"), rows);
  const verdict = $("d-quant-verdict");
  if (ev?.summary && "passed" in ev.summary) {
    verdict.textContent = ev.summary.passed ? "PASSED: within every threshold"
      : "FAILED: " + (ev.summary.failures || []).join("; ");
    verdict.className = "verdict " + (ev.summary.passed ? "pass" : "fail");
  } else {
    verdict.textContent = ev ? "evaluating…" : "";
    verdict.className = "verdict";
  }
  const fails = (v, t, lower) => num(v) && num(t) && (lower ? v < t : v > t);
  place($("d-quant-chart"), acc && hbarChart("quant-accuracy", "quantized vs unquantized (line: threshold)", [
    { label: "top-1 agreement", key: "top1_agreement", max: 1, marker: { value: th.min_top1_agreement, text: "min " + th.min_top1_agreement },
      bars: [{ value: acc.top1_agreement, cls: fails(acc.top1_agreement, th.min_top1_agreement, true) ? "bad" : "good" }] },
    { label: "ROUGE-L", key: "rouge_l", max: 1, marker: { value: th.min_rouge_l, text: "min " + th.min_rouge_l },
      bars: [{ value: acc.rouge_l, cls: fails(acc.rouge_l, th.min_rouge_l, true) ? "bad" : "good" }] },
    { label: "KL divergence", key: "kl_divergence", marker: { value: th.max_kl_divergence, text: "max " + th.max_kl_divergence },
      bars: [{ value: acc.kl_divergence, cls: fails(acc.kl_divergence, th.max_kl_divergence, false) ? "bad" : "good" }] },
    { label: "perplexity increase %", key: "perplexity_increase_pct",
      marker: { value: th.max_perplexity_increase_pct, text: "max " + th.max_perplexity_increase_pct + " %" },
      bars: [{ value: acc.perplexity_increase_pct, text: fmt(acc.perplexity_increase_pct) + " %",
        cls: fails(acc.perplexity_increase_pct, th.max_perplexity_increase_pct, false) ? "bad" : "good" }] },
  ]));
}

// the build stage's performance.json (stage summary): one row per measurement
const PERF_ROWS = [
  ["build time", "build_seconds", (v) => v.toFixed(2) + " s"],
  ["load time", "load_seconds", (v) => v.toFixed(2) + " s"],
  ["time to first token", "ttft_seconds", (v) => (1000 * v).toFixed(1) + " ms"],
  ["decode, batch 1", "decode_tokens_per_second_batch_1", (v) => v.toFixed(1) + " tokens/s"],
  ["decode, max batch", "decode_tokens_per_second_max_batch", (v) => v.toFixed(1) + " tokens/s"],
  ["peak GPU memory", "peak_gpu_memory_bytes", (v) => (v / 2 ** 30).toFixed(2) + " GiB"],
];

function buildPerformance(job) {
  const build = stageOf(job, "build");
  return build && build.summary ? build.summary.performance || null : null;
}

function showPerformance(job) {
  const perf = buildPerformance(job);
  $("d-perf-section").hidden = !perf;
  if (!perf) { $("d-perf").querySelector("tbody").replaceChildren(); $("d-perf-chart").replaceChildren(); return; }
  const why = perf.reason || null;
  $("d-perf").querySelector("tbody").replaceChildren(...PERF_ROWS.map(([label, key, f]) => {
    const tr = el("tr"), v = perf[key];
    tr.dataset.key = key;
    tr.appendChild(el("th", key === "decode_tokens_per_second_max_batch" && perf.max_batch_size
      ? `${label} (${perf.max_batch_size})` : label));
    const reason = key === "peak_gpu_memory_bytes" ? perf.peak_gpu_memory_reason || why : why;
    tr.appendChild(el("td", num(v) ? f(v) : "n/a" + (reason ? " (" + reason + ")" : ""), num(v) ? "" : "muted"));
    return tr;
  }));
  const batch = perf.max_batch_size ? `batch ${perf.max_batch_size}` : "max batch";
  place($("d-perf-chart"),
    hbarChart("decode-throughput", "decode throughput (tokens/s)", [
      { label: "batch 1", key: "decode_tokens_per_second_batch_1", bars: [{ value: perf.decode_tokens_per_second_batch_1, text: fmt(perf.decode_tokens_per_second_batch_1) + " tok/s" }] },
      { label: batch, key: "decode_tokens_per_second_max_batch", bars: [{ value: perf.decode_tokens_per_second_max_batch, text: fmt(perf.decode_tokens_per_second_max_batch) + " tok/s" }] },
    ].map((r) => Object.assign(r, { max: Math.max(perf.decode_tokens_per_second_batch_1 || 0, perf.decode_tokens_per_second_max_batch || 0) * 1.1 || 1 }))),
    hbarChart("engine-latency", "time (s)", [
      { label: "build", key: "build_seconds", bars: [{ value: perf.build_seconds, text: fmt(perf.build_seconds) + " s" }] },
      { label: "load", key: "load_seconds", bars: [{ value: perf.load_seconds, text: fmt(perf.load_seconds) + " s" }] },
      { label: "time to first token", key: "ttft_seconds", bars: [{ value: perf.ttft_seconds, text: num(perf.ttft_seconds) ? (1000 * perf.ttft_seconds).toFixed(1) + " ms" : "n/a" }] },
    ].map((r, _i, all) => Object.assign(r, { max: Math.max(...all.map((x) => x.bars[0].value || 0)) * 1.1 || 1 }))));
}

// the evaluate stage: the engine against the reference runtime on the checkpoint it was built from
function showEngineAccuracy(job) {
  const eng = stageOf(job, "evaluate")?.summary?.engine;
  $("d-engine-section").hidden = !eng;
  if (!eng) return;
  kvRows($("d-engine").querySelector("tbody"), [
    ["top-1 agreement", fmt(eng.top1_agreement), "top1_agreement"],
    ["greedy identical", fmt(eng.greedy_identical), "greedy_identical"],
    ["ROUGE-1", fmt(eng.rouge1), "rouge1"], ["ROUGE-L", fmt(eng.rouge_l), "rouge_l"],
    ["max |logit error|", fmt(eng.max_abs_logit_error), "max_abs_logit_error"],
    ["perplexity", fmt(eng.perplexity, 4), "perplexity"]]);
  place($("d-engine-chart"), hbarChart("engine-accuracy", "engine vs reference (1 = identical)",
    [["top-1 agreement", "top1_agreement"], ["greedy identical", "greedy_identical"], ["ROUGE-1", "rouge1"], ["ROUGE-L", "rouge_l"]]
      .map(([label, key]) => ({ label, key, max: 1, bars: [{ value: eng[key] }] }))));
}

async function download(url, name) {
  const r = await fetch(url, { headers: headers() });
  if (!r.ok) return alert("download failed: HTTP " + r.status);
  const a = el("a"); a.href = URL.createObjectURL(await r.blob()); a.download = name; a.click();
}

$("d-cancel").addEventListener("click", async () => {
  if (selected) { try { await api(`/v1/jobs/${selected}:cancel`, { method: "POST" }); } catch (e) { alert(e.message); } refresh(); }
});
$("state-filter").addEventListener("change", refresh);

// -- two jobs side by side -------------------------------------------------------------------------

function updateCompareChoices(jobs) {
  for (const select of [$("cmp-a"), $("cmp-b")]) {
    const keep = select.value;
    const ids = jobs.map((j) => j.id);
    const texts = jobs.map((j) => `${j.id.slice(0, 8)} · ${j.spec.model} · ${jobKind(j.spec)} · ${j.state}`);
    if ([...select.options].map((o) => o.textContent).join("\n") !== texts.join("\n")) {
      select.replaceChildren(...jobs.map((j, i) => { const o = el("option", texts[i]); o.value = j.id; return o; }));
    }
    if (ids.includes(keep)) select.value = keep;
  }
  if (!$("cmp-b").dataset.touched && jobs.length > 1 && $("cmp-a").value === $("cmp-b").value) $("cmp-b").value = jobs[1].id;
}
$("cmp-b").addEventListener("change", () => { $("cmp-b").dataset.touched = "1"; });
$("d-compare").addEventListener("click", () => {
  $("cmp-a").value = selected;
  $("compare").scrollIntoView();
});

// [label, key, value(job), format]
const COMPARE_ROWS = [
  ["model", "model", (j) => j.spec.model],
  ["state", "state", (j) => j.state],
  ["dtype", "dtype", (j) => j.spec.dtype],
  ["pipeline", "pipeline", (j) => jobKind(j.spec)],
  ["total time (s)", "total_seconds", (j) => (j.finished_at && j.started_at ? j.finished_at - j.started_at : null), (v) => v.toFixed(2) + " s"],
  ["quantize time (s)", "quantize_seconds", (j) => stageOf(j, "quantize")?.summary?.seconds, (v) => v.toFixed(2) + " s"],
  ["build time (s)", "build_seconds", (j) => buildPerformance(j)?.build_seconds, (v) => v.toFixed(2) + " s"],
  ["time to first token (ms)", "ttft_ms", (j) => { const t = buildPerformance(j)?.ttft_seconds; return num(t) ? 1000 * t : null; }, (v) => v.toFixed(1) + " ms"],
  ["decode tok/s, batch 1", "decode_b1", (j) => buildPerformance(j)?.decode_tokens_per_second_batch_1, (v) => v.toFixed(1)],
  ["decode tok/s, max batch", "decode_max", (j) => buildPerformance(j)?.decode_tokens_per_second_max_batch, (v) => v.toFixed(1)],
  ["quantized: perplexity increase %", "ppl_increase", (j) => stageOf(j, "evaluate")?.summary?.accuracy?.perplexity_increase_pct, (v) => v.toFixed(2) + " %"],
  ["quantized: top-1 agreement", "quant_top1", (j) => stageOf(j, "evaluate")?.summary?.accuracy?.top1_agreement, (v) => fmt(v)],
  ["quantized: KL divergence", "quant_kl", (j) => stageOf(j, "evaluate")?.summary?.accuracy?.kl_divergence, (v) => fmt(v)],
  ["engine: top-1 agreement", "engine_top1", (j) => stageOf(j, "evaluate")?.summary?.engine?.top1_agreement, (v) => fmt(v)],
  ["engine: ROUGE-1", "engine_rouge1", (j) => stageOf(j, "evaluate")?.summary?.engine?.rouge1, (v) => fmt(v)],
];

async function compare() {
  const ids = [$("cmp-a").value, $("cmp-b").value];
  if (!ids[0] || !ids[1]) return;
  let jobs;
  try { jobs = await Promise.all(ids.map((id) => api(`/v1/jobs/${encodeURIComponent(id)}`))); } catch (e) { alert(e.message); return; }
  const table = $("cmp-table");
  const head = el("tr");
  head.append(el("th", ""), el("th", "A " + jobs[0].id.slice(0, 8), "a"), el("th", "B " + jobs[1].id.slice(0, 8), "b"));
  table.querySelector("thead").replaceChildren(head);
  const chartRows = [];
  table.querySelector("tbody").replaceChildren(...COMPARE_ROWS.flatMap(([label, key, get, f]) => {
    const values = jobs.map((j) => get(j));
    if (values.every((v) => v === undefined || v === null)) return [];
    const tr = el("tr"); tr.dataset.key = key;
    tr.append(el("th", label), ...values.map((v) => el("td", v === undefined || v === null ? "—" : f && num(v) ? f(v) : String(v))));
    if (values.every(num)) chartRows.push({ label, key, bars: values.map((v, i) => ({ value: num(v) ? v : null, text: num(v) ? (f ? f(v) : fmt(v)) : "—", cls: "b" + i })) });
    return [tr];
  }));
  place($("cmp-chart"), hbarChart("compare", "A vs B (each row scaled to its larger value)", chartRows, ["A " + ids[0].slice(0, 8), "B " + ids[1].slice(0, 8)]));
  $("cmp-out").hidden = false;
}
$("cmp-go").addEventListener("click", compare);

updateEquivalents();
loadWorkers();
refresh();
setInterval(refresh, 1000);
setInterval(loadWorkers, 15000);
