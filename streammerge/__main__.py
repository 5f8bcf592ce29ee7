"""`python -m streammerge ...` (also how torchrun launches it)."""

from .cli import run

run()
