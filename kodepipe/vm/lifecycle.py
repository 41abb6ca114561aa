"""Running VMs: boot, stop, suspend, resume, save, and cleaning up after them."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kodepipe.core import proc
from kodepipe.core.errors import BadInput, KpError, NotFound
from kodepipe.core.records import Record
from kodepipe.core.state import Store, check_id, now_iso
from kodepipe.vm import images, passt, qemu, qemuuser, seriallog, vms

if TYPE_CHECKING:
    from kodepipe.host import hostpath

RAM_STATE = "ram.state"


def vm_meta(store: Store, name: str, expect_id: str | None) -> tuple[Path, dict[str, Any]]:
    folder = store.folder("vm", name)
    if not folder.is_dir():
        other = store.lookup(name)
        if other is not None:
            raise NotFound(f"{name} is an {other[0]}, not a VM", hint="kp-clone IMAGE NAME makes a VM from it")
        raise NotFound(f"there is no VM named {name}", hint="kp-clone BASE NAME makes one")
    meta = store.read_meta(folder)
    if meta is None:
        raise KpError(f"{name} is broken: its creation was interrupted", code="broken", hint=f"kp-rm {name}")
    check_id(meta, expect_id)
    return folder, meta


def boot(store: Store, name: str, opts: qemu.BootOptions, accel: tuple[str, str], *,
         expect_id: str | None = None, say: Callable[[str], None] = lambda _m: None,
         disk_key: Callable[[dict[str, Any]], str] | None = None) -> tuple[Record, bool]:
    """Start VM ``name``; returns its record and whether it was already running.  ``say`` warns;
    ``disk_key`` reads a data disk's key from its source (kodepipe.egress.sources, by kp-boot)."""
    with store.lock(name), contextlib.ExitStack() as hold:
        folder, meta = vm_meta(store, name, expect_id)
        current = vms.view(store, name)
        if current["state"] in ("running", "suspended"):
            return current, True
        if current["state"] == "frozen":  # its QEMU is alive: a second one must never start on the same disk
            vms.require_running(current)
        if current["state"] == "broken":
            raise KpError(f"{name} cannot boot: {current.get('problem')}", code="broken",
                          hint=f"remove it with kp-rm {name}")
        if current["state"] == "crashed":
            qemu.cleanup(meta["boot"])
        # what a guest that crashed (or was killed) left in its share is dealt with before a new one starts
        _settle_share(folder, name, meta.get("boot") or meta.get("saved") or {}, {}, say)
        saved = meta.get("saved") if isinstance(meta.get("saved"), dict) else None
        if saved is not None and saved.get("warm"):
            # the warm state's files, its RAM and its id read as one: kp-image warm --force replaces them
            # under the image's lock
            hold.enter_context(store.lock(meta["base"], shared=True, wait=10.0))
        image = images.view(store, meta["base"])
        if saved is not None and saved.get("warm") and isinstance(image.get("warm"), dict) \
                and image["warm"].get("problem"):
            raise KpError(f"{name} cannot resume: the warm state of {meta['base']} is damaged "
                          f"({image['warm']['problem']})", code="broken",
                          hint=f"remake it with kp-image warm --force {meta['base']}, or clone it with kp-clone --cold")
        if saved is not None:
            # a saved machine resumes with the very hardware it was saved with: a share cannot be added
            if opts.disks:
                how = "a warm clone" if saved.get("warm") else "a saved VM"
                raise KpError(f"{name} is {how}: it resumes with the hardware it was saved with, which has no "
                              "data disk", code="disk_on_saved",
                              hint="clone it with kp-clone --cold to boot it with --disk" if saved.get("warm")
                              else "boot it without --disk, or kp-stop and boot a fresh clone")
            if opts.share is not None and str(opts.share) != saved.get("share"):
                how = "a warm clone" if saved.get("warm") else "a saved VM"
                raise KpError(f"{name} is {how}: it resumes with the hardware it was saved with, which has "
                              f"{'no shared folder' if not saved.get('share') else 'share ' + str(saved['share'])}",
                              code="share_on_saved",
                              hint="clone it with kp-clone --cold to boot it with --share" if saved.get("warm")
                              else "boot it without --share, or kp-stop and boot a fresh clone")
            opts = qemu.BootOptions(memory=saved["memory"], cpus=saved["cpus"], accel=opts.accel,
                                    net=saved["net"], share=Path(saved["share"]) if saved.get("share") else None,
                                    writable_git=bool(saved.get("writable_git", opts.writable_git)),
                                    host_loopback=_saved_host_loopback(name, saved, image, opts, say),
                                    # outside QEMU's saved state: the guard, the proxy and passt's forwards
                                    allow=opts.allow, resolve=opts.resolve, publish=opts.publish, disks=opts.disks,
                                    preset=opts.preset, widened=opts.widened, packages=opts.packages)
            try:
                opts.check()
            except BadInput as exc:
                raise KpError(f"{name} resumes with the network it was saved with: {exc.message}",
                              code="net_on_saved") from None
        sockets = qemu.Sockets.for_vm(name)
        for stale in sockets.paths():
            stale.unlink(missing_ok=True)
        serial_log, qemu_log = folder / "serial.log", folder / "qemu.log"
        user = image.get("user", "kp")
        qemu_user = qemuuser.resolve(share_owner=qemuuser.share_owner(opts.share))
        boot_meta: dict[str, Any] = {
            "pid": None, "boot_id": proc.boot_id(), "started": now_iso(), "accel": accel[0],
            "accel_reason": accel[1], "memory": opts.memory, "cpus": opts.cpus, "net": opts.net,
            "share": str(opts.share) if opts.share else None, "mac": qemu.mac_address(meta.get("id") or name),
            "sockets": {"qmp": str(sockets.qmp), "qga": str(sockets.qga), "serial": str(sockets.serial),
                        "pidfile": str(sockets.pidfile)},
            "serial_log": str(serial_log), "qemu_log": str(qemu_log), "resumed": saved is not None,
            "qemu_user": qemu_user.record(),  # who a guest that escaped QEMU would be: never root
            # --net user reaches the host's loopback services only when asked (slirp); passt's guest does not
            "host_loopback": opts.net == "user" and opts.host_loopback,
        }
        if boot_meta["host_loopback"]:
            boot_meta["loosened"] = ["host-loopback"]
        _network_meta(boot_meta, opts, folder, name)
        if opts.preset is not None:
            boot_meta["preset"] = opts.preset
        if opts.widened:
            boot_meta["loosened"] = [*boot_meta.get("loosened", []), *opts.widened]
        if opts.packages:
            boot_meta["packages"] = list(opts.packages)
        data: list[tuple[str, Path, str]] = []  # (name, qcow2, key) of each data disk, claimed for this boot
        for index, (disk_name, mountpoint) in enumerate(opts.disks):
            from kodepipe.vm import disks

            path, source = disks.claim(store, disk_name, name, boot_meta["started"])
            if disk_key is None:
                raise KpError("a data disk needs its key read (kp-boot reads it)")
            data.append((disk_name, path, disk_key(source)))
            boot_meta.setdefault("disks", []).append({"name": disk_name, "mountpoint": mountpoint,
                                                      "serial": disks.serial(index)})
        # recorded before QEMU starts, so a crash in between still leaves a trail to its pid file
        meta["boot"] = boot_meta
        store.write_meta(folder, meta)
        share_git = None
        try:
            if opts.share is not None:
                # the share's git repositories, read-only in QEMU's own mount namespace (sharegit.py)
                from kodepipe.vm import sharegit

                share_git = sharegit.prepare(opts.share, folder, writable=opts.writable_git)
                boot_meta["share_git"] = share_git.record
                if opts.writable_git:
                    boot_meta["loosened"] = [*boot_meta.get("loosened", []), "writable-git"]
                for warning in share_git.warnings:
                    say(f"{name}: {warning}")
                store.write_meta(folder, meta)
            if opts.net.startswith("bridge:"):
                from kodepipe.vm import tap

                boot_meta["tap"] = tap.create(opts.net.split(":", 1)[1], meta.get("id") or name)
                store.write_meta(folder, meta)
            def launch(how: str) -> tuple[int, int | None]:
                return _launch(meta, image, opts, sockets, how, serial_log, qemu_log, folder, saved,
                               boot_meta.get("tap"), share_git.read_only if share_git else None,
                               boot_meta=boot_meta, user=qemu_user, say=lambda message: say(f"{name}: {message}"),
                               data=data)

            if accel[0] == "kvm" and saved is None:  # a resumed guest says nothing: the guest agent proves it
                pid, port = _launch_under_kvm(name, boot_meta, launch, sockets, serial_log, qemu_log,
                                              fallback=opts.accel == "auto",
                                              save=lambda: store.write_meta(folder, meta))
            else:
                pid, port = launch(accel[0])
            boot_meta["pid"] = pid
            boot_meta["ssh"] = {"host": "127.0.0.1", "port": port, "user": user} if port else None
            if saved is not None and saved.get("warm"):
                # a warm clone must not be usable before it stops being a copy of the others
                boot_meta["reseed_seconds"] = round(_reseed(boot_meta, name, meta.get("id") or name), 2)
            elif saved is not None:
                _set_clock(boot_meta)
        except BaseException:
            qemu.kill(boot_meta)
            qemu.cleanup(boot_meta)
            if share_git is not None:
                (folder / "share-git.json").unlink(missing_ok=True)  # no guest ran: nothing to settle
            meta.pop("boot", None)
            store.write_meta(folder, meta)
            raise
        if saved is not None:
            meta.pop("saved", None)
            if not saved.get("warm"):
                (folder / RAM_STATE).unlink(missing_ok=True)
        store.write_meta(folder, meta)
    return vms.view(store, name), False


