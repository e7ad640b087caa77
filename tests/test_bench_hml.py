"""tools/bench_hml.py (the driver) and tools/bench_hml_report.py (its report) on a tiny block, with the clock
replaced by known numbers: one row per size and precision, every ratio computed from the same run's times
(minimum over the interleaved repeats, the scaled FFN for sub-batch bf16 rows), the targets judged on those
ratios, and the `## HML` section written with the table, the targets and the run's own machine and command.
No assertion here depends on how fast this machine is."""

from __future__ import annotations

import json
from itertools import cycle

import pytest
import torch
from tool_modules import import_tool, load_tool

bh = load_tool("bench_hml")
bhr = import_tool("bench_hml_report")

TINY = dict(hidden=32, heads=2, head_dim=16, ffn=64, n=8, k=4, d_l=8)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bh.SIZES, "tiny", TINY)
    monkeypatch.setitem(bh.SIZES, "tiny-wide", dict(TINY, ffn=128))
    monkeypatch.setattr(bh, "BATCH", 1)
    monkeypatch.setattr(bh, "SEQ", 8)


def fake_clock(monkeypatch, ms: list[float]):
    """timed() returns these milliseconds in turn; the repeats interleave FFN, HML (, pure-torch HML)."""
    seq = cycle(ms)
    monkeypatch.setattr(bh, "timed", lambda fn: (fn(), next(seq))[1])


def test_a_row_computes_its_ratios_from_the_minimum_of_its_own_repeats(tiny, monkeypatch):
    # per repeat: FFN, HML, pure-torch HML
    fake_clock(monkeypatch, [8.0, 3.0, 6.0, 10.0, 2.0, 7.0, 9.0, 4.0, 5.0])
    row = bh.run_row("tiny", torch.float32, 3, None, log=lambda *a: None, compare_torch=True)
    assert (row["ffn_ms"], row["hml_ms"], row["hml_torch_ms"]) == (8.0, 2.0, 5.0)  # the minima
    assert row["ratio"] == 0.25 and row["ratio_torch"] == 0.625
    assert (row["ffn_ms_median"], row["hml_ms_median"]) == (9.0, 3.0) and row["repeats"] == 3
    assert row["ffn_params"] == 3 * TINY["hidden"] * TINY["ffn"]
    assert row["hml_params"] == bh.hml_parameter_count(TINY["heads"], TINY["head_dim"], TINY["hidden"], bh.HMLConfig(
        n_subkeys=TINY["n"], topk=TINY["k"], latent_dim=TINY["d_l"], init="random"))
    assert (row["n"], row["k"], row["d_l"], row["path"]) == (8, 4, 8, "fused")
    assert "ffn_tokens_timed" not in row and row["ffn_peak_mib"] is not None and row["hml_peak_mib"] >= 0


def test_a_sub_batch_bf16_ffn_is_scaled_to_the_full_batch_and_flagged(tiny, monkeypatch):
    fake_clock(monkeypatch, [1.5, 3.0])  # FFN on 4 of the 8 tokens: 1.5 ms -> 3.0 ms at the full batch
    scaled = bh.run_row("tiny", torch.bfloat16, 1, 4, log=lambda *a: None)
    assert scaled["ffn_tokens_timed"] == 4 and scaled["ffn_ms"] == 3.0 and scaled["ratio"] == 1.0
    assert scaled["ffn_peak_mib"] is None and scaled["dtype"] == "bfloat16" and "hml_torch_ms" not in scaled
    table = bhr.table([scaled])
    assert "| tiny | bfloat16 | 8 | 4 | 8 |" in table and "3.0 (timed on 4 tok, scaled)" in table and "n/a (see note)" in table
    assert "without native bf16" in bhr.bf16_notes([scaled])
    full = dict(scaled)
    del full["ffn_tokens_timed"]
    notes = bhr.bf16_notes([full])
    assert "bf16 units" in notes and "scaled" not in notes


