"""Length-prefixed framing, message types and the connection handshake.

Every byte that crosses a socket in this project goes through this module.
A *frame* is a 4-byte unsigned big-endian length followed by that many
bytes of payload::

    +----------------+---------------------------------+
    | length (!I)    | payload: `length` bytes         |
    +----------------+---------------------------------+

TCP is a byte stream, not a message stream: one ``send`` may arrive as
several ``recv`` calls and two sends may arrive as one.  The length header is
what lets the receiver find where one message ends and the next begins.

The receiver checks the length against its own maximum *before* it allocates
anything, so a hostile peer cannot make it reserve 4 GiB with four bytes.
A zero length is refused too: no message is ever empty.

Closing is told apart from breaking (as in CPython's
``multiprocessing/connection.py``):

* the peer closed **between** frames  -> :class:`ConnectionClosed`
  (a subclass of ``EOFError``: the normal end of a conversation);
* the peer closed **inside** a frame  -> :class:`TruncatedFrame`
  (a :class:`ProtocolError`: something went wrong).

Messages
--------
A message is a ``dict`` with a ``"type"`` key, pickled into one frame.
Both sides decode messages with :func:`decode_safe`, whose unpickler
refuses every global, so a crafted pickle can build only plain builtins
(dict, list, str, int, float, bytes, bool, None) and never runs code.  The
one exception is the ``data`` of a JOB in the documented ``"frame"`` format:
a pickled DataFrame, which the worker unpickles in full because it trusts
the server it was pointed at (see README, "Security").  In ``"csv"`` format
(``--stream``) the worker unpickles nothing but builtins either.

=========  ===============  =================================================
type       direction        fields
=========  ===============  =================================================
HELLO      worker -> server worker_id
WELCOME    server -> worker job_id, chunks (total count), lease_timeout (s),
                            max_frame (bytes the server accepts in a frame);
                            --stream only: input_path (absolute), and
                            input_fingerprint (worker.file_fingerprint as
                            JSON): the file a worker may read itself
GET_JOB    worker -> server optional local_read (bool: this worker opened
                            input_path and found input_fingerprint)
JOB        server -> worker chunk_id, attempt_id, job_id, rows (or None),
                            format ("frame": data is a pickled DataFrame;
                            "csv": data is the header line + whole records;
                            "range": data is the header line, and the
                            records are bytes start..end of input_path),
                            data (bytes), compressed (bool: data is zlib'd),
                            price_col, qty_col, group_col (or None), sep,
                            decimal, encoding; start, end (format "range")
WAIT       server -> worker retry_after (s): chunks are leased but not done,
                            ask again later
NO_JOB     server -> worker (none): every chunk is done (or the job stopped)
RESULT     worker -> server job_id, worker_id, chunk_id, attempt_id,
                            rows_processed, rejected_rows, total_sales,
                            min_price, max_price, avg_price, price_count,
                            groups (list of per-group rows, see worker.py),
                            next (bool, optional: lease me the next chunk)
FAILED     worker -> server job_id, worker_id, chunk_id, attempt_id, error
ACK        server -> worker chunk_id, counted (bool: this result is the one
                            that counts), next (bool, optional: the answer
                            to a GET_JOB follows in the next frame)
ERROR      server -> worker reason; the server closes the connection next
=========  ===============  =================================================

One round trip per chunk
------------------------
GET_JOB is for the first chunk and after a WAIT.  In the steady state a
worker sends its RESULT with ``next=True`` and the server answers with an
ACK with ``next=True``, followed at once by what a GET_JOB would have got
(JOB, WAIT or NO_JOB): two frames, usually in one write.  The next chunk's
lease is committed in the same transaction as the result, so neither
frame leaves before that commit (README, "The life of one chunk").

Handshake
---------
Before any message, both sides prove they know the shared secret with a
mutual HMAC-SHA256 challenge-response in three frames (see the block above
:func:`server_handshake`): the server sends a 32-byte random nonce, the
worker answers with its own nonce and ``HMAC(secret, "worker" + both
nonces)``, and the server answers ``HMAC(secret, "server" + both nonces)``
(or a failure frame).  Both checks use ``hmac.compare_digest``.  Binding the
role and both nonces into every MAC makes a reflected or replayed answer
useless.  Without ``--secret`` the key is empty, which proves nothing but
keeps one code path; with it, a peer that does not know the secret is
dropped before a single byte of pickle is decoded.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import pickle
import pickletools
import socket
import struct
import time

__all__ = [
    "HELLO", "WELCOME", "GET_JOB", "JOB", "WAIT", "NO_JOB", "RESULT", "FAILED",
    "ACK", "ERROR", "MESSAGE_TYPES",
    "ProtocolError", "FrameTooLarge", "TruncatedFrame", "ConnectionClosed",
    "AuthenticationError", "ServerRefused",
    "send_frame", "send_frames", "recv_frame", "send_message", "recv_message",
    "encode", "decode_safe", "MESSAGES", "OPTIONAL", "GROUP_ROW", "make", "check",
    "server_handshake", "client_handshake",
    "SERVER_MAX_FRAME", "WORKER_MAX_FRAME",
]

HELLO = "HELLO"
WELCOME = "WELCOME"
GET_JOB = "GET_JOB"
JOB = "JOB"
WAIT = "WAIT"
NO_JOB = "NO_JOB"
RESULT = "RESULT"
FAILED = "FAILED"
ACK = "ACK"
ERROR = "ERROR"
MESSAGE_TYPES = frozenset(
    {HELLO, WELCOME, GET_JOB, JOB, WAIT, NO_JOB, RESULT, FAILED, ACK, ERROR})

# A field's spec is a tuple of the exact types it may hold (``type(v) in
# spec``, not isinstance: bool is not an int here, and numpy's float64,
# a float subclass, is refused where it is made rather than pickled as a
# numpy object that the peer's unpickler refuses).  A name in OPTIONAL may
# be left out.  ``groups`` is the one nested field: a list of GROUP_ROW
# rows, checked row by row, one level deep (see :func:`check`).
NUMBER = (float, int)
GROUP_ROW = ((str, type(None)), (int,), (int,), NUMBER,            # group_value, rows, rejected, sales
             NUMBER + (type(None),), NUMBER + (type(None),),       # min_price, max_price
             NUMBER + (type(None),), (int,))                       # avg_price, price_count
_IDS = {"job_id": (str,), "worker_id": (str,), "chunk_id": (int,), "attempt_id": (int,)}
MESSAGES = {
    HELLO: {"worker_id": (str,)},
    WELCOME: {"job_id": (str,), "chunks": (int,), "lease_timeout": NUMBER, "max_frame": (int,),
              "input_path": (str,), "input_fingerprint": (str,)},
    GET_JOB: {"local_read": (bool,)},
    JOB: {"job_id": (str,), "chunk_id": (int,), "attempt_id": (int,),
          "rows": (int, type(None)), "format": (str,), "data": (bytes,), "compressed": (bool,),
          "price_col": (str,), "qty_col": (str,), "group_col": (str, type(None)),
          "sep": (str,), "decimal": (str, type(None)), "encoding": (str,),
          "start": (int,), "end": (int,)},
    WAIT: {"retry_after": NUMBER},
    NO_JOB: {},
    RESULT: {**_IDS, "rows_processed": (int,), "rejected_rows": (int,), "total_sales": NUMBER,
             "min_price": NUMBER + (type(None),), "max_price": NUMBER + (type(None),),
             "avg_price": NUMBER + (type(None),), "price_count": (int,), "groups": (list,),
             "next": (bool,)},
    FAILED: {**_IDS, "error": (str,)},
    ACK: {"chunk_id": (int,), "counted": (bool,), "next": (bool,)},
    ERROR: {"reason": (str,)},
}
# groups absent: no --group-by.  next absent: False, the ACK comes alone and
# the worker asks with GET_JOB (a stopping worker wants no more chunks).
OPTIONAL = {
    RESULT: {"groups", "next"},
    ACK: {"next"},
    WELCOME: {"input_path", "input_fingerprint"},    # absent: not --stream
    GET_JOB: {"local_read"},                         # absent: False
    JOB: {"start", "end"},                           # present in format "range" only
}


def _field_problem(type_: str, name: str, value) -> str | None:
    """Why ``value`` cannot be field ``name`` of a ``type_`` message (None: it can)."""
    allowed = MESSAGES[type_][name]
    if type(value) not in allowed:
        return (f"{name} must be {' or '.join(t.__name__ for t in allowed)}, "
                f"not {type(value).__name__}")
    if name == "groups":
        for row in value:
            if type(row) not in (list, tuple) or len(row) != len(GROUP_ROW):
                return f"each row of groups must be a list or tuple of {len(GROUP_ROW)} fields"
            if any(type(v) not in kinds for v, kinds in zip(row, GROUP_ROW)):
                return "a row of groups holds a value of the wrong type"
    return None


def make(type_: str, **fields) -> dict:
    """Build a ``type_`` message from ``fields``, checked against :data:`MESSAGES`.

    Raises ``ValueError`` for an unknown type, an unknown or missing field,
    or a value of a type the schema does not list (say, a numpy scalar):
    a bug on the sending side, caught before anything is sent.
    """
    spec = MESSAGES.get(type_)
    if spec is None:
        raise ValueError(f"unknown message type {type_!r}")
    missing = set(spec) - set(fields) - OPTIONAL.get(type_, set())
    unknown = set(fields) - set(spec)
    if missing or unknown:
        raise ValueError(f"{type_}: missing fields {sorted(missing)}, unknown {sorted(unknown)}")
    for name, value in fields.items():
        problem = _field_problem(type_, name, value)
        if problem:
            raise ValueError(f"{type_}: {problem}")
    return {"type": type_, **fields}


def check(message: dict, fields=None) -> dict:
    """Check a received message (from :func:`decode_safe`) against :data:`MESSAGES`.

    Checks ``fields`` (names; default: every field of its type) for
    presence and type, at a fixed depth: the message's own fields, and for
    ``groups`` each row's values.  Extra fields are ignored.  Returns
    ``message``; raises :class:`ProtocolError` naming the first bad field.
    """
    type_ = message["type"]
    names = MESSAGES[type_] if fields is None else fields
    for name in names:
        if name not in message:
            if name in OPTIONAL.get(type_, ()):
                continue
            raise ProtocolError(f"malformed {type_}: no {name}")
        problem = _field_problem(type_, name, message[name])
        if problem:
            raise ProtocolError(f"malformed {type_}: {problem}")
    return message


# --- Framing -----------------------------------------------------------------

HEADER = struct.Struct("!I")
# Worker messages are a few hundred bytes (a little more with --group-by);
# 1 MiB leaves room and still keeps a hostile peer's frames cheap.
SERVER_MAX_FRAME = 1 << 20
# JOB frames carry a whole chunk; 1 GiB bounds a broken server's length
# header while fitting any sensible chunk of a multi-GB file.  The server
# sizes its chunks to fit it.  (Tests lower it for both sides through
# SALES_TEST_WORKER_MAX_FRAME, to try "too large" chunks of a few KiB.)
WORKER_MAX_FRAME = int(os.environ.get("SALES_TEST_WORKER_MAX_FRAME") or 1 << 30)
NONCE_SIZE = 32          # bytes of os.urandom per side and connection
MAC_SIZE = 32            # HMAC-SHA256
_CHALLENGE = b"#CHALLENGE#"
_ANSWER = b"#ANSWER#"
_WELCOME = b"#WELCOME#"
_FAILURE = b"#FAILURE#"


class ProtocolError(Exception):
    """The peer broke the protocol: bad length, truncated frame, bad message."""


class FrameTooLarge(ProtocolError):
    """A frame header announced more bytes than this receiver accepts."""


class TruncatedFrame(ProtocolError):
    """The peer closed the connection in the middle of a frame."""


class ConnectionClosed(EOFError):
    """The peer closed the connection cleanly, between two frames."""


class AuthenticationError(ProtocolError):
    """The peer failed the HMAC challenge (wrong or missing secret)."""


class ServerRefused(Exception):
    """The server answered ERROR: it refused the last message."""


def send_frame(sock: socket.socket, payload: bytes) -> None:
    """Send one frame: the 4-byte length of ``payload``, then ``payload``.

    Raises ``ValueError`` for an empty payload or one of 4 GiB or more, and
    ``OSError`` if the socket fails.  ``sendall`` loops until every byte is
    handed to the kernel; two ``sendall`` calls avoid copying a large payload
    just to glue the header on.
    """
    size = len(payload)
    if not 0 < size <= 0xFFFFFFFF:
        raise ValueError(f"frame payload must be 1..2**32-1 bytes, got {size}")
    if size < 65536:
        sock.sendall(HEADER.pack(size) + payload)
    else:
        sock.sendall(HEADER.pack(size))
        sock.sendall(payload)


def send_frames(sock: socket.socket, payloads: list) -> None:
    """Send one frame per payload, in order; small ones in one ``sendall``.

    Used for an ACK followed by the next JOB: one write wakes the peer once
    instead of twice.  Raises what :func:`send_frame` raises.
    """
    sizes = [len(p) for p in payloads]
    if min(sizes) < 1 or max(sizes) > 0xFFFFFFFF:
        raise ValueError(f"frame payloads must be 1..2**32-1 bytes, got {sizes}")
    if sum(sizes) < 65536:
        sock.sendall(b"".join(HEADER.pack(len(p)) + p for p in payloads))
    else:   # a large JOB: not copied just to glue the frames together
        for payload in payloads:
            send_frame(sock, payload)


def recv_frame(sock: socket.socket, max_size: int,
               frame_timeout: float | None = None) -> bytes:
    """Receive one frame and return its payload (``1..max_size`` bytes).

    Waiting for a frame to *start* is bounded by the socket's own timeout
    (None: forever).  With ``frame_timeout``, once the first byte is in, the
    whole rest of the frame must arrive within that many seconds, so a peer
    that sends half a frame and goes silent is dropped in bounded time.

    Raises :class:`ConnectionClosed` if the peer closed before the first
    header byte, :class:`TruncatedFrame` if it closed later, and
    :class:`ProtocolError` (:class:`FrameTooLarge`) for a zero or too large
    length, which is decided from the header alone.  ``TimeoutError`` and
    ``OSError`` pass through.
    """
    # Up to a whole header at once (almost always all of it): one system call
    # fewer per frame than a first byte, then the rest.
    first = sock.recv(HEADER.size)
    if not first:
        raise ConnectionClosed("peer closed the connection")
    deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
    if len(first) < HEADER.size:
        first += _recv_exactly(sock, HEADER.size - len(first), deadline)
    (size,) = HEADER.unpack(first)
    if size == 0:
        raise ProtocolError("zero-length frame")
    if size > max_size:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {max_size}")
    return _recv_exactly(sock, size, deadline)


def _recv_exactly(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    """Read exactly ``size`` bytes of a started frame (``recv`` may return fewer)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    old_timeout = sock.gettimeout()
    try:
        while got < size:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"frame incomplete after its deadline ({got} of {size} bytes)")
                sock.settimeout(remaining)
            n = sock.recv_into(view[got:])
            if n == 0:
                raise TruncatedFrame(f"peer closed after {got} of {size} bytes")
            got += n
    finally:
        if deadline is not None:
            sock.settimeout(old_timeout)
    return bytes(buf)


