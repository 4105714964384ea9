"""The ITEM moderation worker: settings, command line (and, later, Celery tasks and the ledger)."""
