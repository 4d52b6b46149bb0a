"""The dashboard in a real headless Chromium against a running `kiln serve`: a submitted job reaches succeeded."""

from __future__ import annotations

import shutil

import pytest

from .conftest import TINY_REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def server_url(server):
    return server["http"]


def test_dashboard_shows_a_submitted_job_reaching_succeeded(server_url):
    if not shutil.which("chromium") and not __import__("os").path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright", reason="playwright (python) is not installed")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(server_url + "/")
            expect(page.locator("#conn")).to_have_text("live", timeout=15000)
            page.fill("#f-model", TINY_REPO)
            page.select_option("#f-dtype", "float16")
            page.fill("#f-labels", "from=browser")
            page.click("#f-submit")
            expect(page.locator("#submit-result")).to_contain_text("submitted", timeout=15000)
            job_id = page.locator("#submit-result").inner_text().split()[-1]
            row = page.locator(f"tr[data-id='{job_id}'] td[data-role='state']")
            expect(row).to_have_text("succeeded", timeout=60000)
            page.locator(f"tr[data-id='{job_id}']").click()
            expect(page.locator("#d-stages")).to_contain_text("convert: done")
            expect(page.locator("#d-artifacts")).to_contain_text("checkpoint/rank0.safetensors", timeout=10000)
            # a job that builds an engine shows the build's performance report as a table
            build_id = page.evaluate("""async (model) => {
                const r = await fetch("/v1/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                  body: JSON.stringify({model, dtype: "float32", build: {backend: "torch", target: "cpu",
                    max_batch_size: 2, max_input_len: 32, max_seq_len: 64}})});
                return (await r.json()).id; }""", TINY_REPO)
            build_row = page.locator(f"tr[data-id='{build_id}']")
            expect(build_row.locator("td[data-role='state']")).to_have_text("succeeded", timeout=120000)
            build_row.click()
            perf = page.locator("#d-perf")
            expect(perf).to_be_visible(timeout=10000)
            expect(perf.locator("tr[data-key='ttft_seconds'] td")).to_contain_text(" ms")
            expect(perf.locator("tr[data-key='decode_tokens_per_second_max_batch']")).to_contain_text("(2)")
            expect(perf.locator("tr[data-key='decode_tokens_per_second_batch_1'] td")).to_contain_text("tokens/s")
            expect(perf.locator("tr[data-key='peak_gpu_memory_bytes'] td")).to_contain_text("n/a (CPU engine")
            # a bad spec shows the error code and message from the API
            page.fill("#f-model", "https://evil.example/model")
            page.click("#f-submit")
            expect(page.locator("#submit-result")).to_contain_text("invalid_argument", timeout=10000)
        finally:
            browser.close()
