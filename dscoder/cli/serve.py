"""`dscoder serve`: load the model once and serve it until stopped (see dscoder/server/)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dscoder.cli.runtime import Runtime
from dscoder.settings import parse_duration


def serve(rt: Runtime, *, host: str, port: int, socket_path: Path | None, allow_remote: bool,
          stop: bool) -> None:
    from dscoder.server.serve import check_bind, is_loopback, run_server, stop_server

    if stop:
        if not stop_server(rt.term.info):
            rt.term.info("No dscoder server is running on the default socket.")
        return
    key = rt.settings.api_key
    if socket_path is None:
        check_bind(host, allow_remote)  # before the model loads
        if not is_loopback(host) and not key:
            rt.term.warn(f"Anyone who can reach {host}:{port} can use the model; set "
                         "DSCODER_API_KEY to require a key.")
    keep_alive = parse_duration(rt.settings.keep_alive) if rt.settings.keep_alive else None
    rt.settings = replace(rt.settings, server="off")  # a server loads its own model
    engine = rt.engine()
    from dscoder.server.app import ServerState

    state = ServerState(engine, rt.model_name, key)
    tok = engine.tokenizer
    state.worker.warm_up([tok.bos_id] + tok.encode("def warm_up():\n    return"))
    run_server(state, host=host, port=port, socket_path=socket_path, keep_alive=keep_alive,
               say=rt.term.info)