def _launch_under_kvm(name: str, boot_meta: dict[str, Any], launch: Callable[[str], tuple[int, int | None]],
                      sockets: qemu.Sockets, serial_log: Path, qemu_log: Path, *, fallback: bool,
                      save: Callable[[], None]) -> tuple[int, int | None]:
    """Cold-boot under KVM and watch the serial console, the second line of defence after accel's probe.

    A guest kernel writes its first line within a second or two even under TCG; one that stays silent
    for accel.SILENT_BOUND seconds, or a QEMU that ends (or cannot start) under KVM, means KVM does not
    run guests here.  Under --accel auto (``fallback``) the VM is stopped and booted again under TCG,
    the record's accel_reason says why, and the verdict is kept for the host's boot; under --accel kvm
    it is an error.
    """
    from kodepipe.vm import accel

    since = seriallog.mark(serial_log)
    try:
        pid, port = launch("kvm")
    except KpError as exc:
        if not fallback:
            raise
        why = f"QEMU failed to start under KVM ({exc.args[0] if exc.args else exc.code})"
    else:
        boot_meta["pid"] = pid
        seen = accel.watch_console(serial_log, since, lambda: qemu.is_alive(boot_meta))
        if seen == "printed":
            return pid, port
        if seen == "silent":
            why = f"the guest under KVM wrote nothing on its serial console within {accel.SILENT_BOUND:g} s"
        else:
            why = ("QEMU ended under KVM before the guest wrote anything on its serial console"
                   f" ({_last_output(qemu_log) or 'no message'})")
        qemu.kill(boot_meta)
        boot_meta["pid"] = None
        if not fallback:
            accel.remember(False, why)  # a later --accel auto need not wait for the bound again
            raise KpError(f"{name}: {why}: KVM does not run guests on this host", code="kvm_silent",
                          hint="use --accel tcg (or --accel auto, which falls back to TCG by itself)")
    reason = f"{why}, so it was stopped and booted again under TCG"
    for stale in sockets.paths():
        stale.unlink(missing_ok=True)
    boot_meta.update(accel="tcg", accel_reason=reason)
    save()
    started = launch("tcg")
    accel.remember(False, reason)  # only now: had TCG failed too, KVM would not have been the cause
    return started


