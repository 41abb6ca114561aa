"""The Pod of kp-run --emit kube --local confines an agent under Podman 4.3's `podman kube play` as kp-run
confines it on this host: the host backend's attacks (tests/integration/test_run.py, test_syscalls.py),
run from inside the emitted Pod, played the way the local variant says (tests/integration/kubeplay.py).

Each attack is also run once against the same Pod with the property taken out (its field, its
annotation, its mount or the play's flag: ids "weakened"), where it must get through: so a pass here
means the emitted field, not something else of the host, held it."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration import kubeplay, test_run
from tests.integration.test_run import CAP_PROBE, NET_PROBE, OWNER
from tests.integration.test_syscalls import ATTEMPTS, EXPECTED

pytestmark = pytest.mark.integration

ws = test_run.ws  # the host tests' workspace: main.py, .env (API_KEY=hunter2), old.txt, sub/x.txt, the owner's
host_server = test_run.host_server  # a TCP server on every address of this host, answering "pong"

PIDS = 64  # the --pids of every run here (the Pod has no field for it: the play sets the pod's cgroup)
WEAKENED = [False, True]
IDS = ["kodepipe", "weakened"]
Weaken = Callable[[dict[str, Any]], None]


@pytest.fixture(autouse=True)
def podman_kube_play() -> None:
    import shutil

    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    if shutil.which("catatonit") is None:  # a base package of ./setup: its absence is a setup to redo
        pytest.fail("root's podman kube play needs catatonit (the infra container's init): run ./setup")
    if os.geteuid() != 0:
        pytest.skip("the play binds a subordinate id range over /etc/subuid: it needs root")


def agent(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def play(image: str, ws: Path | None, where: Path, script: str, *flags: str, weaken: Weaken | None = None,
         pids: int | None = PIDS, network_none: bool = True, host_uid: int | None = OWNER) -> str:
    """``script`` run by bash as the agent of the emitted Pod (``weaken`` changes the Pod first); the agent's
    output, stdout then stderr, and its exit status last, as "EXIT n"."""
    text = kubeplay.emit(image, ws, "--pids", str(PIDS), *flags, command=["bash", "-c", script])
    if weaken is not None:
        docs = kubeplay.documents(text)
        weaken(kubeplay.pod_of(docs))
        text = kubeplay.dump(docs)
    profile = kubeplay.kodepipe_profile()
    played = kubeplay.play(text, where, host_uid=host_uid, pids=pids, network_none=network_none,
                           profiles={kubeplay.profile_file(profile): profile})
    assert not played.timed_out, played
    return f"{played.stdout}{played.stderr}EXIT {played.exit_code}\n"


def test_the_pod_names_kodepipes_seccomp_profile(shell_image: str, ws: Path) -> None:
    """The annotation Podman reads (seccompProfile it ignores) names the file of kodepipe's own profile: the
    one these tests install under --seccomp-profile-root, and the one a user would."""
    pod = kubeplay.pod_of(kubeplay.documents(kubeplay.emit(shell_image, ws, command=["true"])))
    profile = kubeplay.kodepipe_profile()
    assert pod["metadata"]["annotations"][kubeplay.SECCOMP_ANNOTATION] == \
        f"localhost/{kubeplay.profile_file(profile)}"
    assert all(len(value) <= 63 for value in pod["metadata"]["annotations"].values())  # podman 4.3's limit


def no_seccomp_annotation(pod: dict[str, Any]) -> None:
    del pod["metadata"]["annotations"][kubeplay.SECCOMP_ANNOTATION]


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_untraced_children_keys_and_namespaces_are_refused(shell_image: str, ws: Path, tmp_path: Path,
                                                           weakened: bool) -> None:
    """test_syscalls' attempts.  Podman's own profile (the Pod without the annotation) allows new user
    namespaces and the keyring: that they fail here is kodepipe's profile at work, not the runtime's."""
    out = play(shell_image, ws, tmp_path / "play", f"perl -e {shlex.quote(ATTEMPTS)}",
               weaken=no_seccomp_annotation if weakened else None)
    said = out.splitlines()
    assert "EXIT 0" in said, out
    if weakened:
        assert "unshare-user: ok" in said and "keyctl: ok" in said and "clone-untraced: ok" in said, out
        return
    for expected in EXPECTED:
        assert expected in said, out


def as_root_with_capabilities(pod: dict[str, Any]) -> None:
    for context in (pod["spec"]["securityContext"], agent(pod)["securityContext"]):
        for key in ("runAsNonRoot", "capabilities", "allowPrivilegeEscalation"):
            context.pop(key, None)
        context.update(runAsUser=0, runAsGroup=0)  # not left out: the image's USER would be the agent's


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_the_agent_is_uid_1000_without_capabilities(shell_image: str, ws: Path, tmp_path: Path,
                                                    weakened: bool) -> None:
    """test_run's capability attack: raw sockets, chown, chmod of root's files, mount, a user namespace;
    the status of the agent's process says no capability (bounding set included) and no new privileges."""
    script = (f"echo UID $(id -u) GID $(id -g); python3 -c {shlex.quote(CAP_PROBE)}; "
              "mount -t tmpfs none /mnt || echo MOUNT-DENIED; unshare -Urm true || echo USERNS-DENIED; "
              "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status")
    out = play(shell_image, ws, tmp_path / "play", script, weaken=as_root_with_capabilities if weakened else None)
    if weakened:  # root of the user namespace, Podman's default capabilities, no no-new-privileges
        assert "UID 0 GID 0" in out and "chown ALLOWED" in out and "NoNewPrivs:\t0" in out, out
        assert "CapEff:\t0000000000000000" not in out
        return
    assert "UID 1000 GID 1000" in out, out
    assert "raw DENIED" in out and "chown DENIED" in out and "chmod-other DENIED" in out, out
    assert "MOUNT-DENIED" in out and "USERNS-DENIED" in out
    assert "CapEff:\t0000000000000000" in out and "CapBnd:\t0000000000000000" in out
    assert "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out
    assert (ws / "old.txt").stat().st_uid == OWNER


