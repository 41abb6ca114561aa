"""render() is the one place a Policy becomes a container, and it reads nothing but its arguments."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from kodepipe.container import policy as pol
from kodepipe.container import render
from tests import policies

ROOT = Path(__file__).resolve().parent.parent


def test_no_sandbox_is_built_outside_render() -> None:
    """Every Sandbox(...) call in the code, the benchmarks and the tests is render.py's."""
    found = []
    for folder in ("kodepipe", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) \
                        else None
                    if name == "Sandbox":
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found and all(f.startswith("kodepipe/container/render.py:") for f in found), found


def test_term_is_the_policys_not_the_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "environ", {"TERM": "from-the-environment"})
    box = policies.sandbox(tty=True, term="vt220")
    assert box.spec()["env"]["TERM"] == "vt220" and box.spec()["terminal"] is True
    assert "TERM" not in policies.sandbox().spec()["env"]  # no terminal, no TERM


def test_render_takes_each_part_from_where_it_belongs() -> None:
    policy = policies.policy(image="img:1", command=["make"], workspace="/given", read_only_workspace=True,
                             allow=["a.test"], env={"K": "v"},
                             limits=pol.Limits(memory=1 << 30, cpus=1.0, pids=64, seconds=30, tmpfs=1 << 28))
    facts = render.Facts(agent_uid=1234, agent_gid=1235, uid_from="sudo", workspace="/real/merged",
                         seccomp="/s.json", oci_runtime="crun", masked=(".env",), protect=(".git",),
                         protect_sources={".git": "/binds/0"})
    box = render.render(policy, facts, render.Staged(name="run-x", run_id="abc", mask_file="/f/empty",
                                                     extra_env={"HTTP_PROXY": "http://127.0.0.1:3128"}))
    spec = box.spec()
    assert spec["image"] == "img:1" and spec["command"] == ["make"] and spec["timeout"] == 90
    assert spec["oci_runtime"] == "crun" and spec["seccomp_profile_path"] == "/s.json"
    assert spec["labels"] == {"io.kodepipe.name": "run-x", "io.kodepipe.id": "abc"}
    binds = {m["destination"]: (m["source"], m["options"][1]) for m in spec["mounts"] if m["type"] == "bind"}
    assert binds == {"/workspace": ("/real/merged", "ro"), "/workspace/.env": ("/f/empty", "ro"),
                     "/workspace/.git": ("/binds/0", "ro")}
    assert spec["env"]["K"] == "v" and spec["env"]["HTTP_PROXY"] == "http://127.0.0.1:3128"
    assert box.allow == ["a.test"]
    with pytest.raises(ValueError, match="not built"):
        render.render(policies.policy(image=None), facts, render.Staged(name="r", run_id="i"))
