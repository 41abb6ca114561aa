"""policy.resolve: every option conflict named at once as a usage error, no I/O, and the loosenings."""

from __future__ import annotations

import builtins
import itertools
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pytest

from kodepipe.container import policy as pol
from kodepipe.core import errors
from kodepipe.egress import policy as egress


@dataclass(frozen=True)
class Prof:
    name: str = "shell"
    command: tuple[str, ...] = ("bash",)
    memory: str = "2g"
    cpus: float = 2.0
    pids: int = 512
    time: str = "2h"
    allow: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    tty: bool = False
    credentials: tuple[str, ...] = ()


SECRET = pol.SecretFile("/home/u/token", True)


def config(**kw: Any) -> pol.Config:
    args: dict[str, Any] = {"secrets": {"/home/u/token": SECRET, "/home/u/dir": pol.SecretFile("/home/u/dir", False)},
                            "env": {"SET": "zz-value"}}
    args.update(kw)
    return pol.Config(**args)


def options(*given: str, **kw: Any) -> pol.Options:
    args: dict[str, Any] = {"command": ("true",), "image": "x"}
    args.update(kw)
    return pol.Options(**args, given=frozenset(given) | {k for k in kw if k in pol.RUN_OPTIONS})


# one row per conflict of docs/policy-plan.md §2: (id, options, profile, config, words in the message)
CONFLICTS: list[tuple[str, pol.Options, Any, pol.Config, str]] = [
    ("C1", options(force=True), None, config(), "--force goes with --apply"),
    ("C2", pol.Options(command=("a.py",), apply_names=("run-1", "run-2")), None, config(),
     "--apply NAME -- PATH... applies those paths of one run"),
    ("C2", pol.Options(command=("a.py",), apply_names=("run-1",), to_branch="b"), None, config(),
     "--to-branch exports the whole quarantine"),
    ("C2", pol.Options(apply_names=("run-1",), quarantine=True, given=frozenset({"quarantine"})), None, config(),
     "drop --quarantine"),
    ("C3", options(quarantine=True, read_only_workspace=True, workspace="/w"), None, config(),
     "--quarantine and --read-only-workspace exclude each other"),
    ("C4", options(quarantine=True), None, config(), "--quarantine needs a --workspace"),
    ("C5", options(allow=("a.test",), network="open"), None, config(), "--allow and --net open exclude"),
    ("C5", options(allow_files=("/r",), network="open"), None, config(allow_files={"/r": ("a.test",)}),
     "--allow and --net open exclude"),
    ("C6", options(pins=("a.test=1.2.3.4",)), None, config(), "--resolve only matters with --allow"),
    ("C7", options(allow_files=("/empty",)), None, config(allow_files={"/empty": ()}), "no rule in it"),
    ("C8", options(audit_mode="full"), None, config(), "--audit-mode only matter with --audit"),
    ("C8", options(audit_cap=1 << 20), None, config(), "--audit-cap only matter with --audit"),
    ("C9", options(audit=True, audit_cap=1024), None, config(), "--audit-cap must be at least 64k"),
    ("C10", options(memory=64 << 20, tmp_size=64 << 20), None, config(), "below --memory"),
    ("C10", options(pids=2), None, config(), "--pids must be at least 8"),
    ("C11", options(command=()), None, config(), "give a COMMAND after --"),
    ("C12", options(name="Bad_Name"), None, config(), "invalid container name"),
    ("C13", options(secret_specs=("/home/u/dir",)), None, config(), "not a readable regular file"),
    ("C13", options(secret_specs=("/home/u/token:/workspace/t",)), None, config(), "must be an absolute path"),
    ("C13", options(secret_specs=("/home/u/token:/etc/hosts",)), None, config(), "kodepipe's own"),
    ("C13", options(secret_specs=("/home/u/token:/run/x", "/home/u/token:/run/x")), None, config(),
     "another --secret already goes to /run/x"),
    ("C14", options(allow=("*.com",)), None, config(), "not a domain name"),
    ("C14", options(allow=("a.test",), pins=("a.test=nope",)), None, config(), "NAME=ADDRESS"),
    ("C14", options(env=("NOT_SET",)), None, config(), "NOT_SET is not set"),
    ("C14", options(env=("1BAD",)), None, config(), "is not an environment variable name"),
    ("C15", options(image="--privileged"), None, config(), "invalid image name '--privileged'"),
    ("C16", options(tty=True), None, config(has_terminal=False), "-t needs a terminal"),
]


