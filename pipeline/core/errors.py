"""Typed errors with stable codes.

Every refusal the pipeline makes is an `ItemError` whose `code` is a stable, dotted string that callers may
store and match on (`image.truncated`, `model.missing`, ...). `permanent` tells a caller whether trying the
same input again can ever succeed: bad input is permanent, a missing model file or an out-of-memory is not.
"""

from __future__ import annotations


class ItemError(Exception):
    code = "item.error"
    permanent = True

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ImageError(ItemError):
    """The bytes are not an image we accept. Permanent: the same bytes will always be refused."""

    code = "image.invalid"


class ModelUnavailableError(ItemError):
    """A model's files are not on this machine and cannot be fetched (offline, or not found)."""

    code = "model.missing"
    permanent = False


class ModelLoadError(ItemError):
    """A model's files are there but do not load (corrupt, wrong architecture)."""

    code = "model.load_failed"
    permanent = False


class HeadError(ItemError):
    """A head file is missing, corrupt, or was trained for other stage versions."""

    code = "head.invalid"


class ProfileError(ItemError):
    code = "profile.unknown"
