"""One progress rule for every bar: redrawn in place on a terminal; in a log file, whole lines
every LOG_EVERY_S seconds (no carriage returns glued onto the log), none for short work."""

from __future__ import annotations

import time

from train_fixtures.tiny import make_model_dir, write_corpus

from midus_surgery.cli import main
from midus_surgery.io import progress


def work(bar, steps: int, pause: float) -> None:
    with bar:
        for _ in range(steps):
            time.sleep(pause)
            bar.update(1)


# capsys's stderr is not a terminal: a log file, as far as the bars can tell


def test_a_log_gets_whole_lines_with_percentage_and_eta(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.05)
    work(progress.progress_bar(6, "copy", unit="file"), steps=6, pause=0.1)
    text = capsys.readouterr().err
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2, text  # a line while the work runs, and the last one
    assert all(line.startswith("copy: ") and " left, " in line for line in lines), text
    assert lines[-1].startswith("copy: 100% (6/6)"), text
    counts = [line.split(" [")[0] for line in lines]
    assert len(set(counts)) == len(counts), text  # close redraws the last frame: logged once


def test_short_work_in_a_log_writes_no_line(capsys):
    work(progress.progress_bar(3, "copy"), steps=3, pause=0)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_redrawn_bar_and_quiet_gets_nothing(capsys, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    work(progress.progress_bar(3, "copy", leave=True), steps=3, pause=0)
    drawn = capsys.readouterr().err
    assert "\r" in drawn and "copy: 100%|" in drawn, drawn
    work(progress.progress_bar(3, "copy", enabled=False), steps=3, pause=0)
    assert capsys.readouterr().err == ""


def test_apply_and_eval_into_a_log_write_no_bar_frames(tmp_path, monkeypatch, capfd):
    """capfd's stderr is a file, not a terminal: what a user piping the commands to a log sees."""
    base = make_model_dir(tmp_path / "base", with_plan=False)
    write_corpus(tmp_path / "corpus", files=1)
    (tmp_path / "r.yaml").write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: memory\n"
                                     "memory:\n  n_subkeys: 4\n  topk: 2\n  latent_dim: 8\noutput:\n  dir: out\n")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line at every update: any frame would show
    capfd.readouterr()  # the fixtures' own saving bars
    assert main(["apply", str(tmp_path / "r.yaml")]) == 0
    assert main(["eval", str(tmp_path / "out"), "--data", str(tmp_path / "corpus"), "--block-size", "16",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err, err
    assert "apply: 100% (" in err and "eval: 100% (" in err, err


def test_apply_quiet_draws_no_progress(tmp_path, monkeypatch, capfd):
    """`apply --quiet` (README's command table): no bar on a terminal and no progress line in a log."""
    base = make_model_dir(tmp_path / "base", with_plan=False)
    (tmp_path / "r.yaml").write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: identity\n"
                                     "output:\n  dir: out\n")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    for terminal in (False, True):
        monkeypatch.setattr(progress, "on_terminal", lambda: terminal)
        capfd.readouterr()
        assert main(["apply", str(tmp_path / "r.yaml"), "--quiet", "--out", str(tmp_path / f"out-{terminal}")]) == 0
        err = capfd.readouterr().err
        assert "apply:" not in err and "\r" not in err, err
        assert (tmp_path / f"out-{terminal}" / "config.json").is_file()
