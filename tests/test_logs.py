"""`engine.logs`: where log records go for `offramp --log-level` (and OFFRAMP_DEBUG)."""
import logging

import pytest

from engine.cli import main


pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest.py


def test_cli_log_level(capsys):
    assert main(["--log-level", "info", "list-backbones"]) == 0
    assert logging.getLogger().level == logging.INFO
    with pytest.raises(SystemExit):
        main(["--log-level", "loud", "list-backbones"])
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


def test_a_failure_is_one_line_and_offramp_debug_adds_its_traceback(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "missing.offramp")
    assert main(["info", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("offramp info: ") and "missing.offramp" in err
    monkeypatch.setenv("OFFRAMP_DEBUG", "1")
    assert main(["--log-level", "error", "info", missing]) == 2  # OFFRAMP_DEBUG wins: everything is logged
    err = capsys.readouterr().err
    assert "DEBUG offramp: offramp info failed" in err and "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("offramp info: ")
