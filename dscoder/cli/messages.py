"""Our wording for what the command-line parser rejects, and for the arguments in help and usage.

typer (through pydantic) words a bad value like "Input should be a valid integer, unable to parse
string as an integer" and shows arguments as `[[MESSAGE]...]...`, `{FILE}` or `<list[str]>`.
Here every such message becomes one sentence of ours that names the option, the value and what
to do, and an argument shows up in help exactly as its metavar is written.
"""
from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any

try:  # typer >= 0.24 carries its own click
    from typer._click import exceptions as click_errors
except ImportError:  # older typer uses click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]

PROG = "dscoder"


def _kind(annotation: Any) -> str:
    """What a parameter takes, in words."""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + _or([str(m.value) for m in annotation])
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "a whole number"
    if annotation is float:
        return "a number"
    if annotation is Path:
        return "a path"
    return "a value"


def _or(words: list[str], last: str = "or") -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def _param_name(param: Any) -> str:
    """--temperature for an option (its long name), the metavar for an argument (FILE)."""
    if getattr(param, "param_type_name", "") == "argument":
        return (param.metavar or param.name.upper()).strip("[].")
    return max(param.opts, key=len)


def _command(error: Any) -> str:
    """`dscoder chat` (or `dscoder`) for the command whose line was wrong."""
    ctx = getattr(error, "ctx", None)
    return ctx.command_path if ctx is not None and ctx.command_path else PROG


def _bad_value(error: Any) -> str:
    param = error.param
    name = _param_name(param)
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    cause = error.__cause__
    detail = cause.errors()[0] if hasattr(cause, "errors") and cause.errors() else {}
    value = detail.get("input")
    limits = detail.get("ctx") or {}
    if "ge" in limits:
        return f"{name} must be at least {limits['ge']}, not {value}."
    if "le" in limits:
        return f"{name} must be at most {limits['le']}, not {value}."
    if value is None:
        return f"{name} takes {_kind(annotation)}."
    return f"{name} takes {_kind(annotation)}, not {value!r}."


def wants_help(error: Any) -> bool:
    """`dscoder` with nothing after it: the help, not an error message."""
    return isinstance(error, click_errors.NoArgsIsHelpError)


def usage_message(error: Any) -> str:
    """One sentence for a command line the parser rejected (a click exception from typer)."""
    command = _command(error)
    help_hint = f"`{command} --help` lists them"
    if isinstance(error, click_errors.MissingParameter) and error.param is not None:
        param = error.param
        what = (_param_name(param) if param.param_type_name == "argument"
                else f"{_param_name(param)} {param.metavar or 'VALUE'}")
        return f"{command} needs {what}; see `{command} --help`."
    if isinstance(error, click_errors.BadParameter) and error.param is not None:
        return _bad_value(error)
    if isinstance(error, click_errors.NoSuchOption):
        guess = f" (did you mean {_or(sorted(error.possibilities))}?)" if error.possibilities else ""
        return f"{command} has no option {error.option_name}{guess}; {help_hint}."
    if isinstance(error, click_errors.BadOptionUsage) and error.option_name:
        return f"{error.option_name} needs a value; see `{command} --help`."
    unknown = re.match(r"No such command '(.+)'", error.message or "")
    if unknown:
        group = getattr(error.ctx, "command", None)
        names = list(getattr(group, "commands", {}) or {})
        listed = f"; the commands are {_or(names, 'and')}" if names else ""
        return f"{command} has no command {unknown.group(1)!r}{listed}."
    message = (error.format_message() or "").rstrip(".")
    return f"{message}; see `{command} --help`."


def tidy_arguments(command: Any) -> Any:
    """Show every argument in help and usage exactly as its metavar is written (`[MESSAGE]...`,
    `FILE`), not wrapped again by typer (`[[MESSAGE]...]...`, `{FILE}`) or typed (`<list[str]>`)."""
    for sub in [command, *getattr(command, "commands", {}).values()]:
        for param in sub.params:
            if getattr(param, "param_type_name", "") == "argument" and param.metavar:
                shown = param.metavar
                param._usage_display_name = lambda shown=shown: shown
                param._rich_display_name = lambda shown=shown: shown
                param.display_type_rich = lambda ctx: None
    return command
