"""Small helpers shared by the benchmark scripts in tools/ (run as scripts: tools/ is on sys.path)."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RESULTS = DOCS / "results"  # every raw output a tool writes (JSON, PNG, logs); docs/results/README.md indexes them
BENCHMARKS = DOCS / "benchmarks.md"  # the page the benchmark sections are written into


def _cpuinfo(field: str) -> str | None:
    """The first value of one /proc/cpuinfo field, or None where there is none."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "?"


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 steps are fast there and
    tens of times slower than fp32 on CPUs without it."""
    return bool(set((_cpuinfo("flags") or "").split()) & {"avx512_bf16", "amx_bf16"})


def bf16_words() -> str:
    """What a machine line says of this CPU's bf16: which of the units it has, by name."""
    flags = set((_cpuinfo("flags") or "").split())
    units = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if flag in flags]
    return f"native bf16 ({', '.join(units)})" if units else "no native bf16"


def command_line(script: str, argv) -> str:
    """The command a benchmark report quotes: this script with the arguments it ran with, quoted for a shell
    (e.g. --models "DUS,FFN-free floor" keeps its space inside one argument)."""
    import shlex
    import sys

    return "python " + shlex.join([script, *(argv if argv is not None else sys.argv[1:])])


def versions(*extra: str) -> dict:
    """Python's version and the installed versions of torch, transformers and ``extra`` packages ("?" if missing)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "?"
    return out


def load_avg() -> str:
    """The 1/5/15-minute load averages, as the benchmark reports print them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def recipe_output(recipe) -> Path:
    """The output directory a recipe names (output.dir, relative to the recipe's folder)."""
    import yaml

    recipe = Path(recipe)
    return (recipe.resolve().parent / yaml.safe_load(recipe.read_text())["output"]["dir"]).resolve()


# Where the hand-written part of a drawn section starts: a paragraph opening "Reading (" (a run's reading), or a
# "### " subsection (an earlier run's table and reading, kept). A report never draws either.
HAND = re.compile(r"^(?:Reading \(|### )", re.M)
EARLIER = "### Earlier run (moved here by the report when a new run replaced it; its reading below is about it)"


def split_hand(section: str) -> tuple[str, str]:
    """(what a report drew, what was written by hand after it) of one section's text."""
    m = HAND.search(section)
    return (section, "") if m is None else (section[:m.start()], section[m.start():])


def _rows(section: str) -> list[str]:
    """A drawn section's table rows (its numbers): the same rows are the same run, whatever the prose around them."""
    rows = [line.rstrip() for line in section.splitlines() if line.startswith("| ")]
    return rows or [section.strip()]


def write_section(path: Path, title: str, body: str, log=None) -> None:
    """Replace (or append) one `## ` section of a markdown file, leaving every other section as it is.

    What was written by hand under the section (``split_hand``) is kept: a redraw of the same run keeps it as it
    is (the same table rows: the same run, whatever changed in the prose around them); a new run moves the earlier
    run's table and what follows it (targets, notes) under an "### Earlier run"
    subsection ahead of the hand-written part, so a reading stays beside the numbers it reads. ``log`` (default:
    stderr) is told when that happens: the new run's reading is for a person to write."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    start = text.find(title + "\n")
    body = body.rstrip("\n")
    if start < 0:
        new = text.rstrip("\n") + "\n\n" + body + "\n"
    else:
        nxt = text.find("\n## ", start + len(title))
        drawn, hand = split_hand(text[start:nxt + 1] if nxt >= 0 else text[start:])
        if hand and _rows(drawn) != _rows(body):
            table_at = drawn.find("\n| ")
            earlier = (drawn[table_at + 1:] if table_at >= 0 else drawn[len(title):]).strip()
            hand = f"{EARLIER}\n\n{earlier}\n\n{hand}"
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"{path.name}: {title[3:]}: a new run; the earlier run's table and its reading are kept under "
                "'### Earlier run': write this run's reading by hand")
        new = (text[:start] + body + "\n" + ("\n" + hand.strip("\n") + "\n" if hand else "")
               + ("\n" + text[nxt + 1:] if nxt >= 0 else ""))
    path.write_text(new)


def save_json(path: Path, payload: dict) -> Path:
    """Write one run's raw numbers (the input of a report's --from-json redraw)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def link(target: Path, page: Path) -> str:
    """``target`` as a markdown link path relative to the folder of ``page``."""
    return Path(os.path.relpath(Path(target).resolve(), Path(page).resolve().parent)).as_posix()


def raw_numbers_line(json_path: Path | None, page: Path, report: str) -> list[str]:
    """The bullet a doc section gives its raw numbers and the command that redraws it (none when there is no file)."""
    if json_path is None:
        return []
    rel = link(json_path, page)
    try:
        shown = Path(json_path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        shown = str(json_path)
    return [f"- Raw numbers: [{Path(json_path).name}]({rel}); `python tools/{report} --from-json {shown}` redraws this section."]


def finish(args, payload: dict, write_docs, summary: str) -> None:
    """The end every benchmark driver shares: the docs on a full run (never with --quick or --no-docs), then
    the JSON (--json) or the human summary on stdout."""
    if not (getattr(args, "quick", False) or getattr(args, "no_docs", False)):
        write_docs(payload)
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print()
        print(summary)


def read_saved_run(source: Path, tool: str) -> dict | None:
    """A saved run's JSON, or None after one line on stderr saying why it cannot be read."""
    try:
        return json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {source}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc} "
              f"(a saved run of tools/{tool}: its --json output, or the file a full run writes under docs/results/)", file=sys.stderr)
        return None


def report_main(argv, doc: str, tool: str, redraw) -> int:
    """The command line of a report module: ``--from-json RESULTS_JSON``, then ``redraw(payload, source)``
    rewrites the run's section (and plot) from the saved run."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--from-json", metavar="RESULTS_JSON", required=True,
                    help=f"the --json output (or the docs/results/ file) of an earlier tools/{tool} run")
    args = ap.parse_args(argv)
    source = Path(args.from_json)
    payload = read_saved_run(source, tool)
    if payload is None:
        return 2
    redraw(payload, source)
    print(f"rewrote the {tool} section of {BENCHMARKS.relative_to(REPO)} from {source}")
    return 0
