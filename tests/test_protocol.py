"""Properties of protocol.py: framing, safe decoding and the handshake.

Everything here runs in one process over real sockets (``socket.socketpair``,
the sender in a thread), so it is fast and needs no server.  What it checks:

* any message survives send -> receive, whatever its size and however the
  bytes are split on the way (down to one byte per ``send``);
* a broken stream is told apart from a closed one (TruncatedFrame vs
  ConnectionClosed), and a zero or oversized length is refused from the
  4-byte header alone, before any buffer is allocated;
* arbitrary bytes, and mutated valid pickles, make the receiver raise only
  the protocol's own errors, never anything else (and never run code);
* pickles made of builtins only but shaped to hurt (a huge memo index, deep
  nesting, a shared-reference "bomb") are refused before the unpickler runs;
* the HMAC handshake passes with the right secret and fails on both sides
  with a wrong one, before a single byte of pickle is decoded.
"""

from __future__ import annotations

import math
import pickle
import pickletools
import random
import socket
import struct
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from conftest import RunsCode, framed
from protocol import (ConnectionClosed, FrameTooLarge, ProtocolError, TruncatedFrame,
                      AuthenticationError)

BIG = protocol.WORKER_MAX_FRAME


# --- helpers -----------------------------------------------------------------

class Sender(threading.Thread):
    """Write ``data`` into ``sock`` from a thread (``step`` bytes per send), then
    optionally close.  A large frame does not fit in the socket buffer, so the
    receiver must be reading while this writes.  Errors are kept, not raised:
    a receiver that rightly stops early makes the write fail."""

    def __init__(self, sock, data: bytes, step: int | None = None, close: bool = True):
        super().__init__(daemon=True)
        self.sock, self.data, self.step, self.close = sock, data, step, close
        self.error = None

    def run(self):
        try:
            if self.step is None:
                self.sock.sendall(self.data)
            else:
                for i in range(0, len(self.data), self.step):
                    self.sock.sendall(self.data[i:i + self.step])
        except OSError as exc:
            self.error = exc
        finally:
            if self.close:
                self.sock.close()


def pair(timeout: float = 10.0):
    """A connected socket pair; the receiving end never blocks for long."""
    a, b = socket.socketpair()
    b.settimeout(timeout)
    return a, b


def same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (pickle keeps NaN as NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def receive_all(data: bytes, max_size: int = 4096) -> Exception:
    """Feed ``data`` to recv_message until it raises; return the exception."""
    a, b = pair()
    sender = Sender(a, data)
    sender.start()
    try:
        while True:
            protocol.recv_message(b, max_size, frame_timeout=5)
    except Exception as exc:  # the test inspects what was raised
        return exc
    finally:
        sender.join(10)
        b.close()


scalars = st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.none(),
                    st.binary(max_size=100), st.booleans())
# Payload sizes around the interesting edges (empty, the 64 KiB switch in
# send_frame, 1 MiB) and up to several MB; content from a seeded generator,
# because hypothesis would spend seconds drawing megabytes byte by byte.
payload_sizes = st.one_of(st.integers(0, 300), st.sampled_from([65535, 65536, 65537, 1 << 20]),
                          st.integers(0, 6_000_000))
payloads = st.builds(lambda n, seed: random.Random(seed).randbytes(n), payload_sizes,
                     st.integers(0, 2**32))
messages = st.builds(
    lambda type_, fields, payload: {**fields, "type": type_, "payload": payload},
    st.sampled_from(sorted(protocol.MESSAGE_TYPES)),
    st.dictionaries(st.text(max_size=20), scalars, max_size=8), payloads)


# --- round trips ---------------------------------------------------------------

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages)
def test_any_message_survives_a_real_socket(message):
    """Rule: send_frame(encode(m)) then recv_message gives back m, for dicts of
    str/int/float/None/bytes with payloads from 0 bytes to several MB."""
    a, b = pair()
    sender = Sender(a, framed(protocol.encode(message)))
    sender.start()
    try:
        got = protocol.recv_message(b, BIG, frame_timeout=30)
    finally:
        sender.join(30)
        b.close()
    assert sender.error is None
    assert same(got, message)