# --- Messages ----------------------------------------------------------------

def encode(message: dict) -> bytes:
    """Pickle a message dict (protocol 5, which handles large buffers well)."""
    return pickle.dumps(message, protocol=5)


class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that can build builtins only.

    Code execution through pickle always goes through ``find_class`` (to
    fetch a callable such as ``os.system``); refusing every lookup leaves an
    attacker with nothing to call.  See the warning at the top of the
    ``pickle`` module documentation.
    """

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")


def decode_safe(payload: bytes) -> dict:
    """Unpickle an untrusted frame into a message dict, refusing all globals.

    Returns a dict whose ``"type"`` is one of :data:`MESSAGE_TYPES`.
    Raises :class:`ProtocolError` for anything else, including every error
    the unpickler can raise on garbage and every shape :func:`_check_shape`
    refuses before the unpickler runs.
    """
    _check_shape(payload)
    try:
        message = _NoGlobalsUnpickler(io.BytesIO(payload)).load()
    except Exception as exc:  # garbage can raise nearly anything here
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None
    return _check_envelope(message)


def _check_envelope(message) -> dict:
    # isinstance first: `in` hashes the value, and a list is unhashable.
    if not (isinstance(message, dict) and isinstance(message.get("type"), str)
            and message["type"] in MESSAGE_TYPES):
        raise ProtocolError("message is not a dict with a known 'type'")
    return message


def send_message(sock: socket.socket, type_: str, **fields) -> None:
    """Encode ``{"type": type_, **fields}`` and send it as one frame (unchecked:
    the tests use it to send what a broken peer would; code uses :func:`make`)."""
    send_frame(sock, encode({"type": type_, **fields}))


def recv_message(sock: socket.socket, max_size: int,
                 frame_timeout: float | None = None) -> dict:
    """Receive one frame and decode it with :func:`decode_safe`.

    Raises what :func:`recv_frame` and :func:`decode_safe` raise.
    """
    return decode_safe(recv_frame(sock, max_size, frame_timeout))


# --- Handshake ---------------------------------------------------------------
# Three frames, at most 256 bytes each, nothing unpickled:
#
#     server -> worker   #CHALLENGE# Ns                         (11 + 32 bytes)
#     worker -> server   #ANSWER# Nw HMAC(k, "worker" Ns Nw)     (8 + 32 + 32 bytes)
#     server -> worker   #WELCOME# HMAC(k, "server" Ns Nw)       (9 + 32 bytes)
#                     or #FAILURE#                              (9 bytes)
#
# Each MAC names the role that computes it and covers both nonces, so a MAC
# is of use only at its own step of its own connection.  Without the role, a
# fake server could send a worker's own challenge to another worker and hand
# its answer back as "proof" (a reflection); without both nonces, an answer
# recorded on one connection would pass on another (a replay).  What no
# handshake stops is a live relay of all three frames: README, "Security".

def _mac(secret: bytes, role: bytes, server_nonce: bytes, worker_nonce: bytes) -> bytes:
    """HMAC-SHA256 of ``role`` + both nonces (fixed lengths, so unambiguous)."""
    return hmac.new(secret, role + server_nonce + worker_nonce, hashlib.sha256).digest()


def _recv_handshake_frame(sock: socket.socket, deadline: float | None) -> bytes:
    """One handshake frame (at most 256 bytes), all of it before ``deadline``.

    The socket's timeout bounds each ``recv`` only: a peer that drips one
    byte just inside it could stretch a handshake for hours and hold a
    connection slot all that time.  A deadline bounds the whole exchange.
    """
    if deadline is None:
        return recv_frame(sock, 256)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("handshake not finished in time")
    old_timeout = sock.gettimeout()
    sock.settimeout(remaining)
    try:
        return recv_frame(sock, 256, frame_timeout=remaining)
    except TimeoutError:
        raise TimeoutError("handshake not finished in time") from None
    finally:
        sock.settimeout(old_timeout)


def server_handshake(sock: socket.socket, secret: bytes, timeout: float | None = None) -> None:
    """Authenticate a fresh connection from the server side (the server challenges).

    Sends a fresh nonce Ns, checks the worker's MAC over its role and both
    nonces, then proves its own knowledge of ``secret`` with a MAC under the
    other role.  With ``timeout``, the whole exchange must finish within
    that many seconds, else ``TimeoutError``.  Raises
    :class:`AuthenticationError` (after sending ``#FAILURE#``) for any
    answer but the right one, and the framing errors on a broken link.
    Nothing is unpickled here.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    server_nonce = os.urandom(NONCE_SIZE)
    send_frame(sock, _CHALLENGE + server_nonce)
    answer = _recv_handshake_frame(sock, deadline)
    worker_nonce = answer[len(_ANSWER):len(_ANSWER) + NONCE_SIZE]
    expected = _ANSWER + worker_nonce + _mac(secret, b"worker", server_nonce, worker_nonce)
    # Anything but the expected frame (a wrong MAC, an old client, a pickle)
    # is the same refusal; compare_digest takes as long wherever they differ.
    if len(worker_nonce) != NONCE_SIZE or not hmac.compare_digest(answer, expected):
        send_frame(sock, _FAILURE)
        raise AuthenticationError("peer failed the challenge (wrong secret?)")
    send_frame(sock, _WELCOME + _mac(secret, b"server", server_nonce, worker_nonce))


def client_handshake(sock: socket.socket, secret: bytes, timeout: float | None = None) -> None:
    """Authenticate a fresh connection from the worker side (the worker answers).

    Mutual: the worker also checks the server's MAC, so a worker is never
    fed chunks by an impostor; it returns only once that MAC is right, and
    a caller reads no message (unpickles no JOB) before that.  Takes
    ``timeout`` as :func:`server_handshake` does.  Raises
    :class:`ProtocolError` if the first frame is not a challenge,
    :class:`AuthenticationError` for ``#FAILURE#`` or any reply but the
    right ``#WELCOME#``, and the framing errors on a broken link.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    challenge = _recv_handshake_frame(sock, deadline)
    if not challenge.startswith(_CHALLENGE) or len(challenge) != len(_CHALLENGE) + NONCE_SIZE:
        raise ProtocolError("expected an authentication challenge")
    server_nonce = challenge[len(_CHALLENGE):]
    worker_nonce = os.urandom(NONCE_SIZE)
    send_frame(sock, _ANSWER + worker_nonce + _mac(secret, b"worker", server_nonce, worker_nonce))
    reply = _recv_handshake_frame(sock, deadline)
    if reply == _FAILURE:
        raise AuthenticationError("authentication refused by peer (wrong secret?)")
    if not hmac.compare_digest(reply, _WELCOME + _mac(secret, b"server", server_nonce,
                                                      worker_nonce)):
        raise AuthenticationError("the server failed the challenge (wrong secret, or not "
                                  "the real server)")


# --- Appendix: why decode_safe walks a pickle's opcodes before it loads it --------

# Refusing globals is not enough: three tiny pickles made only of builtins
# still hurt the C unpickler or whoever touches the result.
# * LONG_BINPUT 2**28 (9 bytes) makes it allocate and zero a 4 GiB memo;
# * 300 KB of TUPLE1 opcodes nest a tuple 300,000 deep, and hashing it (a
#   dict key, or `in` a set) overflows the C stack: a segfault;
# * 40 levels of (t, t) built with memo GETs is a 300-byte tuple whose hash
#   or repr visits 2**40 nodes, holding the GIL: the whole server freezes.
# * a dict or set of 85,000 ints that all hash alike (i * (2**61 - 1)) takes
#   quadratic time to build, again holding the GIL: a minute per frame.
# So decode_safe first walks the opcodes (pickletools gives their argument
# sizes; no object is built) and admits plain values, nesting up to
# MAX_DEPTH, memo slots in order, shared references to scalars only (what
# pickle.dumps emits for a repeated string), no sets, and at most
# MAX_DICT_ENTRIES dict entries in all (no message has more than a few
# dozen).  What is left is a tree no bigger than the frame, built in linear
# time.
MAX_DEPTH = 16
MAX_DICT_ENTRIES = 1024
_SCALAR_OPS = frozenset({
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG",
    "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES",
    "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"})
_EMPTY_OPS = frozenset({"EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE"})
_FROM_MARK_OPS = frozenset({"TUPLE", "LIST", "DICT"})
_FILL_FROM_MARK_OPS = frozenset({"APPENDS", "SETITEMS"})
_DICT_OPS = frozenset({"DICT", "SETITEM", "SETITEMS"})
_POP_COUNT = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "APPEND": 1, "SETITEM": 2}
_MEMO_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MARK = -1  # a MARK on the simulated stack; values are their nesting depth


def _check_shape(payload: bytes) -> None:
    """Walk a pickle's opcodes without building anything; refuse dangerous shapes.

    Simulates the unpickler's stack with one int per object: its nesting
    depth (0 for a scalar).  Raises :class:`ProtocolError` for an opcode
    that is not a plain value or a list, tuple or dict (every global,
    REDUCE, BUILD, DUP, sets, buffers...), nesting deeper than
    :data:`MAX_DEPTH`, more than :data:`MAX_DICT_ENTRIES` dict entries, a
    memo slot out of order, or a memo reference to a container (a shared or
    cyclic structure), and for a pickle cut short.  Cost: linear in
    ``len(payload)``.  The opcodes and their argument sizes come from
    :mod:`pickletools` (:data:`_OPCODES`); it steps over the arguments
    itself, three times faster than ``pickletools.genops``, which decodes
    every one of them.
    """
    walk, pos, end = _ShapeWalk(), 0, len(payload)
    try:
        while True:
            if pos >= end:
                raise ValueError("the pickle ends before its STOP")
            name, size = _OPCODES.get(payload[pos], ("", 0))
            if not name:
                raise ValueError(f"unknown opcode {payload[pos]:#04x}")
            at = pos + 1
            if size >= 0:                          # an argument of fixed size
                pos = at + size
            elif size == pickletools.UP_TO_NEWLINE:
                pos = payload.find(b"\n", at) + 1
                if not pos:
                    raise ValueError(f"{name} without its newline")
            else:                                  # a length, then that many bytes
                width = _LENGTH_WIDTH[size]
                length = int.from_bytes(payload[at:at + width], "little",
                                        signed=size == pickletools.TAKEN_FROM_ARGUMENT4)
                if length < 0:
                    raise ValueError(f"{name} with a negative length")
                at += width
                pos = at + length
            if pos > end:
                raise ValueError(f"{name} is cut short")
            walk.step(name, _memo_index(name, payload[at:pos]) if name in _MEMO_ARG_OPS else None)
            if name == "STOP":
                return
    except ValueError as exc:
        raise ProtocolError(f"refused pickle: {exc}") from None


# opcode byte -> (name, argument size as pickletools gives it: bytes, or one of
# its negative codes for "up to a newline" and "a length, then the bytes").
_OPCODES = {op.code.encode("latin-1")[0]: (op.name, op.arg.n if op.arg else 0)
            for op in pickletools.opcodes}
_LENGTH_WIDTH = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                 pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}
_MEMO_ARG_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def _memo_index(name: str, arg: bytes) -> int:
    """The memo slot a PUT or GET names: decimal text before a newline, or 1 or 4
    bytes little-endian.  Raises ValueError for text that is not a number."""
    return int(arg[:-1]) if name in ("PUT", "GET") else int.from_bytes(arg, "little")


class _ShapeWalk:
    """The simulated unpickler stack of :func:`_check_shape`; ``step`` raises
    ``ValueError`` at the first opcode it refuses."""

    def __init__(self):
        self.stack, self.memo = [], []
        self.entries = 0   # dict entries so far
        self.marks = []    # positions of the MARKs in `stack`, so no search is needed

    def pop(self, count: int) -> list:
        floor = self.marks[-1] + 1 if self.marks else 0
        if count > len(self.stack) - floor:
            raise ValueError("stack underflow")
        items = self.stack[len(self.stack) - count:]
        del self.stack[len(self.stack) - count:]
        return items

    def pop_to_mark(self) -> list:
        if not self.marks:
            raise ValueError("no MARK on the stack")
        at = self.marks.pop()
        items = self.stack[at + 1:]
        del self.stack[at:]
        return items

    @staticmethod
    def nest(container: int, items: list) -> int:
        depth = max([container] + [1 + d for d in items])
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH}")
        return depth

    def count_entries(self, name: str) -> None:
        # Counted before the items are popped: DICT/SETITEMS take
        # everything down to their MARK, SETITEM one key and value.
        stack, marks = self.stack, self.marks
        floor = marks[-1] + 1 if marks and name != "SETITEM" else len(stack) - 2
        self.entries += (len(stack) - floor) // 2
        if self.entries > MAX_DICT_ENTRIES:
            raise ValueError(f"more than {MAX_DICT_ENTRIES} dict entries")

    def step(self, name: str, arg) -> None:
        stack, memo = self.stack, self.memo
        # The commonest opcodes first: a message is mostly scalars, each memoized.
        if name in _SCALAR_OPS:
            stack.append(0)
            return
        if name == "MEMOIZE" and stack and stack[-1] != _MARK:
            memo.append(stack[-1])       # the top stays, and gets the next memo slot
            return
        if name in _DICT_OPS:
            self.count_entries(name)
        if name in _EMPTY_OPS:
            stack.append(1)
        elif name == "MARK":
            self.marks.append(len(stack))
            stack.append(_MARK)
        elif name in _FROM_MARK_OPS:
            stack.append(self.nest(1, self.pop_to_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            stack.append(self.nest(1, self.pop(_POP_COUNT[name])))
        elif name in ("APPEND", "SETITEM"):
            items = self.pop(_POP_COUNT[name])
            stack.append(self.nest(*self.pop(1), items))
        elif name in _FILL_FROM_MARK_OPS:
            items = self.pop_to_mark()
            stack.append(self.nest(*self.pop(1), items))
        elif name == "POP":
            self.pop_to_mark() if self.marks and self.marks[-1] == len(stack) - 1 else self.pop(1)
        elif name == "POP_MARK":
            self.pop_to_mark()
        elif name in _MEMO_PUT_OPS:
            index = len(memo) if name == "MEMOIZE" else arg
            if not 0 <= index <= len(memo):
                raise ValueError(f"memo slot {index} out of order")
            (top,) = self.pop(1)
            stack.append(top)
            memo[index:index + 1] = [top]
        elif name in _MEMO_GET_OPS:
            if not (0 <= arg < len(memo) and memo[arg] == 0):
                raise ValueError("memo reference to a container or an empty slot")
            stack.append(0)
        elif name not in ("PROTO", "FRAME", "STOP"):
            raise ValueError(f"opcode {name} is not allowed")
