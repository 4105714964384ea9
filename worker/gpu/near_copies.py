"""Near-copies of what was already judged, and the bank of moderators' decisions, for a batch of checks.

A still image's PDQ hash (`pipeline.core.pdq`) is computed when it is decoded and kept with the image. Then:
- **Near-copies.** A fresh upload within ITEM_NEAR_MAX_DISTANCE bits of an image its tenant already had judged under
  this pipeline version is answered from that check (`reused_from`: its id and the distance), without the models:
  a re-encoded, resized or screenshotted copy of a viral image gets the answer the original got. Re-scores always
  run the models. Only the tenant's own checks answer it: another tenant's check id is never named.
- **The bank.** A moderator's decision on a check puts its image's hash in the tenant's bank (`ai_generated` as
  fake, `authentic` as real; `unsure` takes it out). An upload within ITEM_BANK_MAX_DISTANCE of a banked image
  gets `match` (the label, the decided check, the decision, the distance), and:
    fake: the verdict is `fake`, reason `match`, whatever the score;
    real: the verdict is `real`, reason `match`, unless the upload's own provenance declared AI generation (a
      signed claim on these very bytes outweighs a decision on another copy).
  The score (p_fake) is still the models' (or the copy's), so a moderator sees both.

An answer copied from an earlier check (the same bytes, or a near-copy) carries that check's tenant's matches; they
are taken off (`unshared`) and the copier's own bank applied, so no tenant sees another's ids or decisions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from pipeline.core.results import verdict
from worker.gpu.outcomes import result_of
from worker.ledger import checks, near
from worker.ledger.models import CheckRow
from worker.ledger.states import CheckStatus, Priority
from worker.settings import Settings

MATCH = "match"  # the verdict_reason of a verdict the bank made
BANK_LABELS = {"fake": "fake", "real": "real"}


@dataclass
class Likeness:
    """What a batch's hashes found: near-copies answering fresh checks, and the bank's matches, by check id."""

    near: dict[str, tuple[CheckRow, int]] = field(default_factory=dict)  # the earlier check, the distance
    bank: dict[str, dict] = field(default_factory=dict)  # {label, check_id, decision_id, distance}


def look_up(
    session: Session, hashed: list[tuple[CheckRow, str, bytes]], version_id: str, settings: Settings
) -> Likeness:
    """`hashed`: (check, its image's sha256, its PDQ hash) of the batch's checks that have one. One lookup per tenant
    of the batch in each index (a batch holds a few tenants at most: its claims are shared between them)."""
    found = Likeness()
    by_tenant: dict[str, list[tuple[CheckRow, str, bytes]]] = defaultdict(list)
    for item in hashed:
        by_tenant[item[0].tenant_id].append(item)
    earlier_ids: dict[str, tuple[str, int]] = {}
    for tenant, items in by_tenant.items():
        hashes = {check.id: pdq for check, _, pdq in items}
        for check_id, match in near.bank_find(session, tenant, hashes, settings.bank_max_distance).items():
            found.bank[check_id] = _match_dict(match)
        fresh_ones = {check.id: pdq for check, _, pdq in items if check.priority == Priority.fresh}
        if settings.near_duplicates and fresh_ones:
            # The same bytes are the exact path's (`done_checks_for_images`), which answers first: an entry at
            # distance 0 of the upload's own image is never used, so none is left out here.
            matches = near.find(session, tenant, version_id, fresh_ones, settings.near_max_distance)
            earlier_ids |= {check_id: (match.check_id, match.distance) for check_id, match in matches.items()}
    wanted = sorted({earlier for earlier, _ in earlier_ids.values()})
    rows = {row.id: row for row in checks.checks_by_id(session, wanted)}  # their days' partitions only
    tenants = {check.id: check.tenant_id for check, _, _ in hashed}
    for check_id, (earlier, distance) in earlier_ids.items():
        row = rows.get(earlier)
        if _answers(row, version_id, tenants[check_id]):
            found.near[check_id] = (row, distance)
    return found


def _answers(row: CheckRow | None, version_id: str, tenant_id: str) -> bool:
    """Whether an indexed check may answer: still there (not purged), done under the version, the tenant's own."""
    return (
        row is not None
        and row.status == CheckStatus.done
        and row.pipeline_version_id == version_id
        and row.tenant_id == tenant_id
    )


def _match_dict(match) -> dict:
    return {
        "label": match.label,
        "check_id": match.check_id,
        "decision_id": match.decision_id,
        "distance": match.distance,
    }


def near_answer(earlier: CheckRow, distance: int, image_sha256: str) -> dict:
    """A fresh check's result from a near-copy judged before: its answer, saying where it came from."""
    answer = unshared(result_of(earlier))
    return answer | {
        "image_sha256": image_sha256,
        "reused_from": {"check_id": earlier.id, "distance": distance},
        "timings_ms": {"reused": 0.0},
    }


def unshared(result: dict) -> dict:
    """An earlier check's result without what belongs to its tenant: where it was copied from, and a bank's verdict
    (the score's verdict is restored; the copier's own bank is applied afterwards)."""
    result = {**result, "reused_from": None, "match": None}
    if result.get("verdict_reason") == MATCH:
        result["verdict"] = verdict(result["p_fake"], result["threshold"], result.get("threshold_low"))
        result["verdict_reason"] = "score"
    return result


def with_bank(result: dict, match: dict | None) -> dict:
    """`result` under the tenant's bank (see the module's note), with every result column named (a batch's results
    are written in one statement)."""
    result = {"media": None, "reused_from": None, **result, "match": match}
    if match is None:
        return result
    declared = (result.get("verdict_reason") or "").startswith("provenance")
    if match["label"] == "fake" or not declared:
        result |= {"verdict": BANK_LABELS[match["label"]], "verdict_reason": MATCH}
    return result


def index_entries(done: list[tuple[CheckRow, str, bytes]], version_id: str) -> list[near.NearEntry]:
    """What a batch adds to the near-copy index: the checks the models judged (a copied answer is not an original)."""
    return [
        near.NearEntry(
            tenant_id=check.tenant_id,
            pipeline_version_id=version_id,
            check_id=check.id,
            image_sha256=sha,
            pdq=pdq,
        )
        for check, sha, pdq in done
    ]
