"""The Podman engine: kodepipe's one place that talks to Podman's REST API.

kp-run uses the socket named by KODEPIPE_PODMAN_URL (or Podman's own
CONTAINER_HOST) when set.  Otherwise it starts its own ``podman system
service`` on a socket in the runtime dir, on demand; that service exits by
itself after IDLE_SECONDS without clients, so nothing lingers.

Requests go through podman-py's HTTP client (imported lazily: 200 ms).  The
container spec is built by sandbox.py and posted as it is, because
podman-py's ``create()`` silently drops fields kodepipe relies on (``remove``,
``timeout``, CPU limits as nano_cpus; docs/kp-run-notes.md section 4).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from kodepipe.core import paths, proc
from kodepipe.core.errors import CommandFailed, KpError, NotFound, Timeout

IDLE_SECONDS = 300
READY_WAIT = 15.0
STORAGE_RUN = Path("/run/containers/storage/overlay")


class EngineError(KpError):
    code = "podman"


class EngineLost(EngineError):
    """The Podman service stopped answering: it died, or its socket went away.

    Containers outlive it (conmon runs them), so whoever loses it must still
    stop and remove what it started: ``Engine.revive`` gives a new connection.
    """

    code = "engine_lost"


def configured_url() -> str | None:
    for var in ("KODEPIPE_PODMAN_URL", "CONTAINER_HOST"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


def oci_runtime() -> str | None:
    """runc when installed: crun rejects this kind of host's hybrid cgroups (environment.md)."""
    return "runc" if proc.which("runc") else None


def force_chown_copies(base: Path = STORAGE_RUN) -> None:
    """Make containers/storage copy image layers for a uid map instead of idmapping them.

    On some kernels (this project's CI among them) its idmapped-lower-layer
    probe passes but the overlay mount then fails with EACCES (Podman bug
    18435).  The probe's cached answer lives in /run; a copy per mapping
    costs a few seconds once and always works.  Only for a service that
    kodepipe starts itself, before it starts.
    """
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        base.mkdir(parents=True, exist_ok=True)
        (base / "idmapped-lower-dir-false").touch()
        with contextlib.suppress(FileNotFoundError):
            (base / "idmapped-lower-dir-true").unlink()


