"""Who may call what: a key in `Authorization: Bearer ...` for the API, a session cookie for the console.

Without a valid key a request is 401; with a valid key that lacks the scope, 403. Each refusal is counted
(`item_http_auth_failures_total`, by reason); the key itself never reaches a log line or an error message.
"""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.ops import metrics
from worker.web.errors import HttpError
from worker.web.keys import Principal

bearer = HTTPBearer(auto_error=False, description="An API key: `item keys create --scope SCOPE --name NAME`.")


def refuse(reason: str, status: int = 401) -> HttpError:
    metrics.AUTH_FAILURES.labels(reason).inc()
    if status == 403:
        return HttpError(403, "auth.scope", "This key does not have the scope this request needs.")
    messages = {
        "missing": "No API key: send `Authorization: Bearer <key>`.",
        "malformed": "That is not an API key of this service (item_<id>_<secret>).",
        "unknown": "Unknown or revoked API key.",
    }
    return HttpError(401, f"auth.{reason}", messages[reason], {"WWW-Authenticate": 'Bearer realm="item"'})


def requires(scope: str):
    """A dependency: the caller's Principal, if its key has `scope` (admin has every scope)."""

    def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        who, reason = request.app.state.web.keys.principal(credentials.credentials if credentials else None)
        if who is None:
            raise refuse(reason)
        if not who.may(scope):
            raise refuse("scope", 403)
        return who

    return principal
