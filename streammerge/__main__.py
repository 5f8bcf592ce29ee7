"""`python -m streammerge ...` (also how torchrun launches it)."""

import sys

from .cli import main

sys.exit(main())