class Engine:
    """A connection to one Podman service."""

    def __init__(self, url: str, *, own: bool = False) -> None:
        self.url = url
        self.own = own  # kodepipe's own service, which it may start again
        # set by connect when it trusted an existing socket without asking: who to tell if the first
        # request finds no one listening and the service is started after all
        self._unproven: Callable[[str], None] | None = None
        self.api: Any
        if url.startswith("unix://"):
            self.api = UnixApi(url[len("unix://"):])
        else:  # ssh:// and tcp:// services go through podman-py, which knows how to reach them
            from podman import PodmanClient

            self.api = PodmanClient(base_url=url).api

    # -- connecting -----------------------------------------------------------

    @classmethod
    def connect(cls, progress: Callable[[str], None] = lambda _m: None) -> Engine:
        url = configured_url()
        if url is not None:
            engine = cls(url)
            if not engine.ping():
                raise EngineError(f"no Podman service answers at {url}",
                                  hint="start it (podman system service), or unset KODEPIPE_PODMAN_URL "
                                       "and CONTAINER_HOST to let kp-run start its own")
            return engine
        sock = paths.runtime_dir() / "podman.sock"
        engine = cls(f"unix://{sock}", own=True)
        if sock.is_socket():
            # most likely the service of an earlier run still answers: the first request finds out (one
            # round trip less than a ping), and one that finds nobody listening starts it (_call)
            engine._unproven = progress
            return engine
        return engine._start_own(progress)

    def _start_own(self, progress: Callable[[str], None]) -> Engine:
        """kodepipe's own service, started unless it answers (under a lock: one kp-run starts it)."""
        engine, sock = self, Path(self.url[len("unix://"):])
        if engine.ping():
            return engine
        from kodepipe.core.state import Store

        with Store().lock("podman-service", wait=READY_WAIT):
            if engine.ping():  # another kp-run started it meanwhile
                return engine
            progress("starting a Podman API service")
            _start_service(sock)
            deadline = time.monotonic() + READY_WAIT
            while not engine.ping():
                if time.monotonic() > deadline:
                    raise Timeout(f"the Podman service did not answer on {sock} within {READY_WAIT:g} s",
                                  hint=f"see {service_log()}")
                time.sleep(0.01)
        return engine

    def ping(self) -> bool:
        try:
            return bool(self.api.head("/_ping").status_code == 200)
        except Exception:
            return False

    def revive(self, progress: Callable[[str], None] = lambda _m: None) -> Engine:
        """A working connection to the same Podman after this one was lost.

        kodepipe's own service keeps no state of its own (containers live on under
        conmon, their records in Podman's store), so it is simply started again.  A
        service the user configured is only asked again: kodepipe does not own it.
        """
        if self.own and configured_url() is None:
            return Engine.connect(progress)
        engine = Engine(self.url)
        if not engine.ping():
            raise EngineLost(f"the Podman service at {self.url} does not answer any more",
                             hint="start it again, then kp-rm the run to remove its container")
        return engine

    # -- requests -------------------------------------------------------------

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        """One request; a service that is gone (refused, reset, closed) raises EngineLost."""
        try:
            answer = getattr(self.api, method)(path, **kwargs)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            if self._unproven is None:
                raise EngineLost(f"{what}: the Podman service at {self.url} stopped answering ({_cause(exc)})",
                                 hint=f"see {service_log()}" if self.own else None) from None
            # nobody listened, so nothing was sent: the service is started, and asked again
            progress, self._unproven = self._unproven, None
            self._start_own(progress)
            return self._call(method, path, what, **kwargs)
        except OSError as exc:  # podman-py's APIError and requests' ConnectionError are OSErrors
            raise EngineLost(f"{what}: the Podman service at {self.url} stopped answering ({_cause(exc)})",
                             hint=f"see {service_log()}" if self.own else None) from None
        self._unproven = None
        return answer

    def _check(self, response: Any, what: str) -> Any:
        if response.status_code < 400:
            return response
        try:
            message = response.json().get("message") or response.text
        except ValueError:
            message = response.text
        if response.status_code == 404:
            raise NotFound(f"{what}: {message}")
        raise EngineError(f"{what}: Podman says: {message.strip()}")

    def create(self, spec: dict[str, Any]) -> str:
        response = self._call("post", "/containers/create", "creating the container", data=orjson.dumps(spec),
                              headers={"content-type": "application/json"})
        if response.status_code == 404:
            raise NotFound(f"image {spec.get('image')} is not in Podman's store",
                           hint="build it with kp-image base, or name a profile with --profile")
        return str(self._check(response, "creating the container").json()["Id"])

    def init(self, cid: str) -> None:
        self._check(self._call("post", f"/containers/{cid}/init", "preparing the container"),
                    "preparing the container")

    def start(self, cid: str) -> None:
        self._check(self._call("post", f"/containers/{cid}/start", "starting the container"),
                    "starting the container")

    def inspect(self, cid: str) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self._call("get", f"/containers/{cid}/json", "inspecting"),
                                             "inspecting").json()
        return result

    def plan_create(self, cid: str, info: dict[str, Any], plan: str) -> Path | None:
        """Leave ``plan`` for the runtime's create of container ``cid`` (its inspect ``info``): where, or None
        when the container's runtime is not a kodepipe wrapper (a service kodepipe did not start, or one
        started before it had one).  The wrapper is recognised by what it is, not by a name: a file of
        this user's, that nobody else may write, beginning as strace.runtime_wrapper writes it, in an
        ``oci`` folder beside the ``audit-plans`` folder it reads (this user's, mode 0700), wherever the
        service was started from."""
        from kodepipe.audit import strace

        runtime = info.get("OCIRuntime")
        if not isinstance(runtime, str) or not runtime.startswith("/") or not cid \
                or not all(c in "0123456789abcdef" for c in cid):
            return None
        wrapper = Path(runtime)
        plans = wrapper.parent.parent / PLANS
        try:
            for path, mode in ((wrapper, 0o022), (wrapper.parent, 0o022), (plans, 0o077)):
                st = os.lstat(path)
                if st.st_uid != os.geteuid() or st.st_mode & mode or stat.S_ISLNK(st.st_mode):
                    return None
            if wrapper.parent.name != "oci":
                return None
            with open(wrapper, "rb") as handle:
                if not handle.read(4096).startswith(strace.WRAPPER_HEAD.encode()):
                    return None
        except OSError:
            return None
        path = plans / cid
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(plan)
        return path

    def exists(self, cid: str) -> bool:
        return bool(self._call("get", f"/containers/{cid}/exists", "looking for the container").status_code == 204)

    def kill(self, cid: str, signal: str = "KILL") -> None:
        response = self._call("post", f"/containers/{cid}/kill", "stopping the container", params={"signal": signal})
        if response.status_code in (204, 404, 409) or "state improper" in response.text:
            return  # done, gone, or not running any more
        self._check(response, "stopping the container")

    def wait(self, cid: str) -> int:
        response = self._call("post", f"/containers/{cid}/wait", "waiting for the container",
                              params={"condition": "exited", "interval": "10ms"})
        return int(self._check(response, "waiting for the container").text.strip())

    def remove(self, cid: str) -> None:
        """Remove, riding out conmon's clean-up race (500 "shm busy"); gone already is fine.

        The retries get 10 s from the first answer: a forced remove of a running container
        itself waits out its stop timeout first."""
        deadline = None
        while True:
            response = self._call("delete", f"/containers/{cid}", "removing the container",
                                  params={"force": True, "v": True})
            if response.status_code in (200, 204, 404):
                return
            deadline = deadline or time.monotonic() + 10
            if time.monotonic() > deadline:
                self._check(response, "removing the container")
            time.sleep(0.02)

    def find(self, name: str, run_id: str) -> str | None:
        """The id of the container called ``name`` that kp-run made for run ``run_id``, if there is one.

        By name, for a run whose kp-run died before it learnt the id; only a container
        with the run's own label, never another one that happens to have the name."""
        response = self._call("get", f"/containers/{name}/json", "looking for the container")
        if response.status_code == 404:
            return None
        info = self._check(response, "looking for the container").json()
        labels = (info.get("Config") or {}).get("Labels") or {}
        return str(info["Id"]) if labels.get("io.kodepipe.id") == run_id else None

    def attach(self, cid: str) -> Callable[[int], bytes] | None:
        """Attach to a created container's output before it starts; a reader of its raw stream.

        The attach ends the moment the container's process does (its
        conmon closes it), where following the logs lags by up to half a
        second.  Only over a unix socket (podman-py has no attach); None
        otherwise, and stream() then follows the logs.
        """
        if not self.url.startswith("unix://"):
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.url[len("unix://"):])
            conn.sendall(f"POST /v4.0.0/libpod/containers/{cid}/attach?stream=true&stdout=true&stderr=true "
                         "HTTP/1.1\r\nHost: podman\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                         "Content-Length: 0\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    raise EngineLost("attaching to the container: Podman closed the connection")
                head += chunk
        except OSError as exc:
            conn.close()
            raise EngineLost(f"attaching to the container: the Podman service at {self.url} stopped answering "
                             f"({_cause(exc)})") from None
        head, _, rest = head.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1:2]
        if status not in ([b"101"], [b"200"]):
            conn.close()
            first = head.splitlines()[0].decode(errors="replace")
            raise EngineError(f"attaching to the container: Podman says {first}")
        pending = [rest]

        def read(n: int) -> bytes:
            if pending and pending[0]:
                data, pending[0] = pending[0][:n], pending[0][n:]
                return data
            try:
                data = conn.recv(n)
            except OSError:
                data = b""
            if not data:
                conn.close()
            return data

        return read

    def stream(self, cid: str, sinks: dict[int, Callable[[bytes], None]],
               attached: Callable[[int], bytes] | None = None) -> None:
        """Copy the container's output to ``sinks`` (1: stdout, 2: stderr) until it exits:
        from an attach made before the start, or else by following its logs."""
        if attached is None:
            response = self._call("get", f"/containers/{cid}/logs", "reading the container's output",
                                  params={"follow": True, "stdout": True, "stderr": True}, stream=True)
            self._check(response, "reading the container's output")
            raw = response.raw.read

            def attached(n: int) -> bytes:
                try:
                    return bytes(raw(n))
                except Exception:  # the service went away: the output ends here, wait() says why
                    return b""

        for kind, data in frames(attached):
            sinks.get(kind, sinks[2])(data)

    def image_id(self, ref: str) -> str | None:
        response = self._call("get", f"/images/{ref}/json", f"image {ref}")
        if response.status_code == 404:
            return None
        return str(self._check(response, f"image {ref}").json()["Id"])

    def containers(self, label: str) -> list[dict[str, Any]]:
        response = self._call("get", "/containers/json", "listing containers",
                              params={"all": True, "filters": orjson.dumps({"label": [label]}).decode()})
        result: list[dict[str, Any]] = self._check(response, "listing containers").json() or []
        return result


