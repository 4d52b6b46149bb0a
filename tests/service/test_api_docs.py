"""/docs (Swagger UI) and /redoc render in a real headless Chromium with every non-loopback request blocked:
their JS, CSS and favicon are served by the API itself (an air-gapped cluster reaches no CDN)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from urllib.parse import urlsplit

import pytest

from .harness import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    import uvicorn

    from service.api.app import create_app
    from service.api.wiring import build_runtime
    from service.settings import Settings

    settings = Settings(storage=tmp_path_factory.mktemp("docs"))
    runtime = build_runtime(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, runtime=runtime), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    runtime.close()


@pytest.fixture(scope="module")
def offline_page():
    """A Chromium page that can reach only loopback: other hosts do not resolve, and any request to one is
    aborted and recorded (the test asserts none was even attempted)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright", reason="playwright (python) is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"])
        try:
            page = browser.new_page()
            blocked: list[str] = []

            def only_loopback(route):
                host = urlsplit(route.request.url).hostname or ""
                if route.request.url.startswith(("data:", "blob:")) or host in LOOPBACK:
                    return route.continue_()
                blocked.append(route.request.url)
                return route.abort("internetdisconnected")

            page.route("**/*", only_loopback)
            yield page, blocked
        finally:
            browser.close()


def test_swagger_ui_renders_offline(api_url, offline_page):
    from playwright.sync_api import expect

    page, blocked = offline_page
    blocked.clear()
    page.goto(api_url + "/docs")
    ops = page.locator("#swagger-ui .opblock-summary-path")
    expect(ops.first).to_be_visible(timeout=20000)
    paths = ops.all_inner_texts()
    assert "/v1/jobs" in [p.strip().replace("\u200b", "") for p in paths], paths
    expect(page.locator("#swagger-ui .info .title")).to_contain_text("Kiln")
    # the stylesheet applied: Swagger UI's CSS lays the operation blocks out as flex rows
    assert page.eval_on_selector("#swagger-ui .opblock-summary", "e => getComputedStyle(e).display") == "flex"
    assert blocked == []


def test_redoc_renders_offline(api_url, offline_page):
    from playwright.sync_api import expect

    page, blocked = offline_page
    blocked.clear()
    page.goto(api_url + "/redoc")
    expect(page.locator("h1")).to_contain_text("Kiln", timeout=20000)  # the API's title, rendered by ReDoc
    expect(page.locator("h2", has_text="Submit Job")).to_have_count(1, timeout=20000)
    expect(page.get_by_text("/v1/jobs/{job_id}/artifacts/{name}.tar").first).to_be_attached()
    assert blocked == []


def test_docs_assets_are_served_by_the_api(api_url):
    import httpx

    html = httpx.get(api_url + "/docs").text
    assert "cdn" not in html and "https://" not in html, html
    redoc = httpx.get(api_url + "/redoc").text
    assert "cdn" not in redoc and "fonts.googleapis" not in redoc and "https://" not in redoc, redoc
    for asset, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "css"),
                        ("redoc.standalone.js", "javascript"), ("favicon.png", "image/png")):
        r = httpx.get(f"{api_url}/static/docs/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.content) > 1000, asset
