"""A recorded stand-in for ``xl``, for the tests of qvm-dom0-network-via-netvm
only (the real xl needs a hypervisor; tests/e2e runs the real one).

Installed by the tests as ``xl`` on PATH. Every call is appended to
``$VRQ_XL_LOG`` (one JSON argv per line). Domains and their states live in
``$VRQ_XL_STATE`` (JSON). ``network-attach 0`` does what Xen would make
visible to dom0: a veth pair, the frontend end in the caller's namespace
(with the MAC XenStore names), the backend end ``vif0.N`` in the netvm's
namespace (``$VRQ_XL_NETVM_NS``) configured as our hotplug script would
(gateway /32, route to dom0's address), and the frontend/backend XenStore
keys with ``hotplug-status`` first empty (libxl's guard), then ``connected``
(or ``error`` when the state says ``"attach": "error"``).
"""

import json
import os
import subprocess
import sys

from pyxs import Client


def load():
    with open(os.environ["VRQ_XL_STATE"]) as f:
        return json.load(f)


def save(st):
    with open(os.environ["VRQ_XL_STATE"], "w") as f:
        json.dump(st, f)


def ip(*args, ns=None):
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    subprocess.run(argv, check=True)


def main(argv):
    with open(os.environ["VRQ_XL_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    st = load()
    doms = st["domains"]
    cmd = argv[0] if argv else ""
    if cmd == "list":
        print("Name                                        ID   Mem VCPUs\tState\tTime(s)")
        for d in doms:
            print(f"{d['name']:<40} {d['domid']:>5} {1024:>5} {1:>5}     {d['state']} {1.5:>10}")
        return 0
    if cmd in ("pause", "unpause"):
        d = next((d for d in doms if str(d["domid"]) == argv[1] or d["name"] == argv[1]), None)
        if d is None:
            print(f"xl: no domain {argv[1]}", file=sys.stderr)
            return 1
        flags = list(d["state"])
        flags[2] = "p" if cmd == "pause" else "-"
        d["state"] = "".join(flags)
        save(st)
        return 0
    sock = os.environ["XENSTORED_PATH"]
    if cmd == "network-attach":
        words = dict(w.split("=", 1) for w in argv[2:])
        netvm = next(d for d in doms if d["name"] == words["backend"])
        nid = netvm["domid"]
        devid = st.get("next_devid", 0)
        st["next_devid"] = devid + 1
        save(st)
        mac = f"00:16:3e:5e:6c:{devid:02x}"
        front = f"/local/domain/0/device/vif/{devid}"
        back = f"/local/domain/{nid}/backend/vif/0/{devid}"
        with Client(unix_socket_path=sock) as c:
            for k, v in (("backend", back), ("backend-id", str(nid)), ("mac", mac), ("state", "1")):
                c.write(f"{front}/{k}".encode(), v.encode())
            for k, v in (("frontend", front), ("frontend-id", "0"), ("ip", words["ip"]),
                         ("mac", mac), ("script", words.get("script", ""))):
                c.write(f"{back}/{k}".encode(), v.encode())
            # pyxs refuses empty values; Debian's client writes one
            subprocess.run(["xenstore-write", f"{back}/hotplug-status", ""], check=True)
            if st.get("attach") == "error":
                c.write(f"{back}/hotplug-status".encode(), b"error")
                c.write(f"{back}/hotplug-error".encode(), b"stand-in: the script failed")
                return 0
            ns = os.environ.get("VRQ_XL_NETVM_NS")
            fe = f"vrqfe{devid}"
            ip("link", "add", fe, "address", mac, "type", "veth", "peer", "name", f"vif0.{devid}",
               *(["netns", ns] if ns else []))
            gw = st.get("gateway", "10.137.0.1")
            ip("addr", "add", f"{gw}/32", "dev", f"vif0.{devid}", ns=ns)
            ip("link", "set", f"vif0.{devid}", "up", ns=ns)
            ip("route", "add", f"{words['ip']}/32", "dev", f"vif0.{devid}", ns=ns)
            c.write(f"{back}/hotplug-status".encode(), b"connected")
            c.write(f"{front}/state".encode(), b"4")
        return 0
    if cmd == "network-detach":
        devid = argv[2]
        subprocess.run(["ip", "link", "del", f"vrqfe{devid}"], check=False)
        with Client(unix_socket_path=sock) as c:
            back = c.read(f"/local/domain/0/device/vif/{devid}/backend".encode()).decode()
            c.delete(f"/local/domain/0/device/vif/{devid}".encode())
            c.delete(back.encode())
        return 0
    print(f"xl stand-in: unsupported {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
