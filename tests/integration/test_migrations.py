"""The migrations build exactly the schema the models describe, and come down again, on both backends."""

from __future__ import annotations

from datetime import date

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from worker.ledger import migrate, partitions, tenants
from worker.ledger.checks import NewCheck
from worker.ledger.engine import make_engine
from worker.ledger.models import Base
from worker.ledger.partitions import is_partition_name
from worker.ledger.store import Ledger

TABLES = {
    *("pipeline_versions", "images", "blobs", "artifacts", "checks", "deliveries", "dead_letters"),
    *("api_keys", "console_sessions", "decisions", "thumbnails", "workers"),  # 0005: the API and console
    *("check_rollups", "check_totals", "check_latency_rollups"),  # 0008: the operator views' counts
    "check_keys",  # 0009: idempotency by external id, apart from the partitioned checks
    *("tenants", "tenant_buckets", "callback_secrets", "review_items"),  # 0010: tenants and the review queue
    *("near_hashes", "bank_entries"),  # 0011: near duplicates and the bank of moderators' decisions
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        names = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        return {name for name in names if not is_partition_name(name)}
    finally:
        engine.dispose()


def include_name(name: str | None, type_: str, _parents: dict) -> bool:
    return not (type_ == "table" and name is not None and is_partition_name(name))


def _drift(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            opts = {"compare_type": True, "include_name": include_name}
            context = MigrationContext.configure(connection, opts=opts)
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_creates_the_tables(database_url):
    migrate.upgrade(database_url)
    assert _tables(database_url) == TABLES
    assert migrate.current(database_url) == migrate.head() == "0012"
    assert migrate.is_up_to_date(database_url)


def test_models_match_the_migrated_schema(database_url):
    migrate.upgrade(database_url)
    assert _drift(database_url) == []


def test_checks_indexes_and_unique_key(database_url):
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        inspector = sa.inspect(engine)
        indexes = {tuple(index["column_names"]) for index in inspector.get_indexes("checks")}
        uniques = {tuple(unique["column_names"]) for unique in inspector.get_unique_constraints("checks")}
        foreign = inspector.get_foreign_keys("checks")
        primary = inspector.get_pk_constraint("artifacts")["constrained_columns"]
    finally:
        engine.dispose()
    assert {("finished_at",), ("external_id", "pipeline_version_id")} <= indexes
    assert ("image_sha256", "pipeline_version_id", "finished_at", "id") in indexes  # 0008: done checks only
    assert ("status", "updated_at") not in indexes  # 0009: a lease renewal changes no indexed column
    assert ("external_id", "pipeline_version_id") not in uniques  # 0009: idempotency lives in check_keys
    assert [fk["referred_table"] for fk in foreign] == ["pipeline_versions"]
    partitioned = engine.dialect.name == "postgresql"  # 0009: a partitioned table's key holds its partition key
    assert primary == ["sha256", "kind", "version_hash", *["created_at"] * partitioned]


def test_the_claim_indexes_hold_queued_and_running_checks_only(database_url):
    """Partial on both backends, as the models say: autogenerate compares an index's columns, not its WHERE."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        indexes = {index["name"]: index for index in sa.inspect(engine).get_indexes("checks")}
    finally:
        engine.dispose()
    # 0009: the running one leaves out `lease_expires_at`, so renewing a lease is a HOT update
    for status, claimable_from in (("queued", ["available_at"]), ("running", [])):
        claim = indexes[f"ix_checks_claim_{status}"]
        assert claim["column_names"] == ["tenant_id", "pipeline_version_id", "priority", "created_at", *claimable_from]
        where = str(claim["dialect_options"][f"{engine.dialect.name}_where"])  # postgresql_where, sqlite_where
        assert "status" in where and f"'{status}'" in where
    replaced = {"ix_checks_pipeline_version_id_status_priority_created_at", "ix_checks_status_lease_expires_at"}
    assert replaced.isdisjoint(indexes)  # by 0004


def test_downgrade_to_base_then_upgrade_again(database_url):
    migrate.upgrade(database_url)
    migrate.downgrade(database_url, "base")
    assert _tables(database_url) == set()
    assert migrate.current(database_url) is None
    assert not migrate.is_up_to_date(database_url)
    migrate.upgrade(database_url)
    assert _tables(database_url) == TABLES
    assert _drift(database_url) == []


def test_current_of_a_missing_sqlite_file_creates_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'absent' / 'ledger.sqlite3'}"
    assert migrate.current(url) is None
    assert not (tmp_path / "absent").exists()


def test_0002_keeps_existing_checks_and_activates_existing_versions(database_url):
    """A ledger in use upgrades in place: rows survive, the newest version stays the active one, and back."""
    migrate.downgrade(database_url, "base")
    migrate.upgrade(database_url, "0001")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO pipeline_versions (id, profile, caption, ground, embed, head, created_at) "
                    "VALUES ('pv-old', 'tiny', 'c', 'g', 'e', 'h', '2026-01-01 00:00:00+00:00')"
                )
            )
            connection.execute(
                sa.text(
                    "INSERT INTO checks (id, external_id, pipeline_version_id, source, status, attempts, created_at, "
                    "updated_at) VALUES ('c1', 'post-1', 'pv-old', '{}', 'done', 1, "
                    "'2026-01-01 00:00:00+00:00', '2026-01-01 00:00:00+00:00')"
                )
            )
        migrate.upgrade(database_url)
        with engine.connect() as connection:
            version = connection.execute(sa.text("SELECT created_at, activated_at FROM pipeline_versions")).one()
            check = connection.execute(sa.text("SELECT priority, rescore_of, callback_url FROM checks")).one()
        assert version.activated_at == version.created_at
        assert tuple(check) == (0, None, None)
        migrate.downgrade(database_url, "0001")
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT external_id FROM checks")).scalar_one() == "post-1"
        assert "deliveries" not in _tables(database_url)
    finally:
        engine.dispose()
        migrate.upgrade(database_url)


def test_0003_keeps_waiting_and_running_checks_claimable(database_url):
    """Queued checks stay ready at once; a running one (its worker's lease is unknown) is taken over as expired."""
    migrate.downgrade(database_url, "base")
    migrate.upgrade(database_url, "0002")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO pipeline_versions (id, profile, caption, ground, embed, head, created_at) "
                    "VALUES ('pv-old', 'tiny', 'c', 'g', 'e', 'h', '2026-01-01 00:00:00+00:00')"
                )
            )
            for check_id, status in (("c1", "queued"), ("c2", "running")):
                connection.execute(
                    sa.text(
                        "INSERT INTO checks (id, external_id, pipeline_version_id, source, status, attempts, priority, "
                        "created_at, enqueued_at, updated_at) VALUES (:id, :id, 'pv-old', '{}', :status, 1, 0, "
                        "'2026-01-01 00:00:00+00:00', '2026-01-01 00:01:00+00:00', '2026-01-01 00:02:00+00:00')"
                    ),
                    {"id": check_id, "status": status},
                )
        migrate.upgrade(database_url)
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT id, available_at, lease_expires_at, lease_token FROM checks ORDER BY id")
            ).all()
        queued, running = rows
        assert queued.available_at is not None and queued.lease_expires_at is None
        assert running.lease_expires_at is not None and running.lease_token is None
        migrate.downgrade(database_url, "0002")
        assert "dead_letters" not in _tables(database_url)
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM checks")).scalar_one() == 2
    finally:
        engine.dispose()
        migrate.upgrade(database_url)