def test_the_driver_gives_one_row_per_size_and_precision(tiny, monkeypatch, capsys):
    fake_clock(monkeypatch, [4.0, 1.0, 2.0])
    assert bh.main(["--json", "--sizes", "tiny,tiny-wide", "--dtypes", "float32,bfloat16", "--repeats", "2"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [(r["size"], r["dtype"]) for r in payload["rows"]] == [
        ("tiny", "float32"), ("tiny", "bfloat16"), ("tiny-wide", "float32"), ("tiny-wide", "bfloat16")]
    for r in payload["rows"]:
        assert r["ratio"] == round(r["hml_ms"] / r["ffn_ms"], 3)  # from the row's own numbers
        if r["dtype"] == "float32":  # the pure-torch path is timed beside the kernels in the fp32 rows
            assert r["ratio_torch"] == round(r["hml_torch_ms"] / r["ffn_ms"], 3)
        else:
            assert "hml_torch_ms" not in r
    assert payload["batch"] == 1 and payload["seq"] == 8
    assert payload["command"] == "python tools/bench_hml.py --json --sizes tiny,tiny-wide --dtypes float32,bfloat16 --repeats 2"
    assert payload["versions"]["torch"] and "CPU cores" in payload["machine"]


def test_targets_judge_each_targeted_size_and_skip_the_others():
    rows = [dict(size="SmolLM2-135M", dtype="float32", ratio=0.34), dict(size="SmolLM2-135M", dtype="bfloat16", ratio=0.66),
            dict(size="Llama-3.2-1B", dtype="bfloat16", ratio=0.25), dict(size="SmolLM2-135M recipe", dtype="float32", ratio=9.0),
            dict(size="Llama-3.2-1B", dtype="float32", ratio=0.2501)]
    text = bhr.targets(rows)
    assert "SmolLM2-135M float32: HML/FFN 0.34x (target <= 0.5: met)" in text
    assert "SmolLM2-135M bfloat16: HML/FFN 0.66x (target <= 0.5: NOT met)" in text
    assert "Llama-3.2-1B bfloat16: HML/FFN 0.25x (target <= 0.25: met)" in text  # the bound itself meets it
    assert "Llama-3.2-1B float32: HML/FFN 0.25x (target <= 0.25: NOT met)" in text  # judged on the ratio, not its rounding
    assert "recipe" not in text
    assert bhr.targets(rows[3:4]) == ""


def test_write_docs_puts_the_run_into_its_section_and_keeps_the_others(tiny, monkeypatch, tmp_path):
    fake_clock(monkeypatch, [4.0, 1.0, 3.0])
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## HML\n\nold\n\n## Other\n\nkept\n")
    monkeypatch.setattr(bhr, "DOCS", docs)
    monkeypatch.setattr(bh, "DOCS", docs)
    monkeypatch.setattr(bh, "JSON", tmp_path / "results" / "bench_hml.json")
    monkeypatch.setitem(bhr.TARGETS, "tiny", 0.3)
    assert bh.main(["--sizes", "tiny", "--dtypes", "float32", "--repeats", "1", "--write-docs"]) == 0
    text = docs.read_text()
    assert "old" not in text and text.endswith("## Other\n\nkept\n") and text.count("## HML\n") == 1
    section = text.split("## HML\n", 1)[1].split("\n## ", 1)[0]
    saved = json.loads((tmp_path / "results" / "bench_hml.json").read_text())
    assert saved["rows"][0]["ratio"] == 0.25
    assert bhr.table(saved["rows"]).strip() in section  # the table of the very rows saved
    assert "| tiny | float32 | 8 | 4 | 8 |" in section and "**0.25x** | 3.0 (0.75x)" in section
    assert "- tiny float32: HML/FFN 0.25x (target <= 0.3: met)" in section
    assert "batch 1 x 8 tokens" in section and "`python tools/bench_hml.py --sizes tiny --dtypes float32 --repeats 1 --write-docs`" in section
    assert f"- Machine: {saved['machine']}" in section and "- Versions: Python " in section
    assert ("no native bf16" in section) != ("native bf16 (" in section)
    assert "- Raw numbers: [bench_hml.json](results/bench_hml.json)" in section


def test_the_report_redraws_the_section_from_a_saved_run(tmp_path, monkeypatch):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## HML\n\nold\n")
    monkeypatch.setattr(bhr, "DOCS", docs)
    row = dict(size="Llama-3.2-1B", dtype="float32", n=256, k=32, d_l=256, hml_params=10**6, ffn_params=5 * 10**7, hml_ms=20.0,
               ffn_ms=100.0, ratio=0.2, hml_peak_mib=1.0, ffn_peak_mib=2.0)
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"rows": [row], "machine": "Another CPU, 64 CPU cores, native bf16 (AVX512-BF16/AMX)",
                                 "versions": {"python": "3.x", "torch": "2.x", "transformers": "5.x"}, "batch": 4, "seq": 256,
                                 "command": "python tools/bench_hml.py --write-docs"}))
    assert bhr.main(["--from-json", str(saved)]) == 0
    text = docs.read_text()
    assert "- Machine: Another CPU, 64 CPU cores" in text and "torch 2.x" in text  # the run's machine, not this one
    assert "- Llama-3.2-1B float32: HML/FFN 0.20x (target <= 0.25: met)" in text and "batch 4 x 256 tokens" in text


