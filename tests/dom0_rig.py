"""Shared rig of the qvm-dom0-network-via-netvm tests: a XenStore (the
wire-protocol server) holding dom0, a netvm serving two guests and the
netvm's keys; the recorded ``xl`` stand-in (tests/xl_standin.py) on PATH;
the command run as a real process."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.rigs.faults import command as faulty

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DOMAINS = [
    {"domid": 0, "name": "Domain-0", "state": "r-----"},
    {"domid": 1, "name": "netvm", "state": "-b----"},
    {"domid": 2, "name": "a1", "state": "-b----"},
    {"domid": 3, "name": "a2", "state": "--p---"},  # paused by the administrator
]


class Rig:
    def __init__(self, xenstored, tmp, netvm_ns=None, domains=DOMAINS, keys=True):
        self.xs = xenstored
        self.tmp = Path(tmp)
        self.bin = self.tmp / "bin"
        self.bin.mkdir(exist_ok=True)
        xl = self.bin / "xl"
        xl.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.path.insert(0, {str(HERE)!r})\n"
                      "import xl_standin\nsys.exit(xl_standin.main(sys.argv[1:]))\n")
        xl.chmod(0o755)
        self.state_file = self.tmp / "xl-state.json"
        self.log_file = self.tmp / "xl-log"
        self.log_file.write_text("")
        self.set_state(domains=[dict(d) for d in domains])
        self.resolv = self.tmp / "resolv.conf"
        self.resolv.write_text("nameserver 192.0.2.99\n")
        self.state_dir = self.tmp / "state"
        self.netvm_ns = netvm_ns
        for d in domains:
            xenstored.write(f"/local/domain/{d['domid']}/name", d["name"])
        for front, ip in ((2, "10.137.0.10"), (3, "10.137.0.11")):
            xenstored.write(f"/local/domain/1/backend/vif/{front}/0/ip", ip)
            xenstored.write(f"/local/domain/1/backend/vif/{front}/0/frontend-id", str(front))
        if keys:
            xenstored.write("/local/domain/1/qubes_netvm_gateway", "10.137.0.1")
            xenstored.write("/local/domain/1/qubes_netvm_primary_dns", "10.139.1.1")
            xenstored.write("/local/domain/1/qubes_netvm_secondary_dns", "10.139.1.2")

    def set_state(self, **kw):
        st = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        st.update(kw)
        self.state_file.write_text(json.dumps(st))

    def domains_list(self):
        return json.loads(self.state_file.read_text())["domains"]

    def domains(self):
        return {d["name"]: d["state"] for d in json.loads(self.state_file.read_text())["domains"]}

    def xl_calls(self):
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    def env(self, **extra):
        env = dict(os.environ)
        env.update({
            "PATH": f"{self.bin}:{BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "XENSTORED_PATH": self.xs.socket_path,
            "VIF_ROUTE_QUBES_STATE_DIR": str(self.state_dir),
            "VIF_ROUTE_QUBES_SYSLOG": str(self.tmp / "no-syslog"),
            "VIF_ROUTE_QUBES_HOTPLUG_LOG": str(self.tmp / "hotplug.log"),
            "QVM_DOM0_NETWORK_RESOLV_CONF": str(self.resolv),
            "QVM_DOM0_NETWORK_TIMEOUT": "10",
            "VRQ_XL_STATE": str(self.state_file),
            "VRQ_XL_LOG": str(self.log_file),
        })
        env.pop("VIF_ROUTE_QUBES_DEBUG", None)
        env.pop("VIF_ROUTE_QUBES_FAIL_AT", None)
        if self.netvm_ns:
            env["VRQ_XL_NETVM_NS"] = self.netvm_ns
        env.update(extra)
        return env

    def run(self, prog, *args, ns=None, **extra):
        env = self.env(**extra)
        argv, env = faulty(str(BIN / prog), env)
        argv = [*argv, *args]
        if ns:
            argv = ["ip", "netns", "exec", ns] + argv
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)

    def d0(self, *args, ns=None, **extra):
        return self.run("qvm-dom0-network-via-netvm", *args, ns=ns, **extra)

    def keys(self, *args, **extra):
        return self.run("vif-route-qubes-keys", *args, **extra)