def host_users(pod: dict[str, Any]) -> None:
    pod["spec"]["hostUsers"] = True


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_root_inside_is_not_root_and_files_belong_to_the_invoker(shell_image: str, ws: Path, tmp_path: Path,
                                                                 weakened: bool) -> None:
    """test_run's: the agent writes to the workspace (the file is the invoking user's on the host), reads its
    user namespace's map (no id of it is the host's root) and reaches for a host file next to the workspace,
    root's processes and Podman's socket.  Weakened: hostUsers true and no --userns for the play, the Pod
    in the host's user namespace."""
    (tmp_path / "machine-secret.txt").write_text("top secret\n")
    script = ("echo made > /workspace/made.txt && echo WROTE; cat /proc/self/uid_map; "
              "cat /workspace/../machine-secret.txt; ls /proc/1/root/; "
              "test -e /run/podman/podman.sock && echo PODMAN-SOCKET; true")
    out = play(shell_image, ws, tmp_path / "play", script, weaken=host_users if weakened else None,
               host_uid=None if weakened else OWNER)
    maps = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert maps, out
    if weakened:
        assert ["0", "0", "4294967295"] in maps, out
        return
    assert "WROTE" in out and (ws / "made.txt").stat().st_uid == OWNER and (ws / "made.txt").stat().st_gid == OWNER
    assert ["1000", str(OWNER), "1"] in maps
    assert all(m[1] != "0" for m in maps), out  # container root is an unprivileged host id
    assert "top secret" not in out and "PODMAN-SOCKET" not in out and "No such file" in out


def writable_root(pod: dict[str, Any]) -> None:
    agent(pod)["securityContext"]["readOnlyRootFilesystem"] = False


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_the_root_filesystem_is_read_only(shell_image: str, ws: Path, tmp_path: Path, weakened: bool) -> None:
    script = "touch /var/tmp/evil && echo ROOT-WRITTEN; touch /etc/evil; touch /tmp/ok && echo TMP-OK"
    out = play(shell_image, ws, tmp_path / "play", script, weaken=writable_root if weakened else None)
    assert "TMP-OK" in out, out
    if weakened:
        assert "ROOT-WRITTEN" in out, out
        return
    assert out.count("Read-only file system") == 2 and "ROOT-WRITTEN" not in out, out