@pytest.mark.parametrize(("cid", "opts", "profile", "conf", "words"), CONFLICTS,
                         ids=[f"{row[0]}-{n}" for n, row in enumerate(CONFLICTS)])
def test_each_conflict_is_a_usage_error_that_names_it(cid: str, opts: pol.Options, profile: Any,
                                                      conf: pol.Config, words: str) -> None:
    with pytest.raises(pol.PolicyError) as caught:
        pol.resolve(opts, profile, conf)
    assert caught.value.status == errors.USAGE == 2 and caught.value.code == "usage"
    assert words in caught.value.message, caught.value.message
    assert len(caught.value.problems) == 1, caught.value.problems


def test_every_conflict_is_named_at_once() -> None:
    opts = options(quarantine=True, read_only_workspace=True, pins=("a.test=1.2.3.4",), name="Bad_Name",
                   image="-x", audit_mode="full", tty=True)
    with pytest.raises(pol.PolicyError) as caught:
        pol.resolve(opts, None, config())
    for words in ("exclude each other", "--quarantine needs", "--resolve only matters", "invalid container name",
                  "invalid image name", "--audit-mode only", "-t needs a terminal"):
        assert words in caught.value.message
    assert len(caught.value.problems) == 7


def test_no_conflict_resolves() -> None:
    p = pol.resolve(options(workspace="/w", allow=("A.test.", "b.test:8443"), pins=("a.test=127.0.0.1",),
                            env=("SET", "X=1"), secret_specs=("/home/u/token",), audit=True, tty=True),
                    Prof(env=("SET", "UNSET")), config(has_terminal=True, term="vt100"))
    assert p.egress == pol.Egress(("a.test", "b.test:8443"), ("a.test=127.0.0.1",))
    assert p.environment() == {"SET": "zz-value", "X": "1"} and "zz-value" not in repr(p)
    assert p.secrets == (pol.SecretSpec("/home/u/token", "/run/secrets/token", "/home/u/token"),)
    assert p.audit == pol.Audit("default", pol.AUDIT_CAP) and p.tty and p.interactive and p.term == "vt100"
    assert p.masks == pol.DEFAULT_MASKS and p.workspace_mode == "rw" and p.image == "x"
    assert p.limits == pol.Limits(memory=2 << 30, cpus=2.0, pids=512, seconds=7200.0, tmpfs=512 << 20)


def test_the_profile_gives_defaults_and_its_command_a_terminal_on_one() -> None:
    prof = Prof(tty=True, memory="1g", time="0", allow=("p.test",))
    on_a_terminal = config(stdin_tty=True, stdout_tty=True, has_terminal=False)
    p = pol.resolve(options(command=(), image=None), prof, on_a_terminal)
    assert p.command == ("bash",) and p.tty and p.term == pol.DEFAULT_TERM and p.image is None
    assert p.limits.memory == 1 << 30 and p.limits.seconds == 0 and p.egress == pol.Egress(("p.test",))
    assert not pol.resolve(options(image=None), prof, on_a_terminal).tty  # a COMMAND of the user's own
    assert pol.resolve(options(network="open"), prof, config()).egress is None  # the profile's rules dropped
    assert pol.resolve(options(no_profile_allow=True), prof, config()).egress is None


