"""The `dscoder` Typer app: global options, subcommands, and the one place errors become exit codes.

Settings are merged when a command runs (flag > DSCODER_* > config file > defaults), and each
command imports its module lazily, so `dscoder --help` and shell completion stay fast and never
import torch. Tests replace the model through `dscoder.cli.backend.BACKEND` (see tests/fakes.py).
"""
from __future__ import annotations

import enum
import functools
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, MutableMapping, Optional

import typer

from dscoder import __version__
from dscoder.errors import DscoderError, ExitCode

HELP = """Chat with DeepSeek-Coder-V2, complete code and fill gaps in files, all in-process.

Settings come from flags, then DSCODER_* environment variables (DSCODER_MODEL, DSCODER_TEMPERATURE,
...), then $XDG_CONFIG_HOME/dscoder/config.toml, then defaults. These options also work after chat,
complete and insert (dscoder chat --temperature 0 "hi"), and there they win. Exit codes: 0 success, 1 runtime
error, 2 bad usage or input, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""

app = typer.Typer(name="dscoder", help=HELP, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})

GEN = "Generation options"
SERVER = "Server options"


class Shell(str, enum.Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dscoder {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="MODEL", help="Hub id (in the local cache) or a local model folder. [env DSCODER_MODEL; default deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct]")] = None,
    device: Annotated[Optional[str], typer.Option("--device", metavar="DEVICE", help="Where to run: auto, cuda, cuda:N or cpu. [env DSCODER_DEVICE; default auto]")] = None,
    gpu_memory: Annotated[Optional[str], typer.Option("--gpu-memory", metavar="SIZE", help="GPU memory budget, e.g. 12GiB, or auto (the free memory less a margin); routed experts beyond it stay in host memory. [env DSCODER_GPU_MEMORY]")] = None,
    expert_dtype: Annotated[Optional[str], typer.Option("--expert-dtype", metavar="DTYPE", help="Routed experts in bf16 (the model's dtype) or int8 (one byte a weight, per-channel scales): under --gpu-memory, twice the experts cached and half the bytes per cache miss. [env DSCODER_EXPERT_DTYPE; default bf16]")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="DTYPE", help="Weight dtype: auto, bfloat16, float16 or float32. [env DSCODER_DTYPE]")] = None,
    context_length: Annotated[Optional[int], typer.Option("--context-length", metavar="TOKENS", help="Context window in tokens (bounds the KV cache). [env DSCODER_CONTEXT_LENGTH]")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", help="CPU threads for the model when it runs on the CPU; default: the cores less one, at most 8. [env DSCODER_THREADS]")] = None,
    engine: Annotated[Optional[str], typer.Option("--engine", metavar="ENGINE", help="auto (native for DeepSeek-Coder-V2, transformers for other models), native or transformers. [env DSCODER_ENGINE; default auto]")] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option("--trust-remote-code", help="Let the transformers engine run Python code that ships with the model. [env DSCODER_TRUST_REMOTE_CODE]", show_default=False)] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", "-n", metavar="N", help="Most tokens to generate. [env DSCODER_MAX_TOKENS]", rich_help_panel=GEN)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", metavar="T", help="Sampling temperature; 0 is greedy. [env DSCODER_TEMPERATURE; default: the model's]", rich_help_panel=GEN)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", metavar="P", help="Nucleus sampling mass. [env DSCODER_TOP_P]", rich_help_panel=GEN)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", metavar="K", help="Sample among the K likeliest tokens; 0 is off. [env DSCODER_TOP_K]", rich_help_panel=GEN)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", metavar="SEED", help="Random seed, for repeatable sampling. [env DSCODER_SEED]", rich_help_panel=GEN)] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", metavar="TEXT", help="Stop at this string (repeatable; \\n and \\t are understood). [env DSCODER_STOP]", rich_help_panel=GEN)] = None,
    verbose: Annotated[Optional[bool], typer.Option("--verbose", "-v", help="More statistics: load time, timings, engine counters. [env DSCODER_VERBOSE]", show_default=False)] = None,
    debug: Annotated[Optional[bool], typer.Option("--debug", help="Show tracebacks for errors. [env DSCODER_DEBUG]", show_default=False)] = None,
    no_pretty: Annotated[bool, typer.Option("--no-pretty", help="Plain text even on a terminal (also when NO_COLOR is set or stdout is not a terminal).")] = False,
    server: Annotated[Optional[str], typer.Option("--server", metavar="URL", help="Use the model of this server (http://host:port, unix:PATH, or any OpenAI-compatible server that takes token ids) instead of loading it. [env DSCODER_SERVER; default: your dscoder serve on the default socket, if it runs this model]", rich_help_panel=SERVER)] = None,
    no_server: Annotated[bool, typer.Option("--no-server", help="Always load the model in this process, even when a server runs.", rich_help_panel=SERVER)] = False,
    keep_alive: Annotated[Optional[str], typer.Option("--keep-alive", metavar="DURATION", help="Keep the model loaded this long after the last request (30m, 2h, forever): chat, complete and insert start a background server when none runs; serve exits when idle that long. [env DSCODER_KEEP_ALIVE]", rich_help_panel=SERVER)] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    given = dict(locals())  # before anything else is bound here
    ctx.obj = _flags({name: given[name] for name in GLOBAL_OPTIONS})


# The global options are the parameters of main_options (less ctx and --version): the one place
# they are defined. `global_options` gives the same parameters to a subcommand.
GLOBAL_OPTIONS = tuple(n for n in inspect.signature(main_options).parameters if n not in ("ctx", "version"))


def _flags(values: Mapping[str, Any]) -> dict[str, Any]:
    """Option values as settings flags: None (or an empty --stop list) means not given."""
    flags = {k: v for k, v in values.items() if k not in ("no_pretty", "no_server")}
    flags["pretty"] = False if values.get("no_pretty") else None
    if values.get("no_server"):
        flags["server"] = "off"
    return flags


def merge_flags(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Flags given before the subcommand, overridden by those given after it, one key at a time."""
    given = {k: v for k, v in after.items() if v is not None and not (isinstance(v, (list, tuple)) and not v)}
    return {**before, **given}


