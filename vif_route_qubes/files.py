"""The one way the suite replaces a file another program reads at any
moment (resolv.conf, xl.conf): never half-written, and never a failure
after the network was already changed."""

import errno
import os

from .errors import Failure
from .system import System


def _unescape_mountinfo(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mount_point(path: str) -> bool:
    """Whether ``path`` itself is a mount point (a file bind-mounted over
    resolv.conf by a container runtime or ``ip netns exec``). rename() onto
    it fails with EBUSY, so it can only be written in place."""
    canonical = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    text = System.read("/proc/self/mountinfo", "")
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) > 4 and _unescape_mountinfo(fields[4]) == canonical:
            return True
    return False


class AtomicWrite:
    """A file write prepared before anything else changes, committed after
    (resolv.conf by qubes-setup-ip and qvm-dom0-network-via-netvm, xl.conf
    by qvm-set-default-netvm).

    Normally a temporary file next to the target (same file system, so the
    rename is atomic: a resolver never reads half a file). When the target
    is a mount point, rename() cannot replace it (EBUSY, or EXDEV across
    file systems): the file is then written in place, truncate + write +
    fsync, through a descriptor opened now, so an unwritable file fails the
    run before anything changed. The descriptor is also opened for a plain
    file when possible, as the fallback for a refusal that the mount table
    did not predict.
    """

    def __init__(self, s: System, path: str, text: str, mode=None):
        self.path, self.text, self.mode = path, text, mode
        self.tmp = self.fd = None
        self.mounted = is_mount_point(path)
        s.before_change(["write", path])
        opened = None
        try:
            # O_NOFOLLOW: through a symlink (resolved's stub) we would write
            # into someone else's file; a symlink is replaced instead.
            self.fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            opened = exc
        if self.mounted:
            if self.fd is None:
                raise Failure(f"cannot write {path} (a mount point, written in place): {opened.strerror}")
            return
        try:
            self.tmp = self._temporary()
        except BaseException:
            self.close()
            raise

    def _temporary(self):
        import tempfile

        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", dir=directory)
        except OSError as exc:
            raise Failure(f"cannot write {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.text)
                f.flush()
                os.fsync(f.fileno())
            # the replaced file's permissions, not mkstemp's 0600: every
            # program reading resolv.conf or xl.conf must still read it
            # (or the caller's: NetworkManager reads only 0600 keyfiles)
            mode = self.mode
            if mode is None:
                try:
                    mode = os.stat(self.path).st_mode & 0o7777
                except OSError:
                    mode = 0o644
            os.chmod(tmp, mode)
        except OSError as exc:
            _discard(tmp)
            raise Failure(f"cannot write {self.path}: {exc.strerror}") from None
        return tmp

    def commit(self) -> str:
        """Put the text in place; returns how ("renamed" / "in place")."""
        try:
            if self.tmp is not None:
                try:
                    os.replace(self.tmp, self.path)
                    self.tmp = None
                    return "renamed"
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.EXDEV) or self.fd is None:
                        raise Failure(f"cannot write {self.path}: {exc.strerror}") from None
            self._in_place()
            return "in place"
        finally:
            self.close()

    def _in_place(self):
        data = self.text.encode()
        try:
            os.ftruncate(self.fd, 0)
            done = 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], done)
            os.fsync(self.fd)
        except OSError as exc:
            raise Failure(f"cannot write {self.path} in place: {exc.strerror}") from None

    def close(self):
        if self.tmp is not None:
            _discard(self.tmp)
            self.tmp = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_file(s: System, path: str, text: str) -> str:
    """Prepare and commit in one go (for callers with nothing in between)."""
    return AtomicWrite(s, path, text).commit()


def _discard(tmp):
    try:
        os.unlink(tmp)
    except OSError:
        pass
