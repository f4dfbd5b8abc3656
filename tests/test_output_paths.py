"""Output paths that cannot be written are one clear error line, never a traceback."""

from __future__ import annotations

from tilemem.cli.main import main


def test_convert_to_a_path_that_is_a_file_is_refused(make_ckpt, tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(["convert", str(make_ckpt("olmoe")), "--out", str(target), "--tile-size", "16"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: tile store path {target} exists and is not a directory; give a directory for the store.\n"
    assert target.read_text() == "x"


def test_an_output_under_a_file_is_one_error_line(make_ckpt, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "profile.json"
    assert main(["profile", str(make_ckpt("olmoe")), "--workload", "mixed", "--tokens", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno") and "check the paths given" in err and len(err.splitlines()) == 1