def _last_output(qemu_log: Path) -> str:
    """What the last QEMU started with qemu.launch wrote (after the "$ argv" line it begins with)."""
    try:
        text = qemu_log.read_bytes()[-16384:].decode("utf-8", "replace")
    except OSError:
        return ""
    output = text.rsplit("\n$ ", 1)[-1].partition("\n")[2]
    return proc.tail(output, 3)


def _set_clock(boot_meta: dict[str, Any]) -> None:
    """A resumed guest's clock stopped when it was saved: set it from the host's."""
    from kodepipe.vm.guest_agent import wait_for_agent

    with wait_for_agent(Path(boot_meta["sockets"]["qga"]), 30.0, alive=lambda: qemu.is_alive(boot_meta)) as agent:
        agent.set_time(time.time_ns())


def _reseed(boot_meta: dict[str, Any], name: str, vm_id: str) -> float:
    from kodepipe.vm import identity
    from kodepipe.vm.guest_agent import wait_for_agent

    with wait_for_agent(Path(boot_meta["sockets"]["qga"]), 60.0, alive=lambda: qemu.is_alive(boot_meta)) as agent:
        mac = qemu.mac_address(vm_id) if str(boot_meta.get("net", "")).startswith("bridge:") else None
        return identity.reseed(agent, name, mac)


