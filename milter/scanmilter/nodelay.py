"""TCP_NODELAY on libmilter's listening socket, and what else TCP needs so that Postfix never waits.

Over TCP two 40 ms stalls per message come from Nagle's algorithm meeting delayed
acknowledgements. libmilter writes "add header" and "accept" as separate small packets, so
the second waits for Postfix's delayed ACK of the first: TCP_NODELAY on the listening socket
(Linux hands it down to every accepted connection) removes that one. Postfix in turn writes
packets that want no answer (macros of skipped stages, commands negotiated as "no reply"),
so its next packet waits for our delayed ACK: on TCP every stage is therefore received and
answered, and each answer carries the ACK at once. Unix sockets have neither problem and
keep the cheaper "no reply" exchange.
"""
from __future__ import annotations

import os
import socket

FD_DIR = "/proc/self/fd"


def is_tcp(milter_socket: str) -> bool:
    """True for libmilter's inet:PORT@HOST and inet6:PORT@HOST."""
    return milter_socket.partition(":")[0] in ("inet", "inet6")


def _open_fds() -> dict[int, str]:
    """{descriptor: what it refers to}; listing the directory opens a descriptor of its own, which
    is gone by the time it is read, and its number may be the next socket's."""
    fds = {}
    for name in os.listdir(FD_DIR):
        try:
            fds[int(name)] = os.readlink(f"{FD_DIR}/{name}")
        except OSError:
            pass
    return fds


def set_nodelay_on_new_listeners(open_socket, report=lambda count: None):
    """Wrap `open_socket` (pymilter's milter.opensocket) so that the TCP listening socket it
    creates gets TCP_NODELAY; `report` learns on how many sockets it was set. The listener is
    found as a new file descriptor that is a listening stream socket of an internet family."""
    def wrapper(*args):
        before = _open_fds()
        result = open_socket(*args)
        new = [fd for fd, target in sorted(_open_fds().items()) if before.get(fd) != target]
        report(sum(set_nodelay_if_tcp_listener(fd) for fd in new))
        return result
    return wrapper


def set_nodelay_if_tcp_listener(fd: int) -> bool:
    try:
        copy = os.dup(fd)
    except OSError:
        return False          # closed meanwhile
    try:
        sock = socket.socket(fileno=copy)
    except OSError:
        os.close(copy)        # not a socket
        return False
    with sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return False
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True
