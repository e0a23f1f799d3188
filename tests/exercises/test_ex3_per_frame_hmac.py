"""Exercise 3: a MAC on every frame.

The handshake proves who connected, but after it a man in the middle could
change a RESULT in flight.  Sign every frame after the handshake with
HMAC-SHA256 under a per-connection key (derive it from the secret and both
nonces) and refuse a frame whose MAC does not match.
"""

import socket

import pytest

import protocol
from conftest import make_sales_csv

pytestmark = pytest.mark.exercise


@pytest.mark.timeout(60)
def test_unsigned_frame_after_handshake_is_refused(procs, tmp_path):
    """A peer that passes the handshake but then sends an unsigned GET_JOB
    gets no JOB: the server drops it."""
    csv = make_sales_csv(tmp_path / "s.csv", 1_000, seed=12)
    server = procs.server(csv, args=["--chunks", "2", "--secret", "s3cret"])
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    protocol.client_handshake(sock, b"s3cret")
    protocol.send_message(sock, protocol.HELLO, worker_id="mallory")
    with pytest.raises((protocol.ProtocolError, EOFError, OSError)):
        reply = protocol.recv_message(sock, protocol.WORKER_MAX_FRAME)
        protocol.send_message(sock, protocol.GET_JOB)
        reply = protocol.recv_message(sock, protocol.WORKER_MAX_FRAME)
        if reply["type"] == protocol.ERROR:
            raise protocol.ProtocolError(reply["reason"])
    sock.close()
