"""Where kodepipe keeps things: XDG directories, each overridable.

state   $KODEPIPE_STATE_DIR   or $XDG_DATA_HOME/kodepipe   (~/.local/share/kodepipe)
config  $KODEPIPE_CONFIG_DIR  or $XDG_CONFIG_HOME/kodepipe (~/.config/kodepipe)
cache   $KODEPIPE_CACHE_DIR   or $XDG_CACHE_HOME/kodepipe  (~/.cache/kodepipe)
runtime $KODEPIPE_RUNTIME_DIR or $XDG_RUNTIME_DIR/kodepipe (/tmp/kodepipe-UID without it)
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from kodepipe.core.errors import KpError

# sockaddr_un.sun_path is 108 bytes including the terminating NUL
MAX_SOCKET_PATH = 107


def _xdg(env: str, xdg: str, fallback: str) -> Path:
    override = os.environ.get(env)
    if override:
        path = Path(override).absolute()
    else:
        base = os.environ.get(xdg)
        path = Path(base) / "kodepipe" if base and os.path.isabs(base) else Path.home() / fallback / "kodepipe"
    return _directory(path, env)


def _directory(path: Path, env: str) -> Path:
    """``path`` if it is a directory or does not exist yet (it is made when first needed); else a
    clear error, rather than a traceback from the first file made in it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:  # ENOTDIR: a file on the way to it; EACCES; ELOOP
        raise KpError(f"cannot use {path} as kodepipe's directory: {exc.strerror}", code="bad_directory",
                      hint=f"set {env} to a directory") from None
    if not stat.S_ISDIR(info.st_mode):
        raise KpError(f"kodepipe's directory {path} is not a directory", code="bad_directory",
                      hint=f"remove it, or set {env} to a directory")
    return path


def state_dir() -> Path:
    return _xdg("KODEPIPE_STATE_DIR", "XDG_DATA_HOME", ".local/share")


def config_dir() -> Path:
    return _xdg("KODEPIPE_CONFIG_DIR", "XDG_CONFIG_HOME", ".config")


def cache_dir() -> Path:
    return _xdg("KODEPIPE_CACHE_DIR", "XDG_CACHE_HOME", ".cache")


def runtime_dir(create: bool = True) -> Path:
    """The per-user directory for sockets and pid files, mode 0700.

    Kept short because socket paths are limited to 107 bytes.
    """
    override = os.environ.get("KODEPIPE_RUNTIME_DIR")
    if override:
        path = Path(override).absolute()
    elif os.environ.get("XDG_RUNTIME_DIR", "").startswith("/"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "kodepipe"
    else:
        path = Path(f"/tmp/kodepipe-{os.getuid()}")
    if create:
        _directory(path, "KODEPIPE_RUNTIME_DIR")
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
        # /tmp is shared: refuse a directory someone else made for us
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise KpError(f"runtime directory {path} is not a private directory owned by you",
                          hint="remove it or set KODEPIPE_RUNTIME_DIR")
    return path


def socket_path(name: str, suffix: str) -> Path:
    """A control socket path for ``name`` that fits in sun_path.

    Uses the readable name when it fits, else a short hash of it.
    """
    base = runtime_dir()
    path = base / f"{name}.{suffix}"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    short = base / f"{hashlib.sha256(name.encode()).hexdigest()[:12]}.{suffix}"
    if len(os.fsencode(short)) > MAX_SOCKET_PATH:
        raise KpError(f"runtime directory {base} is too long for a socket path",
                      hint="set KODEPIPE_RUNTIME_DIR to a shorter directory")
    return short
