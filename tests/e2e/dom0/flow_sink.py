#!/usr/bin/env python3
"""TCP and UDP sink for the e2e flowtable proof, run in the "outside"
namespace: logs every TCP connection and UDP datagram with its source, and
each TCP connection's byte count every second; sends nothing back (only the
kernel's ACKs), so a destroyed guest's flow leaves no retransmission that
could make the netvm track it again."""
import socket
import sys
import threading
import time

addr, port = sys.argv[1], int(sys.argv[2])


def log(msg):
    print(f"{time.monotonic():.1f} {msg}", flush=True)


def conn(c, peer):
    total, last = 0, time.monotonic()
    while True:
        data = c.recv(4096)
        if not data:
            break
        total += len(data)
        if time.monotonic() - last >= 1:
            last = time.monotonic()
            log(f"tcp bytes from {peer[0]}:{peer[1]} {total}")
    log(f"tcp closed from {peer[0]}:{peer[1]} {total}")


def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((addr, port))
    while True:
        _, peer = u.recvfrom(2048)
        log(f"udp from {peer[0]}:{peer[1]}")


threading.Thread(target=udp, daemon=True).start()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(8)
log(f"flow sink on {addr}:{port}")
while True:
    c, peer = s.accept()
    log(f"tcp from {peer[0]}:{peer[1]}")
    threading.Thread(target=conn, args=(c, peer), daemon=True).start()
