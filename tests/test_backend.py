"""One definition for every backend: each part of a Policy is in the rendered container, or the run
is refused naming that part before anything was done; and the record's policy keys agree."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kodepipe.container import backend as backends
from kodepipe.container import engine, hostrun, sandbox, seccomp, vmrun
from kodepipe.container import policy as pol
from kodepipe.container.backend import Part, Unsupported
from kodepipe.container.render import render
from kodepipe.core import proc
from kodepipe.core.errors import BadInput
from kodepipe.core.state import Store
from tests import policies
from tests.test_vmrun import FakeGuest, job

TOGGLES = ("read_only", "quarantine", "allow", "pins", "caps", "writable_root", "env", "secret", "tty",
           "interactive", "keep", "audit", "writable_git", "no_time")


def generated(count: int = 48, seed: int = 11) -> list[dict[str, bool]]:
    """Policies with every part alone, and random mixes of them."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test cases, nothing secret
    out = [dict.fromkeys(TOGGLES, False)] + [{t: t == one for t in TOGGLES} for one in TOGGLES]
    while len(out) < count:
        out.append({t: rng.random() < 0.3 for t in TOGGLES})
    return [g for g in out if not (g["read_only"] and g["quarantine"]) and not (g["pins"] and not g["allow"])]


def policy_of(g: dict[str, bool], workspace: str, secret: Path) -> pol.Policy:
    return policies.policy(
        command=["true"], image="localhost/x:1", workspace=workspace, read_only_workspace=g["read_only"],
        quarantine=g["quarantine"], allow=["a.test", "b.test:8443"] if g["allow"] else None,
        resolve=["a.test=127.0.0.1"] if g["pins"] else None, cap_add=["NET_RAW"] if g["caps"] else None,
        writable_root=g["writable_root"], env={"TOKEN": "zz"} if g["env"] else None,
        secrets=[(secret, "/run/secrets/s")] if g["secret"] else None, tty=g["tty"],
        interactive=g["interactive"] or g["tty"], keep=g["keep"], audit="default" if g["audit"] else None,
        writable_git_config=g["writable_git"], term="xterm" if g["tty"] else None,
        limits=pol.Limits(memory=512 << 20, cpus=1.5, pids=64, seconds=0 if g["no_time"] else 60, tmpfs=64 << 20))


class FakePodman:
    url = "unix:///nowhere/podman.sock"


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """The host backend up to its rendering, with a fake engine: nothing is mounted or started."""
    ran: list[list[str]] = []
    monkeypatch.setattr(engine.Engine, "connect", classmethod(lambda cls, progress=None: FakePodman()))
    monkeypatch.setattr(seccomp, "planned", lambda folder: (tmp_path / "seccomp.json", b"{}"))
    monkeypatch.setattr(hostrun, "refuse", lambda policy: None)  # as root, whoever runs the tests
    real = proc.run

    def run(argv: list[Any], **kw: Any) -> Any:
        if argv[0] != "mount":
            return real(argv, **kw)
        ran.append([str(a) for a in argv])  # the quarantine's overlay: not mounted here
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    monkeypatch.setattr(proc, "run", run)
    monkeypatch.setattr(vmrun, "host_image_id", lambda tag: None)  # not the host's real store
    yield ran


def render_on(name: str, policy: pol.Policy, tmp_path: Path) -> tuple[Any, dict[str, Any], list[Any], Any]:
    """(the Sandbox or the Unsupported refusal, the record so far, the commands run before it, the run)."""
    if name == "host":
        host = backends.HostBackend(Store())
        try:
            host.refuse(policy)
            facts = host.learned(policy)
        except Unsupported as exc:
            return exc, {}, [], None
        with facts, hostrun.Run(Store(), policy, facts, lambda level, message: None,
                                connect=lambda progress: FakePodman()) as run:
            staged = run.stage()
            box = render(policy, staged.facts, staged.staged)
            record = dict(run.meta)
        return box, record, [], run
    guest = FakeGuest()
    from tests.test_vmrun import VM

    # the VM's kp-boot --share is the host's workspace: --quarantine of its /workspace is honoured
    vm_run, _, _ = job(guest, policy, vm={**VM, "share": str(tmp_path / "ws")})
    try:
        prepared = vm_run.prepare()
    except Unsupported as exc:
        return exc, {}, guest.commands, vm_run
    return prepared.box, dict(vm_run.meta), guest.commands, prepared


