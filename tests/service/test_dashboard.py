"""The dashboard in a real headless Chromium against a running `kiln serve` (REST + a Celery worker):
every kind of job submitted from the form and watched to its end, its report and charts, two jobs side
by side, the API's validation errors next to their fields, the copyable curl / kiln submit commands
(run for real), and a load without console errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

from .conftest import TINY_REPO
from .harness import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LONG = 120_000  # ms: a whole job on 2 shared cores


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright", reason="playwright (python) is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server["http"])
    page = context.new_page()
    page.problems = []  # console errors, page errors and failed requests, for the tests that check them
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: page.problems.append(f"pageerror: {e}"))
    page.on("response", lambda r: r.status >= 400 and page.problems.append(f"HTTP {r.status} {r.url}"))
    page.on("requestfailed", lambda r: page.problems.append(f"failed: {r.url} {r.failure}"))
    yield page
    context.close()


def _open(page, server):
    from playwright.sync_api import expect

    page.goto(server["http"] + "/")
    expect(page.locator("#conn")).to_have_text("live", timeout=15000)
    expect(page.locator("#b-backend option[value='torch']")).to_have_count(1, timeout=15000)


def _submit(page) -> str:
    from playwright.sync_api import expect

    page.click("#f-submit")
    expect(page.locator("#submit-result")).to_contain_text("submitted", timeout=15000)
    return page.locator("#submit-result").inner_text().split()[-1]


def _reset(page):
    from playwright.sync_api import expect

    page.click("#f-reset")
    expect(page.locator("#q-algo")).to_be_disabled()  # the section is off again
    expect(page.locator("#f-model")).to_have_value("")


def _fill_quantized(page, algo="W8A16", **thresholds):
    page.check("#q-on")
    page.select_option("#q-algo", algo)
    page.fill("#q-cal-samples", "8")
    page.fill("#q-cal-seq", "32")
    for field, value in thresholds.items():
        page.fill(f"#q-th-{field}", str(value))


def _fill_build(page):
    page.check("#b-on")
    page.select_option("#b-backend", "torch")
    page.select_option("#b-target", "cpu")
    page.fill("#b-batch", "2")
    page.fill("#b-input", "32")
    page.fill("#b-seq", "64")


def _fill_evaluation(page):
    page.check("#e-on")
    page.fill("#e-samples", "2")
    page.fill("#e-seq", "32")
    page.fill("#e-new", "4")


def _finish(page, job_id, state="succeeded"):
    from playwright.sync_api import expect

    row = page.locator(f"tr[data-id='{job_id}']")
    expect(row.locator("td[data-role='state']")).to_have_text(state, timeout=LONG)
    # The job list is re-rendered by its poll every second; on a loaded machine a click that races the
    # re-render was once lost (the detail kept the previous job). A user clicks again; so does the test.
    for _ in range(2):
        row.click()
        try:
            expect(page.locator("#d-id")).to_have_text(job_id, timeout=3000)
            break
        except AssertionError:
            continue
    expect(page.locator("#d-id")).to_have_text(job_id)
    expect(page.locator("#d-state")).to_have_text(state)


def _report(page, job_id) -> dict:
    from playwright.sync_api import expect

    expect(page.locator("#d-report")).to_be_visible()
    with page.expect_download() as download:
        page.click("#d-report")
    report = json.loads(open(download.value.path()).read())
    assert report["job"] == job_id
    return report


def test_dashboard_loads_without_console_errors(page, server):
    _open(page, server)
    page.wait_for_timeout(1500)  # a poll or two of jobs after the first render
    assert page.problems == []


def test_build_choices_come_from_the_live_workers(page, server):
    workers = httpx.get(server["http"] + "/v1/workers").json()["workers"]
    backends = sorted({b for w in workers for b in w["backends"]})
    _open(page, server)
    options = page.locator("#b-backend option").all_inner_texts()
    assert sorted(options) == backends and "torch" in options
    assert page.locator("#b-target option").all_inner_texts() == ["cpu"]  # the embedded worker serves the cpu queue
    expect_summary = page.locator("#workers-summary").inner_text()
    assert expect_summary.startswith(f"{len(workers)} worker") and "torch" in expect_summary


def _field_error(page, input_id):
    """The error shown right after the label holding the input."""
    return page.locator(f"label:has(#{input_id}) + .field-error")


def test_api_validation_errors_appear_next_to_their_fields(page, server):
    from playwright.sync_api import expect

    _open(page, server)
    # a pydantic field error (loc: model)
    page.fill("#f-model", "https://evil.example/model")
    page.click("#f-submit")
    expect(_field_error(page, "f-model")).to_contain_text("Hugging Face repo id", timeout=10000)
    expect(page.locator("#f-model")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#form-error")).to_contain_text("invalid_argument")
    assert "Value error" not in _field_error(page, "f-model").inner_text()
    # nested field errors, several at once (loc: quantization.thresholds.min_top1_agreement, calibration.samples)
    page.fill("#f-model", TINY_REPO)
    _fill_quantized(page)
    page.fill("#q-th-top1", "1.5")
    page.fill("#q-cal-samples", "0")
    page.click("#f-submit")
    expect(_field_error(page, "q-th-top1")).to_contain_text("less than or equal to 1", timeout=10000)
    expect(_field_error(page, "q-cal-samples")).to_contain_text("greater than or equal to 1")
    expect(_field_error(page, "f-model")).to_have_count(0)  # the previous submit's errors are gone
    # editing a field clears its error
    page.fill("#q-th-top1", "0.8")
    expect(_field_error(page, "q-th-top1")).to_have_count(0)
    page.fill("#q-cal-samples", "8")
    # a section-level check (loc: build) lands on the field its message names
    _fill_build(page)
    page.fill("#b-input", "128")
    page.click("#f-submit")
    expect(_field_error(page, "b-input")).to_contain_text("exceeds max_seq_len", timeout=10000)
    page.fill("#b-input", "32")
    # a spec-level check (loc: body) on the mapping it names
    page.fill("#f-tp", "2")
    page.click("#f-submit")
    expect(_field_error(page, "f-tp")).to_contain_text("quantization runs at tp_size=1", timeout=10000)
    page.fill("#f-tp", "1")
    # a submit-time check of the service (no location) lands on the backend, with the API's hint
    page.select_option("#q-algo", "W8A8_SQ_PER_CHANNEL")
    page.click("#f-submit")
    expect(_field_error(page, "b-backend")).to_contain_text("does not build W8A8_SQ_PER_CHANNEL", timeout=10000)
    expect(page.locator("#form-error .hint")).to_contain_text("weight-only algo")
    expect(page.locator("#submit-result")).to_have_text("invalid_argument: 1 problem, marked next to the field")


def _run(script: str, server) -> str:
    """A copied command, run by bash; `kiln` is this tree's CLI."""
    prelude = f'kiln() {{ "{sys.executable}" -m service.cli "$@"; }}\n'
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", prelude + script], cwd=ROOT, env=server["env"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_copied_curl_and_kiln_submit_commands_submit_the_form_spec(page, server, tmp_path):
    from playwright.sync_api import expect

    _open(page, server)
    page.fill("#f-model", TINY_REPO)
    page.select_option("#f-dtype", "float32")
    page.fill("#f-labels", "team=search, note=it's")
    # flags only: kiln submit needs no spec file
    expect(page.locator("#cmd-kiln")).not_to_contain_text("--spec")
    expect(page.locator("#cmd-kiln")).to_contain_text("--label 'note=it'\\''s'")
    page.fill("#f-webhook", "https://93.184.216.34/kiln")  # no kiln submit flag: a spec file
    expect(page.locator("#cmd-kiln")).to_contain_text("--spec")
    _fill_quantized(page, algo="W4A16_AWQ", kl=0.5)
    page.check("#q-zero")
    page.select_option("#q-kv", "INT8")
    _fill_build(page)
    _fill_evaluation(page)
    page.fill("#e-min-rouge1", "0.1")
    page.uncheck("input[name=e-metric][value=kl]")
    form_spec = page.evaluate("specFromForm()")
    assert form_spec["quantization"]["algo"] == "W4A16_AWQ" and form_spec["quantization"]["has_zero_point"] is True
    assert form_spec["quantization"]["thresholds"]["max_kl_divergence"] == 0.5
    assert form_spec["build"] == {"backend": "torch", "target": "cpu", "max_batch_size": 2, "max_input_len": 32,
                                  "max_seq_len": 64}
    assert form_spec["evaluation"]["metrics"] == ["perplexity", "agreement", "rouge"]
    assert form_spec["labels"] == {"team": "search", "note": "it's"}
    curl, kiln = page.locator("#cmd-curl").inner_text(), page.locator("#cmd-kiln").inner_text()
    assert "--spec" in kiln and "--server " + server["http"] in kiln
    page.click("#copy-curl")
    assert page.evaluate("navigator.clipboard.readText()") == curl
    # the compiler's submit-time preflight: AWQ's group size must divide the tiny model's 64 features
    page.click("#f-submit")
    expect(_field_error(page, "q-group")).to_contain_text("does not divide the 64 input features", timeout=15000)
    page.fill("#q-group", "32")
    curl, kiln = page.locator("#cmd-curl").inner_text(), page.locator("#cmd-kiln").inner_text()
    assert '"group_size":32' in curl
    # what the form submits, what curl submits and what kiln submits are one spec
    form_id = _submit(page)
    curl_id = json.loads(_run(curl, server))["id"]
    kiln_id = _run(f"cd {tmp_path}\n" + kiln, server).strip().splitlines()[-1]
    specs = []
    for job_id in (form_id, curl_id, kiln_id):
        specs.append(httpx.get(f"{server['http']}/v1/jobs/{job_id}").json()["spec"])
        httpx.post(f"{server['http']}/v1/jobs/{job_id}:cancel")  # not needed: keep the worker free
    assert specs[0] == specs[1] == specs[2]
    assert specs[0]["quantization"]["kv_cache"] == "INT8" and specs[0]["webhook_url"] == "https://93.184.216.34/kiln"