@settings(max_examples=10, deadline=None)
@given(fields=st.dictionaries(st.text(max_size=10), scalars, max_size=4))
def test_message_sent_one_byte_at_a_time_survives(fields):
    """Rule: TCP may cut a frame anywhere; one byte per send (header included)
    still yields the same message, followed by a clean ConnectionClosed."""
    message = {**fields, "type": protocol.RESULT}
    a, b = pair()
    sender = Sender(a, framed(protocol.encode(message)), step=1)
    sender.start()
    try:
        got = protocol.recv_message(b, 4096, frame_timeout=10)
        with pytest.raises(ConnectionClosed):
            protocol.recv_message(b, 4096, frame_timeout=10)
    finally:
        sender.join(10)
        b.close()
    assert same(got, message)


def test_two_messages_in_one_send_are_split_correctly():
    """Rule: two frames glued into one write come out as two messages."""
    first, second = {"type": protocol.HELLO, "worker_id": "a"}, {"type": protocol.GET_JOB}
    a, b = pair()
    Sender(a, framed(protocol.encode(first)) + framed(protocol.encode(second))).start()
    assert protocol.recv_message(b, 4096) == first
    assert protocol.recv_message(b, 4096) == second
    with pytest.raises(ConnectionClosed):
        protocol.recv_message(b, 4096)
    b.close()


# --- broken streams ------------------------------------------------------------

def test_clean_close_between_frames_is_connection_closed():
    """Rule: a close before the first header byte is the normal end: ConnectionClosed,
    an EOFError and not a ProtocolError."""
    a, b = pair()
    a.close()
    with pytest.raises(ConnectionClosed) as info:
        protocol.recv_frame(b, 4096)
    assert isinstance(info.value, EOFError)
    assert not isinstance(info.value, ProtocolError)
    b.close()


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 13])
def test_close_inside_a_frame_is_truncated_frame(cut):
    """Rule: a close anywhere after the first header byte (in the header or the
    payload) is TruncatedFrame, a ProtocolError."""
    data = framed(b"x" * 10)[:cut]
    a, b = pair()
    Sender(a, data).start()
    with pytest.raises(TruncatedFrame):
        protocol.recv_frame(b, 4096)
    b.close()


def test_oversized_header_is_refused_from_the_header_alone():
    """Rule: a length above max_size raises FrameTooLarge as soon as the 4 header
    bytes are in: the receiver neither waits for the payload (the sender
    keeps the connection open and silent) nor allocates it."""
    a, b = pair(timeout=5)
    a.sendall(b"\xff\xff\xff\xff")
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            protocol.recv_frame(b, BIG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        a.close()
        b.close()
    assert peak < 1 << 20, f"{peak} bytes allocated for a refused frame"


def test_frame_one_byte_over_the_limit_is_refused():
    """Rule: max_size is inclusive: max_size bytes pass, max_size + 1 do not."""
    a, b = pair()
    Sender(a, framed(b"x" * 100) + framed(b"y" * 101)).start()
    assert protocol.recv_frame(b, 100) == b"x" * 100
    with pytest.raises(FrameTooLarge):
        protocol.recv_frame(b, 100)
    b.close()


def test_zero_length_is_refused():
    """Rule: no message is empty, so a zero length header is a ProtocolError
    (and send_frame refuses to write one)."""
    a, b = pair(timeout=5)
    a.sendall(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="zero-length"):
        protocol.recv_frame(b, 4096)
    with pytest.raises(ValueError):
        protocol.send_frame(a, b"")
    a.close()
    b.close()


def test_started_frame_must_finish_before_its_deadline():
    """Rule: with frame_timeout, a peer that sends part of a frame and goes
    silent raises TimeoutError instead of holding the receiver forever."""
    a, b = pair(timeout=None)
    a.sendall(framed(b"x" * 10)[:6])
    with pytest.raises(TimeoutError):
        protocol.recv_frame(b, 4096, frame_timeout=0.2)
    a.close()
    b.close()


class Dripper(threading.Thread):
    """Writes ``data`` into ``sock`` one byte every ``interval`` seconds (the
    attack's pace, not a wait), until done, refused, or :meth:`stop`."""

    def __init__(self, sock, data: bytes, interval: float):
        super().__init__(daemon=True)
        self.sock, self.data, self.interval = sock, data, interval
        self.stopped = threading.Event()
        self.start()

    def run(self):
        for i in range(len(self.data)):
            if self.stopped.wait(self.interval):
                return
            try:
                self.sock.sendall(self.data[i:i + 1])
            except OSError:
                return

    def stop(self):
        self.stopped.set()
        self.join(10)


def test_dripping_frame_is_cut_at_its_deadline():
    """Rule: frame_timeout bounds the whole frame, not each recv: a peer that
    sends one byte every 20 ms (each recv returns quickly) of a 400-byte
    frame, 8 s in all, is cut off once frame_timeout (0.3 s) has passed."""
    a, b = pair(timeout=10)
    dripper = Dripper(a, framed(b"x" * 400), 0.02)
    try:
        with pytest.raises(TimeoutError):
            protocol.recv_frame(b, 4096, frame_timeout=0.3)
    finally:
        dripper.stop()
        a.close()
        b.close()


# --- garbage in ----------------------------------------------------------------

def _is_protocol_error(exc) -> bool:
    return isinstance(exc, (ProtocolError, ConnectionClosed))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_protocol_errors(data):
    """Rule: whatever bytes arrive, recv_message raises ProtocolError or
    ConnectionClosed, never any other exception."""
    exc = receive_all(data)
    assert _is_protocol_error(exc), repr(exc)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=1, max_size=2000))
