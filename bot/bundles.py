"""Which bundle a `/persona swap` may load: a name inside ``ADAPTERS_DIR``, nothing else.

The name comes from a Discord user, so it must not reach any other file (an absolute path, ``..``, ``~``, a
symlink out of the folder), and no answer may reveal where the folder is or which host paths exist.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import CommandError

REFUSED = "give a bundle's folder name inside ADAPTERS_DIR (no paths)"


def resolve_bundle(adapters_dir: Path, name: str) -> Path:
    """The bundle folder ``name`` names inside ``adapters_dir``; a CommandError (with no host path) else."""
    name = name.strip()
    parts = PurePosixPath(name).parts
    if (not name or name.startswith("~") or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive
            or "\\" in name or ".." in parts):
        raise CommandError(f"not a bundle name: {REFUSED}")  # the input is not echoed: it may be a host path
    root = adapters_dir.expanduser().resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):  # a symlink pointing out of ADAPTERS_DIR
        raise CommandError(f"not a bundle name: {REFUSED}")
    if not path.is_dir():
        raise CommandError(f"no bundle named `{_shown(name)}` in ADAPTERS_DIR (run /persona list to see what "
                           "is served; copy the bundle into ADAPTERS_DIR first)")
    return path


def hide_paths(text: str, *paths: tuple[Path, str]) -> str:
    """``text`` with each host path replaced by its label (longest first, so a folder's child goes first)."""
    for path, label in sorted(paths, key=lambda p: -len(str(p[0]))):
        text = text.replace(str(path), label)
    return text


def _shown(name: str) -> str:
    return name.replace("`", "'")[:80]
