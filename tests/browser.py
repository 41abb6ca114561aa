"""A page rendered by a real browser: Debian's headless Chromium, as root in a container, offline.

``dom(path)`` loads an HTML file and returns the DOM Chromium built from it (``--dump-dom``), and
fails the test if the page asked the network for anything.  That is checked twice: every host
name resolves to nothing (``--host-resolver-rules``), so nothing can leave, and Chromium's own
network log (``--log-net-log``) is read for requests the page made.  Chromium makes requests of its
own too (time, component updates, sign-in) whatever the flags say; they carry no initiator
("not an origin"), while everything a page loads carries its origin (a file:// page's is "null"
or "file://"), which is how the two are told apart.

There is no skip: a test that needs Chromium fails, saying how to install it, because a skipped
browser test on CI would pass without checking anything (./setup --test installs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT = 120.0  # seconds for one page; a load here takes about one
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND")


@dataclass(frozen=True)
class Loaded:
    dom: str  # the DOM Chromium built, serialised
    requests: list[str]  # URLs the page itself asked for (none, for a page that needs nothing)


def load(html_path: Path, timeout: float = TIMEOUT) -> Loaded:
    """``html_path`` rendered by Chromium: its DOM and the requests the page made."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's Chromium "
                    "(./setup --test installs it, or: apt-get install --no-install-recommends chromium)",
                    pytrace=False)
    with tempfile.TemporaryDirectory(prefix="kp-chromium-") as scratch:
        home, netlog = Path(scratch, "home"), Path(scratch, "netlog.json")
        home.mkdir()
        argv = [str(CHROMIUM), *FLAGS, f"--user-data-dir={scratch}/profile", f"--log-net-log={netlog}",
                "--dump-dom", html_path.resolve().as_uri()]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
               "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache")}
        # its own session, so a timeout ends Chromium's helper processes too (by this group's id)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"Chromium did not render {html_path} within {timeout:.0f} seconds", pytrace=False)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode != 0 or not out:
            said = [line for line in err.decode(errors="replace").splitlines() if "dbus" not in line]
            pytest.fail(f"Chromium failed on {html_path} (exit {proc.returncode}):\n" + "\n".join(said[-20:]),
                        pytrace=False)
        return Loaded(out.decode("utf-8", errors="replace"), page_requests(netlog))


def dom(html_path: Path, timeout: float = TIMEOUT) -> str:
    """The DOM Chromium built from ``html_path``; the test fails if the page asked for anything
    on the network."""
    loaded = load(html_path, timeout)
    assert loaded.requests == [], f"the page asked the network for {loaded.requests}"
    return loaded.dom


def page_requests(netlog: Path) -> list[str]:
    """The URLs of the requests in a Chromium network log that a page made (they have an
    initiator), leaving out Chromium's own."""
    try:
        log = json.loads(netlog.read_text())
    except (OSError, ValueError) as exc:
        pytest.fail(f"Chromium's network log {netlog} cannot be read: {exc}", pytrace=False)
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    urls = []
    for event in log.get("events", []):
        params = event.get("params") or {}
        if names.get(event.get("type")) == "URL_REQUEST_START_JOB" and "url" in params \
                and params.get("initiator", "not an origin") != "not an origin":
            urls.append(params["url"])
    return urls


class _References(HTMLParser):
    """Every attribute that names something to load or go to, and every url(...) or @import in
    inline CSS."""

    ATTRIBUTES = frozenset(("src", "href", "srcset", "action", "formaction", "data", "poster", "background",
                            "cite", "longdesc", "manifest", "ping", "xlink:href", "lowsrc", "dynsrc"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._style = tag == "style"
        for name, value in attrs:
            if name in self.ATTRIBUTES:
                self.found.append(f"{tag} {name}={value}")
            elif name == "style" and value and ("url(" in value or "@import" in value):
                self.found.append(f"{tag} style={value}")
            elif name == "content" and value and "url=" in value.lower():  # <meta http-equiv="refresh">
                self.found.append(f"{tag} content={value}")

    def handle_endtag(self, tag: str) -> None:
        self._style = False

    def handle_data(self, data: str) -> None:
        if self._style and ("url(" in data or "@import" in data):
            self.found.append(f"style: {data.strip()[:200]}")


def references(page: str) -> list[str]:
    """What ``page`` would load or link to, other than its own fragments (href="#...")."""
    parser = _References()
    parser.feed(page)
    parser.close()
    return [ref for ref in parser.found if not ref.startswith("a href=#")]
