"""The console in a real browser: Debian's Chromium driven by Playwright, against `item serve` as a process.

Screenshots go to test-artifacts/console/ (ITEM_TEST_ARTIFACTS overrides), to be looked at after a run.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import random_head
from tests.web.conftest import image_b64
from worker.ledger.models import CheckRow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ITEM = Path(sys.executable).parent / "item"
ARTIFACTS = Path(os.environ.get("ITEM_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "console"
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(served, tmp_path) -> Iterator[tuple[str, Path]]:
    """`item serve` on a free port; yields its base URL and the file its output goes to."""
    port, log = _free_port(), tmp_path / "serve.log"
    env = {**os.environ, "ITEM_DATABASE_URL": served.settings.database_url, "ITEM_HTTP_PORT": str(port)}
    with log.open("w") as output:
        process = subprocess.Popen([ITEM, "serve", "--log-level", "info"], env=env, stdout=output, stderr=output)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, process, log)
        yield base, log
    finally:
        process.terminate()
        process.wait(10)


def _wait_until_up(base: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"item serve exited: {log.read_text()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"item serve did not answer in 30 s: {log.read_text()}")


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def _flagged_checks(served, client, n: int = 2) -> list[CheckRow]:
    """Checks filed through the API and run by the worker code, under a head that flags everything."""
    served.service.detector.use_head(random_head(served.service.detector, threshold=0.0))
    served.service.register_version(activate=True)
    for seed in range(n):
        body = {"external_id": f"upload-{seed}", "image": {"b64": image_b64(seed, 160, 120)}}
        assert client.post("/v1/checks", json=body, headers=served.headers("submit")).status_code == 202
    served.run_checks()
    with served.ledger.session() as session:
        rows = list(session.scalars(sa.select(CheckRow).order_by(CheckRow.external_id)))
    assert [row.verdict for row in rows] == ["fake"] * n and any(row.object_count for row in rows)
    return rows


def _sign_in(page, base: str, key: str, to: str = "/console") -> None:
    page.goto(base + to)
    assert "/console/signin" in page.url  # not signed in: sent to sign in, and back afterwards
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_a_moderator_signs_in_sees_the_evidence_and_decides(served, client, server, browser, tmp_path):
    base, log = server
    checks = _flagged_checks(served, client)
    check = max(checks, key=lambda row: row.object_count or 0)
    page = browser.new_page()
    _sign_in(page, base, served.keys["review"])
    assert page.url.rstrip("/").endswith("/console")
    assert page.locator("tr.check-row").count() == len(checks)
    _shot(page, "queue")
    # opening a flagged check: the image with one outline per grounded object, labelled with its phrase
    page.click(f"a[href='/console/checks/{check.id}'] >> nth=1")
    page.wait_for_load_state()
    assert page.locator("svg.evidence-image rect.box").count() == check.object_count
    assert page.locator("tr.object-row").count() == check.object_count
    labels = page.locator("svg.evidence-image text.box-label").all_text_contents()
    assert [label.split(". ", 1)[1] for label in labels] == [o["phrase"] for o in check.objects]
    assert page.evaluate("document.querySelector('svg.evidence-image image').getBBox().width") > 0
    _shot(page, "check")
    # a decision is recorded with who made it, and exported as a label
    page.click("button[value=ai_generated]")
    page.wait_for_load_state()
    assert "AI-generated by test-review" in page.locator("li.decision-entry").first.text_content()
    _shot(page, "decided")
    exported = tmp_path / "labels"
    env = {**os.environ, "ITEM_DATABASE_URL": served.settings.database_url}
    subprocess.run([ITEM, "labels", "export", "--out", str(exported)], env=env, check=True, capture_output=True)
    with (exported / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["check_id"], row["label"]) for row in rows] == [(check.id, "fake")]
    # no key ever reaches the server's log
    assert all(key not in log.read_text() for key in served.keys.values())


def test_model_output_is_text_never_markup(served, client, server, browser):
    base, _ = server
    check = _flagged_checks(served, client, n=1)[0]
    objects = [{**one, "phrase": HOSTILE} for one in check.objects or []]
    with served.ledger.session() as session:
        session.execute(sa.update(CheckRow).where(CheckRow.id == check.id).values(caption=HOSTILE, objects=objects))
    page = browser.new_page()
    _sign_in(page, base, served.keys["read"], to=f"/console/checks/{check.id}")
    assert f"/console/checks/{check.id}" in page.url
    assert page.locator("dd.caption").text_content() == HOSTILE
    assert page.evaluate("window.__pwned === undefined")
    assert page.locator("dd.caption img, dd.caption script, td.phrase img").count() == 0
    assert page.locator("button[value=ai_generated]").count() == 0  # a read key cannot decide
    _shot(page, "hostile-caption")


def test_operations_page_and_activation_with_confirmation(served, client, server, browser):
    base, _ = server
    _flagged_checks(served, client, n=1)
    first = served.service.version_id
    served.service.detector.use_head(random_head(served.service.detector, seed=3))
    served.service.register_version(activate=False)  # a second version, registered, not active
    second = served.service.version_id
    page = browser.new_page()
    _sign_in(page, base, served.keys["admin"], to="/console/operations")
    assert page.locator("code.active-version").text_content() == first
    _shot(page, "operations")
    page.click(f"a[href='/console/versions/{second}/activate']")
    page.wait_for_load_state()
    page.fill("#confirm", "not the id")  # the confirmation step refuses anything but the version's id
    page.click("form.confirm button[type=submit]")
    page.wait_for_load_state()
    assert "/activate" in page.url
    page.fill("#confirm", second)
    page.click("form.confirm button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("code.active-version").text_content() == second


def test_forms_without_their_token_and_pages_without_sign_in_are_refused(served, server):
    base, _ = server
    with httpx.Client(base_url=base, follow_redirects=False) as http:
        for path in ("/console", "/console/operations", "/console/checks/x", "/console/checks/x/image"):
            answer = http.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/console/signin")
        # signed in, a decision posted without the form's CSRF token is refused
        form = http.get("/console/signin")
        csrf = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        signed = http.post("/console/signin", data={"key": served.keys["review"], "csrf": csrf, "next": "/console"})
        assert signed.status_code == 303 and "item_session" in signed.cookies
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        refused = http.post("/console/checks/x/decision", data={"label": "authentic", "csrf": "wrong"})
        assert refused.status_code == 403
        # and a forged sign-in form (no token of ours) is refused too
        forged = httpx.post(f"{base}/console/signin", data={"key": served.keys["review"], "csrf": "x", "next": "/"})
        assert forged.status_code == 303 and "error=expired" in forged.headers["location"]