def test_resolve_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything resolve knows came through its arguments: no environment, no file."""
    conf = config(has_terminal=True, term="xterm", allow_files={"/r": ("c.test",)})
    opts = options(workspace="/w", allow=("a.test",), allow_files=("/r",), pins=("a.test=1.2.3.4",),
                   env=("SET",), secret_specs=("/home/u/token",), tty=True, audit=True, masks=("*.pem",))
    expected = pol.resolve(opts, Prof(env=("SET",)), conf)
    import kodepipe.core.units  # noqa: F401 - imported before open is taken away

    def no(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"resolve did I/O: {args!r}")

    monkeypatch.setattr(os, "environ", {})
    for name in ("stat", "lstat", "open", "listdir", "scandir", "getenv", "isatty", "access"):
        monkeypatch.setattr(os, name, no)
    monkeypatch.setattr(builtins, "open", no)
    assert pol.resolve(opts, Prof(env=("SET",)), conf) == expected
    with pytest.raises(pol.PolicyError):
        pol.resolve(options(quarantine=True, tty=True, env=("NOT_SET",)), None, config())


def _today(o: pol.Options, prof: Prof | None) -> list[str]:
    """kp-run's loosened before the Policy: Sandbox.loosened() of the Request run.cli built, plus
    run._report's no-default-masks, plus resolve:PIN (D4, the one addition)."""
    out = []
    if o.network != "none":
        out.append(f"network:{o.network}")
    rules = ([] if o.no_profile_allow or o.network != "none" or prof is None else list(prof.allow)) + list(o.allow)
    for rule in dict.fromkeys(rules):
        parsed = egress.parse_rule(rule)
        out.append(parsed.pattern + ("" if parsed.ports == (80, 443) else ":" + ",".join(map(str, parsed.ports))))
    out = [f"allow:{r}" if not r.startswith("network:") else r for r in out]
    if rules:
        out.extend("resolve:{}={}".format(*egress.parse_pin(p)) for p in o.pins)
    out.extend(f"cap:{cap.upper()}" for cap in o.cap_add)
    if o.writable_root:
        out.append("writable-root")
    names = {n for n in (prof.env if prof else ()) if n == "SET"} | {v.partition("=")[0] for v in o.env}
    out.extend(f"env:{name}" for name in sorted(names))
    out.extend(f"secret:{'/run/secrets/token' if ':' not in s else s.partition(':')[2]}" for s in o.secret_specs)
    if o.time_limit == 0 or (o.time_limit is None and prof is not None and prof.time == "0"):
        out.append("no-time-limit")
    if o.workspace is not None and o.writable_git_config:
        out.append("writable-git")
    if o.no_default_masks:
        out.append("no-default-masks")
    return out


GRID: list[tuple[Any, ...]] = list(itertools.product(
    [None, "/w"],  # workspace
    ["none", "open"],  # network
    [(), ("a.test", "*.b.test:8443")],  # allow
    [(), ("a.test=127.0.0.1",)],  # pins
    [(), ("net_raw", "SETUID")],  # cap_add
    [False, True],  # writable_root
    [(), ("SET", "Z=1")],  # env
    [(), ("/home/u/token", "/home/u/token:/etc/tok")],  # secrets
    [None, 0.0],  # time
    [False, True],  # writable git
    [False, True],  # no default masks
    [None, Prof(allow=("p.test",), env=("SET",), time="0")],  # profile
))


def test_loosened_is_todays_plus_resolve_pins() -> None:
    checked = 0
    for ws, net, allow, pins, caps, root, env, secrets, time, git, nomask, prof in GRID:
        opts = options(workspace=ws, network=net, allow=allow, pins=pins, cap_add=caps, writable_root=root, env=env,
                       secret_specs=secrets, time_limit=time, writable_git_config=git, no_default_masks=nomask)
        try:
            policy = pol.resolve(opts, prof, config())
        except pol.PolicyError:
            continue  # --net open with --allow, --resolve without a rule: refused, nothing to loosen
        assert policy.loosened() == _today(opts, prof), opts
        assert policy.record()["loosened"] == policy.loosened()
        checked += 1
    assert checked > len(GRID) // 3


