"""kp-run's refusals: each says what is wrong, exits with a documented status, and starts nothing."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to get past the root check")
def test_conflicting_options_are_refused(tmp_path: Path) -> None:
    for args, words in [(["--quarantine", "--read-only-workspace", "-w", str(tmp_path)], "exclude each other"),
                        (["--quarantine"], "needs a --workspace"),
                        (["--allow", "a.test", "--net", "open"], "exclude each other"),
                        (["--resolve", "a.test=1.2.3.4"], "only matters with --allow")]:
        result = invoke("kp-run", "--image", "x", *args, "--", "true")
        assert result.status == 65 and words in result.stderr, (args, result.stderr)


def test_non_root_gets_77(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = invoke("kp-run", "--image", "x", "--", "true")
    assert result.status == 77 and "sudo" in result.stderr


def test_apply_of_nothing(kp_env: dict[str, Path]) -> None:
    result = invoke("kp-run", "--apply", "nosuchrun")
    assert result.status == 1 and "no kp-run named nosuchrun" in result.stderr
