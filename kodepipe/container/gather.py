"""kp-run's adapter between the command line and policy.resolve: all the I/O resolve needs.

policy.resolve reads nothing; this module reads, once, what it depends on:
the agent profile (profile.load: its files, nothing is built), the values of
the environment variables asked for (-e NAME and the profile's names, and no
others), TERM, the rules of each --allow-file, what each --secret FILE is,
and whether there is a terminal.  Nothing here writes, builds or starts
anything, so a conflict found by resolve afterwards still comes before any
side effect.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kodepipe.container import policy as pol
from kodepipe.core.errors import BadInput


def options(params: Mapping[str, Any], given: frozenset[str]) -> pol.Options:
    """pol.Options from kp-run's click parameters (by name); ``given``: those set on the command line."""
    fields = {f for f in pol.Options.__dataclass_fields__ if f != "given"}
    values: dict[str, Any] = {}
    for key, value in params.items():
        if key not in fields:
            continue
        if isinstance(value, (list, tuple)):
            value = tuple(str(v) if isinstance(v, Path) else v for v in value)
        elif isinstance(value, Path):
            value = str(value)
        values[key] = value
    return pol.Options(**values, given=given)


def given_on_command_line(ctx: Any) -> frozenset[str]:
    """The click parameters the user set (command line or environment), not left at their defaults."""
    import click

    sources = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return frozenset(name for name in ctx.params if ctx.get_parameter_source(name) in sources)


def profile(opts: pol.Options) -> Any:
    """The agent profile (--image alone: none); BadInput if it is unknown or broken.  Nothing is built."""
    if opts.image is not None and opts.profile is None:
        return None
    from kodepipe.container import profile as profiles

    return profiles.load(opts.profile or "shell")


def _terminal(tty: bool) -> bool:
    """Whether -t can have a terminal: stdin is one, or /dev/tty opens (as hostrun does at run time)."""
    if not tty:
        return False
    if os.isatty(0):
        return True
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def config(opts: pol.Options, prof: Any, environ: Mapping[str, str] | None = None) -> pol.Config:
    """What resolve needs to know of kp-run's environment, and nothing else."""
    env_source = os.environ if environ is None else environ
    wanted = [v for v in opts.env if "=" not in v] + list(prof.env if prof is not None else ())
    env = {name: env_source[name] for name in wanted if name in env_source}
    rules: dict[str, tuple[str, ...]] = {}
    unreadable: dict[str, str] = {}
    for path in opts.allow_files:
        from kodepipe.egress.proxy import read_rules  # the proxy's module (asyncio, ssl): only when asked

        try:
            rules[path] = tuple(read_rules(Path(path)))
        except BadInput as exc:
            unreadable[path] = exc.message
    secrets = {}
    for spec in opts.secret_specs:
        src = spec.partition(":")[0]
        secret = Path(src).expanduser()
        try:
            regular = stat.S_ISREG(secret.stat().st_mode)
        except (OSError, ValueError):
            regular = False
        secrets[src] = pol.SecretFile(str(secret), regular)
    stdin_tty, stdout_tty = _is_tty(sys.stdin), _is_tty(sys.stdout)
    return pol.Config(env=env, term=env_source.get("TERM"), allow_files=rules, unreadable=unreadable,
                      secrets=secrets, has_terminal=_terminal(opts.tty), stdin_tty=stdin_tty, stdout_tty=stdout_tty,
                      credentials=credentials(opts, prof, env_source))


def credentials(opts: pol.Options, prof: Any, environ: Mapping[str, str]) -> dict[str, pol.CredentialFact]:
    """Each credential the run may use (--credential's, and the profile's unless left out): its definition,
    its real value read from its source on this host, and a fresh token for the agent; or why not."""
    wanted = list(dict.fromkeys(opts.credentials)) + list(pol.profile_credentials(opts, prof))
    if not wanted:
        return {}
    import secrets as random

    from kodepipe.core import paths
    from kodepipe.core.errors import KpError
    from kodepipe.egress import credentials as creds
    from kodepipe.egress import sources

    user_dir = paths.config_dir() / "credentials"
    facts: dict[str, pol.CredentialFact] = {}
    for name in wanted:
        try:
            definition = creds.load(name, user_dir)
        except BadInput as exc:
            facts[name] = pol.CredentialFact(problem=exc.message)
            continue
        try:
            value = sources.read(definition.source, environ)
        except sources.Unavailable as exc:
            facts[name] = pol.CredentialFact(definition, unavailable=exc.message, absent=exc.absent)
            continue
        except KpError as exc:
            facts[name] = pol.CredentialFact(definition, unavailable=exc.message)
            continue
        token = definition.token_prefix + random.token_hex(24)
        facts[name] = pol.CredentialFact(definition, creds.Grant(definition, token, value))
    return facts


def policy(opts: pol.Options) -> pol.Policy:
    """Gather and resolve: the Policy, or PolicyError (every conflict) / BadInput (an unknown profile)."""
    prof = profile(opts)
    return pol.resolve(opts, prof, config(opts, prof))
