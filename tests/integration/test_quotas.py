"""Quotas per tenant against a real ledger (SQLite and PostgreSQL): the token bucket shared by every intake, the
backlog cap, and what the broker's intake files for a check over quota (a `rejected` row with the quota's code).
"""

from __future__ import annotations

import base64
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from pipeline.core.results import PipelineVersion
from tests.conftest import encode, noise_image
from worker.intake.filing import CheckRequest, Intake
from worker.intake.quotas import BacklogFull, Limits, QuotaExceeded, Quotas
from worker.intake.task import file_holding
from worker.ledger import tenants
from worker.ledger.models import DEFAULT_TENANT, CheckRow, DeliveryRow, TenantBucketRow, utcnow
from worker.ledger.states import CheckStatus
from worker.settings import Settings


def _settings(ledger, **more) -> Settings:
    return Settings(database_url=ledger.engine.url.render_as_string(hide_password=False), **more)


def _tenant(ledger, tenant_id: str, **limits) -> None:
    with ledger.session() as session:
        if tenant_id == DEFAULT_TENANT:
            tenants.update_tenant(session, tenant_id, tenants.TenantLimits(**limits))
        else:
            tenants.create_tenant(session, tenant_id, tenants.TenantLimits(**limits))


def _version(ledger) -> None:
    with ledger.session() as session:
        ledger.ensure_pipeline_version(session, PipelineVersion("c:1", "g:1", "e:1", "h:1"), "tiny", activate=True)


def _image(seed: int) -> dict:
    return {"b64": base64.b64encode(encode(noise_image(seed, 32, 32), "PNG")).decode()}


def _admit(ledger, quotas: Quotas, tenant_id: str, n: int, at) -> tuple[int, QuotaExceeded | None]:
    with ledger.session() as session:
        admission = quotas.admit(session, tenant_id, n, now=at)
    return admission.admitted, admission.refused


def test_the_bucket_refills_at_its_rate_and_refuses_past_its_burst(ledger):
    # given a tenant that may file one check every 10 s, in bursts of 2
    _tenant(ledger, "slow", rate_per_s=0.1, burst=2)
    quotas, start = Quotas(_settings(ledger)), utcnow()

    def at(seconds: float):
        return start + timedelta(seconds=seconds)

    # when it files past its burst, then waits
    # then the burst is admitted, the next check refused with the time until the next token
    assert _admit(ledger, quotas, "slow", 1, at(0)) == (1, None)
    admitted, refused = _admit(ledger, quotas, "slow", 2, at(0))  # a batch: its first k are admitted
    assert admitted == 1 and refused.code == "quota.exceeded" and refused.retry_after_s == 10
    admitted, refused = _admit(ledger, quotas, "slow", 1, at(4))  # 0.4 of a token so far
    assert admitted == 0 and refused.retry_after_s == 6
    assert _admit(ledger, quotas, "slow", 1, at(10.0)) == (1, None)  # refilled at 0.1 a second
    admitted, refused = _admit(ledger, quotas, "slow", 5, at(40))  # 3 s worth of tokens, capped at the burst
    assert admitted == 2 and refused.retry_after_s == 10
    # and a tenant without limits is admitted whatever it asks, its bucket never made
    assert _admit(ledger, quotas, DEFAULT_TENANT, 10_000, at(40)) == (10_000, None)
    with ledger.session() as session:
        assert session.scalars(sa.select(TenantBucketRow.tenant_id)).all() == ["slow"]


def test_an_unset_burst_is_one_second_of_the_rate():
    assert Limits(rate_per_s=0.2).bucket_size == 1.0
    assert Limits(rate_per_s=50).bucket_size == 50.0
    assert Limits(rate_per_s=50, burst=7).bucket_size == 7.0


