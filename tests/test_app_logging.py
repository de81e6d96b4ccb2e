"""Logging in the app: a worker's failure is one sentence in the window and its traceback in the
log; `offramp-app --log-level/--log-file` set where the log goes."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import logging  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from app.__main__ import main, parse_args  # noqa: E402
from engine.logs import setup_logging  # noqa: E402
from qt_helpers import bundle_path, image_folder, no_leaked_threads, window  # noqa: E402,F401

WAIT = 20000  # ms; generous, the machine is shared






def _logged_traceback(caplog, logger: str, text: str) -> str:
    """The traceback `logger` logged with an exception whose text holds `text` ("" if none)."""
    for record in caplog.records:
        if record.name == logger and record.exc_info:
            tb = "".join(traceback.format_exception(*record.exc_info))
            if text in tb:
                return tb
    return ""


def test_a_failing_inference_is_one_line_in_the_window_and_a_traceback_in_the_log(qtbot, window, tmp_path,
                                                                                   caplog):
    still = tmp_path / "still.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(still)

    def broken(image):
        raise RuntimeError("the accelerator fell over")

    window.session._inference.engine.infer = broken  # the worker thread is idle: no frame is open
    with caplog.at_level(logging.INFO), qtbot.waitSignal(window.session.error, timeout=WAIT):
        window.open_source(str(still))
    qtbot.waitUntil(window.banner.isVisible, timeout=WAIT)
    assert window.banner.text == "Inference failed on still.png: the accelerator fell over"
    tb = _logged_traceback(caplog, "app.workers", "RuntimeError: the accelerator fell over")
    assert tb.startswith("Traceback (most recent call last)") and "in broken" in tb
    window.session.close_source()


def test_a_failing_task_is_one_line_in_the_window_and_a_traceback_in_the_log(qtbot, window, caplog):
    def task(progress, cancel):
        return {}["no such key"]

    with caplog.at_level(logging.INFO):
        window.session.start_task(task, "testing the log", error=window.show_error)
        qtbot.waitUntil(window.banner.isVisible, timeout=WAIT)
    assert window.banner.text == "Testing the log failed: 'no such key'"
    tb = _logged_traceback(caplog, "app.workers", "KeyError: 'no such key'")
    assert tb.startswith("Traceback (most recent call last)") and "in task" in tb


def test_log_level_and_log_file(tmp_path, capsys, restore_logging):
    args = parse_args(["--log-level", "info", "--log-file", str(tmp_path / "app.log")])
    assert args.log_level == "INFO" and args.log_file == str(tmp_path / "app.log")
    assert parse_args([]).log_level == "WARNING" and parse_args([]).log_file is None
    with pytest.raises(SystemExit):
        parse_args(["--log-level", "chatty"])
    assert "invalid choice: 'CHATTY'" in capsys.readouterr().err
    setup_logging("INFO", tmp_path / "app.log")
    setup_logging("INFO", tmp_path / "app.log")  # a second call replaces the first: no line twice
    logging.getLogger("app.test").info("one line")
    logging.getLogger("app.test").debug("not at INFO")
    lines = (tmp_path / "app.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("INFO app.test [MainThread]: one line")
    assert capsys.readouterr().err == "INFO app.test: one line\n"
    # a log file that cannot be written: one line, before any window
    still = tmp_path / "still.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(still)
    assert main(["--source", str(still), "--frames", "1", "--log-file", str(tmp_path / "no" / "app.log")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write the log file" in err and "app.log" in err
