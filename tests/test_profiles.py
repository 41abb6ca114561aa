"""kp-run profiles without Podman: loading, the user's overrides, validation, the image hash,
and ensure_image's decisions (podman is faked)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from kodepipe.commands.cli import Output
from kodepipe.container import images as containerimage
from kodepipe.container import profile
from kodepipe.core.errors import BadInput, BadName, KpError
from kodepipe.core.state import Store

BUILTINS = ["aider", "claude", "codex", "copilot", "gemini", "opencode", "shell"]
BASE_ID = "d684cd7d9028fbe4c95ef7f77e68d202401f9a59bfcd1ffed2f9414c01a33333"


def user_profile(config: Path, name: str, defaults: dict[str, Any] | str | None = None,
                 containerfile: str = "ARG BASE\nFROM ${BASE}\nRUN true\n") -> Path:
    folder = config / "profiles" / name
    folder.mkdir(parents=True)
    (folder / "Containerfile").write_text(containerfile)
    if defaults is not None:
        text = defaults if isinstance(defaults, str) else json.dumps(defaults, indent=2)
        (folder / "profile.json").write_text(text)
    return folder


# ---------------------------------------------------------------- the built-in profiles

def test_the_built_in_profiles_are_listed() -> None:
    assert profile.names() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_every_built_in_profile_loads_and_builds_from_the_local_base(name: str) -> None:
    p = profile.load(name)
    assert p.builtin and p.name == name and p.folder == profile.BUILTIN_DIR / name
    assert p.containerfile == p.folder / "Containerfile" and p.description and p.command
    assert p.repo == f"localhost/kodepipe-{name}"
    assert p.time_seconds > 0 and p.pids > 0 and p.cpus > 0
    text = p.containerfile.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("ARG BASE") and lines[1] == "FROM ${BASE}"
    # apt-get update exits 0 when it fetched nothing, unless told otherwise
    assert "apt-get update -o APT::Update::Error-Mode=any" in text
    assert "--no-install-recommends" in text and "rm -rf /var/lib/apt/lists/*" in text
    # every apt-get update is followed by its own clean-up in the same RUN
    code = "\n".join(lines)
    assert code.count("apt-get update") == code.count("rm -rf /var/lib/apt/lists/*")


def test_agent_profiles_name_what_they_need() -> None:
    claude = profile.load("claude")
    assert claude.command == ("claude",) and claude.tty
    # the keys stay on the host: the profiles declare credentials, and pass no key variable in
    assert claude.credentials == ("anthropic", "claude-oauth") and "api.anthropic.com" in claude.allow
    codex = profile.load("codex")
    assert codex.credentials == ("openai",) and "api.openai.com" in codex.allow
    aider = profile.load("aider")
    assert aider.credentials == ("anthropic", "openai") and "api.openai.com" in aider.allow
    gemini = profile.load("gemini")
    assert gemini.credentials == ("gemini",) and "generativelanguage.googleapis.com" in gemini.allow
    copilot, opencode = profile.load("copilot"), profile.load("opencode")
    assert copilot.credentials == ("github-copilot",) and "api.githubcopilot.com" in copilot.allow
    assert opencode.credentials == ("anthropic", "openai")
    keys = {"ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY",
            "COPILOT_GITHUB_TOKEN", "GH_TOKEN", "GITHUB_TOKEN"}
    for agent in (claude, codex, aider, gemini, copilot, opencode):
        assert not keys & set(agent.env), agent.name
    # the agent's own permissions come as data in the image: no git push, no rm -rf
    managed = json.loads((claude.folder / "managed-settings.json").read_text())["permissions"]["deny"]
    assert {"Bash(git push:*)", "Bash(rm -rf:*)", "Read(~/.ssh/**)", "Read(./.env)"} <= set(managed)
    assert "COPY managed-settings.json /etc/claude-code/managed-settings.json" in claude.containerfile.read_text()
    excluded = json.loads((gemini.folder / "system-defaults.json").read_text())["tools"]["exclude"]
    assert "run_shell_command(git push)" in excluded
    bash = json.loads((opencode.folder / "opencode.json").read_text())["permission"]["bash"]
    assert bash["git push*"] == bash["rm -rf*"] == "deny"
    assert "shell(git push)" in copilot.command
    shell = profile.load("shell")
    assert shell.command == ("bash",) and shell.allow == () and shell.env == ()
    assert shell.defaults()["memory"] == "2g"


# ---------------------------------------------------------------- the user's profiles

def test_a_user_profile_is_added_and_needs_no_profile_json(kp_env: dict[str, Path]) -> None:
    user_profile(kp_env["config"], "mine")
    assert profile.names() == sorted([*BUILTINS, "mine"])
    p = profile.load("mine")
    assert not p.builtin and p.folder == kp_env["config"] / "profiles" / "mine"
    assert p.defaults() == profile.DEFAULTS


def test_a_user_profile_replaces_the_built_in_one_of_the_same_name(kp_env: dict[str, Path]) -> None:
    folder = user_profile(kp_env["config"], "shell", {"memory": "512m", "command": ["sh", "-l"]})
    p = profile.load("shell")
    assert not p.builtin and p.folder == folder and p.containerfile == folder / "Containerfile"
    assert p.memory == "512m" and p.command == ("sh", "-l")
    assert p.cpus == profile.DEFAULTS["cpus"]  # no merging with the built-in profile.json
    assert profile.names().count("shell") == 1


def test_folders_with_names_that_are_not_profile_names_are_not_listed(kp_env: dict[str, Path]) -> None:
    user_profile(kp_env["config"], "Bad_Name")
    user_profile(kp_env["config"], ".hidden")
    (kp_env["config"] / "profiles" / "README").write_text("a file, not a profile")
    assert profile.names() == BUILTINS


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("name", ["../shell", "Shell", "-rf", "a/b", "", "x" * 64, "shell\n", "ünï"])
def test_hostile_profile_names_are_refused(name: str) -> None:
    with pytest.raises(BadName, match="profile name"):
        profile.load(name)


def test_an_unknown_profile_lists_the_known_ones(kp_env: dict[str, Path]) -> None:
    user_profile(kp_env["config"], "mine")
    with pytest.raises(BadInput) as info:
        profile.load("nosuch")
    assert info.value.code == "unknown_profile"
    assert "claude, codex, copilot, gemini, mine, opencode, shell" in info.value.message
    assert str(kp_env["config"] / "profiles" / "nosuch") in info.value.message


def test_a_profile_without_a_containerfile_is_refused(kp_env: dict[str, Path]) -> None:
    folder = user_profile(kp_env["config"], "empty")
    (folder / "Containerfile").unlink()
    with pytest.raises(BadInput, match=r"empty: .*Containerfile is missing"):
        profile.load("empty")


def test_bad_json_names_the_file_and_the_line(kp_env: dict[str, Path]) -> None:
    folder = user_profile(kp_env["config"], "broken", '{\n  "memory": "2g",\n  "cpus": 2,,\n}\n')
    with pytest.raises(BadInput) as info:
        profile.load("broken")
    assert str(folder / "profile.json") in info.value.message and "line 3" in info.value.message
    assert info.value.code == "bad_profile"


@pytest.mark.parametrize(("defaults", "complaint"), [
    ([], "expected a JSON object"),
    ({"memroy": "2g"}, "unknown key 'memroy'"),
    ({"command": []}, "'command' must be a non-empty list"),
    ({"command": "bash"}, "'command' must be a non-empty list"),
    ({"command": ["bash", ""]}, "'command' must be a non-empty list"),
    ({"memory": "lots"}, "'memory' must be a size"),
    ({"memory": 2048}, "'memory' must be a size"),
    ({"cpus": 0}, "'cpus' must be a positive number"),
    ({"cpus": True}, "'cpus' must be a positive number"),
    ({"pids": 1.5}, "'pids' must be a positive whole number"),
    ({"pids": -1}, "'pids' must be a positive whole number"),
    ({"time": "forever"}, "'time' must be a duration"),
    ({"time": "0s"}, "'time' must be a positive duration"),
    ({"time": 7200}, "'time' must be a duration"),
    ({"allow": "api.example.com"}, "'allow' must be a list of lower-case domain names"),
    ({"allow": ["https://api.example.com"]}, "'allow' must be a list"),
    ({"allow": ["localhost"]}, "'allow' must be a list"),
    ({"env": ["API KEY"]}, "'env' must be a list of environment variable names"),
    ({"env": ["X=1"]}, "'env' must be a list"),
    ({"tty": "yes"}, "'tty' must be true or false"),
    ({"description": 3}, "'description' must be a string"),
])
def test_bad_defaults_are_refused_naming_the_file(kp_env: dict[str, Path], defaults: Any, complaint: str) -> None:
    folder = user_profile(kp_env["config"], "bad", json.dumps(defaults))
    with pytest.raises(BadInput) as info:
        profile.load("bad")
    assert complaint in info.value.message and str(folder / "profile.json") in info.value.message


def test_good_defaults_of_every_kind_are_taken(kp_env: dict[str, Path]) -> None:
    user_profile(kp_env["config"], "full", {
        "description": "d", "command": ["agent", "--yes"], "memory": "4G", "cpus": 0.5, "pids": 100,
        "time": "1h30m", "allow": ["api.example.com", "*.example.org"], "env": ["API_KEY", "_X"],
        "tty": True, "notes": "n"})
    p = profile.load("full")
    assert (p.command, p.memory, p.cpus, p.pids, p.time, p.time_seconds) == \
        (("agent", "--yes"), "4G", 0.5, 100, "1h30m", 5400.0)
    assert p.allow == ("api.example.com", "*.example.org") and p.env == ("API_KEY", "_X") and p.tty


# ---------------------------------------------------------------- the image hash

def test_the_tag_changes_with_the_containerfile_other_files_and_the_base(kp_env: dict[str, Path]) -> None:
    folder = user_profile(kp_env["config"], "mine")
    first = profile.load("mine").tag(BASE_ID)
    assert first.startswith("localhost/kodepipe-mine:") and len(first.split(":")[1]) == 12
    assert profile.load("mine").tag(BASE_ID) == first  # stable
    assert profile.load("mine").tag("0" * 64) != first  # a rebuilt base

    (folder / "Containerfile").write_text("ARG BASE\nFROM ${BASE}\nRUN false\n")
    second = profile.load("mine").tag(BASE_ID)
    assert second != first

    (folder / "files").mkdir()
    (folder / "files" / "setup.sh").write_text("echo hi\n")
    third = profile.load("mine").tag(BASE_ID)
    assert third != second
    (folder / "files" / "setup.sh").chmod(0o755)  # the executable bit is copied into the image
    fourth = profile.load("mine").tag(BASE_ID)
    assert fourth != third

    (folder / "profile.json").write_text('{"memory": "1g"}')  # it is in the folder: part of the hash
    fifth = profile.load("mine").tag(BASE_ID)
    assert fifth != fourth

    # editor droppings do not cause a rebuild
    (folder / "Containerfile~").write_text("old")
    (folder / ".Containerfile.swp").write_text("swap")
    assert profile.load("mine").tag(BASE_ID) == fifth


def test_renaming_a_file_changes_the_hash(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    before = profile.digest(tmp_path)
    (tmp_path / "a").rename(tmp_path / "b")
    assert profile.digest(tmp_path) != before


def test_a_symlink_is_hashed_by_its_target_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("secret")
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "link").symlink_to(outside)
    before = profile.digest(folder)
    outside.write_text("changed")
    assert profile.digest(folder) == before


# ---------------------------------------------------------------- ensure_image (podman faked)

class FakePodman:
    """The images in a pretend store, and what was built."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, images: set[str]) -> None:
        self.images = set(images)
        self.built: list[dict[str, Any]] = []
        self.removed: list[str] = []
        monkeypatch.setattr(containerimage, "ensure_base", self.ensure_base)
        monkeypatch.setattr(containerimage, "exists", lambda tag: tag in self.images)
        monkeypatch.setattr(containerimage, "build", self.build)
        monkeypatch.setattr(containerimage, "remove_older", self.remove_older)

    def ensure_base(self, suite: str | None = None, mirror: str | None = None, *, rebuild: bool = False,
                    progress: Any = None) -> dict[str, Any]:
        self.images.add("localhost/kodepipe-base:bookworm")
        return {"kind": "container-image", "name": "localhost/kodepipe-base:bookworm", "image_id": BASE_ID}

    def build(self, containerfile: Path, context: Path, tag: str, **kwargs: Any) -> dict[str, Any]:
        self.built.append({"containerfile": containerfile, "context": context, "tag": tag, **kwargs})
        self.images.add(tag)
        return {"kind": "container-image", "name": tag, "size": 263_000_000}

    def remove_older(self, repo: str, keep: str) -> list[str]:
        old = sorted(t for t in self.images if t.startswith(repo + ":") and t != keep)
        self.images -= set(old)
        self.removed += old
        return old