def honoured(part: Part, policy: pol.Policy, box: sandbox.Sandbox, record: dict[str, Any], run: Any) -> bool:
    """Whether ``part`` is in the rendered container (or, for what a container spec cannot say, in what the
    backend's run set up to do it: a proxy with pins, the host's Run a tracer and --keep)."""
    host = isinstance(run, hostrun.Run)
    spec = box.spec()
    binds = {m["destination"]: m for m in spec["mounts"] if m["type"] == "bind"}
    egress = policy.egress
    verdicts: dict[Part, bool] = {
        Part.WORKSPACE: "/workspace" in binds and spec["work_dir"] == "/workspace",
        Part.READ_ONLY_WORKSPACE: binds.get("/workspace", {}).get("options", [])[-1:] == ["ro"],
        Part.QUARANTINE: str(box.workspace).endswith("/merged") and record.get("quarantine") is not None,
        Part.MASKS: "/workspace/.env" in binds,
        Part.GIT: box.git_writable == policy.git_writable,
        Part.LIMITS: spec["resource_limits"]["pids"]["limit"] == policy.limits.pids
        and spec["resource_limits"]["memory"]["limit"] == policy.limits.memory
        and bool(spec.get("timeout")) == bool(policy.limits.seconds),
        Part.NETWORK: spec["netns"]["nsmode"] == ("none" if policy.network == "none" else "bridge"),
        Part.HOSTS: spec["use_image_hosts"] is True and binds["/etc/hosts"]["options"][-1:] == ["ro"]
        and (host or "--no-hosts" in box.podman_args()),
        Part.EGRESS: egress is not None and box.allow == list(egress.rules) and "/etc/resolv.conf" in binds
        and any(k.lower() == "https_proxy" for k in spec["env"]),
        Part.PINS: (host or isinstance(run, vmrun.Prepared)) and egress is not None and run.egress is not None
        and {f"{n}={a}" for n, addrs in run.egress.pins.items() for a in addrs} == set(egress.pins),
        Part.CAPS: spec["cap_add"] == list(policy.cap_add),
        Part.WRITABLE_ROOT: spec["read_only_filesystem"] is False,
        Part.ENV: all(spec["env"].get(k) == v for k, v in policy.env),
        Part.SECRETS: all(s.dest in binds for s in policy.secrets),
        Part.TERMINAL: spec["stdin"] is True and spec["terminal"] == policy.tty,
        Part.KEEP: host and run.keep is True,
        Part.AUDIT: policy.audit is not None and record.get("audit_mode") == policy.audit.mode,
    }
    return verdicts[part]


@pytest.mark.parametrize("backend", ["host", "vm"])
def test_every_part_is_rendered_or_refused_by_name_before_anything_is_done(
        backend: str, tmp_path: Path, host: list[list[str]]) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".env").write_text("SECRET=1\n")
    secret = tmp_path / "token"
    secret.write_text("t")
    refused = honoured_count = 0
    for g in generated():
        policy = policy_of(g, str(ws) if backend == "host" else "/workspace", secret)
        box, record, before, run = render_on(backend, policy, tmp_path)
        if isinstance(box, Unsupported):
            assert box.part in backends.parts(policy) and box.part.value in box.message, (g, box.message)
            assert box.status == 65 and before == [], (g, before)  # nothing ran in the guest before it
            refused += 1
            continue
        for part in backends.parts(policy):
            assert honoured(part, policy, box, record, run), (backend, part, g)
        honoured_count += 1
    assert honoured_count > 0
    assert (refused > 0) is (backend == "vm")


def test_the_vm_refuses_exactly_its_table() -> None:
    vm = backends.VmBackend({"name": "vm-a"})
    for part in Part:
        assert (vm.supports(None)[part] is None) is (part not in backends.VM_UNSUPPORTED)
    assert all(why is None for why in backends.HostBackend(Store()).supports(None).values())


def test_one_policy_gives_the_same_policy_keys_on_both_backends(tmp_path: Path, host: list[list[str]]) -> None:
    """The record's policy keys come from Policy.record() on every backend (loosened, allow, resolve, ...)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    secret = tmp_path / "token"
    secret.write_text("t")
    g = {t: t in ("caps", "writable_root", "env", "secret", "writable_git", "read_only") for t in TOGGLES}
    records = {}
    for backend in ("host", "vm"):
        policy = policy_of(g, str(ws) if backend == "host" else "/workspace", secret)
        box, record, _, _ = render_on(backend, policy, tmp_path)
        assert isinstance(box, sandbox.Sandbox)
        records[backend] = {k: record[k] for k in policy.record()}
        assert records[backend] == policy.with_workspace(record["workspace"]).record()
    assert records["host"] == records["vm"]
    assert records["host"]["loosened"] == ["cap:NET_RAW", "writable-root", "env:TOKEN", "secret:/run/secrets/s",
                                           "writable-git"]


def test_a_vm_refusal_comes_before_connecting() -> None:
    connected: list[Any] = []
    guest = FakeGuest()
    from tests.test_vmrun import VM

    def connect(vm: Any) -> Any:
        connected.append(vm)
        return guest

    run = vmrun.VmRun(dict(VM), policies.policy(keep=True, allow=["a.test"]), lambda level, message: None,
                      remote=connect)
    with pytest.raises(Unsupported) as caught:
        vmrun._run(run)
    assert caught.value.part is Part.KEEP and caught.value.code == "unsupported"  # --allow is honoured
    assert "run it on the host" in caught.value.message and connected == [] and guest.commands == []


@pytest.mark.parametrize("backend", ["host", "vm"])
@pytest.mark.parametrize(("where", "refused"), [
    ("home", "is or contains the home directory"),
    ("home/.ssh", "where credentials and configuration live"),
    ("home/.config/proj", "where credentials and configuration live"),
    ("", "is or contains the home directory"),  # contains it
    ("home/code/proj", None),
])
def test_one_workspace_rule_on_both_backends(backend: str, where: str, refused: str | None, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """D11: a workspace inside a dot-directory of a home (~/.ssh/x) is refused in a VM as on the host."""
    top = tmp_path / "top"
    home = top / "home"
    ws = top / where if where else top
    ws.mkdir(parents=True, exist_ok=True)
    home.mkdir(exist_ok=True)

    def check() -> None:
        if backend == "host":
            monkeypatch.delenv("SUDO_USER", raising=False)
            monkeypatch.setenv("HOME", str(home))
            sandbox.check_workspace(ws)
        else:  # the guest's probe: the SSH user's home, the workspace's real path and owner
            facts = {"home": str(home), "ws_real": str(ws), "ws_stat": "1000 1000 directory"}
            vmrun.check_workspace(str(ws), facts, "vm-a")

    if refused is None:
        check()
        return
    with pytest.raises(BadInput) as caught:
        check()
    assert refused in caught.value.message
