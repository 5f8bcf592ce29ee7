"""CRC-32 (zlib's and the zip format's polynomial) at memory speed.

Every output byte of a merge and every rank-file byte verify reads go through a CRC-32, so its speed is a floor
under both. zlib's is a table-driven loop; python-isal's (Intel ISA-L, carry-less multiplication) gives the same
values several times faster and also releases the GIL while it runs, so it is used wherever it imports. Where it
does not, zlib's is used and `FELL_BACK` says why: the merge summary and verify's notes show it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

crc32: Callable[..., int]  # (data, value=0) -> int, as zlib.crc32
FELL_BACK: str | None
try:
    from isal.isal_zlib import crc32
    FELL_BACK = None
except ImportError as e:  # a platform without an isal wheel
    crc32 = zlib.crc32
    FELL_BACK = f"isal does not import ({e}): zlib's, slower"
