"""The console's evidence of videos, animations and near-copies: a check's sampled frames as a strip (thumbnails
served only through a check the visitor may see, by their place in its list), the near-copy it was answered
from, and the moderator decision a near-copy matched. The checks are put into the ledger as a worker leaves them
done, so the pages read exactly the stored shapes."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.conftest import encode, noise_image
from tests.web.conftest import needs_chromium
from worker.ledger import reviews, tenants
from worker.ledger.models import DEFAULT_TENANT, CheckRow, new_id
from worker.ledger.states import CheckStatus
from worker.web.keys import create_key

HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
FLAGGED = (1, 4)
MISSING = 3  # the frame whose thumbnail is not kept
OTHER = "other"
DECISION = new_id()  # the id of the moderator decision the bank matched


def _frames(n: int = 6) -> list[dict]:
    frames = []
    for i in range(n):
        fake = i in FLAGGED
        frames.append({
            "index": i, "time_s": i * 2.5, "sha256": hashlib.sha256(f"frame-{i}".encode()).hexdigest(),
            "p_fake": 0.9 - i / 100 if fake else 0.1 + i / 100, "verdict": "fake" if fake else "real",
            "caption": HOSTILE if i == 0 else f"frame {i}: a dog on a beach",
            "objects": [{"phrase": "a dog", "box": [1.0, 2.0, 30.0, 40.0], "score": 0.5, "misalignment": 0.3}],
        })  # fmt: skip
    return frames


MEDIA = {
    "kind": "video",
    "format": "MP4",
    "duration_s": 14.0,
    "frame_rule": "even-v1:n=6",
    "aggregation": {"rule": "kth_highest", "k": 2, "flagged": len(FLAGGED), "frames": 6},
    "frames": _frames(),
}


def _done(session, version_id: str, tenant_id: str, external_id: str, **values) -> str:
    """A done check as a worker leaves it; returns its id."""
    now = datetime.now(UTC)
    row = {
        "id": new_id(), "tenant_id": tenant_id, "external_id": external_id, "pipeline_version_id": version_id,
        "source": {"url": f"https://example.com/{external_id}"}, "status": CheckStatus.done, "attempts": 1,
        "p_fake": 0.86, "verdict": "fake", "verdict_reason": "score", "threshold": 0.5, "caption": "a dog",
        "object_count": 0, "objects": [], "created_at": now, "available_at": now, "updated_at": now,
        "started_at": now, "finished_at": now, **values,
    }  # fmt: skip
    session.execute(sa.insert(CheckRow), [row])
    return row["id"]


@pytest.fixture
def checks(served) -> dict[str, str]:
    """A video check (6 frames, 2 flagged, 5 thumbnails kept), a still image answered from a near-copy, one the
    decision bank decided, and another tenant's video (its frames' thumbnails are kept: a 404 is the narrowing)."""
    with served.ledger.session() as session:
        tenants.create_tenant(session, OTHER)
        version = served.ledger.active_version(session).id
        made = {
            "video": _done(session, version, DEFAULT_TENANT, "clip", media=MEDIA),
            "other": _done(session, version, OTHER, "their-clip", media=MEDIA),
        }
        made["reused"] = _done(session, version, DEFAULT_TENANT, "copy", reused_from={"check_id": made["video"],
                               "distance": 7})  # fmt: skip
        bank = {"label": "fake", "check_id": made["video"], "decision_id": DECISION, "distance": 3}
        made["match"] = _done(session, version, DEFAULT_TENANT, "matched", match=bank, verdict_reason="match")
        kept = [frame for frame in MEDIA["frames"] if frame["index"] != MISSING]
        reviews.put_thumbnails(session, [_thumbnail(frame) for frame in kept])
    return made


def _thumbnail(frame: dict) -> reviews.Thumbnail:
    data = encode(noise_image(frame["index"], 96, 54), "JPEG")
    return reviews.Thumbnail(frame["sha256"], data, 96, 54)


def _signed_in(client, key: str) -> None:
    form = client.get("/console/signin")
    csrf = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    signed = client.post("/console/signin", data={"key": key, "csrf": csrf, "next": "/console"})
    assert signed.status_code == 303


@needs_chromium
def test_the_strip_shows_every_frame_in_order_marks_the_flagged_ones_and_escapes_captions(
    served, checks, server, browser
):
    base, _ = server
    page = browser.new_page()
    loaded = {}
    page.on("response", lambda r: "/frames/" in r.url and loaded.update({r.url: (r.status, r.headers)}))
    page.goto(f"{base}/console/checks/{checks['video']}")
    page.fill("#key", served.keys["read"])
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")
    frames = page.locator("ol.frame-strip li.frame")
    assert frames.evaluate_all("items => items.map(item => item.dataset.index)") == [str(i) for i in range(6)]
    times = page.locator("li.frame .frame-time").all_text_contents()
    assert times == ["0:00.0", "0:02.5", "0:05.0", "0:07.5", "0:10.0", "0:12.5"]
    flagged = page.locator("li.frame.flagged")
    assert flagged.evaluate_all("items => items.map(item => Number(item.dataset.index))") == list(FLAGGED)
    assert page.locator('li.frame [aria-label="flagged: AI-generated"]').count() == len(FLAGGED)
    assert flagged.locator('[aria-label="flagged: AI-generated"]').count() == len(FLAGGED)
    assert page.locator(f"li.frame[data-index='{MISSING}'] .frame-missing").is_visible()
    assert page.locator("img.frame-thumb").count() == 5
    assert page.locator("img.frame-thumb").evaluate_all("imgs => imgs.every(img => img.naturalWidth === 96)")
    assert len(loaded) == 5
    assert all(status == 200 and headers["content-type"] == "image/jpeg" for status, headers in loaded.values())
    assert "at least 2 of 6 frames are over the threshold" in page.locator("p.frame-rule").text_content()
    assert page.locator("details.frame-detail .frame-caption").first.text_content() == HOSTILE
    assert page.locator("details.frame-detail img, details.frame-detail script").count() == 0
    assert page.evaluate("window.__pwned === undefined")


def test_frame_thumbnails_only_through_a_visible_check_and_a_listed_frame(served, checks, client):
    _signed_in(client, served.keys["read"])
    mine = f"/console/checks/{checks['video']}/frames"
    answer = client.get(f"{mine}/0")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert answer.headers["cache-control"] == "private, max-age=3600"
    assert answer.content == _thumbnail(MEDIA["frames"][0]).data
    # the same frames, kept, through another tenant's check: not found, as a missing check is
    assert client.get(f"/console/checks/{checks['other']}/frames/0").status_code == 404
    for index in ("6", "99999", "-1", "x", "1.0", "٣", str(MISSING)):
        assert client.get(f"{mine}/{index}").status_code == 404, index
    assert client.get(f"/console/checks/{checks['reused']}/frames/0").status_code == 404  # a still image's


def test_the_other_tenant_sees_its_own_frames(served, checks, client):
    _signed_in(client, create_key(served.ledger, "theirs", ["read"], tenant_id=OTHER).key)
    assert client.get(f"/console/checks/{checks['other']}/frames/1").status_code == 200
    assert client.get(f"/console/checks/{checks['video']}/frames/1").status_code == 404


def test_the_check_page_says_a_near_copy_answered_and_the_bank_decided(served, checks, client):
    _signed_in(client, served.keys["read"])
    reused = client.get(f"/console/checks/{checks['reused']}").text
    assert f'Answered from check <a href="/console/checks/{checks["video"]}">' in reused
    assert "(PDQ distance 7): a near-copy of an image already judged" in reused
    assert "ol.frame-strip" not in reused and "Decision bank" not in reused
    matched = client.get(f"/console/checks/{checks['match']}").text
    assert 'Matched a moderator decision: <span class="verdict verdict-fake">fake</span> on check' in matched
    assert f'href="/console/checks/{checks["video"]}"' in matched and "(distance 3)" in matched
    assert "the bank, not the score, made this verdict" in matched


def test_the_api_returns_media_near_copy_and_match_as_stored(served, checks, client):
    read = served.headers("read")
    video = client.get(f"/v1/checks/{checks['video']}", headers=read).json()
    assert video["media"] == MEDIA and video["reused_from"] is None and video["match"] is None
    reused = client.get(f"/v1/checks/{checks['reused']}", headers=read).json()
    assert reused["media"] is None and reused["reused_from"] == {"check_id": checks["video"], "distance": 7}
    matched = client.get(f"/v1/checks/{checks['match']}", headers=read).json()
    assert matched["verdict_reason"] == "match"
    assert matched["match"] == {"label": "fake", "check_id": checks["video"], "decision_id": DECISION, "distance": 3}
    assert client.get(f"/v1/checks/{checks['other']}", headers=read).status_code == 404