def _launch(meta: dict[str, Any], image: Record, opts: qemu.BootOptions, sockets: qemu.Sockets, accel: str,
            serial_log: Path, qemu_log: Path, folder: Path, saved: dict[str, Any] | None,
            tap_device: str | None, share_readonly: hostpath.InPlace | None, *,
            boot_meta: dict[str, Any] | None = None, user: qemuuser.QemuUser | None = None,
            say: Callable[[str], None] = lambda _m: None,
            data: list[tuple[str, Path, str]] | None = None) -> tuple[int, int | None]:
    vm = {**meta, "disk": str(folder / meta["disk"])}
    user = user or qemuuser.resolve()  # QEMU never runs as root (kodepipe.vm.qemuuser)
    passt_net = opts.net == "user" and not opts.host_loopback
    _check_published(opts)
    for attempt in range(3):
        port = qemu.free_port() if opts.net == "user" else None
        fds: tuple[int, ...] = ()
        incoming = None
        state_fd = None
        opened: list[int] = []  # the data disks' fds and key pipes: QEMU holds its own copies
        ram = None  # a warm clone's RAM: the warm state's, shared copy-on-write (kodepipe.vm.warmram)
        if saved is not None:
            # QEMU's sandbox forbids exec: migrations come in on an inherited fd
            state_fd = os.open(_state_file(image, folder, saved), os.O_RDONLY)
            fds, incoming = (state_fd,), f"fd:{state_fd}"
        try:
            from kodepipe.vm import warmram

            if saved is not None and saved.get("warm") and warmram.shared(image):
                ram = warmram.obtain(image)
                opened.append(ram)
                # the capability must be set before the state comes in, so QEMU waits for it
                fds, incoming = (ram,), "defer"
            # the serial log goes through a keeper that bounds it (kodepipe.vm.seriallog); --net user is
            # passt behind the loopback guard (kodepipe.vm.passt), unless --host-loopback asked for slirp
            with seriallog.pipe(serial_log, user=user) as serial_fd, \
                    _network(passt_net, port, folder, qemu_log, opts, user) as net, \
                    qemuuser.handed(user, sockets, image, Path(vm["disk"]), share=opts.share, tap=tap_device,
                                    read_only=share_readonly) as (handed, plan):
                if boot_meta is not None and plan.idmap is not None:
                    boot_meta["share_idmap"] = {"owner": list(plan.idmap), "qemu": [user.uid, user.gid]}
                if net is not None and boot_meta is not None:
                    boot_meta.update(passt=net.record(), dns=list(net.dns.servers))
                    if net.dns.problem:
                        say(net.dns.problem)
                net_fds = (net.qemu_fd,) if net is not None else ()
                data_disks = _open_data(data or [], opened, user)
                argv = qemu.command_line(vm, image, opts, sockets, accel=accel, ssh_port=port, serial_fd=serial_fd,
                                         incoming=incoming, tap=tap_device,
                                         net_fd=net.qemu_fd if net is not None else None, fds=handed,
                                         data_disks=data_disks, ram=(ram, False) if ram is not None else None)
                data_fds = tuple(fd for disk in data_disks for fd in (disk.fd, disk.key_fd))
                pid = qemu.launch(argv, qemu_log, sockets.qmp,
                                  pass_fds=(*fds, serial_fd, *net_fds, *handed.all(), *data_fds), plan=plan)
            if ram is not None and state_fd is not None:
                _load_shared(sockets.qmp, state_fd)
            if saved is not None:
                _wait_incoming(sockets.qmp)
            return pid, port
        except KpError as exc:
            # another program took the SSH port between our probe and QEMU's (or passt's) bind: try another
            if not any(s in exc.message for s in ("hostfwd", "host forwarding", "Failed to bind")) or attempt == 2:
                raise
        finally:
            if state_fd is not None:
                os.close(state_fd)
            for fd in opened:
                os.close(fd)
    raise AssertionError("unreachable")


