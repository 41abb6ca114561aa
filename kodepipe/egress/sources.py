"""Reading a credential's real value on the host: from kp-run's environment, a file, or a command.

Each failure is a KpError (credential_unavailable) that names the source and never the value: a
missing variable, a missing or unreadable file, a command that fails or prints nothing.  ``absent``
on the error tells "not set up here" (an unset variable, no such file: a profile's credential is then
left out, and said) from "set up, and broken" (which always stops the run).

Under sudo, a command source runs as the user who ran sudo (SUDO_UID), with that user's HOME, so that
``pass show``, ``op read`` or ``secret-tool lookup`` find the user's own store and agent.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path

from kodepipe.core.errors import KpError
from kodepipe.egress.credentials import VALUE_LIMIT, Source, check_value

COMMAND_TIMEOUT = 60.0


class Unavailable(KpError):
    code = "credential_unavailable"

    def __init__(self, message: str, *, absent: bool = False, hint: str | None = None) -> None:
        super().__init__(message, code="credential_unavailable", hint=hint)
        self.absent = absent


def read(source: Source, environ: Mapping[str, str] | None = None) -> str:
    """The real value of ``source``, checked (one line of printable ASCII), or Unavailable."""
    env = os.environ if environ is None else environ
    if source.kind == "env":
        name = source.spec[0]
        if name not in env:
            sudo = " (sudo resets the environment: sudo --preserve-env=" + name + " kp-run ..., or use a file " \
                   "or command source)" if "SUDO_UID" in env else ""
            raise Unavailable(f"{source.describe()} is not set{sudo}", absent=True)
        raw = env[name]
    elif source.kind == "file":
        raw = _read_file(Path(_expand(source.spec[0], env)), source)
    else:
        raw = _run(source, env)
    try:
        return check_value(raw, source)
    except KpError as exc:
        raise Unavailable(exc.message) from None


def _expand(path: str, env: Mapping[str, str]) -> str:
    """~ is the home of the user who ran kp-run (the sudo user's, under sudo)."""
    if not path.startswith("~"):
        return path
    user = _sudo_user(env)
    home = user.pw_dir if user is not None else os.path.expanduser("~")
    return home + path[1:] if path.startswith("~/") or path == "~" else os.path.expanduser(path)


def _read_file(path: Path, source: Source) -> str:
    from kodepipe.core.errors import NotFound
    from kodepipe.core.records import open_regular

    try:
        with open_regular(str(path), "the credential file") as handle:
            data = handle.read(VALUE_LIMIT + 2)
    except NotFound:
        raise Unavailable(f"{source.describe()} does not exist", absent=True) from None
    except KpError as exc:
        raise Unavailable(f"{source.describe()}: {exc.message}") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise Unavailable(f"{source.describe()} is not ASCII text: not a key") from None


def _sudo_user(env: Mapping[str, str]) -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        uid = int(env.get("SUDO_UID", ""))
        return pwd.getpwuid(uid) if uid > 0 else None
    except (ValueError, KeyError):
        return None


def _run(source: Source, env: Mapping[str, str]) -> str:
    from kodepipe.core import proc
    from kodepipe.core.errors import CommandFailed, MissingProgram, Timeout

    argv = list(source.spec)
    child_env = dict(os.environ)
    user = _sudo_user(env)
    if user is not None:  # the user's own password store and agent, not root's
        argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--", *argv]
        child_env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    try:
        done = proc.run(argv, timeout=COMMAND_TIMEOUT, env=child_env, check=False)
    except MissingProgram:
        raise Unavailable(f"{source.describe()}: {source.spec[0]} is not installed", absent=True) from None
    except Timeout:
        raise Unavailable(f"{source.describe()} did not finish within {COMMAND_TIMEOUT:g} s") from None
    except CommandFailed as exc:
        raise Unavailable(f"{source.describe()} could not be run: {exc.message}") from None
    if done.returncode != 0:
        # its stderr only: what it printed on stdout may be (part of) the value
        said = proc.tail(done.stderr, 3)
        raise Unavailable(f"{source.describe()} exited with status {done.returncode}"
                          + (f": {said}" if said else ""))
    try:
        return done.stdout[:VALUE_LIMIT + 2].decode("ascii")
    except UnicodeDecodeError:
        raise Unavailable(f"{source.describe()} printed something that is not ASCII: not a key") from None
