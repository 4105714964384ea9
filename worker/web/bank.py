"""`GET /v1/bank`: the bank of moderators' decisions by PDQ hash, a page at a time, for an HMA deployment to fetch.

The page is ordered by the bank's own id, so a client keeps the last id it saw (`next_after_id`) and asks for what
came after it: a decision made again on a check is banked anew under a new id, so it comes again and replaces the
old one. A withdrawn decision (`unsure`) leaves the bank without a trace in this feed: a client that must forget it
fetches the bank again from `after_id=0` now and then (worker.hma.ItemBankExchange does so once a day).

A tenant's key reads its own tenant's bank; an operator key every tenant's, or one's with `?tenant=`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from pipeline.core.pdq import to_hex
from worker.ledger import near
from worker.ledger.views import as_time
from worker.web.api import TenantQuery
from worker.web.auth import requires
from worker.web.errors import ErrorBody
from worker.web.keys import Principal

MAX_BANK_PAGE = 1000

router = APIRouter(prefix="/v1", tags=["bank"])


class BankEntryOut(BaseModel):
    id: int = Field(description="The entry's place in the bank; pass the last one seen as `after_id`.")
    tenant: str = Field(description="The tenant whose moderators decided.")
    label: Literal["fake", "real"] = Field(description="fake: decided ai_generated; real: decided authentic.")
    pdq: str = Field(description="The image's PDQ hash: 64 hex digits, as python-threatexchange and HMA write it.")
    check_id: str = Field(description="The decided check.")
    decision_id: str = Field(description="The decision that banked it (its id in the check's decisions).")
    created_at: str


class BankPage(BaseModel):
    entries: list[BankEntryOut]
    next_after_id: int | None = Field(
        description="The last entry's id, to pass as `after_id` next; null when this page is empty (up to date)."
    )


@router.get(
    "/bank",
    response_model=BankPage,
    responses={422: {"model": ErrorBody}, 401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
)
def list_bank(
    request: Request,
    who: Annotated[Principal, Depends(requires("read"))],
    after_id: Annotated[int, Query(ge=0, description="Entries after this id (0: from the start).")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_BANK_PAGE)] = 500,
    tenant: TenantQuery = None,
) -> dict:
    """Banked decisions oldest first by id, `limit` at a time: the PDQ hashes an HMA deployment matches against."""
    web, tenant_id = request.app.state.web, who.tenant_scope(tenant)

    def read(session) -> dict:
        entries = near.bank_entries(session, tenant_id=tenant_id, after_id=after_id, limit=limit)
        return {
            "entries": [_entry_out(entry) for entry in entries],
            "next_after_id": entries[-1].id if entries else None,
        }

    # A replica a little behind only delays entries to the next fetch: the client's after_id has not passed them.
    return web.reads.run(request, read)


def _entry_out(entry: near.BankEntry) -> dict:
    fields = ("id", "label", "check_id", "decision_id")
    about = {name: getattr(entry, name) for name in fields}
    return {**about, "tenant": entry.tenant_id, "pdq": to_hex(entry.pdq), "created_at": as_time(entry.created_at)}
