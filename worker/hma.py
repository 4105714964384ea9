"""ITEM as a classifier of Meta's open moderation stack (HMA / OpenMediaMatch, python-threatexchange).

`threatexchange` (1.2.17 on PyPI) has a content-classifier interface: `threatexchange.classifier.Classifier`,
whose `classify(content_type, content_val)` returns a `ClassificationResult` of labels. `ItemClassifier` is that
interface for photos. HMA hands it a photo (a file path or an http(s) URL, as `tx classify image` takes it) and
gets the label `ai_generated` (a match when the verdict is `fake`) and `ai_generated_uncertain` (a match in a
head's uncertain band), each with p(fake).

It asks a running service through the HTTP API when given its URL and a `submit`+`read` key (ITEM_HMA_API_URL,
ITEM_HMA_API_KEY), else it runs the detector in this process on the embedded ledger. The released extension
manifest (`ThreatExchangeExtensionManifest`) lists signal types, content types and exchanges but no
classifiers, so HMA code instantiates the classifier itself: `ItemClassifier.get_with_default_settings()`.

Install with the `hma` extra: `pip install 'item-moderation[hma]'`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import typing as t
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from threatexchange.classifier.classifier import ClassificationInfo, ClassificationResult, Classifier
from threatexchange.content_type.content_base import ContentType
from threatexchange.content_type.photo import PhotoContent

from pipeline.core.errors import ItemError

TERMINAL = ("done", "rejected", "failed")
LABEL, UNCERTAIN_LABEL = "ai_generated", "ai_generated_uncertain"


@dataclass
class ItemClassificationInfo(ClassificationInfo):
    """A label with what ITEM measured: p(fake), the verdict and why (the score, or the image's own provenance),
    the likeliest generator when the head names them, the check and its pipeline version."""

    p_fake: float = 0.0
    verdict: str = "real"
    check_id: str = ""
    pipeline_version: str = ""
    verdict_reason: str = "score"
    generator: str | None = None

    def weight_str(self) -> str:
        return f"{self.p_fake:.2f}"


class ItemClassifier(Classifier):
    """Is this photo AI-generated? One ITEM check per photo, idempotent on its bytes (or its URL)."""

    def __init__(self, api_url: str | None = None, api_key: str | None = None, timeout_s: float = 120.0):
        if api_url and not api_key:
            raise ItemError("An API URL needs a key with the submit and read scopes (ITEM_HMA_API_KEY).",
                            code="hma.no_key")  # fmt: skip
        self.api_url, self.api_key, self.timeout_s = (api_url or "").rstrip("/") or None, api_key, timeout_s
        self._local = None

    @classmethod
    def get_content_types(cls) -> list[type[ContentType]]:
        return [PhotoContent]

    @classmethod
    def get_with_default_settings(cls) -> ItemClassifier:
        timeout = float(os.environ.get("ITEM_HMA_TIMEOUT_S", "120"))
        return cls(os.environ.get("ITEM_HMA_API_URL"), os.environ.get("ITEM_HMA_API_KEY"), timeout)

    def classify(
        self, content_type: type[ContentType], content_val: str
    ) -> ClassificationResult[ItemClassificationInfo]:
        if content_type is not PhotoContent:
            raise ValueError(f"ITEM classifies photos, not {content_type.get_name()}.")
        external_id, image = _submission(content_val)
        check = self._check_via_api(external_id, image) if self.api_url else self._check_here(external_id, image)
        if check["status"] != "done":
            raise ItemError(
                f"ITEM could not score {content_val!r}: {check.get('error_message')}",
                code=check.get("error_code") or "hma.not_done",
            )
        return _labels(check)

    # ------------------------------------------------------------------ through the HTTP API

    def _check_via_api(self, external_id: str, image: dict) -> dict:
        deadline = time.monotonic() + self.timeout_s
        check = self._request("POST", "/v1/checks", {"external_id": external_id, "image": image})
        while check["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise ItemError(f"Check {check['id']} did not finish in {self.timeout_s:g} s.", code="hma.timeout")
            time.sleep(0.25)
            check = self._request("GET", f"/v1/checks/{check['id']}")
        return check

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        request = urllib.request.Request(self.api_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310  (the operator's own URL)
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            answer = _json_or_none(error.read())
            if error.code == 422 and answer and "check" in answer:
                return answer["check"]  # filed and rejected at once: the check says why
            problem = (answer or {}).get("error", {})
            raise ItemError(
                f"ITEM API answered {error.code}: {problem.get('message', error.reason)}",
                code=problem.get("code", "hma.api_error"),
            ) from None
        except (urllib.error.URLError, TimeoutError) as error:
            raise ItemError(f"ITEM API at {self.api_url} unreachable: {error}", code="hma.unreachable") from None

    # ------------------------------------------------------------------ in this process

    def _check_here(self, external_id: str, image: dict) -> dict:
        from worker.gpu.embedded import InProcess
        from worker.ledger.views import check_dict
        from worker.settings import load_settings

        if self._local is None:
            self._local = InProcess(load_settings())
        filed = self._local.receive(external_id, image)
        ledger = self._local.service.ledger
        with ledger.session() as session:
            check = check_dict(ledger.get_check(session, filed.check.id))
        return {**check, "status": str(check["status"])}


def _submission(content_val: str) -> tuple[str, dict]:
    """The check's external id and image for a file path or an http(s) URL: the same photo, the same check."""
    if content_val.startswith(("http://", "https://")):
        return f"hma:url:{hashlib.sha256(content_val.encode()).hexdigest()}", {"url": content_val}
    path = Path(content_val)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ItemError(f"{content_val} cannot be read: {error}", code="file.unreadable") from None
    return f"hma:sha256:{hashlib.sha256(data).hexdigest()}", {"b64": base64.b64encode(data).decode()}


def _labels(check: dict) -> ClassificationResult[ItemClassificationInfo]:
    about = {"p_fake": float(check["p_fake"]), "verdict": check["verdict"], "check_id": check["id"],
             "pipeline_version": check["pipeline_version_id"],
             "verdict_reason": check.get("verdict_reason") or "score",
             "generator": (check.get("attribution") or [{}])[0].get("generator")}  # fmt: skip
    return ClassificationResult(
        {
            LABEL: ItemClassificationInfo(is_match=check["verdict"] == "fake", **about),
            UNCERTAIN_LABEL: ItemClassificationInfo(is_match=check["verdict"] == "uncertain", **about),
        }
    )


def _json_or_none(raw: bytes) -> t.Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
