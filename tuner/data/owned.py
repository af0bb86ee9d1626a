"""What the platform may delete: only files it wrote itself, never a user's file.

A prepared directory is the platform's when its ``manifest.json`` was written by the tuner
(``created_by: tuner ...``, its own checksum intact when it has one), or when it holds the
:data:`WRITING` marker that :func:`tuner.data.shards.write_benchmark` puts into the empty
directory it starts from (an interrupted write), or when the caller created it under a
hidden name of its own (the staging and parts folders of a real benchmark, ``owned=True``).
Even then only the files the platform writes are removed (the manifest, its lock, image
shards and label tables, by name), and nothing is removed while the directory holds any
other file: the error names it and the way forward.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tuner.data.manifest import MANIFEST, SELF_SUM, load_manifest_json, manifest_digest
from tuner.errors import DataError

#: marker of a directory write_benchmark is writing (removed once the manifest is written)
WRITING = ".mlt-tuner-writing"
#: names the platform writes in a prepared directory (relative POSIX paths)
_PLATFORM_NAMES = re.compile(
    r"(manifest\.(json|tmp\d+)|\.lock|" + re.escape(WRITING) + r"|"
    r"images/(train|val|test)-\d{5}\.parquet|labels/[A-Za-z0-9_.:-]+\.parquet)"
)
#: names of the encoded-image parts of a real benchmark (tuner.data.resize)
_PART_NAMES = re.compile(r"(train|test)-\d{5}-[0-9a-f]{12}\.parquet(\.tmp\d+)?")


def _tuner_manifest(root: Path) -> dict | None:
    """The manifest when the tuner wrote it and it is intact, else None."""
    try:
        manifest = load_manifest_json(root)
    except DataError:
        return None
    if not str(manifest.get("created_by", "")).startswith("tuner"):
        return None
    if SELF_SUM in manifest and manifest[SELF_SUM] != manifest_digest(manifest):
        return None  # edited: its file list is not the platform's any more
    return manifest


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def _refuse_foreign(root: Path, foreign: Iterable[str], fix: str) -> None:
    foreign = list(foreign)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"{root} holds files the platform did not write ({shown}); nothing was "
                        f"deleted: {fix}")


def check_removable(root: str | Path, owned: bool = False,
                    fix: str = "move its files away or choose another --out") -> list[str]:
    """The files of ``root`` the platform would remove; a :class:`DataError` (naming the
    directory and ``fix``) when it is not the platform's or holds any other file."""
    root = Path(root)
    if _tuner_manifest(root) is None and not owned and not (root / WRITING).is_file():
        reason = "no manifest.json" if not (root / MANIFEST).is_file() else (
            f"its {MANIFEST} is unreadable, foreign or was edited")
        raise DataError(f"{root} is not a directory the platform prepared ({reason}); "
                        f"nothing was deleted: {fix}")
    files = _all_files(root)
    _refuse_foreign(root, (f for f in files if not _PLATFORM_NAMES.fullmatch(f)), fix)
    return files


def remove_prepared(root: str | Path, owned: bool = False) -> None:
    """Delete the platform's files in ``root`` (see :func:`check_removable`) and its then empty
    ``images/`` and ``labels/`` folders; ``root`` itself stays."""
    root = Path(root)
    if not root.exists():
        return
    for rel in check_removable(root, owned):
        (root / rel).unlink()
    for sub in ("images", "labels"):
        if (root / sub).is_dir() and not any((root / sub).iterdir()):
            (root / sub).rmdir()


def remove_parts(parts: Path) -> None:
    """Delete a real benchmark's encoded-image parts folder: its part files, then the folder
    if nothing else is in it (anything else stays, and so does the folder)."""
    if not parts.is_dir():
        return
    for path in parts.iterdir():
        if path.is_file() and _PART_NAMES.fullmatch(path.name):
            path.unlink()
    if not any(parts.iterdir()):
        parts.rmdir()
