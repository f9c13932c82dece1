"""flexjax.cli: what every job's entry point shares."""

from __future__ import annotations

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
