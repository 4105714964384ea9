"""Every refusal of `item serve` is `{"error": {"code", "message"}}` with a stable code, as everywhere else."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pipeline.core.errors import ItemError


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class HttpError(ItemError):
    """A refusal with its HTTP status (and headers, such as WWW-Authenticate for a 401)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message, code=code)
        self.status = status
        self.headers = headers or {}


def error_json(status: int, code: str, message: str, headers: dict | None = None, **more) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}, **more}, status_code=status, headers=headers)


async def http_error(request: Request, error: HttpError) -> JSONResponse:
    return error_json(error.status, error.code, error.message, error.headers)


async def ledger_unavailable(request: Request, error: Exception) -> JSONResponse:
    """The database is down or the link broke: a retry later can succeed, and nothing was half done."""
    return error_json(503, "ledger.unavailable", "The ledger cannot be reached; nothing was changed. Retry.")


async def unstorable(request: Request, error: Exception) -> JSONResponse:
    """A value the database cannot hold or compare (a NUL character, say) that got past the checks above."""
    return error_json(422, "request.invalid", "The request holds a value the ledger cannot store or compare.")


# Where a malformed body's first problem lies → the code the same problem gets from the Celery intake.
_CODE_BY_FIELD = {
    "external_id": "message.no_external_id",
    "image": "source.invalid",
    "callback_url": "callback.invalid",
}


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with a stable code: a body that is not JSON, a field of the wrong type, a field the API lacks."""
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request", "type": ""}
    location = [str(part) for part in first.get("loc", ())]
    code = _code_of(location, first.get("type", ""))
    if any(_is_path_source([str(part) for part in problem.get("loc", ())]) for problem in problems):
        code = "source.path_refused"  # a file on the server is no business of an HTTP client
    where = ".".join(location[1:]) or location[0] if location else "request"
    message = f"{where}: {first.get('msg', 'invalid')}"
    if location[1:2] == ["image"]:
        message = "`image` must be an object with exactly one of url, b64, s3" + (
            " (`path` is not accepted over HTTP)." if code == "source.path_refused" else "."
        )
    if code == "message.not_json":
        message = f"The body is not JSON: {first.get('ctx', {}).get('error', 'invalid')}."
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return error_json(422, code, message[:1000])


def _is_path_source(location: list[str]) -> bool:
    return location[1:2] == ["image"] and location[-1] == "path"


def _code_of(location: list[str], kind: str) -> str:
    if kind == "json_invalid":
        return "message.not_json"
    if location[:1] == ["query"] or location[:1] == ["path"]:
        return "request.invalid"
    field = location[1] if len(location) > 1 else ""
    return _CODE_BY_FIELD.get(field, "message.invalid")
