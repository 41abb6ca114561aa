"""The relay's framing (kodepipe.egress.mux): frames from bytes cut anywhere, and the rules a guest's
frames must keep, as tables.  A frame that breaks one ends the session; a frame for a stream the
host already closed is stale and dropped."""

from __future__ import annotations

import random

import pytest

from kodepipe.egress import mux
from kodepipe.egress.mux import HEADER, MAX_PAYLOAD, WINDOW, Frame, Kind, MuxError, encode

READY = encode(Kind.READY, 0, b"127.0.0.1:3128/tcp 127.0.0.1:53/udp")
QUERY = b"\x12\x34" + b"\x01\x00" + b"\x00\x01" + b"\x00" * 6 + b"\x07example\x04test\x00\x00\x01\x00\x01"


def frames(*chunks: bytes) -> list[Frame]:
    decoder = mux.Decoder()
    out = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out


def test_frames_come_out_whole_wherever_the_bytes_are_cut() -> None:
    stream = (READY + encode(Kind.OPEN, 1) + mux.data_frames(1, b"x" * (MAX_PAYLOAD + 5)) + encode(Kind.EOF, 1)
              + mux.credit(1, 7) + encode(Kind.DNS, 9, QUERY) + encode(Kind.CLOSE, 1))
    whole = frames(stream)
    assert [f.kind for f in whole] == [Kind.READY, Kind.OPEN, Kind.DATA, Kind.DATA, Kind.EOF, Kind.CREDIT, Kind.DNS,
                                       Kind.CLOSE]
    assert [len(f.payload) for f in whole if f.kind is Kind.DATA] == [MAX_PAYLOAD, 5]
    assert whole[5].credit == 7 and whole[6].stream == 9 and whole[6].payload == QUERY
    rng = random.Random(11)  # noqa: S311 - reproducible cuts, not secrets
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 30)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert frames(*pieces) == whole
    assert frames(*(stream[i:i + 1] for i in range(len(stream)))) == whole


def test_the_decoder_holds_at_most_one_incomplete_frame() -> None:
    decoder = mux.Decoder()
    data = mux.data_frames(1, b"y" * 100_000)
    for i in range(0, len(data), 4093):
        decoder.feed(data[i:i + 4093])
        assert decoder.pending < HEADER.size + MAX_PAYLOAD
    assert decoder.pending == 0


@pytest.mark.parametrize(("raw", "message"), [
    (HEADER.pack(0, 1, 0), "unknown kind 0"),
    (HEADER.pack(8, 1, 0), "unknown kind 8"),
    (HEADER.pack(255, 1, 0), "unknown kind 255"),
    (HEADER.pack(Kind.DATA, 1, 0), "DATA frame of 0 bytes"),
    (HEADER.pack(Kind.DATA, 1, MAX_PAYLOAD + 1), f"DATA frame of {MAX_PAYLOAD + 1} bytes"),
    (HEADER.pack(Kind.OPEN, 1, 1) + b"x", "OPEN frame of 1 bytes"),
    (HEADER.pack(Kind.EOF, 1, 2) + b"xx", "EOF frame of 2 bytes"),
    (HEADER.pack(Kind.CLOSE, 1, 4) + b"xxxx", "CLOSE frame of 4 bytes"),
    (HEADER.pack(Kind.CREDIT, 1, 3) + b"xxx", "CREDIT frame of 3 bytes"),
    (HEADER.pack(Kind.CREDIT, 1, 5) + b"xxxxx", "CREDIT frame of 5 bytes"),
    (HEADER.pack(Kind.READY, 0, 0), "READY frame of 0 bytes"),
    (HEADER.pack(Kind.READY, 0, 600) + b"x" * 600, "READY frame of 600 bytes"),
    (HEADER.pack(Kind.DNS, 1, 0xFFFF), "DNS frame of 65535 bytes"),
    (HEADER.pack(Kind.READY, 1, 1) + b"x", "READY frame on stream 1"),
    (HEADER.pack(Kind.DATA, 0, 1) + b"x", "DATA frame on stream 0"),
    (HEADER.pack(Kind.OPEN, 0, 0), "OPEN frame on stream 0"),
    (HEADER.pack(Kind.DNS, 0, 12) + b"x" * 12, "DNS frame on stream 0"),
])
def test_a_malformed_frame_is_refused_from_its_header(raw: bytes, message: str) -> None:
    with pytest.raises(MuxError, match=message):
        frames(raw[:HEADER.size])  # the header alone decides: no payload is waited for


