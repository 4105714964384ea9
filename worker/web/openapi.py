"""The API's OpenAPI description as a file: `python -m worker.web.openapi > docs/openapi.json`.

The copy in docs/ is what readers and client generators see without running a server; a test keeps it equal to
the description `item serve` serves.
"""

from __future__ import annotations

import json

from worker.settings import Settings


def description() -> dict:
    from worker.web.app import create_app

    return create_app(Settings(database_url="sqlite://")).openapi()


if __name__ == "__main__":
    print(json.dumps(description(), indent=2, sort_keys=True))