def test_every_kind_of_job_from_the_form_runs_to_its_end_with_its_report(page, server):
    from playwright.sync_api import expect

    _open(page, server)
    # submit them all first, so the worker runs them while the browser watches
    page.fill("#f-model", TINY_REPO)
    page.select_option("#f-dtype", "float32")
    page.fill("#f-labels", "kind=convert")
    convert_id = _submit(page)
    page.fill("#f-labels", "kind=quantized")
    _fill_quantized(page)
    _fill_evaluation(page)
    quant_id = _submit(page)
    _reset(page)
    page.fill("#f-model", TINY_REPO)
    page.select_option("#f-dtype", "float32")
    page.fill("#f-labels", "kind=build")
    _fill_build(page)
    _fill_evaluation(page)
    build_id = _submit(page)
    _reset(page)
    page.fill("#f-model", TINY_REPO)
    page.select_option("#f-dtype", "float32")
    page.fill("#f-labels", "kind=gate")
    _fill_quantized(page, kl=0)  # no quantization has zero KL divergence: the accuracy gate fails the job
    _fill_evaluation(page)
    gate_id = _submit(page)
    _reset(page)
    page.fill("#f-model", TINY_REPO)
    page.fill("#f-labels", "fail=refused by the test stage")
    failed_id = _submit(page)

    # plain convert: a checkpoint, no report
    _finish(page, convert_id)
    expect(page.locator("#d-stages")).to_contain_text("convert: done")
    expect(page.locator("#d-artifacts")).to_contain_text("checkpoint/rank0.safetensors", timeout=10000)
    expect(page.locator("#d-stage-chart svg[data-chart='stage-seconds'] g[data-metric='convert'] rect")).to_have_count(1)
    expect(page.locator("#d-report")).to_be_hidden()
    expect(page.locator("#d-quant-section")).to_be_hidden()
    expect(page.locator("#d-perf-section")).to_be_hidden()

    # quantized: the quantization report with its chart against the thresholds, and the JSON report
    _finish(page, quant_id)
    expect(page.locator("#d-stages")).to_contain_text("quantize: done")
    expect(page.locator("#d-quant-section")).to_be_visible()
    expect(page.locator("#d-quant tr[data-key='quant_algo'] td")).to_have_text("W8A16")
    expect(page.locator("#d-quant-verdict")).to_contain_text("PASSED")
    chart = page.locator("#d-quant-chart svg[data-chart='quant-accuracy']")
    for metric in ("top1_agreement", "rouge_l", "kl_divergence", "perplexity_increase_pct"):
        expect(chart.locator(f"g[data-metric='{metric}'] rect")).to_have_count(1)
        expect(chart.locator(f"g[data-metric='{metric}'] line.marker")).to_have_count(1)
    report = _report(page, quant_id)
    assert report["evaluation"]["passed"] is True and report["evaluation"]["accuracy"]["quant_algo"] == "W8A16"
    assert float(page.locator("#d-quant tr[data-key='top1_agreement'] td").inner_text().split()[0]) == \
        pytest.approx(report["evaluation"]["accuracy"]["top1_agreement"], abs=1e-3)

    # build + evaluation: the engine's performance and its agreement with the reference, with charts
    _finish(page, build_id)
    perf = page.locator("#d-perf")
    expect(perf).to_be_visible(timeout=10000)
    expect(perf.locator("tr[data-key='ttft_seconds'] td")).to_contain_text(" ms")
    expect(perf.locator("tr[data-key='decode_tokens_per_second_max_batch']")).to_contain_text("(2)")
    expect(perf.locator("tr[data-key='decode_tokens_per_second_batch_1'] td")).to_contain_text("tokens/s")
    expect(perf.locator("tr[data-key='peak_gpu_memory_bytes'] td")).to_contain_text("n/a (CPU engine")
    throughput = page.locator("#d-perf-chart svg[data-chart='decode-throughput']")
    expect(throughput.locator("rect")).to_have_count(2)
    expect(throughput).to_contain_text("tok/s")
    expect(page.locator("#d-perf-chart svg[data-chart='engine-latency'] g[data-metric='ttft_seconds']")).to_contain_text("ms")
    expect(page.locator("#d-engine-section")).to_be_visible()
    expect(page.locator("#d-engine-chart svg[data-chart='engine-accuracy'] rect")).to_have_count(4)
    report = _report(page, build_id)
    assert report["evaluation"]["engine"]["performance"]["batch"] >= 1

    # the accuracy gate: a failed job that keeps its report, which says why
    _finish(page, gate_id, "failed")
    expect(page.locator("#d-error")).to_contain_text("accuracy_below_threshold")
    expect(page.locator("#d-quant-verdict")).to_contain_text("FAILED")
    expect(page.locator("#d-quant-chart g[data-metric='kl_divergence'] rect.bad")).to_have_count(1)
    assert _report(page, gate_id)["evaluation"]["passed"] is False

    # a job failing in a stage has no report: no report link
    _finish(page, failed_id, "failed")
    expect(page.locator("#d-error")).to_contain_text("refused by the test stage")
    expect(page.locator("#d-report")).to_be_hidden()
    expect(page.locator("#d-report-line")).to_be_hidden()

    # two jobs side by side: a quantized job against an engine build
    page.select_option("#cmp-a", quant_id)
    page.select_option("#cmp-b", build_id)
    page.click("#cmp-go")
    table = page.locator("#cmp-table")
    expect(table.locator("thead")).to_contain_text(quant_id[:8])
    expect(table.locator("thead")).to_contain_text(build_id[:8])
    expect(table.locator("tr[data-key='pipeline'] td").nth(0)).to_contain_text("W8A16")
    expect(table.locator("tr[data-key='pipeline'] td").nth(1)).to_contain_text("build torch/cpu")
    expect(table.locator("tr[data-key='decode_b1'] td").nth(0)).to_have_text("—")
    expect(table.locator("tr[data-key='decode_b1'] td").nth(1)).to_contain_text(".")
    expect(page.locator("#cmp-chart svg[data-chart='compare'] g[data-metric='total_seconds'] rect")).to_have_count(2)
    assert page.problems == []