def test_0009_keeps_existing_checks_in_their_days_and_their_idempotency(database_url):
    """An existing ledger converted: checks of other days land in those days' partitions (PostgreSQL), their
    keys are backfilled so a resent id finds its old check, and deliveries learn their check's day."""
    migrate.upgrade(database_url)
    migrate.downgrade(database_url, "0008")
    engine = make_engine(database_url)
    old = "2026-11-01 10:00:00+00:00"
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO pipeline_versions (id, profile, caption, ground, embed, head, created_at) "
                    "VALUES ('pv-0009', 'tiny', 'c', 'g', 'e', 'h', :at)"
                ),
                {"at": old},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO checks (id, external_id, pipeline_version_id, source, status, attempts, priority, "
                    "created_at, enqueued_at, available_at, updated_at) VALUES ('c-0009', 'upload-0009', 'pv-0009', "
                    "'{}', 'done', 1, 0, :at, :at, :at, :at)"
                ),
                {"at": old},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO deliveries (id, check_id, target, status, attempts, body, next_attempt_at, "
                    "created_at, updated_at) VALUES ('d-0009', 'c-0009', 'stream', 'delivered', 1, '{}', :at, :at, :at)"
                ),
                {"at": old},
            )
        migrate.upgrade(database_url)
        with engine.connect() as connection:
            keys = connection.execute(
                sa.text("SELECT external_id, day, check_id FROM check_keys WHERE pipeline_version_id = 'pv-0009'")
            ).all()
            delivered = connection.execute(
                sa.text("SELECT check_created_at FROM deliveries WHERE id = 'd-0009'")
            ).scalar_one()
            if engine.dialect.name == "postgresql":
                days = partitions.partition_days(connection, "checks")
                held = connection.execute(sa.text('SELECT id FROM "checks_p20261101"')).scalars().all()
                assert held == ["c-0009"] and date(2026, 11, 1) in days
        assert [(key.external_id, str(key.day), key.check_id) for key in keys] == [
            ("upload-0009", "2026-11-01", "c-0009")
        ]
        assert str(delivered).startswith("2026-11-01")
        ledger = Ledger(database_url)
        try:
            with ledger.session() as session:
                [(check, created)] = ledger.create_checks(session, "pv-0009", [NewCheck("upload-0009", {"url": "x"})])
            assert (check.id, created) == ("c-0009", False)
        finally:
            ledger.dispose()
        migrate.downgrade(database_url, "0008")
        with engine.connect() as connection:
            kept = connection.execute(sa.text("SELECT id FROM checks WHERE pipeline_version_id = 'pv-0009'"))
            assert kept.scalars().all() == ["c-0009"]
    finally:
        engine.dispose()
        migrate.upgrade(database_url)