API_PREFIX = "/v4.0.0/libpod"  # the libpod API of Podman 4 and later


class Response:
    """A Podman answer: the parts of a requests.Response that the engine reads."""

    def __init__(self, status: int, body: bytes, raw: Any = None) -> None:
        self.status_code, self.content, self.raw = status, body, raw

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        try:
            return orjson.loads(self.content)
        except orjson.JSONDecodeError as exc:
            raise ValueError(str(exc)) from None


class UnixApi:
    """HTTP/1.1 to a Podman service on a unix socket, with the standard library: one connection per
    request, as podman-py's client would make.  podman-py (with requests, urllib3 and rich) takes
    longer to import than kp-run -- true spends in all its requests; it stays for ssh:// and
    tcp:// services.  Errors are OSErrors, as podman-py's are."""

    def __init__(self, path: str) -> None:
        self.path = path

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, data: bytes | None = None,
                headers: dict[str, str] | None = None, stream: bool = False) -> Response:
        import http.client
        import urllib.parse

        query = ""
        if params:
            query = "?" + urllib.parse.urlencode(
                {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in params.items()})
        conn = _unix_connection(self.path)
        try:
            # quoted as requests would: a name with a space is Podman's to refuse, not a broken request
            target = urllib.parse.quote(API_PREFIX + path, safe="/:@!$&'()*+,;=~")
            conn.request(method.upper(), target + query, body=data, headers=headers or {})
            response = conn.getresponse()
            if stream:  # the caller reads the body as it comes; it owns the connection now
                return Response(response.status, b"", raw=response)
            body = response.read()
        except http.client.HTTPException as exc:
            conn.close()
            raise ConnectionError(f"a broken answer ({type(exc).__name__}: {exc})") from None
        except OSError:
            conn.close()
            raise
        conn.close()
        return Response(response.status, body)

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("get", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Response:
        return self.request("post", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Response:
        return self.request("delete", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> Response:
        return self.request("head", path, **kwargs)


def _connection_class() -> type:
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def __init__(self, path: str) -> None:
            super().__init__("podman")
            self.unix_path = path

        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.unix_path)
            except OSError:
                sock.close()
                raise
            self.sock = sock

    return UnixConnection


def _unix_connection(path: str) -> Any:
    """An HTTPConnection to the socket at ``path`` (its class made on first use: http.client is lazy)."""
    global _connection_type
    if _connection_type is None:
        _connection_type = _connection_class()
    return _connection_type(path)


_connection_type: type | None = None


def _cause(exc: BaseException) -> str:
    """The innermost reason of a connection failure (requests wraps it three times)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip()
    return text.rsplit(": ", 1)[-1].strip("')\"") if text else type(exc).__name__


def frames(read: Callable[[int], bytes]) -> Iterator[tuple[int, bytes]]:
    """(stream, bytes) from Podman's multiplexed log stream: an 8-byte header per frame."""
    while True:
        header = _read_exact(read, 8)
        if len(header) < 8:
            return
        kind, length = struct.unpack(">BxxxL", header)
        data = _read_exact(read, length)
        if data:
            yield kind, data
        if len(data) < length:
            return


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def service_log() -> Path:
    return paths.cache_dir() / "logs" / "podman-service.log"


def wrapper_path(runtime: str) -> Path:
    """Where kodepipe's own service finds its OCI runtime (strace.runtime_wrapper), named as the
    runtime it wraps (Podman reads a runtime's features from its name)."""
    return paths.runtime_dir() / "oci" / Path(runtime).name


PLANS = "audit-plans"  # beside the wrapper's folder: where kp-run leaves its plans for that service


def plans_dir() -> Path:
    return paths.runtime_dir() / PLANS


def _write_wrapper() -> Path | None:
    """The service's OCI runtime, written afresh; None when no runtime binary is found (the service then
    runs Podman's default, and kp-run --audit attaches its tracer instead)."""
    from kodepipe.audit import strace

    runtime = proc.which(oci_runtime() or "crun")
    if runtime is None:
        return None
    wrapper = wrapper_path(runtime)
    wrapper.parent.mkdir(mode=0o700, exist_ok=True)
    plans_dir().mkdir(mode=0o700, exist_ok=True)
    fresh = wrapper.with_name(f".{wrapper.name}.{os.getpid()}")
    fresh.unlink(missing_ok=True)
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700)
    with os.fdopen(fd, "w") as handle:
        handle.write(strace.runtime_wrapper(os.path.realpath(runtime), str(plans_dir())))
    os.replace(fresh, wrapper)
    return wrapper


def _start_service(sock: Path) -> None:
    podman = proc.require("podman")
    force_chown_copies()
    wrapper = _write_wrapper()
    runtime = ["--runtime", str(wrapper)] if wrapper is not None else []
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    log = service_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            # its own session: the service outlives this kp-run and serves the next ones.  Its
            # working directory is the socket's private dir: conmon, which it starts, drops an
            # "oom" file into its cwd when a container hits its memory limit, and that must not
            # be the user's project
            proc.daemon([podman, *runtime, "system", "service", f"--time={IDLE_SECONDS}", f"unix://{sock}"],
                        stdout=out, stderr=out, cwd=sock.parent)
        except CommandFailed as exc:
            raise CommandFailed(f"could not start the Podman service: {exc}") from exc
