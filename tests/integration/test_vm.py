"""The VM layer on real QEMU (TCG here): boot, address, SSH, suspend, save,
crash, warm clones, removal.  Two cold clones are booted once for the
module; the warm test boots once more to warm the image."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import BIN, lines
from tests.integration.conftest import run

pytestmark = pytest.mark.integration


def one(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr.decode()
    records = lines(proc.stdout)
    assert len(records) == 1, records
    return records[0]


def ssh(env: dict[str, str], name: str, *command: str) -> dict[str, Any]:
    proc = run(env, "kp-ssh", name, "--", *command, timeout=120)
    results = [r for r in lines(proc.stdout) if r.get("kind") == "result"]
    assert len(results) == 1, proc.stderr.decode()
    return results[0]


def qemu_processes(name: str) -> list[int]:
    """Live QEMU processes of VM ``name`` (a zombie has exited: only its parent's wait() is missing,
    and QEMU's parent is whatever reaps orphans on this machine)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
            if comm == f"kp-{name}"[:15] and state != "Z":
                found.append(int(pid))
    return found


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shared")
    (folder / "from-host.txt").write_text("hello from the host\n")
    # a developer's checkout: owned by the first normal user, as the guest's user is
    for path in (folder, folder / "from-host.txt"):
        os.chown(path, 1000, 1000)
    return folder


@pytest.fixture(scope="module")
def pair(golden: dict[str, Any], shared: Path) -> Any:
    """vm-a and vm-b, cloned, booted and addressed in one pipeline, side by side, sharing one folder."""
    env = golden["env"]
    started = time.monotonic()
    pipeline = f"{BIN}/kp-clone base vm-a vm-b | {BIN}/kp-boot --share {shared} | {BIN}/kp-ip --timeout 400"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], env=env, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    records = {r["name"]: r for r in lines(proc.stdout)}
    yield env, records, time.monotonic() - started
    run(env, "kp-rm", "vm-a", "vm-b")


def test_clone_boot_ip_ssh_pipeline(pair: Any) -> None:
    env, records, seconds = pair
    assert set(records) == {"vm-a", "vm-b"}
    for name, record in records.items():
        assert record["state"] == "running" and record["accel"] in ("tcg", "kvm")
        assert record["address_source"] == "guest-agent" and record["address"].startswith("10.0.2.")
        assert record["ssh"]["host"] == "127.0.0.1" and record["host_key"].startswith("SHA256:")
        result = ssh(env, name, "uname", "-a")
        assert result["exit_status"] == 0 and f"Linux {name} " in result["stdout"]
    print(f"cold: two clones SSH-ready in {seconds:.0f} s")


def test_two_clones_have_their_own_identity(pair: Any) -> None:
    env, records, _ = pair
    ids = {n: ssh(env, n, "sh", "-c", "hostname; cat /etc/machine-id")["stdout"].split() for n in records}
    assert ids["vm-a"][0] == "vm-a" and ids["vm-b"][0] == "vm-b"
    assert ids["vm-a"][1] != ids["vm-b"][1] and len(ids["vm-a"][1]) == 32
    assert records["vm-a"]["host_key"] != records["vm-b"]["host_key"]
    assert records["vm-a"]["ssh"]["port"] != records["vm-b"]["ssh"]["port"]
    assert records["vm-a"]["mac"] != records["vm-b"]["mac"]


def test_the_shared_folder_and_nothing_else_of_the_host(pair: Any, shared: Path) -> None:
    env, _, _ = pair
    result = ssh(env, "vm-a", "sh", "-c", "cat /workspace/from-host.txt && echo written > /workspace/from-guest.txt"
                 " && findmnt -n -o FSTYPE /workspace && ls /workspace")
    assert result["exit_status"] == 0, result["stderr"]
    assert result["stdout"].splitlines()[:2] == ["hello from the host", "9p"]
    assert (shared / "from-guest.txt").read_text() == "written\n"
    # only the one folder: the host's root and home are not mounted anywhere in the guest
    mounts = ssh(env, "vm-a", "findmnt", "-n", "-t", "9p,virtiofs", "-o", "SOURCE")["stdout"].split()
    assert mounts == ["workspace"]


def test_ls_and_a_second_boot_see_the_running_vm(pair: Any) -> None:
    env, records, _ = pair
    listed = {r["name"]: r for r in lines(run(env, "kp-ls", "--kind", "vm").stdout)}
    assert listed["vm-a"]["state"] == "running" and listed["vm-a"]["pid"] == records["vm-a"]["pid"]
    again = run(env, "kp-boot", "vm-a")
    assert again.returncode == 0 and b"already running" in again.stderr
    assert one(again)["pid"] == records["vm-a"]["pid"]
    assert len(qemu_processes("vm-a")) == 1


