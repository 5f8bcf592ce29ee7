"""`python -m streammerge ...` and the `streammerge` script (also how torchrun launches it)."""

import sys


def main() -> None:
    """Load the command line, then run it; a Ctrl-C while the modules load ends with one line, as one later does."""
    try:
        from .cli import run
    except KeyboardInterrupt:
        print("streammerge: interrupted while starting; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":
    main()
