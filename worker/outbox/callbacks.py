"""The callback URL a check may carry: its shape is checked when the check is submitted.

Only the shape: where the host resolves is checked at every send (`worker.sources.fetch.post`), since DNS answers may
change by then. A URL refused here never reaches the ledger; the check is rejected `callback.invalid`.
"""

from __future__ import annotations

from pipeline.core.errors import ItemError
from worker.sources.fetch import FetchError, parse_target

MAX_CALLBACK_URL = 2048


class CallbackError(ItemError):
    """A callback URL that can never be called: refused when the check is submitted. Permanent."""

    code = "callback.invalid"


def checked_callback_url(url: str | None) -> str | None:
    """The callback URL if its shape is acceptable (http(s), a host, no credentials); raises CallbackError if not."""
    if url is None:
        return None
    if not isinstance(url, str) or not url:
        raise CallbackError("The callback URL must be a non-empty string.")
    if "\x00" in url:
        raise CallbackError("The callback URL holds a NUL character.")
    if len(url) > MAX_CALLBACK_URL:
        raise CallbackError(f"The callback URL is {len(url):,} characters long; the limit is {MAX_CALLBACK_URL:,}.")
    try:
        parse_target(url)
    except FetchError as error:
        raise CallbackError(f"Callback URL refused: {error.message}") from None
    return url