def test_intakes_sharing_a_bucket_never_admit_more_than_burst_plus_rate_times_t(ledger):
    # given a tenant of 40 checks a second in bursts of 5, and four intakes (threads, each with its own
    # connection and cache, as four processes would) asking for one check after another for 1.5 s
    _tenant(ledger, "shared", rate_per_s=40, burst=5)
    admitted, errors = [], []

    def intake() -> None:
        quotas, mine = Quotas(_settings(ledger)), 0
        try:
            while time.monotonic() < deadline:
                with ledger.session() as session:
                    mine += quotas.admit(session, "shared", 1).admitted
        except Exception as error:  # reported below, not lost in the thread
            errors.append(error)
        admitted.append(mine)

    started = time.monotonic()
    deadline = started + 1.5
    threads = [threading.Thread(target=intake) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    # then together they admitted no more than the bucket allows, and not much less
    assert not errors, errors
    assert sum(admitted) <= 5 + 40 * elapsed + 1, (admitted, elapsed)
    assert sum(admitted) >= 0.7 * 40 * 1.5, (admitted, elapsed)


def test_a_backlog_cap_admits_what_it_has_room_for(ledger):
    # given a tenant that may have 3 fresh checks queued
    _version(ledger)
    _tenant(ledger, "capped", backlog_cap=3)
    settings = _settings(ledger, quota_backlog_retry_s=42)
    intake = Intake(settings, ledger)
    # when it files 2, then 3 more (the broker's way), then one more over HTTP's way
    intake.file([CheckRequest(f"cap-{i}", _image(i)) for i in range(2)], tenant_id="capped")
    filed = intake.file([CheckRequest(f"cap-{i}", _image(i)) for i in range(2, 5)], tenant_id="capped")
    refused = intake.file([CheckRequest("cap-http", _image(9))], tenant_id="capped", over_quota="refuse")
    # then the first fills the cap, the others are rejected as over the backlog; HTTP's is not filed at all
    assert [one.check.status for one in filed] == [CheckStatus.queued, CheckStatus.rejected, CheckStatus.rejected]
    assert [one.check.error_code for one in filed[1:]] == ["quota.backlog", "quota.backlog"]
    assert refused[0].check is None and isinstance(refused[0].refused, BacklogFull)
    assert refused[0].refused.retry_after_s == 42
    with ledger.session() as session:
        ids = session.scalars(sa.select(CheckRow.external_id).where(CheckRow.tenant_id == "capped")).all()
    assert sorted(ids) == ["cap-0", "cap-1", "cap-2", "cap-3", "cap-4"]  # no cap-http
    # and once a queued check is done, there is room again
    with ledger.session() as session:
        session.execute(sa.update(CheckRow).where(CheckRow.external_id == "cap-0").values(status=CheckStatus.done))
    assert intake.file([CheckRequest("cap-http", _image(9))], tenant_id="capped", over_quota="refuse")[0].created


def test_the_broker_path_files_a_check_over_quota_as_rejected_and_a_resubmission_replaces_it(ledger):
    # given the default tenant (the broker's, here) limited to bursts of 2 checks, refilled slowly
    _version(ledger)
    _tenant(ledger, DEFAULT_TENANT, rate_per_s=0.01, burst=2)
    intake = Intake(_settings(ledger, results_stream="item:results"), ledger)
    items = [CheckRequest(f"msg-{i}", _image(i), "https://platform.example/hook") for i in range(4)]
    # when four messages arrive in one batch through the task's filing
    outcomes = file_holding(intake, list(items), threading.Event())
    # then two are queued, two rejected with quota.exceeded, each told to the platform like any rejection
    assert [one.check.status for one in outcomes] == ["queued", "queued", "rejected", "rejected"]
    assert {one.check.error_code for one in outcomes[2:]} == {"quota.exceeded"}
    assert "0.01 checks a second" in outcomes[2].check.error_message
    with ledger.session() as session:
        told = session.scalars(sa.select(DeliveryRow.check_id).where(DeliveryRow.check_id.in_(
            [one.check.id for one in outcomes[2:]]))).all()  # fmt: skip
    assert len(told) == 4  # callback and results stream, for each of the two
    # when the broker redelivers an admitted message while the tenant is still over quota
    [again] = file_holding(intake, [items[0]], threading.Event())
    # then it is that check, not a rejection
    assert again.check.id == outcomes[0].check.id and again.check.status == "queued" and again.rejected is None
    # when the platform resends a rejected one once the bucket has refilled
    with ledger.session() as session:
        session.execute(sa.update(TenantBucketRow).values(tokens=2.0))
    [resent] = file_holding(intake, [items[2]], threading.Event())
    # then it replaces the rejected check, queued under the same id
    assert resent.created and resent.check.id == outcomes[2].check.id and resent.check.status == "queued"


def test_a_change_of_limits_applies_at_the_next_admission(ledger):
    _tenant(ledger, "later")
    quotas = Quotas(_settings(ledger))
    with ledger.session() as session:
        assert quotas.admit(session, "later", 5).admitted == 5
        tenants.update_tenant(session, "later", tenants.TenantLimits(rate_per_s=1, burst=1))
    with ledger.session() as session:
        assert quotas.admit(session, "later", 5).admitted == 1


@pytest.mark.parametrize("code, cls", [("quota.exceeded", QuotaExceeded), ("quota.backlog", BacklogFull)])
def test_quota_errors_are_typed_with_stable_codes(code, cls):
    error = cls("over", 7)
    assert error.code == code and error.retry_after_s == 7 and isinstance(error, QuotaExceeded)
