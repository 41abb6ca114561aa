"""kp-run's refusals: each says what is wrong, exits with a documented status, and starts nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe.container import engine
from tests.cli import invoke


@pytest.fixture(autouse=True)
def no_podman(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach Podman fails the test: refusals must come first."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("kp-run reached Podman before refusing")

    monkeypatch.setattr(engine.Engine, "connect", classmethod(refuse))


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args, words in [
        (["--image", "x"], "give a COMMAND"),
        (["--image", "x", "--allow", "not a domain", "--", "true"], "not a domain name"),
        (["--image", "x", "--allow", "*.com", "--", "true"], "not a domain name"),
        (["--image", "x", "--resolve", "a.test=nope", "--allow", "a.test", "--", "true"], "NAME=ADDRESS"),
        (["--image", "x", "--memory", "lots", "--", "true"], "invalid size"),
        (["--image", "x", "--memory", "64m", "--tmp-size", "64m", "--", "true"], "below --memory"),
        (["--image", "x", "--secret", str(tmp_path / "missing"), "--", "true"], "not a readable"),
        (["--image", "x", "--env", "NOT_SET_ANYWHERE_12345", "--", "true"], "not set"),
        (["--image", "x", "--name", "Bad_Name", "--", "true"], "name"),
        (["--image", "x", "--force", "--", "true"], "--force goes with --apply"),
    ]:
        result = invoke("kp-run", *args)
        assert result.status == 2, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert result.stdout == b""


@pytest.mark.skipif(os.geteuid() != 0, reason="as a normal user kp-run refuses with 77 first")
def test_dangerous_workspaces_are_refused_before_anything_starts(kp_env: dict[str, Path]) -> None:
    for ws in ("/", str(kp_env["home"])):
        result = invoke("kp-run", "--image", "x", "-w", ws, "--", "true")
        assert result.status == 65, result.stderr
        (record,) = result.records
        message = record["error"]["message"]
        assert record["error"]["code"] == "bad_input"
        assert "home directory" in message or "cannot be /" in message
    assert not (kp_env["state"] / "containers").exists()


@pytest.mark.parametrize("euid", [0, 1000])
def test_conflicting_options_are_usage_errors_before_the_root_check(
        tmp_path: Path, euid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same 2 for root and non-root (not 77 first, not 65 after it), each conflict named, nothing made."""
    from kodepipe.container import gather

    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.setattr(gather, "_terminal", lambda tty: False)  # no terminal, whoever runs the tests
    empty = tmp_path / "empty.rules"
    empty.write_text("# nothing here\n")
    for args, words in [(["--quarantine", "--read-only-workspace", "-w", str(tmp_path)], "exclude each other"),
                        (["--quarantine"], "needs a --workspace"),
                        (["--allow", "a.test", "--net", "open"], "exclude each other"),
                        (["--resolve", "a.test=1.2.3.4"], "only matters with --allow"),
                        (["--allow-file", str(empty)], "no rule in it"),  # C7 (D5): it was silently no network
                        (["--audit-mode", "full"], "--audit-mode only matter with --audit"),  # C8 (D3)
                        (["--audit-cap", "1m"], "--audit-cap only matter with --audit"),
                        (["--secret", f"{empty}:/etc/hosts"], "kodepipe's own"),
                        (["--image", "--privileged"], "invalid image name"),  # D15: on every backend
                        (["-t"], "-t needs a terminal")]:  # C16 (D14): before anything is created
        result = invoke("kp-run", "--image", "x", *args, "--", "true")
        assert result.status == 2 and words in result.stderr, (args, result.stderr)
        assert result.stdout == b""
    result = invoke("kp-run", "--image", "x", "--quarantine", "--audit-mode", "full", "--name", "Bad", "--", "true")
    assert result.status == 2 and all(words in result.stderr for words in
                                      ("needs a --workspace", "--audit-mode only", "invalid container name"))


def test_apply_takes_no_run_option_and_paths_of_one_run_only() -> None:
    """--apply NAME with a run option was run as a plain --apply, the rest ignored (D2); its arguments are
    the paths of a partial apply, of one run."""
    for args, words in [(["--apply", "r", "-w", "/tmp", "--quarantine"], "--apply takes no run option"),
                        (["--apply", "r", "--net", "none"], "drop --net"),
                        (["--apply", "r", "--apply", "s", "--", "a.py"], "name exactly one run"),
                        (["--apply", "-", "--", "a.py"], "name exactly one run"),
                        (["--apply", "r", "--to-branch", "b", "--", "a.py"], "--to-branch exports the whole"),
                        (["--accept", "secret", "--", "true"], "--accept goes with --apply"),
                        (["--to-branch", "b", "--", "true"], "--to-branch goes with --apply")]:
        result = invoke("kp-run", *args)
        assert result.status == 2 and words in result.stderr, (args, result.stderr)


def test_a_profile_image_is_built_only_after_the_root_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from kodepipe.container import profile

    def build(*args: object, **kwargs: object) -> str:
        raise AssertionError("an image was built before the root check")

    monkeypatch.setattr(profile, "ensure_image", build)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = invoke("kp-run", "--", "true")
    assert result.status == 77 and "sudo" in result.stderr


