"""tools/bench_common.write_section: a report redraws its own section and nothing else, and keeps what was
written by hand under it; a new run moves the earlier run's table beside its reading instead of dropping both."""

from __future__ import annotations

from tool_modules import import_tool

bc = import_tool("bench_common")

TITLE = "## Decode on GPU"


def _page(section: str) -> str:
    return f"# Benchmarks\n\n## Before\n\nkept before\n\n{section}\n## After\n\nkept after\n"


def _drawn(speed: str) -> str:
    return f"{TITLE}\n\n- Command: `bench`\n\n| model | speed |\n|---|---|\n| MIDUS | {speed} |\n\nTarget: {speed} NOT met"


READING = "Reading (H200, by hand). MIDUS decodes at 0.90x.\n\n### Earlier session (by hand)\n\n| old | table |\n"


def test_a_redraw_of_the_same_run_keeps_the_hand_written_reading_as_it_is(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(_page(f"{_drawn('0.90x')}\n\n{READING}"))
    said = []
    bc.write_section(page, TITLE, _drawn("0.90x"), log=said.append)
    assert page.read_text() == _page(f"{_drawn('0.90x')}\n\n{READING}") and said == []
    # the same rows under a reworded setup (a report's prose changed since): still the same run, redrawn
    bc.write_section(page, TITLE, _drawn("0.90x").replace("- Command:", "- Raw numbers: x.json\n- Command:"), log=said.append)
    assert "- Raw numbers: x.json" in page.read_text() and READING in page.read_text() and said == []
    assert bc.EARLIER not in page.read_text()


def test_a_new_run_keeps_the_earlier_table_beside_its_reading_and_says_so(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(_page(f"{_drawn('0.90x')}\n\n{READING}"))
    said = []
    bc.write_section(page, TITLE, _drawn("0.83x"), log=said.append)
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\n## Before\n\nkept before\n\n") and text.endswith("\n## After\n\nkept after\n")
    new_at, earlier_at = text.index("| MIDUS | 0.83x |"), text.index(bc.EARLIER)
    old_at, reading_at = text.index("| MIDUS | 0.90x |"), text.index("Reading (H200, by hand)")
    assert new_at < earlier_at < old_at < reading_at < text.index("### Earlier session (by hand)")
    assert "Target: 0.90x NOT met" in text[earlier_at:reading_at]  # the old targets travel with the old table
    assert text.count("- Command: `bench`") == 1  # the setup bullets are the new run's only
    assert len(said) == 1 and "write this run's reading by hand" in said[0]
    # redrawing the new run again changes nothing more
    bc.write_section(page, TITLE, _drawn("0.83x"), log=said.append)
    assert page.read_text() == text and len(said) == 1


def test_a_section_without_hand_text_is_replaced_whole_and_a_missing_one_appended(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(_page(_drawn("0.90x") + "\n"))
    bc.write_section(page, TITLE, _drawn("0.83x"), log=lambda m: None)
    assert page.read_text() == _page(_drawn("0.83x") + "\n")
    bc.write_section(page, "## New", "## New\n\nbody", log=lambda m: None)
    assert page.read_text().endswith("kept after\n\n## New\n\nbody\n")


def test_the_machine_line_names_the_bf16_units_this_cpu_has(monkeypatch):
    """A Zen 4 EPYC has AVX512-BF16 and no AMX: the line said "AVX512-BF16/AMX" on every CPU with either."""
    for flags, said in (("fpu avx2 avx512f avx512_bf16", "native bf16 (AVX512-BF16)"),
                        ("fpu avx512_bf16 amx_bf16 amx_tile", "native bf16 (AVX512-BF16, AMX)"),
                        ("fpu avx2 fma", "no native bf16")):
        monkeypatch.setattr(bc, "_cpuinfo", lambda field, flags=flags: flags if field == "flags" else None)
        assert bc.bf16_words() == said
        assert bc.cpu_native_bf16() == (said != "no native bf16")
