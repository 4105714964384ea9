"""Alembic migrations of the ledger (`worker.ledger.models`); run them with `worker.ledger.migrate`."""