def _open_data(data: list[tuple[str, Path, str]], opened: list[int],
               user: qemuuser.QemuUser) -> tuple[qemu.DataDisk, ...]:
    """Each data disk's qcow2 opened for QEMU, and its key in a sealed memfd that only QEMU's user may
    read, which QEMU's secret object reads through /proc/self/fd (QEMU opens it again by that path)."""
    import fcntl

    from kodepipe.vm import disks

    found = []
    for index, (_name, path, key) in enumerate(data):
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        opened.append(fd)
        secret = os.memfd_create("kp-disk-key", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        opened.append(secret)
        os.write(secret, key.encode())
        fcntl.fcntl(secret, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        os.fchmod(secret, 0o400)
        if os.geteuid() == 0:
            os.fchown(secret, user.uid, user.gid)
        found.append(qemu.DataDisk(str(path), fd, secret, disks.serial(index)))
    return tuple(found)


def _network_meta(boot_meta: dict[str, Any], opts: qemu.BootOptions, folder: Path, name: str) -> None:
    """What the vm record says of the guest's network beyond ``net``: sealed behind its egress proxy
    (``egress``, ``egress_log``: kp-trace reads it like a container's) or open, and its published ports."""
    if opts.net != "user":
        return
    if opts.allow:
        boot_meta["network"] = "allowlist"
        boot_meta["egress"] = {"allow": list(opts.allow), "resolve": list(opts.resolve),
                               "proxy": f"http://{passt.GATEWAY}:{passt.PROXY_PORT}"}
        boot_meta["egress_log"] = str(folder / "egress.jsonl")
        # the policy the VM's proxy reads (kodepipe.egress.gate), written before anything starts
        import orjson

        spec = {"name": name, "rules": list(opts.allow), "pins": list(opts.resolve)}
        (folder / "egress.json").write_bytes(orjson.dumps(spec))
    else:
        boot_meta["network"] = "open"
    if opts.publish:
        boot_meta["publish"] = [str(passt.parse_publish(p)) for p in opts.publish]
        boot_meta["loosened"] = [*boot_meta.get("loosened", []), *(f"publish:{p}" for p in boot_meta["publish"])]


def _network(passt_net: bool, port: int | None, folder: Path, qemu_log: Path, opts: qemu.BootOptions,
             user: qemuuser.QemuUser) -> contextlib.AbstractContextManager[passt.Started | None]:
    """passt and its guard for one QEMU (kodepipe.vm.passt), and the VM's egress proxy with --allow; or
    nothing (slirp, bridge, none)."""
    if not passt_net:
        return contextlib.nullcontext()
    gate = passt.Gate(folder, f"{user.uid}:{user.gid}") if opts.allow else None
    return passt.serving(folder / "passt.log", port, output=qemu_log,
                         publish=tuple(map(passt.parse_publish, opts.publish)), gate=gate)


def _check_published(opts: qemu.BootOptions) -> None:
    """A published host port that is taken fails now, with a clear error (not as a retry of SSH's)."""
    for each in map(passt.parse_publish, opts.publish):
        why = passt.port_taken(each)
        if why is not None:
            raise KpError(f"--publish {each}: the host port {each.host}:{each.port} cannot be bound ({why})",
                          code="port_taken", hint="choose another host port, or stop what listens there")


def _saved_host_loopback(name: str, saved: dict[str, Any], image: Record, opts: qemu.BootOptions,
                         say: Callable[[str], None]) -> bool:
    """Whether a saved machine's --net user is slirp (host loopback): the network it was saved with.

    QEMU cannot load a state saved with one network back end into another (slirp has its own section
    of the saved state).  A state saved before kp-boot used passt has no "netdev": it is slirp's.
    A warm state of slirp's is refused unless --host-loopback asks for it (its clones would reach the
    host's loopback unasked); a VM of the user's own saved then resumes as it was, said on stderr.
    """
    if saved.get("net") != "user":
        return False
    warm = image.get("warm") if saved.get("warm") and isinstance(image.get("warm"), dict) else None
    netdev = (warm or {}).get("netdev") if saved.get("warm") else saved.get("netdev")
    if netdev == passt.NETDEV:
        if opts.host_loopback:
            how = "a warm clone" if warm is not None else "a saved VM"
            raise KpError(f"{name} is {how} saved without --host-loopback: it resumes with the network it was "
                          "saved with (passt)", code="net_on_saved",
                          hint="boot it without --host-loopback, or boot a cold clone (kp-clone --cold) with it")
        return False
    if warm is not None and not opts.host_loopback:
        base = image.get("name")
        raise KpError(f"{name} is a warm clone of a warm state of {base} made with QEMU's user networking (slirp), "
                      "whose guests reach the host's loopback services; it cannot resume with passt",
                      code="warm_outdated",
                      hint=f"remake the warm state with kp-image warm --force {base} and clone again, clone it with "
                           f"kp-clone --cold, or boot it with --host-loopback to resume it as it was")
    if not opts.host_loopback:
        say(f"{name}: it was saved with QEMU's user networking (slirp) and resumes with it: its guest can reach "
            "the host's loopback services (host_loopback in its record)")
    return True


def _state_file(image: Record, folder: Path, saved: dict[str, Any]) -> Path:
    if saved.get("warm"):
        return Path(str(image["path"])) / str(image["warm"]["state"])
    return folder / RAM_STATE


def _load_shared(qmp_socket: Path, state_fd: int) -> None:
    """Load a warm state saved with x-ignore-shared into a QEMU started with -incoming defer: the devices
    come from the state, the RAM is already there (the warm RAM's memfd, mapped privately)."""
    from kodepipe.vm.qmp import Monitor

    with Monitor(qmp_socket) as monitor:
        monitor.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        monitor.send_fd(state_fd, "kpload")
        monitor.execute("migrate-incoming", {"uri": "fd:kpload"})


def _wait_incoming(qmp_socket: Path, timeout: float = 120.0) -> None:
    from kodepipe.vm.qmp import Monitor

    deadline = time.monotonic() + timeout
    with Monitor(qmp_socket) as monitor:
        while True:
            status = monitor.status()
            if status == "running":
                return
            if status == "paused":
                # the state was saved from a stopped VM: once loaded, start it
                migration = monitor.execute("query-migrate").get("status")
                if migration == "completed":
                    monitor.execute("cont")
                    continue
                if migration in ("failed", "cancelled"):
                    raise KpError(f"resuming the saved state failed: loading it {migration}", code="resume_failed")
            elif status not in ("inmigrate", "prelaunch", "restore-vm"):
                raise KpError(f"resuming the saved state failed: the VM is {status}", code="resume_failed")
            if time.monotonic() > deadline:
                raise KpError(f"resuming the saved state took longer than {timeout:g} s", code="resume_failed")
            time.sleep(0.1)


def stop(store: Store, name: str, *, timeout: float, graceful: bool = True,
         expect_id: str | None = None, say: Callable[[str], None] = lambda _m: None) -> tuple[Record, str]:
    """Shut VM ``name`` down: guest agent, then ACPI, then kill. Returns the record and how it stopped;
    with a share, what the guest planted there is neutralised (sharegit.settle) and on the record."""
    with store.lock(name, wait=timeout + 10):
        folder, meta = vm_meta(store, name, expect_id)
        boot_meta = meta.get("boot")
        if not isinstance(boot_meta, dict):
            return vms.view(store, name), "not running"
        how = "already gone"
        if qemu.is_alive(boot_meta):
            how = _shut_down(boot_meta, timeout) if graceful else "killed"
            qemu.kill(boot_meta)  # nothing to do if it shut down
        qemu.cleanup(boot_meta)
        meta.pop("boot", None)
        store.write_meta(folder, meta)
        found: dict[str, Any] = {}
        _settle_share(folder, name, boot_meta, found, say)
    return {**vms.view(store, name), **found}, how


def _settle_share(folder: Path, name: str, boot_meta: dict[str, Any], record: dict[str, Any],
                  say: Callable[[str], None]) -> None:
    """QEMU is gone: neutralise what the guest planted in its share's git metadata (sharegit.py),
    onto ``record`` and said."""
    from kodepipe.vm import sharegit

    planted, problem = sharegit.settle(folder, name)
    for warning in sharegit.report(planted, problem, str(boot_meta.get("share") or "?"), record):
        say(f"{name}: {warning}")


def _shut_down(boot_meta: dict[str, Any], timeout: float) -> str:
    """Ask nicely, twice, each with half the time; say which way worked ("killed" if none)."""
    from kodepipe.vm.guest_agent import GuestAgent
    from kodepipe.vm.qmp import Monitor

    sockets = boot_meta["sockets"]
    try:
        if boot_meta.get("paused"):  # a frozen guest cannot shut itself down
            with Monitor(Path(sockets["qmp"])) as monitor:
                monitor.execute("cont")
        with GuestAgent(Path(sockets["qga"])) as agent:
            agent.sync(timeout=min(3.0, timeout))
            agent.shutdown("powerdown")
        if qemu.wait_gone(boot_meta, timeout / 2):
            return "guest agent"
    except KpError:
        pass
    try:
        with Monitor(Path(sockets["qmp"])) as monitor:
            monitor.execute("system_powerdown")
        if qemu.wait_gone(boot_meta, timeout / 2):
            return "ACPI power button"
    except KpError:
        pass
    return "killed"


def pause(store: Store, name: str, *, resume: bool, expect_id: str | None = None) -> Record:
    """Freeze (QMP stop) or thaw (cont) a running VM; its processes keep their state."""
    from kodepipe.vm.qmp import Monitor

    with store.lock(name):
        folder, meta = vm_meta(store, name, expect_id)
        boot_meta = meta.get("boot")
        if not isinstance(boot_meta, dict) or not qemu.is_alive(boot_meta):
            raise KpError(f"{name} is not running", code="not_running",
                          hint="kp-boot starts it" + (" (it was saved: kp-boot resumes it)"
                                                      if meta.get("saved") else ""))
        with Monitor(Path(boot_meta["sockets"]["qmp"])) as monitor:
            if resume:  # from kp-stop --suspend, and from the frozen states QEMU can leave (Monitor.resume)
                monitor.resume(name)
                (folder / (RAM_STATE + ".partial")).unlink(missing_ok=True)  # left by a kp-stop --save cut off
            else:
                monitor.execute("stop")
        boot_meta["paused"] = not resume
        store.write_meta(folder, meta)
    return vms.view(store, name)


def save_ram(qmp_socket: Path, target: Path, *, timeout: float, ignore_shared: bool = False) -> None:
    """Freeze the VM, write its whole state to ``target`` and end QEMU.

    ``ignore_shared``: leave out RAM that is a shared file mapping (kp-image warm's memfd, which
    kodepipe.vm.warmram keeps itself): the state is then the devices alone.

    The file goes to QEMU as an open fd (its sandbox forbids exec: URIs).
    On failure, a timeout or an interruption the save is cancelled and the
    VM thawed and left running: left alone, QEMU would finish the save and
    keep the VM frozen (postmigrate) with nobody to end it.
    """
    from kodepipe.vm.qmp import Monitor

    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    ended = False
    try:
        with Monitor(qmp_socket) as monitor:
            monitor.execute("stop")
            # said either way: a warm clone's QEMU loaded its state with the capability on, and a state saved
            # with it on loads only into a QEMU that sets it too
            monitor.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]})
            monitor.send_fd(fd, "kpsave")
            monitor.execute("migrate", {"uri": "fd:kpsave"})
            deadline = time.monotonic() + timeout
            while True:
                info = monitor.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    detail = f": {info['error-desc']}" if info.get("error-desc") else ""
                    raise KpError(f"saving the VM's state failed: migration {status}{detail}", code="save_failed")
                time.sleep(0.1)
            monitor.execute("quit")
            ended = True
    except BaseException:
        if not ended:
            _thaw(qmp_socket, target.parent.name)
        raise
    finally:
        os.close(fd)