def test_suspend_and_resume_keep_a_process_alive(pair: Any) -> None:
    env, _, _ = pair
    pid = ssh(env, "vm-a", "sh", "-c", "nohup sleep 3600 >/dev/null 2>&1 & echo $!")["stdout"].strip()
    assert one(run(env, "kp-stop", "--suspend", "vm-a"))["state"] == "suspended"
    assert one(run(env, "kp-ls", "vm-a"))["state"] == "suspended"
    time.sleep(2)
    assert one(run(env, "kp-stop", "--resume", "vm-a"))["state"] == "running"
    assert ssh(env, "vm-a", "kill", "-0", pid)["exit_status"] == 0


def test_save_and_resume_from_disk_keep_a_process_alive(pair: Any) -> None:
    env, _, _ = pair
    pid = ssh(env, "vm-b", "sh", "-c", "nohup sleep 3600 >/dev/null 2>&1 & echo $!")["stdout"].strip()
    saved = one(run(env, "kp-stop", "--save", "vm-b", timeout=300))
    assert saved["state"] == "saved" and qemu_processes("vm-b") == []
    assert Path(saved["path"], "ram.state").stat().st_size > 1024 * 1024
    resumed = one(run(env, "kp-boot", "vm-b", timeout=300))
    assert resumed["state"] == "running" and resumed["resumed"] is True
    one(run(env, "kp-ip", "vm-b", "--timeout", "120"))
    assert ssh(env, "vm-b", "kill", "-0", pid)["exit_status"] == 0


def test_graceful_stop_then_a_crash_then_removal(pair: Any) -> None:
    env, records, _ = pair
    stopped = one(run(env, "kp-stop", "vm-a", timeout=120))
    assert stopped["state"] == "stopped" and stopped["stopped_by"] in ("guest agent", "ACPI power button")
    assert qemu_processes("vm-a") == []
    for path in records["vm-a"]["sockets"].values():
        assert not Path(path).exists()
    # vm-b is killed behind kodepipe's back: kp-ls must say so, kp-rm must clean up
    pids = qemu_processes("vm-b")
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 60  # a bound against a hang, not a speed: the state is what is tested
    while (state := one(run(env, "kp-ls", "vm-b"))["state"]) != "crashed":
        assert time.monotonic() < deadline, f"vm-b still {state} a minute after its QEMU was killed"
        time.sleep(0.2)
    removed = run(env, "kp-rm", "vm-a", "vm-b")
    assert removed.returncode == 0, removed.stderr.decode()
    for path in [*records["vm-b"]["sockets"].values(), records["vm-b"]["path"], records["vm-a"]["path"]]:
        assert not Path(path).exists(), path
    assert qemu_processes("vm-b") == []


def test_kp_ip_times_out_with_the_serial_console(golden: dict[str, Any]) -> None:
    """kp-ip gives up at its timeout with the serial console's last lines.  The guest agent is kept
    from answering by a client holding its socket (QEMU serves one client at a time: kp-ip's
    connection waits unanswered), not by hoping the guest boots slower than the timeout."""
    env = golden["env"]
    one(run(env, "kp-clone", "base", "slow"))
    try:
        booted = one(run(env, "kp-boot", "slow"))
        serial = Path(booted["path"], "serial.log")
        deadline = time.monotonic() + 600  # a bound against a hang: TCG on a loaded host is slow
        while b"Linux version" not in (serial.read_bytes() if serial.exists() else b""):
            assert time.monotonic() < deadline, "the kernel wrote nothing on the serial console"
            time.sleep(0.2)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
            holder.connect(booted["sockets"]["qga"])
            proc = run(env, "kp-ip", "slow", "--timeout", "5")
        assert proc.returncode == 75, proc.stderr.decode()
        message = lines(proc.stdout)[0]["error"]["message"]
        assert "the guest agent did not answer within 5 s" in message
        shown = message.split("the serial console's last lines:\n", 1)[1].splitlines()[:-1]  # the last has the hint
        console = serial.read_bytes().decode("utf-8", "replace").replace("\r", "")
        assert shown and all(line in console for line in shown), shown  # the console's own lines
    finally:
        run(env, "kp-rm", "slow")
    assert qemu_processes("slow") == []


