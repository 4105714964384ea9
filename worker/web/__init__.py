"""The HTTP API (`/v1`) and the console (`/console`): one FastAPI application, served by `item serve`.

It runs no model: it files checks through the same intake as messages and reads the ledger.
"""
