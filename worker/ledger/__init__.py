"""The ledger: the service's record of checks, images and reusable artifacts, in PostgreSQL or SQLite.

Redis only carries messages; everything a check is, was or produced lives here, written with idempotent
inserts and conditional updates so that a lost, duplicated or late message can never make a second result.
"""
