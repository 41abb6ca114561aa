"""Exit statuses and the exceptions that carry them.

Every kp-* command maps failures to an exit status here and nowhere else.
The table is part of the public contract (see kodepipe(7)); numbers never
change meaning once released.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

# Exit statuses.  The sysexits.h numbers where one fits.
OK = 0
FAILED = 1  # some records failed; each failed record carries an "error" object
USAGE = 2  # bad arguments or options (click's own usage errors use 2 as well)
BAD_INPUT = 65  # EX_DATAERR: a stdin line that is not a JSON object, or a record with invalid fields
UNAVAILABLE = 69  # EX_UNAVAILABLE: a required program is missing
SOFTWARE = 70  # EX_SOFTWARE: a bug in kodepipe (a traceback follows)
TIMEOUT = 75  # EX_TEMPFAIL: timed out waiting; trying again may work
NO_PERMISSION = 77  # EX_NOPERM: the operation needs privileges the user lacks
INTERRUPTED = 130  # SIGINT
TERMINATED = 143  # SIGTERM (and SIGHUP)
PIPE_CLOSED = 141  # the reader of stdout went away (as if killed by SIGPIPE)

EXIT_STATUSES: list[tuple[int, str]] = [
    (OK, "success: every record was handled"),
    (FAILED, "some records failed; each carries an error object and the rest were still handled"),
    (USAGE, "usage error: unknown option, bad argument, hostile name on the command line"),
    (BAD_INPUT, "bad input: a line on stdin that is not a JSON object, or a record with an invalid field; "
     "the line is named by number and nothing is changed for it"),
    (UNAVAILABLE, "a program that the command needs (qemu-img, debootstrap, ...) is not installed"),
    (SOFTWARE, "internal error in kodepipe: please report it with the traceback"),
    (TIMEOUT, "timed out waiting for something (a lock, a VM); trying again may work"),
    (NO_PERMISSION, "the operation needs privileges the user lacks (building an image needs root)"),
    (INTERRUPTED, "interrupted (SIGINT); work in progress was rolled back"),
    (PIPE_CLOSED, "the reader of stdout went away (for example | head -1); no message is printed"),
    (TERMINATED, "terminated (SIGTERM, or SIGHUP when its terminal closed); work in progress was rolled back"),
]

# When several records fail in different ways, the command exits with the
# status that comes first in this order.
# (An interruption normally ends a command by an exception; listed first so that it never reads as 0.)
_SEVERITY = [TERMINATED, INTERRUPTED, UNAVAILABLE, NO_PERMISSION, BAD_INPUT, TIMEOUT, FAILED]


def worst(statuses: set[int]) -> int:
    for status in _SEVERITY:
        if status in statuses:
            return status
    return OK


class Code(StrEnum):
    """Every error code a record's ``error.code`` can carry: its exit status and what it means.

    The one catalogue.  tests/test_errors.py walks the source and fails on a
    ``code="..."`` that is not a member here, or a member no code uses;
    kodepipe(7) lists them from here; and a KpError given a code takes its
    exit status from here.  A member is named as it is spelt on the wire.
    Codes never change meaning once released.
    """

    _value_: str
    status: int
    meaning: str

    def __new__(cls, code: str, status: int, meaning: str) -> Code:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        member.meaning = meaning
        return member

    # -- generic: the exception classes below, and what any command may meet
    failed = "failed", FAILED, "the operation failed; the message says why"
    usage = "usage", USAGE, "options that contradict each other, or that no backend can honour; nothing was started"
    bad_input = ("bad_input", BAD_INPUT,
        "a line on stdin is not a JSON object, or a record field is missing or of the wrong type")
    bad_name = "bad_name", BAD_INPUT, "a name is not a hostname label (1 to 63 of a-z, 0-9 and '-')"
    not_found = "not_found", FAILED, "the thing named is not there"
    exists = "exists", FAILED, "the name is taken"
    busy = "busy", TIMEOUT, "another kodepipe command holds the name's lock; trying again may work"
    in_use = "in_use", FAILED, "an image that clones still use (kp-rm --force overrides)"
    missing_program = "missing_program", UNAVAILABLE, "a program the command needs is not installed"
    no_permission = "no_permission", NO_PERMISSION, "the operation needs privileges the user lacks"
    timeout = "timeout", TIMEOUT, "timed out waiting (for a VM, a command in it, a guest agent); trying again may work"
    command_failed = "command_failed", FAILED, "an external program failed; the message has its command line and output"
    interrupted = "interrupted", INTERRUPTED, "interrupted (SIGINT; 143 for SIGTERM) while working on the record"
    unreadable = "unreadable", FAILED, "a file kodepipe had to read could not be read (an I/O error)"
    bad_directory = "bad_directory", FAILED, "a directory kodepipe keeps its state in (KODEPIPE_*_DIR) cannot be used"
    mounted = "mounted", FAILED, "a folder to delete has something mounted inside it; nothing was deleted"
    bad_key = "bad_key", FAILED, "the host's signing key (kp-run --sign) cannot be read or is not an ed25519 key"
    no_space = "no_space", FAILED, "a disk is full (ENOSPC); nothing half-written is left; free space and run it again"
    tree_changed = "tree_changed", FAILED, "a directory was moved or replaced while kodepipe walked it"
    too_many_entries = "too_many_entries", FAILED, "a directory tree has more entries than kodepipe reads"
    stale_record = ("stale_record", FAILED,
        "the name was re-created since the record was made; the new one is left alone")
    # -- images
    base_missing = "base_missing", FAILED, "the image to clone from does not exist"
    base_not_ready = "base_not_ready", FAILED, "the image is still building, or broken"
    bad_suite = "bad_suite", FAILED, "debootstrap does not know the Debian suite asked for"
    no_mirror = "no_mirror", FAILED, "no Debian archive is configured in apt's sources"
    mirror_unreachable = "mirror_unreachable", FAILED, "the Debian mirror could not be reached, or lacks the suite"
    debootstrap_failed = "debootstrap_failed", FAILED, "debootstrap failed; the message has its output"
    packages_failed = ("packages_failed", FAILED,
        "installing packages failed: an image's kernel and packages (kp-image), or a VM preset's (kp-ip)")
    dotfiles_failed = "dotfiles_failed", FAILED, "the image's dotfiles script exited non-zero"
    build_failed = "build_failed", FAILED, "building the image failed at the step the message names"
    # -- VMs
    broken = ("broken", FAILED,
        "the VM cannot boot: an interrupted creation, or a missing base or file (kp-rm removes it)")
    not_running = "not_running", FAILED, "the VM is not running (kp-boot starts it)"
    suspended = "suspended", FAILED, "the VM is suspended (kp-stop --resume runs it again)"
    frozen = "frozen", FAILED, "the VM's QEMU is alive but runs no guest code; the message says why and what to do"
    kvm_unusable = "kvm_unusable", FAILED, "--accel kvm was asked for, and KVM does not work on this host"
    kvm_silent = "kvm_silent", FAILED, "under KVM the guest wrote nothing on its console: KVM does not run guests here"
    qemu_failed = "qemu_failed", FAILED, "QEMU failed to start, or did not come up in time"
    passt_failed = "passt_failed", FAILED, "passt (the VM's user-mode network) failed to start"
    no_bridge = "no_bridge", FAILED, "the bridge that --net bridge:NAME names does not exist"
    disk_in_use = "disk_in_use", FAILED, "a data disk is attached to another running VM (one VM at a time)"
    disk_failed = "disk_failed", FAILED, "kp-ip could not format or mount a data disk in the guest"
    disk_on_saved = ("disk_on_saved", FAILED,
        "a saved or warm VM resumes with its saved hardware: --disk cannot add a disk to it")
    ssh_key_failed = "ssh_key_failed", FAILED, "kp-ip could not authorize the VM's own SSH key in the guest"
    port_taken = "port_taken", FAILED, "a host port that kp-boot --publish names cannot be bound (it is taken)"
    proxy_settings_failed = ("proxy_settings_failed", FAILED,
        "kp-ip could not point the programs of a guest booted with --allow at its egress proxy")
    bad_disk = "bad_disk", FAILED, "a VM's disk is not a qcow2 image with a backing chain kodepipe accepts"
    share_on_saved = ("share_on_saved", FAILED,
        "a saved or warm VM resumes with its saved hardware: --share cannot change it")
    net_on_saved = ("net_on_saved", FAILED,
        "a saved or warm VM resumes with its saved network, memory and CPUs: options asking for others fail")
    warm_outdated = ("warm_outdated", FAILED,
        "a warm state made with slirp cannot resume behind passt; warm the image again")
    share_busy = "share_busy", FAILED, "the VM cannot be saved while its shared folder is in use"
    share_failed = "share_failed", FAILED, "mounting the shared folder in the guest failed"
    save_failed = "save_failed", FAILED, "saving the VM's state (kp-stop --save) failed"
    resume_failed = "resume_failed", FAILED, "resuming a saved state failed, or took too long"
    reseed_failed = ("reseed_failed", FAILED,
        "giving a resumed clone its own identity (hostname, machine-id, keys) failed")
    vm_died = "vm_died", FAILED, "the VM exited while kodepipe waited for its guest agent"
    base_not_warm = "base_not_warm", FAILED, "a warm pool needs a warm image (kp-image warm)"
    rename_failed = "rename_failed", FAILED, "setting a pooled VM's hostname through its guest agent failed"
    running_differently = ("running_differently", FAILED,
        "kp-boot of a VM that already runs, with options it does not run with (it is never taken for one "
        "booted so)")
    qmp = "qmp", FAILED, "the VM's monitor (QMP) refused a command"
    qmp_unreachable = "qmp_unreachable", FAILED, "the VM's monitor (QMP) cannot be reached"
    guest_agent = "guest_agent", FAILED, "the guest agent answered a command with an error"
    guest_agent_unreachable = ("guest_agent_unreachable", FAILED,
        "the guest agent's socket cannot be reached, or closed under kodepipe")
    guest_agent_bad_reply = ("guest_agent_bad_reply", FAILED,
        "the guest agent broke its protocol: the guest is broken or hostile; retrying will not help")
    too_large = "too_large", FAILED, "a file in the guest is larger than kodepipe reads"
    no_console = "no_console", FAILED, "the VM has no serial console socket, or it cannot be connected to"
    console_busy = "console_busy", FAILED, "another client is attached to the VM's serial console"
    no_log = "no_log", FAILED, "the VM has no serial log yet: it has never booted"
    # -- SSH
    no_ssh = "no_ssh", FAILED, "the VM has no SSH endpoint (booted with --net none, or not yet up)"
    host_key_unknown = ("host_key_unknown", FAILED,
        "the VM's SSH host key is not known yet (kp-ip learns it from the guest agent)")
    host_key_mismatch = ("host_key_mismatch", FAILED,
        "the SSH server offered another host key than the guest agent reported: refused")
    auth_failed = "auth_failed", FAILED, "the VM refused the SSH key"
    connection_lost = "connection_lost", FAILED, "the SSH connection to the VM broke"
    exit_status = "exit_status", FAILED, "kp-ssh: the command exited non-zero (its result record has exit_status)"
    # -- containers
    unsupported = ("unsupported", BAD_INPUT,
        "the backend (a VM) cannot honour a part of the policy, which the message names: refused before anything")
    bad_profile = "bad_profile", BAD_INPUT, "a profile (its profile.json or Containerfile) is missing or invalid"
    unknown_profile = "unknown_profile", BAD_INPUT, "there is no profile of that name"
    import_failed = "import_failed", FAILED, "importing the local container base image failed"
    image_build_failed = ("image_build_failed", FAILED,
        "building a profile's container image failed; the message has the build's output")
    podman = "podman", FAILED, "Podman refused or failed an operation; the message has its words"
    engine_lost = ("engine_lost", FAILED,
        "the Podman service stopped answering during a kp-run (container_removed says what became of it)")
    no_podman = "no_podman", FAILED, "the VM has no Podman: its image was built without it"
    no_sudo = "no_sudo", FAILED, "kp-run in a VM needs passwordless sudo there, and the SSH user has none"
    no_seccomp = "no_seccomp", FAILED, "the VM lacks the seccomp profile that kp-run derives its own from"
    audit_incomplete = ("audit_incomplete", FAILED,
        "kp-run --audit: strace ended before the container did (audit_problem says why)")
    audit_failed = ("audit_failed", FAILED,
        "kp-run --audit: no strace took the container at its creation, so it was not started")
    unsafe_path = ("unsafe_path", FAILED,
        "a path would escape the workspace or pass through a symlink that is not trusted")
    conflict = ("conflict", FAILED,
        "kp-run --apply: the checkout changed where the changes would land; nothing was changed")
    unsupported_overlay = "unsupported_overlay", FAILED, "the quarantine uses an overlay feature kodepipe does not read"
    too_many_changes = "too_many_changes", FAILED, "the quarantine holds more changes than a review can carry"
    not_quarantined = "not_quarantined", FAILED, "kp-run --apply: the run named has no quarantine to apply"
    findings = ("findings", FAILED,
        "kp-run --apply: review findings at or above --fail-on that no --accept took in; nothing was applied")
    changed_since_review = ("changed_since_review", FAILED,
        "kp-run --apply: the quarantine is not the snapshot kp-review showed; what was applied before stays")
    upper_refused = ("upper_refused", FAILED,
        "a VM run's quarantine, streamed from the guest, holds an entry kodepipe does not accept")
    upper_truncated = "upper_truncated", FAILED, "a VM run's quarantine stream from the guest ended early"
    upper_too_large = "upper_too_large", FAILED, "a VM run's quarantine stream from the guest is over a cap"
    # -- credentials
    unknown_credential = ("unknown_credential", BAD_INPUT,
        "kp-run --credential: there is no built-in or user-defined credential of that name")
    bad_credential = "bad_credential", BAD_INPUT, "a credential definition (its JSON file) is invalid"
    credential_unavailable = ("credential_unavailable", FAILED,
        "a credential's value cannot be read on the host (the message names its source); the run did not start")


class KpError(Exception):
    """A failure with a short machine-readable code and a human message.

    ``code`` goes into the record's ``error.code``; ``status`` is the exit
    status it contributes.  The message should say what happened and what
    to do about it.
    """

    code = "failed"
    status = FAILED
    # the partial record of a run this failure ended, when it ended one (set then; kp-run writes it with
    # the error, reading it with getattr: most failures have none)
    record: dict[str, Any]

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
            if status is None and code in Code.__members__:
                status = Code[code].status  # the catalogue says what a code means, and how a command ends
        if status is not None:
            self.status = status
        self.hint = hint

    @property
    def message(self) -> str:
        text = str(self.args[0]) if self.args else self.code
        return f"{text}; {self.hint}" if self.hint else text

    def as_error(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BadInput(KpError):
    code = "bad_input"
    status = BAD_INPUT


class BadName(BadInput):
    code = "bad_name"


class NotFound(KpError):
    code = "not_found"


class Exists(KpError):
    code = "exists"


class Busy(KpError):
    code = "busy"
    status = TIMEOUT


class InUse(KpError):
    code = "in_use"


class MissingProgram(KpError):
    code = "missing_program"
    status = UNAVAILABLE


class NoPermission(KpError):
    code = "no_permission"
    status = NO_PERMISSION


class Timeout(KpError):
    code = "timeout"
    status = TIMEOUT


class CommandFailed(KpError):
    """An external program exited non-zero; the message carries its output."""

    code = "command_failed"


class Interrupted(BaseException):
    """Raised from the SIGTERM handler so that cleanup code runs."""

    status = TERMINATED
    record: dict[str, Any]  # as KpError's
