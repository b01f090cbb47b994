"""Exceptions that carry their exit code, so the CLI can map any failure to one sentence."""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    RUNTIME = 1  # the model, the GPU or the machine failed us
    USAGE = 2  # bad flags, bad input files, a prompt that does not fit
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    TERMINATED = 143  # SIGTERM (128 + 15, as shells report it)


class DscoderError(Exception):
    """An error with a message fit for the user (one sentence, what to do next)."""

    exit_code: ExitCode = ExitCode.RUNTIME

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(DscoderError):
    exit_code = ExitCode.USAGE


class ModelNotFound(DscoderError):
    exit_code = ExitCode.USAGE


class BadCheckpoint(DscoderError):
    """A checkpoint that is incomplete, damaged or of an architecture we do not support."""

    exit_code = ExitCode.RUNTIME


class UnsupportedConfig(BadCheckpoint):
    pass


class PromptTooLong(DscoderError):
    exit_code = ExitCode.USAGE


class OutOfMemory(DscoderError):
    exit_code = ExitCode.RUNTIME


class FileChanged(DscoderError):
    """The file changed on disk after we read it; nothing was written."""

    exit_code = ExitCode.RUNTIME


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, from torch or from the engine (torch-free test)."""
    return (isinstance(error, OutOfMemory) or type(error).__name__ == "OutOfMemoryError"
            or "CUDA out of memory" in str(error))
