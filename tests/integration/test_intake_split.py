"""A batch whose transaction fails for a reason no check foresaw is filed one message at a time: the one that
fails again becomes a dead letter `message.internal_error`, every other is filed as usual (real ledger)."""

from __future__ import annotations

import base64
import threading

import sqlalchemy as sa

from pipeline.core.results import PipelineVersion
from tests.conftest import encode, noise_image
from worker.intake import filing
from worker.intake.filing import CheckRequest, Intake
from worker.intake.task import file_holding
from worker.ledger.models import CheckRow, DeadLetterRow
from worker.settings import Settings


def _image(seed: int) -> dict:
    return {"b64": base64.b64encode(encode(noise_image(seed, 32, 32), "PNG")).decode()}


def test_one_message_that_breaks_its_batch_is_dead_lettered_and_the_rest_filed(ledger, monkeypatch):
    with ledger.session() as session:
        session.execute(sa.delete(DeadLetterRow))
        ledger.ensure_pipeline_version(session, PipelineVersion("c:1", "g:1", "e:1", "h:1"), "tiny", activate=True)
    real = filing.sources.to_stored

    def to_stored(image, settings, put_blob):  # stands for a bug no validation foresaw, on one message only
        if image.get("b64") == "poison":
            raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
        return real(image, settings, put_blob)

    monkeypatch.setattr(filing.sources, "to_stored", to_stored)
    intake = Intake(Settings(database_url=ledger.engine.url.render_as_string(hide_password=False)), ledger)
    items = [CheckRequest("split-1", _image(1)), CheckRequest("split-poison", {"b64": "poison"}),
             CheckRequest("split-2", _image(2))]  # fmt: skip
    outcomes = file_holding(intake, items, threading.Event())
    assert [getattr(one, "created", None) for one in outcomes] == [True, None, True]
    assert isinstance(items[1], DeadLetterRow) and items[1].code == "message.internal_error"  # for its ack event
    with ledger.session() as session:
        filed = session.scalars(sa.select(CheckRow.external_id).where(CheckRow.external_id.like("split-%"))).all()
        letters = session.scalars(sa.select(DeadLetterRow)).all()
    assert sorted(filed) == ["split-1", "split-2"]
    assert [letter.code for letter in letters] == ["message.internal_error"]
    assert "split-poison" in letters[0].body and "UnicodeEncodeError" in letters[0].reason
