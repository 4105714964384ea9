"""Hostile `item.checks` traffic, from a seed: what any client may put on the broker, beside good checks.

Each message is a `Hostile`: either bytes pushed into the Redis list as they are (`raw`: no kombu envelope at
all), or a message with a body, content type and encoding, and headers (`envelope`), which the Redis side wraps
in kombu's envelope and the RabbitMQ side publishes with those properties. Every string a message carries may
hold any code point (lone surrogates, NUL, bidi and control characters); values come in wrong types, huge,
or nested deeply. A message that names an external id names one of its own (`<tag><n>-` and the hostile rest), so
each ends as exactly one check row or one dead letter, and a test can count them.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from dataclasses import dataclass, field

WEIRD = [
    "\udcff", "\ud800", "\x00", "\u202e", "\u2066", "\u200b", "\ufeff", "\x1b[31m", "\r\n", "\t", "\\", '"', "'",
    "<script>", "%00", "%ff", "\U0001f600", "é", "\u0301", "../", "$(x)", "{{7*7}}", "\x7f", "\x85",
]  # fmt: skip
KINDS = (
    "garbage", "json_not_envelope", "bad_base64", "pickle", "body_not_utf8", "random_json_body", "unknown_task",
    "no_task_protocol1", "deep_json", "huge", "bad_kwargs", "bad_external_id", "bad_image", "bad_callback",
    "extra_args", "positional", "check_id", "kwargs_not_object",
)  # fmt: skip
REDIS_ONLY = {"garbage", "json_not_envelope", "bad_base64"}  # what only a list can hold: no envelope at all


@dataclass
class Hostile:
    kind: str
    raw: bytes | None = None  # Redis: pushed as is
    body: bytes = b""
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    headers: dict = field(default_factory=dict)
    names_external_id: str | None = None  # the id it carries, if it is a usable string (then it may be a row)

    def redis_bytes(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(_envelope(self)).encode()


def _envelope(message: Hostile) -> dict:
    tag = str(uuid.uuid4())
    body = base64.b64encode(message.body).decode()
    if message.kind == "bad_base64":
        body = "!!! " + body[:50]
    return {
        "body": body,
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": message.headers,
        "properties": {
            "correlation_id": tag, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": "item.checks"}, "delivery_tag": tag,
        },
    }  # fmt: skip


class HostileTraffic:
    def __init__(self, seed: int, *, redis: bool, max_bytes: int, tag: str = "h"):
        self.rng = random.Random(seed)
        self.tag = tag  # every external id it names starts with it: a run's rows are told from another's
        self.redis = redis
        self.max_bytes = max_bytes  # the worker's ITEM_MAX_B64_BYTES: `huge` goes past what any check can be
        self.count = 0

    def messages(self, n: int) -> list[Hostile]:
        kinds = [kind for kind in KINDS if self.redis or kind not in REDIS_ONLY]
        return [self.message(self.rng.choice(kinds)) for _ in range(n)]

    def message(self, kind: str) -> Hostile:
        self.count += 1
        rng = self.rng
        if kind == "garbage":
            return Hostile(kind, raw=rng.randbytes(rng.randint(0, 200)))
        if kind == "json_not_envelope":
            return Hostile(kind, raw=_dumps(self.value(3)))
        if kind == "pickle":
            headers = {"task": "item.check", "id": str(uuid.uuid4())}
            pickled = b"\x80\x04\x95" + rng.randbytes(40)
            return Hostile(kind, body=pickled, content_type="application/x-python-serialize",
                           content_encoding="binary", headers=headers)  # fmt: skip
        if kind == "body_not_utf8":
            return Hostile(kind, body=b'[[], {"external_id": "\xff\xfe"}, {}]', headers=self.headers("item.check"))
        if kind == "random_json_body":
            return Hostile(kind, body=_dumps(self.value(4)), headers=self.headers("item.check"))
        if kind == "unknown_task":
            return Hostile(kind, body=_dumps([[], self.kwargs(), {}]), headers=self.headers(self.text(30)))
        if kind == "no_task_protocol1":
            body = {"task": rng.choice(["item.check", self.text(10)]), "args": [], "kwargs": self.kwargs()}
            return self._named(Hostile(kind, body=_dumps(body), headers={}), body["kwargs"], body["task"])
        if kind == "deep_json":
            depth = rng.choice([50, 2000, 20000])
            return Hostile(kind, body=b"[" * depth + b"]" * depth, headers=self.headers("item.check"))
        if kind == "huge":
            kwargs = {"external_id": self.external_id(), "image": {"b64": "A" * (self.max_bytes * 3)}}
            return Hostile(kind, body=_dumps([[], kwargs, {}]), headers=self.headers("item.check"))
        if kind == "kwargs_not_object":
            return Hostile(kind, body=_dumps([[], self.value(2), {}]), headers=self.headers("item.check"))
        kwargs = self.kwargs(kind)
        args = [self.value(1)] if kind == "positional" else []
        message = Hostile(kind, body=_dumps([args, kwargs, {"callbacks": None}]), headers=self.headers("item.check"))
        return self._named(message, kwargs, "item.check")

    def _named(self, message: Hostile, kwargs, task) -> Hostile:
        external_id = kwargs.get("external_id") if isinstance(kwargs, dict) else None
        if task == "item.check" and isinstance(external_id, str):
            message.names_external_id = external_id
        return message

    # ------------------------------------------------------------------ values

    def kwargs(self, kind: str = "bad_kwargs") -> dict:
        rng = self.rng
        kwargs = {"external_id": self.external_id(), "image": self.image(), "callback_url": self.callback()}
        if kind == "bad_external_id":
            kwargs["external_id"] = rng.choice([
                None, 7, 1.5, [], {}, "", " ", "\x00", "\udcff", "x" * 600, f"{self.tag}{self.count}-" + "\udcff",
            ])  # fmt: skip
        elif kind in ("extra_args", "check_id"):
            kwargs["check_id" if kind == "check_id" else self.text(8) or "extra"] = self.value(2)
        elif kind == "bad_callback":
            kwargs["callback_url"] = rng.choice([self.text(40), 5, ["x"], "https://h.example/\udcff", "ftp://a/b"])
        return kwargs

    def external_id(self) -> str:
        return f"{self.tag}{self.count}-{self.text(20)}"

    def image(self):
        rng = self.rng
        choice = rng.randrange(9)
        if choice == 0:
            return {"url": self.text(60)}
        if choice == 1:
            return {"url": "https://" + self.text(10) + ".invalid/" + self.text(10)}
        if choice == 2:
            return {"b64": self.text(40)}
        if choice == 3:
            return {"b64": base64.b64encode(rng.randbytes(rng.randint(0, 300))).decode()}
        if choice == 4:
            return {"s3": rng.choice([self.text(20), {"bucket": self.text(8), "key": self.value(1)}])}
        if choice == 5:
            return {"path": self.text(30)}
        if choice == 6:
            return _nested(rng.choice([5, 30, 300]))
        if choice == 7:
            return {"url": self.text(5), "b64": self.text(5)}
        return self.value(2)

    def callback(self):
        return self.rng.choice([None, None, "https://hooks.example/" + self.text(10), self.value(1)])

    def headers(self, task) -> dict:
        headers = {"task": task, "id": str(uuid.uuid4()), "lang": "py", "argsrepr": self.text(10)}
        if self.rng.random() < 0.2:
            headers[self.text(6) or "x"] = self.value(1)
        return headers

    def text(self, longest: int) -> str:
        rng = self.rng
        parts = []
        for _ in range(rng.randint(0, longest)):
            roll = rng.random()
            if roll < 0.3:
                parts.append(rng.choice(WEIRD))
            elif roll < 0.6:
                parts.append(chr(rng.randint(0x20, 0x7E)))
            else:
                parts.append(
                    chr(rng.choice([rng.randint(0, 0x2FFF), rng.randint(0xD800, 0xDFFF), rng.randint(0, 0x10FFFF)]))
                )
        return "".join(parts)

    def value(self, depth: int):
        rng = self.rng
        roll = rng.randrange(8 if depth > 0 else 5)
        if roll == 0:
            return None
        if roll == 1:
            return rng.choice([True, False, 0, -1, 2**70, 1e308, -0.0])
        if roll in (2, 3, 4):
            return self.text(25)
        if roll in (5, 6):
            return {self.text(6): self.value(depth - 1) for _ in range(rng.randint(0, 4))}
        return [self.value(depth - 1) for _ in range(rng.randint(0, 4))]


def _nested(depth: int):
    value = {"url": "https://example.com/x.png"}
    for _ in range(depth):
        value = {"url": value}
    return value


def _dumps(value) -> bytes:
    """JSON as any client may write it: lone surrogates travel as \\u escapes (ensure_ascii)."""
    return json.dumps(value, ensure_ascii=True).encode()
