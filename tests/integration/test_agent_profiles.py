"""Every agent profile builds from the local base and its agent starts in kp-run (its --version), with its
credentials in place: a key set on the host, the agent given a token (never the key) and, in endpoint
mode, the proxy's endpoint.  The images come from Debian, npm and PyPI, as a user's build does."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import BIN, lines
from tests.integration.test_run import one_podman_service  # noqa: F401 - the module's shared service

pytestmark = pytest.mark.integration

# the agent's program, and the host variable each of its credentials reads
AGENTS = {
    "claude": ("claude", {"ANTHROPIC_API_KEY": "sk-ant-test-host-only"}),
    "codex": ("codex", {"OPENAI_API_KEY": "sk-test-host-only"}),
    "aider": ("aider", {"ANTHROPIC_API_KEY": "sk-ant-test-host-only", "OPENAI_API_KEY": "sk-test-host-only"}),
    "gemini": ("gemini", {"GEMINI_API_KEY": "AIza-test-host-only"}),
    "copilot": ("copilot", {"COPILOT_GITHUB_TOKEN": "github_pat_test_host_only"}),
    "opencode": ("opencode", {"ANTHROPIC_API_KEY": "sk-ant-test-host-only", "OPENAI_API_KEY": "sk-test-host-only"}),
}


@pytest.mark.parametrize("name", list(AGENTS))
def test_each_agent_profile_builds_and_its_agent_starts_holding_no_key(name: str, shell_image: str,
                                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    program, keys = AGENTS[name]
    config = tmp_path_factory.mktemp("config")  # the built-in profiles and credentials, not a developer's own
    env = {**os.environ, "KODEPIPE_CONFIG_DIR": str(config), **keys}
    # the keys' common part, spelt so that the command line (which the record holds) does not hold it
    script = f"{program} --version && env | grep -c -F \"$(printf '%s-%s' host only)\" || true"
    proc = subprocess.run([str(BIN / "kp-run"), "--profile", name, "--", "sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=3600)
    [record] = [r for r in lines(proc.stdout) if r.get("kind") == "container"]
    assert record["exit_code"] == 0, proc.stderr[-4000:]
    said = proc.stderr.strip().splitlines()
    assert said[-1] == "0", proc.stderr[-3000:]  # no variable in the agent's environment holds a key
    assert any(ch.isdigit() for ch in "".join(said[:-1])), proc.stderr[-3000:]  # it printed its version
    used = [c["name"] for c in record["credentials"]]
    assert used and not record.get("credentials_missing"), record
    assert all(f"credential:{c}" in record["loosened"] for c in used)
    assert "host-only" not in json.dumps(record)
    subprocess.run([str(BIN / "kp-rm"), record["name"]], env=env, capture_output=True)