def unmasked(pod: dict[str, Any]) -> None:
    container = agent(pod)
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "mask"]


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_env_files_are_masked_and_the_host_file_kept(shell_image: str, ws: Path, tmp_path: Path,
                                                     weakened: bool) -> None:
    """test_run's: .env (a default mask) and *.pem (--mask, a glob the emit resolved in the workspace) read
    empty, cannot be written nor removed, and the host's files are as they were."""
    (ws / "cert.pem").write_text("PRIVATE KEY\n")
    os.chown(ws / "cert.pem", OWNER, OWNER)
    script = ("cat /workspace/.env; echo leak >> /workspace/.env || echo WRITE-DENIED; "
              "rm /workspace/.env || echo RM-DENIED; cat /workspace/cert.pem")
    out = play(shell_image, ws, tmp_path / "play", script, "--mask", "*.pem", weaken=unmasked if weakened else None)
    if weakened:
        assert "hunter2" in out and "PRIVATE KEY" in out, out
        return
    assert "hunter2" not in out and "PRIVATE KEY" not in out, out
    assert "WRITE-DENIED" in out and "RM-DENIED" in out
    assert (ws / ".env").read_text() == "API_KEY=hunter2\n" and (ws / "cert.pem").read_text() == "PRIVATE KEY\n"


def writable_secret(pod: dict[str, Any]) -> None:
    for mount in agent(pod)["volumeMounts"]:
        if mount["mountPath"] == "/run/secrets/tok":
            mount["readOnly"] = False


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_a_secret_is_visible_read_only(shell_image: str, ws: Path, tmp_path: Path, weakened: bool) -> None:
    """--secret: the file, the invoking user's own (so only the mount's read-only flag stops a write), at the
    place asked for; the host file unchanged."""
    secret = tmp_path / "host-secret.txt"
    secret.write_text("top secret\n")
    secret.chmod(0o600)
    os.chown(secret, OWNER, OWNER)
    script = "cat /run/secrets/tok; echo x >> /run/secrets/tok && echo WROTE; true"
    out = play(shell_image, ws, tmp_path / "play", script, "--secret", f"{secret}:/run/secrets/tok",
               weaken=writable_secret if weakened else None)
    assert "top secret" in out, out
    if weakened:
        assert "WROTE" in out and secret.read_text() == "top secret\nx\n", out
        return
    assert "WROTE" not in out and "Read-only file system" in out, out
    assert secret.read_text() == "top secret\n"


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_there_is_no_network(shell_image: str, ws: Path, tmp_path: Path, host_server: Any, weakened: bool) -> None:
    """test_run's probe: a TCP connection to this host's own address (a server answers there) and to an
    outside IPv6 address, a DNS query to the pod's resolver, and the interfaces.  Weakened: played without
    --network none (Podman's bridge), where the host answers."""
    ip, port = host_server
    code = NET_PROBE.format(ip=ip, port=port)
    out = play(shell_image, ws, tmp_path / "play", f"python3 -c {shlex.quote(code)}", network_none=not weakened)
    if weakened:
        assert "CONNECTED pong" in out and "IFACES 1\n" not in out, out
        return
    assert "REFUSED ENETUNREACH" in out and "CONNECTED" not in out, out
    assert "DNS ENETUNREACH" in out and "DNS-SENT" not in out
    assert "IFACES 1\n" in out  # lo only


# test_run's fork loop: each child lives until the parent exits (its pipe's end closes)
FORKS = ("import os\nr, w = os.pipe()\nn = 0\nfor i in range(100):\n  try:\n    pid = os.fork()\n"
         "  except OSError: break\n  if pid == 0: os.close(w); os.read(r, 1); os._exit(0)\n  n += 1\n"
         "print(\"FORKED\", n)")


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_the_pids_limit_holds(shell_image: str, ws: Path, tmp_path: Path, weakened: bool) -> None:
    out = play(shell_image, ws, tmp_path / "play", f"python3 -c {shlex.quote(FORKS)}", pids=None if weakened else 32)
    if weakened:  # Podman's own limit (thousands) lets every child be made
        assert "FORKED 100" in out, out
        return
    forked = int(out.split("FORKED")[1].split()[0])
    assert forked < 32, out


