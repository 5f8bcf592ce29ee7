"""Where a pickle's opcodes and its top-level dict keys start, found by walking the opcodes (no decoding).

The rank matcher compares pickles byte for byte, except for a few tokens that differ by rank and mean
nothing to a merge (the device a rank saved from, a cached hash). A token is only a token where an
opcode starts; the same bytes inside a tensor name or an integer's operand are data. This walk says
which positions are opcode starts, and which opcodes begin each key of the state dict.

Every reader of a pickle from a checkpoint unpickles it through `deep_stack`: CPython hashes a nested tuple by C
recursion with no depth limit, and an unpickler hashes each dict key it sets, so a key nested a few hundred thousand
deep (as many bytes) would overflow a thread's stack and kill the process.
"""

from __future__ import annotations

import functools
import os
import pickletools
import re
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import CheckpointError

T = TypeVar("T")

_GLOBAL_LIKE = (ord("c"), ord("i"))  # GLOBAL, INST: two newline-terminated arguments
_SETITEM, _SETITEMS, _STOP = ord("s"), ord("u"), ord(".")


def _tables() -> tuple[list[int], list[tuple[int, bool, int, bool]]]:
    """Per opcode byte: its argument length (>= 0 fixed, < 0 pickletools' variable kinds, None unknown) and
    its stack effect (items taken below any mark, whether it takes a mark, items pushed, whether it pushes a mark)."""
    length: list = [None] * 256
    effect: list = [(0, False, 0, False)] * 256
    for op in pickletools.opcodes:
        c = ord(op.code)
        length[c] = op.arg.n if op.arg is not None else 0
        before = op.stack_before
        takes_mark = pickletools.markobject in before
        below = before.index(pickletools.markobject) if takes_mark else len(before)
        pushes_mark = pickletools.markobject in op.stack_after
        effect[c] = (below, takes_mark, 0 if pushes_mark else len(op.stack_after), pushes_mark)
    return length, effect


_LENGTH, _EFFECT = _tables()


def scan(data: bytes, checks: Sequence[int] = (), key_limit: int | None = None) -> list[int] | None:
    """Start positions of the top-level dict's keys (those starting before `key_limit`), walking every opcode.

    None when the bytes are not a well-formed pickle of one dict, or when a position in `checks` (sorted)
    is not the start of an opcode.
    """
    length, effect, unpack = _LENGTH, _EFFECT, struct.unpack_from
    limit = len(data) if key_limit is None else key_limit
    frames: list[list[int]] = [[]]  # per open mark: where each stack item's opcodes begin
    marks: list[int] = []
    keys: list[int] = []
    ci, nchecks = 0, len(checks)
    pos, n = 0, len(data)
    while pos < n:
        if pos >= limit and ci == nchecks:
            break  # past the keys wanted, and no position left to check
        while ci < nchecks and checks[ci] < pos:
            return None  # a check position fell inside an opcode
        if ci < nchecks and checks[ci] == pos:
            ci += 1
        c = data[pos]
        k = length[c]
        if k is None:
            return None
        if k >= 0:
            end = pos + 1 + k
        elif k == -2:
            end = pos + 2 + data[pos + 1] if pos + 1 < n else n + 1
        elif k in (-3, -4):
            end = pos + 5 + unpack("<I", data, pos + 1)[0] if pos + 5 <= n else n + 1
        elif k == -5:
            end = pos + 9 + unpack("<Q", data, pos + 1)[0] if pos + 9 <= n else n + 1
        else:  # newline-terminated
            end = data.find(b"\n", pos + 1) + 1
            if end and c in _GLOBAL_LIKE:
                end = data.find(b"\n", end) + 1
            if not end:
                return None
        if end > n:
            return None
        if c == _STOP:
            break
        if pos < limit:  # the stack, as far as keys are wanted
            below, takes_mark, pushes, pushes_mark = effect[c]
            start = pos
            if takes_mark:
                if not marks:
                    return None
                inner = frames.pop()
                start = marks.pop()
                if c == _SETITEMS and len(frames) == 1 and len(frames[0]) == 1:
                    keys.extend(inner[0::2])
            frame = frames[-1]
            if below:
                if len(frame) < below:
                    return None
                start = frame[-below]
                if c == _SETITEM and len(frames) == 1 and len(frame) == 3:
                    keys.append(frame[-2])
                del frame[-below:]
            if pushes_mark:
                marks.append(pos)
                frames.append([])
            elif pushes:
                frame.extend([start] * pushes)
        pos = end
    if ci < nchecks:
        return None
    return [k for k in keys if k < limit]


