"""kp-run --emit: every emitted object valid against the Kubernetes schema (kube.K8S_VERSION, strict) or
agent-sandbox's v1beta1 schema, for each profile and the option combinations that matter; every control
that does not carry over listed; the properties each object must hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from kodepipe.container import kube
from tests import kubeschema
from tests.cli import Result, invoke

IMAGE = "registry.example/kodepipe-agent:1"
PROFILES = ["aider", "claude", "codex", "copilot", "gemini", "opencode", "shell"]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "proj"
    (ws / "sub").mkdir(parents=True)
    (ws / ".env").write_text("SECRET=1\n")
    (ws / "sub" / ".env.local").write_text("SECRET=2\n")
    (ws / "main.py").write_text("print(1)\n")
    return ws


def emit(*args: str, command: bool = True) -> tuple[Result, list[dict[str, Any]], dict[str, Any]]:
    """kp-run --emit ARGS (and -- true unless ARGS or ``command`` say otherwise): its objects and record."""
    if command and "--" not in args:
        args = (*args, "--", "true")
    result = invoke("kp-run", "--emit", *args)
    assert result.status == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    return result, lines[:-1], lines[-1]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == "Pod":
            return dict(obj["spec"])
        if obj["kind"] in ("SandboxTemplate", "Sandbox"):
            return dict(obj["spec"]["podTemplate"]["spec"])
    raise AssertionError("no pod")


COMBINATIONS: dict[str, list[str]] = {
    "defaults": [],
    "allow": ["--allow", "pypi.org", "--allow", "*.github.com:443"],
    "read-only": ["--read-only-workspace"],
    "secret": ["--secret", "{secret}:/run/secrets/token"],
    "loosened": ["--cap-add", "NET_BIND_SERVICE", "--writable-root", "--net", "open", "--time", "0",
                 "--seccomp", "runtime-default"],
    "cluster": ["--runtime-class", "gvisor", "--namespace", "agents", "--workspace-claim", "shared-ws"],
    "image-volume": ["--workspace-image", "registry.example/checkout:abc"],
    "limits": ["--memory", "2g", "--cpus", "1.5", "--pids", "256", "--time", "30m", "--tmp-size", "256m",
               "-e", "FOO=bar", "--mask", "*.pem"],
    "audit-quarantine": ["--audit", "--quarantine"],
}


@pytest.mark.parametrize("mode", kube.MODES)
@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_object_is_valid(mode: str, combination: str, workspace: Path, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("t0ken")
    extra = [a.replace("{secret}", str(secret)) for a in COMBINATIONS[combination]]
    _, objects, record = emit(mode, "--json", "--image", IMAGE, "-w", str(workspace), *extra, "--", "make", "test")
    assert objects and record["kind"] == "emit" and record["k8s_version"] == kube.K8S_VERSION
    for obj in objects:
        kubeschema.validate(obj)
    spec = pod_spec(objects)
    assert spec["hostUsers"] is False and spec["automountServiceAccountToken"] is False
    agent = spec["containers"][0]
    assert agent["securityContext"]["allowPrivilegeEscalation"] is False
    assert agent["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert agent["securityContext"]["runAsUser"] == 1000
    assert agent["securityContext"]["readOnlyRootFilesystem"] is (combination != "loosened")
    if combination == "loosened":
        assert "seccomp:runtime-default" in record["loosened"] and "writable-root" in record["loosened"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    else:
        assert spec["securityContext"]["seccompProfile"]["type"] == "Localhost"
        assert spec["securityContext"]["seccompProfile"]["localhostProfile"] == record["seccomp"]["localhost"]
    # a default-deny NetworkPolicy selects the agent's pod, whatever the mode
    deny = next(o for o in by_kind(objects, "NetworkPolicy") if o["metadata"]["name"].endswith("-deny"))
    assert deny["spec"]["ingress"] == [] and deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    labels = (objects[-1]["spec"].get("podTemplate", {}).get("metadata", {}).get("labels")
              or next(o for o in objects if o["kind"] in ("Pod", "SandboxTemplate"))["metadata"]["labels"])
    assert all(labels.get(k) == v for k, v in deny["spec"]["podSelector"]["matchLabels"].items())


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_emits_valid_objects(profile: str, workspace: Path) -> None:
    command = ["--", "bash"] if profile == "shell" else []  # the others bring their agent's own command
    _, objects, record = emit("kube", "--json", "-p", profile, "--image", IMAGE, "-w", str(workspace), *command,
                              command=False)
    for obj in objects:
        kubeschema.validate(obj)
    assert any(item["control"] == "--pids" for item in record["not_carried"])


def test_allow_hands_the_agent_to_the_egress_proxy_only(workspace: Path) -> None:
    _, objects, record = emit("kube", "--json", "--image", IMAGE, "-w", str(workspace), "--allow", "pypi.org",
                              "--name", "run-feed1234")
    deny = next(o for o in by_kind(objects, "NetworkPolicy") if o["metadata"]["name"] == "kp-run-feed1234-deny")
    assert deny["spec"]["egress"] == [{"to": [{"podSelector": {"matchLabels": {"kodepipe.io/egress-for":
                                                                                "run-feed1234"}}}],
                                       "ports": [{"protocol": "TCP", "port": kube.PROXY_PORT}]}]
    config = json.loads(by_kind(objects, "ConfigMap")[-1]["data"]["egress.json"])
    assert config["allow"] == ["pypi.org"] and config["container"] == "run-feed1234"
    deployment = by_kind(objects, "Deployment")[0]
    proxy = deployment["spec"]["template"]["spec"]["containers"][0]
    assert proxy["args"] == ["--config", "/etc/kodepipe/egress.json"]
    env = {e["name"]: e["value"] for e in pod_spec(objects)["containers"][0]["env"]}
    assert env["HTTPS_PROXY"] == "http://$(KP_RUN_FEED1234_EGRESS_SERVICE_HOST):3128"  # the Service's link
    assert pod_spec(objects)["enableServiceLinks"] is True
    service = by_kind(objects, "Service")[0]
    assert service["metadata"]["name"] == "kp-run-feed1234-egress"  # -> KP_RUN_FEED1234_EGRESS_SERVICE_HOST
    # the Service comes before the Pod: its link variables exist when the Pod starts
    kinds = [o["kind"] for o in objects]
    assert kinds.index("Service") < kinds.index("Pod")
    assert any(item["control"] == "DNS for allowed names only" for item in record["not_carried"])


def test_masks_and_secrets(workspace: Path, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("the value itself")
    result, objects, record = emit("kube", "--json", "--image", IMAGE, "-w", str(workspace), "--secret",
                                   f"{secret}:/run/secrets/token", "--mask", "*.pem", "--name", "run-0000beef")
    mounts = {m["mountPath"]: m for m in pod_spec(objects)["containers"][0]["volumeMounts"]}
    assert mounts["/workspace/.env"]["subPath"] == kube.EMPTY_KEY and mounts["/workspace/.env"]["readOnly"]
    assert mounts["/workspace/sub/.env.local"]["subPath"] == kube.EMPTY_KEY
    assert mounts["/run/secrets/token"]["readOnly"] is True
    assert b"the value itself" not in result.stdout  # a secret's value is never emitted
    assert record["secrets_to_create"] == [{"secret": "kp-run-0000beef-secret-0", "key": "token",
                                            "from": str(secret)}]


def test_not_carried_controls_are_listed_everywhere(workspace: Path) -> None:
    result = invoke("kp-run", "--emit", "kube", "--image", IMAGE, "-w", str(workspace), "--audit", "--quarantine",
                    "--mask", "*.key", "--", "true")
    assert result.status == 0, result.stderr
    text = result.stdout.decode()
    header = [line for line in text.splitlines() if line.startswith("#")]
    for control in ("--pids", "--audit", "--quarantine", "read-only git repositories"):
        assert any(control in line for line in header), control
        assert f"not carried over to the cluster: {control}" in result.stderr
    pod = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Pod")
    listed = json.loads(pod["metadata"]["annotations"]["kodepipe.io/not-carried"])
    assert "--audit" in listed and "--quarantine" in listed and "--pids" in listed


def test_agent_sandbox_claim_and_sandbox(workspace: Path) -> None:
    _, objects, _ = emit("agent-sandbox-claim", "--json", "--image", IMAGE, "-w", str(workspace), "--name",
                         "run-c1a1c1a1")
    assert [o["kind"] for o in objects][-3:] == ["SandboxTemplate", "SandboxWarmPool", "SandboxClaim"]
    template, pool, claim = objects[-3:]
    assert template["spec"]["networkPolicy"] == {"ingress": [], "egress": []}  # deny all, managed
    assert pool["spec"]["sandboxTemplateRef"]["name"] == template["metadata"]["name"]
    assert claim["spec"]["warmPoolRef"]["name"] == pool["metadata"]["name"]
    _, objects, _ = emit("agent-sandbox", "--json", "--image", IMAGE, "-w", str(workspace))
    assert [o["kind"] for o in objects][-2:] == ["SandboxTemplate", "Sandbox"]


def test_the_validator_would_notice(workspace: Path) -> None:
    """The schemas refuse what they should: a typo, a field of the wrong type, a v1alpha1 field."""
    import jsonschema
    import kubernetes_validate

    _, objects, _ = emit("agent-sandbox", "--json", "--image", IMAGE, "-w", str(workspace))
    pod_template = objects[-1]
    broken = json.loads(json.dumps(pod_template))
    broken["spec"]["replicas"] = 1  # v1alpha1 only
    with pytest.raises(jsonschema.ValidationError):
        kubeschema.validate(broken)
    broken = json.loads(json.dumps(pod_template))
    broken["spec"]["podTemplate"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubeschema.validate(broken)
    _, objects, _ = emit("kube", "--json", "--image", IMAGE, "-w", str(workspace))
    pod = next(o for o in objects if o["kind"] == "Pod")
    pod["spec"]["hostUsers"] = "false"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubeschema.validate(pod)


@pytest.mark.parametrize(("args", "message"), [
    (("--runtime-class", "gvisor"), "only matter with --emit"),
    (("--emit", "agent-sandbox", "--local"), "--local is a variant of --emit kube"),
    (("--emit", "kube", "--workspace-image", "x", "--workspace-claim", "y", "-w", "/tmp"), "give one"),
    (("--emit", "kube", "--workspace-claim", "y"), "need -w"),
    (("--emit", "kube", "--vm", "v1"), "drop --vm"),
])
def test_usage_errors(args: tuple[str, ...], message: str) -> None:
    result = invoke("kp-run", "--image", IMAGE, *args, "--", "true")
    assert result.status == 2 and message in result.stderr, result.stderr


def test_the_local_variant_says_what_it_changed(workspace: Path) -> None:
    _, objects, record = emit("kube", "--local", "--json", "--image", IMAGE, "-w", str(workspace))
    assert set(record["local"]) == set(kube.LOCAL)
    spec = pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["workspace"]["hostPath"] == {"path": str(workspace.resolve()), "type": "Directory"}
    assert volumes["mask"]["hostPath"]["type"] == "File"
    pod = next(o for o in objects if o["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["container.seccomp.security.alpha.kubernetes.io/agent"] == \
        f"localhost/{record['seccomp']['localhost']}"
    assert not by_kind(objects, "NetworkPolicy")  # podman ignores them: --network none instead
    for obj in objects:
        kubeschema.validate(obj)


def test_the_profile_as_a_file(workspace: Path, tmp_path: Path) -> None:
    target = tmp_path / "profile.json"
    _, _, record = emit("kube", "--json", "--image", IMAGE, "-w", str(workspace), "--seccomp-file", str(target))
    profile = target.read_bytes()
    assert kube.seccomp_name(profile) == record["seccomp"]["localhost"]  # named by what it holds
    rules = orjson.loads(profile)
    allowed = {name for rule in rules["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
               for name in rule["names"]}
    assert not {"unshare", "setns", "keyctl", "add_key", "request_key"} & allowed  # kodepipe's, not the runtime's
