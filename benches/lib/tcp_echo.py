#!/usr/bin/env python3
"""A TCP echo server for benches/run.sh: the upstream of the TCP new-connection case.

    tcp_echo.py HOST PORT [--close-after N]

One thread, one epoll loop, standard library only. Every byte read is written back to the same
connection; the server closes a connection when the peer closes it (EOF) or, with
--close-after N, as soon as it has echoed N bytes. run.sh uses --close-after (the client sends
N bytes): the server closes first, as an HTTP server does with `Connection: close`, so the
TIME_WAIT state stays on the listening sides (fixed local ports) instead of using up the
ephemeral ports of the client and of each proxy's upstream connections, which at 10k+
connections/s would run out (28k ports, 60 s TIME_WAIT). Accepts in batches (up to 64 per
wakeup) from a listen backlog of 4096. Runs until killed.
"""

import errno
import select
import socket
import sys

READ = select.EPOLLIN | select.EPOLLRDHUP
AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


def main(argv):
    close_after = 0
    if len(argv) == 4 and argv[2] == "--close-after":
        close_after = int(argv[3])
        argv = argv[:2]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    host, port = argv[0], int(argv[1])
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    lfd = lsock.fileno()
    ep = select.epoll()
    ep.register(lfd, select.EPOLLIN)
    conns = {}  # fd -> socket
    echoed = {}  # fd -> bytes echoed so far (with --close-after)
    pending = {}  # fd -> bytes not yet echoed (a write that would have blocked): stop reading

    def close(fd):
        s = conns.pop(fd, None)
        pending.pop(fd, None)
        echoed.pop(fd, None)
        if s is not None:
            try:
                ep.unregister(fd)
            except OSError:
                pass
            s.close()

    def send(fd, s, data):
        try:
            n = s.send(data)
        except OSError as e:
            if e.errno in AGAIN:
                n = 0
            else:
                close(fd)
                return
        if close_after:
            echoed[fd] = echoed.get(fd, 0) + n
        if n < len(data):
            pending[fd] = data[n:]
            ep.modify(fd, select.EPOLLOUT)
            return
        if close_after and echoed[fd] >= close_after:
            close(fd)
            return
        if fd in pending:
            del pending[fd]
            ep.modify(fd, READ)

    while True:
        for fd, ev in ep.poll():
            if fd == lfd:
                for _ in range(64):
                    try:
                        s, _addr = lsock.accept()
                    except OSError:
                        break
                    s.setblocking(False)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[s.fileno()] = s
                    ep.register(s.fileno(), READ)
                continue
            s = conns.get(fd)
            if s is None:
                continue
            if fd in pending:
                if ev & (select.EPOLLERR | select.EPOLLHUP):
                    close(fd)
                else:
                    send(fd, s, pending[fd])
                continue
            try:
                data = s.recv(65536)
            except OSError as e:
                if e.errno not in AGAIN:
                    close(fd)
                continue
            if data:
                # (A FIN that came with the data is reported again by the next poll.)
                send(fd, s, data)
            else:
                close(fd)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(0)
