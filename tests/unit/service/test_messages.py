"""What the intake makes of a decoded Celery message: a check request, or a dead letter with a stable code.
Never an exception, whatever a client sends (property-based: arbitrary JSON bodies and headers)."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.intake.filing import CheckRequest, from_message
from worker.intake.task import _item_of, _shown
from worker.ledger.models import DeadLetterRow

DEAD_LETTER_CODES = {"message.unknown_task", "message.invalid", "message.no_external_id", "message.undecodable"}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
TASK = st.sampled_from(["item.check", "other.task", "", None]) | st.text(max_size=20)


def test_protocol_2_and_protocol_1_messages_are_the_same_request():
    kwargs = {"external_id": "upload-1", "image": {"url": "https://cdn.example/1.jpg"}, "callback_url": None}
    two = from_message([[], kwargs, {}], {"task": "item.check"})
    one = from_message({"task": "item.check", "args": [], "kwargs": kwargs}, {})
    assert two == one == CheckRequest("upload-1", {"url": "https://cdn.example/1.jpg"}, None, None)


def test_what_cannot_be_a_check_is_a_dead_letter_or_a_request_with_its_problem():
    assert from_message([[], {"image": {}}, {}], {"task": "item.check"}).code == "message.no_external_id"
    assert from_message([[], {"external_id": "x"}, {}], {"task": "item.other"}).code == "message.unknown_task"
    positional = from_message([["x"], {"external_id": "x"}, {}], {"task": "item.check"})
    assert positional.problem.code == "message.invalid"
    unknown = from_message([[], {"external_id": "x", "priority": 9}, {}], {"task": "item.check"})
    assert "priority" in unknown.problem.message


@settings(max_examples=200, deadline=None)
@given(body=JSON, task=TASK, extra=st.dictionaries(st.text(max_size=8), JSON, max_size=3))
def test_any_decoded_message_is_a_request_or_a_coded_dead_letter(body, task, extra):
    headers = {**extra, **({"task": task} if task is not None else {})}
    message = SimpleNamespace(
        payload=body, headers=headers, delivery_info={"routing_key": "item.checks"}, body=b"x", content_type="json"
    )
    item = _item_of(SimpleNamespace(message=message))
    assert isinstance(item, CheckRequest | DeadLetterRow)
    if isinstance(item, DeadLetterRow):
        assert item.code in DEAD_LETTER_CODES and item.reason
    else:
        assert isinstance(item.external_id, str) and item.external_id.strip()
        assert len(_shown(item)) < 200  # what an event shows of it: never the image
