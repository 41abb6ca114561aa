"""Bad input, attacked through the real commands in subprocesses, one table row per command and input.

What must hold for each row: the documented exit status (65 for a bad stdin line or record field,
2 for a bad option, 1 for a state directory that is a file), a message that names the line or the
option, no traceback, nothing changed for the bad record, and the rest of the stream still handled.
The VM commands run against real clones (qemu-img) that are never booted: a row whose bad record
were acted on would change them, or answer with another status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import kp, lines, make_image, snapshot

NOTE = {"kind": "note", "n": 2}  # a record no command handles: passed through after the bad line


def objects(state: Path) -> dict[str, bytes]:
    """What records name: the image and VM folders (not kodepipe's own key, made on first use)."""
    return {f"{kind}/{path}": data for kind in ("images", "vms") for path, data in snapshot(state / kind).items()}


def feed(*records: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in records)


# The address space a capped command may use: a command with its imports needs about 25 MiB
# (kp-ls --help runs in 20 MiB), and a record line may be up to 64 MiB; a reader that held all
# of /dev/zero dies of MemoryError here instead of filling the machine's memory
# (test_the_memory_cap_of_kp_capped_is_real).
MEMORY_CAP = 1 << 30


def capped(argv: list[str], *, input: bytes | None = None, timeout: float = 60,
           cap: int = 16 << 20) -> subprocess.CompletedProcess[bytes]:
    """Run argv with its output in files it may not grow past ``cap`` bytes (RLIMIT_FSIZE; past it,
    SIGXFSZ) and its memory bounded by MEMORY_CAP (RLIMIT_AS; past it, MemoryError)."""
    import resource
    import tempfile

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write(input or b"")
        inp.seek(0)
        try:
            status = subprocess.run(argv, stdin=inp if input is not None else None,
                                    stdout=out, stderr=err, timeout=timeout, preexec_fn=limit).returncode
        except subprocess.TimeoutExpired:
            status = -999
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, status, out.read(cap), err.read(cap))


def kp_capped(prog: str, *args: str, input: bytes | None = None, timeout: float = 60,
              cap: int = 16 << 20) -> subprocess.CompletedProcess[bytes]:
    """Like kp(), but a command that reads /dev/zero after all can fill neither the test's disk nor
    its memory (see capped)."""
    from tests.conftest import BIN

    return capped([str(BIN / prog), *args], input=input, timeout=timeout, cap=cap)


def test_the_memory_cap_of_kp_capped_is_real() -> None:
    # what a reader without a bound would do: it dies of the cap, where uncapped it would fill memory
    proc = capped([sys.executable, "-c", "open('/dev/zero', 'rb').read()"], timeout=300)
    assert proc.returncode == 1 and b"MemoryError" in proc.stderr, proc.stderr.decode()
    # and the cap leaves room for a command to start
    assert kp_capped("kp-ls", "--help").returncode == 0