def test_warm_clones_are_ssh_ready_in_seconds_with_their_own_identity(golden: dict[str, Any]) -> None:
    env = golden["env"]
    warmed = one(run(env, "kp-image", "warm", "base", timeout=900))
    assert warmed["warm"]["state_bytes"] > 0
    try:
        started = time.monotonic()
        pipeline = f"{BIN}/kp-clone base w-1 w-2 | {BIN}/kp-boot | {BIN}/kp-ip --timeout 120"
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], env=env, capture_output=True, timeout=600)
        seconds = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        records = {r["name"]: r for r in lines(proc.stdout)}
        assert all(r["resumed"] for r in records.values())
        print(f"warm: two clones SSH-ready in {seconds:.1f} s")
        facts: dict[str, list[str]] = {}
        asked: dict[str, tuple[float, float]] = {}  # the host's time before and after each question
        for n in records:
            before = time.time()
            facts[n] = ssh(env, n, "sh", "-c", "hostname; cat /etc/machine-id; date +%s")["stdout"].split()
            asked[n] = (before, time.time())
        assert facts["w-1"][0] == "w-1" and facts["w-2"][0] == "w-2"
        assert facts["w-1"][1] != facts["w-2"][1]
        assert records["w-1"]["host_key"] != records["w-2"]["host_key"]
        for name in records:
            # the clock was set on resume: the guest read the host's time of that moment, however
            # long the call took (the slack is for whole seconds and the agent's delay in setting it)
            before, after = asked[name]
            assert before - 10 <= int(facts[name][2]) <= after + 5, (name, facts[name][2], before, after)
    finally:
        run(env, "kp-rm", "w-1", "w-2")
    assert qemu_processes("w-1") == [] and qemu_processes("w-2") == []


def test_a_warm_pool_hands_out_a_ready_vm_whose_identity_no_other_vm_had(golden: dict[str, Any]) -> None:
    env = golden["env"]
    state = Path(env["KODEPIPE_STATE_DIR"])
    if not isinstance(one(run(env, "kp-ls", "--kind", "image", "base")).get("warm"), dict):
        one(run(env, "kp-image", "warm", "base", timeout=900))  # made by the test above when it ran
    member = ""
    try:
        pool = one(run(env, "kp-pool", "base", "--size", "1", timeout=600))["pool"]
        assert pool["size"] == 1 and pool["keeps"] == 1 and pool["ready"] == 1 and len(pool["members"]) == 1, pool
        member = pool["members"][0]
        listed = {r["name"]: r for r in lines(run(env, "kp-ls", "--kind", "vm").stdout)}
        assert listed[member]["pool"] == "base" and listed[member]["state"] == "running", listed[member]
        # cron's clean-up keeps it (kp-ls --older-than 1d | kp-rm): it is the pool's, and not named
        kept = lines(run(env, "kp-rm", input=orjson.dumps(listed[member]) + b"\n").stdout)
        assert kept[0]["removed"] is False and "pool" in kept[0]["kept"], kept
        before = ssh(env, member, "sh", "-c", "hostname; cat /etc/machine-id")["stdout"].split()
        assert before[0] == member

        started = time.monotonic()
        handed = one(run(env, "kp-clone", "base", "mine"))
        print(f"pool: kp-clone handed a ready VM out in {time.monotonic() - started:.2f} s "
              f"(its hostname: {handed.get('hostname_seconds')} s)")
        assert handed["from_pool"] is True and handed["state"] == "running" and handed["name"] == "mine", handed
        assert "pool" not in handed and isinstance(handed["ssh"]["port"], int), handed
        # as old as the hand-out, not as its time in the pool (cron's --older-than must not take it)
        assert handed["pooled"] <= handed["created"] and handed["created"] >= handed["started"], handed
        assert not (state / "vms" / member).exists() and (state / "vms" / "mine" / "ssh_key").is_file()
        # the same machine, now called mine: its identity was made for it alone, at its resume
        after = ssh(env, "mine", "sh", "-c", "hostname; cat /etc/machine-id; cat /etc/hostname; "
                    "awk '$1 == \"127.0.1.1\" {print $2}' /etc/hosts")["stdout"].split()
        assert after == ["mine", before[1], "mine", "mine"], (before, after)
        # the usual pipeline takes it as it is; options it does not run with are refused, never dropped
        piped = subprocess.run(["bash", "-o", "pipefail", "-c", f"{BIN}/kp-ls mine | {BIN}/kp-boot | "
                                f"{BIN}/kp-ip --timeout 120"], env=env, capture_output=True, timeout=300)
        assert piped.returncode == 0 and lines(piped.stdout)[0]["name"] == "mine", piped.stderr.decode()[-2000:]
        refused = run(env, "kp-boot", "--allow", "example.com", "mine")
        assert refused.returncode == 1 and b"not as asked" in refused.stderr, refused.stderr.decode()
        assert lines(refused.stdout)[0]["error"]["code"] == "running_differently"

        # kp-clone refilled the pool in the background: a new member, with a machine-id of its own
        deadline = time.monotonic() + 600
        while True:
            pool = one(run(env, "kp-ls", "--kind", "image", "base"))["pool"]
            assert "problem" not in pool, pool
            if pool["ready"] == 1 and pool["members"] != [member]:
                break
            assert time.monotonic() < deadline, pool
            time.sleep(1)
        fresh = pool["members"][0]
        again = ssh(env, fresh, "cat", "/etc/machine-id")["stdout"].split()
        assert again[0] not in (before[1],), (again, before)

        emptied = one(run(env, "kp-pool", "base", "--size", "0"))
        assert emptied.get("pool") is None, emptied
        assert [r["name"] for r in lines(run(env, "kp-ls", "--kind", "vm").stdout) if r.get("pool")] == []
        assert qemu_processes(fresh) == []
        assert one(run(env, "kp-ls", "mine"))["state"] == "running"  # what was handed out is the user's
    finally:
        run(env, "kp-pool", "base", "--size", "0")
        run(env, "kp-rm", "mine")
    assert member and qemu_processes(member) == []  # its QEMU kept its first name: gone with mine