def test_arbitrary_payloads_in_valid_frames_raise_only_protocol_errors(payload):
    """Rule: a well-framed payload of garbage reaches the unpickler and is
    refused as a ProtocolError (random headers alone rarely get that far)."""
    exc = receive_all(framed(payload))
    assert _is_protocol_error(exc), repr(exc)


VALID = [
    {"type": protocol.HELLO, "worker_id": "worker-1"},
    {"type": protocol.GET_JOB},
    {"type": protocol.RESULT, "job_id": "0123456789abcdef", "worker_id": "worker-1",
     "chunk_id": 3, "attempt_id": 7, "rows_processed": 500, "rejected_rows": 2,
     "total_sales": 12345.5, "min_price": 0.5, "max_price": 99.0, "avg_price": 40.25,
     "price_count": 498, "groups": [("North", 250, 1, 6000.0, 0.5, 99.0, 40.0, 249),
                                    (None, 250, 1, 6345.5, 1.0, 98.0, 40.5, 249)]},
]


@settings(max_examples=400, deadline=None)
@given(base=st.sampled_from(VALID), data=st.data())
def test_mutated_valid_pickles_raise_only_protocol_errors(base, data):
    """Rule: a valid message pickle with bytes flipped, inserted or cut off
    either decodes to a dict with a known type or raises a protocol error."""
    payload = bytearray(protocol.encode(base))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(payload) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "cut"]))
        if action == "flip":
            payload[where] = data.draw(st.integers(0, 255))
        elif action == "insert":
            payload[where:where] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del payload[where:]
        if not payload:
            payload = bytearray(b"\x00")
    exc = receive_all(framed(bytes(payload)))
    assert _is_protocol_error(exc), repr(exc)


@settings(max_examples=300, deadline=None)
@given(base=st.one_of(st.sampled_from(VALID), messages), proto=st.integers(0, 5),
       data=st.data())
def test_shape_walk_steps_over_arguments_as_pickletools_does(base, proto, data):
    """The shape check reads each opcode's argument size itself (not with
    pickletools.genops): on any pickle of a message, in every protocol, and on the
    same with one byte changed, it meets exactly the opcodes genops meets, in order,
    up to the first one either refuses."""
    payload = bytearray(pickle.dumps(base, protocol=proto))
    if data.draw(st.booleans()):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    payload = bytes(payload)
    seen = []

    class Recording(protocol._ShapeWalk):
        def step(self, name, arg):
            seen.append(name)
            super().step(name, arg)

    real, refused = protocol._ShapeWalk, False
    protocol._ShapeWalk = Recording
    try:
        protocol._check_shape(payload)
    except protocol.ProtocolError:
        refused = True
    finally:
        protocol._ShapeWalk = real
    expected, decoded = [], True
    try:
        for op, _arg, _pos in pickletools.genops(payload):
            expected.append(op.name)
    except ValueError:
        decoded = False
    # The walk stops at the first opcode it refuses; genops at the first it cannot
    # decode (it checks each argument's content too, which the unpickler checks
    # later): where both go on, they agree.
    common = min(len(seen), len(expected))
    assert seen[:common] == expected[:common]
    if decoded and not refused:
        assert seen == expected and seen[-1] == "STOP"   # both read it all: the same walk
    if payload == pickle.dumps(base, protocol=proto):
        assert decoded and seen == expected[:len(seen)]


