"""Warm pools: VMs of a warm image kept resumed, reseeded and SSH-ready, handed out by kp-clone.

A pool belongs to a warm image: its settings are ``pool.json`` in the image's
folder (kp-pool BASE --size N writes them), its members are ordinary VMs
named ``pool-ID`` whose metadata says ``"pool": BASE``.  A member is
cloned from the warm image, resumed, given its own identity (its own
hostname, machine-id, SSH host key and per-clone SSH key, as any warm clone)
and set up by kp-ip's code until SSH answers; then it is marked ready.

kp-clone BASE NAME adopts the oldest ready member instead of making a new
clone: under the member's and NAME's locks it sets the guest's hostname to
NAME through the guest agent, rewrites the member's metadata under its new
name, and renames its folder.  Its QEMU, passt and logs keep running: they
hold their files open, and its sockets keep the paths its metadata records.
The identity it hands over was made for that member alone and used by no
other VM.  Then a detached ``kp-pool BASE --refill`` (one at a time, a lock
says) makes the pool whole again; what went wrong is kept in pool.json, and
kp-ls shows it on the image's record.

The pool holds at most --max-memory of guest memory (the members' guest
RAM, each as much as the warm state was saved with).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from kodepipe.core.errors import BadInput, KpError, NotFound
from kodepipe.core.records import Record
from kodepipe.core.state import Store, new_id, now_iso, write_atomic
from kodepipe.core.units import parse_size

POOL_FILE = "pool.json"  # in the image's folder
LOG_FILE = "pool.log"  # the detached refill's messages, in the image's folder
LOG_CAP = 1 << 20
PREFIX = "pool-"
MEMBER_TIMEOUT = 300.0  # for one member, from its clone to SSH answering (a warm resume under TCG: seconds)
MAX_SIZE = 64
# a member that fails is removed and a new one made, this many times in all, before the fill gives up
# (a guest agent connection that QEMU drops right after a resume has been seen, rarely)
ATTEMPTS = 2


def _settings_lock(base: str) -> str:
    return f"{base}.pool"  # the settings and handing a member out


def _fill_lock(base: str) -> str:
    return f"{base}.pool-fill"  # one filler at a time


def host_memory() -> int:
    """Bytes of RAM on this host (MemTotal), 0 if unknown."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def default_max_memory() -> int:
    return host_memory() // 2


def settings(store: Store, base: str) -> dict[str, Any] | None:
    """BASE's pool settings, None without a pool; a pool.json that is not what kodepipe wrote is an error."""
    path = store.folder("image", base) / POOL_FILE
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise KpError(f"the pool settings of {base} are unreadable ({exc})", code="broken",
                      hint=f"kp-pool {base} --size N writes them again") from None
    if not isinstance(data, dict) or not _whole(data.get("size"), MAX_SIZE) or \
            not _whole(data.get("max_memory"), 1 << 60):
        raise KpError(f"the pool settings of {base} are not kodepipe's ({path})", code="broken",
                      hint=f"kp-pool {base} --size N writes them again")
    return data