def test_boot_without_qemu_exits_69(golden: dict[str, Any], tmp_path: Path) -> None:
    env = dict(golden["env"])
    one(run(env, "kp-clone", "base", "noqemu"))
    try:
        lonely = tmp_path / "bin"
        lonely.mkdir()
        for tool in ("sh", "dirname", "env"):
            (lonely / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
        proc = run({**env, "PATH": str(lonely)}, "kp-boot", "noqemu")
        assert proc.returncode == 69 and b"apt-get install qemu-system-x86" in proc.stderr
        assert one(run(env, "kp-ls", "noqemu"))["state"] == "stopped"
    finally:
        run(env, "kp-rm", "noqemu")


def test_boot_of_a_clone_whose_base_is_gone_fails_clearly(tmp_path: Path, golden: dict[str, Any]) -> None:
    from tests.integration.conftest import kp_env

    env = kp_env(tmp_path / "state", tmp_path, tmp_path / "cache")
    base = tmp_path / "state" / "images" / "tiny"
    base.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base / "disk.qcow2"), "1G"], check=True)
    for name in ("vmlinuz", "initrd.img"):
        (base / name).write_bytes(b"x")
    (base / "meta.json").write_text(
        '{"kind":"image","name":"tiny","id":"aaaaaaaaaaaa","created":"2026-01-01T00:00:00Z",'
        '"state":"ready","disk":"disk.qcow2","kernel":"vmlinuz","initrd":"initrd.img"}')
    one(run(env, "kp-clone", "tiny", "orphan"))
    run(env, "kp-rm", "--force", "tiny")
    proc = run(env, "kp-boot", "orphan")
    assert proc.returncode == 1
    assert "base image tiny is gone" in lines(proc.stdout)[0]["error"]["message"]


def test_bridge_networking_in_a_test_namespace(golden: dict[str, Any], tmp_path: Path) -> None:
    """A routable guest address on a bridge with DHCP, all inside a network namespace the test makes
    (the bridge, dnsmasq, QEMU's tap, SSH); the tap goes with the VM."""
    env = golden["env"]
    ns = f"kpt{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def inside(*argv: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(["ip", "netns", "exec", ns, *argv], env=env, capture_output=True, **kw)

        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "kpbr0", "type", "bridge"],
                    ["ip", "addr", "add", "10.77.0.1/24", "dev", "kpbr0"], ["ip", "link", "set", "kpbr0", "up"]):
            assert inside(*cmd).returncode == 0
        dnsmasq = subprocess.Popen(["ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--port=0",
                                    "--interface=kpbr0", "--bind-interfaces", "--dhcp-range=10.77.0.50,10.77.0.99",
                                    f"--dhcp-leasefile={tmp_path}/leases", f"--pid-file={tmp_path}/dnsmasq.pid"])
        try:
            one(run(env, "kp-clone", "base", "--cold", "br-1"))
            pipeline = (f"{BIN}/kp-boot --net bridge:kpbr0 br-1 | {BIN}/kp-ip --timeout 400 | "
                        f"{BIN}/kp-ssh -- ip -4 -br addr")
            proc = inside("bash", "-o", "pipefail", "-c", pipeline, timeout=900)
            assert proc.returncode == 0, proc.stderr.decode()[-3000:]
            vm, result = lines(proc.stdout)
            assert vm["address"].startswith("10.77.0.") and vm["ssh"] == {"host": vm["address"], "port": 22,
                                                                          "user": "kp"}
            assert vm["address"] in result["stdout"]
            tap = vm["tap"]
            assert inside("ip", "link", "show", tap).returncode == 0
            assert inside(str(BIN / "kp-rm"), "br-1").returncode == 0
            assert inside("ip", "link", "show", tap).returncode != 0
        finally:
            dnsmasq.terminate()
            dnsmasq.wait(timeout=10)
            run(env, "kp-rm", "br-1")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
