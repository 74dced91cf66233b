"""The two kinds of failure every command reports the same way."""


class Failure(Exception):
    """An expected failure: bad input, a missing key, a command that failed.

    Its text is one line, meant for stderr and for XenStore's
    ``hotplug-error`` (which libxl copies into xl's own error output), so it
    never carries a traceback.
    """

    def __str__(self) -> str:
        # hotplug-error is one line by contract; keep it so whatever was put in.
        return " ".join(super().__str__().split())


class CommandFailed(Failure):
    """A command run through the system seam exited non-zero."""

    def __init__(self, argv, code, stderr=""):
        self.argv = list(argv)
        self.code = code
        self.stderr = stderr or ""
        detail = self.stderr.strip().splitlines()
        # The last stderr line is where iptables-restore and ip -batch name
        # the failing input line; that is what an operator needs.
        tail = f": {detail[-1]}" if detail else ""
        super().__init__(f"{' '.join(self.argv)} exited {code}{tail}")
