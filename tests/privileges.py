"""Running a check as an unprivileged user. Root ignores permission bits, so when the suite runs as
root the function runs in a forked child that has dropped to the `nobody` user: the real check,
not a mock. Off Unix-root it runs inline."""
from __future__ import annotations

import os
from typing import Callable


def unprivileged(fn: Callable[[], None]) -> str:
    """Run fn without root privileges; return "" or "ExcName: message" of what it raised."""
    if os.geteuid() != 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported to the caller to assert on
            return f"{type(e).__name__}: {e}"
        return ""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            fn()
            msg = ""
        except BaseException as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out