def test_a_workspace_the_host_refuses_is_refused_before_a_profile_image_is_built(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The host learns (and checks) before it builds: a workspace it would refuse costs no image build."""
    from kodepipe.container import profile

    def build(*args: object, **kwargs: object) -> str:
        raise AssertionError("an image was built for a run that is refused")

    monkeypatch.setattr(profile, "ensure_image", build)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("HOME", str(tmp_path))
    result = invoke("kp-run", "-w", str(tmp_path), "--", "true")  # the home folder: it would expose too much
    assert result.status == 65 and "home" in result.stderr, result.stderr


def test_non_root_gets_77(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = invoke("kp-run", "--image", "x", "--", "true")
    assert result.status == 77 and "sudo" in result.stderr


def test_apply_of_nothing(kp_env: dict[str, Path]) -> None:
    result = invoke("kp-run", "--apply", "nosuchrun")
    assert result.status == 1 and "no kp-run named nosuchrun" in result.stderr


# -- D1: where a run with -i or -t happens, and --vm ----------------------------------------------------

VM_RECORD = {"kind": "vm", "name": "vm-a", "id": "0123456789ab", "state": "running"}


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, str]]:
    """Both backends faked: each run says where it ran, its policy, and what was left of stdin then."""
    import sys

    from kodepipe.container import gather, hostrun, vmrun

    ran: list[tuple[str, Any, str]] = []

    def in_vm(vm: dict[str, Any], policy: Any, say: Any) -> tuple[dict[str, Any], int]:
        ran.append((f"vm:{vm['name']}", policy, sys.stdin.read()))
        return {"kind": "container", "name": "run-x", "host": vm["name"], "exit_code": 0}, 0

    def on_host(store: Any, policy: Any, say: Any, **kw: Any) -> tuple[dict[str, Any], int]:
        ran.append(("host", policy, sys.stdin.read()))
        return {"kind": "container", "name": "run-x", "exit_code": 0}, 0

    monkeypatch.setattr(vmrun, "run_in_vm", in_vm)
    monkeypatch.setattr(hostrun, "run", on_host)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(gather, "_terminal", lambda tty: tty)  # -t: /dev/tty opens, whoever runs the tests
    return ran


def piped(*records: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


@pytest.mark.parametrize(("flags", "where", "left"), [
    # no -i: vm records on stdin are read, and the run is in each VM
    ([], "vm:vm-a", ""),
    # -t: the agent's input is the terminal, so the vm records are still read (D1: they were never read,
    # and the run happened on the host)
    (["-t"], "vm:vm-a", ""),
    (["-it"], "vm:vm-a", ""),
    # -i alone: stdin is the agent's, never read for records: a host run, stdin left whole for the agent
    (["-i"], "host", "VM"),
])
def test_vm_records_are_read_unless_stdin_is_the_agents(backends: list[tuple[str, Any, str]], flags: list[str],
                                                         where: str, left: str) -> None:
    stdin = piped(VM_RECORD)
    result = invoke("kp-run", "--image", "localhost/x:1", *flags, "--", "cat", input=stdin)
    assert result.status == 0, result.stderr
    ((ran, policy, rest),) = backends
    assert ran == where and policy.tty == ("-t" in flags or "-it" in flags)
    assert rest == (stdin.decode() if left else "")
    kinds = [r["kind"] for r in result.records]
    assert kinds == (["vm", "container"] if where != "host" else ["container"])


def test_vm_names_the_vm_and_leaves_stdin_to_the_agent(backends: list[tuple[str, Any, str]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from kodepipe import inventory

    asked: list[tuple[str, str]] = []

    def view(store: Any, kind: str, name: str) -> dict[str, Any]:
        asked.append((kind, name))
        return {**VM_RECORD, "name": name}

    monkeypatch.setattr(inventory, "view", view)
    result = invoke("kp-run", "--image", "localhost/x:1", "-i", "--vm", "vm-b", "--", "sort", input=b"b\na\n")
    assert result.status == 0, result.stderr
    assert asked == [("vm", "vm-b")]
    ((ran, policy, rest),) = backends
    assert ran == "vm:vm-b" and policy.interactive and not policy.tty and rest == "b\na\n"
    assert [(r["kind"], r.get("host")) for r in result.records] == [("container", "vm-b")]


@pytest.mark.parametrize(("view", "code", "words"), [
    ({"kind": "vm", "name": "vm-b", "state": "gone"}, "not_found", "no VM named vm-b"),
    ({"kind": "vm", "name": "vm-b", "state": "stopped"}, "not_running", "vm-b is not running"),
])
def test_vm_that_cannot_run_it_is_an_error_and_nothing_runs(backends: list[tuple[str, Any, str]],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             view: dict[str, Any], code: str, words: str) -> None:
    from kodepipe import inventory

    monkeypatch.setattr(inventory, "view", lambda store, kind, name: view)
    result = invoke("kp-run", "--image", "localhost/x:1", "--vm", "vm-b", "--", "true")
    assert result.status != 0 and words in result.stderr, result.stderr
    (record,) = result.records
    assert record["error"]["code"] == code and record["host"] == "vm-b"
    assert backends == []


def test_vm_usage_errors(backends: list[tuple[str, Any, str]]) -> None:
    for args, words in [(["--vm", "Bad_Name", "--", "true"], "vm name"),
                        (["--apply", "r", "--vm", "vm-b"], "drop --vm")]:
        result = invoke("kp-run", "--image", "localhost/x:1", *args) if args[0] != "--apply" else \
            invoke("kp-run", *args)
        assert result.status == 2 and words in result.stderr, (args, result.stderr)
    assert backends == []
