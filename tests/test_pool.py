"""Warm pools (kodepipe.vm.pool) without QEMU: settings, the memory budget, what a hand-out rewrites,
what kp-rm keeps, and kp-boot refusing options a running VM does not run with.  The hand-out of a
real VM, its refill and its identity are tested on real QEMU in tests/integration/test_vm.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from kodepipe import inventory
from kodepipe.core.errors import BadInput, KpError
from kodepipe.core.state import Store
from kodepipe.vm import pool, qemu


def make_image(store: Store, name: str = "base", *, warm: bool = True, memory: str = "1G") -> Path:
    folder = store.folder("image", name)
    folder.mkdir(parents=True)
    for file in ("disk.qcow2", "vmlinuz", "initrd.img", "warm.qcow2"):
        (folder / file).write_bytes(b"x")
    meta: dict[str, Any] = {"kind": "image", "name": name, "id": "aaaaaaaaaaaa", "created": "2026-01-01T00:00:00Z",
                            "state": "ready", "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img"}
    if warm:
        meta["warm"] = {"id": "bbbbbbbbbbbb", "disk": "warm.qcow2", "state": "warm.state", "memory": memory,
                        "cpus": 2, "created": "2026-01-01T00:00:00Z"}
    store.write_meta(folder, meta)
    return folder


def make_member(store: Store, name: str, base: str = "base", *, pooled: bool = True, **extra: Any) -> Path:
    """A clone of ``base`` (without QEMU): a member of its pool unless ``pooled`` is False."""
    folder = store.folder("vm", name)
    folder.mkdir(parents=True)
    (folder / "disk.qcow2").write_bytes(b"x")
    store.write_meta(folder, {"kind": "vm", "name": name, "id": name[-12:].rjust(12, "0"),
                              "created": "2026-01-01T00:00:00Z", "state": "ready", "base": base,
                              "base_id": "aaaaaaaaaaaa", "warm_id": "bbbbbbbbbbbb", "disk": "disk.qcow2",
                              **({"pool": base} if pooled else {}), **extra})
    return folder


def ready_view(name: str, **changes: Any) -> dict[str, Any]:
    """A member's view as kp-ls shows one ready to hand out: running in the boot it was set up in."""
    return {"name": name, "state": "running", "pool_ready": "2026-01-01T00:00:00Z", "pool_boot": "t0",
            "started": "t0", "base_id": "aaaaaaaaaaaa", "warm_id": "bbbbbbbbbbbb", **changes}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


def test_a_hand_out_moves_every_path_in_the_members_folder_and_nothing_else() -> None:
    old, new = "/s/vms/pool-0123", "/s/vms/mine"
    meta = {"serial_log": f"{old}/serial.log", "known_hosts": f"{old}/known_hosts", "folder": old,
            "other": "/s/vms/pool-01234/x", "sockets": {"qmp": "/run/kp/pool-0123.qmp"},
            "list": [f"{old}/a", "relative/pool-0123"], "n": 3, "none": None}
    assert pool._moved(meta, old, new) == {
        "serial_log": "/s/vms/mine/serial.log", "known_hosts": "/s/vms/mine/known_hosts", "folder": new,
        "other": "/s/vms/pool-01234/x",  # a folder whose name only starts the same is another folder
        "sockets": {"qmp": "/run/kp/pool-0123.qmp"},  # sockets keep the paths QEMU and passt were given
        "list": ["/s/vms/mine/a", "relative/pool-0123"], "n": 3, "none": None}


def test_the_memory_budget_keeps_fewer_than_the_size_and_says_so() -> None:
    image = {"warm": {"memory": "1G"}}
    assert pool.target({"size": 3, "max_memory": 8 << 30}, image) == (3, None)
    assert pool.target({"size": 3, "max_memory": (2 << 30) + 1}, image) == (2, "max-memory")
    assert pool.target({"size": 3, "max_memory": 1 << 29}, {"warm": {"memory": "512M"}}) == (1, "max-memory")
    assert pool.target({"size": 2, "max_memory": 0}, image) == (0, "max-memory")


