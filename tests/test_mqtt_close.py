"""A clean close is clean even with traffic in flight: the broker reads the DISCONNECT and drops the
last will (an agent that stops cleanly is not announced `offline` by its will, and a restarted one
is not raced by it).

Found by CI: paho closes the socket right after writing DISCONNECT; bytes the broker sent meanwhile
left unread make the kernel reset the connection, and mosquitto then lost the DISCONNECT and published
the will (9 closes in 500 under traffic; 0 in 1,100 with the fix). `mqtt_client.linger_close`
half-closes and drains first.
"""

from __future__ import annotations

import socket
import threading

import pytest

from fedclip.sdk.mqtt import MqttSession, Will
from fedclip.sdk.mqtt_client import linger_close

pytestmark = pytest.mark.timeout(120)


def _close_with_unread_bytes(linger: bool) -> bytes | Exception:
    """What a peer reads of a client that wrote DISCONNECT and closed with 50 kB it never read."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    conn.sendall(b"m" * 50_000)  # a message for the client, never read
    client.sendall(b"DISCONNECT")
    closed = threading.Event()
    got: list[bytes | Exception] = []

    def broker() -> None:  # reads only once the client is closing, as a busy broker may
        closed.wait(10)
        data = b""
        try:
            while chunk := conn.recv(65536):
                data += chunk
            got.append(data)
        except OSError as e:
            got.append(e)
        conn.close()

    thread = threading.Thread(target=broker)
    thread.start()
    try:
        if linger:
            threading.Timer(0.2, closed.set).start()  # the broker is late: the linger waits for it
            linger_close(client)
        client.close()
        closed.set()
        thread.join(10)
    finally:
        server.close()
    return got[0]


def test_a_plain_close_with_unread_bytes_loses_the_disconnect():
    """The failure the linger prevents, shown on plain sockets (so the next test can fail)."""
    assert isinstance(_close_with_unread_bytes(linger=False), ConnectionResetError)


def test_linger_close_delivers_the_disconnect_and_waits_for_the_peer():
    assert _close_with_unread_bytes(linger=True) == b"DISCONNECT"


def test_linger_close_on_a_dead_socket_returns():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    server.close()
    client.close()
    linger_close(client)  # closed already: returns at once, no exception


def _packet(conn: socket.socket) -> bytes:
    """One MQTT packet (fixed header, remaining length, body) read from `conn`."""
    head = conn.recv(1)
    length, shift = 0, 0
    while True:
        byte = conn.recv(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = b""
    while len(body) < length:
        body += conn.recv(length - len(body))
    return head + body


def test_a_session_close_waits_for_the_broker_and_reads_what_it_sent(monkeypatch):
    """The session's close goes through the linger: after DISCONNECT it still reads what a broker
    sends (here 50 kB after the DISCONNECT, as a slow broker's last messages arrive), so its final
    close is a FIN and the broker never sees a reset. Without the linger the broker's late bytes hit
    a closed socket and the broker reads a reset."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    outcome: list[bytes | Exception] = []

    def broker() -> None:
        conn, _ = server.accept()
        with conn:
            assert _packet(conn)[0] == 0x10  # CONNECT
            conn.sendall(bytes([0x20, 0x02, 0x00, 0x00]))  # CONNACK, accepted
            while _packet(conn)[0] != 0xE0:  # until DISCONNECT
                pass
            try:
                conn.sendall(b"\x00" * 50_000)
                conn.shutdown(socket.SHUT_WR)
                outcome.append(conn.recv(1) + conn.recv(1))  # the client's FIN: b""
            except OSError as e:
                outcome.append(e)

    thread = threading.Thread(target=broker, daemon=True)
    thread.start()
    session = MqttSession(f"mqtt://127.0.0.1:{port}", "closer", will=Will("w/closer", b"offline"))
    session.connect(timeout=15)
    session.close()
    thread.join(15)
    server.close()
    assert outcome == [b""], f"the broker saw {outcome}"
