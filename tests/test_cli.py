"""flexjax.cli: what every job's entry point shares."""

from __future__ import annotations

import os

import pytest

from flexjax import cli


def test_note_if_finished_fresh_workdir_is_silent(tmp_path, capsys):
    assert not cli.note_if_finished(str(tmp_path / "new"))
    assert capsys.readouterr().err == ""


def test_note_if_finished_finished_workdir_says_how_to_start_over(tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    assert cli.note_if_finished(str(tmp_path))
    err = capsys.readouterr().err
    assert "finished run" in err and f"rm -rf {tmp_path}" in err and "--workdir" in err
    assert not cli.note_if_finished(str(tmp_path), marker="ams.json")


def test_limit_cpu_threads_sets_xla_and_tensorflow_thread_counts(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    cli.limit_cpu_threads(1)
    assert os.environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2 ")
    assert "intra_op_parallelism_threads=1" in os.environ["XLA_FLAGS"]
    assert os.environ["TF_NUM_INTRAOP_THREADS"] == "1"


def test_limit_cpu_threads_zero_keeps_defaults_and_negative_is_refused(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cli.limit_cpu_threads(0)
    assert "XLA_FLAGS" not in os.environ
    with pytest.raises(ValueError, match=r"--threads must be in \[0, 1024\]"):
        cli.limit_cpu_threads(-1)
