"""Logging the way Xen's hotplug scripts do it, without the logging module.

* syslog, facility ``daemon``, tag = the command's name: one datagram per
  line to ``/dev/log`` (``VIF_ROUTE_QUBES_SYSLOG`` names another socket;
  tests use that). Debug lines go too; syslog's own configuration filters.
* ``/var/log/xen/xen-hotplug.log`` (``VIF_ROUTE_QUBES_HOTPLUG_LOG``) gets the
  info and error lines, and debug lines when debugging is on, when its
  directory exists, as Xen's scripts append their stderr there.
* stderr gets errors always, everything with ``-v`` or
  ``VIF_ROUTE_QUBES_DEBUG=1``.
"""

import os
import socket
import sys
import time

DAEMON = 3 << 3
LEVELS = {"error": 3, "warning": 4, "info": 6, "debug": 7}


class Log:
    def __init__(self, tag: str, env=None, verbose=False, stderr=None, stderr_only=False):
        env = os.environ if env is None else env
        self.tag = tag
        # dry runs and status leave no trace in syslog or the hotplug log
        self.stderr_only = stderr_only
        self.debugging = verbose or env.get("VIF_ROUTE_QUBES_DEBUG", "") not in ("", "0")
        self.stderr = stderr or sys.stderr
        self.syslog_path = env.get("VIF_ROUTE_QUBES_SYSLOG") or "/dev/log"
        self.file_path = env.get("VIF_ROUTE_QUBES_HOTPLUG_LOG") or "/var/log/xen/xen-hotplug.log"
        self._sock = None
        self._file = None

    def _syslog(self, level: str, msg: str):
        if self._sock is None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.connect(self.syslog_path)
            except OSError:
                self._sock = False  # no syslog daemon: nothing to do
        if self._sock:
            try:
                self._sock.send(f"<{DAEMON | LEVELS[level]}>{self.tag}[{os.getpid()}]: {msg}".encode(errors="replace"))
            except OSError:
                pass

    def _hotplug_log(self, level: str, msg: str):
        if self._file is None:
            try:
                if os.path.isdir(os.path.dirname(self.file_path)):
                    self._file = open(self.file_path, "a")
                else:
                    self._file = False
            except OSError:
                self._file = False
        if self._file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._file.write(f"{stamp} {self.tag}[{os.getpid()}] {level}: {msg}\n")
            self._file.flush()

    def log(self, level: str, msg: str, loud=False):
        if not self.stderr_only:
            self._syslog(level, msg)
            if level != "debug" or self.debugging:
                self._hotplug_log(level, msg)
        if level == "error" or self.debugging or loud:
            print(f"{self.tag}: {msg}" if level == "error" else f"{self.tag}: {level}: {msg}", file=self.stderr)

    def debug(self, msg):
        self.log("debug", msg)

    def info(self, msg):
        self.log("info", msg)

    def warning(self, msg, loud=False):
        """``loud``: on stderr too, for what whoever runs the command must
        see (the tool still succeeds)."""
        self.log("warning", msg, loud)

    def error(self, msg):
        self.log("error", msg)

    def close(self):
        if self._sock:
            self._sock.close()
        if self._file:
            self._file.close()
