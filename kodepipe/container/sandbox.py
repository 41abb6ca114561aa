"""What a kp-run container is allowed to do: the policy, as data.

Pure functions, no processes: options in, a Podman container spec out (the
libpod REST API's SpecGenerator, and the same thing as ``podman run``
arguments for the benchmark and for runs inside a VM), plus the list of
defaults that the options loosened, which goes into the record.

The defaults (design.md, "Security defaults of kp-run"):

- a user namespace: the agent runs as container uid/gid AGENT_UID, mapped to
  one host uid (the person it works for); every other container uid, root
  included, maps to a fixed unprivileged host range (HOST_RANGE_START, 65536
  ids), so root inside is not root outside;
- all capabilities dropped, no-new-privileges, kodepipe's seccomp profile
  (Podman's, minus new namespaces: see seccomp.py);
- read-only root filesystem, a size-capped tmpfs at /tmp, and one of the same size at HOME
  (/tmp/home, the agent's own, mode 0700; both count against the memory limit);
- no network (its own empty network namespace: only lo);
- memory, CPU, pids and wall-time limits;
- only the workspace mounted, at /workspace; no host environment, home, SSH
  agent or Podman socket;
- a share of the kernel's per-user quotas (Quotas, below), so that a run
  cannot use up those of a host account.

Kernel quotas.  Some kernel objects are counted per user, and a container's
count is charged to host accounts.  The user namespace's counts (inotify
instances and watches, pending signals, POSIX message-queue bytes) go up the
namespace chain to its owner, and rootful Podman makes root the owner: one
container holding 128 inotify instances left host root unable to create one
(measured; the same for watches, queued signals and message queues).  Other
counts (keys, epoll watches, pipe pages) belong to the host uid the agent
runs as, the invoking user.  So each run gets QUOTA_SHARE-th of the host's
per-user limits: the inotify limits of the container's own user namespace
(/proc/sys/user/max_inotify_*, which root can lower from outside before the
agent starts; hostrun.py) and the sigpending and msgqueue rlimits (the agent
cannot raise them: it has no CAP_SYS_RESOURCE).  Keys are refused by
seccomp.py.  SysV IPC is counted per IPC namespace, and every container has
its own.  What stays shared: several runs at once each take their share of
root's quotas, and a run given --cap-add SETUID can hold a share per uid.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

# the policy's defaults (policy.py), which this module renders
from kodepipe.container.policy import AGENT_UID as AGENT_UID
from kodepipe.container.policy import DEFAULT_MASKS as DEFAULT_MASKS
from kodepipe.container.policy import DEFAULT_TERM, NOFILE, NPROC, check_workspace_place
from kodepipe.container.policy import WORKSPACE as WORKSPACE
from kodepipe.container.policy import Limits as Limits
from kodepipe.container.policy import Quotas as Quotas
from kodepipe.core import fdtree
from kodepipe.core.errors import BadInput

ID_RANGE = 65536
# host ids for the container's other uids: far above login users and the
# ranges useradd hands out for rootless containers (100000 + 65536*n)
HOST_RANGE_START = 0x70000000
# the host uid an agent runs as when nobody in particular invoked kp-run
# (root without sudo, on a root-owned workspace): owns nothing on the host
FALLBACK_HOST_UID = HOST_RANGE_START + ID_RANGE

HOME = "/tmp/home"

# Podman's --env-file (pkg/env ParseFile): one NAME=VALUE per line, read by a bufio.Scanner, so a value
# cannot hold a newline, loses a carriage return at its end, and a line past 64 KiB is an error
ENV_FILE_LINE_MAX = 64 * 1024 - 1  # bytes, its newline included


def hosts_text(name: str) -> str:
    """kodepipe's own /etc/hosts for the container ``name``, on every backend: loopback and its own
    name only; not the machine's names, nor Podman's host.containers.internal (that machine's address)."""
    return f"127.0.0.1\tlocalhost {name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def env_file_refusal(name: str, value: str) -> str | None:
    """Why Podman's --env-file cannot carry ``value`` exactly (None: it can).  Names only: a value is
    never said."""
    if "\n" in value:
        return f"the value of {name} has a newline"
    if value.endswith("\r"):
        return f"the value of {name} ends with a carriage return"
    if len(f"{name}={value}\n".encode("utf-8", "surrogateescape")) > ENV_FILE_LINE_MAX:
        return f"the value of {name} is longer than Podman's --env-file takes ({ENV_FILE_LINE_MAX} bytes a line)"
    return None

# file names that usually hold credentials: a warning if found in a workspace
CREDENTIAL_GLOBS = (
    "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "*.pem", "*.key", "*.p12", "*.pfx", ".netrc",
    ".git-credentials", ".npmrc", ".pypirc", "credentials", "credentials.json", ".htpasswd",
    "*.kdbx", ".vault-token", "kubeconfig", ".dockercfg", "service-account*.json",
)
# not walked when looking for masks and credentials: big, and never mounted apart
SKIP_DIRS = {".git", "node_modules", ".venv", "venv", "__pycache__", ".tox", ".mypy_cache"}
WALK_LIMIT = 2_000_000


# Linux's own defaults (inotify: 128 instances, 8192 watches on small machines; a message
# queue's 819200 bytes; RLIMIT_SIGPENDING depends on memory), for a host that cannot be read
LINUX_QUOTAS = Quotas(inotify_instances=128, inotify_watches=8192, sigpending=8192, msgqueue=819200)
DEFAULT_QUOTAS = LINUX_QUOTAS.share()


def host_quotas(proc_sys: Path = Path("/proc/sys")) -> Quotas:
    """This host's per-user quotas: the inotify sysctls and this process's rlimits (kp-run runs
    as root, whose quotas a container's counts are charged to)."""
    import resource

    def sysctl(name: str, fallback: int) -> int:
        try:
            return int((proc_sys / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return fallback

    def rlimit(which: int, fallback: int) -> int:
        soft = resource.getrlimit(which)[0]
        return fallback if soft == resource.RLIM_INFINITY or soft <= 0 else soft

    return Quotas(inotify_instances=sysctl("fs/inotify/max_user_instances", LINUX_QUOTAS.inotify_instances),
                  inotify_watches=sysctl("fs/inotify/max_user_watches", LINUX_QUOTAS.inotify_watches),
                  sigpending=rlimit(resource.RLIMIT_SIGPENDING, LINUX_QUOTAS.sigpending),
                  msgqueue=rlimit(resource.RLIMIT_MSGQUEUE, LINUX_QUOTAS.msgqueue))


@dataclass(frozen=True)
class Secret:
    source: Path  # the file handed to the container (kodepipe's private copy)
    dest: str
    origin: str  # what the user named, for the record


@dataclass(frozen=True)
class Mount:
    source: str
    dest: str
    read_only: bool


@dataclass
class Sandbox:
    """Everything kp-run decided about one container."""

    name: str
    image: str
    command: list[str]
    workspace: str | None  # host path bound at /workspace (the overlay's merged dir in quarantine)
    host_uid: int
    host_gid: int
    limits: Limits
    seccomp: str | None  # profile path on the machine that runs the container
    read_only_workspace: bool = False
    network: str = "none"
    cap_add: list[str] = field(default_factory=list)
    writable_root: bool = False
    env: dict[str, str] = field(default_factory=dict)  # passed-through names, values
    secrets: list[Secret] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)  # workspace-relative paths of existing files
    # workspace-relative paths bound read-only onto themselves (git metadata: gitguard.py), each from
    # the host path in protect_sources that holds it (a staging mount of an fd: hostpath.Staging)
    protect: list[str] = field(default_factory=list)
    protect_sources: dict[str, str] = field(default_factory=dict)
    git_writable: bool = False  # loosened: the workspace's git repositories are writable (--writable-git)
    mask_file: str | None = None  # an empty read-only file bound over each mask
    tty: bool = False
    term: str | None = None  # TERM for a terminal (the policy's)
    interactive: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    oci_runtime: str | None = "runc"  # the OCI runtime (runc, crun); None: the engine's default
    timeout: int = 0  # seconds after which conmon kills the container even if kp-run died
    allow: list[str] = field(default_factory=list)  # egress rules served by the proxy (egress.py)
    extra_mounts: list[Mount] = field(default_factory=list)  # files kodepipe provides, read-only
    extra_env: dict[str, str] = field(default_factory=dict)  # kodepipe's own settings (the proxy's address)
    quotas: Quotas = DEFAULT_QUOTAS  # the run's share of the per-user kernel quotas
    # podman_args passes the environment in this file (env_file_text) instead of -e NAME=VALUE words,
    # which would put the values on a command line (a VM's ps, sudo's log)
    env_file: str | None = None

    # -- the policy --------------------------------------------------------

    def id_maps(self) -> list[dict[str, int]]:
        return id_map(self.host_uid)

    def gid_maps(self) -> list[dict[str, int]]:
        return id_map(self.host_gid)

    def environment(self) -> dict[str, str]:
        env = {"HOME": HOME, "LANG": "C.UTF-8"}
        if self.tty:
            env["TERM"] = self.term or DEFAULT_TERM  # captured once, by gather.py: never read here
        env.update(self.extra_env)
        env.update(self.env)
        return env

    def mounts(self) -> list[Mount]:
        out: list[Mount] = []
        if self.workspace is not None:
            out.append(Mount(self.workspace, WORKSPACE, self.read_only_workspace))
            if self.mask_file is not None:
                out.extend(Mount(self.mask_file, f"{WORKSPACE}/{rel}", True) for rel in self.masks)
            # never a path through the workspace: a symlink there would choose what is mounted
            out.extend(Mount(self.protect_sources[rel], f"{WORKSPACE}/{rel}", True) for rel in self.protect)
        out.extend(Mount(str(s.source), s.dest, True) for s in self.secrets)
        out.extend(self.extra_mounts)
        return out

    def own_hosts(self) -> bool:
        """Whether the container gets kodepipe's /etc/hosts (hosts_text), not one the engine makes."""
        return any(m.dest == "/etc/hosts" for m in self.extra_mounts)

    def env_file_text(self) -> bytes:
        """The environment as Podman's --env-file reads it; ValueError (naming the variable, never its
        value) for a value it cannot carry: check env_file_refusal first."""
        lines = []
        for key, value in self.environment().items():
            why = env_file_refusal(key, value)
            if why is not None:
                raise ValueError(why)
            lines.append(f"{key}={value}\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def rlimits(self) -> list[tuple[str, int]]:
        """(Podman's name, soft and hard value) of each resource limit the agent gets."""
        return [("nofile", NOFILE), ("nproc", NPROC), ("sigpending", self.quotas.sigpending),
                ("msgqueue", self.quotas.msgqueue)]

    # -- renderings ----------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """The libpod SpecGenerator for POST /libpod/containers/create."""
        spec: dict[str, Any] = {
            "name": self.name,
            "hostname": self.name,
            "image": self.image,
            "command": self.command,
            "user": f"{AGENT_UID}:{AGENT_UID}",
            "userns": {"nsmode": "private"},
            "idmappings": {"UIDMap": self.id_maps(), "GIDMap": self.gid_maps()},
            "cap_drop": ["all"],
            "cap_add": list(self.cap_add),
            "no_new_privileges": True,
            "read_only_filesystem": not self.writable_root,
            "mounts": [{"type": "tmpfs", "source": "tmpfs", "destination": "/tmp",
                        "options": [f"size={self.limits.tmpfs}", "mode=1777", "nosuid", "nodev"]},
                       # HOME: the agent's own (U: owned by its uid in the container), never Podman's
                       # root-owned workdir
                       {"type": "tmpfs", "source": "tmpfs", "destination": HOME,
                        "options": [f"size={self.limits.tmpfs}", "mode=0700", "nosuid", "nodev", "U"]}]
            + [{"type": "bind", "source": m.source, "destination": m.dest,
                "options": ["rbind", "ro" if m.read_only else "rw"]} for m in self.mounts()],
            "netns": {"nsmode": "none" if self.network == "none" else "bridge"},
            "resource_limits": {
                "memory": {"limit": self.limits.memory, "swap": self.limits.memory},
                "pids": {"limit": self.limits.pids},
                "cpu": {"period": 100000, "quota": int(self.limits.cpus * 100000)},
            },
            "r_limits": [{"type": name, "soft": value, "hard": value} for name, value in self.rlimits()],
            "env": self.environment(),
            "work_dir": WORKSPACE if self.workspace is not None else HOME,
            "terminal": self.tty,
            "stdin": self.interactive,
            "labels": dict(self.labels),
            # Podman would copy the host's /etc/hosts and add host.containers.internal (the host's
            # address); kodepipe binds its own minimal one instead (hostrun.py)
            "use_image_hosts": self.own_hosts(),
        }
        if self.seccomp:
            spec["seccomp_profile_path"] = self.seccomp
        if self.oci_runtime:
            spec["oci_runtime"] = self.oci_runtime
        if self.timeout:
            spec["timeout"] = self.timeout
        return spec

    def podman_args(self) -> list[str]:
        """The same container as ``podman run`` arguments (after ``run``)."""
        args = ["--rm", "--name", self.name, "--hostname", self.name,
                "--user", f"{AGENT_UID}:{AGENT_UID}"]
        for flag, maps in (("--uidmap", self.id_maps()), ("--gidmap", self.gid_maps())):
            for m in maps:
                args += [flag, f"{m['container_id']}:{m['host_id']}:{m['size']}"]
        args += ["--cap-drop", "all"]
        for cap in self.cap_add:
            args += ["--cap-add", cap]
        args += ["--security-opt", "no-new-privileges"]
        if self.seccomp:
            args += ["--security-opt", f"seccomp={self.seccomp}"]
        if not self.writable_root:
            # and no tmpfs of Podman's own on /run, /tmp and /var/tmp (--read-only-tmpfs is on by default):
            # /var/tmp stays read-only as under the API (spec()), and /tmp is the capped one below
            args += ["--read-only", "--read-only-tmpfs=false"]
        args += ["--tmpfs", f"/tmp:rw,size={self.limits.tmpfs},mode=1777,nosuid,nodev"]
        args += ["--mount", f"type=tmpfs,destination={HOME},tmpfs-size={self.limits.tmpfs},tmpfs-mode=0700,U=true"]
        for mount in self.mounts():
            if any(c in mount.source + mount.dest for c in ",\n"):
                # --mount is comma-separated: a file named "x,source=/etc/shadow" would add options
                raise BadInput(f"cannot mount {mount.source!r} with the podman command line: its name has a comma "
                               "or a newline", hint="rename it, or run on the host (the API takes any name)")
            args += ["--mount", f"type=bind,source={mount.source},destination={mount.dest}"
                     + (",ro" if mount.read_only else "")]
        if self.own_hosts():  # as use_image_hosts in spec(): Podman makes no /etc/hosts of its own
            args.append("--no-hosts")
        args += ["--network", "none" if self.network == "none" else "bridge"]
        args += ["--memory", str(self.limits.memory), "--memory-swap", str(self.limits.memory),
                 "--pids-limit", str(self.limits.pids), "--cpus", f"{self.limits.cpus:g}"]
        for limit, amount in self.rlimits():
            args += ["--ulimit", f"{limit}={amount}:{amount}"]
        if self.env_file is not None:  # the values stay off the command line
            args += ["--env-file", self.env_file]
        else:
            for key, value in self.environment().items():
                args += ["-e", f"{key}={value}"]
        args += ["-w", WORKSPACE if self.workspace is not None else HOME]
        for key, value in self.labels.items():
            args += ["--label", f"{key}={value}"]
        if self.oci_runtime:
            args += ["--runtime", self.oci_runtime]
        if self.timeout:
            args += ["--timeout", str(self.timeout)]
        if self.interactive:
            args.append("-i")
        if self.tty:
            args.append("-t")
        return [*args, self.image, *self.command]


def id_map(host_id: int) -> list[dict[str, int]]:
    """Container ids 0..65535: AGENT_UID to ``host_id``, the rest to kodepipe's range."""
    return [
        {"container_id": 0, "host_id": HOST_RANGE_START, "size": AGENT_UID},
        {"container_id": AGENT_UID, "host_id": host_id, "size": 1},
        {"container_id": AGENT_UID + 1, "host_id": HOST_RANGE_START + AGENT_UID + 1,
         "size": ID_RANGE - AGENT_UID - 1},
    ]


# -- the people involved ------------------------------------------------------


def invoker(workspace: Path | None, environ: dict[str, str] | None = None,
            euid: int | None = None) -> tuple[int, int, str]:
    """The host uid and gid the agent acts as, and where they came from.

    Root is never used: an agent mapped to host root could leave setuid-root
    files in the workspace.  Under sudo it is the user who ran sudo; else the
    workspace's owner; else a uid that owns nothing.
    """
    env = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return euid, os.getegid(), "user"
    try:
        uid, gid = int(env.get("SUDO_UID", "")), int(env.get("SUDO_GID", ""))
        if uid > 0 and gid > 0:
            return uid, gid, "sudo"
    except ValueError:
        pass
    if workspace is not None:
        info = workspace.stat()
        if info.st_uid != 0:
            return info.st_uid, info.st_gid or info.st_uid, "workspace-owner"
    return FALLBACK_HOST_UID, FALLBACK_HOST_UID, "nobody"


def check_workspace(path: Path, home: Path | None = None) -> Path:
    """The resolved workspace, or BadInput if it would expose too much."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise BadInput(f"workspace {path} does not exist", hint="give an existing project directory") from exc
    if not real.is_dir():
        raise BadInput(f"workspace {path} is not a directory")
    homes = {Path.home()} if home is None else {home}
    sudo_user = os.environ.get("SUDO_USER")
    if home is None and sudo_user:
        homes.add(Path(os.path.expanduser(f"~{sudo_user}")))
    real_homes = []
    for h in homes:
        try:
            real_homes.append(PurePosixPath(h.resolve()))
        except OSError:
            continue
    check_workspace_place(PurePosixPath(real), real_homes)  # the rule every backend applies (policy.py)
    return real


def walk(root: Path | int, limit: int = WALK_LIMIT) -> Iterator[tuple[str, str, os.stat_result]]:
    """(workspace-relative path, name, lstat) of every non-directory below root (a path, or an fd of
    the directory), through directory fds (fdtree): no symlink is ever followed, not even one swapped
    in while the walk runs, and there is no recursion (a hostile tree may be thousands of levels
    deep).  BadInput past ``limit`` entries: masks must not silently stop applying."""
    fd = root if isinstance(root, int) else os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for cursor, name, st in fdtree.walk(fd, limit=limit):
            if not stat.S_ISDIR(st.st_mode):
                yield fdtree.join(cursor.path, name), name, st
    except fdtree.TooMany:
        raise BadInput(f"the workspace has more than {limit} files: too many to check for files to mask",
                       hint="give a smaller project directory, or --no-default-masks (recorded)") from None
    finally:
        if not isinstance(root, int):
            os.close(fd)


def _compile(patterns: Iterable[str]) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    """(regex for anchored patterns, matched on the path; regex for bare names, on the last part)."""
    anchored = [fnmatch.translate(p.strip("/")) for p in patterns if "/" in p]
    names = [fnmatch.translate(p) for p in patterns if "/" not in p]
    return (re.compile("|".join(anchored)) if anchored else None,
            re.compile("|".join(names)) if names else None)


def _matches(rel: str, pattern: str) -> bool:
    # a pattern with a slash (leading included) is anchored at the workspace root;
    # else it matches a name at any depth
    anchored, names = _compile([pattern])
    return bool(anchored and anchored.match(rel)) or bool(names and names.match(rel.rsplit("/", 1)[-1]))


def scan(root: Path | int, masks: Iterable[str]) -> tuple[list[str], list[str], set[str]]:
    """One walk of the whole workspace: (existing regular files to mask, credential-looking
    files not masked, setuid/setgid files).  Nothing is pruned for masks: an agent could
    otherwise move a .env into node_modules/ in one run and read it in the next."""
    mask_path, mask_name = _compile(masks)
    cred_path, cred_name = _compile(CREDENTIAL_GLOBS)
    masked, credentials, setuid = [], [], set()
    for rel, name, st in walk(root):
        is_mask = bool(mask_name and mask_name.match(name)) or bool(mask_path and mask_path.match(rel))
        is_cred = not is_mask and (bool(cred_name and cred_name.match(name))
                                   or bool(cred_path and cred_path.match(rel)))
        mode = st.st_mode
        if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
            setuid.add(rel)
        if is_mask:
            # only a regular file can be covered; binding over a symlink would follow it
            if stat.S_ISREG(mode):
                if not fdtree.is_utf8(rel):
                    raise BadInput(f"cannot hide {fdtree.display(rel)}: its path is not UTF-8, and Podman takes "
                                   "only UTF-8 paths", hint="rename it (an agent may have moved it there)")
                masked.append(rel)
        elif is_cred and not set(rel.split("/")[:-1]) & SKIP_DIRS:
            credentials.append(rel)
    return sorted(masked), sorted(credentials), setuid


def check_secret(spec: str) -> tuple[Path, str]:
    """FILE[:DEST] -> (file, absolute destination in the container)."""
    from kodepipe.container.policy import SecretFile, secret_dest

    path = Path(spec.partition(":")[0]).expanduser()
    dest, why = secret_dest(spec, SecretFile(str(path), path.is_file()))
    if dest is None:
        raise BadInput(why or f"--secret {spec}: no destination")
    return path, dest
