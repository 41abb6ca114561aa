"""A resolved Policy as Kubernetes objects: kp-run --emit kube | agent-sandbox | agent-sandbox-claim.

Pure: a Policy and the emit options in, objects (dicts, in the order to apply them) and the list of
what does not carry over out.  The cluster is one more backend of the same Policy, except that it is
handed the policy instead of running it, so a part it cannot honour is never refused here: it is
listed (``not_carried``), in the YAML's header, in the Pod's annotation and in the emit record, and
never dropped silently.

What carries over (checked against the Kubernetes schema of ``K8S_VERSION`` in the tests):

- the agent's Pod: ``hostUsers: false`` (a user namespace), uid/gid 1000, runAsNonRoot, all
  capabilities dropped (or those of --cap-add), allowPrivilegeEscalation false (no-new-privileges),
  a read-only root filesystem (unless --writable-root), kodepipe's seccomp profile as a Localhost
  profile (its JSON in a ConfigMap, to install on the nodes) or RuntimeDefault, no service-account
  token, no service links, CPU and memory limits, activeDeadlineSeconds from --time, /tmp and HOME
  as memory-backed emptyDirs of --tmp-size;
- the workspace as a volume: a PersistentVolumeClaim (emitted, or one the operator already has) or an
  image volume (--workspace-image), read-only with --read-only-workspace;
- masks as an empty file (a ConfigMap key) mounted with subPath over each masked path;
- --secret files as Secret volumes (the Secret itself is never emitted: the file stays here; the
  record says how to create it);
- -e values in a Secret of their own, not in the Pod spec;
- a default-deny NetworkPolicy for the agent; with --allow, its only way out is an egress-proxy
  Deployment running kodepipe's own proxy with the same allowlist (a ConfigMap), its decisions on
  stdout, because a NetworkPolicy cannot name domains.

``local``: the variant ``podman kube play`` of Podman 4.3 runs (kube_local below says what differs).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from kodepipe.container.policy import AGENT_UID, WORKSPACE, Policy

K8S_VERSION = "1.35"  # the schema the objects are checked against (tests/test_kube.py)
SANDBOX_GROUP = "agents.x-k8s.io/v1beta1"
SANDBOX_EXT_GROUP = "extensions.agents.x-k8s.io/v1beta1"
PROXY_PORT = 3128
HOME = "/tmp/home"
MODES = ("kube", "agent-sandbox", "agent-sandbox-claim")
SECCOMP_DIR = "kodepipe"  # under the kubelet's seccomp root (/var/lib/kubelet/seccomp)
EMPTY_KEY = "empty"

Obj = dict[str, Any]


@dataclass(frozen=True)
class EmitOptions:
    mode: str = "kube"
    namespace: str | None = None
    runtime_class: str | None = None
    workspace_claim: str | None = None  # an existing PVC; None: one is emitted
    workspace_size: str = "10Gi"
    workspace_image: str | None = None  # an image volume instead of a PVC
    seccomp: str = "kodepipe"  # or "runtime-default" (a loosening)
    seccomp_profile: bytes = b""  # kodepipe's profile (seccomp.render), for the ConfigMap
    proxy_image: str = "localhost/kodepipe-egress:latest"
    masked: tuple[str, ...] = ()  # workspace-relative paths the masks hide, where they could be resolved
    unresolved_masks: tuple[str, ...] = ()  # globs with no workspace here to resolve them in
    local: bool = False  # the podman kube play variant (see LOCAL)
    workspace_path: str | None = None  # local: the workspace on this host (a hostPath)
    empty_file: str | None = None  # local: an empty, read-only file on this host, bound over each mask


# What the local variant (kp-run --emit kube --local, for podman kube play 4.3) changes, and why: each
# is said in the emit record ("local") so that a test never passes on a field it did not check.
LOCAL = {
    "workspace": "a hostPath of the workspace instead of a PVC (podman has no claims to bind)",
    "masks": "a hostPath of an empty file instead of a ConfigMap key with subPath (podman 4.3 ignores subPath)",
    "secrets": "a hostPath of each --secret file instead of a Secret volume (podman 4.3 mounts a Secret's "
               "data still base64-encoded, writable)",
    "seccomp": "also the container.seccomp.security.alpha.kubernetes.io annotation (podman 4.3 ignores "
               "seccompProfile), naming the profile's file alone (podman 4.3 reads one path component after "
               "localhost/): the file goes straight in podman kube play's --seccomp-profile-root",
    "network": "no NetworkPolicy (podman ignores it): play with --network none",
    "pids": "no field exists: the pod's pids cgroup is set before it starts (podman kube play --start=false)",
    "activeDeadlineSeconds": "ignored by podman 4.3: the caller's own timeout ends the pod",
    "tmp": "/tmp and HOME are disk-backed emptyDirs without a size limit (podman 4.3 ignores medium and "
           "sizeLimit), named after the run: podman 4.3 makes an emptyDir a named volume of the volume's name, "
           "which every pod with that name would share",
    "runAsNonRoot": "ignored by podman 4.3; runAsUser 1000 holds it",
    "annotations": "no kodepipe.io/loosened and kodepipe.io/not-carried on the Pod (podman 4.3 refuses an annotation "
                   "value longer than 63 characters); the YAML's header and the emit record list both",
}


@dataclass
class Emitted:
    objects: list[Obj]
    not_carried: list[Obj]  # {"control", "why", "instead"}
    loosened: list[str]
    secrets_to_create: list[Obj] = field(default_factory=list)  # {"secret", "key", "from"}
    seccomp: Obj | None = None  # {"localhost": path, "configmap": name}
    local: dict[str, str] | None = None  # the local variant: what it changed (LOCAL)

    def record(self, name: str) -> Obj:
        out: Obj = {"kind": "emit", "name": name, "objects": [f"{o['kind']}/{o['metadata']['name']}"
                                                            for o in self.objects],
                    "not_carried": self.not_carried, "loosened": self.loosened, "k8s_version": K8S_VERSION}
        if self.secrets_to_create:
            out["secrets_to_create"] = self.secrets_to_create
        if self.seccomp is not None:
            out["seccomp"] = self.seccomp
        if self.local is not None:
            out["local"] = self.local
        return out


def _meta(name: str, options: EmitOptions, labels: dict[str, str] | None = None,
          annotations: dict[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name}
    if options.namespace:
        meta["namespace"] = options.namespace
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    return meta


def quantity(n: int) -> str:
    """Bytes as a Kubernetes quantity: the largest binary unit that divides them."""
    for unit, shift in (("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


# Every control of a policy that the objects cannot hold: why, and what to do instead (None: nothing).
NOT_CARRIED: dict[str, tuple[str, str | None]] = {
    "--pids": ("a pod's pids limit is the kubelet's podPidsLimit, one value for every pod of a node",
               "set podPidsLimit in the nodes' kubelet configuration"),
    "kernel quotas": ("the per-user inotify, signal and message-queue shares are set by kp-run on its own host",
                      "the runtime class's own limits"),
    "/etc/hosts": ("the kubelet writes a pod's /etc/hosts (its own address included)", None),
    "the seccomp profile's installation": (
        "a Localhost profile must be on every node before the pod starts (the kubelet refuses it otherwise)",
        "install the profile from its ConfigMap (kodepipe-fleet(7))"),
    "no-new-namespaces and keyring rules of the seccomp profile": (
        "RuntimeDefault (--seccomp runtime-default) is the runtime's profile, which allows unshare and the keyring",
        "a runtime class whose kernel is not the node's (gVisor, Kata)"),
    "read-only git repositories": ("the workspace's repositories are found on the host at run time; the volume's "
                                   "contents are not known here",
                                   "give the agent a clone it may write, or review its commits"),
    "--quarantine": ("the review and kp-run --apply need the overlay's upper dir on this host",
                     "an image or PVC snapshot per run, reviewed before merging"),
    "glob masks": ("a glob is matched against the workspace's files, and there is none here to match",
                   "mask exact paths (--mask PATH), or emit from a checkout (-w DIR)"),
    "--audit": ("strace from outside the container needs the node's ptrace of the agent, which gVisor and Kata do "
                "not give and a cluster does not grant", "the runtime's own audit (gVisor's strace option)"),
    "--resolve": ("pins are answered by kp-run's own DNS; the proxy Deployment resolves through the cluster's DNS",
                  "a hostAliases entry in the proxy's pod"),
    "--credential": ("the real key would have to be given to the proxy Deployment as a Secret; kp-run does not "
                     "emit keys", None),
    "--budget": ("budgets are counted by kp-run's proxy for one run", None),
    "--keep": ("restartPolicy Never keeps the pod until it is deleted", None),
    "DNS for allowed names only": ("the agent's pod gets no resolver at all (the proxy resolves names for it); "
                                   "tools that resolve before they connect fail",
                                   "use the HTTPS_PROXY the pod's environment names"),
}


def not_carried(policy: Policy, options: EmitOptions) -> list[Obj]:
    """The parts of NOT_CARRIED this policy uses."""
    used = ["--pids", "kernel quotas", "/etc/hosts",
            "the seccomp profile's installation" if options.seccomp == "kodepipe"
            else "no-new-namespaces and keyring rules of the seccomp profile"]
    conditions = [
        ("read-only git repositories", policy.workspace is not None and not policy.git_writable),
        ("--quarantine", policy.quarantine),
        ("glob masks", bool(options.unresolved_masks)),
        ("--audit", policy.audit is not None),
        ("--resolve", policy.egress is not None and bool(policy.egress.pins)),
        ("--credential", bool(policy.credentials)),
        ("--budget", bool(policy.budgets)),
        ("--keep", policy.keep),
        ("DNS for allowed names only", policy.egress is not None),
    ]
    used += [control for control, applies in conditions if applies]
    out = []
    for control in used:
        why, instead = NOT_CARRIED[control]
        if control == "--pids":
            why += f" (this run's: {policy.limits.pids})"
        if control == "glob masks":
            control = f"masks {', '.join(options.unresolved_masks)}"
        out.append({"control": control, "why": why, "instead": instead})
    return out


def _security_context(policy: Policy) -> Obj:
    caps: Obj = {"drop": ["ALL"]}
    if policy.cap_add:
        caps["add"] = list(policy.cap_add)
    return {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": not policy.writable_root,
            "runAsNonRoot": True, "runAsUser": AGENT_UID, "runAsGroup": AGENT_UID, "capabilities": caps}


def seccomp_name(profile: bytes, local: bool = False) -> str:
    """The profile's path under the seccomp root.  The local variant's is the file name alone: podman 4.3
    looks a localhost/ annotation up as <--seccomp-profile-root>/<its first path component> only."""
    base = f"{hashlib.sha256(profile).hexdigest()[:16]}.json"
    return base if local else f"{SECCOMP_DIR}/{base}"


def render(policy: Policy, name: str, options: EmitOptions) -> Emitted:
    """The objects of ``policy`` for the run ``name``, in the order to apply them."""
    if options.mode not in MODES:
        raise ValueError(f"emit mode {options.mode!r}")
    if policy.image is None:
        raise ValueError("render: the policy's image is not known")
    labels = {"app.kubernetes.io/name": "kodepipe-agent", "kodepipe.io/run": name}
    objects: list[Obj] = []
    loosened = list(policy.loosened())
    secrets_to_create: list[Obj] = []
    volumes: list[Obj] = [  # both count against the memory limit, as kp-run's tmpfs mounts do
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": quantity(policy.limits.tmpfs)}},
        {"name": "home", "emptyDir": {"medium": "Memory", "sizeLimit": quantity(policy.limits.tmpfs)}},
    ]
    mounts: list[Obj] = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": HOME}]
    env: list[Obj] = [{"name": "HOME", "value": HOME}]
    seccomp_info: Obj | None = None
    if options.seccomp == "kodepipe":
        profile_name = seccomp_name(options.seccomp_profile, options.local)
        cm_name = f"kp-seccomp-{posixpath.basename(profile_name)[:16]}"
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": _meta(cm_name, options, {"app.kubernetes.io/name": "kodepipe-seccomp"}),
                        "data": {"profile.json": options.seccomp_profile.decode()}})
        pod_seccomp: Obj = {"type": "Localhost", "localhostProfile": profile_name}
        seccomp_info = {"localhost": profile_name, "configmap": cm_name}
    else:
        pod_seccomp = {"type": "RuntimeDefault"}
        loosened.append("seccomp:runtime-default")
    if policy.env:
        env_secret = f"kp-{name}-env"
        objects.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": _meta(env_secret, options, labels), "stringData": dict(policy.env)})
    if policy.workspace is not None:
        volume: Obj = {"name": "workspace"}
        if options.local:
            if options.workspace_path is None:
                raise ValueError("render: the local variant needs the workspace's path")
            volume["hostPath"] = {"path": options.workspace_path, "type": "Directory"}
        elif options.workspace_image:
            volume["image"] = {"reference": options.workspace_image, "pullPolicy": "IfNotPresent"}
        else:
            claim = options.workspace_claim or f"kp-{name}-workspace"
            volume["persistentVolumeClaim"] = {"claimName": claim, "readOnly": policy.read_only_workspace}
            if options.workspace_claim is None and not options.local:
                objects.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                "metadata": _meta(claim, options, labels),
                                "spec": {"accessModes": ["ReadWriteOnce"],
                                         "resources": {"requests": {"storage": options.workspace_size}}}})
        volumes.append(volume)
        mounts.append({"name": "workspace", "mountPath": WORKSPACE,
                       "readOnly": policy.read_only_workspace or options.workspace_image is not None})
        if options.masked and options.local:
            if options.empty_file is None:
                raise ValueError("render: the local variant needs an empty file for the masks")
            volumes.append({"name": "mask", "hostPath": {"path": options.empty_file, "type": "File"}})
            mounts.extend({"name": "mask", "mountPath": posixpath.join(WORKSPACE, rel), "readOnly": True}
                          for rel in options.masked)
        elif options.masked:
            empty = f"kp-{name}-empty"
            objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(empty, options, labels),
                            "data": {EMPTY_KEY: ""}})
            volumes.append({"name": "mask", "configMap": {"name": empty, "defaultMode": 0o444}})
            mounts.extend({"name": "mask", "mountPath": posixpath.join(WORKSPACE, rel), "subPath": EMPTY_KEY,
                           "readOnly": True} for rel in options.masked)
    for number, secret in enumerate(policy.secrets):
        secret_name = f"kp-{name}-secret-{number}"
        key = posixpath.basename(secret.dest)
        if options.local:
            volumes.append({"name": f"secret-{number}", "hostPath": {"path": secret.source, "type": "File"}})
            mounts.append({"name": f"secret-{number}", "mountPath": secret.dest, "readOnly": True})
            continue
        volumes.append({"name": f"secret-{number}", "secret": {"secretName": secret_name, "defaultMode": 0o400}})
        mounts.append({"name": f"secret-{number}", "mountPath": secret.dest, "subPath": key, "readOnly": True})
        secrets_to_create.append({"secret": secret_name, "key": key, "from": secret.origin})
    if policy.egress is not None:
        proxy = f"kp-{name}-egress"
        env.extend({"name": var, "value": f"http://$(KP_{name.upper().replace('-', '_')}_EGRESS_SERVICE_HOST)"
                                         f":{PROXY_PORT}"}
                   for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))
        env.append({"name": "NO_PROXY", "value": "localhost,127.0.0.1"})
        objects.extend(_proxy_objects(policy.egress.rules, policy.egress.pins, name, proxy, options))
    container: Obj = {
        "name": "agent", "image": policy.image, "command": list(policy.command), "workingDir": WORKSPACE
        if policy.workspace is not None else "/", "env": env,
        "resources": {"limits": {"cpu": _cpus(policy.limits.cpus), "memory": quantity(policy.limits.memory)},
                      "requests": {"cpu": _cpus(policy.limits.cpus), "memory": quantity(policy.limits.memory)}},
        "securityContext": _security_context(policy), "volumeMounts": mounts,
    }
    if policy.env:
        container["envFrom"] = [{"secretRef": {"name": f"kp-{name}-env"}}]
    if policy.interactive or policy.tty:
        container.update(stdin=True, tty=policy.tty)
    carried_not = not_carried(policy, options)
    pod_spec: Obj = {
        "hostUsers": False, "automountServiceAccountToken": False, "enableServiceLinks": policy.egress is not None,
        "restartPolicy": "Never", "hostname": name,
        "securityContext": {"runAsNonRoot": True, "runAsUser": AGENT_UID, "runAsGroup": AGENT_UID,
                            "fsGroup": AGENT_UID, "seccompProfile": pod_seccomp},
        "dnsPolicy": "None", "dnsConfig": {"nameservers": ["127.0.0.1"]},
        "containers": [container], "volumes": volumes,
    }
    if policy.limits.seconds:
        pod_spec["activeDeadlineSeconds"] = int(policy.limits.seconds)
    if options.runtime_class:
        pod_spec["runtimeClassName"] = options.runtime_class
    annotations = {"kodepipe.io/loosened": json.dumps(loosened),
                   "kodepipe.io/not-carried": json.dumps([n["control"] for n in carried_not])}
    if options.local and seccomp_info is not None:
        annotations["container.seccomp.security.alpha.kubernetes.io/agent"] = f"localhost/{seccomp_info['localhost']}"
    if options.local:  # what podman kube play 4.3 has no use for, mounts wrongly or refuses
        volumes[0:2] = [{"name": f"kp-{name}-tmp", "emptyDir": {}}, {"name": f"kp-{name}-home", "emptyDir": {}}]
        mounts[0:2] = [{"name": f"kp-{name}-tmp", "mountPath": "/tmp"}, {"name": f"kp-{name}-home", "mountPath": HOME}]
        annotations = {k: v for k, v in annotations.items() if not k.startswith("kodepipe.io/")}
        objects = [o for o in objects
                   if o["kind"] != "ConfigMap" or not o["metadata"]["name"].startswith("kp-seccomp-")]
    else:
        objects.append(_deny_all(name, options, labels, policy.egress is not None))
    if options.mode == "kube":
        objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": _meta(f"kp-{name}", options, labels,
                                                                             annotations), "spec": pod_spec})
    else:
        objects.extend(_sandbox_objects(name, options, labels, annotations, pod_spec, policy.egress is not None))
    return Emitted(objects, carried_not, loosened, secrets_to_create, seccomp_info,
                   dict(LOCAL) if options.local else None)


def _cpus(cpus: float) -> str:
    return f"{round(cpus * 1000)}m"


def _deny_all(name: str, options: EmitOptions, labels: dict[str, str], proxy: bool) -> Obj:
    """The agent's NetworkPolicy: nothing in, nothing out; with --allow, out to its proxy's port only."""
    egress: list[Obj] = []
    if proxy:
        egress.append({"to": [{"podSelector": {"matchLabels": {"kodepipe.io/egress-for": name}}}],
                       "ports": [{"protocol": "TCP", "port": PROXY_PORT}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(f"kp-{name}-deny", options, labels),
            "spec": {"podSelector": {"matchLabels": {"kodepipe.io/run": name}}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [], "egress": egress}}


def _proxy_objects(rules: tuple[str, ...], pins: tuple[str, ...], name: str, proxy: str,
                   options: EmitOptions) -> list[Obj]:
    """The egress proxy: its allowlist (a ConfigMap), a Deployment of kodepipe's proxy image, the
    Service the agent reaches it by, and its own NetworkPolicy (in: the agent only; out: the web, DNS)."""
    labels = {"app.kubernetes.io/name": "kodepipe-egress", "kodepipe.io/egress-for": name}
    config = {"allow": list(rules), "resolve": list(pins), "container": name,
              "listen": f"0.0.0.0:{PROXY_PORT}"}
    ports = sorted({int(p) for rule in rules for p in _rule_ports(rule)})
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(proxy, options, labels),
         "data": {"egress.json": json.dumps(config, indent=2)}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(proxy, options, labels),
         "spec": {"selector": {"kodepipe.io/egress-for": name},
                  "ports": [{"name": "proxy", "protocol": "TCP", "port": PROXY_PORT, "targetPort": PROXY_PORT}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(proxy, options, labels),
         "spec": {"replicas": 1, "selector": {"matchLabels": {"kodepipe.io/egress-for": name}},
                  "template": {"metadata": {"labels": labels},
                               "spec": {"automountServiceAccountToken": False, "enableServiceLinks": False,
                                        "hostUsers": False,
                                        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                                            "runAsGroup": 65534,
                                                            "seccompProfile": {"type": "RuntimeDefault"}},
                                        "containers": [{
                                            "name": "proxy", "image": options.proxy_image,
                                            "args": ["--config", "/etc/kodepipe/egress.json"],
                                            "ports": [{"containerPort": PROXY_PORT, "protocol": "TCP"}],
                                            "securityContext": {"allowPrivilegeEscalation": False,
                                                                "readOnlyRootFilesystem": True,
                                                                "capabilities": {"drop": ["ALL"]}},
                                            "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
                                            "volumeMounts": [{"name": "config", "mountPath": "/etc/kodepipe",
                                                              "readOnly": True}]}],
                                        "volumes": [{"name": "config", "configMap": {"name": proxy}}]}}}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": _meta(f"{proxy}-policy", options, labels),
         "spec": {"podSelector": {"matchLabels": {"kodepipe.io/egress-for": name}},
                  "policyTypes": ["Ingress", "Egress"],
                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"kodepipe.io/run": name}}}],
                               "ports": [{"protocol": "TCP", "port": PROXY_PORT}]}],
                  "egress": [{"ports": [{"protocol": "TCP", "port": p} for p in ports]},
                             {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}},
    ]


def _rule_ports(rule: str) -> list[str]:
    _, sep, ports = rule.rpartition(":")
    if sep and ports and all(p.isdigit() for p in ports.split(",")):
        return ports.split(",")
    return ["80", "443"]


def _sandbox_objects(name: str, options: EmitOptions, labels: dict[str, str], annotations: dict[str, str],
                     pod_spec: Obj, proxy: bool) -> list[Obj]:
    """agent-sandbox (v1beta1): a SandboxTemplate whose managed NetworkPolicy allows only the proxy (or
    nothing), and a Sandbox, or a SandboxWarmPool (no pods kept warm) and a SandboxClaim of it."""
    template_name = f"kp-{name}"
    egress: list[Obj] = []
    if proxy:
        egress.append({"to": [{"podSelector": {"matchLabels": {"kodepipe.io/egress-for": name}}}],
                       "ports": [{"protocol": "TCP", "port": PROXY_PORT}]})
    pod_template = {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}
    objects: list[Obj] = [{
        "apiVersion": SANDBOX_EXT_GROUP, "kind": "SandboxTemplate", "metadata": _meta(template_name, options, labels),
        "spec": {"podTemplate": pod_template, "networkPolicyManagement": "Managed",
                 "networkPolicy": {"ingress": [], "egress": egress}}}]
    if options.mode == "agent-sandbox":
        objects.append({"apiVersion": SANDBOX_GROUP, "kind": "Sandbox",
                        "metadata": _meta(f"kp-{name}", options, labels, annotations),
                        "spec": {"podTemplate": pod_template, "shutdownPolicy": "Delete"}})
    else:
        objects.append({"apiVersion": SANDBOX_EXT_GROUP, "kind": "SandboxWarmPool",
                        "metadata": _meta(f"kp-{name}-pool", options, labels),
                        "spec": {"sandboxTemplateRef": {"name": template_name}, "replicas": 0}})
        objects.append({"apiVersion": SANDBOX_EXT_GROUP, "kind": "SandboxClaim",
                        "metadata": _meta(f"kp-{name}", options, labels, annotations),
                        "spec": {"warmPoolRef": {"name": f"kp-{name}-pool"},
                                 "lifecycle": {"shutdownPolicy": "Delete"}}})
    return objects
