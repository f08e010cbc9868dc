"""ian_node.logs: library messages lose their values, ours pass unchanged; levels by verbosity; -v anywhere."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator

import pydicom
import pytest
from highdicom.valuerep import check_person_name
from pydicom import config as pydicom_config
from pydicom.valuerep import validate_value
from pynetdicom.dsutils import pretty_dataset

from ian_node.app.cli import SUBCOMMANDS, build_parser, verbosity
from ian_node.logs import NOTICE, REDACTED, LoggingSetup, exception_text, redact, setup_logging

NAME = "ZQXNAMEPHI"


@pytest.fixture
def logged() -> Iterator[tuple[io.StringIO, LoggingSetup]]:
    """ian-node's logging at -vv into a string, with every warning shown (not once per place)."""
    stream = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with setup_logging(2, console=stream, console_format="%(levelname)s %(name)s: %(message)s") as setup:
            yield stream, setup


def _pydicom_failure() -> ValueError:
    """A ValueError raised inside pydicom, quoting the value it refused."""
    try:
        pydicom.valuerep.DA(f"{NAME}-07")
    except ValueError as exc:
        return exc
    raise AssertionError("pydicom accepted an invalid date")


def test_highdicom_person_name_warning_is_logged_with_the_name_redacted(logged) -> None:
    stream, _ = logged
    check_person_name(NAME)  # highdicom: The string "ZQXNAMEPHI" is unlikely to represent ...
    text = stream.getvalue()
    assert "WARNING py.warnings: " in text and "UserWarning: The string <redacted> is unlikely" in text
    assert NAME not in text


def test_pydicom_invalid_value_warning_and_its_log_record_are_redacted(logged) -> None:
    stream, _ = logged
    validate_value("DA", "1899-07-17", pydicom_config.WARN)  # warns and logs "Invalid value for VR DA: '...'"
    lines = stream.getvalue().splitlines()
    assert "WARNING pydicom: Invalid value for VR DA: <redacted>." in lines
    assert any("py.warnings" in line and "Invalid value for VR DA: <redacted>." in line for line in lines)
    assert "1899-07-17" not in stream.getvalue()


def test_our_own_messages_pass_unchanged_even_when_they_quote(logged) -> None:
    stream, _ = logged
    ours = logging.getLogger("ian_node.export.exporter")
    ours.error("job %d: target %r is no longer configured", 7, "pacs")
    ours.log(NOTICE, "job 7 ended: series %s v1, 2.0 s, exporting", "1.2.3")
    assert stream.getvalue().splitlines() == [
        "ERROR ian_node.export.exporter: job 7: target 'pacs' is no longer configured",
        "NOTICE ian_node.export.exporter: job 7 ended: series 1.2.3 v1, 2.0 s, exporting",
    ]


def test_a_library_exception_in_our_message_is_redacted_ours_is_not(logged) -> None:
    stream, _ = logged
    ours = logging.getLogger("ian_node.app.cli")
    ours.error("predict failed: %s", _pydicom_failure())
    ours.error("serve failed: %s", ValueError("dicom.port: must be a TCP port, got 'x'"))  # ours: never raised
    lines = stream.getvalue().splitlines()
    assert lines == ["ERROR ian_node.app.cli: predict failed: Unable to convert <redacted> to <redacted> object",
                     "ERROR ian_node.app.cli: serve failed: dicom.port: must be a TCP port, got 'x'"]
    assert exception_text(_pydicom_failure()) == "ValueError: Unable to convert <redacted> to <redacted> object"


def test_a_traceback_keeps_its_frames_and_loses_the_values(logged) -> None:
    stream, _ = logged
    exc = _pydicom_failure()
    logging.getLogger("ian_node.polling").error("pass failed", exc_info=(type(exc), exc, exc.__traceback__))
    text = stream.getvalue()
    assert "ERROR ian_node.polling: pass failed\nTraceback (most recent call last):\n  File " in text
    assert "pydicom/valuerep.py" in text and "ValueError: Unable to convert <redacted>" in text
    assert NAME not in text


