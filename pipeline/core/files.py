"""Local image files: listing what a folder holds, and reading one file within the byte cap.

One reader serves every caller; only the names of its failures differ at the edges. `item scan` and the lab
report `file.not_found` / `file.unreadable`, while the worker reading a message's `path` source reports
`source.not_found` / `source.unreadable`, as its task contract says: each passes its `family`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.core.errors import ItemError


def collect_files(paths: Iterable[Path | str]) -> list[Path]:
    """Files named directly, plus every non-hidden file under named folders, sorted; missing paths kept
    (they become `file.not_found` rows)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            found.append(path)
    return found


def read_image_file(
    path: Path | str, max_bytes: int, *, family: str = "file", error: type[ItemError] = ItemError
) -> bytes:
    """The bytes of a file, or `error` with a stable code: `image.too_large`, `<family>.not_found` or
    `<family>.unreadable` (a folder, no permission)."""
    try:
        if Path(path).stat().st_size > max_bytes:
            raise ItemError(f"{path} is larger than {max_bytes:,} bytes.", code="image.too_large")
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path} does not exist.", code=f"{family}.not_found") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory.", code=f"{family}.unreadable") from None
    except PermissionError as problem:
        raise error(f"{path} cannot be read: {problem}", code=f"{family}.unreadable") from None
