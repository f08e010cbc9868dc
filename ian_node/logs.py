"""The one logging setup of every `ian-node` command and of `train_benchmark`: levels, format, no patient data.

Levels, by verbosity (the number of ``-v``):

====  ===========================================  ======================
 -v   our loggers (``ian_node``, ``model``,        every other library
      ``training``)
====  ===========================================  ======================
 0    NOTICE: what an operator follows (start-up   WARNING
      block, one line per job started and ended,
      shutdown) and every warning and error
 1    INFO: per-series and per-job detail          WARNING
 2    DEBUG                                        DEBUG
====  ===========================================  ======================

No patient data in any log: our own messages name UIDs, job ids and paths only (the convention of
shared/DESIGN.md). Libraries are another matter: highdicom warns ``The string "DOE" is unlikely to
represent the intended person name``, pydicom ``Invalid value for VR DA: '1899-07-17'``, and an
exception raised inside a library carries such values into whatever logs it. So Python warnings are
routed into logging (``logging.captureWarnings``), and every handler this module installs carries a
:class:`PatientDataFilter` that, before anything is written,

- redacts the quoted values (``'...'``, ``"..."``, ``b'...'``) and the bracketed values of DICOM
  element dumps (``(0010,0010) PN [DOE^JANE]``) in every message that is not ours (pydicom, highdicom,
  pynetdicom, the ``py.warnings`` logger, ...);
- redacts the same in an exception passed as an argument to one of our messages, unless our own code
  raised it (then its text is ours: a config key, a file name, a UID);
- redacts the same in the exception lines of a logged traceback (frames and source lines are kept).

An exception that nothing catches, in the main thread or another, is logged the same way instead of
being printed to stderr as it is.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TextIO

#: Between INFO and WARNING: the lines an operator follows at the default level.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

#: Loggers (and the modules whose exceptions) we write ourselves; everything else is a library's.
OUR_LOGGERS: tuple[str, ...] = ("ian_node", "model", "training")

REDACTED = "<redacted>"

#: The format of `ian-node`'s console and of log files.
DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# A quoted value: an optional bytes/str prefix and a quote that no letter or digit touches on the
# outside (so "doesn't" and "Patient's Name" are left alone), up to the same quote, on one line.
_QUOTED_RE = re.compile(r"""(?<![\w'"])[bBrRuU]{0,2}(['"])(?:\\.|[^\\\n])*?\1(?![\w'"])""")
# The value of an element dump line: "(0010,0010) PN [DOE^JANE]   # 1 PatientName" (pynetdicom).
_DUMP_VALUE_RE = re.compile(r"(\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)[^\[\n]*)\[[^\]\n]*\]")


def redact(text: str) -> str:
    """``text`` with its quoted values and element-dump values replaced by ``<redacted>``."""
    text = _QUOTED_RE.sub(REDACTED, text)
    return _DUMP_VALUE_RE.sub(rf"\1[{REDACTED}]", text)


def is_ours(logger_or_module: str) -> bool:
    """Whether a logger (or module) name belongs to this project."""
    return any(logger_or_module == p or logger_or_module.startswith(p + ".") for p in OUR_LOGGERS)


def raised_by_us(exc: BaseException) -> bool:
    """Whether our code raised ``exc`` (its innermost frame is ours); an unraised exception is ours."""
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return is_ours(str(tb.tb_frame.f_globals.get("__name__", "")))


def exception_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, redacted unless our own code raised it."""
    text = f"{type(exc).__name__}: {exc}"
    return text if raised_by_us(exc) else redact(text)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _redact_traceback(text: str) -> str:
    """Exception lines redacted; the indented frame and source lines kept."""
    return "\n".join(line if line[:1].isspace() else redact(line) for line in text.split("\n"))


