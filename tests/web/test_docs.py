"""/docs: Swagger UI from the service's own files, under a policy of its own that no other response shares.

The browser test opens the page in Debian's Chromium with every request off this origin refused, as in a
deployment without internet; its screenshot goes to test-artifacts/docs/ (ITEM_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from worker.settings import Settings
from worker.web.app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("ITEM_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "docs"
# the app's policy, written out: a change to it is a change to this test too
APP_POLICY = (
    "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


@pytest.fixture(scope="module")
def app_client() -> TestClient:
    """The app on a ledger it never opens: neither /docs nor the pages compared with it read one."""
    return TestClient(create_app(Settings(database_url="sqlite://")), follow_redirects=False)


def _directives(policy: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (part.split() for part in policy.split(";") if part.strip())}


def test_docs_loads_only_this_origins_files_and_allows_its_inline_script_by_hash(app_client):
    response = app_client.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html)
    assert urls and all(url.startswith("/docs/static/") for url in urls), urls  # no CDN, no other origin
    for url in urls:
        assert app_client.get(url).status_code == 200, url
    assert "url: '/openapi.json'" in html

    [policy] = response.headers.get_list("content-security-policy")
    directives = _directives(policy)
    inline = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert directives["script-src"] == ["'self'", f"'sha256-{digest}'"]
    assert directives["img-src"] == ["'self'", "data:"] and directives["connect-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"] and directives["default-src"] == ["'none'"]
    assert directives["frame-ancestors"] == ["'none'"] and directives["base-uri"] == ["'none'"]
    assert "unsafe" not in policy
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/healthz",
        "/openapi.json",
        "/console/signin",
        "/v1/checks",
        "/no-such-page",
        "/redoc",
        "/docs/static/swagger-ui-bundle.js",
        "/docs/static/swagger-ui.css",
        "/docs/static/favicon.png",
    ],
)
def test_every_other_response_keeps_the_apps_policy(app_client, path):
    response = app_client.get(path)
    assert response.headers.get_list("content-security-policy") == [APP_POLICY], path


def test_redoc_leads_to_docs(app_client):
    response = app_client.get("/redoc")
    assert response.status_code == 308 and response.headers["location"] == "/docs"


def test_docs_is_public_like_the_description_it_shows(app_client):
    assert app_client.get("/openapi.json").status_code == 200
    assert app_client.get("/docs").status_code == 200


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_docs_renders_the_operations_in_chromium_with_no_other_origin_reachable(server):
    from playwright.sync_api import sync_playwright

    base, _log = server
    errors, violations, elsewhere = [], [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.expose_function("reportViolation", lambda text: violations.append(text))
            page.add_init_script(
                "document.addEventListener('securitypolicyviolation', "
                "event => window.reportViolation(`${event.effectiveDirective} ${event.blockedURI}`))"
            )

            def this_origin_only(route):
                if route.request.url.startswith(base + "/"):
                    return route.continue_()
                elsewhere.append(route.request.url)
                return route.abort()

            page.route("**/*", this_origin_only)
            page.goto(base + "/docs")
            # Swagger UI read the description (OpenAPI 3.1) and lists its operations
            page.locator(".opblock-summary-path", has_text="/v1/checks").first.wait_for(timeout=20_000)
            assert page.locator(".opblock").count() >= 8
            # an operation opens, and "Try it out" reaches the API from the page
            healthz = page.locator("#operations-service-healthz_healthz_get")
            healthz.locator(".opblock-summary").click()
            healthz.locator("button.try-out__btn").click()
            healthz.locator("button.execute").click()
            healthz.locator(".live-responses-table .response-col_status", has_text="200").wait_for(timeout=10_000)
            page.locator(".opblock-summary-path", has_text="/v1/checks").first.click()
            page.locator(".opblock-body").first.wait_for()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=True)
            # the listener works: an image the policy must refuse is reported as a violation
            page.evaluate("document.body.append(Object.assign(new Image(), {src: 'https://cdn.invalid/x.png'}))")
            for _ in range(50):
                if violations:
                    break
                page.wait_for_timeout(100)
        finally:
            browser.close()
    assert violations == ["img-src https://cdn.invalid/x.png"], violations
    assert [error for error in errors if "cdn.invalid" not in error] == []
    assert elsewhere == []
