"""Warm images: boot a golden image once, save its running state, and let
clones resume from it in seconds instead of booting cold.

The warm state is three files beside the golden disk: ``warm.qcow2`` (an
overlay holding what the first boot wrote), ``warm.state`` (the device
state) and ``warm.ram`` (the guest's RAM, sparse).  Clones are overlays on
``warm.qcow2``; kp-boot resumes them from ``warm.state`` with their RAM
mapped copy-on-write from one sealed copy of ``warm.ram`` that they all
share (kodepipe.vm.warmram), and gives each its own identity
(kodepipe.vm.identity).  A warm state made before warm.ram existed holds
its RAM in warm.state, and its clones resume from it as they always did.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kodepipe.core import units
from kodepipe.core.errors import InUse, KpError, Timeout
from kodepipe.core.records import Record
from kodepipe.core.state import Store, new_id, now_iso, remove_tree
from kodepipe.vm import address, images, lifecycle, passt, qemu, qemu_img, qemuuser, seriallog, warmram

WARM_DISK = "warm.qcow2"
WARM_STATE = "warm.state"


def warm_clones(store: Store, name: str, warm_id: str) -> list[str]:
    return [vm for vm, meta in store.metas("vm") if meta.get("base") == name and meta.get("warm_id") == warm_id]


def make_warm(store: Store, name: str, *, memory: str, cpus: int, accel: tuple[str, str], timeout: float,
              force: bool, progress: Callable[[str], None]) -> Record:
    """Boot image ``name`` once, wait until SSH answers, and save the running machine."""
    started = time.monotonic()
    with store.lock(name, wait=5.0):
        folder = store.folder("image", name)
        image = images.view(store, name)
        if image.get("state") != "ready":
            raise KpError(f"image {name} is not ready ({image.get('state')})", code="base_not_ready")
        old = image.get("warm")
        if isinstance(old, dict):
            users = warm_clones(store, name, old["id"])
            if users and not force:
                raise InUse(f"{len(users)} clone(s) resume from the current warm state of {name}: "
                            f"{', '.join(users[:5])}", hint="remove them first, or use --force (they become broken)")
        work = folder / ".warming"
        remove_tree(work)
        work.mkdir()
        sockets = qemu.Sockets.for_vm(f"{name}.warm")
        boot_meta: dict[str, Any] = {"sockets": {"qmp": str(sockets.qmp), "qga": str(sockets.qga),
                                                  "serial": str(sockets.serial), "pidfile": str(sockets.pidfile)},
                                     "serial_log": str(work / "serial.log"), "accel": accel[0]}
        ram_fd = None
        try:
            # its RAM is a memfd held here, which QEMU writes (share=on): saved apart, clones share it
            ram_fd = warmram.template(units.parse_size(memory))
            qemu_img.create_overlay(Path(image["disk"]), work / WARM_DISK)
            for stale in sockets.paths():
                stale.unlink(missing_ok=True)
            opts = qemu.BootOptions(memory=memory, cpus=cpus, net="user")
            port = qemu.free_port()
            progress(f"booting {name} once ({accel[0]})")
            # the network of a default kp-boot (passt behind the loopback guard): QEMU resumes a saved
            # state only with the network back end it was saved with
            user = qemuuser.resolve()  # never root, as kp-boot's QEMUs
            with seriallog.pipe(work / "serial.log", user=user) as serial_fd, \
                    passt.serving(work / "passt.log", port, output=work / "qemu.log") as net, \
                    qemuuser.handed(user, sockets, image, work / WARM_DISK) as (handed, plan):
                boot_meta["passt"] = net.record()
                argv = qemu.command_line({"name": name, "id": image["id"], "disk": str(work / WARM_DISK)}, image,
                                         opts, sockets, accel=accel[0], ssh_port=port, serial_fd=serial_fd,
                                         net_fd=net.qemu_fd, fds=handed, ram=(ram_fd, True))
                boot_meta["pid"] = qemu.launch(argv, work / "qemu.log", sockets.qmp,
                                               pass_fds=(serial_fd, net.qemu_fd, ram_fd, *handed.all()), plan=plan)
            _wait_ready(boot_meta, port, started + timeout, progress)
            booted = time.monotonic() - started
            progress(f"ready after {booted:.0f} s; saving its state")
            lifecycle.save_ram(sockets.qmp, work / WARM_STATE, timeout=timeout, ignore_shared=True)
            qemu.wait_gone(boot_meta, 10.0)
            ram_bytes = warmram.write_sparse(ram_fd, work / warmram.RAM_FILE)
        except BaseException:
            qemu.kill(boot_meta)
            qemu.cleanup(boot_meta)
            remove_tree(work)
            raise
        finally:
            if ram_fd is not None:
                os.close(ram_fd)
        qemu.kill(boot_meta)
        qemu.cleanup(boot_meta)
        # the warm files are only ever read from now on, like the golden disk
        for file in (WARM_DISK, WARM_STATE, warmram.RAM_FILE):
            os.chmod(work / file, 0o444)
            os.replace(work / file, folder / file)
        # the overlay named its base relative to .warming/; it now sits beside it
        os.chmod(folder / WARM_DISK, 0o644)
        qemu_img.rename_backing(folder / WARM_DISK, Path(image["disk"]))
        os.chmod(folder / WARM_DISK, 0o444)
        remove_tree(work)
        meta = store.read_meta(folder) or {}
        meta["warm"] = {"id": new_id(), "created": now_iso(), "disk": WARM_DISK, "state": WARM_STATE,
                        "memory": memory, "cpus": cpus, "accel": accel[0], "boot_seconds": round(booted, 1),
                        "netdev": passt.NETDEV,
                        "state_bytes": (folder / WARM_STATE).stat().st_size,
                        "ram": warmram.RAM_FILE, "ram_bytes": ram_bytes}
        store.write_meta(folder, meta)
    return images.view(store, name)


def _wait_ready(boot_meta: dict[str, Any], port: int, deadline: float, progress: Callable[[str], None]) -> None:
    """Until the guest agent answers and SSH is up: the state clones wake up in."""
    from kodepipe.vm.guest_agent import wait_for_agent

    remaining = deadline - time.monotonic()
    try:
        agent = wait_for_agent(Path(boot_meta["sockets"]["qga"]), remaining, alive=lambda: qemu.is_alive(boot_meta))
    except Timeout:
        raise Timeout(f"the guest agent did not answer while warming; the serial console's last lines:\n"
                      f"{address.serial_tail(boot_meta)}") from None
    with agent:
        progress("guest agent is up; waiting for SSH")
        while not address.ssh_banner("127.0.0.1", port):
            if time.monotonic() > deadline:
                raise Timeout("SSH did not come up while warming")
            time.sleep(0.5)
        # the warm machine's own host key is replaced in every clone; settle the disk first
        agent.exec(["/bin/sync"], timeout=60)
