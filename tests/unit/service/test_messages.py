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
TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # any code point: lone surrogates, NUL, bidi
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
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
    check_id = from_message([[], {"external_id": "x", "check_id": "c", "image": {}}, {}], {"task": "item.check"})
    assert check_id.problem.code == "message.invalid"  # not part of the contract, as the README says


def test_an_external_id_that_cannot_be_stored_is_a_dead_letter_whose_fields_can():
    for bad in ("lone \udcff surrogate", "nul\x00", " ", "x" * 513):
        letter = from_message([[], {"external_id": bad}, {}], {"task": "item.check"}, raw="body \udcff\x00")
        assert letter.code == "message.no_external_id", bad
        for field in (letter.reason, letter.body):
            field.encode("utf-8")
            assert "\x00" not in field


def test_a_message_larger_than_any_check_is_refused_unread():
    message = SimpleNamespace(
        payload=None, headers={"task": "item.check"}, delivery_info={}, body=b"x" * 2000, content_type="json"
    )
    letter = _item_of(SimpleNamespace(message=message), 1000)
    assert letter.code == "message.too_large" and len(letter.body) <= 2000


def test_storable_text_is_utf8_without_nul_and_within_its_limit():
    from worker.intake.text import storable, strings_problem, text_problem

    assert storable("a\udcffb\x00c") == "a\\udcffb\\x00c"
    assert len(storable("é" * 100, 10)) == 10
    assert storable(b"\xff\xfe", 5) == "\ufffd\ufffd"
    assert text_problem("ok", "x", 5) is None and "limit" in text_problem("toolong", "x", 5)
    assert "surrogate" in strings_problem({"url": ["a", {"b": "\ud800"}]}, "image")
    assert "deeper" in strings_problem(_nested(20), "image")
    assert strings_problem({"url": "https://cdn.example/\u202e.jpg"}, "image") is None  # bidi: stored, escaped on show


def _nested(depth: int):
    value = "x"
    for _ in range(depth):
        value = {"k": value}
    return value


@settings(max_examples=200, deadline=None)
@given(body=JSON, task=TASK, extra=st.dictionaries(st.text(max_size=8), JSON, max_size=3))
def test_any_decoded_message_is_a_request_or_a_coded_dead_letter(body, task, extra):
    headers = {**extra, **({"task": task} if task is not None else {})}
    message = SimpleNamespace(
        payload=body, headers=headers, delivery_info={"routing_key": "item.checks"}, body=b"x", content_type="json"
    )
    item = _item_of(SimpleNamespace(message=message), 1 << 20)
    assert isinstance(item, CheckRequest | DeadLetterRow)
    if isinstance(item, DeadLetterRow):
        assert item.code in DEAD_LETTER_CODES and item.reason
    else:
        assert isinstance(item.external_id, str) and item.external_id.strip()
        assert len(_shown(item)) < 200  # what an event shows of it: never the image


def test_what_a_model_wrote_is_stored_escaped_whatever_it_holds():
    from worker.intake.text import storable_tree

    result = {"caption": "a cat\x00 \udcff", "objects": [{"phrase": "\ud800dog", "box": [0.1, 2]}], "p_fake": 0.4}
    stored = storable_tree(result)
    assert stored == {"caption": "a cat\\x00 \\udcff", "objects": [{"phrase": "\\ud800dog", "box": [0.1, 2]}],
                      "p_fake": 0.4}  # fmt: skip
    clean = {"caption": "a dog on a sofa", "objects": []}
    assert storable_tree(clean) == clean
