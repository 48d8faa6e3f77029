"""CLI argument handling that needs no server: bad input ends with exit 2 and a clear line."""

from __future__ import annotations

import os
import stat

import pytest

from runner.cli import _rate, main

EXAMPLE = "jobs/example.yaml"


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("sk-abc\ndef", id="newline"),
        pytest.param("sk-abc def", id="space"),
        pytest.param("sk-abc\x1bdef", id="escape"),
    ],
)
def test_a_malformed_key_is_refused_without_showing_it(monkeypatch, capsys, tmp_path, key):
    """A key with spaces or control characters is exit 2, and the key is not printed."""
    monkeypatch.setenv("APIMART_API_KEY", key)
    code = main(["run", EXAMPLE, "--ledger", str(tmp_path / "l.csv"),
                 "--base-url", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2
    assert "spaces or control characters" in err
    assert "abc" not in err
    assert not (tmp_path / "l.csv").exists()


def test_summary_json_in_a_missing_folder_is_refused_up_front(monkeypatch, capsys, tmp_path):
    """--summary-json into a folder that does not exist fails before anything is sent."""
    monkeypatch.setenv("APIMART_API_KEY", "sk-test")
    code = main(["run", EXAMPLE, "--ledger", str(tmp_path / "l.csv"),
                 "--summary-json", str(tmp_path / "nope" / "s.json")])
    assert code == 2
    assert "the folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "l.csv").exists()


@pytest.mark.parametrize("argv", [
    pytest.param(["mock-server", "--port", "99999"], id="port-too-big"),
    pytest.param(["mock-server", "--port", "-1"], id="port-negative"),
    pytest.param(["run", EXAMPLE, "--rate", "0/s"], id="rate-zero"),
    pytest.param(["run", EXAMPLE, "-j", "0"], id="concurrency-zero"),
    pytest.param(["run", EXAMPLE, "--budget", "abc"], id="budget-text"),
    pytest.param(["status", "l.csv", "--healthcheck-url", "ftp://x"], id="healthcheck-ftp"),
    pytest.param(["status", "l.csv", "--healthcheck-url", "not a url"], id="healthcheck-text"),
    pytest.param(["run", EXAMPLE, "--healthcheck-url", "http://[::1"], id="healthcheck-ipv6"),
    pytest.param(["download", "l.csv", "--healthcheck-url", "http://x:99999/"],
                 id="healthcheck-port"),
    pytest.param(["run", EXAMPLE, "--healthcheck-url", "http://:80/x"], id="healthcheck-host"),
])
def test_bad_flag_values_are_usage_errors(capsys, argv):
    """argparse rejects bad values with exit 2 and names the flag."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert "must be" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "per_second"), [
    pytest.param("2/s", 2.0, id="per-second"), pytest.param("30/min", 0.5, id="per-minute"),
    pytest.param("4", 4.0, id="bare"),
])
def test_rate_forms(text, per_second):
    """--rate accepts N/s, N/min and a bare number per second."""
    assert _rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("url", ["http://[::1", "http://x:99999", "http://:80"])
def test_a_broken_base_url_is_refused_before_any_job_is_recorded(monkeypatch, capsys, tmp_path,
                                                                  url):
    """--base-url that urlsplit refuses is exit 2 up front, not every job recorded rejected."""
    monkeypatch.setenv("APIMART_API_KEY", "sk-test")
    code = main(["run", EXAMPLE, "--ledger", str(tmp_path / "l.csv"), "--base-url", url])
    assert code == 2
    assert "is not an http(s) URL" in capsys.readouterr().err
    assert not (tmp_path / "l.csv").exists()


def test_summary_json_onto_a_fifo_is_refused_and_the_fifo_kept(capsys, tmp_path):
    """--summary-json naming a FIFO (or /dev/null) is exit 2: a rename would replace it."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = main(["run", EXAMPLE, "--mock", "--ledger", str(tmp_path / "l.csv"),
                 "--summary-json", str(fifo)])
    assert code == 2
    assert "not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert not (tmp_path / "l.csv").exists()


@pytest.mark.parametrize("command", [None, "validate", "plan", "schema", "models", "run",
                                     "status", "download", "report", "mock-server"])
def test_every_help_fits_80_columns(monkeypatch, capsys, command):
    """Each --help, exit codes included, is at most 80 columns wide on an 80-column terminal."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main([*([command] if command else []), "--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    assert [line for line in out.splitlines() if len(line) > 80] == []


def test_status_without_a_key_does_not_suggest_mock(monkeypatch, capsys, tmp_path):
    """status of a real ledger with no key: exit 2, and no hint at a --mock it does not take."""
    monkeypatch.delenv("APIMART_API_KEY", raising=False)
    monkeypatch.delenv("APIMART_API_KEY_FILE", raising=False)
    ledger = tmp_path / "l.ledger.csv"
    ledger.write_text("", encoding="utf-8")
    assert main(["status", str(ledger), "--base-url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "no API key" in err and "--mock" not in err


def test_summary_json_naming_the_ledger_is_refused(capsys, tmp_path):
    """--summary-json onto the run's own ledger is exit 2: it would replace the record."""
    ledger = tmp_path / "l.csv"
    code = main(["run", EXAMPLE, "--mock", "--ledger", str(ledger), "--summary-json",
                 str(tmp_path / "." / "l.csv")])
    assert code == 2
    assert "that is a ledger" in capsys.readouterr().err
    assert not ledger.exists()
