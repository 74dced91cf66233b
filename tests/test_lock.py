"""The per-vif lock file is deleted by the run that holds it (offline of a
gone vif), and a run that was waiting on the deleted file does not go on
holding a lock nobody else can see: it takes the file now at the path."""

import fcntl
import os
import subprocess
import sys
import time

from vif_route_qubes.lock import vif_lock

WAITER = """
import os, sys
from vif_route_qubes.lock import vif_lock
lock = vif_lock({"VIF_ROUTE_QUBES_STATE_DIR": sys.argv[1]}, "vif3.0", timeout=10).acquire()
print(os.fstat(lock.fd).st_ino, flush=True)
sys.stdin.readline()
lock.discard()
"""


def test_discard_deletes_the_file_and_a_waiter_moves_to_the_new_one(tmp_path):
    env = {"VIF_ROUTE_QUBES_STATE_DIR": str(tmp_path)}
    path = tmp_path / "vif3.0.lock"
    holder = vif_lock(env, "vif3.0", timeout=5).acquire()
    waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # the waiter is blocked in flock on the first file
        holder.discard()
        line = waiter.stdout.readline()
        assert line.strip(), "the waiter never got the lock"
        assert path.exists() and os.stat(path).st_ino == int(line)
        # the waiter holds the lock at the path: a third run must wait
        fd = os.open(path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
            except BlockingIOError:
                taken = False
        finally:
            os.close(fd)
        assert not taken, "a third run took the lock the waiter holds"
        waiter.stdin.write("\n")
        waiter.stdin.flush()
        assert waiter.wait(10) == 0
        assert not path.exists()
    finally:
        waiter.kill()


def test_discard_of_an_unheld_lock_deletes_nothing(tmp_path):
    env = {"VIF_ROUTE_QUBES_STATE_DIR": str(tmp_path)}
    vif_lock(env, "vif4.0").acquire().release()
    vif_lock(env, "vif4.0").discard()
    assert (tmp_path / "vif4.0.lock").exists()
