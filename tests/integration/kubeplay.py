"""Playing the Pod of kp-run --emit kube --local with Podman 4.3's `podman kube play`, the way the
local variant says to (kodepipe.container.kube.LOCAL), so that a test attacks the Pod as emitted.

What the play needs on this kind of host, and what kp-run's own `podman run` does differently:

- the infra and agent containers fail with "error setting rlimit" when the hard RLIMIT_NOFILE/NPROC of
  the caller is below Podman's defaults (kp-run passes --ulimit): a containers.conf of our own, a copy
  of Podman's with ``default_ulimits`` set, given through CONTAINERS_CONF;
- ``hostUsers: false`` is ``--userns=auto``, which takes its ids from the ``containers`` range of
  /etc/subuid and /etc/subgid: a file holding such a range is bound over both in a private mount
  namespace of the play alone (the host's files are never changed), and the agent's uid 1000 is mapped
  to the invoking user, as kp-run maps it;
- the seccomp annotation names a file under --seccomp-profile-root;
- no NetworkPolicy: --network none;
- no pids field: the pod's pids cgroup is set between the play (--start=false) and the start;
- activeDeadlineSeconds is ignored: the wait is bounded here, and the pod killed at the bound.

Whatever happens, the pod goes (podman kube down, then podman pod rm -f) and so do the named volumes
its emptyDirs made (Podman 4.3 makes one per emptyDir, named after it), each step bounded in time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.conftest import BIN

AGENT_UID = 1000
# a range no account of this host uses, big enough for --userns=auto's 65536 ids
SUBID_RANGE = "containers:2147483647:2147483648\n"
ULIMITS = 'default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]'
PODMAN_CONF = Path("/usr/share/containers/containers.conf")
SECCOMP_ANNOTATION = "container.seccomp.security.alpha.kubernetes.io/agent"
STEP_TIMEOUT = 120.0  # one podman call (play, start, logs, down) on a loaded machine


class PlayFailed(AssertionError):
    """The pod could not be made or started: Podman's words, with the command."""


@dataclass(frozen=True)
class Played:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool


def kodepipe_profile() -> bytes:
    """kodepipe's seccomp profile, compact, byte for byte what kp-run --emit puts in its ConfigMap: the
    sha256 of these bytes names the file the local variant's annotation names."""
    from kodepipe.container import seccomp

    return orjson.dumps(orjson.loads(seccomp.render(seccomp.SYSTEM_PROFILE.read_bytes())))


def profile_file(profile: bytes) -> str:
    return f"{hashlib.sha256(profile).hexdigest()[:16]}.json"


def emit(image: str, workspace: Path | None, *flags: str, command: list[str]) -> str:
    """kp-run --emit kube --local's YAML, as a user would pipe it to podman kube play."""
    args = [str(BIN / "kp-run"), "--emit", "kube", "--local", "--image", image,
            *(["-w", str(workspace)] if workspace is not None else []), *flags, "--", *command]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def documents(yaml_text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(yaml_text) if d]


def pod_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (pod,) = [d for d in docs if d.get("kind") == "Pod"]
    return pod


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)


def containers_conf(source: str) -> str:
    """Podman's containers.conf with ``default_ulimits`` set, first thing in its [containers] table."""
    out, done = [], False
    for line in source.splitlines():
        out.append(line)
        if not done and line.strip() == "[containers]":
            out.append(ULIMITS)
            done = True
    if not done:
        out += ["[containers]", ULIMITS]
    return "\n".join(out) + "\n"


def pids_file(cgroup_path: str) -> Path:
    """The pids.max of a pod's cgroup (``podman pod inspect``'s CgroupPath), on cgroup v1 (the pids
    hierarchy) or v2 (the unified one; under systemd the slice may sit deeper than its name says)."""
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    base = Path("/sys/fs/cgroup") if unified else Path("/sys/fs/cgroup/pids")
    rel = cgroup_path.strip("/")
    direct = base / rel / "pids.max"
    if direct.exists():
        return direct
    found = sorted(base.rglob(Path(rel).name))
    if len(found) == 1 and (found[0] / "pids.max").exists():
        return found[0] / "pids.max"
    raise PlayFailed(f"the pod's pids cgroup {cgroup_path!r} is not under {base}")


