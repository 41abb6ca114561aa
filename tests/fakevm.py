"""Stand-ins for a running VM without QEMU: a vm folder whose boot names a live
process (so kodepipe sees it as running), and a real SSH server (paramiko) on
127.0.0.1 that runs commands with sh, for kp-ssh and kp-attach tests."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kodepipe.core import paths
from kodepipe.vm import qemu
from tests.conftest import make_image

# paramiko has no type hints: the answers of its ServerInterface, typed once here
AUTH_SUCCESSFUL: int = paramiko.AUTH_SUCCESSFUL
AUTH_FAILED: int = paramiko.AUTH_FAILED
OPEN_SUCCEEDED: int = paramiko.OPEN_SUCCEEDED
OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED: int = paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def state() -> Path:
    return Path(os.environ["KODEPIPE_STATE_DIR"])


def ed25519_pem() -> bytes:
    """A new ed25519 private key in OpenSSH format (paramiko cannot make one)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def ed25519_key() -> paramiko.Ed25519Key:
    return paramiko.Ed25519Key.from_private_key(io.StringIO(ed25519_pem().decode()))


def public_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


@dataclass
class FakeVM:
    name: str
    folder: Path
    process: subprocess.Popen[bytes]
    meta: dict[str, Any]

    @property
    def boot(self) -> dict[str, Any]:
        boot: dict[str, Any] = self.meta["boot"]
        return boot

    def write(self) -> None:
        (self.folder / "meta.json").write_bytes(orjson.dumps(self.meta))

    def set_ssh(self, port: int, host_key: paramiko.PKey | None, *, user: str = "kp") -> None:
        """The endpoint kp-boot records, and the known_hosts kp-ip writes (None: kp-ip not run yet)."""
        self.boot["ssh"] = {"host": "127.0.0.1", "port": port, "user": user}
        if host_key is None:
            self.boot.pop("known_hosts", None)
        else:
            known = self.folder / "known_hosts"
            known.write_text(f"[127.0.0.1]:{port} {public_line(host_key)}\n")
            self.boot["known_hosts"] = str(known)
        self.write()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def make_vm(name: str, *, running: bool = True) -> FakeVM:
    """A vm folder; when ``running``, its boot names a live process whose command line holds the QMP path."""
    folder = state() / "vms" / name
    folder.mkdir(parents=True)
    sockets = {kind: str(paths.socket_path(name, kind)) for kind in ("qmp", "qga", "serial")}
    sockets["pidfile"] = str(paths.runtime_dir() / f"{name}.pid")
    # kodepipe checks a VM is alive by its pid and the QMP socket path in its command line
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sockets["qmp"]])
    # for a moment after exec, /proc/PID/cmdline can still show the old command line
    wait_for(lambda: qemu.alive(process.pid, Path(sockets["qmp"])))
    meta: dict[str, Any] = {"kind": "vm", "name": name, "id": f"{name:0<12}"[:12], "created": "2026-01-01T00:00:00Z",
                            "state": "ready", "base": "base", "base_id": "0123456789ab", "disk": "disk.qcow2"}
    if running:
        meta["boot"] = {"pid": process.pid, "boot_id": "x", "net": "user", "sockets": sockets,
                        "serial_log": str(folder / "serial.log"), "ssh": None}
    else:
        # a stopped VM is only "stopped" (not "broken") with its base image and disk in place
        if not (state() / "images" / "base").is_dir():
            make_image("base")
        (folder / "disk.qcow2").write_bytes(b"")
    vm = FakeVM(name, folder, process, meta)
    vm.write()
    return vm


@dataclass(eq=False)
class SSHServer(paramiko.ServerInterface):  # type: ignore[misc]
    """A real SSH server: public-key auth for one key, exec through sh, a scripted shell."""

    authorized: str  # base64 of the one public key it accepts
    host_key: paramiko.PKey = field(default_factory=ed25519_key)
    user: str = "kp"
    commands: list[str] = field(default_factory=list)
    typed: bytearray = field(default_factory=bytearray)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    terms: list[str] = field(default_factory=list)
    auth_attempts: list[str] = field(default_factory=list)  # the user name of each public-key attempt
    port: int = 0
    _listener: socket.socket | None = None
    _transports: list[paramiko.Transport] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    # -- lifecycle ---------------------------------------------------------------

    def start(self, port: int = 0) -> SSHServer:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        self._listener, self.port = listener, listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            self._transports.append(transport)
            try:
                transport.start_server(server=self)
            except (paramiko.SSHException, EOFError, OSError):
                continue

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for transport in self._transports:
            transport.close()

    # -- paramiko.ServerInterface ------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self.auth_attempts.append(username)
        if username == self.user and key.get_base64() == self.authorized:
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.commands.append(command.decode())
        threading.Thread(target=self._exec, args=(channel, command.decode()), daemon=True).start()
        return True

    def _exec(self, channel: paramiko.Channel, command: str) -> None:
        # kp-ssh sends EOF once its exec request is answered; a close before that answer would
        # reach it first (paramiko replies after this handler returns), which no real sshd does
        wait_for(lambda: channel.eof_received)
        proc = subprocess.run(["sh", "-c", command], capture_output=True, stdin=subprocess.DEVNULL, check=False)
        channel.sendall(proc.stdout)
        channel.sendall_stderr(proc.stderr)
        channel.send_exit_status(proc.returncode)
        channel.close()

    def check_channel_pty_request(self, channel: paramiko.Channel, term: bytes, width: int, height: int,
                                  pixelwidth: int, pixelheight: int, modes: bytes) -> bool:
        self.terms.append(term.decode())
        self.sizes.append((width, height))
        return True

    def check_channel_window_change_request(self, channel: paramiko.Channel, width: int, height: int,
                                            pixelwidth: int, pixelheight: int) -> bool:
        self.sizes.append((width, height))
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        threading.Thread(target=self._shell, args=(channel,), daemon=True).start()
        return True

    def _shell(self, channel: paramiko.Channel) -> None:
        """Greets, echoes what is typed, and exits with status 3 on a line 'exit'."""
        channel.sendall(b"fake shell ready\r\n$ ")
        while b"exit\r" not in self.typed and b"exit\n" not in self.typed:
            data = channel.recv(1024)
            if not data:
                break
            self.typed += data
            channel.sendall(data)
        channel.sendall(b"\r\nbye\r\n")
        channel.send_exit_status(3)
        channel.close()


def serve(authorized: str) -> Iterator[SSHServer]:
    server = SSHServer(authorized).start()
    try:
        yield server
    finally:
        server.close()


def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def wait_raw(tty: int) -> None:
    """Wait until the program on ``tty`` has put it in raw mode (what is typed before that is cooked)."""
    import termios

    wait_for(lambda: not termios.tcgetattr(tty)[3] & termios.ECHO)
