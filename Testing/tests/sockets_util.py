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


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends (or either fails), then shut both."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        shut(src, dst)
