"""The host's end of the egress relay (kodepipe.egress.relay) against a scripted guest on a socketpair:
streams reach the real Proxy, queries its DNS answerer, and a guest that breaks the framing ends the
session, on the record.  relay.pl itself is tested in a real namespace (integration/test_egress_relay.py)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kodepipe.core import schema
from kodepipe.egress import mux, relay
from kodepipe.egress import policy as egress_policy
from kodepipe.egress import proxy as egress
from kodepipe.egress.mux import Frame, Kind, encode
from tests import httpd
from tests.test_egress import decisions

READY = encode(Kind.READY, 0, b"127.0.0.1:3128/tcp 127.0.0.1:53/udp")
WAIT = 30.0


class Guest:
    """The guest's side, by hand: frames out, frames in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(WAIT)
        self.decoder = mux.Decoder()
        self.pending: list[Frame] = []

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def next(self) -> Frame | None:
        """The next frame from the host, or None when it shut its end."""
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)


@dataclass
class Session:
    guest: Guest
    relay: relay.Relay
    log: Path
    port: int


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with httpd.origin("127.0.0.1", "hello from") as port:
        log = egress.DecisionLog(tmp_path / "egress.jsonl", "c1")
        proxy = egress.Proxy(egress_policy.Policy.build([f"allowed.test:{port}"], ["allowed.test=127.0.0.1"]), log)
        proxy.start(None, None)
        ours, theirs = socket.socketpair()
        host = relay.Relay(proxy, relay.SocketChannel(theirs))
        host.start()
        try:
            yield Session(Guest(ours), host, tmp_path / "egress.jsonl", port)
        finally:
            ours.close()  # as a relay does once the host shuts its end
            host.stop(WAIT)
            proxy.stop()
            log.close()
            theirs.close()


def test_a_stream_reaches_the_proxy_and_its_answer_comes_back_within_credit(session: Session) -> None:
    request = f"GET http://allowed.test:{session.port}/x HTTP/1.1\r\n\r\n".encode()
    session.guest.send(READY, encode(Kind.OPEN, 1), encode(Kind.DATA, 1, request), encode(Kind.EOF, 1))
    assert session.relay.wait_ready(WAIT) == ("127.0.0.1:3128/tcp", "127.0.0.1:53/udp")
    answer, credited, kinds = b"", 0, []
    while (frame := session.guest.next()) is not None and frame.kind is not Kind.CLOSE:
        kinds.append(frame.kind)
        if frame.kind is Kind.DATA:
            answer += frame.payload
        elif frame.kind is Kind.CREDIT:
            credited += frame.credit
    assert frame is not None and frame.stream == 1
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"hello from /x\n")
    assert credited == len(request)  # what the proxy took is credited back, once
    assert kinds[-1] is Kind.EOF
    (decision,) = decisions(session.log)
    assert decision["decision"] == "allow" and decision["host"] == "allowed.test"


def test_a_refused_name_is_refused_through_the_relay_as_on_the_host(session: Session) -> None:
    import dns.message
    import dns.rcode

    request = f"GET http://denied.test:{session.port}/x HTTP/1.1\r\n\r\n".encode()
    query = dns.message.make_query("denied.test", "A")
    session.guest.send(READY, encode(Kind.OPEN, 1), encode(Kind.DATA, 1, request),
                       encode(Kind.DNS, 77, query.to_wire()))
    answer, reply = b"", None
    while (frame := session.guest.next()) is not None and (frame.kind is not Kind.CLOSE or reply is None):
        if frame.kind is Kind.DATA:
            answer += frame.payload
        elif frame.kind is Kind.DNS:
            assert frame.stream == 77
            reply = dns.message.from_wire(frame.payload)
    assert answer.startswith(b"HTTP/1.1 403")
    assert reply is not None and reply.rcode() == dns.rcode.REFUSED
    assert sorted((d["method"], d["decision"]) for d in decisions(session.log)) == [("DNS", "deny"), ("GET", "deny")]


@pytest.mark.parametrize(("frames", "reason"), [
    ([encode(Kind.OPEN, 1)], "OPEN frame before READY"),
    ([READY, encode(Kind.OPEN, 2)], "OPEN of stream 2 after stream 0"),
    ([READY, encode(Kind.DATA, 4, b"x")], "stream 4, which was never opened"),
    ([READY, mux.HEADER.pack(42, 1, 0)], "unknown kind 42"),
    # the proxy waits for a request head: nothing was sent on the stream that could be credited
    ([READY, encode(Kind.OPEN, 1), mux.credit(1, 5)], "more than was sent"),
])
def test_a_guest_that_breaks_the_framing_ends_the_session_on_the_record(session: Session, frames: list[bytes],
                                                                        reason: str) -> None:
    session.guest.send(*frames)
    while session.guest.next() is not None:  # the host shuts its end: a real relay would exit
        pass
    assert session.relay.done.wait(WAIT)
    assert session.relay.reason is not None and reason in session.relay.reason
    (record,) = [d for d in decisions(session.log) if d.get("method") == "RELAY"]
    assert record["decision"] == "error" and reason in record["reason"]
    assert schema.problems(record, strict=True) == []  # an egress record like the proxy's own


def test_the_guest_ending_before_it_listens_is_a_clear_error(session: Session) -> None:
    session.guest.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(relay.RelayError, match="did not start: the relay ended before it was listening"):
        session.relay.wait_ready(WAIT)


def test_the_relay_command_runs_relay_pl_in_the_namespace() -> None:
    argv = relay.relay_argv(1234)
    assert argv[:5] == ["nsenter", "--net=/proc/1234/ns/net", "--", "perl", "-e"]
    assert argv[5] == relay.script() and "use Socket" in argv[5]
    assert relay.relay_command(1234).startswith("sudo -n nsenter --net=/proc/1234/ns/net -- perl -e '")
    # perl-base only: no module outside it, and nothing that resolves names or connects
    modules = {line.split()[1].rstrip(";") for line in argv[5].splitlines() if line.startswith("use ")}
    assert modules <= {"strict", "warnings", "Socket", "Fcntl", "Errno"}
    assert "connect(" not in argv[5] and "gethostby" not in argv[5] and "getaddrinfo" not in argv[5]


def test_serving_refuses_a_relay_that_never_listens_and_stops_its_proxy(tmp_path: Path) -> None:
    log = egress.DecisionLog(tmp_path / "egress.jsonl", "c1")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(encode(Kind.OPEN, 1))  # a stream before READY: the session ends at once
        with pytest.raises(relay.RelayError, match="did not start: the relay broke the protocol"), \
                relay.serving(relay.SocketChannel(theirs), egress_policy.Policy.build(["a.test"]), log):
            pass
        ours.settimeout(WAIT)
        assert ours.recv(1) == b""  # the host shut its end: a real relay exits
    log.close()
    assert [t.name for t in threading.enumerate() if t.name == "kp-egress"] == []


def test_a_relay_that_does_not_read_what_it_is_sent_ends_the_session(session: Session,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """What waits for the channel is bounded: the streams' windows bound the data, but DNS answers
    and credits are only bounded by OUT_LIMIT (here, lowered: a guest's socket buffer would take the
    real one's worth of queries to fill)."""
    import dns.message

    monkeypatch.setattr(relay, "OUT_LIMIT", 10)
    session.guest.send(READY, encode(Kind.DNS, 1, dns.message.make_query("a.test", "A").to_wire()))
    assert session.relay.done.wait(WAIT)
    assert session.relay.reason == "the relay does not read what it is sent"
    (record,) = decisions(session.log)[-1:]
    assert record["method"] == "RELAY" and "does not read" in record["reason"]