def test_a_pynetdicom_dataset_dump_loses_its_values(logged) -> None:
    stream, _ = logged
    ds = pydicom.Dataset()
    ds.PatientName = NAME
    for line in pretty_dataset(ds):
        logging.getLogger("pynetdicom.service_class").info(line)
    assert stream.getvalue().startswith(f"INFO pynetdicom.service_class: (0010,0010) PN [{REDACTED}]")
    assert NAME not in stream.getvalue()


def test_an_uncaught_exception_in_a_thread_is_logged_redacted(logged) -> None:
    stream, _ = logged

    def fail() -> None:
        pydicom.valuerep.DA(f"{NAME}-07")

    thread = threading.Thread(target=fail, name="doomed")
    thread.start()
    thread.join()
    text = stream.getvalue()
    assert "CRITICAL ian_node.logs: uncaught exception in thread doomed" in text and NAME not in text


def test_redact_leaves_apostrophes_in_words_and_takes_quoted_values() -> None:
    assert redact("'datetime.time' doesn't allow '60'") == "<redacted> doesn't allow <redacted>"
    assert redact("""names ['A^B', "O'NEIL"] and b'\\x00X'""") == "names [<redacted>, <redacted>] and <redacted>"
    assert redact("(0010,0010) Patient's Name  PN: 'DOE^JANE'") == "(0010,0010) Patient's Name  PN: <redacted>"


@pytest.mark.parametrize(("level", "shown"), [
    (0, ["NOTICE ian_node.jobs.worker: notice", "WARNING ian_node.jobs.worker: warning",
         "WARNING pynetdicom: warning"]),
    (1, ["INFO ian_node.jobs.worker: info", "NOTICE ian_node.jobs.worker: notice",
         "WARNING ian_node.jobs.worker: warning", "WARNING pynetdicom: warning"]),
    (2, ["DEBUG ian_node.jobs.worker: debug", "INFO ian_node.jobs.worker: info", "NOTICE ian_node.jobs.worker: notice",
         "WARNING ian_node.jobs.worker: warning", "DEBUG pynetdicom: debug", "INFO pynetdicom: info",
         "WARNING pynetdicom: warning"]),
])
def test_verbosity_sets_our_level_and_the_libraries_level(level: int, shown: list[str]) -> None:
    stream = io.StringIO()
    with setup_logging(level, console=stream, console_format="%(levelname)s %(name)s: %(message)s"):
        for name in ("ian_node.jobs.worker", "pynetdicom"):
            log = logging.getLogger(name)
            log.debug("debug")
            log.info("info")
            if name.startswith("ian_node"):
                log.log(NOTICE, "notice")
            log.warning("warning")
    assert stream.getvalue().splitlines() == shown


def test_closing_the_setup_restores_handlers_level_warnings_and_hooks() -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level, warnings.showwarning, sys.excepthook, threading.excepthook)
    with setup_logging(2, console=io.StringIO()):
        assert root.level == logging.DEBUG and warnings.showwarning is not before[2]
    assert (list(root.handlers), root.level, warnings.showwarning, sys.excepthook, threading.excepthook) == before


@pytest.mark.parametrize("command", [name for name, _ in SUBCOMMANDS])
def test_every_subcommand_help_shows_the_verbose_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "-v, --verbose" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "expected"), [
    (["serve"], 0), (["-v", "serve"], 1), (["serve", "-v"], 1), (["serve", "-vv"], 2), (["-v", "serve", "-v"], 2),
    (["jobs", "list", "-vv"], 2), (["jobs", "-v", "show", "3"], 1), (["predict", "in", "--out", "x", "-v"], 1),
])
def test_verbose_counts_before_and_after_the_subcommand(argv: list[str], expected: int) -> None:
    assert verbosity(build_parser().parse_args(argv)) == expected


def test_serve_help_in_a_fresh_process_names_the_verbose_option() -> None:
    proc = subprocess.run([sys.executable, "-m", "ian_node.app.cli", "serve", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "-v, --verbose" in proc.stdout
