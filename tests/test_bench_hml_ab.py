"""tools/bench_hml_ab.py: the HML benchmark at another commit and at this tree, alternating fresh processes. The
benchmark itself is replaced by a fake runner here (its JSON shape is bench_hml --json's); the git worktree of the
other commit is real, and must be gone afterwards."""

from __future__ import annotations

import subprocess

from tool_modules import load_tool

ab = load_tool("bench_hml_ab")


def payload(hml: float, ffn: float) -> dict:
    return {"rows": [{"size": "SmolLM2-135M", "dtype": "bfloat16", "hml_ms": hml, "ffn_ms": ffn, "ratio": round(hml / ffn, 3)}]}


def test_the_sides_alternate_in_fresh_runs_and_the_minima_are_compared(capsys):
    calls, times = [], {"old": iter([24.0, 22.6, 23.1]), "new": iter([21.9, 22.8, 21.7])}

    def fake_run(tree, bench_args):
        side = "new" if tree == ab.REPO else "old"
        assert (tree / "tools" / "bench_hml.py").is_file()  # the other commit's own checkout
        calls.append((side, tree, tuple(bench_args)))
        return payload(next(times[side]), 41.0)

    assert ab.main(["HEAD", "--rounds", "3", "--", "--sizes", "SmolLM2-135M"], run=fake_run) == 0
    assert [c[0] for c in calls] == ["old", "new"] * 3
    assert all(c[2] == ("--sizes", "SmolLM2-135M") for c in calls)
    out = capsys.readouterr().out
    assert "| SmolLM2-135M | bfloat16 | 22.6 -> 21.7 | 0.96x | 41.0 / 41.0 |" in out
    old_tree = calls[0][1]
    worktrees = subprocess.run(["git", "-C", str(ab.REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert str(old_tree) not in worktrees and not old_tree.exists()  # removed, with its temporary folder


def test_a_revision_git_does_not_know_is_one_line_and_exit_2(capsys):
    assert ab.main(["no-such-revision-xyz"], run=lambda *a: payload(1.0, 1.0)) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_hml_ab: cannot check out 'no-such-revision-xyz'") and "Traceback" not in err