def test_ensure_image_builds_a_missing_image_once(monkeypatch: pytest.MonkeyPatch, kp_env: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakePodman(monkeypatch, {"localhost/kodepipe-shell:0123456789ab"})
    p = profile.load("shell")
    out = Output("kp-run", verbose=True)
    tag = profile.ensure_image(p, out)
    assert tag == p.tag(BASE_ID) and tag in fake.images
    (build,) = fake.built
    assert build["containerfile"] == p.containerfile and build["context"] == p.folder
    assert build["build_args"] == {"BASE": "localhost/kodepipe-base:bookworm"}
    assert build["labels"]["io.kodepipe.profile"] == "shell" and build["labels"]["io.kodepipe.kind"] == "profile"
    assert build["echo"] is True
    assert build["log"] == kp_env["cache"] / "logs" / "profile-shell.log"
    assert fake.removed == ["localhost/kodepipe-shell:0123456789ab"]  # the outdated build
    err = capsys.readouterr().err
    assert f"building the shell profile's image {tag}" in err and "263 MB" in err

    assert profile.ensure_image(p, out) == tag
    assert len(fake.built) == 1  # the second call found it


def test_build_output_goes_to_the_log_when_nobody_watches(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakePodman(monkeypatch, set())
    profile.ensure_image(profile.load("shell"), Output("kp-run", verbose=False))
    assert fake.built[0]["echo"] is False
    assert capsys.readouterr().err == ""


def test_a_second_builder_waits_for_the_first_and_uses_its_image(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePodman(monkeypatch, set())
    p = profile.load("shell")
    tag = p.tag(BASE_ID)
    said: list[str] = []
    waiting = threading.Event()
    out = Output("kp-run", verbose=True)

    def progress(message: str) -> None:
        said.append(message)
        if "waiting for another kodepipe command" in message:
            waiting.set()

    monkeypatch.setattr(out, "progress", progress)
    finished: list[bool] = []

    def other_builder() -> None:
        with Store().lock("profile.shell"):
            holding.set()
            finished.append(waiting.wait(60))  # it holds the lock until the second builder waits for it
            fake.images.add(tag)  # it finished its build

    holding = threading.Event()
    thread = threading.Thread(target=other_builder)
    thread.start()
    assert holding.wait(60)
    assert profile.ensure_image(p, out) == tag
    thread.join()
    assert finished == [True]
    assert fake.built == []
    assert any("waiting for another kodepipe command" in s for s in said)


def test_a_failed_build_is_an_error_with_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePodman(monkeypatch, set())

    def fail(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise KpError("building it failed:\nE: Unable to locate package nosuch", code="image_build_failed")

    monkeypatch.setattr(containerimage, "build", fail)
    with pytest.raises(KpError, match="nosuch"):
        profile.ensure_image(profile.load("shell"), Output("kp-run"))
    assert fake.removed == []