# The opcodes torch's weights-only unpickler reads (torch.save writes protocol 2); their operands as _LENGTH gives.
_TORCH_OPCODES = frozenset(b"c\x81Rbaesu(t\x85\x86\x87N\x89\x88)]}\x8fJKMGXUQhjqr\x8a\x80.")
_ALL_OPCODES = frozenset(c for c in range(256) if _LENGTH[c] is not None)
_LONG_BINPUT, _PUT = ord("r"), ord("p")
_STRETCH = 1 << 16  # bytes one regex match may cover


@functools.lru_cache(maxsize=16)
def _fixed_run(high: int, opcodes: frozenset[int]) -> re.Pattern[bytes]:
    """A run of fixed-operand opcodes, LONG_BINPUT among them while its index is below (high + 1) * 65536."""
    fixed = sorted(c for c in opcodes if _LENGTH[c] >= 0 and c not in (_LONG_BINPUT, _STOP))
    alts = [b"[" + b"".join(re.escape(bytes([c])) for c in fixed if _LENGTH[c] == k) + b"]" + b"." * k
            for k in sorted({_LENGTH[c] for c in fixed})]
    alts.append(b"r..[\\x00-" + re.escape(bytes([high])) + b"]\\x00")
    return re.compile(b"(?:" + b"|".join(alts) + b")*", re.S)


def beyond_torch(data: bytes) -> str | None:
    """Why torch's weights-only unpickler would not read this pickle as the C unpickler would, or None.

    The C unpickler reads every protocol's opcodes, and grows its memo to twice the largest index a PUT names
    (a few bytes can ask for gigabytes) where torch's keeps a dict. A file with either goes to torch.load,
    which refuses the one and reads the other. A pickle cut short is left to the unpickler to report.
    """
    return _walk(data, _TORCH_OPCODES)


def oversized_memo(data: bytes) -> str | None:
    """Why the C unpickler must not read this pickle of any protocol, or None: a PUT naming a memo index past the
    pickle's length, for which it allocates and clears twice that many slots (13 bytes can ask for 64 GiB). A
    pickle's own PUTs number its objects from 0, so they stay below its length."""
    return _walk(data, _ALL_OPCODES)


def _walk(data: bytes, opcodes: frozenset[int]) -> str | None:
    """The first opcode outside `opcodes`, or memo index past the pickle's length, said in words; None for neither.
    Bytes that start no opcode, and a pickle cut short, are left to the unpickler to report. Runs of fixed-size
    opcodes are skipped by a regular expression: a loop over each opcode costs most of a decode."""
    n, pos, unpack = len(data), 0, struct.unpack_from
    run = _fixed_run(min(255, n >> 16), opcodes).match
    try:
        while pos < n:
            # a * pattern always matches; a bounded stretch at a time, as the regex engine keeps state per repeat
            pos = run(data, pos, pos + _STRETCH).end()  # type: ignore[union-attr]
            c = data[pos]
            if c not in opcodes:  # every opcode allowed: a byte that starts none, which the unpickler reports
                return None if opcodes is _ALL_OPCODES else \
                    f"pickle opcode {bytes([c])!r}, which torch's weights-only unpickler does not read"
            k = _LENGTH[c]
            if c == _STOP:
                return None
            if c == _LONG_BINPUT and unpack("<I", data, pos + 1)[0] > n:
                return f"a memo index of {unpack('<I', data, pos + 1)[0]} in a pickle of {n} bytes"
            if k >= 0:
                pos += 1 + k
            elif k == -2:  # SHORT_BINSTRING, LONG1, SHORT_BINUNICODE, SHORT_BINBYTES
                pos += 2 + data[pos + 1]
            elif k in (-3, -4):  # BINUNICODE, BINBYTES, LONG4, ...
                pos += 5 + unpack("<I", data, pos + 1)[0]
            elif k == -5:  # BINUNICODE8, BINBYTES8, BYTEARRAY8
                pos += 9 + unpack("<Q", data, pos + 1)[0]
            else:  # newline-terminated: one argument, two for GLOBAL and INST
                end = data.index(b"\n", pos + 1)
                if c == _PUT and int(data[pos + 1:end]) > n:
                    return f"a memo index of {int(data[pos + 1:end])} in a pickle of {n} bytes"
                pos = (data.index(b"\n", end + 1) if c in _GLOBAL_LIKE else end) + 1
    except (IndexError, ValueError, struct.error):
        pass
    return None