def global_options(command: Callable[..., None] | None = None, *,
                   skip: tuple[str, ...] = ()) -> Any:
    """Let a subcommand also take every global option (dscoder chat --temperature 0 "hi"),
    except those in `skip` (a subcommand whose own flag has the same name: serve --stop).

    The wrapper's signature is the command's plus main_options' global parameters (keyword-only,
    so typer adds them after the command's own options); their values, when given, override the
    ones given before the subcommand, and the result becomes this command's ctx.obj, which
    `runtime` reads. The command itself never sees them."""
    if command is None:
        return functools.partial(global_options, skip=skip)
    names = [n for n in GLOBAL_OPTIONS if n not in skip]
    root = inspect.signature(main_options, eval_str=True).parameters
    own = inspect.signature(command, eval_str=True)
    extra = [root[n].replace(kind=inspect.Parameter.KEYWORD_ONLY) for n in names]
    assert "ctx" in own.parameters, f"{command.__name__} needs a ctx: typer.Context parameter"

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        ctx = kwargs["ctx"]  # typer passes every parameter by name
        after = _flags({n: kwargs.pop(n) for n in names})
        ctx.obj = merge_flags(ctx.find_root().obj or {}, after)
        command(*args, **kwargs)

    wrapper.__signature__ = own.replace(parameters=[*own.parameters.values(), *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {}  # the types are in __signature__ (the copied ones are strings)
    return wrapper


def runtime(ctx: typer.Context, **more: Any) -> Any:
    """Settings merged from every layer, the terminal, and the lazily loaded model."""
    from dscoder.cli.runtime import Runtime
    from dscoder.settings import load_settings
    from dscoder.ui.console import make_terminal

    flags = {**(ctx.obj or {}), **more}
    settings = load_settings(flags)
    _STATE["debug"] = settings.debug
    return Runtime(settings, make_terminal(pretty=settings.pretty))


SHOW_PROMPT = typer.Option("--show-prompt", help="Print the exact prompt and its token count, then exit (no weights are loaded).")


@app.command()
@global_options
def chat(
    ctx: typer.Context,
    message: Annotated[Optional[list[str]], typer.Argument(metavar="[MESSAGE]...", help="The instruction (words are joined). Without it and without piped input, an interactive chat starts.", show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", metavar="TEXT", help="System message. [env DSCODER_SYSTEM]")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, token counts, timings, finish reason.")] = False,
    no_history: Annotated[bool, typer.Option("--no-history", help="Do not read or write the input history. [env DSCODER_NOHISTORY]")] = False,
    show_prompt: Annotated[bool, SHOW_PROMPT] = False,
) -> None:
    """Chat: an interactive session on a terminal, or one answer to a message and/or piped input.

    Piped input is context (fenced as code) and the message is the instruction, e.g.
    git diff | dscoder chat "review this". Ctrl-C stops a reply; Ctrl-D leaves."""
    from dscoder.cli import chat as chat_mod

    rt = runtime(ctx, history=False if no_history else None)
    chat_mod.chat(rt, " ".join(message) if message else None, system=system, json_out=json_out,
                  show_prompt=show_prompt)


@app.command()
@global_options
def complete(
    ctx: typer.Context,
    file: Annotated[Optional[str], typer.Argument(help="The code to continue; - or nothing reads stdin.", show_default=False, metavar="[FILE|-]")] = None,
    suffix: Annotated[Optional[str], typer.Option("--suffix", metavar="TEXT", help="Text after the gap: makes this a fill-in-the-middle request.")] = None,
    suffix_file: Annotated[Optional[Path], typer.Option("--suffix-file", metavar="FILE", help="Read the text after the gap from this file.")] = None,
    max_lines: Annotated[Optional[int], typer.Option("--max-lines", min=1, metavar="N", help="Stop after this many lines.")] = None,
    show_prompt: Annotated[bool, SHOW_PROMPT] = False,
) -> None:
    """Continue code (no chat template); only the generated text goes to stdout."""
    from dscoder.cli import complete as complete_mod

    complete_mod.complete(runtime(ctx), file, suffix=suffix, suffix_file=suffix_file,
                          max_lines=max_lines, show_prompt=show_prompt)


@app.command()
@global_options
def insert(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The file to edit.", show_default=False)],
    line: Annotated[int, typer.Option("--line", "-l", metavar="N", help="Fill the gap before this 1-based line (last line + 1 appends).", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff on stderr; write nothing.")] = False,
    print_only: Annotated[bool, typer.Option("--print", help="Print only the inserted text to stdout; write nothing.")] = False,
    backup: Annotated[bool, typer.Option("--backup", help="Keep the original as FILE~.")] = False,
    show_prompt: Annotated[bool, SHOW_PROMPT] = False,
) -> None:
    """Fill the gap before --line N of FILE (fill-in-the-middle) and edit the file in place.

    A coloured diff goes to stderr. The write is atomic and keeps the encoding, BOM, line endings
    and mode; nothing is written if the file changed meanwhile or on Ctrl-C."""
    from dscoder.cli import insert as insert_mod

    insert_mod.insert(runtime(ctx), file, line=line, dry_run=dry_run, print_only=print_only,
                      backup=backup, show_prompt=show_prompt)


@app.command()
@global_options(skip=("stop",))
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on; anything but loopback needs --allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", min=0, max=65535, help="TCP port (0: any free port).")] = 11435,
    socket_path: Annotated[Optional[Path], typer.Option("--socket", metavar="PATH", help="Listen on this Unix socket (mode 0600) instead of TCP.")] = None,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a --host other than loopback.")] = False,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", help="Require Authorization: Bearer KEY on every request. [env DSCODER_API_KEY]")] = None,
    stop_server: Annotated[bool, typer.Option("--stop", help="Stop the server running on the default socket, then exit.")] = False,
) -> None:
    """Keep the model loaded and serve it over HTTP: OpenAI's /v1/chat/completions,
    /v1/completions and /v1/models, llama.cpp's /infill and /health.

    chat, complete and insert on this machine use it instead of loading the model. Ctrl-C or
    SIGTERM stops it (a request in flight gets a few seconds to finish)."""
    from dscoder.cli import serve as serve_mod

    serve_mod.serve(runtime(ctx, api_key=api_key), host=host, port=port, socket_path=socket_path,
                    allow_remote=allow_remote, stop=stop_server)


@app.command()
def pull(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="Hub id; default: --model or the default model.", show_default=False)] = None,
) -> None:
    """Download a model into the Hugging Face cache (progress on stderr)."""
    rt = runtime(ctx)
    name = model or rt.model_name
    # the model's own Python files come only when it may run (--trust-remote-code)
    path = rt.backend.pull(name, code=True) if rt.settings.trust_remote_code else rt.backend.pull(name)
    rt.term.info(f"{name} is ready in {path}")


