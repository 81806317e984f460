"""The milter socket's transport: TCP_NODELAY reaches every connection libmilter accepts."""
import os
import socket

from scanmilter import nodelay


def test_is_tcp_follows_libmilter_spelling():
    assert nodelay.is_tcp("inet:8890@127.0.0.1") and nodelay.is_tcp("inet6:8890@[::1]")
    assert not nodelay.is_tcp("unix:/run/scanmilter/scanmilter.sock")
    assert not nodelay.is_tcp("local:/run/x.sock")


def test_nodelay_set_on_the_new_listener_reaches_accepted_connections(tmp_path):
    opened = []
    bystanders = []

    def open_socket(rmsock):            # stands in for libmilter's smfi_opensocket
        assert rmsock is True
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(str(tmp_path / "u.sock"))
        unix.listen(1)
        client = socket.socket()        # a TCP socket that is not listening: left alone
        plain = open(tmp_path / "file", "w")  # not a socket at all
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        opened.append(listener)
        bystanders.extend([unix, client, plain])
        return "result"

    counts = []
    wrapped = nodelay.set_nodelay_on_new_listeners(open_socket, counts.append)
    assert wrapped(True) == "result"
    assert counts == [1]
    listener = opened[0]
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert not bystanders[1].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    peer = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    with peer, accepted:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)   # handed down by the kernel
    for b in bystanders + opened:
        b.close()


def test_no_listener_is_reported_as_zero():
    counts = []
    nodelay.set_nodelay_on_new_listeners(lambda: None, counts.append)()
    assert counts == [0]
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert not nodelay.set_nodelay_if_tcp_listener(fd)
    finally:
        os.close(fd)