def test_the_record_keys_are_the_policys() -> None:
    p = pol.resolve(options(workspace="/w", read_only_workspace=True, allow=("a.test",), pins=("a.test=10.0.0.1",),
                            env=("SET",), audit=True, audit_mode="full"), None, config())
    assert p.record() == {
        "workspace_mode": "ro", "network": "proxy", "limits": p.limits.record(),
        "loosened": ["allow:a.test", "resolve:a.test=10.0.0.1", "env:SET"], "env": ["SET"], "secrets": [],
        "allow": ["a.test"], "resolve": ["a.test=10.0.0.1"], "audit_mode": "full", "audit_cap": pol.AUDIT_CAP}
    none = pol.resolve(options(), None, config()).record()
    assert none["network"] == "none" and none["allow"] == [] and none["workspace_mode"] is None
    assert "audit_mode" not in none


# -- D11: one workspace rule for every backend -------------------------------------------------------

HOMES = (PurePosixPath("/home/u"), PurePosixPath("/root"))


@pytest.mark.parametrize(("workspace", "refused"), [
    ("/", "cannot be /"),
    ("/home/u", "is or contains the home directory /home/u"),
    ("/home", "is or contains the home directory /home/u"),
    ("/root", "is or contains the home directory /root"),
    ("/home/u/.ssh", "is inside /home/u/.ssh, where credentials"),
    ("/home/u/.config/proj", "is inside /home/u/.config, where credentials"),
    ("/root/.aws/x", "is inside /root/.aws, where credentials"),
    ("/home/u/code/proj", None),
    ("/home/u/code/.hidden-proj", None),  # a dot-directory of a project, not of the home
    ("/srv/proj", None),
    ("/workspace", None),
    ("/home/uu/proj", None),  # another directory whose name starts like a home
])
def test_the_workspace_rule(workspace: str, refused: str | None) -> None:
    if refused is None:
        pol.check_workspace_place(PurePosixPath(workspace), HOMES)
        return
    with pytest.raises(errors.BadInput) as caught:
        pol.check_workspace_place(PurePosixPath(workspace), HOMES, machine="vm-a")
    assert refused in caught.value.message and caught.value.status == errors.BAD_INPUT
    if workspace != "/":
        assert " in vm-a " in caught.value.message
    else:
        assert "the whole of vm-a" in caught.value.message


def test_the_workspace_rule_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the rule did I/O: {args!r}")

    for name in ("stat", "lstat", "open", "readlink", "getcwd", "listdir", "scandir"):
        monkeypatch.setattr(os, name, no)
    monkeypatch.setattr(builtins, "open", no)
    with pytest.raises(errors.BadInput):
        pol.check_workspace_place(PurePosixPath("/home/u/.ssh"), HOMES)
    pol.check_workspace_place(PurePosixPath("/home/u/proj"), HOMES)


# -- D6: a profile's variables that are not set are named, not dropped silently ----------------------


@pytest.mark.parametrize(("profile_env", "given", "missing"), [
    (("SET",), (), ()),
    (("SET", "UNSET", "ALSO_UNSET"), (), ("ALSO_UNSET", "UNSET")),
    (("UNSET",), ("UNSET=given",), ()),  # -e NAME=VALUE supplies it
    ((), (), ()),
])
def test_a_profiles_unset_variables_are_named(profile_env: tuple[str, ...], given: tuple[str, ...],
                                              missing: tuple[str, ...]) -> None:
    policy = pol.resolve(options(env=given) if given else options(), Prof(env=profile_env), config())
    assert policy.env_missing == missing
    assert ("env_missing" in policy.record()) is bool(missing)
    if missing:
        assert policy.record()["env_missing"] == list(missing)
        assert not set(missing) & set(policy.env_names())  # never passed, never loosened
        assert not any(f"env:{m}" in policy.loosened() for m in missing)
