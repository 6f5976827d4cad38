"""Every mistake a user can make raises a `LosiaError`: the CLI prints its one-line message and exits 2
(a traceback only with --debug). The subclasses say where it came from; most are also `ValueError`s,
as they were before, so callers that catch those keep working."""

import errno
import os
import re

_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def cannot_write(e: Exception) -> str | None:
    """One line for a full disk or an unwritable dir (the user's to fix, not a bug in losia), else None.
    safetensors reports these as its own error type, with the OS's message inside."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return f"{e.filename}: {e.strerror}" if e.filename else f"cannot write: {e.strerror}"
    reason = next((os.strerror(code) for code in _WRITE_ERRNOS if os.strerror(code) in str(e)), None)
    return reason and f"cannot write: {reason}"


class LosiaError(Exception):
    """A user-facing error; the message is one line naming the key, file or option at fault."""


class UsageError(LosiaError, ValueError):
    """A mistake on the command line itself."""


class ConfigError(LosiaError, ValueError):
    """A recipe or override that does not validate; the message names the key."""


class DataError(LosiaError, ValueError):
    """A problem with the user's data or data config; the message is one line naming the culprit
    (file:line, column, key or task)."""


class ModelError(LosiaError, ValueError):
    """A model that cannot be resolved or loaded; the message names what and why."""


class MergeError(LosiaError, ValueError):
    """A run that cannot be merged, or a merge that failed verification."""


class RunFileError(LosiaError, ValueError):
    """A file of a run dir that is missing, not a regular file, not UTF-8 or not valid YAML/JSON; the
    message names the file (and the line)."""


class ReportError(LosiaError, ValueError):
    """A path that is not a run dir, or a run file that cannot be read."""


class SlurmError(LosiaError, ValueError):
    """A bad `losia slurm` option, or sbatch missing / refusing the job."""


class BenchError(LosiaError, ValueError):
    """A bad bench request (unknown shape or method, missing package); the message says which."""


class ChatError(LosiaError, ValueError):
    """Bad chat/generate input: the message names the file, line or option."""


class ExportError(LosiaError, ValueError):
    """A model this exporter cannot write, or a file that failed verification."""


class CodeExecutionNotAllowed(LosiaError, PermissionError):
    """Generated code would run without an explicit opt-in, or unsandboxed without the explicit unsafe
    opt-in (eval/sandbox.py)."""

    def __init__(self, what: str = "this evaluation", reason: str | None = None):
        if reason is None:
            super().__init__(f"{what} executes model-generated code; pass allow_code_exec=true to allow it "
                             "(it runs sandboxed: namespaces, time/memory/process limits, no network)")
        else:
            super().__init__(f"{what} executes model-generated code, but the sandbox is unavailable here "
                             f"({reason}); pass allow_code_exec=unsafe to run it with only time and "
                             "memory limits")


class MissingPackageError(LosiaError, ValueError):
    """An optional package a feature needs is not installed (losia_cli/extras.py `require`)."""


def omegaconf_message(e: Exception) -> str:
    """An OmegaConf error (a bad interpolation, an unparsable value) as one line naming its key."""
    text = re.sub(r"^\w+ raised while resolving interpolation: \"?(.*?)\"?$", r"\1", str(e).strip().splitlines()[0])
    return f"{e.full_key}: {text}" if getattr(e, "full_key", None) else text
