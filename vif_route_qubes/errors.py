"""The two kinds of failure every command reports the same way, and the
one way a dom0 tool's command turns a Failure into its exit."""

import sys



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


def reported(tag, make_ctx, fn, *args, around=None):
    """Run ``fn(ctx, *args)`` with ``ctx = make_ctx()``; a Failure is one
    error line (through the context's log once there is one, else on
    stderr under ``tag``) and exit status 1, never a traceback. ``around``
    (ctx, fn) -> a context manager or None: what the run holds while ``fn``
    runs (a tool's own lock). The context is closed whatever happens."""
    ctx = None
    try:
        ctx = make_ctx()
        held = around(ctx, fn) if around else None
        if held is None:
            return fn(ctx, *args)
        with held:
            return fn(ctx, *args)
    except Failure as exc:
        if ctx is not None:
            ctx.log.error(str(exc))
        else:
            import click

            click.echo(f"{tag}: {exc}", err=True)
        sys.exit(1)
    finally:
        if ctx is not None:
            ctx.close()