def test_encode_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ValueError, match="at most"):
        encode(Kind.DATA, 1, b"x" * (MAX_PAYLOAD + 1))


def data(stream: int, size: int) -> Frame:
    return Frame(Kind.DATA, stream, b"d" * size)


def ready(text: bytes = b"127.0.0.1:3128/tcp 127.0.0.1:53/udp") -> Frame:
    return Frame(Kind.READY, 0, text)


OPEN1 = Frame(Kind.OPEN, 1)
EOF1 = Frame(Kind.EOF, 1)
CLOSE1 = Frame(Kind.CLOSE, 1)


def credit(stream: int, n: int) -> Frame:
    return Frame(Kind.CREDIT, stream, n.to_bytes(4, "big"))


def dns(query: int, payload: bytes = QUERY) -> Frame:
    return Frame(Kind.DNS, query, payload)


# each case: the host's own steps are ("sent", stream, n), ("consumed", stream, n), ("closed", stream),
# ("answered", query); the last guest frame gets the outcome: "ok", "stale", or MuxError's message
SESSIONS: list[tuple[str, list[object], str]] = [
    ("ready then a stream", [ready(), OPEN1, data(1, 10), EOF1, CLOSE1], "ok"),
    ("ready with ::1 too", [ready(b"127.0.0.1:3128/tcp 127.0.0.1:53/udp ::1:3128/tcp ::1:53/udp")], "ok"),
    ("nothing before ready", [OPEN1], "before READY"),
    ("ready twice", [ready(), ready()], "READY twice"),
    ("ready naming another address", [ready(b"0.0.0.0:3128/tcp")], "does not list"),
    ("ready without the proxy port", [ready(b"127.0.0.1:53/udp")], "does not list"),
    ("ready with trailing junk", [ready(b"127.0.0.1:3128/tcp\n")], "does not list"),
    ("streams in order", [ready(), OPEN1, Frame(Kind.OPEN, 2)], "ok"),
    ("a stream skipped", [ready(), Frame(Kind.OPEN, 2)], "OPEN of stream 2 after stream 0"),
    ("a stream reopened", [ready(), OPEN1, CLOSE1, OPEN1], "OPEN of stream 1 after stream 1"),
    ("data on a stream never opened", [ready(), OPEN1, data(2, 1)], "stream 2, which was never opened"),
    ("credit on a stream never opened", [ready(), credit(3, 1)], "stream 3, which was never opened"),
    ("the whole window", [ready(), OPEN1, *[data(1, MAX_PAYLOAD)] * (WINDOW // MAX_PAYLOAD)], "ok"),
    ("one byte beyond the window", [ready(), OPEN1, *[data(1, MAX_PAYLOAD)] * (WINDOW // MAX_PAYLOAD), data(1, 1)],
     "beyond the credit"),
    ("the window again once consumed", [ready(), OPEN1, *[data(1, MAX_PAYLOAD)] * (WINDOW // MAX_PAYLOAD),
                                        ("consumed", 1, 5), data(1, 5)], "ok"),
    ("consumed, but not enough", [ready(), OPEN1, *[data(1, MAX_PAYLOAD)] * (WINDOW // MAX_PAYLOAD),
                                  ("consumed", 1, 5), data(1, 6)], "beyond the credit"),
    ("data after eof", [ready(), OPEN1, EOF1, data(1, 1)], "DATA on stream 1 after its EOF"),
    ("eof twice", [ready(), OPEN1, EOF1, EOF1], "EOF twice"),
    ("credit for nothing sent", [ready(), OPEN1, credit(1, 1)], "more than was sent"),
    ("credit for what was sent", [ready(), OPEN1, ("sent", 1, 100), credit(1, 60), credit(1, 40)], "ok"),
    ("credit beyond what was sent", [ready(), OPEN1, ("sent", 1, 100), credit(1, 60), credit(1, 41)],
     "more than was sent"),
    ("a zero credit", [ready(), OPEN1, ("sent", 1, 100), credit(1, 0)], "CREDIT of 0"),
    ("data after the host closed", [ready(), OPEN1, ("closed", 1), data(1, 10)], "stale"),
    ("eof after the host closed", [ready(), OPEN1, ("closed", 1), EOF1], "stale"),
    ("close after the host closed", [ready(), OPEN1, ("closed", 1), CLOSE1], "stale"),
    ("data after the guest closed", [ready(), OPEN1, CLOSE1, data(1, 10)], "stale"),
    ("streams up to the limit", [ready(), *[Frame(Kind.OPEN, i) for i in range(1, mux.MAX_STREAMS + 1)]], "ok"),
    ("one stream too many", [ready(), *[Frame(Kind.OPEN, i) for i in range(1, mux.MAX_STREAMS + 2)]],
     f"more than {mux.MAX_STREAMS} streams"),
    ("a closed stream frees its place", [ready(), *[Frame(Kind.OPEN, i) for i in range(1, mux.MAX_STREAMS + 1)],
                                         CLOSE1, Frame(Kind.OPEN, mux.MAX_STREAMS + 1)], "ok"),
    ("a query", [ready(), dns(5)], "ok"),
    ("a query before ready", [dns(5)], "before READY"),
    ("the same query id in flight", [ready(), dns(5), dns(5)], "DNS query 5 while one with that id"),
    ("a query id again once answered", [ready(), dns(5), ("answered", 5), dns(5)], "ok"),
    ("queries up to the limit", [ready(), *[dns(i) for i in range(1, mux.MAX_DNS + 1)]], "ok"),
    ("one query too many", [ready(), *[dns(i) for i in range(1, mux.MAX_DNS + 2)]], "more than 64 DNS"),
    ("a query shorter than a DNS header", [ready(), dns(5, b"x" * 11)], "a DNS query of 11 bytes"),
]


@pytest.mark.parametrize(("steps", "outcome"), [(s, o) for _, s, o in SESSIONS], ids=[n for n, _, _ in SESSIONS])
def test_the_host_holds_the_guest_to_the_rules(steps: list[object], outcome: str) -> None:
    session = mux.HostSession()
    *before, last = steps
    for step in before:
        if isinstance(step, Frame):
            assert session.receive(step) is step
        elif step[0] == "sent":  # type: ignore[index]
            session.sent_data(step[1], step[2])  # type: ignore[index]
        elif step[0] == "consumed":  # type: ignore[index]
            assert session.consumed(step[1], step[2])  # type: ignore[index]
        elif step[0] == "closed":  # type: ignore[index]
            session.closed(step[1])  # type: ignore[index]
        else:
            session.answered(step[1])  # type: ignore[index]
    assert isinstance(last, Frame)
    if outcome == "ok":
        assert session.receive(last) is last
    elif outcome == "stale":
        assert session.receive(last) is None
    else:
        with pytest.raises(MuxError, match=outcome):
            session.receive(last)


def test_the_host_never_sends_beyond_the_guests_credit() -> None:
    session = mux.HostSession()
    session.receive(ready())
    session.receive(OPEN1)
    session.sent_data(1, WINDOW)
    with pytest.raises(ValueError, match="credit of 0"):
        session.sent_data(1, 1)
    session.receive(credit(1, 10))
    session.sent_data(1, 10)
    assert not session.consumed(2, 1)  # a stream that is not open takes no credit back
