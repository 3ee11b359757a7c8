"""Socket helpers for the tests' TCP proxies on 127.0.0.1."""
import socket


def shut(*socks: socket.socket) -> None:
    """Shut both directions of each socket (a FIN goes out even while another thread is blocked
    reading it, which close() alone does not do); one already gone is skipped."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
