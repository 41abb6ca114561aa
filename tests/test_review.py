"""The review's pure parts: rules as data (parsing, laying a user's over the built-in ones, globs), the
scan (each check, secrets redacted everywhere, thresholds), what blocks an apply and what --accept takes
in, a partial apply's selection, and the git adapter's path quoting both ways, checked against git."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import orjson
import pytest

from kodepipe.container.quarantine import Change
from kodepipe.container.review import select
from kodepipe.core.errors import BadInput
from kodepipe.review import gitstore, rules
from kodepipe.review.scan import Added, Entry, Finding, blocking, scan

RULES = rules.load(Path("/nonexistent"))


def of(lines: dict[str, list[tuple[int, str]]]) -> dict[str, Added]:
    return {path: Added.of(found) for path, found in lines.items()}


def ids(found: list[Finding]) -> list[str]:
    return [f.rule for f in found]


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("Makefile", "Makefile", True),
    ("Makefile", "sub/dir/Makefile", True),  # no slash: any depth
    ("Makefile", "Makefile.bak", False),
    (".github/workflows/**", ".github/workflows/ci.yml", True),
    (".github/workflows/**", ".github/workflows/a/b.yml", True),
    (".github/workflows/**", "vendor/.github/workflows/ci.yml", False),  # a slash: anchored
    ("*.mk", "rules/build.mk", True),
    ("*.mk", "rules/build.mkx", False),
    (".idea/**", ".idea", False),
    ("a?c", "abc", True),
    ("a?c", "a/c", False),
])
def test_globs(pattern: str, path: str, matches: bool) -> None:
    assert rules.glob_match(pattern, path) is matches


def test_the_built_in_rules_load_and_every_check_has_a_rule() -> None:
    by_id = rules.by_id(RULES)
    assert {r.check for r in RULES if r.check} == set(rules.CHECKS)
    assert by_id["git-metadata"].severity == "critical" and by_id["build-script"].severity == "medium"
    assert by_id["mass-deletion"].count == 5


def write_rules(folder: Path, name: str, items: list[dict[str, object]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(orjson.dumps({"rules": items}))


def test_a_users_rules_are_laid_over_the_built_in_ones_and_added(tmp_path: Path) -> None:
    write_rules(tmp_path, "10-mine.json", [{"id": "mass-deletion", "count": 50},
                                           {"id": "build-script", "severity": "off"},
                                           {"id": "terraform", "severity": "high", "paths": ["*.tf"],
                                            "about": "infrastructure"}])
    loaded = rules.by_id(rules.load(tmp_path))
    assert loaded["mass-deletion"].count == 50 and loaded["mass-deletion"].severity == "high"
    assert "build-script" not in loaded
    found = scan([Entry("infra/main.tf", "added", "file")], {}, list(loaded.values()))
    assert ids(found) == ["terraform"] and found[0].message.endswith("infrastructure")


@pytest.mark.parametrize(("rule", "words"), [
    ({"id": "x", "severity": "high", "paths": ["a"], "colour": "red"}, "unknown key colour"),
    ({"id": "x", "severity": "severe", "paths": ["a"]}, "severity must be one of"),
    ({"id": "X!", "severity": "high", "paths": ["a"]}, "a rule's id"),
    ({"id": "x", "severity": "high"}, "needs paths, lines or a check"),
    ({"id": "x", "severity": "high", "lines": "("}, "not a regular expression"),
    ({"id": "x", "severity": "high", "check": "nosuch"}, "unknown check"),
    ({"id": "x", "severity": "high", "check": "large-file", "bytes": -1}, "bytes must be"),
    ({"id": "x", "severity": "high", "check": "deletions", "share": 2}, "share must be"),
    ({"id": "x", "severity": "high", "paths": "*.tf"}, "paths must be a list"),
])
def test_a_bad_rule_is_refused_naming_its_file(tmp_path: Path, rule: dict[str, object], words: str) -> None:
    write_rules(tmp_path, "bad.json", [rule])
    with pytest.raises(BadInput) as info:
        rules.load(tmp_path)
    assert words in info.value.message and "bad.json" in info.value.message


def test_a_rules_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("x.json").write_text("{")
    with pytest.raises(BadInput, match="not JSON"):
        rules.load(tmp_path)


def test_each_check_fires_on_its_case_and_not_beside_it() -> None:
    entries = [Entry("tool", "added", "file", mode=0o4755), Entry("plain", "added", "file", mode=0o755),
               Entry("capped", "added", "file", mode=0o755, caps=True),
               Entry("out", "added", "symlink", target="/etc/shadow", escapes=True),
               Entry("in", "added", "symlink", target="a.txt"),
               Entry("pipe", "added", "fifo"), Entry("dev", "added", "chardev"),
               Entry("bad\x1bname", "added", "file"), Entry("caf\udce9", "added", "file"),
               Entry("big.bin", "added", "file", size=10 * 1024 * 1024 + 1),
               Entry("ok.bin", "added", "file", size=10 * 1024 * 1024)]
    found = {(f.rule, f.path) for f in scan(entries, {}, RULES)}
    assert found == {("setid", "tool"), ("file-capability", "capped"), ("symlink-out", "out"),
                     ("special-file", "pipe"), ("special-file", "dev"), ("control-characters", "bad\x1bname"),
                     ("control-characters", "caf\udce9"), ("large-file", "big.bin")}


def test_large_addition_counts_every_file() -> None:
    entries = [Entry(f"f{i}", "added", "file", size=100 * 1024 * 1024) for i in range(3)]
    assert "large-addition" in ids(scan(entries, {}, RULES))
    assert "large-addition" not in ids(scan(entries[:2], {}, RULES))


@pytest.mark.parametrize(("deleted", "files", "fires"), [
    (6, 1000, True),  # more than five
    (5, 1000, False),
    (5, 8, True),  # five that are more than half of the workspace
    (2, 3, False),  # a small workspace's two deletions are not a mass deletion
])
def test_mass_deletion_by_count_and_by_share(deleted: int, files: int, fires: bool) -> None:
    entries = [Entry(f"f{i}", "deleted", "file") for i in range(deleted)] + [Entry("gone", "deleted", "dir")]
    found = scan(entries, {}, RULES, workspace_files=lambda: files)
    assert ("mass-deletion" in ids(found)) is fires


def test_path_rules_fire_at_any_depth_or_anchored() -> None:
    paths = (".github/workflows/ci.yml", "pkg/Makefile", ".envrc", "docs/.github/workflows/x.yml", "src/.bashrc",
             ".vscode/tasks.json")
    entries = [Entry(p, "added", "file") for p in paths]
    found = {(f.rule, f.path) for f in scan(entries, {}, RULES)}
    assert found == {("ci-definition", ".github/workflows/ci.yml"), ("build-script", "pkg/Makefile"),
                     ("direnv", ".envrc"), ("shell-rc", "src/.bashrc"), ("editor-tasks", ".vscode/tasks.json")}


def test_git_paths_are_critical() -> None:
    found = scan([Entry("sub/.git/config", "added", "file")], {}, RULES, git_paths=["sub/.git/config"])
    assert [(f.rule, f.severity) for f in found] == [("git-metadata", "critical")]


def test_secrets_are_found_redacted_and_fingerprinted() -> None:
    added = {"a.env": [(3, "export API_TOKEN=hunter2hunter2hunter2"), (4, "API_KEY=${API_KEY}"),
                       (5, "PASSWORD=changeme-later"), (6, "SECRET_NAME=MY_SECRET_VAR")],
             "k.pem": [(1, "-----BEGIN RSA PRIVATE KEY-----"), (2, "MIIEowIBAAKCAQEA")],
             "c.py": [(9, 'client = make("AKIAIOSFODNN7EXAMPLE", other="ghp_abcdefghijklmnopqrstuvwxyz0123456789")')],
             "package.json": [(2, '"postinstall": "node steal.js --token=ghp_abcdefghijklmnopqrstuvwxyz0123456789"')]}
    entries = [Entry(p, "added", "file") for p in added]
    found = scan(entries, of(added), RULES)
    by = {(f.rule, f.path, f.line): f for f in found}
    token = by[("secret-assignment", "a.env", 3)]
    assert token.excerpt == "export API_TOKEN=[REDACTED]"
    assert token.fingerprint == "sha256:" + hashlib.sha256(b"hunter2hunter2hunter2").hexdigest()[:16]
    assert not [k for k in by if k[1] == "a.env" and k[2] in (4, 5, 6)]  # placeholders and names are not secrets
    assert ("private-key", "k.pem", 1) in by
    aws = [f for f in found if f.path == "c.py"]
    assert {f.message.rsplit(": ", 1)[1] for f in aws} >= {"AWS Access Key", "GitHub Token"}
    # every excerpt of a line with a secret in it hides it, whichever rule the excerpt is for
    for f in found:
        for secret in ("hunter2hunter2hunter2", "AKIAIOSFODNN7EXAMPLE", "ghp_abcdefghijklmnop", "MIIEowIBAAKCAQEA"):
            assert secret not in (f.excerpt or "") and secret not in f.message, f
    install = by[("package-install-script", "package.json", 2)]
    assert "[REDACTED]" in (install.excerpt or "") and install.fingerprint is None


def test_excerpts_are_escaped_and_cut() -> None:
    line = "\x1b]0;pwned\x07 x TOKEN=abcdefabcdefabcdef"
    token = rules.parse({"id": "t", "severity": "high", "lines": "TOKEN=(?P<secret>\\w+)", "secret": True}, "test")
    (f,) = scan([Entry("t.sh", "added", "file")], of({"t.sh": [(1, line)]}), [token])
    assert f.excerpt == "\\x1b]0;pwned\\x07 x TOKEN=[REDACTED]"
    (g,) = scan([Entry("p.sh", "added", "file")], of({"p.sh": [(1, "  " + "\x1b[2J" + "y" * 300 + " TOKEN=abc")]}),
                [rules.parse({"id": "t", "severity": "high", "lines": "TOKEN="}, "test")])
    assert g.excerpt is not None and "\x1b" not in g.excerpt and len(g.excerpt) <= 170


def test_findings_per_rule_and_file_are_capped() -> None:
    lines = [(i, f"PASSWORD=abcdefghijkl{i:04d}") for i in range(1, 101)]
    found = scan([Entry("many.env", "added", "file")], of({"many.env": lines}), RULES)
    assert len(found) == 21 and [f.message for f in found if f.line is None] == [
        "80 more findings of this rule in this file"]


def test_what_blocks_and_what_accept_takes_in() -> None:
    found = [Finding("secret", "high", "a/b.py", "m"), Finding("build-script", "medium", "Makefile", "m"),
             Finding("git-metadata", "critical", "sub/.git/config", "m"), Finding("mass-deletion", "high", None, "m")]
    blocked, accepted = blocking(found, "high", [])
    assert ids(blocked) == ["secret", "git-metadata", "mass-deletion"] and accepted == []
    blocked, accepted = blocking(found, "high", ["secret", "sub", "mass-deletion"])
    assert blocked == [] and ids(accepted) == ["secret", "git-metadata", "mass-deletion"]
    blocked, _ = blocking(found, "high", ["su", "a/b"])  # a path prefix must end at a name
    assert ids(blocked) == ["secret", "git-metadata", "mass-deletion"]
    blocked, _ = blocking(found, "medium", ["secret", "git-metadata", "mass-deletion"])
    assert ids(blocked) == ["build-script"]
    assert blocking(found, "critical", ["sub/.git/config"]) == ([], [found[2]])


def test_a_partial_apply_takes_what_a_path_needs() -> None:
    changes = [Change("a.txt", "modified", "file"), Change("new", "added", "dir"), Change("new/x", "added", "dir"),
               Change("new/x/f", "added", "file"), Change("new/y", "added", "file"), Change("old", "deleted", "dir"),
               Change("old/g", "deleted", "file")]
    assert [c.path for c in select(changes, ["new/x/f"])] == ["new", "new/x", "new/x/f"]
    assert [c.path for c in select(changes, ["./new/", "a.txt"])] == ["a.txt", "new", "new/x", "new/x/f", "new/y"]
    assert [c.path for c in select(changes, ["old"])] == ["old", "old/g"]
    for bad in ("nosuch", "ne", ""):
        with pytest.raises(BadInput, match="not among the quarantine's changes"):
            select(changes, [bad])


@pytest.mark.parametrize("name", ["plain.txt", "sp ace", 'quo"te', "back\\slash", "new\nline", "esc\x1b[31m",
                                  "caf\u00e9", "bad\udcff\udcfe", "tab\there"])
def test_paths_are_quoted_for_fast_import_and_read_back_from_git(tmp_path: Path, name: str) -> None:
    """What fast-import makes of the quoted name is the name; what git prints of it unquotes to it."""
    git_dir = tmp_path / "r.git"
    gitstore.init(git_dir)
    with gitstore.fast_import(git_dir) as (stream, marks):
        mark = stream.blob_bytes(b"x\n")
        stream.commit("refs/heads/t", author="a <a@b>", committer="a <a@b>", when=0, message="m\n", parent=None,
                      ops=[("M", "100644", f":{mark}", f"d/{name}")])
    assert marks[mark] == hashlib.sha1(b"blob 2\0x\n", usedforsecurity=False).hexdigest()
    listed = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", "--name-only", "-z", "t"],
                            capture_output=True, check=True).stdout
    assert listed == os.fsencode(f"d/{name}") + b"\0"
    shown = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", "--name-only", "t"],
                           capture_output=True, check=True).stdout.rstrip(b"\n")
    assert gitstore.unquote(shown) == f"d/{name}"
    added = dict(gitstore.added_lines(git_dir, gitstore.EMPTY_TREE, "t"))
    assert added == {f"d/{name}": Added([1], b"x")}


def test_a_blob_shorter_or_longer_than_said_is_refused(tmp_path: Path) -> None:
    git_dir = tmp_path / "r.git"
    gitstore.init(git_dir)
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    for size in (2, 4):
        fd = os.open(src, os.O_RDONLY)
        try:
            with pytest.raises(Exception, match="changed while it was read"), \
                    gitstore.fast_import(git_dir) as (stream, _marks):
                stream.blob_fd(fd, size)
        finally:
            os.close(fd)


def test_added_lines_are_git_s_hunks_read_a_hunk_at_a_time(tmp_path: Path) -> None:
    """Removed lines skipped, "\\ No newline" markers skipped, a line that starts with "++" is content,
    several hunks and files, a binary file has none."""
    git_dir = tmp_path / "r.git"
    gitstore.init(git_dir)
    old = b"".join(b"line %d\n" % i for i in range(1, 30)) + b"no newline"
    new = old.replace(b"line 2\n", b"++ plus\n").replace(b"line 20\n", b"line 20\n+++ b/x\nmore\n") + b"\nend"
    with gitstore.fast_import(git_dir) as (stream, _marks):
        a, b = stream.blob_bytes(old), stream.blob_bytes(new)
        c, d = stream.blob_bytes(b"\0binary"), stream.blob_bytes(b"\0binary2")
        e = stream.blob_bytes(b"only\nnew\n")
        stream.commit("refs/heads/a", author="a <a@b>", committer="a <a@b>", when=0, message="m\n", parent=None,
                      ops=[("M", "100644", f":{a}", "f.txt"), ("M", "100644", f":{c}", "bin")])
        stream.commit("refs/heads/b", author="a <a@b>", committer="a <a@b>", when=0, message="m\n", parent=None,
                      ops=[("M", "100644", f":{b}", "f.txt"), ("M", "100644", f":{d}", "bin"),
                           ("M", "100644", f":{e}", "sp ace")])
    added = dict(gitstore.added_lines(git_dir, "a", "b"))
    assert added == {"f.txt": Added([2, 21, 22, 32, 33], b"++ plus\n+++ b/x\nmore\nno newline\nend"),
                     "sp ace": Added([1, 2], b"only\nnew")}
