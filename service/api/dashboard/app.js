// Kiln dashboard: polls the REST API (never renders server data as HTML: textContent only).
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = sessionStorage.getItem("kiln-key") || "";
keyInput.addEventListener("change", () => { sessionStorage.setItem("kiln-key", keyInput.value); refresh(); });
let selected = null;

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

async function refresh() {
  try {
    const state = $("state-filter").value;
    const data = await api("/v1/jobs?limit=100" + (state ? "&state=" + encodeURIComponent(state) : ""));
    $("conn").textContent = "live";
    const tbody = $("jobs").querySelector("tbody");
    tbody.replaceChildren(...data.jobs.map((job) => {
      const tr = el("tr");
      tr.dataset.id = job.id;
      tr.appendChild(el("td", job.id.slice(0, 8)));
      tr.appendChild(el("td", job.spec.model));
      const st = el("td", job.state, "state " + job.state);
      st.dataset.role = "state";
      tr.appendChild(st);
      tr.appendChild(el("td", job.stage || ""));
      const td = el("td"); td.appendChild(bar(job.progress)); tr.appendChild(td);
      tr.appendChild(el("td", new Date(job.created_at * 1000).toLocaleTimeString()));
      tr.appendChild(el("td", Object.entries(job.spec.labels).map(([k, v]) => k + "=" + v).join(", ")));
      tr.addEventListener("click", () => { selected = job.id; showDetail(job); });
      if (job.id === selected) showDetail(job);
      return tr;
    }));
  } catch (e) {
    $("conn").textContent = e.status === 401 ? "API key required" : "disconnected: " + e.message;
  }
}

async function showDetail(job) {
  $("detail").hidden = false;
  $("d-id").textContent = job.id;
  $("d-state").textContent = job.state;
  $("d-state").className = "state " + job.state;
  $("d-message").textContent = job.reason || job.message || "";
  $("d-progress").style.width = Math.round(100 * job.progress) + "%";
  $("d-cancel").hidden = !(job.state === "queued" || job.state === "running");
  const err = $("d-error");
  err.hidden = !job.error;
  err.textContent = job.error ? `${job.error.code}: ${job.error.message}${job.error.hint ? " (hint: " + job.error.hint + ")" : ""}` : "";
  $("d-stages").replaceChildren(...job.stages.map((s) => {
    const li = el("li", `${s.name}: ${s.state}${s.seconds != null ? " · " + s.seconds.toFixed(2) + " s" : ""}`);
    if (s.cache_hit) li.appendChild(el("span", " cache hit", "hit"));
    return li;
  }));
  showPerformance(job);
  $("d-report").href = job.links.report;
  $("d-report").onclick = (ev) => { ev.preventDefault(); download(job.links.report, "report-" + job.id + ".json"); };
  const list = $("d-artifacts");
  if (job.state !== "succeeded") { list.replaceChildren(); return; }
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

// the build stage's performance.json (stage summary): one row per measurement
const PERF_ROWS = [
  ["build time", "build_seconds", (v) => v.toFixed(2) + " s"],
  ["load time", "load_seconds", (v) => v.toFixed(2) + " s"],
  ["time to first token", "ttft_seconds", (v) => (1000 * v).toFixed(1) + " ms"],
  ["decode, batch 1", "decode_tokens_per_second_batch_1", (v) => v.toFixed(1) + " tokens/s"],
  ["decode, max batch", "decode_tokens_per_second_max_batch", (v) => v.toFixed(1) + " tokens/s"],
  ["peak GPU memory", "peak_gpu_memory_bytes", (v) => (v / 2 ** 30).toFixed(2) + " GiB"],
];

function showPerformance(job) {
  const build = job.stages.find((s) => s.name === "build");
  const perf = build && build.summary ? build.summary.performance : null;
  $("d-perf-section").hidden = !perf;
  if (!perf) { $("d-perf").querySelector("tbody").replaceChildren(); return; }
  const why = perf.reason || null;
  $("d-perf").querySelector("tbody").replaceChildren(...PERF_ROWS.map(([label, key, fmt]) => {
    const tr = el("tr"), v = perf[key];
    tr.dataset.key = key;
    tr.appendChild(el("th", key === "decode_tokens_per_second_max_batch" && perf.max_batch_size
      ? `${label} (${perf.max_batch_size})` : label));
    const reason = key === "peak_gpu_memory_bytes" ? perf.peak_gpu_memory_reason || why : why;
    tr.appendChild(el("td", typeof v === "number" ? fmt(v) : "n/a" + (reason ? " (" + reason + ")" : ""),
      typeof v === "number" ? "" : "muted"));
    return tr;
  }));
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

$("submit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const labels = {};
  for (const pair of $("f-labels").value.split(",").map((s) => s.trim()).filter(Boolean)) {
    const [k, ...v] = pair.split("="); labels[k.trim()] = v.join("=").trim();
  }
  const spec = { model: $("f-model").value.trim(), dtype: $("f-dtype").value,
    mapping: { tp_size: +$("f-tp").value, pp_size: +$("f-pp").value }, labels };
  const out = $("submit-result");
  try {
    const job = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(spec) });
    out.textContent = "submitted " + job.id; selected = job.id; refresh();
  } catch (e) { out.textContent = (e.error?.code || "error") + ": " + e.message; }
});

refresh();
setInterval(refresh, 1000);
