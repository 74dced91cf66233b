"""A namespace's IPv4 routing table as route(8) prints it (the format of
the seed document's tables), read from /proc/net/route."""

import ipaddress
import socket
import struct

HEAD = ["Destination", "Gateway", "Genmask", "Flags", "Metric", "Ref", "Use", "Iface"]


def _addr(hexval):
    return str(ipaddress.IPv4Address(socket.ntohl(struct.unpack(">I", bytes.fromhex(hexval))[0])))


def parse(proc_net_route: str):
    rows = []
    for line in proc_net_route.splitlines()[1:]:
        f = line.split()
        fl = int(f[3], 16)
        flags = "U" * bool(fl & 1) + "G" * bool(fl & 2) + "H" * bool(fl & 4)
        rows.append([_addr(f[1]), _addr(f[2]), _addr(f[7]), flags, f[6], f[4], f[5], f[0]])
    return rows


def table(ns):
    return parse(ns.read("/proc/net/route"))


def format_table(rows):
    return "\n".join("{:<16}{:<16}{:<16}{:<6}{:<7}{:<4}{:<4}{}".format(*r) for r in [HEAD] + rows)
