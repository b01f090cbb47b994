"""The server process: sockets, the uvicorn loop, keep-alive, and a clean exit on Ctrl-C or SIGTERM.

Besides its TCP port (or the --socket it was given), a server listens on the user's default
socket, so that `dscoder chat|complete|insert` on this machine find it and skip loading the
model; a small JSON file beside the socket names its pid and model (`dscoder serve --stop`).
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dscoder.errors import UsageError
from dscoder.server.paths import default_socket, info_path

GRACE_SECONDS = 5  # on Ctrl-C/SIGTERM: time for a request in flight to finish before it is cancelled


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    """Before the model loads: a non-loopback address only when asked for explicitly."""
    if not is_loopback(host) and not allow_remote:
        raise UsageError(f"--host {host} would expose the model to the network; add --allow-remote "
                         "(and set DSCODER_API_KEY) to do that on purpose.")


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"Cannot listen on {host}:{port} ({e.strerror}); is another server "
                         "running there? Choose another --port.") from None
    sock.listen(128)  # connections queue from now on, while the server starts
    return sock


def socket_alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def bind_unix(path: Path) -> socket.socket:
    """A Unix socket only its owner can use (mode 0600, in a 0700 folder when we create it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        if socket_alive(path):
            raise UsageError(f"A server is already listening on {path}; stop it with "
                             "dscoder serve --stop, or choose another --socket.")
        path.unlink()  # left behind by a server that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600: no window where others can connect
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise UsageError(f"Cannot create the socket {path} ({e.strerror}).") from None
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def _uvicorn_server(app: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after its graceful shutdown, which would kill us with
            # SIGINT/SIGTERM; a server stopped on purpose exits 0 instead.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                            timeout_graceful_shutdown=GRACE_SECONDS)
    return Server(config)


def _watch_idle(server: Any, idle_seconds: Callable[[], float], keep_alive: float,
                on_idle: Callable[[], None]) -> None:
    def watch() -> None:
        while not server.should_exit:
            if idle_seconds() >= keep_alive:
                on_idle()
                server.should_exit = True
                return
            time.sleep(min(1.0, max(keep_alive / 10, 0.05)))

    threading.Thread(target=watch, name="dscoder-keep-alive", daemon=True).start()


def run_server(state: Any, *, host: str, port: int, socket_path: Path | None,
               keep_alive: float | None, say: Callable[[str], None]) -> None:
    """Serve until Ctrl-C, SIGTERM or keep_alive seconds without a request."""
    from dscoder.server.app import create_app

    sockets: list[socket.socket] = []
    unix_paths: list[Path] = []
    default = default_socket()
    if socket_path is None:
        sockets.append(bind_tcp(host, port))
        bound = sockets[0].getsockname()
        say(f"dscoder serve: {state.model_name} at http://{_url_host(host)}:{bound[1]}")
    for path in dict.fromkeys([socket_path or default, default]):
        if path == default and path != socket_path and default.exists() and socket_alive(default):
            continue  # another server owns the default socket; ours is reachable by URL
        sockets.append(bind_unix(path))
        unix_paths.append(path)
        say(f"dscoder serve: {state.model_name} at unix:{path}")
    if default in unix_paths:
        _write_info(state.model_name)
    server = _uvicorn_server(create_app(state))
    state.last_activity = time.monotonic()  # idle from now, not from when loading began
    if keep_alive is not None:
        _watch_idle(server, lambda: state.idle_seconds, keep_alive,
                    lambda: say(f"dscoder serve: no request for {keep_alive:g} s; stopping."))
    try:
        server.run(sockets=sockets)
    finally:
        state.worker.close()
        for path in unix_paths:
            with contextlib.suppress(OSError):
                path.unlink()
        if default in unix_paths:
            with contextlib.suppress(OSError):
                info_path().unlink()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _write_info(model: str) -> None:
    path = info_path()
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "model": model}), encoding="utf-8")
    os.replace(tmp, path)


def stop_server(say: Callable[[str], None], timeout: float = 30.0) -> bool:
    """Stop the server on the default socket (SIGTERM, then wait); False when none runs."""
    try:
        info = json.loads(info_path().read_text(encoding="utf-8"))
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        with contextlib.suppress(OSError):
            info_path().unlink()
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            say(f"Stopped the dscoder server (pid {pid}, {info.get('model')}).")
            return True
        time.sleep(0.1)
    raise UsageError(f"The dscoder server (pid {pid}) did not stop within {timeout:g} s; "
                     f"kill it with: kill -9 {pid}")