def _whole(value: object, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


def settings_or_none(store: Store, base: str) -> dict[str, Any] | None:
    try:
        return settings(store, base)
    except KpError:
        return None


def _write(store: Store, base: str, data: dict[str, Any]) -> None:
    write_atomic(store.folder("image", base) / POOL_FILE, orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def _warm_image(store: Store, base: str) -> Record:
    from kodepipe.vm import images

    if not store.folder("image", base).is_dir():
        raise NotFound(f"there is no image named {base}", code="base_missing",
                       hint="kp-ls --kind image lists images")
    image = images.view(store, base)
    if image.get("state") != "ready":
        raise KpError(f"image {base} is not ready ({image.get('state')})", code="base_not_ready")
    if not isinstance(image.get("warm"), dict):
        raise KpError(f"image {base} is not warm: a pool keeps resumed copies of its warm state",
                      code="base_not_warm", hint=f"kp-image warm {base}")
    return image


def member_memory(image: Record) -> int:
    """Guest RAM of one member: what the warm state was saved with."""
    warm = image.get("warm") or {}
    try:
        return parse_size(str(warm.get("memory") or "1G"))
    except BadInput:
        return 1 << 30


def configure(store: Store, base: str, size: int, max_memory: int | None) -> dict[str, Any]:
    """Set BASE's pool to ``size`` members within ``max_memory`` bytes of guest RAM (None: half the host's)."""
    if not 0 <= size <= MAX_SIZE:
        raise BadInput(f"a pool holds 0 to {MAX_SIZE} VMs, not {size}")
    with store.lock(base, shared=True), store.lock(_settings_lock(base)):
        _warm_image(store, base)
        old = settings(store, base) or {}
        data = {"size": size, "max_memory": max_memory if max_memory is not None else default_max_memory(),
                "set": now_iso(), **({"created": old["created"]} if isinstance(old.get("created"), str) else
                                     {"created": now_iso()})}
        _write(store, base, data)
    return data


def members(store: Store, base: str) -> list[str]:
    return [name for name, meta in store.metas("vm") if meta.get("pool") == base]


def target(data: dict[str, Any], image: Record) -> tuple[int, str | None]:
    """How many members the pool keeps, and what limits it below its size (None, or "max-memory")."""
    size = int(data["size"])
    fits = int(data["max_memory"]) // max(member_memory(image), 1)
    return (size, None) if fits >= size else (fits, "max-memory")


def summary(store: Store, base: str, image: Record) -> dict[str, Any] | None:
    """The "pool" of BASE's image record: its settings, its members and how many are ready."""
    try:
        data = settings(store, base)
    except KpError as exc:
        return {"problem": exc.message}
    if data is None:
        return None
    from kodepipe.vm import vms

    names = members(store, base)
    views = [vms.view(store, n) for n in names]
    keeps, limit = target(data, image) if isinstance(image.get("warm"), dict) else (0, "not warm")
    out: dict[str, Any] = {"size": data["size"], "max_memory": data["max_memory"], "keeps": keeps,
                           "members": names, "ready": sum(1 for v in views if _is_ready(v, image))}
    if limit is not None:
        out["limited_by"] = limit
    for key in ("problem", "failed"):
        if isinstance(data.get(key), str):
            out[key] = data[key]
    return out


def _is_ready(record: Record, image: Record) -> bool:
    """Ready to hand out: running in the very boot the filler set it up in (a member that was stopped and
    booted again, perhaps with other options, is not), from the image's current warm state."""
    warm = image.get("warm")
    warm_id = warm.get("id") if isinstance(warm, dict) else None
    return (warm_id is not None and record.get("state") == "running" and isinstance(record.get("pool_ready"), str)
            and record.get("pool_boot") is not None and record.get("pool_boot") == record.get("started")
            and record.get("base_id") == image.get("id") and record.get("warm_id") == warm_id)


# -- filling ------------------------------------------------------------------------------------------


def fill(store: Store, base: str, *, progress: Callable[[str], None] = lambda _m: None,
         wait: float = 0.0, timeout: float = MEMBER_TIMEOUT) -> int:
    """Make BASE's pool whole: remove members that can no longer be handed out (crashed, broken, stopped),
    then make members until it keeps what its settings say.  Returns how many it made.  A failure is kept
    in pool.json (kp-ls shows it) and raised; the member it was making is removed."""
    from kodepipe.vm import vms

    made = 0
    with store.lock(_fill_lock(base), wait=wait):
        while True:
            with store.lock(base, shared=True):
                image = _warm_image(store, base)
                data = settings(store, base)
            if data is None:  # emptied meanwhile (kp-pool --size 0): what this filler made last goes too
                for name in members(store, base):
                    vms.remove(store, name, expect_id=None, dry_run=False)
                return made
            keeps, _ = target(data, image)
            current = []
            for name in members(store, base):
                record = vms.view(store, name)
                if _is_ready(record, image):
                    current.append(name)
                    continue
                # only this filler makes members (its lock): one not ready now was left by a filler that
                # died, or crashed, or its warm state was remade; it is never handed out, so it goes
                state = record.get("state")
                progress(f"{name}: {state}{' (' + str(record['problem']) + ')' if record.get('problem') else ''}, "
                         "not ready; removed")
                vms.remove(store, name, expect_id=None, dry_run=False)
            if len(current) > keeps:  # the pool was made smaller: the newest go first
                for name in sorted(current, key=_created(store))[keeps:]:
                    progress(f"{name}: beyond the pool's size; removed")
                    vms.remove(store, name, expect_id=None, dry_run=False)
                return made
            if len(current) == keeps:
                _note(store, base, problem=None)
                return made
            for attempt in range(ATTEMPTS):
                name = PREFIX + new_id()
                progress(f"{name}: resuming a member of {base}'s pool ({len(current) + 1} of {keeps})")
                try:
                    _make(store, base, name, timeout)
                    break
                except BaseException as exc:
                    message = exc.message if isinstance(exc, KpError) else f"{type(exc).__name__}: {exc}"
                    message = _keep_qemu_log(store, base, name, message)
                    with contextlib.suppress(KpError):
                        vms.remove(store, name, expect_id=None, dry_run=False)
                    gone = settings_or_none(store, base) is None  # emptied meanwhile: nothing to retry for
                    if attempt + 1 < ATTEMPTS and isinstance(exc, KpError) and not gone:
                        progress(f"{name}: {message}; trying a new one")
                        continue
                    _note(store, base, problem=f"making {name} failed: {message}")
                    raise
            made += 1


def _keep_qemu_log(store: Store, base: str, name: str, message: str) -> str:
    """Before a failed member is removed: the end of its QEMU log goes into pool.log, and ``message``,
    which may point at the log in the member's folder, points there instead."""
    member_log = store.folder("vm", name) / "qemu.log"
    pool_log = store.folder("image", base) / LOG_FILE
    try:
        with open(member_log, "rb") as log:
            log.seek(max(0, os.fstat(log.fileno()).st_size - 4096))
            tail = log.read(4096)
    except OSError:
        return message
    with contextlib.suppress(OSError):
        fd = os.open(pool_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"--- the end of {name}'s qemu.log ---\n".encode() + tail + b"\n--- end ---\n")
        finally:
            os.close(fd)
        return message.replace(str(member_log), f"{pool_log} (copied from {name}'s, removed)")
    return message


def _created(store: Store) -> Callable[[str], str]:
    def key(name: str) -> str:
        try:
            meta = store.read_meta(store.folder("vm", name)) or {}
        except KpError:
            return ""
        return str(meta.get("created") or "")
    return key


def _make(store: Store, base: str, name: str, timeout: float) -> None:
    from kodepipe.vm import accel, address, lifecycle, qemu, vms

    deadline = time.monotonic() + timeout
    vms.clone(store, base, name, pool=base)
    try:
        lifecycle.boot(store, name, qemu.BootOptions(), accel.choose("auto"))
    except KpError as exc:
        exc.args = (f"resuming it: {exc.args[0] if exc.args else exc.code}",)
        raise
    try:
        address.find(store, name, timeout=max(deadline - time.monotonic(), 1.0))
    except KpError as exc:
        exc.args = (f"setting it up (kp-ip): {exc.args[0] if exc.args else exc.code}",)
        raise
    with store.lock(name):
        folder = store.folder("vm", name)
        meta = store.read_meta(folder)
        if meta is None:
            raise KpError(f"{name} vanished while it was being made")
        meta["pool_ready"] = now_iso()
        meta["pool_boot"] = (meta.get("boot") or {}).get("started")  # ready in this boot only
        store.write_meta(folder, meta)


def _note(store: Store, base: str, *, problem: str | None) -> None:
    with store.lock(_settings_lock(base)):
        try:
            data = settings(store, base)
        except KpError:
            return
        if data is None:
            return
        if problem is None:
            if "problem" not in data:
                return
            data.pop("problem", None)
            data.pop("failed", None)
        else:
            data.update(problem=problem, failed=now_iso())
        _write(store, base, data)


def spawn_refill(store: Store, base: str) -> None:
    """Start ``kp-pool BASE --refill`` detached: it outlives this command, logs to pool.log in the image's
    folder (cut when over LOG_CAP), and ends once the pool is whole or a member fails."""
    from kodepipe.core import proc

    log = store.folder("image", base) / LOG_FILE
    with contextlib.suppress(FileNotFoundError):
        if log.stat().st_size > LOG_CAP:
            log.unlink()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        # the same interpreter and import path as this command (bin/'s wrapper or an installed package)
        proc.daemon([sys.executable, "-P", "-m", "kodepipe", "kp-pool", base, "--refill"], stderr=fd, cwd="/")
    finally:
        os.close(fd)


# -- handing a member out -----------------------------------------------------------------------------


def adopt(store: Store, base: str, name: str, *, base_id: str | None = None) -> Record | None:
    """Hand BASE's oldest ready member out as VM ``name``; None when no member is ready (or BASE has no
    pool).  The record says ``from_pool``."""
    from kodepipe.core.errors import Busy
    from kodepipe.vm import images, vms

    if settings_or_none(store, base) is None or store.lookup(name) is not None:
        return None  # no pool, or a name taken (kp-clone says so): nothing is handed out
    try:
        with store.lock(_settings_lock(base), wait=2.0):
            image = images.view(store, base)
            ready = []
            for member in members(store, base):
                record = vms.view(store, member)
                if _is_ready(record, image) and (base_id is None or record.get("base_id") == base_id):
                    ready.append((str(record.get("pool_ready")), member))
            for _, member in sorted(ready):
                try:
                    return _hand_over(store, base, member, name)
                except _Skip:
                    continue
    except Busy:
        return None  # another hand-out, or a member being removed: an ordinary clone rather than a wait
    return None


class _Skip(Exception):
    """This member cannot be handed out after all (gone, or stopped meanwhile): try the next."""


def _hand_over(store: Store, base: str, member: str, name: str) -> Record:
    from kodepipe.core.errors import Exists
    from kodepipe.vm import identity, images, qemu, vms
    from kodepipe.vm.guest_agent import AgentUnreachable, wait_for_agent

    with store.lock(member, wait=2.0), store.lock(name, wait=2.0):
        existing = store.lookup(name)
        if existing is not None:
            raise Exists(f"{name} already exists (a {existing[0]})",
                         hint="choose another name, or remove it first with kp-rm")
        old = store.folder("vm", member)
        meta = store.read_meta(old)
        record = vms.view(store, member)
        if meta is None or meta.get("pool") != base or not _is_ready(record, images.view(store, base)):
            raise _Skip
        boot = meta["boot"]
        started = time.monotonic()
        try:
            for attempt in range(ATTEMPTS):  # the script is idempotent: a dropped connection is tried again
                try:
                    with wait_for_agent(Path(boot["sockets"]["qga"]), 10.0,
                                        alive=lambda: qemu.is_alive(boot)) as agent:
                        identity.rename(agent, name)
                    break
                except AgentUnreachable:
                    if attempt + 1 == ATTEMPTS:
                        raise
        except KpError as exc:
            # never handed out, nor tried again: no longer ready, so the next fill replaces it
            meta.pop("pool_ready", None)
            meta["pool_problem"] = f"setting its hostname to {name} failed: {exc.message}"
            store.write_meta(old, meta)
            raise _Skip from None
        new = store.folder("vm", name)
        # passt and its guard are found by the log path on their command lines: that path stays as it was
        passt = boot.get("passt")
        meta = _moved(meta, str(old), str(new))
        if passt is not None:
            meta["boot"]["passt"] = passt
        for key in ("pool", "pool_ready", "pool_boot"):
            meta.pop(key, None)
        # the user's VM is as old as the hand-out (kp-ls --older-than 1d | kp-rm must not take it at once)
        meta.update(name=name, from_pool=True, pooled=meta.get("created"), created=now_iso(),
                    adopted=now_iso(), hostname_seconds=round(time.monotonic() - started, 3))
        store.write_meta(old, meta)
        os.rename(old, new)
    return vms.view(store, name)


def _moved(value: Any, old: str, new: str) -> Any:
    """``value`` with every path in folder ``old`` (a string equal to it, or below it) now in ``new``."""
    if isinstance(value, str):
        if value == old or value.startswith(old + "/"):
            return new + value[len(old):]
        return value
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    return value


def empty(store: Store, base: str, *, progress: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Remove BASE's pool: its settings first (so no refill makes more), then every member."""
    from kodepipe.vm import vms

    with store.lock(_settings_lock(base)):
        (store.folder("image", base) / POOL_FILE).unlink(missing_ok=True)
    removed = []
    for member in members(store, base):
        if vms.remove(store, member, expect_id=None, dry_run=False) is not None:
            progress(f"{member}: removed")
            removed.append(member)
    return removed
