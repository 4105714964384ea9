"""Text from outside — message bodies, request bodies, what a model wrote — as the ledger may keep it. The one
place both the HTTP API and the broker intake check what a submission holds, and where what is kept only to be
shown (reasons, dead letters' bodies, captions, provenance) is made storable.

JSON carries strings PostgreSQL cannot store or a URL library cannot quote: lone UTF-16 surrogates ("\\udcff"
decodes to a str that has no UTF-8 form) and NUL. An identifier or URL holding one is refused with a typed
error; a reason or a dead letter's body keeps it escaped, so what was sent stays visible.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 8  # of an image source's nested values: {"s3": {"bucket", "key"}} is two; deeper is not a source
MAX_ITEMS = 64  # values in one source object: a handful is every real source


def text_problem(value: Any, name: str, max_chars: int) -> str | None:
    """Why `value` cannot be the identifier or URL `name` (not a string, empty, too long, NUL, not encodable
    as UTF-8); None when it can."""
    if not isinstance(value, str):
        return f"`{name}` must be a string; got {type(value).__name__}."
    if not value.strip():
        return f"`{name}` is empty."
    if len(value) > max_chars:
        return f"`{name}` is {len(value):,} characters; the limit is {max_chars:,}."
    return _character_problem(value, name)


def strings_problem(value: Any, name: str, depth: int = 0) -> str | None:
    """Why some string inside `value` (a JSON value: objects, lists, strings, numbers) cannot be kept, or why
    `value` is shaped like no source (nested too deep, too many values); None when every string is plain."""
    if depth > MAX_DEPTH:
        return f"`{name}` is nested deeper than {MAX_DEPTH} levels."
    if isinstance(value, str):
        return _character_problem(value, name)
    if isinstance(value, dict | list | tuple):
        if len(value) > MAX_ITEMS:
            return f"`{name}` holds {len(value):,} values; a source has at most {MAX_ITEMS}."
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        for key, inner in pairs:
            problem = strings_problem(key, f"{name} key", depth + 1) if isinstance(key, str) else None
            problem = problem or strings_problem(inner, f"{name}.{_shown(key)}", depth + 1)
            if problem:
                return problem
    return None


def storable(text: Any, limit: int | None = None) -> str:
    """`text` (anything: a non-string is shown by repr) as valid UTF-8 without NUL, cut to `limit` characters:
    lone surrogates and NUL are written as their escapes."""
    if isinstance(text, bytes):
        text = (text if limit is None else text[: limit * 4]).decode("utf-8", "replace")
    elif not isinstance(text, str):
        try:
            text = repr(text)
        except Exception as error:  # a value too deep to show (RecursionError), or one whose repr fails
            text = f"<unshowable {type(text).__name__}: {type(error).__name__}>"
    if limit is not None:
        text = text[:limit]
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if limit is None else text[:limit]


def storable_tree(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings, numbers) with every string in it made storable (see `storable`);
    a value that needs no change is returned as it is."""
    if isinstance(value, str):
        return value if _character_problem(value, "") is None else storable(value)
    if isinstance(value, dict):
        return {storable_tree(key): storable_tree(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple):
        return [storable_tree(inner) for inner in value]
    return value


def _character_problem(value: str, name: str) -> str | None:
    if "\x00" in value:
        return f"`{name}` holds a NUL character."
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"`{name}` is not valid Unicode: a lone surrogate at character {error.start}."
    return None


def _shown(key: Any) -> str:
    return storable(key, 32)
