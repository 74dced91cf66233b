#!/usr/bin/env python3
"""Tiny UDP DNS responder for the e2e dom0: answers every A query with
192.0.2.123 (TTL 60), everything else with an empty NOERROR answer."""
import socket
import struct
import sys

addr = sys.argv[1] if len(sys.argv) > 1 else "0.0.0.0"
answer_ip = socket.inet_aton(sys.argv[2] if len(sys.argv) > 2 else "192.0.2.123")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, 53))
print(f"dns responder on {addr}:53", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    if len(data) < 12:
        continue
    qid, flags, qd = struct.unpack(">HHH", data[:6])
    i = 12
    while i < len(data) and data[i]:
        i += data[i] + 1
    qend = i + 5
    question = data[12:qend]
    qtype = struct.unpack(">H", data[i + 1:i + 3])[0] if qend <= len(data) else 0
    name = []
    j = 12
    while j < i:
        name.append(data[j + 1:j + 1 + data[j]].decode(errors="replace"))
        j += data[j] + 1
    print(f"dns query from {peer[0]} for {'.'.join(name)} type {qtype}", flush=True)
    if qtype == 1:
        rr = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + answer_ip
        hdr = struct.pack(">HHHHHH", qid, 0x8180, 1, 1, 0, 0)
        s.sendto(hdr + question + rr, peer)
    else:
        hdr = struct.pack(">HHHHHH", qid, 0x8180, 1, 0, 0, 0)
        s.sendto(hdr + question, peer)
