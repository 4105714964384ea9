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

`ItemBankExchange` is the other direction: a python-threatexchange `SignalExchangeAPI` (named `item_bank`) that
offers HMA ITEM's bank of moderators' decisions (`GET /v1/bank`) as PDQ hashes, so HMA matches photos against
what ITEM's moderators decided was AI-generated (the section below says how, and why `real` ones never match).

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
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from threatexchange.classifier.classifier import ClassificationInfo, ClassificationResult, Classifier
from threatexchange.content_type.content_base import ContentType
from threatexchange.content_type.photo import PhotoContent
from threatexchange.exchanges.auth import SignalExchangeAPIMissingAuthException
from threatexchange.exchanges.collab_config import CollaborationConfigWithDefaults
from threatexchange.exchanges.fetch_state import (
    FetchCheckpointBase,
    FetchDelta,
    FetchedSignalMetadata,
    SignalOpinion,
    SignalOpinionCategory,
)
from threatexchange.exchanges.signal_exchange_api import SignalExchangeAPI
from threatexchange.signal_type.pdq.signal import PdqSignal
from threatexchange.signal_type.signal_base import SignalType

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
        return _call(self.api_url, self.api_key, method, path, body)

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


def _call(api_url: str, api_key: str, method: str, path: str, body: dict | None = None) -> dict:
    """One request to the ITEM API; a refusal is an ItemError with the API's own code."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    request = urllib.request.Request(api_url + path, data=data, headers=headers, method=method)
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
        raise ItemError(f"ITEM API at {api_url} unreachable: {error}", code="hma.unreachable") from None


def _json_or_none(raw: bytes) -> t.Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


# ---------------------------------------------------------------------- the bank as a signal exchange
#
# HMA fetches an exchange's records (fetch_iter), keeps them by key, merges a later record over an earlier one of
# the same key, and turns them into signals to index (naive_convert_to_signal_type). A bank entry is keyed by its
# tenant and check: a moderator who changes their mind on a check banks it again under a new id, which comes again
# in the feed and replaces the check's record.
#
# `real` entries (decided authentic) are fetched and kept as records, with threatexchange's NEGATIVE_CLASS opinion
# ("a false positive"), but never indexed: HMA acts on every index match, and a photo moderators said is authentic
# must not be actioned because it looks like itself. Keeping the record still matters: a check first decided fake
# then authentic replaces its `fake` record, and so leaves HMA's index.
#
# The feed carries no deletions (an `unsure` decision takes an entry out of the bank silently), so the checkpoint
# goes stale a day (ITEM_HMA_BANK_REFRESH_S) after a fetch from the start: HMA then clears its copy and fetches
# the whole bank again, and a withdrawn decision stops matching by then.

BANK_REFRESH_S = 24 * 3600


@dataclass
class ItemBankCollabConfig(CollaborationConfigWithDefaults):
    """An HMA exchange of ITEM's bank. The key is a secret, so it comes from the environment (ITEM_HMA_API_KEY),
    never from this config, which HMA shows and stores in the clear."""

    api_url: str = field(default="", metadata={"help": "ITEM's base URL (default: ITEM_HMA_API_URL)"})
    tenant: str = field(default="", metadata={"help": "an operator key's tenant to fetch (default: every one)"})
    page_size: int = field(default=500, metadata={"help": "entries per request, 1..1000"})


@dataclass
class ItemBankCheckpoint(FetchCheckpointBase):
    after_id: int = 0  # the last bank id fetched
    started_at: float = 0.0  # when the fetch from the bank's start began
    last_banked_at: int | None = None  # when the last entry fetched was banked (epoch seconds)

    def is_stale(self) -> bool:
        refresh = float(os.environ.get("ITEM_HMA_BANK_REFRESH_S", BANK_REFRESH_S))
        return time.time() - self.started_at > refresh

    def get_progress_timestamp(self) -> int | None:
        return self.last_banked_at


@dataclass
class ItemBankRecord(FetchedSignalMetadata):
    """A banked decision: what HMA says a photo matched (the decision on which check, of which tenant)."""

    pdq: str
    label: str  # fake | real
    check_id: str
    decision_id: str
    tenant: str
    entry_id: int

    def get_as_opinions(self) -> t.Sequence[SignalOpinion]:
        positive = self.label == "fake"
        category = SignalOpinionCategory.POSITIVE_CLASS if positive else SignalOpinionCategory.NEGATIVE_CLASS
        return [SignalOpinion(False, category, {LABEL if positive else "authentic"})]


_BankDelta = FetchDelta[str, ItemBankRecord, ItemBankCheckpoint]


class ItemBankExchange(
    SignalExchangeAPI[ItemBankCollabConfig, ItemBankCheckpoint, ItemBankRecord, str, ItemBankRecord]
):
    """ITEM's bank of moderators' decisions as PDQ hashes (`GET /v1/bank`), for HMA to match photos against."""

    def __init__(self, collab: ItemBankCollabConfig, api_key: str):
        self.collab, self.api_key = collab, api_key
        self.api_url = (collab.api_url or os.environ.get("ITEM_HMA_API_URL", "")).rstrip("/")

    @classmethod
    def get_name(cls) -> str:
        return "item_bank"  # stored by HMA with what it fetched: never to change

    @classmethod
    def for_collab(cls, collab: ItemBankCollabConfig) -> ItemBankExchange:
        if not (collab.api_url or os.environ.get("ITEM_HMA_API_URL")):
            raise SignalExchangeAPIMissingAuthException(cls, env_hint="ITEM_HMA_API_URL")
        if not os.environ.get("ITEM_HMA_API_KEY"):
            raise SignalExchangeAPIMissingAuthException(cls, env_hint="ITEM_HMA_API_KEY")
        return cls(collab, os.environ["ITEM_HMA_API_KEY"])

    @staticmethod
    def get_config_cls() -> type[ItemBankCollabConfig]:
        return ItemBankCollabConfig

    @staticmethod
    def get_checkpoint_cls() -> type[ItemBankCheckpoint]:
        return ItemBankCheckpoint

    @staticmethod
    def get_record_cls() -> type[ItemBankRecord]:
        return ItemBankRecord

    def fetch_iter(
        self, supported_signal_types: t.Sequence[type[SignalType]], checkpoint: ItemBankCheckpoint | None
    ) -> t.Iterator[_BankDelta]:
        """A delta per page of the bank after the checkpoint's id, until a short page says the fetch is up to date."""
        progress = checkpoint or ItemBankCheckpoint(started_at=time.time())
        while True:
            page = _call(self.api_url, self.api_key, "GET", self._page_path(progress.after_id))
            entries = page["entries"]
            if entries:
                last = entries[-1]
                banked_at = int(datetime.fromisoformat(last["created_at"]).timestamp())
                progress = ItemBankCheckpoint(last["id"], progress.started_at, banked_at)
            yield _BankDelta({_record_key(entry): _record(entry) for entry in entries}, progress)
            if len(entries) < self.collab.page_size:
                return

    def _page_path(self, after_id: int) -> str:
        query = {"after_id": after_id, "limit": self.collab.page_size}
        if self.collab.tenant:
            query["tenant"] = self.collab.tenant
        return "/v1/bank?" + urllib.parse.urlencode(query)

    @classmethod
    def naive_convert_to_signal_type(
        cls,
        signal_types: t.Sequence[type[SignalType]],
        collab: ItemBankCollabConfig,
        fetched: t.Mapping[str, ItemBankRecord],
    ) -> dict[type[SignalType], dict[str, ItemBankRecord]]:
        """The `fake` records' PDQ hashes (a `real` one is never indexed: see above), oldest entry first, so a hash
        banked under several checks carries the newest decision."""
        if PdqSignal not in signal_types:
            return {}
        fakes = sorted((record for record in fetched.values() if record.label == "fake"), key=lambda r: r.entry_id)
        return {PdqSignal: {record.pdq: record for record in fakes}}


def _record_key(entry: dict) -> str:
    return f"{entry['tenant']}:{entry['check_id']}"


def _record(entry: dict) -> ItemBankRecord:
    fields = ("pdq", "label", "check_id", "decision_id", "tenant")
    return ItemBankRecord(**{name: entry[name] for name in fields}, entry_id=entry["id"])
