"""Byte sizes as people write them: 12GiB, 24GB, 512MiB, 1.5G, 1000000."""
from __future__ import annotations

import re

from dscoder.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)
_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str) -> int:
    """Bytes from '12GiB' (binary), '24GB' (decimal), '12G' (binary, as nvidia-smi and torch mean it)."""
    m = _SIZE.match(text)
    if m is None:
        raise UsageError(f"Cannot read the size {text!r}; write it like 12GiB, 24GB or 12000MiB.")
    number, unit, binary, b = float(m.group(1)), m.group(2).upper(), m.group(3), m.group(4)
    decimal = bool(unit) and bool(b) and not binary  # only an explicit 'GB' means powers of ten
    base = 1000 if decimal else 1024
    return int(number * base ** _POWER[unit])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
