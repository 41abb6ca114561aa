"""kp-run --emit: what kube.render needs from this machine (the seccomp profile, the workspace's
masked files), and its objects written out as multi-document YAML or JSON lines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import IO, Any

import orjson

from kodepipe.container import kube
from kodepipe.container.policy import Policy

GLOB = re.compile(r"[*?\[]")


def options(policy: Policy, *, mode: str, namespace: str | None, runtime_class: str | None,
            workspace_claim: str | None, workspace_size: str, workspace_image: str | None, seccomp: str,
            proxy_image: str, local: bool, empty_file: str | None = None) -> kube.EmitOptions:
    """The emit options, with the profile read from this host and the masks resolved in the workspace
    when it is a directory here (a glob cannot be resolved otherwise: it is listed as not carried)."""
    from kodepipe.container import sandbox

    profile = profile_bytes() if seccomp == "kodepipe" else b""
    masked: list[str] = []
    unresolved: list[str] = []
    where = Path(policy.workspace) if policy.workspace is not None else None
    if where is not None and policy.masks:
        if where.is_dir():
            masked = sandbox.scan(where, policy.masks)[0]
        else:
            masked = [m for m in policy.masks if not GLOB.search(m)]
            unresolved = [m for m in policy.masks if GLOB.search(m)]
    return kube.EmitOptions(mode=mode, namespace=namespace, runtime_class=runtime_class,
                            workspace_claim=workspace_claim, workspace_size=workspace_size,
                            workspace_image=workspace_image, seccomp=seccomp, seccomp_profile=profile,
                            proxy_image=proxy_image, masked=tuple(masked), unresolved_masks=tuple(unresolved),
                            local=local, workspace_path=str(where.resolve()) if local and where else None,
                            empty_file=empty_file)


def profile_bytes() -> bytes:
    """kodepipe's seccomp profile, compact: the ConfigMap's one line, and the file installed from it."""
    from kodepipe.container import seccomp

    return orjson.dumps(orjson.loads(seccomp.render(seccomp.SYSTEM_PROFILE.read_bytes())))


def empty_file() -> str:
    """The empty, read-only file the local variant binds over each mask (in the runtime dir)."""
    import os

    from kodepipe.core import paths

    path = paths.runtime_dir() / "kube-mask"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        os.close(fd)
    except FileExistsError:
        pass
    info = os.lstat(path)
    import stat

    if not stat.S_ISREG(info.st_mode) or info.st_size != 0:
        raise ValueError(f"{path} should be an empty file: remove it")
    return str(path)


def write_yaml(stream: IO[str], emitted: kube.Emitted, name: str) -> None:
    """Multi-document YAML, its header saying what does not carry over and what was loosened."""
    import yaml

    lines = [f"# kodepipe: kp-run --emit, run {name}; checked against the Kubernetes {kube.K8S_VERSION} schema"]
    if emitted.loosened:
        lines.append(f"# loosened: {', '.join(emitted.loosened)}")
    lines.append("# not carried over (the emit record's not_carried says why and what to do instead):")
    lines.extend(f"#   - {item['control']}: {item['why']}" for item in emitted.not_carried)
    for item in emitted.secrets_to_create:
        lines.append(f"# create the Secret first: kubectl create secret generic {item['secret']} "
                     f"--from-file={item['key']}={item['from']}")
    if emitted.seccomp is not None and emitted.local is not None:
        lines.append(f"# write the seccomp profile as {emitted.seccomp['localhost']} in the directory given to "
                     "podman kube play --seccomp-profile-root")
    elif emitted.seccomp is not None:
        lines.append(f"# install the seccomp profile on every node as /var/lib/kubelet/seccomp/"
                     f"{emitted.seccomp['localhost']} (ConfigMap {emitted.seccomp['configmap']})")
    if emitted.local is not None:
        lines.append("# the local variant, for podman kube play 4.3:")
        lines.extend(f"#   - {key}: {why}" for key, why in emitted.local.items())
    from kodepipe.core.terminal import escape  # a comment line stays one line, whatever a path in it holds

    stream.write("\n".join(escape(line) for line in lines) + "\n")
    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # every object whole: no &anchors for kubectl to read
            return True

    stream.write(yaml.dump_all(emitted.objects, Dumper=Dumper, sort_keys=False, explicit_start=True, width=100))


def write_json(stream: IO[bytes], emitted: kube.Emitted, name: str) -> None:
    for obj in emitted.objects:
        stream.write(orjson.dumps(obj) + b"\n")
    stream.write(orjson.dumps(emitted.record(name)) + b"\n")
