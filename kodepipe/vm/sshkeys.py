"""SSH public keys for golden images, and kodepipe's own key pair.

kodepipe keeps an ed25519 key of its own in the state directory so that it
can always reach the VMs it made without the user's SSH agent; the user's
own public key is added beside it so that plain ssh works too.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from kodepipe.core import paths
from kodepipe.core.errors import BadInput, KpError

KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
             "ssh-rsa", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
USER_KEYS = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")


def parse_public_key(text: str, source: str) -> str:
    """One OpenSSH public key line from ``text``, or BadInput saying why not."""
    if "PRIVATE KEY" in text:
        raise BadInput(f"{source} is a private key", hint="give the public key (the .pub file)")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise BadInput(f"{source} should hold exactly one public key line, found {len(lines)}")
    fields = lines[0].split()
    if len(fields) < 2 or fields[0] not in KEY_TYPES:
        raise BadInput(f"{source} is not an OpenSSH public key (expected a line like 'ssh-ed25519 AAAA... comment')")
    try:
        base64.b64decode(fields[1], validate=True)
    except ValueError:
        raise BadInput(f"{source} has a public key whose base64 part is damaged") from None
    return lines[0]


def read_public_key(path: Path) -> str:
    from kodepipe.core.records import open_regular

    try:  # a regular file, and at most 64 KiB of it: never /dev/zero or a FIFO
        with open_regular(str(path), "SSH key") as handle:
            text = handle.read(65536).decode("utf-8", "replace")
    except KpError as exc:
        raise BadInput(exc.message) from None
    return parse_public_key(text, str(path))


def fingerprint(line: str) -> str:
    """The SHA256 fingerprint that ssh-keygen -l shows."""
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def default_user_key() -> Path | None:
    ssh = Path.home() / ".ssh"
    for name in USER_KEYS:
        if (ssh / name).is_file():
            return ssh / name
    return None


def own_key_path() -> Path:
    return paths.state_dir() / "ssh" / "id_ed25519"


def own_key() -> tuple[Path, str]:
    """kodepipe's private key path and public key line, made on first use."""
    private = own_key_path()
    public = private.with_name(private.name + ".pub")
    if not private.exists() or not public.exists():
        import fcntl

        private.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(private.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two first uses at once make one key, not two halves
            if not private.exists() or not public.exists():
                _generate(private, public)
    return private, read_public_key(public)


VM_KEY = "ssh_key"  # each clone's own key pair, in its folder (VM_KEY and VM_KEY.pub)


def make_vm_key(folder: Path) -> str:
    """A new ed25519 key pair for one clone, in its folder; returns its public key's fingerprint.

    kp-ip authorizes it in the guest (through the guest agent) in place of kodepipe's shared key,
    so a key that leaks opens one VM, not all of them; kp-rm removes it with the folder."""
    private = folder / VM_KEY
    public = folder / (VM_KEY + ".pub")
    _generate(private, public, comment=f"kodepipe-{folder.name}")
    return fingerprint(read_public_key(public))


def _generate(private: Path, public: Path, comment: str = "kodepipe") -> None:
    # cryptography comes with paramiko; imported here only, it is slow to load
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    tmp = private.with_name(f".{private.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        public.write_bytes(pub + b" " + comment.encode() + b"\n")
        os.replace(tmp, private)
    except OSError as exc:
        raise KpError(f"cannot create kodepipe's SSH key in {private.parent}: {exc.strerror}") from None