def _thaw(qmp_socket: Path, name: str) -> None:
    """Cancel a save that failed or was interrupted and run the VM again (a new session: the old one
    may have been cut off mid-command).  If that fails too, kp-ls shows the VM as frozen, and why."""
    from kodepipe.vm.qmp import Monitor

    try:
        with Monitor(qmp_socket) as monitor:
            monitor.resume(name)
    except KpError:
        pass


def _unmount_share(boot_meta: dict[str, Any], name: str) -> None:
    """QEMU cannot migrate (so cannot save) a VM while a 9p export is mounted in it;
    unmount it first (kp-ip mounts it again after the resume)."""
    from kodepipe.vm.guest_agent import GuestAgent

    with GuestAgent(Path(boot_meta["sockets"]["qga"])) as agent:
        agent.sync(timeout=5.0)
        status, _, err = agent.exec(["/bin/sh", "-c", "! mountpoint -q /workspace || umount /workspace"], timeout=30)
    if status != 0:
        why = err.decode(errors="replace").strip()
        raise KpError(f"{name} cannot be saved while its shared folder is in use ({why})",
                      code="share_busy", hint="QEMU cannot save a VM with a mounted 9p share: close the files under "
                      "/workspace in the guest, or stop the VM instead")


def save(store: Store, name: str, *, timeout: float, expect_id: str | None = None,
         say: Callable[[str], None] = lambda _m: None) -> Record:
    """Save the VM's RAM to its folder and end QEMU; kp-boot resumes it, even after a host reboot."""
    with store.lock(name, wait=timeout + 10):
        folder, meta = vm_meta(store, name, expect_id)
        boot_meta = meta.get("boot")
        if not isinstance(boot_meta, dict) or not qemu.is_alive(boot_meta):
            raise KpError(f"{name} is not running", code="not_running")
        current = vms.view(store, name)
        if current["state"] == "frozen":  # QEMU refuses to save again after a save, and a full disk stays full
            vms.require_running(current)
        target = folder / RAM_STATE
        partial = folder / (RAM_STATE + ".partial")
        if boot_meta.get("disks"):
            raise KpError(f"{name} has data disks attached: a saved VM could not resume without them, and "
                          "kodepipe does not keep their keys", code="disk_on_saved",
                          hint=f"kp-stop {name} shuts it down instead (the disks keep what was written)")
        if boot_meta.get("share"):
            _unmount_share(boot_meta, name)
        try:
            save_ram(Path(boot_meta["sockets"]["qmp"]), partial, timeout=timeout)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, target)
        qemu.wait_gone(boot_meta, 10.0)
        qemu.kill(boot_meta)
        qemu.cleanup(boot_meta)
        meta["saved"] = {"saved": now_iso(), "memory": boot_meta["memory"], "cpus": boot_meta["cpus"],
                         "net": boot_meta["net"], "share": boot_meta.get("share"),
                         "writable_git": bool((boot_meta.get("share_git") or {}).get("writable")),
                         "netdev": "slirp" if boot_meta.get("host_loopback") else passt.NETDEV,
                         "bytes": target.stat().st_size}
        meta.pop("boot", None)
        store.write_meta(folder, meta)
        found: dict[str, Any] = {}
        _settle_share(folder, name, boot_meta, found, say)
    return {**vms.view(store, name), **found}
