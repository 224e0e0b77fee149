"""How much cairn and the libraries under it print: ``--quiet``, ``--verbose``, ``--no-progress``.

transformers, huggingface_hub, datasets and accelerate each have their own logger, progress bars and
Python warnings; a user who asks for quiet output means all of them. Each library's own switch is
used (environment variables for libraries not imported yet, so ``cairn --help`` stays fast, and their
``logging`` helpers for those already imported); tqdm bars outside those libraries follow
``TQDM_DISABLE`` (tqdm >= 4.66 reads its defaults from ``TQDM_*`` variables).

Levels: ``quiet`` (errors only, no bars, no warnings), ``normal`` (cairn's progress lines, library
warnings), ``verbose`` (library info messages too). cairn's own run log goes through :func:`echo_enabled`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
_state = {"level": NORMAL, "progress": True}
_LIBRARIES = ("transformers", "huggingface_hub", "datasets", "accelerate", "peft", "mlflow", "lm_eval")


def level() -> str:
    return _state["level"]


def echo_enabled() -> bool:
    """Whether cairn's run log echoes its lines to stdout (it is always written to log.txt)."""
    return _state["level"] != QUIET


def progress_enabled() -> bool:
    return bool(_state["progress"])


def configure(level: str = NORMAL, progress: bool = True) -> None:
    """Set the verbosity of cairn and of the libraries it drives; ``quiet`` implies no progress bars."""
    if level not in (QUIET, NORMAL, VERBOSE):
        raise ValueError(f"unknown verbosity {level!r}")
    progress = progress and level != QUIET
    _state.update(level=level, progress=progress)
    py_level = {QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.INFO}[level]
    name = {QUIET: "error", NORMAL: "warning", VERBOSE: "info"}[level]
    os.environ["TRANSFORMERS_VERBOSITY"] = name
    os.environ["DATASETS_VERBOSITY"] = name
    os.environ["HF_HUB_VERBOSITY"] = name
    for lib in _LIBRARIES:
        logging.getLogger(lib).setLevel(py_level)
    logging.getLogger("cairn").setLevel(logging.DEBUG if level == VERBOSE else py_level)
    if level == QUIET:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # worker processes (lm-eval, dataloaders)
    elif level == NORMAL:
        # one line per distinct warning, not one per batch
        warnings.filterwarnings("once", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity(py_level)
    if "datasets" in sys.modules:
        from datasets.utils import logging as dlog

        dlog.set_verbosity(py_level)
    _set_progress(progress)


def _set_progress(progress: bool) -> None:
    if not progress:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        # tqdm converts the variable with bool(str): any non-empty value, "0" included, disables bars,
        # so it is only ever set, never set to "0"; read when tqdm is first imported.
        os.environ["TQDM_DISABLE"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        (tlog.enable_progress_bar if progress else tlog.disable_progress_bar)()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if progress else disable_progress_bars)()
    if "datasets" in sys.modules:
        import datasets

        (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