class PatientDataFilter(logging.Filter):
    """Redacts the values that libraries put into log messages, warnings and exceptions (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_ian_node_redacted", False):
            self._redact(record)
            record._ian_node_redacted = True
        return True

    @staticmethod
    def _redact(record: logging.LogRecord) -> None:
        if is_ours(record.name):
            if isinstance(record.args, tuple) and any(isinstance(a, BaseException) for a in record.args):
                record.args = tuple(redact(str(a)) if isinstance(a, BaseException) and not raised_by_us(a) else a
                                    for a in record.args)
        else:
            message = record.getMessage()
            record.msg, record.args = redact(message), ()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if not record.exc_text:
                record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            if not all(raised_by_us(e) for e in _chain(exc)) or not is_ours(record.name):
                record.exc_text = _redact_traceback(record.exc_text)


@dataclass(frozen=True)
class Thresholds:
    """The lowest level that a handler writes, for our loggers and for every other library."""

    ours: int
    others: int

    @classmethod
    def for_verbosity(cls, verbosity: int) -> Thresholds:
        if verbosity <= 0:
            return cls(NOTICE, logging.WARNING)
        if verbosity == 1:
            return cls(logging.INFO, logging.WARNING)
        return cls(logging.DEBUG, logging.DEBUG)

    def passes(self, record: logging.LogRecord) -> bool:
        return record.levelno >= (self.ours if is_ours(record.name) else self.others)


class ThresholdFilter(logging.Filter):
    """A handler's level, one for our loggers and one for the libraries."""

    def __init__(self, thresholds: Thresholds) -> None:
        super().__init__()
        self.thresholds = thresholds

    def filter(self, record: logging.LogRecord) -> bool:
        return self.thresholds.passes(record)


class ProgressBarHandler(logging.StreamHandler):
    """A console handler that writes through tqdm, so that log lines do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # the logging module's convention: report, never raise
            self.handleError(record)


@dataclass
class LoggingSetup:
    """What :func:`setup_logging` installed; ``close`` (or leaving the ``with`` block) takes it back."""

    handlers: list[logging.Handler]
    _root_level: int = field(repr=False, default=logging.WARNING)
    _captured_warnings: bool = field(repr=False, default=False)
    _hooks: tuple[object, object] = field(repr=False, default=(sys.__excepthook__, threading.__excepthook__))

    def close(self) -> None:
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()
        self.handlers = []
        root.setLevel(self._root_level)
        if not self._captured_warnings:
            logging.captureWarnings(False)
        sys.excepthook, threading.excepthook = self._hooks  # type: ignore[assignment]

    def __enter__(self) -> LoggingSetup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _install(handler: logging.Handler, thresholds: Thresholds, fmt: str) -> logging.Handler:
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(ThresholdFilter(thresholds))
    handler.addFilter(PatientDataFilter())
    return handler


def setup_logging(
    verbosity: int = 0,
    *,
    console: TextIO | None = None,
    console_format: str = DEFAULT_FORMAT,
    progress_bars: bool = False,
    log_file: Path | None = None,
    file_verbosity: int | None = None,
    file_format: str = DEFAULT_FORMAT,
) -> LoggingSetup:
    """Log to ``console`` (default: stderr) at ``verbosity``, and to ``log_file`` at ``file_verbosity``
    (default: at least 1, our INFO lines), each through the patient-data filter; Python warnings included.

    ``progress_bars``: write console lines through tqdm (for commands that show progress bars).
    Handlers go on the root logger, and only levels of the root logger change, so that closing the
    returned setup leaves the process as it was (the in-process test suite calls the commands).
    """
    root = logging.getLogger()
    setup = LoggingSetup([], root.level, _warnings_captured(), (sys.excepthook, threading.excepthook))
    levels = [Thresholds.for_verbosity(verbosity)]
    stream = console if console is not None else sys.stderr
    handler_class = ProgressBarHandler if progress_bars else logging.StreamHandler
    setup.handlers.append(_install(handler_class(stream), levels[0], console_format))
    if log_file is not None:
        levels.append(Thresholds.for_verbosity(max(verbosity, 1) if file_verbosity is None else file_verbosity))
        log_file.parent.mkdir(parents=True, exist_ok=True)
        setup.handlers.append(_install(logging.FileHandler(log_file, encoding="utf-8"), levels[1], file_format))
    root.setLevel(min(min(t.ours, t.others) for t in levels))
    for handler in setup.handlers:
        root.addHandler(handler)
    logging.captureWarnings(True)
    sys.excepthook, threading.excepthook = _log_uncaught, _log_uncaught_in_thread
    return setup


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger(__name__).critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit) or args.exc_value is None:  # as threading's own hook
        return
    thread = args.thread.name if args.thread is not None else "?"
    logging.getLogger(__name__).critical("uncaught exception in thread %s", thread,
                                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _warnings_captured() -> bool:
    import warnings

    return warnings.showwarning is getattr(logging, "_showwarning", None)