def test_decode_safe_never_runs_code(tmp_path):
    """Rule: a pickle that calls os.system on load is refused and the command
    never runs (pickle.loads would run it: checked on the same bytes)."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"type": protocol.HELLO, "x": RunsCode(marker)}, protocol=5)
    with pytest.raises(ProtocolError):
        protocol.decode_safe(payload)
    assert not marker.exists()
    pickle.loads(payload)  # the control: the same bytes do run the command
    assert marker.exists()


# Regression tests: each of these pickles uses builtins only, so refusing
# globals alone let them through (see the comment above MAX_DEPTH).

def _ops(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def test_huge_memo_index_is_refused_before_allocation():
    """Rule: LONG_BINPUT 2**28 (9 bytes) made the C unpickler zero a 4 GiB memo;
    memo slots must be used in order, so it is refused at once."""
    payload = _ops(b"N" + b"r" + struct.pack("<I", 2**28))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="memo"):
            protocol.decode_safe(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_deep_nesting_is_refused():
    """Rule: a tuple nested 300,000 deep as a dict key segfaulted the process
    while hashing; nesting beyond MAX_DEPTH is refused, MAX_DEPTH passes."""
    # The bound first: with no depth check the bomb below would crash this
    # process, so a broken bound must fail here, on a harmless message.
    value = "x"
    for _ in range(protocol.MAX_DEPTH - 1):  # the message dict is one level
        value = [value]
    assert protocol.decode_safe(protocol.encode({"type": protocol.ACK, "v": value}))["v"] == value
    with pytest.raises(ProtocolError, match="nested"):
        protocol.decode_safe(protocol.encode({"type": protocol.ACK, "v": [value]}))
    deep_key = _ops(b"}" + b")" + b"\x85" * 300_000 + b"N" + b"s")
    with pytest.raises(ProtocolError, match="nested"):
        protocol.decode_safe(deep_key)


def test_shared_reference_bomb_is_refused():
    """Rule: 40 levels of (t, t) built from memo references is a 300-byte tuple
    whose hash visits 2**40 nodes (the process froze); a memo reference to a
    container is refused, a repeated string still decodes."""
    body = b"}" + b"\x8c\x04type" + b")" + b"\x94" + b"0"
    for level in range(40):
        body += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86" + b"\x94"
        body += b"0" if level < 39 else b""
    with pytest.raises(ProtocolError, match="memo reference"):
        protocol.decode_safe(_ops(body + b"s"))
    shared = "North"
    message = {"type": protocol.ACK, "a": shared, "b": shared}
    ops = [op.name for op, _, _ in pickletools.genops(protocol.encode(message))]
    assert "BINGET" in ops  # pickle itself wrote a memo reference for the repeat
    assert protocol.decode_safe(protocol.encode(message)) == message


def test_unhashable_type_field_is_a_protocol_error():
    """Rule: {"type": []} raised TypeError (``[] in frozenset``) out of
    decode_safe; it must be a ProtocolError like any other bad envelope."""
    for bad in ([], {}, 3, None, "NOPE", b"HELLO"):
        with pytest.raises(ProtocolError):
            protocol.decode_safe(protocol.encode({"type": bad}))
    with pytest.raises(ProtocolError):
        protocol.decode_safe(protocol.encode(["HELLO"]))


# --- handshake -----------------------------------------------------------------

def _handshake(server_secret: bytes, client_secret: bytes):
    """Run both sides over a socket pair; return (server_exc, client_exc)."""
    a, b = pair()
    a.settimeout(10)
    errors = {}

    def side(name, func, sock, secret):
        try:
            func(sock, secret)
        except Exception as exc:  # collected for the assertions
            errors[name] = exc
        finally:
            sock.close()

    client = threading.Thread(target=side, args=("client", protocol.client_handshake, b,
                                                 client_secret))
    client.start()
    side("server", protocol.server_handshake, a, server_secret)
    client.join(10)
    return errors.get("server"), errors.get("client")


def test_handshake_with_the_right_secret_passes_both_ways():
    """Rule: both sides prove the same secret: no error on either side."""
    assert _handshake(b"s3cret", b"s3cret") == (None, None)
    assert _handshake(b"", b"") == (None, None)


@pytest.mark.parametrize("server_secret, client_secret",
                         [(b"s3cret", b"wrong"), (b"s3cret", b""), (b"", b"s3cret")])
def test_handshake_with_a_wrong_secret_fails_on_both_sides(server_secret, client_secret):
    """Rule: a mismatch raises AuthenticationError on the server and on the client."""
    server_exc, client_exc = _handshake(server_secret, client_secret)
    assert isinstance(server_exc, AuthenticationError), repr(server_exc)
    assert isinstance(client_exc, AuthenticationError), repr(client_exc)


def test_handshake_deadline_bounds_a_dripping_peer():
    """Rule: the handshake's timeout bounds the whole exchange: a peer that
    drips its answer one byte every 0.1 s (each recv is quick; 36 bytes take
    3.6 s) raises TimeoutError once the timeout (0.5 s) has passed."""
    a, b = pair(timeout=10)
    a.settimeout(10)
    dripper = Dripper(b, framed(bytes(32)), 0.1)
    try:
        with pytest.raises(TimeoutError):
            protocol.server_handshake(a, b"s3cret", timeout=0.5)
    finally:
        dripper.stop()
        a.close()
        b.close()


def test_handshake_unpickles_nothing(monkeypatch):
    """Rule: the handshake never calls the unpickler, so a peer that does not
    know the secret cannot reach pickle at all: a pickle sent as the answer
    to the challenge is just a wrong digest."""
    calls = []
    monkeypatch.setattr(protocol, "decode_safe", lambda payload: calls.append(payload))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(protocol._NoGlobalsUnpickler, "load", lambda self: calls.append(self))
    assert _handshake(b"s3cret", b"s3cret") == (None, None)
    a, b = pair()
    a.settimeout(5)
    Sender(b, framed(protocol.encode({"type": protocol.HELLO, "worker_id": "x"})),
           close=False).start()
    with pytest.raises(AuthenticationError):
        protocol.server_handshake(a, b"s3cret")
    a.close()
    b.close()
    assert calls == []


def test_hash_collision_dict_is_refused_before_it_is_built():
    """Rule: ints that all hash alike make a dict quadratic to build (a frozen
    server); no message needs more than MAX_DICT_ENTRIES entries, so a
    larger dict is refused from the opcodes, before anything is built."""
    colliding = {i * (2**61 - 1): 0 for i in range(protocol.MAX_DICT_ENTRIES + 1)}
    payload = pickle.dumps({"type": protocol.HELLO, "worker_id": colliding}, protocol=5)
    with pytest.raises(protocol.ProtocolError, match="dict entries"):
        protocol.decode_safe(payload)


def test_sets_are_refused():
    """Rule: no message holds a set, so sets (another way to hash attacker
    values) are refused outright."""
    payload = pickle.dumps({"type": protocol.HELLO, "worker_id": {1, 2}}, protocol=5)
    with pytest.raises(protocol.ProtocolError, match="SET"):
        protocol.decode_safe(payload)


# --- the message schema --------------------------------------------------------

@pytest.mark.parametrize("value", [np.int64(3), True, 3.0, "3"])
def test_make_refuses_anything_but_the_schemas_exact_types(value):
    """Rule: ``make`` checks types exactly, so a numpy scalar or a bool where the
    schema says int is a ValueError on the sending side, never a frame."""
    with pytest.raises(ValueError, match="chunk_id must be int"):
        protocol.make(protocol.ACK, chunk_id=value, counted=True)
    assert protocol.make(protocol.ACK, chunk_id=3, counted=True) == {
        "type": protocol.ACK, "chunk_id": 3, "counted": True}


def test_make_refuses_missing_and_unknown_fields():
    """Rule: every field the schema requires is there and no other."""
    with pytest.raises(ValueError, match="missing fields \\['counted'\\]"):
        protocol.make(protocol.ACK, chunk_id=1)
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        protocol.make(protocol.ACK, chunk_id=1, counted=False, extra=1)


def test_check_names_the_bad_field_and_reads_groups_one_level_deep():
    """Rule: ``check`` raises ProtocolError naming the field; ``groups`` rows are
    checked value by value, and a row nested inside a row is a wrong type."""
    row = ("North", 2, 0, 5.0, 1.0, 4.0, 2.5, 2)
    good = protocol.make(protocol.RESULT, job_id="j", worker_id="w", chunk_id=0, attempt_id=1,
                         rows_processed=2, rejected_rows=0, total_sales=5.0, min_price=1.0,
                         max_price=4.0, avg_price=2.5, price_count=2, groups=[row])
    assert protocol.check(good) is good
    with pytest.raises(protocol.ProtocolError, match="malformed RESULT: no price_count"):
        protocol.check({k: v for k, v in good.items() if k != "price_count"})
    with pytest.raises(protocol.ProtocolError, match="wrong type"):
        protocol.check(dict(good, groups=[(row,) + row[1:]]))
