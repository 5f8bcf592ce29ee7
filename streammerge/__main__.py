"""`python -m streammerge ...` and the `streammerge` script (also how torchrun launches it)."""

import os
import sys


def main() -> None:
    """Load the command line, then run it; a Ctrl-C while the modules load ends with one line, as one later does."""
    _standard_streams()
    try:
        from .cli import run
    except KeyboardInterrupt:
        print("streammerge: interrupted while starting; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    run()


def _standard_streams() -> None:
    """A closed stdin, stdout or stderr (`>&-`) is /dev/null instead: Python leaves sys.stdout None (printing the
    summary failed after a finished merge), and the next file opened would take the free descriptor, so that anything
    written to "stdout" (a child process, a library) would land in an output file."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115  (the process's own stream)


if __name__ == "__main__":
    main()