def more_memory(pod: dict[str, Any]) -> None:
    for key in ("limits", "requests"):
        agent(pod)["resources"][key]["memory"] = "512Mi"


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_the_memory_limit_holds(shell_image: str, ws: Path, tmp_path: Path, weakened: bool) -> None:
    script = "python3 -c 'x = bytearray(200 * 1024 * 1024); x[::4096] = b\"a\" * len(x[::4096]); print(\"ALLOC-OK\")'"
    out = play(shell_image, ws, tmp_path / "play", script, "--memory", "64m", "--tmp-size", "8m",
               weaken=more_memory if weakened else None)
    if weakened:
        assert "ALLOC-OK" in out and "EXIT 0" in out, out
        return
    assert "ALLOC-OK" not in out and "EXIT 137" in out, out  # the kernel's OOM killer


def shared_scratch(pod: dict[str, Any]) -> None:
    """/tmp and HOME named as they were first emitted: "tmp" and "home", the same in every Pod."""
    renamed = {v["name"]: v["name"].rsplit("-", 1)[1] for v in pod["spec"]["volumes"] if "emptyDir" in v}
    for item in [*pod["spec"]["volumes"], *agent(pod)["volumeMounts"]]:
        item["name"] = renamed.get(item["name"], item["name"])


@pytest.mark.parametrize("weakened", WEAKENED, ids=IDS)
def test_two_pods_do_not_share_tmp_or_home(shell_image: str, ws: Path, tmp_path: Path, weakened: bool) -> None:
    """Podman 4.3 makes an emptyDir a named volume of the emptyDir's name: a run's /tmp and HOME must not be
    the next run's.  One agent leaves files there and waits; another, played meanwhile, looks."""
    import threading

    first = ("echo planted > /tmp/left-by-first; echo planted > $HOME/left-by-first; touch /workspace/ready; "
             "for i in $(seq 600); do test -e /workspace/go && exit 0; sleep 0.1; done; exit 9")
    out: dict[str, str] = {}

    def run_first() -> None:
        try:
            out["first"] = play(shell_image, ws, tmp_path / "first", first,
                                weaken=shared_scratch if weakened else None)
        except BaseException as exc:  # said in the test's own failure, not as a thread's warning
            out["first"] = f"FAILED {exc!r}"

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        for _ in range(1200):
            if (ws / "ready").exists() or not thread.is_alive():
                break
            threading.Event().wait(0.1)
        assert (ws / "ready").exists(), "the first agent did not start"
        out["second"] = play(shell_image, ws, tmp_path / "second", "ls -a /tmp $HOME",
                             weaken=shared_scratch if weakened else None)
    finally:
        (ws / "go").touch()
        thread.join(timeout=300)
    assert "EXIT 0" in out["first"], out
    if weakened:
        assert "left-by-first" in out["second"], out
        return
    assert "left-by-first" not in out["second"] and "EXIT 0" in out["second"], out


def test_a_play_leaves_nothing_behind_even_when_it_fails(shell_image: str, ws: Path, tmp_path: Path) -> None:
    """The helper's own promise: pod, containers and emptyDir volumes gone after an agent that failed, and
    after a play that Podman refused half-way (a seccomp profile that is not there: the infra container
    was already made)."""
    text = kubeplay.emit(shell_image, ws, command=["sh", "-c", "echo to-out; echo to-err >&2; exit 3"])
    pod = kubeplay.pod_of(kubeplay.documents(text))
    name = pod["metadata"]["name"]
    volumes = [v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v]
    assert volumes == [f"{name}-tmp", f"{name}-home"]  # one per run: Podman 4.3 names the volume after them
    profile = kubeplay.kodepipe_profile()
    played = kubeplay.play(text, tmp_path / "failed", host_uid=OWNER, pids=PIDS,
                           profiles={kubeplay.profile_file(profile): profile})
    assert (played.exit_code, played.stdout, played.stderr) == (3, "to-out\n", "to-err\n")
    assert kubeplay.leftovers(name, volumes) == []
    with pytest.raises(kubeplay.PlayFailed, match="seccomp"):
        kubeplay.play(text, tmp_path / "refused", host_uid=OWNER, pids=PIDS, profiles={})
    assert kubeplay.leftovers(name, volumes) == []