_TUPLE_OPCODES = (b"t", b"\x85", b"\x86", b"\x87")  # TUPLE, TUPLE1, TUPLE2, TUPLE3: one level of nesting each
_STACK_BASE = 16 << 20  # the unpickler's own frames (torch's is Python) and what they call, besides hashing
_STACK_PER_LEVEL = 128  # C stack one level of tuple hashing takes, with room for other builds of CPython
_STACK_MAX = 8 << 30  # address space only: a stack is reserved whole and touched as deep as it is used
_stack_size_lock = threading.Lock()  # threading.stack_size is process-wide: set for one thread start at a time


def nesting_bound(data: bytes) -> int:
    """How deep the tuples of this pickle can nest, at most: its tuple opcodes' bytes, counted wherever they occur
    (in strings too), so the count is cheap and never too low."""
    return sum(map(data.count, _TUPLE_OPCODES))


def deep_stack(call: Callable[[], T], depth: int) -> T:
    """`call()` on a thread whose stack can hash tuples nested `depth` deep; what it returns, or what it raises.

    A one-line CheckpointError (naming no file: callers add it) when no such thread can start, or when the stack
    it needs is past what is reserved for any pickle. What `call` returns must not be hashed again on another
    thread where it may hold such tuples: readers refuse keys of the wrong type before using them as keys.
    """
    size = _STACK_BASE + _STACK_PER_LEVEL * depth
    if size > _STACK_MAX:
        raise CheckpointError(f"its pickle could nest tuples {depth} deep, more than streammerge unpickles (a crafted "
                              "or damaged file)")
    returned: list[T] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            returned.append(call())
        except BaseException as e:  # handed to the caller's thread as it is
            raised.append(e)

    thread = threading.Thread(target=run, name="streammerge-unpickle", daemon=True)
    try:
        with _stack_size_lock:
            before = threading.stack_size(size)
            try:
                thread.start()
            finally:
                threading.stack_size(before)
    except (RuntimeError, ValueError, MemoryError) as e:
        raise CheckpointError(f"no thread with a {size >> 20} MiB stack can start to unpickle it ({e}), and a pickle "
                              f"whose tuples may nest {depth} deep needs one; raise the address-space limit "
                              "(ulimit -v)") from None
    thread.join()
    if raised:
        raise raised[0]
    return returned[0]


def torch_load(f: Any, **kwargs: Any) -> Any:
    """`torch.load(f, **kwargs)` through `deep_stack`, sized by the data.pkl torch's own zip reader finds in `f` (a
    path or a seekable file, left at its start)."""
    import torch

    try:
        pkl = torch._C.PyTorchFileReader(f if hasattr(f, "read") else str(f)).get_record("data.pkl")
        depth = nesting_bound(pkl)
    except RuntimeError:  # not a zip torch reads: a legacy file, one pickle stream (its tensors' bytes are after it)
        depth = f.seek(0, 2) if hasattr(f, "read") else os.path.getsize(f)
    finally:
        if hasattr(f, "read"):
            f.seek(0)
    return deep_stack(lambda: torch.load(f, **kwargs), depth)