def test_the_bytes_floor_counts_the_gathered_rows_and_every_tensor_once():
    s = bh.SIZES["SmolLM2-135M recipe"]
    T, H, k, dl, n, dh = 1024, s["heads"], s["k"], s["d_l"], s["n"], s["head_dim"]
    fp32, bf16 = bh.traffic("SmolLM2-135M recipe", T, torch.float32), bh.traffic("SmolLM2-135M recipe", T, torch.bfloat16)
    # each token reads H x k rows of d_l values forward and backward and adds a float32 row per slot
    assert fp32["gathered"] == T * H * k * dl * (4 + 4 + 4) and bf16["gathered"] == T * H * k * dl * (2 + 2 + 4)
    assert fp32["bank"] == n * n * dl * 4 and bf16["bank"] == fp32["bank"] // 2
    # unique bytes: the token-sized part grows with the tokens, the parameters' part does not
    double = bh.traffic("SmolLM2-135M recipe", 2 * T, torch.float32)
    per_tokens = double["unique"] - fp32["unique"]
    assert per_tokens == 4 * T * H * dh * 4 + 2 * T * H * (k * 8 + dl * 4)
    assert fp32["unique"] - per_tokens > 2 * fp32["bank"]  # the bank read twice, its gradient written once
    assert bh.copy_gb_per_s("cpu", mib=8) > 0


def test_rows_and_the_table_carry_the_bytes_floor(tiny, monkeypatch):
    fake_clock(monkeypatch, [5.0, 2.0])
    row = bh.run_row("tiny", torch.float32, 1, None, lambda m: None, copy_gbps=10.0)
    moved = bh.traffic("tiny", bh.BATCH * bh.SEQ, torch.float32)
    assert row["floor_unique_ms"] == round(moved["unique"] / 10.0 / 1e6, 2)
    assert row["floor_gathered_ms"] == round(moved["gathered"] / 10.0 / 1e6, 2)
    assert f"| {row['floor_unique_ms']} / {row['floor_gathered_ms']} |" in bhr.table([row])


def test_the_physical_picture_in_hml_md_is_what_traffic_computes():
    # docs/hml.md's table of bytes at 16 x 1024 tokens: each row's bank, unique and gathered bytes
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "hml.md").read_text()
    for size, label, dtype in (("SmolLM2-135M recipe", "SmolLM2-135M recipe", torch.bfloat16),
                               ("Llama-3.2-1B", "Llama-3.2-1B", torch.bfloat16)):
        t = bh.traffic(size, 16 * 1024, dtype)
        row = next(line for line in page.splitlines() if line.startswith(f"| {label}") and "| bf16 |" in line and " MB |" in line)
        assert f"{t['bank'] / 1e6:.0f} MB" in row, row
        assert f"{t['gathered'] / 1e9:.1f} GB" in row or f"{t['gathered'] / 1e9:.0f} GB" in row, row
        assert f"{t['gathered'] / 4.8e12 * 1e3:.2f} ms" in row or f"{t['gathered'] / 4.8e12 * 1e3:.1f} ms" in row, row


def test_ops_mode_times_each_matmul_in_both_precisions_and_the_selection_both_ways(tiny, monkeypatch):
    # a clock that only goes up: each (op, way)'s minimum is its time in the first interleaved round
    ticks = iter(range(1, 1000))
    monkeypatch.setattr(bh, "timed", lambda fn: (fn(), float(next(ticks)))[1])
    rows = bh.op_rows("tiny", 8, repeats=3)
    ways = [(r["op"], r["how"]) for r in rows]
    matmuls = ["scoring bmm", "projection z @ P", "projection dz = dm @ P^T", "projection dP = z^T @ dm"]
    expected = [(m, how) for m in matmuls for how in ("float32", "bfloat16", "bfloat16 + casts")]
    from midus_surgery.kernels import cpu_ops

    if cpu_ops() is not None:  # the compiled CPU kernels: the selection both ways
        expected += [("selection", "score_topk2"), ("selection", "bmm + topk2")]
    assert ways == expected
    assert [r["ms"] for r in rows] == [float(i) for i in range(1, len(rows) + 1)]  # the first round's, in order
    assert all(r["size"] == "tiny" and r["tokens"] == 8 for r in rows)
    table = bh.ops_table(rows)
    assert "| tiny | 8 | scoring bmm | bfloat16 + casts | 3.0 |" in table