def test_gguf_and_meta_sources_from_the_form(page, server, tmp_path):
    """The source selector: a Meta checkpoint folder under the sources root, submitted from the form, runs
    to its end; a GGUF path that is not there is refused next to the name field; the copied kiln command
    carries --gguf / --meta and submits the same spec."""
    from playwright.sync_api import expect

    transformers = pytest.importorskip("transformers")
    import torch

    from tests.meta_files import write_meta_checkpoint

    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
        vocab_size=96, tie_word_embeddings=False))
    folder = server["root"] / "storage" / "sources" / "dashboard" / "tiny-meta"
    write_meta_checkpoint(model, {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96,
                                  "multiple_of": 32, "norm_eps": 1e-5}, folder, shards=2, embed_dim=0)
    _open(page, server)
    page.select_option("#f-source", "gguf")
    expect(page.locator("#f-model-label")).to_contain_text("GGUF file")
    expect(page.locator("#f-revision")).to_be_disabled()
    page.fill("#f-model", "dashboard/missing.gguf")
    assert page.evaluate("specFromForm()")["source"] == {"kind": "gguf", "path": "dashboard/missing.gguf"}
    expect(page.locator("#cmd-kiln")).to_contain_text("kiln submit --gguf dashboard/missing.gguf")
    page.click("#f-submit")
    expect(_field_error(page, "f-model")).to_contain_text("missing.gguf", timeout=15000)
    # a Meta folder: the form's spec, the copied kiln command's and the job's are one
    page.select_option("#f-source", "meta")
    page.fill("#f-model", "dashboard/tiny-meta")
    page.select_option("#f-dtype", "float32")
    spec = page.evaluate("specFromForm()")
    assert spec["source"] == {"kind": "meta", "path": "dashboard/tiny-meta"} and "model" not in spec
    kiln = page.locator("#cmd-kiln").inner_text()
    assert "--meta dashboard/tiny-meta" in kiln and "--spec" not in kiln
    job_id = _submit(page)
    _finish(page, job_id)
    job = httpx.get(f"{server['http']}/v1/jobs/{job_id}").json()
    assert (job["spec"]["source"]["kind"], job["spec"]["source"]["path"]) == ("meta", "dashboard/tiny-meta")
    assert job["spec"]["model"] == "meta/tiny-meta" and job["artifacts"] == ["checkpoint"]
    kiln_id = _run(f"cd {tmp_path}\n" + kiln, server).strip().splitlines()[-1]
    assert httpx.get(f"{server['http']}/v1/jobs/{kiln_id}").json()["spec"] == job["spec"]
    _reset(page)
    expect(page.locator("#f-model-label")).to_contain_text("Hugging Face repo id")
    expect(page.locator("#f-revision")).to_be_enabled()