def podman(*args: str, env: Mapping[str, str], timeout: float = STEP_TIMEOUT,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman ARGS, in the scratch directory named by env's KP_PLAY_CWD: conmon writes an "oom" file into
    its working directory when a container hits its memory limit, never into the checkout."""
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=dict(env),
                          cwd=env.get("KP_PLAY_CWD"))
    if check and proc.returncode != 0:
        raise PlayFailed(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def play(yaml_text: str, where: Path, *, host_uid: int | None, pids: int | None,
         profiles: Mapping[str, bytes] | None = None, network_none: bool = True,
         timeout: float = 180.0) -> Played:
    """Play ``yaml_text`` (one Pod) as the local variant says, wait for its agent container and return its
    exit status and output; always take the pod and its volumes away.

    ``host_uid``: the host user the agent's uid 1000 is mapped to (None: no --userns at all, Podman's
    own choice, for a test's weakened run); ``pids``: the pod's pids limit (None: left as Podman sets
    it); ``profiles``: seccomp profile files by name, under the play's --seccomp-profile-root;
    ``network_none``: play with --network none (False: Podman's default network, for a weakened run)."""
    where.mkdir(parents=True, exist_ok=True)
    docs = documents(yaml_text)
    pod = pod_of(docs)
    name = pod["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    agent = f"{name}-{container['name']}"
    volumes = [v["name"] for v in pod["spec"].get("volumes", []) if "emptyDir" in v]
    kubefile = where / "pod.yaml"
    kubefile.write_text(yaml_text)
    conf = where / "containers.conf"
    conf.write_text(containers_conf(PODMAN_CONF.read_text()))
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "KP_PLAY_CWD": str(where)}
    seccomp_root = where / "seccomp"
    seccomp_root.mkdir(exist_ok=True)
    for file, data in (profiles or {}).items():
        (seccomp_root / file).write_bytes(data)
    args = ["kube", "play", "--start=false", "--seccomp-profile-root", str(seccomp_root)]
    if network_none:
        args += ["--network", "none"]
    if host_uid is not None:
        args.append(f"--userns=auto:size=65536,uidmapping={AGENT_UID}:{host_uid}:1,"
                    f"gidmapping={AGENT_UID}:{host_uid}:1")
    args.append(str(kubefile))
    subid = where / "subid"
    subid.write_text(SUBID_RANGE)
    # the range for --userns=auto, in the play's own mount namespace only (slave: nothing goes back out)
    bind = 'mount --bind "$1" /etc/subuid && mount --bind "$1" /etc/subgid && shift && exec podman "$@"'
    try:
        proc = subprocess.run(["unshare", "-m", "--propagation", "slave", "sh", "-c", bind, "sh", str(subid),
                               *args], capture_output=True, text=True, timeout=STEP_TIMEOUT, env=env,
                              cwd=where)
        if proc.returncode != 0:
            raise PlayFailed(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        if pids is not None:
            cgroup = podman("pod", "inspect", "--format", "{{.CgroupPath}}", name, env=env).stdout.strip()
            limit = pids_file(cgroup)
            limit.write_text(f"{pids}\n")
            assert limit.read_text().strip() == str(pids), limit
        podman("pod", "start", name, env=env)
        timed_out = False
        try:
            waited = podman("wait", agent, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:  # activeDeadlineSeconds is Podman's to ignore: the bound is ours
            timed_out = True
            podman("pod", "kill", name, env=env, check=False)
            waited = podman("wait", agent, env=env)
        logs = podman("logs", agent, env=env)
        return Played(int(waited.stdout.strip().splitlines()[-1]), logs.stdout, logs.stderr, timed_out)
    finally:
        clean(kubefile, name, volumes, env)


def clean(kubefile: Path, name: str, volumes: list[str], env: Mapping[str, str]) -> None:
    """The pod and its containers, then the emptyDirs' volumes; every step tried whatever the one before did.
    A volume is removed without -f, which would remove any other container using it first: one still in
    use is not this pod's alone."""
    steps = [["kube", "down", str(kubefile)], ["pod", "rm", "-f", "--ignore", name],
             *(["volume", "rm", volume] for volume in volumes)]
    for args in steps:
        with contextlib.suppress(subprocess.TimeoutExpired):
            podman(*args, env=env, check=False)


def leftovers(name: str, volumes: list[str]) -> list[str]:
    """What of a played pod is still there: its pod, its containers, its volumes."""
    env = dict(os.environ)
    left = []
    if podman("pod", "exists", name, env=env, check=False).returncode == 0:
        left.append(f"pod {name}")
    ps = podman("ps", "-a", "--format", "{{.Names}}", "--filter", f"pod={name}", env=env, check=False)
    left += [f"container {c}" for c in ps.stdout.split()]
    left += [f"volume {v}" for v in volumes if podman("volume", "exists", v, env=env, check=False).returncode == 0]
    return left