def test_ops_mode_prints_its_table_and_writes_nothing(tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bh, "DOCS", tmp_path / "benchmarks.md")
    monkeypatch.setattr(bh, "JSON", tmp_path / "bench_hml.json")
    assert bh.main(["--ops", "--sizes", "tiny", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| tiny | 8 | projection dP = z^T @ dm | float32 |" in out
    assert not (tmp_path / "benchmarks.md").exists() and not (tmp_path / "bench_hml.json").exists()


def test_the_bf16_note_says_what_the_machine_line_says_about_bf16_units():
    row = {"size": "tiny", "dtype": "bfloat16"}
    without = bhr.bf16_notes([row], "AMD EPYC, 2 CPU cores, no native bf16, torch threads 2")
    with_units = bhr.bf16_notes([row], "AMD EPYC, 2 CPU cores, native bf16 (AVX512-BF16/AMX), torch threads 2")
    assert "float32 whatever the input" in without and "projection's matmuls in bf16" not in without
    assert "projection's matmuls in bf16" in with_units and "slow bf16 GEMM" not in with_units
    assert "scaled" not in without and "scaled" in bhr.bf16_notes([dict(row, ffn_tokens_timed=16)], "native bf16")


def test_the_peak_is_the_same_whichever_step_is_profiled_and_counts_the_gradients(tiny):
    # the step used to drop the last step's gradients at its start: a profiled step then saw them freed (a lower
    # peak) only when the step before had been profiled too (11.0 or 17.6 MiB for one layer)
    ffn, hml, _ = bh.build("tiny", torch.float32)
    x = torch.randn(1, 64, TINY["heads"], TINY["head_dim"], requires_grad=True)
    step = bh.step_fn(hml, x)
    step()  # warm-up, unprofiled, as the driver runs it
    peaks = [bh.peak_bytes(step) for _ in range(3)]
    assert peaks[0] == peaks[1] == peaks[2], peaks
    grads = sum(p.numel() * p.element_size() for p in hml.parameters()) + x.numel() * x.element_size()
    assert peaks[0] >= grads  # every gradient is live at the end of the backward
    assert all(p.grad is None for p in hml.parameters()) and x.grad is None  # dropped within the step


def test_an_autocast_row_steps_float32_parameters_under_bf16_autocast(tiny, monkeypatch, capsys):
    """`--dtypes autocast`: what `midus-surgery train` runs for precision bf16 (float32 parameters, bf16 autocast):
    the FFN's output comes out of autocast in bf16, the HML's in its bf16 queries' dtype, the parameters and their
    gradients stay float32, and the row and the report's note say which precision it is."""
    seen = []
    real_step_fn = bh.step_fn

    def spying_step_fn(mod, x, autocast=False):
        step = real_step_fn(mod, x, autocast)

        def run():
            handle = mod.register_forward_hook(lambda m, args, out: seen.append((type(m).__name__, out.dtype, x.dtype)))
            try:
                step()
            finally:
                handle.remove()
            assert all(p.dtype == torch.float32 for p in mod.parameters())

        return run

    monkeypatch.setattr(bh, "step_fn", spying_step_fn)
    fake_clock(monkeypatch, [4.0, 1.0])
    assert bh.main(["--json", "--sizes", "tiny", "--dtypes", "autocast", "--repeats", "1"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [(r["size"], r["dtype"]) for r in payload["rows"]] == [("tiny", "bf16 autocast")]
    assert "hml_torch_ms" not in payload["rows"][0]
    assert ("LlamaMLP", torch.bfloat16, torch.float32) in seen  # autocast ran the FFN's GEMMs in bf16 on a float32 input
    assert ("HeadwiseMemory", torch.bfloat16, torch.bfloat16) in seen
    assert "bf16 autocast rows" in bhr.bf16_notes(payload["rows"])
    assert "bf16 autocast rows" not in bhr.bf16_notes([dict(payload["rows"][0], dtype="bfloat16")])


def test_an_unknown_precision_is_one_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        bh.main(["--dtypes", "float32,fp8"])
    assert exited.value.code == 2 and "fp8: use float32, bfloat16 or autocast" in capsys.readouterr().err
