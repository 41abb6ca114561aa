"""VMs: copy-on-write clones of golden images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kodepipe.core.errors import KpError, NotFound
from kodepipe.core.records import Record
from kodepipe.core.state import Store, check_id, new_id, now_iso
from kodepipe.vm import images, qemu_img

if TYPE_CHECKING:
    from kodepipe.vm.qemu import Live

DISK = "disk.qcow2"


def clone(store: Store, base: str, name: str, *, base_id: str | None = None, cold: bool = False,
          pool: str | None = None) -> Record:
    """Make VM ``name`` as a qcow2 overlay on image ``base``.

    When the image is warm (kp-image warm), the overlay goes on the warm
    disk and the clone resumes from the warm RAM state at its first boot,
    unless ``cold``.

    The base's shared lock keeps it from being removed or rebuilt while the
    overlay is made; the name's exclusive lock makes concurrent clones of
    the same name safe (exactly one wins, the others get 'exists').
    """
    with store.lock(base, shared=True):
        if not store.folder("image", base).is_dir():
            other = store.lookup(base)
            if other is not None:
                raise NotFound(f"{base} is a {other[0]}, not an image", code="base_missing",
                               hint="clone from a golden image (kp-ls --kind image)")
            raise NotFound(f"there is no image named {base}", code="base_missing",
                           hint="kp-ls --kind image lists images; kp-image build NAME makes one")
        image = images.view(store, base)
        if image.get("state") != "ready":
            why = image.get("problem") or f"it is {image.get('state')}"
            raise KpError(f"image {base} cannot be cloned: {why}", code="base_not_ready")
        if base_id is not None and image.get("id") != base_id:
            raise NotFound(f"image {base} was rebuilt since the record was made", code="stale_record",
                           hint="run kp-ls again to get current records")
        with store.lock(name):
            meta: dict[str, Any] = {"kind": "vm", "name": name, "id": new_id(), "created": now_iso(),
                                    "state": "creating", "base": base, "base_id": image["id"]}
            if pool is not None:  # a member of BASE's warm pool (kodepipe.vm.pool), from its first moment
                meta["pool"] = pool
            warm = image.get("warm") if not cold and isinstance(image.get("warm"), dict) else None
            with store.creating("vm", name, meta) as folder:
                if warm is not None:
                    qemu_img.create_overlay(Path(image["path"]) / warm["disk"], folder / DISK)
                    meta["warm_id"] = warm["id"]
                    # resumes from the image's warm RAM state, on the hardware it was saved with
                    meta["saved"] = {"saved": warm["created"], "memory": warm["memory"], "cpus": warm["cpus"],
                                     "net": "user", "share": None, "warm": True}
                else:
                    qemu_img.create_overlay(Path(image["disk"]), folder / DISK)
                from kodepipe.vm import sshkeys

                meta["ssh_key"] = {"file": sshkeys.VM_KEY, "fingerprint": sshkeys.make_vm_key(folder)}
                meta.update(state="ready", disk=DISK)
                store.write_meta(folder, meta)
    return view(store, name)


_INTERNAL = frozenset({"boot_id", "set_up"})  # boot meta that is bookkeeping, not part of the vm record


def view(store: Store, name: str) -> Record:
    """The vm record for ``name``, with its state checked now."""
    record, meta = store.record_base("vm", name)
    if meta is None:
        return record
    folder = store.folder("vm", name)
    if isinstance(meta.get("disk"), str):
        record["disk"] = str(folder / meta["disk"])
    key = meta.get("ssh_key")
    if isinstance(key, dict) and key.get("file") == "ssh_key":  # the clone's own key (kodepipe.vm.sshkeys)
        record["ssh_key"] = {"path": str(folder / "ssh_key"), "fingerprint": key.get("fingerprint")}
    if meta.get("state") == "creating":
        return record  # Store.record_base settled it: creating while kp-clone holds the lock, else broken
    record["state"] = "stopped"
    boot = record.pop("boot", None)
    if isinstance(boot, dict):
        record.update({k: v for k, v in boot.items() if k not in _INTERNAL})
        record.update(live_state(boot, name, busy=lambda: store.lock_held(name)).fields())
        return record
    if isinstance(meta.get("saved"), dict):
        record["state"] = "saved" if not meta["saved"].get("warm") else "stopped"
    problem = _base_problem(store, meta)
    if problem is None and not Path(record.get("disk", "")).is_file():
        problem = "its disk is missing"
    if problem:
        record["state"], record["problem"] = "broken", problem
    return record


def live_state(boot: dict[str, Any], name: str, *, busy: Callable[[], bool] = lambda: False) -> Live:
    """running, suspended, frozen, crashed or stopped: checked against the real process and its
    monitor (see qemu.classify), with a problem and a hint when it is not simply running."""
    from kodepipe.vm import qemu

    return qemu.live(boot, name, busy=busy)


def unusable(record: Record) -> KpError | None:
    """Why nothing in VM ``record`` can answer now (not running, suspended, frozen), or None if it runs."""
    name, state = record.get("name"), record.get("state")
    if state == "running":
        return None
    if state == "frozen":
        return KpError(f"{name} is frozen: {record.get('problem')}", code="frozen",
                       hint=str(record.get("hint") or f"kp-stop --resume {name}"))
    if state == "suspended":
        why = f" ({record['problem']})" if record.get("problem") else ""
        return KpError(f"{name} is suspended{why}", code="suspended",
                       hint=str(record.get("hint") or f"kp-stop --resume {name}"))
    return KpError(f"{name} is not running (it is {state})", code="not_running", hint=f"kp-boot {name}")


# keys a record's view sets only while they apply: a fresh view drops them from an older record
VIEW_ONLY = ("problem", "hint", "qemu_status")


def fresh(record: Record, current: Record) -> Record:
    """``current`` (a view made now) laid over an older ``record`` (from stdin): the older record's
    other keys pass through, but not a "problem" or "hint" that no longer holds (a VM frozen then)."""
    return {**{k: v for k, v in record.items() if k not in VIEW_ONLY}, **current}


def require_running(record: Record) -> None:
    """Raise the KpError that says why VM ``record`` cannot be used now, if it cannot."""
    problem = unusable(record)
    if problem is not None:
        raise problem


def _base_problem(store: Store, meta: dict[str, Any]) -> str | None:
    base = meta.get("base")
    if not isinstance(base, str) or not store.folder("image", base).is_dir():
        return f"its base image {base} is gone"
    try:
        base_meta = store.read_meta(store.folder("image", base))
    except KpError:
        return f"its base image {base} is unreadable"
    if base_meta is None or base_meta.get("id") != meta.get("base_id"):
        return f"its base image {base} was rebuilt; this clone's disk no longer matches it"
    if meta.get("warm_id") and (base_meta.get("warm") or {}).get("id") != meta["warm_id"]:
        return f"the warm state of its base image {base} was remade or removed; this clone's disk no longer matches it"
    return None


def remove(store: Store, name: str, *, expect_id: str | None, dry_run: bool,
           check: Callable[[Record], None] | None = None,
           say: Callable[[str], None] = lambda _m: None) -> Record | None:
    """Remove VM ``name``; None when there is none (already removed).  ``check`` sees the
    current record under the lock and may raise to leave the VM alone."""
    with store.lock(name):
        folder = store.folder("vm", name)
        if not folder.is_dir():
            return None
        record = view(store, name)
        check_id(record, expect_id)
        if check is not None:
            check(record)
        if not dry_run:
            boot = (store.read_meta(folder) or {}).get("boot") if record.get("state") != "broken" else None
            if isinstance(boot, dict):
                from kodepipe.vm import qemu

                qemu.kill(boot)  # a VM being removed need not shut down gracefully
                qemu.cleanup(boot)
            # what its guest planted in a share is renamed in place first: the share is the user's
            from kodepipe.vm import sharegit

            planted, problem = sharegit.settle(folder, name)
            share = str(boot.get("share") or "?") if isinstance(boot, dict) else "?"
            record = {**record}
            for warning in sharegit.report(planted, problem, share, record):
                say(f"{name}: {warning}")
            store.discard(folder)
        return record