def test_a_pool_needs_a_warm_ready_image_and_a_size_within_bounds(store: Store) -> None:
    make_image(store, "cold", warm=False)
    with pytest.raises(KpError) as info:
        pool.configure(store, "cold", 1, None)
    assert info.value.code == "base_not_warm" and "kp-image warm cold" in str(info.value.hint)
    with pytest.raises(KpError) as missing:
        pool.configure(store, "nothing", 1, None)
    assert missing.value.code == "base_missing"
    make_image(store)
    for size in (-1, pool.MAX_SIZE + 1):
        with pytest.raises(BadInput):
            pool.configure(store, "base", size, None)
    data = pool.configure(store, "base", 2, 3 << 30)
    assert data["size"] == 2 and data["max_memory"] == 3 << 30
    assert pool.settings(store, "base") == data
    assert pool.configure(store, "base", 1, None)["max_memory"] == pool.default_max_memory()


@pytest.mark.parametrize("text", [b"[]", b'{"size": true, "max_memory": 1}', b'{"size": 1, "max_memory": "1G"}',
                                  b'{"size": 1}', b"{not json", b'{"size": 1.5, "max_memory": 1}'])
def test_pool_settings_that_kodepipe_did_not_write_are_a_clear_error(store: Store, text: bytes) -> None:
    folder = make_image(store)
    (folder / pool.POOL_FILE).write_bytes(text)
    with pytest.raises(KpError) as info:
        pool.settings(store, "base")
    assert info.value.code == "broken" and "kp-pool base --size N" in str(info.value.hint)
    # kp-ls shows the problem on the image's record, and lists the rest
    record = next(r for r in inventory.records(store) if r["name"] == "base")
    assert "problem" in record["pool"]
    assert pool.adopt(store, "base", "mine") is None  # nothing is handed out of a pool it cannot read


def test_only_a_ready_running_member_is_handed_out(store: Store) -> None:
    make_image(store)
    assert pool.adopt(store, "base", "mine") is None  # no pool
    pool.configure(store, "base", 1, None)
    make_member(store, "pool-000000000001")  # stopped: no QEMU
    make_member(store, "pool-000000000002", pool_ready="2026-01-01T00:00:00Z")  # ready, but not running
    assert pool.adopt(store, "base", "mine") is None
    assert not store.folder("vm", "mine").exists()
    summary = pool.summary(store, "base", {"warm": {"memory": "1G"}})
    assert summary is not None and summary["ready"] == 0 and len(summary["members"]) == 2


def test_a_bulk_removal_keeps_pooled_vms_and_a_named_one_goes(store: Store) -> None:
    make_image(store)
    make_member(store, "pool-000000000001")
    make_member(store, "pool-000000000002")
    removal = inventory.Removal(store, force=False, dry_run=False)
    listed = inventory.view(store, "vm", "pool-000000000001")
    with pytest.raises(inventory.Kept) as kept:
        removal.remove("vm", "pool-000000000001", expect_id=listed["id"], bulk=True, listed=listed)
    assert "warm pool of base" in kept.value.message and "kp-pool base --size 0" in kept.value.message
    assert store.folder("vm", "pool-000000000001").is_dir()
    assert inventory.remove(store, "vm", "pool-000000000001", expect_id=None, force=False,
                            dry_run=False) is not None
    assert not store.folder("vm", "pool-000000000001").exists()
    # removing the image (named) empties its pool first: its members are not the user's clones
    pool.configure(store, "base", 1, None)
    assert inventory.remove(store, "image", "base", expect_id=None, force=False, dry_run=False) is not None
    assert not store.folder("vm", "pool-000000000002").exists()


def test_emptying_a_pool_removes_its_settings_and_members_only(store: Store) -> None:
    make_image(store)
    pool.configure(store, "base", 2, None)
    make_member(store, "pool-000000000001")
    make_member(store, "mine", pooled=False)
    assert pool.empty(store, "base") == ["pool-000000000001"]
    assert pool.settings(store, "base") is None and store.folder("vm", "mine").is_dir()


