"""The review page in a real browser: two moderators, each in a browser context of their own, work one queue by
keyboard against `item serve`; each always holds an item the other does not."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import random_head
from tests.web.conftest import image_b64, needs_chromium
from worker.ledger.models import CheckRow, DecisionRow, ReviewItemRow
from worker.web.keys import create_key

CHECKS = 4
ARTIFACTS = Path(os.environ.get("ITEM_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "console"

pytestmark = needs_chromium


def _queued_checks(served, client) -> dict[str, int]:
    """Uploads filed through the API and run by the worker code under a head that flags everything: {check id:
    reviews it needs}, read from the review queue the worker filled."""
    served.service.detector.use_head(random_head(served.service.detector, threshold=0.0))
    served.service.register_version(activate=True)
    for seed in range(CHECKS):
        body = {"external_id": f"upload-{seed}", "image": {"b64": image_b64(seed, 160, 120)}}
        assert client.post("/v1/checks", json=body, headers=served.headers("submit")).status_code == 202
    assert served.run_checks() == CHECKS
    with served.ledger.session() as session:
        return dict(session.execute(sa.select(ReviewItemRow.check_id, ReviewItemRow.reviews_needed)).all())


def _moderator(browser, base: str, key: str):
    page = browser.new_context().new_page()
    page.goto(f"{base}/console/review")
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert page.url.endswith("/console/review")
    return page


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _holding(page) -> str | None:
    item = page.locator("article.review-item")
    return item.get_attribute("data-check") if item.count() else None


def test_two_moderators_never_get_the_same_item_and_decide_by_keyboard(served, client, server, browser):
    base, _ = server
    needed = _queued_checks(served, client)
    assert len(needed) == CHECKS
    keys = {name: create_key(served.ledger, name, ["review"]) for name in ("mod-a", "mod-b")}
    pages = {name: _moderator(browser, base, new.key) for name, new in keys.items()}
    held = {name: _holding(page) for name, page in pages.items()}
    assert None not in held.values() and held["mod-a"] != held["mod-b"]
    _shot(pages["mod-a"], "review")
    # a reload gives the same item back; the help opens and closes by keyboard
    pages["mod-a"].reload()
    assert _holding(pages["mod-a"]) == held["mod-a"]
    assert pages["mod-a"].locator("#lease-left").text_content().startswith(("4:", "5:"))
    pages["mod-a"].keyboard.press("?")
    assert pages["mod-a"].locator("#review-help").is_visible()
    pages["mod-a"].keyboard.press("?")
    assert not pages["mod-a"].locator("#review-help").is_visible()
    decided: dict[str, list[str]] = {"mod-a": [], "mod-b": []}
    labels = {"mod-a": ("f", "ai_generated"), "mod-b": ("a", "authentic")}
    for _ in range(2 * sum(needed.values())):  # each decision loads the next item, until both queues run dry
        for name, page in pages.items():
            if held[name] is None:
                continue
            with page.expect_navigation():
                page.keyboard.press(labels[name][0])
            decided[name].append(held[name])
            held[name] = _holding(page)
            others = [other for other in held.values() if other is not None]
            assert len(others) == len(set(others)), f"two moderators hold one item: {held}"
        if not any(held.values()):
            break
    assert all(page.locator("p.review-empty").is_visible() for page in pages.values())
    # every review the queue asked for was made, none twice by one moderator, each with its moderator's label
    with served.ledger.session() as session:
        decisions = list(session.execute(sa.select(DecisionRow.check_id, DecisionRow.key_id, DecisionRow.label)))
    assert sorted(decided["mod-a"] + decided["mod-b"]) == sorted(c for c, n in needed.items() for _ in range(n))
    assert len(decisions) == len({(check, key) for check, key, _ in decisions}) == sum(needed.values())
    by_key = {keys[name].key_id: label for name, (_, label) in labels.items()}
    assert all(label == by_key[key] for _, key, label in decisions)
    # the operations page counts each moderator's decisions
    operations = pages["mod-a"]
    operations.goto(f"{base}/console/operations")
    for name, new in keys.items():
        cells = operations.locator("tr.moderator-row", has_text=new.key_id).locator("td").all_text_contents()
        assert cells == [name, new.key_id, str(len(decided[name])), str(len(decided[name]))]
    _shot(operations, "review-operations")


def _signed_in(client, key: str) -> None:
    form = client.get("/console/signin")
    csrf = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    signed = client.post("/console/signin", data={"key": key, "csrf": csrf, "next": "/console/review"})
    assert signed.status_code == 303 and signed.headers["location"] == "/console/review"


def test_the_review_page_needs_its_scope_its_form_token_and_escapes_what_a_model_wrote(served, client):
    hostile = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    check_id = next(iter(_queued_checks(served, client)))
    with served.ledger.session() as session:
        session.execute(
            sa.update(ReviewItemRow).values(band=0, p_fake_desc=-1.0).where(ReviewItemRow.check_id == check_id)
        )
        session.execute(sa.update(CheckRow).where(CheckRow.id == check_id).values(caption=hostile))
    answer = client.get("/console/review")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/console/signin")
    _signed_in(client, served.keys["read"])
    assert client.get("/console/review").status_code == 403  # a read key cannot take review work
    _signed_in(client, served.keys["review"])
    page = client.get("/console/review")
    assert f'data-check="{check_id}"' in page.text and "&lt;script&gt;window.__pwned" in page.text
    assert "<script>window" not in page.text and "<img src=x" not in page.text
    token = page.text.split('name="token" value="', 1)[1].split('"', 1)[0]
    csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    for action, data in (("decision", {"label": "authentic"}), ("skip", {})):
        refused = client.post(f"/console/review/{check_id}/{action}", data={**data, "token": token, "csrf": "wrong"})
        assert refused.status_code == 403
    stale = client.post(f"/console/review/{check_id}/decision", data={"label": "authentic", "token": "x", "csrf": csrf})
    assert stale.status_code == 303 and stale.headers["location"] == "/console/review?lost=1"
    assert "another moderator took it" in client.get("/console/review?lost=1").text
    decided = client.post(
        f"/console/review/{check_id}/decision", data={"label": "authentic", "token": token, "csrf": csrf}
    )
    assert decided.status_code == 303 and decided.headers["location"] == "/console/review"
    with served.ledger.session() as session:
        assert session.execute(
            sa.select(DecisionRow.label).where(DecisionRow.check_id == check_id)
        ).scalars().all() == ["authentic"]
