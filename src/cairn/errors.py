"""User-facing errors.

Anything the user can fix (a missing file, a bad config key, an unknown model) is raised as a
``CairnError`` whose message says what is wrong, where, and how to fix it. The CLI prints the
message and exits with status 2, never a traceback; everything else is a bug and keeps its traceback.
"""


class CairnError(Exception):
    """An error caused by user input; its message is shown as-is by the CLI."""


class TrainingDiverged(CairnError):
    """The training loss became NaN or Inf; the message names the step (raised by the training loop)."""


# Readers that turn a malformed file into a CairnError naming the file (and line, byte or reason)
# instead of a traceback from json/safetensors/codecs. Imports stay inside: this module is imported
# by everything and must stay light.


def read_text_file(path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a non-UTF-8 file is a CairnError naming the file and the byte."""
    from pathlib import Path

    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CairnError(f"{what} {path} is not UTF-8 text (byte {exc.start} is "
                         f"{exc.object[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
    except IsADirectoryError:
        raise CairnError(f"{what} {path} is a directory, not a file") from None
    except FileNotFoundError:
        raise CairnError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CairnError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_json_file(path, what: str = "file"):
    """Parsed JSON of ``path``; invalid JSON names the file, line and column."""
    import json

    text = read_text_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CairnError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def load_safetensors(path) -> dict:
    """``safetensors.torch.load_file`` with a truncated or corrupt file reported as a CairnError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CairnError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); it is "
                         "truncated or corrupt: re-save or re-download it") from None


# OS errors that mean "the disk cannot take this write": the user fixes them (space, permissions),
# so they are reported like bad input, and resuming afterwards is safe because artifacts are atomic.
DISK_ERRNOS = frozenset(getattr(__import__("errno"), n) for n in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS")
                        if hasattr(__import__("errno"), n))


def disk_error_message(exc: OSError, step: str | None = None) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    during = f" while running {step!r}" if step else ""
    import errno

    fix = ("free some disk space" if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))
           else "make the run directory writable")
    return (f"cannot write{where}{during}: {exc.strerror or exc}; {fix}, then rerun the same command to resume "
            "(finished rounds and artifacts are kept)")