def test_a_filler_that_finds_its_pool_gone_removes_what_it_left(store: Store) -> None:
    make_image(store)
    make_member(store, "pool-000000000001")
    assert pool.fill(store, "base") == 0
    assert pool.members(store, "base") == []


def test_a_filler_removes_members_that_can_no_longer_be_handed_out(store: Store,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    make_image(store)
    pool.configure(store, "base", 1, None)
    make_member(store, "pool-000000000001", pool_ready="2026-01-01T00:00:00Z")  # its QEMU is gone
    made: list[str] = []

    def make(store_: Store, base: str, name: str, timeout: float) -> None:
        made.append(name)
        raise KpError("no QEMU here", code="launch_failed")

    monkeypatch.setattr(pool, "_make", make)
    with pytest.raises(KpError):
        pool.fill(store, "base")
    assert not store.folder("vm", "pool-000000000001").exists() and len(made) == pool.ATTEMPTS
    data = pool.settings(store, "base")
    assert data is not None and "no QEMU here" in data["problem"]  # kept for kp-ls
    assert "no QEMU here" in next(r for r in inventory.records(store) if r["name"] == "base")["pool"]["problem"]


RUNNING_OPEN = {"name": "mine", "state": "running", "memory": "1G", "cpus": 2, "net": "user", "share": None,
                "network": "open", "accel": "tcg", "host_loopback": False}


@pytest.mark.parametrize(("given", "opts", "expected"), [
    (frozenset(), qemu.BootOptions(), []),
    (frozenset({"memory"}), qemu.BootOptions(memory="1G"), []),
    (frozenset({"memory"}), qemu.BootOptions(memory="2G"), ["--memory 2G asked, it runs with 1G"]),
    (frozenset({"allow"}), qemu.BootOptions(allow=("example.com",)),
     ["--allow ['example.com'] asked, it runs with none"]),
    (frozenset({"net"}), qemu.BootOptions(net="none"), ["--net none asked, it runs with user"]),
    (frozenset({"accel"}), qemu.BootOptions(accel="kvm"), ["--accel kvm asked, it runs with tcg"]),
    (frozenset({"accel"}), qemu.BootOptions(accel="auto"), []),
])
def test_kp_boot_names_every_option_a_running_vm_does_not_run_with(given: frozenset[str], opts: Any,
                                                                    expected: list[str]) -> None:
    from kodepipe.commands import boot

    assert boot._differences(RUNNING_OPEN, opts, given) == expected


def test_kp_boot_of_a_sealed_vm_with_its_own_rules_passes() -> None:
    from kodepipe.commands import boot

    sealed = {**RUNNING_OPEN, "network": "allowlist", "egress": {"allow": ["example.com"], "resolve": []}}
    assert boot._differences(sealed, qemu.BootOptions(allow=("example.com",)), frozenset({"allow"})) == []
    assert boot._differences(sealed, qemu.BootOptions(allow=("other.com",)), frozenset({"allow"})) == [
        "--allow ['other.com'] asked, it runs with ['example.com']"]


def test_the_hand_out_sets_the_hostname_files_and_nothing_else() -> None:
    from kodepipe.vm import identity

    class Agent:
        def __init__(self) -> None:
            self.files = {"/etc/hosts": b"127.0.0.1\tlocalhost\n127.0.1.1\tpool-0123\n# 127.0.1.1 a comment\n"
                                        b"127.0.1.10\tother\n::1\tlocalhost ip6-localhost\nno-newline-\xff-at-the-end"}
            self.calls: list[str] = []

        def write_file(self, path: str, data: bytes, timeout: float = 60.0) -> None:
            self.calls.append(f"write {path}")
            self.files[path] = data

        def read_file(self, path: str, limit: int = 1 << 20, timeout: float = 30.0) -> bytes:
            self.calls.append(f"read {path}")
            if len(self.files[path]) > limit:
                raise KpError(f"{path} in the guest is larger than {limit} bytes", code="too_large")
            return self.files[path]

    agent = Agent()
    identity.rename(agent, "mine")  # type: ignore[arg-type]
    assert agent.files["/proc/sys/kernel/hostname"] == b"mine\n" and agent.files["/etc/hostname"] == b"mine\n"
    assert agent.files["/etc/hosts"] == (b"127.0.0.1\tlocalhost\n127.0.1.1\tmine\n# 127.0.1.1 a comment\n"
                                         b"127.0.1.10\tother\n::1\tlocalhost ip6-localhost\n"
                                         b"no-newline-\xff-at-the-end\n")
    assert sorted(agent.calls) == sorted(["write /proc/sys/kernel/hostname", "write /etc/hostname",
                                          "read /etc/hosts", "write /etc/hosts"])
    agent.files["/etc/hosts"] = b"#" * (identity.HOSTS_LIMIT + 1)  # not a pool member's own: no rename
    with pytest.raises(KpError) as caught:
        identity.rename(agent, "other")  # type: ignore[arg-type]
    assert caught.value.code == "rename_failed" and "larger than" in caught.value.message


def test_a_member_whose_hand_out_fails_is_never_tried_again(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # a guest agent that does not answer (or a hostile guest) must not make every kp-clone wait on it
    from kodepipe.vm import vms

    make_image(store)
    pool.configure(store, "base", 1, None)
    folder = make_member(store, "pool-000000000001", pool_ready="2026-01-01T00:00:00Z",
                         boot={"sockets": {"qga": "/nonexistent/qga"}})
    monkeypatch.setattr(vms, "view", lambda _s, name: ready_view(name))
    asked: list[str] = []

    def agent(*_a: object, **_k: object) -> None:
        asked.append("agent")
        raise KpError("the guest agent did not answer", code="timeout")

    monkeypatch.setattr("kodepipe.vm.guest_agent.wait_for_agent", agent)
    assert pool.adopt(store, "base", "mine") is None
    meta = orjson.loads((folder / "meta.json").read_bytes())
    assert "pool_ready" not in meta and "did not answer" in meta["pool_problem"] and asked == ["agent"]
    assert not store.folder("vm", "mine").exists()


def test_a_member_that_fails_once_is_replaced_and_the_fill_goes_on(store: Store,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from kodepipe.vm import vms

    make_image(store)
    pool.configure(store, "base", 1, None)
    made: list[str] = []

    def make(store_: Store, base: str, name: str, timeout: float) -> None:
        made.append(name)
        if len(made) == 1:
            raise KpError("lost the connection to the guest agent", code="guest_agent_unreachable")
        make_member(store_, name, pool_ready="2026-01-01T00:00:00Z")

    monkeypatch.setattr(pool, "_make", make)
    monkeypatch.setattr(vms, "view", lambda _s, name: ready_view(name))
    assert pool.fill(store, "base") == 1
    assert len(made) == 2 and pool.members(store, "base") == [made[1]]
    data = pool.settings(store, "base")
    assert data is not None and "problem" not in data


@pytest.mark.parametrize(("changes", "ready"), [
    ({}, True),
    ({"state": "stopped"}, False),
    ({"started": "t1"}, False),  # booted again since it was set up (perhaps with other options)
    ({"pool_boot": None}, False),
    ({"warm_id": "cccccccccccc"}, False),  # the warm state was remade (kp-image warm --force)
    ({"base_id": "dddddddddddd"}, False),  # the image was rebuilt
    ({"pool_ready": None}, False),
])
def test_ready_means_running_in_the_boot_it_was_set_up_in_from_the_current_warm_state(
        store: Store, changes: dict[str, Any], ready: bool) -> None:
    from kodepipe.vm import images

    make_image(store)
    assert pool._is_ready(ready_view("pool-000000000001", **changes), images.view(store, "base")) is ready


def test_an_image_that_is_refused_keeps_its_pool(store: Store) -> None:
    from kodepipe.core.errors import InUse

    make_image(store)
    pool.configure(store, "base", 1, None)
    make_member(store, "pool-000000000001")
    make_member(store, "mine", pooled=False)
    with pytest.raises(InUse):
        inventory.remove(store, "image", "base", expect_id=None, force=False, dry_run=False)
    assert pool.settings(store, "base") is not None and store.folder("vm", "pool-000000000001").is_dir()
    # a stale record (another id) is refused before anything happens too
    with pytest.raises(KpError):
        inventory.remove(store, "image", "base", expect_id="ffffffffffff", force=True, dry_run=False)
    assert pool.settings(store, "base") is not None and store.folder("vm", "pool-000000000001").is_dir()


def test_a_name_that_exists_is_never_handed_a_member(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from kodepipe.vm import vms

    make_image(store)
    pool.configure(store, "base", 1, None)
    make_member(store, "pool-000000000001", pool_ready="2026-01-01T00:00:00Z")
    monkeypatch.setattr(vms, "view", lambda _s, name: ready_view(name))
    # its own name (kp-clone base pool-...): no lock taken twice, no wait; kp-clone then says it exists
    assert pool.adopt(store, "base", "pool-000000000001") is None


def test_kp_boot_compares_memory_as_a_size_and_writable_git_as_asked() -> None:
    from kodepipe.commands import boot

    running = {**RUNNING_OPEN, "memory": "1G", "loosened": ["writable-git"]}
    assert boot._differences(running, qemu.BootOptions(memory="1024M"), frozenset({"memory"})) == []
    assert boot._differences(running, qemu.BootOptions(writable_git=True), frozenset({"writable_git"})) == []
    assert boot._differences(RUNNING_OPEN, qemu.BootOptions(writable_git=True), frozenset({"writable_git"})) == [
        "--writable-git True asked, it runs with False"]


def test_kp_boot_refuses_a_warm_clone_options_it_would_not_resume_with(store: Store) -> None:
    from kodepipe.commands import boot

    make_image(store)
    make_member(store, "warm-1", pooled=False, saved={"saved": "2026-01-01T00:00:00Z", "memory": "1G", "cpus": 2,
                                                     "net": "user", "share": None, "warm": True})
    boot._check_saved(store, "warm-1", qemu.BootOptions(), frozenset())  # nothing asked: it resumes
    boot._check_saved(store, "warm-1", qemu.BootOptions(memory="1024M"), frozenset({"memory"}))
    with pytest.raises(KpError) as info:  # --net none must never resume an open VM
        boot._check_saved(store, "warm-1", qemu.BootOptions(net="none"), frozenset({"net"}))
    assert info.value.code == "net_on_saved" and "--net none asked" in info.value.message
    with pytest.raises(KpError):
        boot._check_saved(store, "warm-1", qemu.BootOptions(memory="4G"), frozenset({"memory"}))


def test_a_failed_members_qemu_log_is_kept_in_pool_log_and_the_problem_points_there(store: Store) -> None:
    folder = make_image(store)
    member = make_member(store, "pool-000000000009")
    (member / "qemu.log").write_bytes(b"x" * 5000 + b"\n$ qemu-system-x86_64 ...\nqemu: could not load kernel\n")
    message = f"QEMU failed to start: could not load kernel; its command line and output are in {member}/qemu.log"
    said = pool._keep_qemu_log(store, "base", "pool-000000000009", message)
    assert said == (f"QEMU failed to start: could not load kernel; its command line and output are in "
                    f"{folder}/pool.log (copied from pool-000000000009's, removed)")
    kept = (folder / "pool.log").read_bytes()
    assert b"qemu: could not load kernel" in kept and len(kept) < 4200  # the end only
    # a member that never got as far as a log: the message stays as it was
    assert pool._keep_qemu_log(store, "base", "pool-00000000000a", "resuming it failed") == "resuming it failed"
