"""Runs inside the netvm namespace (``ip netns exec NETVM python _nsdriver.py``)
and times commands there, so the numbers are exec-to-exit of the command
itself, without the ``ip netns exec`` wrapper (libxl runs the hotplug script
directly in the netvm).

Protocol: one JSON request per line on stdin, one JSON reply per line on
stdout.

* ``{"op": "run", "argv": [...], "env": {...}, "n": 1}`` -> ``{"runs": [{"ms",
  "rc", "maxrss_kb", "stderr"}, ...]}`` (n sequential runs)
* ``{"op": "parallel", "jobs": [{"argv", "env"}, ...]}`` -> ``{"total_ms",
  "runs": [...]}``: all started at once, total = first spawn to last exit.

``maxrss_kb`` and ``cpu_ms`` (user + system) come from ``wait4()``'s rusage
of that child (Linux: including its waited-for descendants, i.e. the
iptables-restore and ip it runs; maxrss is the largest of them). CPU time is
what to compare when the machine is busy with other work: it barely changes
with load, wall time does.
``--private RUN LOG`` (the driver started under ``unshare -m``): bind-mount
RUN over /run and LOG over /var/log first, so what the commands under test
keep there (QubesDB's sockets in /run/qubes, Xen's hotplug locks and log)
is this run's own and nothing of the host's is touched.
``--private RUN LOG RESOLV``: also bind-mount the file RESOLV over
/etc/resolv.conf, so the DNAT contenders read the upstreams the benchmark
writes there (rewritten in place between runs) and the host's file is
untouched. Where /etc/resolv.conf is a link, the file it points to is the
one covered (made, empty, in the private /run if it is under it).

Standard library only.
"""

import json
import os
import subprocess
import sys
import tempfile
import time


def _spawn(argv, env):
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    return proc, err


def _reap(proc, err, t0):
    _, status, usage = os.wait4(proc.pid, 0)
    ms = (time.perf_counter() - t0) * 1000
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    err.seek(0)
    text = err.read().decode(errors="replace")
    err.close()
    return {"ms": ms, "rc": proc.returncode, "maxrss_kb": usage.ru_maxrss,
            "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000, "stderr": text[-200000:]}


def run_one(argv, env):
    t0 = time.perf_counter()
    proc, err = _spawn(argv, env)
    return _reap(proc, err, t0)


def parallel(jobs):
    t0 = time.perf_counter()
    started = [(_spawn(j["argv"], j["env"]), time.perf_counter()) for j in jobs]
    pids = {proc.pid: (i, proc, err, ts) for i, ((proc, err), ts) in enumerate(started)}
    runs = [None] * len(jobs)
    while pids:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in pids:
            continue
        i, proc, err, ts = pids.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        runs[i] = {"ms": (time.perf_counter() - ts) * 1000, "rc": proc.returncode,
                   "maxrss_kb": usage.ru_maxrss, "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000,
                   "stderr": err.read().decode(errors="replace")[-2000:]}
        err.close()
    return {"total_ms": (time.perf_counter() - t0) * 1000, "runs": runs}


def private_dirs(run, log, resolv=None):
    for src, dst in ((run, "/run"), (log, "/var/log")):
        subprocess.run(["mount", "--bind", src, dst], check=True)
    for d in ("/run/qubes", "/var/log/qubes", "/var/log/xen"):
        os.makedirs(d, exist_ok=True)
    if resolv:
        # a bind mount follows a link at its target: cover the file itself
        target = os.path.realpath("/etc/resolv.conf")
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        subprocess.run(["mount", "--bind", resolv, target], check=True)


def main():
    if sys.argv[1:2] == ["--private"]:
        private_dirs(*sys.argv[2:5])
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "run":
            reply = {"runs": [run_one(req["argv"], req["env"]) for _ in range(req.get("n", 1))]}
        elif req["op"] == "parallel":
            reply = parallel(req["jobs"])
        else:
            reply = {"error": f"unknown op {req['op']!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