@app.command()
def completion(
    shell: Annotated[Shell, typer.Argument(metavar="SHELL", help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the shell completion script, e.g. dscoder completion bash > ~/.local/share/bash-completion/completions/dscoder"""
    from dscoder.cli.gen_docs import completion_script

    sys.stdout.write(completion_script(shell.value))


_STATE: dict[str, Any] = {"debug": False}


def _debug_wanted(args: list[str]) -> bool:
    return _STATE["debug"] or "--debug" in args or os.environ.get("DSCODER_DEBUG", "").lower() in ("1", "true", "yes", "on")


def _report(message: str, args: list[str], exc: BaseException | None = None) -> None:
    from dscoder.ui.console import make_terminal

    try:
        term = make_terminal(pretty="--no-pretty" not in args)
        if exc is not None and _debug_wanted(args):
            traceback.print_exception(exc, file=sys.stderr)
        term.error(message)
    except (OSError, ValueError, DscoderError, SystemExit):  # stderr itself is closed or full
        pass


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (ExitCode values). Never lets a traceback through."""
    from dscoder import signals
    from dscoder.cli.streams import guarded

    args = list(sys.argv[1:] if argv is None else argv)
    with signals.handled(), guarded():
        return _run(args)


def _run(args: list[str]) -> int:
    from dscoder import signals
    from dscoder.cli.messages import tidy_arguments, usage_message, wants_help

    _STATE["debug"] = False  # this run's settings decide (an earlier run in this process may not)
    command = tidy_arguments(typer.main.get_command(app))
    try:
        rv = command.main(args=args, prog_name="dscoder", standalone_mode=False)
        if rv == ExitCode.INTERRUPTED:  # typer turns a KeyboardInterrupt into 130, SIGTERM too
            return signals.exit_code()
        return rv if isinstance(rv, int) else ExitCode.OK
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # typer's own click: bad flags, unknown commands
        if wants_help(e):  # `dscoder` alone: the help
            e.show()
            return ExitCode.USAGE
        _report(usage_message(e), args)
        return ExitCode.USAGE
    except typer.Abort as e:
        return signals.exit_code(e)
    except KeyboardInterrupt as e:  # Ctrl-C (130) or SIGTERM (143): nothing more to say
        return signals.exit_code(e)
    except DscoderError as e:
        if signals.received() is not None:  # e.g. stderr closed while click reported Ctrl-C
            return signals.exit_code(e)
        _report(e.message, args, e)
        return e.exit_code
    except BrokenPipeError:  # `dscoder complete | head -1`: the reader is gone, nothing to say
        _silence_stdout()
        return ExitCode.OK
    except SystemExit as e:
        # rich answers a broken pipe with SystemExit(1) (Console.on_broken_pipe): for us a reader
        # that stopped reading is a success, as in git, so `set -o pipefail` scripts keep going.
        if isinstance(e.__context__, BrokenPipeError):
            _silence_stdout()
            return ExitCode.OK
        raise
    except Exception as e:  # noqa: BLE001  (the last line of defence: one sentence, no traceback)
        from dscoder.cli.backend import explain_oom

        if signals.received() is not None:  # the fallout of an interrupt that was swallowed
            return signals.exit_code(e)
        oom = explain_oom(e)
        message = oom.message if oom else (f"Unexpected error: {type(e).__name__}: {e} "
                                           "(run again with --debug to see where; please report it).")
        _report(message, args, e)
        return ExitCode.RUNTIME


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def prefer_huge_pages(env: MutableMapping[str, str] = os.environ) -> None:
    """Ask torch's CPU allocator for transparent huge pages (tensors of 2 MB and more), unless the
    user said otherwise; torch reads THP_MEM_ALLOC_ENABLE once, when it is imported. The expert
    store of an offloaded model (about 20 GB of host memory that CUDA page-locks) then pins and
    unpins in 2 MB pages: at --gpu-memory 12GiB on an H100 host, a warm one-shot command ran in
    9.7-9.9 s instead of 12.4-12.5 s (page-locking 1.0 s instead of 1.4-1.5 s, the process exit
    0.7 s instead of 2.1-2.3 s). A kernel with THP off ignores the request."""
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main() -> None:
    from dscoder.cli.streams import flush_at_exit

    prefer_huge_pages()  # before anything imports torch
    code = run()
    flush_at_exit()
    if "torch" in sys.modules:
        # With a model loaded, Python's own shutdown takes seconds after the answer is complete
        # (torch's compile workers, tens of GB to free, the CUDA context; 4-5 s measured on an
        # H200). Everything is written, renamed and flushed by now: end the process here.
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
