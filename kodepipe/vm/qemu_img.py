"""qemu-img: overlays and image facts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from kodepipe.core import proc


def create_overlay(base: Path, overlay: Path) -> None:
    """A qcow2 overlay whose backing file is ``base``, named relative to it.

    The relative backing path keeps the state directory relocatable; the
    cost is constant whatever the base's size, because nothing is copied.
    """
    backing = os.path.relpath(base, overlay.parent)
    proc.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, overlay])


def rename_backing(overlay: Path, base: Path) -> None:
    """Point ``overlay`` at ``base`` (by a path relative to it) without touching its data.

    For an overlay that was made elsewhere and moved: only the header changes.
    """
    backing = os.path.relpath(base, overlay.parent)
    proc.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, overlay])


def info(path: Path) -> dict[str, Any]:
    out = proc.run(["qemu-img", "info", "--output=json", "-U", path]).stdout
    value: dict[str, Any] = orjson.loads(out)
    return value