def no_traceback(proc: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in proc.stderr and b"internal error" not in proc.stderr, proc.stderr.decode()


@pytest.fixture
def world(kp_env: dict[str, Path]) -> dict[str, Any]:
    """The image base and two stopped clones of it, a and b, as their records."""
    make_image("base")
    a, b = lines(kp("kp-clone", "base", "a", "b", check=True).stdout)
    return {"a": a, "b": b, "state": kp_env["state"]}


# -- 1. an id of the wrong type, in every command that reads one ----------------------------------

# (the command, the kind of record it acts on, the name that record gives)
ACTORS = [
    (("kp-rm",), "vm", "a"),
    (("kp-boot", "--accel", "tcg"), "vm", "a"),
    (("kp-stop",), "vm", "a"),
    (("kp-ip", "-t", "5"), "vm", "a"),
    (("kp-ssh", "--", "true"), "vm", "a"),
    (("kp-clone", "-", "x"), "image", "base"),
    (("kp-run", "--apply", "-"), "container", "r"),
    (("kp-ls", "--json"), "vm", "a"),
]
WRONG_IDS: list[object] = [5, None, [], {"id": "0123456789ab"}, True, ""]  # every JSON type but a valid id


@pytest.mark.parametrize("wrong_id", WRONG_IDS, ids=lambda v: orjson.dumps(v).decode())
@pytest.mark.parametrize("argv, kind, name", ACTORS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_an_id_of_the_wrong_type_is_bad_input_and_nothing_is_done(world: dict[str, Any], argv: tuple[str, ...],
                                                                  kind: str, name: str, wrong_id: object) -> None:
    before = objects(world["state"])
    record = {"kind": kind, "name": name, "id": wrong_id}
    proc = kp(*argv, input=feed(record, NOTE))
    no_traceback(proc)
    assert proc.returncode == 65, proc.stderr.decode()
    assert b"stdin line 1" in proc.stderr and b'"id" must be a string' in proc.stderr
    out = lines(proc.stdout)
    assert out[0] == {**record, "error": out[0]["error"]} and out[0]["error"]["code"] == "bad_input"
    assert out[1:] == [NOTE]  # the rest of the stream was still handled
    assert objects(world["state"]) == before
    assert not (world["state"] / "vms" / "x").exists()


def test_kp_rm_goes_on_after_a_bad_id_and_removes_what_the_next_record_names(world: dict[str, Any]) -> None:
    proc = kp("kp-rm", input=feed({**world["a"], "id": 7}, world["b"]))
    no_traceback(proc)
    assert proc.returncode == 65 and b"stdin line 1" in proc.stderr
    assert (world["state"] / "vms" / "a").is_dir()
    assert not (world["state"] / "vms" / "b").exists()


@pytest.mark.parametrize("state", [["broken"], 5, {"s": "creating"}], ids=str)
def test_kp_rm_checks_the_state_it_reads_from_a_record(world: dict[str, Any], state: object) -> None:
    record = {"kind": "vm", "name": "a", "state": state}  # no id: the state says what the record saw
    proc = kp("kp-rm", input=feed(record, NOTE))
    no_traceback(proc)
    assert proc.returncode == 65 and b'stdin line 1: "state" must be a string' in proc.stderr, proc.stderr.decode()
    assert (world["state"] / "vms" / "a").is_dir()
    assert lines(proc.stdout)[1:] == [NOTE]


@pytest.mark.parametrize("error_id, removed, status", [
    ("real", True, 0),     # a failed record's identity is honoured when it is valid
    (5, False, 65),        # and only then: passed through as it came, nothing removed
    (None, False, 65),
    ("absent", False, 0),  # a failed record without an id names nothing that was made
])
def test_kp_rm_honours_a_failed_records_identity_only_when_it_is_valid(world: dict[str, Any], error_id: object,
                                                                       removed: bool, status: int) -> None:
    record = {**world["a"], "error": {"code": "timeout", "message": "earlier stage"}}
    if error_id == "absent":
        del record["id"]
    elif error_id != "real":
        record["id"] = error_id
    proc = kp("kp-rm", input=feed(record, NOTE))
    no_traceback(proc)
    assert proc.returncode == status, proc.stderr.decode()
    assert (world["state"] / "vms" / "a").exists() != removed
    out = lines(proc.stdout)
    assert out[-1] == NOTE
    if not removed:
        assert out[0] == record  # passed through untouched: the earlier stage's error stays
        if status == 65:
            assert b"stdin line 1" in proc.stderr


@pytest.mark.parametrize("argv", [a for a, _, _ in ACTORS if a[0] not in ("kp-rm", "kp-ls")],
                         ids=lambda v: " ".join(v))
def test_a_failed_record_is_passed_through_whatever_its_id(world: dict[str, Any], argv: tuple[str, ...]) -> None:
    kind = {"kp-clone": "image", "kp-run": "container"}.get(argv[0], "vm")
    record = {"kind": kind, "name": "a", "id": 5, "error": {"code": "x", "message": "earlier stage"}}
    before = objects(world["state"])
    proc = kp(*argv, input=feed(record, NOTE))
    no_traceback(proc)
    assert lines(proc.stdout) == [record, NOTE]
    assert objects(world["state"]) == before


# -- names in records ----------------------------------------------------------------------------------

BAD_NAMES = ["../x", "caf\u00e9", 5, None]


@pytest.mark.parametrize("bad_name", BAD_NAMES, ids=lambda v: orjson.dumps(v).decode()[:20])
@pytest.mark.parametrize("argv, kind", [
    (("kp-rm",), "vm"), (("kp-boot", "--accel", "tcg"), "vm"), (("kp-stop",), "vm"), (("kp-ip", "-t", "5"), "vm"),
    (("kp-ssh", "--", "true"), "vm"), (("kp-clone", "-", "x"), "image"), (("kp-run", "--apply", "-"), "container"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_a_bad_name_in_a_record_is_bad_input(world: dict[str, Any], argv: tuple[str, ...], kind: str,
                                             bad_name: object) -> None:
    before = objects(world["state"])
    proc = kp(*argv, input=feed({"kind": kind, "name": bad_name}, NOTE))
    no_traceback(proc)
    assert proc.returncode == 65 and b"stdin line 1" in proc.stderr, proc.stderr.decode()
    out = lines(proc.stdout)
    assert out[0]["error"]["code"] == "bad_name" and out[1:] == [NOTE]
    assert objects(world["state"]) == before


@pytest.mark.parametrize("record", [{"kind": "vm", "name": "../x"}, {"kind": "vm", "name": 5},
                                    {"kind": "vm", "name": "a", "id": 5}, {"kind": "vm", "name": "a", "id": None}],
                         ids=str)
def test_kp_ssh_config_checks_the_records_it_reads(world: dict[str, Any], record: dict[str, object]) -> None:
    proc = kp("kp-ssh", "--config", input=feed(record))
    no_traceback(proc)
    assert proc.returncode == 65 and b"stdin line 1" in proc.stderr, proc.stderr.decode()
    assert proc.stdout == b""


def test_kp_run_apply_of_a_hostile_name_is_a_usage_error(world: dict[str, Any]) -> None:
    for name in ("../x", "-", "A"):
        proc = kp("kp-run", "--apply", name, input=b"" if name == "-" else None)
        no_traceback(proc)
        assert proc.returncode == (0 if name == "-" else 2), (name, proc.stderr.decode())


# -- 2. a bad line on kp-run's stdin stops the run before anything runs ----------------------------------

KP_RUN = ("kp-run", "--image", "localhost/kodepipe-test-none", "--", "sh", "-c", "echo RAN")


@pytest.mark.parametrize("bad_line", [
    b"not json",
    b"[1,2]",
    b'{"kind":"vm","name":"a","id":5}',
    b'{"kind":"vm","name":"a","id":null}',
    b'{"kind":"vm","name":"../a"}',
    b'{"kind":"vm","name":"a","share":7}',
    b'{"kind":"vm","name":"a","ssh":"127.0.0.1:22"}',
    b'{"kind":"vm","name":"a","known_hosts":["x"]}',
    b'{"kind":"note","v":' + b"[" * 300 + b"]" * 300 + b"}",
], ids=lambda v: v[:40].decode())
@pytest.mark.parametrize("first", [True, False], ids=["bad-first", "bad-last"])
def test_a_bad_line_on_kp_runs_stdin_stops_the_run_before_anything_runs(world: dict[str, Any], bad_line: bytes,
                                                                        first: bool) -> None:
    # b names no VM: a run that started anywhere (in a VM, or on the host) would write a container record
    good = feed({"kind": "vm", "name": "b", "id": world["b"]["id"]})
    proc = kp(*KP_RUN, input=bad_line + b"\n" + good if first else good + bad_line + b"\n")
    no_traceback(proc)
    assert proc.returncode == 65, proc.stderr.decode()
    assert f"stdin line {1 if first else 2}: ".encode() in proc.stderr, proc.stderr.decode()
    assert b"nothing was run" in proc.stderr and b"RAN" not in proc.stderr
    assert [r for r in lines(proc.stdout) if r.get("kind") == "container"] == []
    assert not (world["state"] / "containers").exists() or not any((world["state"] / "containers").iterdir())


# -- 3. nesting deeper than orjson can write back ---------------------------------------------------------

READERS = [("kp-rm",), ("kp-boot", "--accel", "tcg"), ("kp-stop",), ("kp-ip", "-t", "5"), ("kp-ssh", "--", "true"),
           ("kp-clone", "-", "x"), ("kp-run", "--apply", "-"), ("kp-ls", "--json"), ("kp-trace",)]


@pytest.mark.parametrize("depth", [255, 1024])
@pytest.mark.parametrize("argv", READERS, ids=lambda v: " ".join(v))
def test_records_nested_too_deep_to_write_back_are_bad_input_and_the_rest_goes_on(
        world: dict[str, Any], argv: tuple[str, ...], depth: int) -> None:
    deep = b'{"kind":"vm","name":"a","v":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    proc = kp(*argv, input=deep + b"\n" + feed(NOTE))
    no_traceback(proc)
    assert proc.returncode == 65, proc.stderr.decode()
    assert b"stdin line 1: nested deeper than 254 levels" in proc.stderr
    assert lines(proc.stdout) == [NOTE]


def test_a_record_at_the_deepest_level_that_can_be_written_passes_through(world: dict[str, Any]) -> None:
    fine = b'{"kind":"note","v":' + b"[" * 253 + b"]" * 253 + b"}"
    proc = kp("kp-rm", input=fine + b"\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == fine + b"\n"


# -- 5. options: nan, inf, zero and sizes -------------------------------------------------------------------

OPTIONS = [
    ("kp-ip", "-t", "nan", "a"), ("kp-ip", "-t", "inf", "a"), ("kp-ip", "-t", "-inf", "a"),
    ("kp-stop", "-t", "nan", "a"), ("kp-stop", "--save", "-t", "nan", "a"),
    ("kp-ssh", "-t", "nan", "a", "--", "true"),
    ("kp-attach", "--idle", "nan", "a"),
    ("kp-image", "warm", "-t", "nan", "base"),
    ("kp-boot", "--memory", "0", "a"), ("kp-boot", "--memory", "infg", "a"), ("kp-boot", "--memory", "nanG", "a"),
    ("kp-boot", "--memory", "1M", "a"), ("kp-boot", "--memory", "99999999G", "a"),
    ("kp-boot", "--memory", "99999999999999999999999G", "a"),
    ("kp-boot", "--net", "bridge:kpnosuchbr", "a"),
    ("kp-run", "--image", "x", "--cpus", "nan", "--", "true"),
    ("kp-run", "--image", "x", "--cpus", "inf", "--", "true"),
    ("kp-run", "--image", "x", "--memory", "0", "--", "true"),
    ("kp-run", "--image", "x", "--memory", "0g", "--", "true"),
    ("kp-run", "--image", "x", "--memory", "infg", "--", "true"),
    ("kp-run", "--image", "x", "--memory", "nang", "--", "true"),
    ("kp-run", "--image", "x", "--memory", "-1g", "--", "true"),
    ("kp-run", "--image", "x", "--memory", "1" + "0" * 400 + "g", "--", "true"),
    ("kp-run", "--image", "x", "--tmp-size", "0", "--", "true"),
    ("kp-run", "--image", "x", "--tmp-size", "infm", "--", "true"),
    ("kp-run", "--image", "x", "--time", "9" * 400 + "s", "--", "true"),
    ("kp-ls", "--older-than", "9" * 400 + "d"),
    ("kp-clone", "base", "base"), ("kp-clone", "base", "x", "base"),
]


@pytest.mark.parametrize("argv", OPTIONS, ids=lambda v: " ".join(v)[:60])
def test_bad_option_values_are_usage_errors_before_anything_changes(world: dict[str, Any],
                                                                    argv: tuple[str, ...]) -> None:
    before = objects(world["state"])
    proc = kp(*argv)
    no_traceback(proc)
    assert proc.returncode == 2, proc.stderr.decode()
    assert b"Error: Invalid value" in proc.stderr
    assert objects(world["state"]) == before and proc.stdout == b""


def test_kp_clone_of_an_image_record_into_its_own_name_does_not_wait_on_its_own_lock(world: dict[str, Any]) -> None:
    image = lines(kp("kp-ls", "--json", "--kind", "image", check=True).stdout)[0]
    proc = kp("kp-clone", "-", "base", "c", input=feed(image))
    no_traceback(proc)
    assert proc.returncode == 1, proc.stderr.decode()  # a lock waited on would time out: 75
    out = lines(proc.stdout)
    assert out[0] == image
    assert [(r["name"], r.get("error", {}).get("code")) for r in out[1:]] == [("base", "exists"), ("c", None)]


# -- 4. files that records and options name -----------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    made = {"fifo": tmp_path / "fifo", "dir": tmp_path / "dir", "nul": tmp_path / "nul.log",
            "utf8": tmp_path / "latin1.log", "long": tmp_path / "long.log", "text": tmp_path / "text.log",
            "unhashable": tmp_path / "unhashable.log", "deep": tmp_path / "deep.log"}
    os.mkfifo(made["fifo"])
    made["dir"].mkdir()
    call = b'1 1.0 execve("/bin/true", ["true"], 0x1 /* 1 vars */) = 0 <0.000010>\n'
    made["nul"].write_bytes(call + b'1 1.1 openat(AT_FDCWD, "/etc\0x", O_RDONLY) = 3 <0.1>\n' + call)
    made["utf8"].write_bytes(call + b'1 1.1 openat(AT_FDCWD, "/caf\xe9", O_RDONLY) = 3 <0.1>\n' + call)
    made["long"].write_bytes(call + b"1 1.1 " + b"x" * (5 << 20) + b"\n" + call)
    made["text"].write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 30)
    made["unhashable"].write_bytes(b'{"kind":"egress","decision":"allow","host":["a"]}\n'
                                   b'{"kind":"egress","decision":"allow","host":"ok.example"}\n')
    made["deep"].write_bytes(b'{"kind":"egress","v":' + b"[" * 400 + b"]" * 400 + b"}\n"
                             b'{"kind":"egress","decision":"deny","host":"x.example"}\n')
    paths = {key: str(path) for key, path in made.items()}
    paths.update(zero="/dev/zero", devnull="/dev/null", eio="/proc/self/mem", missing=str(tmp_path / "missing"))
    return paths


# (key, file, extra kp-trace options, exit status, what stderr says, whether events come before the NOTE)
TRACE_FILES = [
    ("audit_log", "zero", (), 65, b"is a character device, not a regular file"),
    ("audit_log", "devnull", (), 65, b"is a character device"),
    ("audit_log", "fifo", (), 65, b"is a FIFO, not a regular file"),
    ("audit_log", "dir", (), 65, b"is a directory, not a regular file"),
    ("audit_log", "eio", (), 1, b"Input/output error"),
    ("audit_log", "missing", (), 1, b"there is no such file"),
    ("audit_log", "nul", (), 65, b"line 2: contains a NUL byte"),
    ("audit_log", "utf8", (), 65, b"line 2: not UTF-8"),
    ("audit_log", "long", (), 65, b"line 2: longer than 4 MiB"),
    ("audit_log", "nul", ("--summary",), 65, b"line 2: contains a NUL byte"),
    ("egress_log", "zero", (), 65, b"is a character device, not a regular file"),
    ("egress_log", "fifo", (), 65, b"is a FIFO"),
    ("egress_log", "dir", (), 65, b"is a directory"),
    ("egress_log", "eio", (), 1, b"Input/output error"),
    ("egress_log", "text", (), 65, b"line 1: not valid JSON"),
    ("egress_log", "nul", (), 65, b"not valid JSON"),
    ("egress_log", "unhashable", ("--summary",), 65, b'line 1: "host" must be a string'),
    ("egress_log", "deep", (), 65, b"line 1: nested deeper"),
]


@pytest.mark.parametrize("key, which, opts, status, says", TRACE_FILES,
                         ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
def test_kp_trace_reads_only_regular_text_files_that_records_name(files: dict[str, str], key: str, which: str,
                                                                  opts: tuple[str, ...], status: int,
                                                                  says: bytes) -> None:
    record = {"kind": "container", "name": "c1", key: files[which]}
    proc = kp_capped("kp-trace", *opts, input=feed(record, NOTE))
    no_traceback(proc)
    assert proc.returncode == status, proc.stderr.decode()
    assert says in proc.stderr
    out = lines(proc.stdout)
    assert NOTE in out  # the rest of the stream was still handled
    bad_lines = [e for e in out if e.get("type") == "parse_error"]
    if which in ("nul", "utf8", "long") and key == "audit_log" and not opts:
        # the bad line is an event (nothing dropped), and the good lines around it are read
        assert [e["line"] for e in bad_lines] == [2]
        assert [e["argv"] for e in out if e.get("type") == "exec"] == [["true"], ["true"]]


@pytest.mark.parametrize("value", [5, "", ["a"], {"p": 1}], ids=str)
@pytest.mark.parametrize("key", ["audit_log", "egress_log"])
def test_kp_trace_refuses_a_log_field_that_is_not_a_path(key: str, value: object) -> None:
    record = {"kind": "container", "name": "c1", key: value}
    proc = kp_capped("kp-trace", input=feed(record, NOTE))
    no_traceback(proc)
    assert proc.returncode == 65 and b"stdin line 1" in proc.stderr and f'"{key}"'.encode() in proc.stderr
    assert lines(proc.stdout)[1:] == [NOTE]


@pytest.mark.parametrize("data, says", [
    (b"1 1.0 exit_group(0) = ?\n\0\0\0\n1 1.1 +++ exited with 0 +++\n", b"stdin line 2: contains a NUL byte"),
    (b"1 1.0 exit_group(0) = ?\n\xff\xfe\n", b"stdin line 2: not UTF-8"),
    (b"\0" * (6 << 20), b"stdin line 1: longer than 4 MiB"),
], ids=["nul", "utf8", "zeros"])
def test_kp_trace_reports_bad_strace_text_on_stdin(data: bytes, says: bytes) -> None:
    proc = kp_capped("kp-trace", input=data)
    no_traceback(proc)
    assert proc.returncode == 65 and says in proc.stderr, proc.stderr.decode()
    assert any(e.get("type") == "parse_error" for e in lines(proc.stdout))


@pytest.mark.parametrize("which", ["fifo", "dir", "zero"])
def test_kp_trace_log_must_be_a_regular_file(files: dict[str, str], which: str) -> None:
    proc = kp_capped("kp-trace", "--log", files[which], "--", "true")
    no_traceback(proc)
    assert proc.returncode == 2 and b"'--log'" in proc.stderr, proc.stderr.decode()


@pytest.mark.parametrize("make", [
    lambda p: os.mkfifo(p), lambda p: p.symlink_to("/dev/zero"), lambda p: p.mkdir(),
    lambda p: p.symlink_to("/proc/self/mem"),
], ids=["fifo", "dev-zero", "dir", "eio"])
def test_kp_attach_log_reads_only_a_regular_serial_log(world: dict[str, Any], make: Callable[[Path], None]) -> None:
    make(world["state"] / "vms" / "a" / "serial.log")
    proc = kp_capped("kp-attach", "--log", "a")
    no_traceback(proc)
    assert proc.returncode in (1, 65) and b"serial log" in proc.stderr, proc.stderr.decode()
    assert proc.stdout == b""


def test_kp_attach_log_copies_a_log_with_nul_bytes_as_it_is(world: dict[str, Any]) -> None:
    (world["state"] / "vms" / "a" / "serial.log").write_bytes(b"boot\0ing \xff\n")
    proc = kp("kp-attach", "--log", "a")
    assert proc.returncode == 0 and proc.stdout == b"boot\0ing \xff\n"


@pytest.mark.parametrize("argv, which, status", [
    (("kp-run", "--image", "x", "--allow", "example.org", "--allow-file", "{}", "--", "true"), "zero", 2),
    (("kp-run", "--image", "x", "--allow", "example.org", "--allow-file", "{}", "--", "true"), "fifo", 2),
    (("kp-run", "--image", "x", "--allow", "example.org", "--allow-file", "{}", "--", "true"), "utf8", 2),
    (("kp-run", "--image", "x", "--allow", "example.org", "--allow-file", "{}", "--", "true"), "nul", 2),
    (("kp-ssh", "-i", "{}", "a", "--", "true"), "zero", 2),
    (("kp-ssh", "-i", "{}", "a", "--", "true"), "fifo", 2),
], ids=lambda v: " ".join(v[:3]) if isinstance(v, tuple) else str(v))
def test_file_options_take_regular_text_files_only(world: dict[str, Any], files: dict[str, str],
                                                  argv: tuple[str, ...], which: str, status: int) -> None:
    proc = kp_capped(*(files[which] if a == "{}" else a for a in argv))
    no_traceback(proc)
    assert proc.returncode == status, proc.stderr.decode()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("debootstrap"), reason="kp-image build needs root")
@pytest.mark.parametrize("which", ["zero", "fifo", "dir"])
def test_kp_image_build_ssh_key_is_a_regular_file(world: dict[str, Any], files: dict[str, str], which: str) -> None:
    proc = kp_capped("kp-image", "build", "img", "--ssh-key", files[which])
    no_traceback(proc)
    assert proc.returncode in (2, 65), proc.stderr.decode()
    assert not (world["state"] / "images" / "img").exists()


# -- 6. a state directory that is a file ---------------------------------------------------------------------

EVERY_COMMAND = [
    ("kp-ls",), ("kp-rm", "a"), ("kp-clone", "base", "a"), ("kp-boot", "a"), ("kp-ip", "a"), ("kp-stop", "a"),
    ("kp-ssh", "a", "--", "true"), ("kp-ssh", "--config"), ("kp-attach", "a"), ("kp-attach", "--log", "a"),
    ("kp-run", "--apply", "a"), ("kp-run", "--image", "x", "--", "true"), ("kp-image", "warm", "base"),
]


@pytest.mark.parametrize("under", [False, True], ids=["file", "under-a-file"])
@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda v: " ".join(v))
def test_a_state_directory_that_is_a_file_is_a_clear_error(tmp_path: Path, argv: tuple[str, ...],
                                                           under: bool) -> None:
    state = tmp_path / "state-file"
    state.write_bytes(b"not a directory\n")
    env = {**os.environ, "KODEPIPE_STATE_DIR": str(state / "sub" if under else state)}
    proc = kp(*argv, env=env)
    no_traceback(proc)
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"KODEPIPE_STATE_DIR" in proc.stderr
    assert state.read_bytes() == b"not a directory\n"


# -- 7. every bad line, on every command that reads records from stdin ------------------------------------

BEFORE, AFTER = {"kind": "note", "x": 1}, {"kind": "note", "x": 2}  # every stage passes these through

# (id, the bad line, what stderr says of line 2): a line that is not a JSON object with a string
# "kind" is skipped, said on stderr, and makes the status 65; the records around it are handled
BAD_LINES = [
    ("not-json", b"not json", b"line 2: not valid JSON"),
    ("array", b"[1]", b"line 2: expected a JSON object, got an array"),
    ("string", b'"vm"', b"line 2: expected a JSON object, got a string"),
    ("utf8-in-string", b'{"kind":"note","x":"\xff"}', b"line 2: not valid JSON (str is not valid UTF-8"),
    ("utf8-alone", b"\xff", b"line 2: not valid JSON (str is not valid UTF-8"),
    ("nul-in-string", b'{"kind":"note","x":"a\0b"}', b"line 2: not valid JSON (unexpected control character"),
    ("nul-outside", b'{"kind":"note",\0"x":1}', b"line 2: not valid JSON"),
    ("nul-after", b'{"kind":"note"}\0', b"line 2: not valid JSON"),
    ("kind-number", b'{"kind": 1}', b'line 2: "kind" must be a string, got a number'),
]
# kp-trace reads strace text when its first line is not a record: here the first line is one, so it
# reads records (bad strace text on stdin is test_kp_trace_reports_bad_strace_text_on_stdin)
STDIN_READERS = [*READERS, ("kp-ssh", "--config")]


def state_of(state: Path) -> dict[str, bytes]:
    """Every file of the state dir but kodepipe's own SSH key, which kp-ssh makes on first use."""
    return {path: data for path, data in snapshot(state).items() if not path.startswith("ssh/")}


def around(bad: bytes, world: dict[str, Any], argv: tuple[str, ...]) -> bytes:
    """The bad line as line 2, between two records the command handles. kp-ssh --config writes
    ssh_config text, not records: its records around are the VMs a and b, which it looks up."""
    first, last = (world["a"], world["b"]) if argv == ("kp-ssh", "--config") else (BEFORE, AFTER)
    return feed(first) + bad + b"\n" + feed(last)


def handled_around(proc: subprocess.CompletedProcess[bytes], argv: tuple[str, ...]) -> list[dict[str, object]]:
    """What came out between the records around the bad line, after checking that both were handled."""
    if argv == ("kp-ssh", "--config"):
        assert b"a: a is not running" in proc.stderr and b"b: b is not running" in proc.stderr, proc.stderr.decode()
        assert proc.stdout == b""
        return []
    out = lines(proc.stdout)
    assert out[0] == BEFORE and out[-1] == AFTER, out
    return out[1:-1]


@pytest.mark.parametrize("bad, says", [(bad, says) for _, bad, says in BAD_LINES], ids=[i for i, _, _ in BAD_LINES])
@pytest.mark.parametrize("argv", STDIN_READERS, ids=lambda v: " ".join(v))
def test_every_stdin_reader_skips_a_bad_line_names_it_and_handles_the_rest(
        world: dict[str, Any], argv: tuple[str, ...], bad: bytes, says: bytes) -> None:
    before = state_of(world["state"])
    proc = kp(*argv, input=around(bad, world, argv))
    no_traceback(proc)
    assert proc.returncode == 65, proc.stderr.decode()
    assert b"stdin " + says in proc.stderr and b"the line was skipped" in proc.stderr, proc.stderr.decode()
    assert handled_around(proc, argv) == []  # the bad line itself is not written back
    assert state_of(world["state"]) == before


@pytest.mark.parametrize("argv", STDIN_READERS, ids=lambda v: " ".join(v))
def test_every_stdin_reader_refuses_or_passes_on_a_record_named_dot_dot(world: dict[str, Any],
                                                                        argv: tuple[str, ...]) -> None:
    kind = {"kp-clone": "image", "kp-run": "container", "kp-trace": "container"}.get(argv[0], "vm")
    record = {"kind": kind, "name": "../x"}
    before = state_of(world["state"])
    proc = kp(*argv, input=around(orjson.dumps(record), world, argv))
    no_traceback(proc)
    between = handled_around(proc, argv)
    if argv[0] == "kp-ls":  # kp-ls(1): what a record names but does not exist is shown as "gone"
        assert proc.returncode == 0 and between == [{**record, "state": "gone"}], proc.stderr.decode()
    elif argv[0] == "kp-trace":  # kp-trace(1): a record without an audit_log or egress_log is passed through
        assert proc.returncode == 0 and between == [record], proc.stderr.decode()
    else:
        assert proc.returncode == 65, proc.stderr.decode()
        assert f"stdin line 2: invalid {kind} name '../x'".encode() in proc.stderr, proc.stderr.decode()
        if argv != ("kp-ssh", "--config"):
            error = between[0]["error"] if between else None
            assert between == [{**record, "error": error}] and isinstance(error, dict), between
            assert error["code"] == "bad_name"
    assert state_of(world["state"]) == before
    assert not (world["state"] / "x").exists() and not (world["state"].parent / "x").exists()
