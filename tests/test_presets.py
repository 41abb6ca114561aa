"""VM presets (kodepipe.vm.presets): the built-in ones load and hold, a user's own wins and is checked
naming its file, kp-boot's flags override a preset and add to its lists, and every widening is
recorded.  kp-boot runs here up to lifecycle.boot, which records the options it was given."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kodepipe.core.errors import BadInput
from kodepipe.vm import presets, qemu
from tests.cli import invoke


def test_the_built_in_presets_load_and_their_rules_are_valid() -> None:
    from kodepipe.egress.policy import parse_rule

    assert {"dev", "agent", "offline", "credentials"} <= set(presets.names())
    agent = presets.load("agent")
    assert agent.network == "allowlist" and "pypi.org:443" in agent.allow and "api.anthropic.com:443" in agent.allow
    for rule in agent.allow:
        parse_rule(rule)
    assert presets.load("dev").network == "open" and presets.load("offline").network == "none"
    credentials = presets.load("credentials")
    assert credentials.network == "none" and credentials.share is False


@pytest.mark.parametrize(("data", "said"), [
    ([], "a JSON object"),
    ({"network": "open", "colour": "red"}, "unknown key colour"),
    ({"network": "tor"}, "'network' must be one of"),
    ({"network": "allowlist"}, "needs 'allow' rules"),
    ({"network": "open", "allow": ["a.test"]}, "for network \"allowlist\""),
    ({"memory": "lots"}, "'memory'"),
    ({"cpus": 0}, "'cpus'"),
    ({"cpus": True}, "'cpus'"),
    ({"share": "relative/dir"}, "'share'"),
    ({"packages": ["Bad Name"]}, "not Debian package names"),
    ({"network": "none", "packages": ["hello"]}, "has none"),
    ({"publish": "8080:80"}, "'publish' must be a list"),
])
def test_a_bad_preset_is_refused_naming_its_file(data: object, said: str) -> None:
    with pytest.raises(BadInput, match=r"preset /x/p\.json") as caught:
        presets.parse(data, "p", "/x/p.json")
    assert said in caught.value.message


def test_a_users_preset_wins_over_the_built_in_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KODEPIPE_CONFIG_DIR", str(tmp_path))
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "dev.json").write_text('{"network": "none", "memory": "3G"}')
    (tmp_path / "presets" / "mine.json").write_text('{"network": "open", "bogus": 1}')
    assert presets.load("dev").memory == "3G" and presets.load("dev").origin.endswith("presets/dev.json")
    assert "mine" in presets.names()
    with pytest.raises(BadInput, match="unknown key bogus"):
        presets.load("mine")
    os.mkfifo(tmp_path / "presets" / "fifo.json")
    with pytest.raises(BadInput, match=r"fifo\.json"):  # never read from a FIFO (it would hang)
        presets.load("fifo")


@pytest.mark.parametrize(("preset", "booted", "wider"), [
    (presets.Preset("p", "o", network="none"), {"network": "open"}, ["preset:network:open"]),
    (presets.Preset("p", "o", network="none"), {"network": "allowlist", "allow": ("a.test",)},
     ["preset:network:allowlist", "preset:allow:a.test"]),
    (presets.Preset("p", "o", network="allowlist", allow=("a.test",)), {"network": "allowlist",
     "allow": ("a.test", "b.test"), "resolve": ("b.test=127.0.0.1",)},
     ["preset:allow:b.test", "preset:resolve:b.test=127.0.0.1"]),
    (presets.Preset("p", "o", network="allowlist", allow=("a.test",)), {"network": "open"}, ["preset:network:open"]),
    (presets.Preset("p", "o", network="open"), {"network": "none"}, []),  # narrower is no widening
    (presets.Preset("p", "o", network="none", share=False), {"network": "none", "share": True}, ["preset:share"]),
    (presets.Preset("p", "o", publish=("127.0.0.1:80:80",)), {"network": "open",
     "publish": ("127.0.0.1:80:80", "127.0.0.1:81:81")}, ["preset:publish:127.0.0.1:81:81"]),
])
def test_widenings(preset: presets.Preset, booted: dict[str, Any], wider: list[str]) -> None:
    args: dict[str, Any] = {"allow": (), "resolve": (), "share": False, "publish": (), **booted}
    assert presets.widenings(preset, **args) == wider


@pytest.fixture
def booted(monkeypatch: pytest.MonkeyPatch) -> list[qemu.BootOptions]:
    """kp-boot up to lifecycle.boot: the options it would boot with."""
    from kodepipe.core import proc
    from kodepipe.vm import accel, lifecycle

    seen: list[qemu.BootOptions] = []

    def boot(store: Any, name: str, opts: qemu.BootOptions, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], bool]:
        seen.append(opts)
        return {"kind": "vm", "name": name, "state": "running"}, False

    monkeypatch.setattr(lifecycle, "boot", boot)
    monkeypatch.setattr(accel, "choose", lambda _a: ("tcg", "test"))
    monkeypatch.setattr(proc, "require", lambda _p: "/bin/true")
    return seen


@pytest.mark.parametrize(("flags", "expected"), [
    (["--preset", "agent"], {"memory": "2G", "net": "user", "widened": (), "allow_has": "pypi.org:443"}),
    (["--preset", "agent", "--memory", "3G", "--allow", "x.test"],
     {"memory": "3G", "widened": ("preset:allow:x.test",), "allow_has": "x.test"}),
    (["--preset", "agent", "--net", "user"], {"allow": (), "widened": ("preset:network:open",)}),
    (["--preset", "offline"], {"net": "none", "widened": ()}),
    (["--preset", "offline", "--allow", "x.test"], {"net": "user", "allow": ("x.test",),
     "widened": ("preset:network:allowlist", "preset:allow:x.test")}),
    (["--preset", "dev", "--net", "none"], {"net": "none", "widened": ()}),
    (["--preset", "credentials", "--publish", "8080:80"], {"net": "none", "error": "--net none"}),
])
def test_kp_boot_flags_override_a_preset_and_every_widening_is_recorded(
        booted: list[qemu.BootOptions], flags: list[str], expected: dict[str, Any]) -> None:
    result = invoke("kp-boot", *flags, "a")
    if "error" in expected:
        assert result.status == 2 and expected["error"] in result.stderr, result.stderr
        return
    assert result.status == 0, result.stderr
    (opts,) = booted
    assert opts.preset == flags[1]
    for key, value in expected.items():
        if key == "allow_has":
            assert value in opts.allow
        else:
            assert getattr(opts, key) == value, key


def test_a_preset_that_shares_nothing_records_a_share_as_a_widening(booted: list[qemu.BootOptions],
                                                                  tmp_path: Path) -> None:
    assert invoke("kp-boot", "--preset", "credentials", "--share", str(tmp_path), "a").status == 0
    assert booted[0].widened == ("preset:share",) and booted[0].share == tmp_path.resolve()


def test_an_unknown_preset_is_a_usage_error(booted: list[qemu.BootOptions]) -> None:
    result = invoke("kp-boot", "--preset", "nosuch", "a")
    assert result.status == 2 and "there is no preset nosuch" in result.stderr and not booted