def test_0010_puts_an_existing_ledger_under_the_default_tenant_and_back(database_url):
    """Every existing check, key, delivery, decision, API key and count becomes the default tenant's, so a resent id
    finds its old check and an old key reads what it read; a second tenant's same external id is a new check;
    the downgrade folds the tenants' counts together and keeps the default tenant's keys."""
    migrate.upgrade(database_url)
    migrate.downgrade(database_url, "0009")
    engine = make_engine(database_url)
    at = "2026-12-01 10:00:00+00:00"
    rows = [
        "INSERT INTO pipeline_versions (id, profile, caption, ground, embed, head, created_at) "
        "VALUES ('pv-0010', 'tiny', 'c', 'g', 'e', 'h', :at)",
        "INSERT INTO checks (id, external_id, pipeline_version_id, source, status, attempts, priority, created_at, "
        "enqueued_at, available_at, updated_at) VALUES ('c-0010', 'upload-0010', 'pv-0010', '{}', 'done', 1, 0, "
        ":at, :at, :at, :at)",
        "INSERT INTO check_keys (external_id, pipeline_version_id, day, check_id) "
        "VALUES ('upload-0010', 'pv-0010', '2026-12-01', 'c-0010')",
        "INSERT INTO api_keys (id, name, scopes, secret_sha256, created_at) "
        "VALUES ('k0123456789ab', 'old', '[\"read\"]', 'x', :at)",
        "INSERT INTO check_totals (pipeline_version_id, status, verdict, priority, slot, n) "
        "VALUES ('pv-0010', 'done', 'real', 0, 0, 5)",
    ]
    try:
        with engine.begin() as connection:
            for statement in rows:
                connection.execute(sa.text(statement), {"at": at})
        migrate.upgrade(database_url)
        with engine.connect() as connection:
            tenants_of = {
                table: connection.execute(sa.text(f"SELECT DISTINCT tenant_id FROM {table}")).scalars().all()
                for table in ("checks", "check_keys", "api_keys", "check_totals")
            }
            assert connection.execute(sa.text("SELECT id FROM tenants")).scalars().all() == ["default"]
        assert tenants_of == dict.fromkeys(tenants_of, ["default"])
        ledger = Ledger(database_url)
        try:
            with ledger.session() as session:
                tenants.create_tenant(session, "other")
                [(again, created)] = ledger.create_checks(session, "pv-0010", [NewCheck("upload-0010", {"url": "x"})])
                [(theirs, new)] = ledger.create_checks(
                    session, "pv-0010", [NewCheck("upload-0010", {"url": "y"})], tenant_id="other"
                )
                session.execute(
                    sa.text(
                        "INSERT INTO check_totals (tenant_id, pipeline_version_id, status, verdict, priority, slot, "
                        "n) VALUES ('other', 'pv-0010', 'done', 'real', 0, 0, 2)"
                    )
                )
            assert (again.id, created) == ("c-0010", False)
            assert new and theirs.id != "c-0010" and theirs.tenant_id == "other"
        finally:
            ledger.dispose()
        migrate.downgrade(database_url, "0009")
        with engine.connect() as connection:
            keys = connection.execute(sa.text("SELECT check_id FROM check_keys WHERE external_id = 'upload-0010'"))
            total = connection.execute(sa.text("SELECT sum(n) FROM check_totals WHERE pipeline_version_id = 'pv-0010'"))
            assert keys.scalars().all() == ["c-0010"] and total.scalar_one() == 7
    finally:
        engine.dispose()
        migrate.upgrade(database_url)
