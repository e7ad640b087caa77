#!/usr/bin/env python
"""Benchmark `midus-surgery apply` against mergekit's passthrough merge on the same layer map.

Both tools build the same SOLAR-style depth up-scaling (two overlapping slices of the base's
layers, concatenated), alternating runs (ABAB), on:

- SmolLM2-135M (``work/smollm2-135m``, fp32; made by ``tools/fetch_smollm2.py``):
  slices [0, 20] + [10, 30] -> 40 layers;
- a synthetic Llama-3.2-3B-shaped base (3.2B parameters, bf16, random values), written once,
  shard by shard, to ``work/bench/synthetic-llama-3b`` (cached): slices [0, 19] + [9, 28] ->
  38 layers (the same two-thirds overlap rule as the SmolLM2 map).

Each run is a fresh child process, timed from spawn to exit (imports included). Memory: the
child process tree is polled every 20 ms from /proc/PID/status (VmRSS, RssAnon, RssFile summed
over the tree), and the kernel's own high-water mark (ru_maxrss from wait4, exact, of the largest
single process in the tree) is recorded too. Every timed run starts from the same state: no
earlier output on disk (all are removed first), and ``sync`` run untimed, so no run pays for
another's dirty pages or for reclaiming the memory another's output fills.

The physical limit: a kernel-side copy (copy_file_range, as cp uses) of exactly the output's
number of bytes from the base's weight files, on the same disk.

Before the timed runs, one untimed run of each tool writes the outputs that are compared tensor
by tensor (safe_open), each output tensor also checked against the base tensor of the layer it
was copied from; it warms the base and the tools' files in the page cache for all timed runs.

    python tools/bench_apply.py [--quick] [--json] [--repeats N] [--no-docs] [--keep]

This is the driver. The full run keeps its raw numbers in docs/results/bench_apply.json (a --quick run in
work/bench/apply-results.json) and the report (tools/bench_apply_report.py: table, targets, reading, also
``--from-json``) writes the `## Surgery (apply vs mergekit)` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_apply_report import JSON, table, targets_lines, write_docs
from bench_common import cpu_name, finish, load_avg, median, save_json, versions

from midus_surgery.io.output_dir import OutputError, remove_own_directory, use_workspace

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "work" / "bench"
SMOL = REPO / "work" / "smollm2-135m"
SYNTH = BENCH / "synthetic-llama-3b"
SHARD_BYTES = 2_000_000_000  # both tools: at most 2 GB per output shard

# Llama-3.2-3B's shape (tied embeddings), random bf16 values.
SYNTH_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "num_attention_heads": 24,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}


# ----------------------------------------------------------------------------- the synthetic base

def synth_tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    return shapes


def make_synthetic(directory: Path, shard_bytes: int = SHARD_BYTES, log=print) -> None:
    """Write the synthetic base shard by shard (memory: one shard), unless already cached."""
    done = directory / ".complete"
    if done.is_file():
        return
    import torch
    from safetensors.torch import save_file

    use_workspace(directory.parent)
    remove_own_directory(directory)
    tmp = directory.with_name(directory.name + ".partial")
    remove_own_directory(tmp)
    tmp.mkdir(parents=True)
    shapes = synth_tensor_shapes(SYNTH_CONFIG)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in shapes:
        n = 2 * math.prod(shape)
        if groups[-1] and filled + n > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append((name, shape))
        filled += n
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for j, (name, shape) in enumerate(group):
            gen = torch.Generator().manual_seed(1000 * i + j)
            t = torch.empty(shape, dtype=torch.float32)
            if name.endswith("norm.weight"):
                t.uniform_(0.5, 1.5, generator=gen)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            tensors[name] = t.to(torch.bfloat16)
            del t
            weight_map[name] = file
            total += 2 * math.prod(shape)
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
        log(f"  synthetic base: shard {i + 1}/{len(groups)} written ({time.perf_counter() - t0:.0f} s)")
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(SYNTH_CONFIG, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp / ".complete").write_text("ok\n")
    os.replace(tmp, directory)


# ----------------------------------------------------------------------------- measuring a child

def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.Error:
        return [pid]


def run_measured(cmd: list[str], cwd: Path | None = None, poll: float = 0.02) -> dict:
    """Run cmd; wall time, peak tree RSS / anon RSS (polled) and the kernel's VmHWM (exact per process).

    ru_maxrss from wait4 is recorded but not used: on Linux an exec'd child inherits the forking
    parent's RSS high-water mark, so it reports this script's own size for a small `cp`.
    """
    os.sync()  # earlier runs' dirty pages out of the way (untimed)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env())
    peak_rss = peak_anon = peak_file = 0
    hwm: dict[int, int] = {}
    maxrss = 0
    import threading

    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            wall = time.perf_counter() - t0
            maxrss = rusage.ru_maxrss * 1024
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        rss = anon = file = 0
        for p in _tree(proc.pid):
            s = _proc_status(p)
            rss += s.get("VmRSS", 0)
            if "VmHWM" in s:
                hwm[p] = s["VmHWM"]
            anon += s.get("RssAnon", 0)
            file += s.get("RssFile", 0)
        peak_rss, peak_anon, peak_file = max(peak_rss, rss), max(peak_anon, anon), max(peak_file, file)
        time.sleep(poll)
    reader.join(timeout=10)
    text = b"".join(output).decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    hwm_sum = sum(hwm.values())  # per-process high-water marks, last read before exit (an upper bound for the tree)
    return {"wall_s": wall, "output": text, "peak_rss": max(peak_rss, hwm_sum), "peak_rss_polled": peak_rss, "vm_hwm_sum": hwm_sum,
            "peak_anon": peak_anon, "peak_file": peak_file, "ru_maxrss_unused": maxrss}


def child_env() -> dict[str, str]:
    """The environment of every timed child: this checkout's midus_surgery first on the path.

    midus-surgery runs as its console script does (see surgery_cmd) with PYTHONPATH = this repository, so
    the code measured is this checkout's, whichever checkout the package was installed from.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MIDUS_SURGERY_FULL_PLAN", None)
    return env


def surgery_cmd(*args: str) -> list[str]:
    """What the ``midus-surgery`` console script runs: ``run()`` of the imported cli module.

    Not ``python -m midus_surgery.cli``: a ``__main__`` module is compiled from source on every
    run, never from its cached bytecode."""
    return [sys.executable, "-c", "from midus_surgery.cli import run; run()", *args]


def compile_bytecode() -> None:
    """Write this checkout's bytecode once, untimed, as ``pip install`` does for installed packages.

    mergekit runs from the bytecode pip compiled when it installed. Where PYTHONDONTWRITEBYTECODE
    is set (as in some sandboxes), stale or missing ``.pyc`` files of this checkout would be
    recompiled by every timed run instead (~10 ms here) and never written back."""
    import compileall

    compileall.compile_dir(str(REPO / "midus_surgery"), quiet=1)


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def dir_weight_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(d))


def copy_floor(n_bytes: int, dest: Path, sources: list[Path]) -> None:
    """Copy exactly n_bytes from the base shards (cycling through them) into dest/part-K.safetensors.

    The physical limit for writing an output of n_bytes on this disk: kernel-side copies
    (copy_file_range, as cp and apply use), the same byte count as the output, since write
    throttling past the kernel's dirty-page limit makes the time non-linear in the bytes.
    """
    # The same loop as shard_writer._copy_range, not imported: that module imports torch, ~2 s
    # that would land inside the timed floor.
    left, k = n_bytes, 0
    while left > 0:
        src = sources[k % len(sources)]
        size = min(left, src.stat().st_size)
        with open(src, "rb") as fi, open(dest / f"part-{k:05d}.safetensors", "wb") as fo:
            done = 0
            while done < size:
                done += os.copy_file_range(fi.fileno(), fo.fileno(), size - done)
        left -= size
        k += 1


# ----------------------------------------------------------------------------- the two tools

def write_configs(case: dict, where: Path) -> tuple[Path, Path]:
    where.mkdir(parents=True, exist_ok=True)
    base = case["base"]
    s = case["slices"]
    recipe = where / f"{case['name']}-ours.yaml"
    recipe.write_text(
        "# written by tools/bench_apply.py\n"
        f"base:\n  path: {base}\n"
        "layout:\n  slices:\n" + "".join(f"    - layers: [{a}, {b}]\n" for a, b in s)
        + "seed: 0\n"
        f"output:\n  dir: {where / (case['name'] + '-out-ours')}\n  dtype: {case['dtype']}\n  shard_size: {SHARD_BYTES}\n"
    )
    mk = where / f"{case['name']}-mergekit.yaml"
    mk.write_text(
        "# written by tools/bench_apply.py\nslices:\n"
        + "".join(f"  - sources:\n      - model: {base}\n        layer_range: [{a}, {b}]\n" for a, b in s)
        + f"merge_method: passthrough\ndtype: {case['dtype']}\n"
    )
    return recipe, mk


def commands(case: dict, recipe: Path, mk: Path, where: Path) -> dict[str, list[str]]:
    ours_out = where / f"{case['name']}-out-ours"
    mk_out = where / f"{case['name']}-out-mergekit"
    exe = Path(sys.executable).parent
    mergekit = shutil.which("mergekit-yaml") or str(exe / "mergekit-yaml")
    tok = ["--copy-tokenizer"] if case["tokenizer"] else ["--no-copy-tokenizer"]
    return {
        "ours": surgery_cmd("apply", str(recipe), "--out", str(ours_out), "--overwrite", "--quiet"),
        "mergekit": [mergekit, str(mk), str(mk_out), "--lazy-unpickle", *tok, "--out-shard-size", str(SHARD_BYTES),
                     "--no-cuda", "--quiet"],
        "cp": [sys.executable, str(Path(__file__).resolve()), "--copy-floor", "OUT_BYTES", str(where / f"{case['name']}-out-cp"),
               *map(str, weight_files(Path(case["base"])))],
    }


def source_map(slices: list[tuple[int, int]]) -> list[int]:
    return [i for a, b in slices for i in range(a, b)]


def compare_outputs(ours: Path, theirs: Path, base: Path, slices) -> dict:
    """Tensor by tensor: ours == mergekit's, and each == the base tensor of its source layer."""
    import torch
    from safetensors import safe_open

    def handles(d: Path):
        names = {}
        hs = []
        for f in weight_files(d):
            h = safe_open(str(f), framework="pt")
            hs.append(h)
            for k in h.keys():
                names[k] = h
        return names

    a, b, src = handles(ours), handles(theirs), handles(base)
    srcmap = source_map(slices)
    layer = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
    only_ours, only_theirs = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    mismatched, wrong_source, n = [], [], 0
    for name in sorted(set(a) & set(b)):
        ta, tb = a[name].get_tensor(name), b[name].get_tensor(name)
        n += 1
        if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta, tb):
            mismatched.append(name)
        m = layer.match(name)
        sname = f"model.layers.{srcmap[int(m.group(1))]}.{m.group(2)}" if m else name
        if sname in src:
            ts = src[sname].get_tensor(sname)
            if ts.shape != ta.shape or not torch.equal(ts.to(ta.dtype), ta):
                wrong_source.append(name)
        else:
            wrong_source.append(name)
        del ta, tb
    return {"tensors_compared": n, "identical": not (mismatched or only_ours or only_theirs or wrong_source),
            "mismatched": mismatched[:10], "only_ours": only_ours[:10], "only_mergekit": only_theirs[:10],
            "not_equal_to_source_layer": wrong_source[:10]}


# ----------------------------------------------------------------------------- driver

def bench_case(case: dict, repeats: int, keep: bool, log) -> dict:
    use_workspace(BENCH)
    where = BENCH / "apply"
    recipe, mk = write_configs(case, where)
    cmds = commands(case, recipe, mk, where)
    outs = {k: where / f"{case['name']}-out-{k}" for k in cmds}

    def clear_outputs() -> None:
        for out in outs.values():
            remove_own_directory(out)  # inside this tool's workspace

    def write_both_untimed() -> None:
        run_measured(cmds["ours"])
        run_measured(cmds["mergekit"])

    # Untimed: one run of each tool, for the tensor-by-tensor check (it also warms the base and
    # the tools' Python files in the page cache for every timed run alike).
    log(f"  [{case['name']}] untimed run of each tool, then comparing the outputs tensor by tensor ...")
    clear_outputs()
    write_both_untimed()
    check = compare_outputs(outs["ours"], outs["mergekit"], Path(case["base"]), case["slices"])
    log(f"  [{case['name']}] {check['tensors_compared']} tensors, identical: {check['identical']}")
    cmds["cp"] = [str(dir_weight_bytes(outs["ours"])) if a == "OUT_BYTES" else a for a in cmds["cp"]]  # as many bytes as ours writes

    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    loads = []
    for r in range(repeats):
        order = ["ours", "mergekit"] if r % 2 == 0 else ["mergekit", "ours"]
        for tool in order + ["cp"]:
            # No earlier output on disk or in memory while a tool runs: with other outputs in the
            # page cache, the copy floor (always third) took 0.9-1.8 s here against 0.3 s without.
            clear_outputs()
            if tool == "cp":
                outs[tool].mkdir(parents=True)
            loads.append(os.getloadavg()[0])
            m = run_measured(cmds[tool])
            m["out_bytes"] = dir_weight_bytes(outs[tool])
            output = m.pop("output")
            split = re.search(r"\(plan ([\d.]+) s, writing ([\d.]+) s\)", output) if tool == "ours" else None
            if split:  # apply's own clock: the rest of its wall time is start-up (imports)
                m["plan_s"], m["write_s"] = float(split.group(1)), float(split.group(2))
                m["planner"] = "headers" if "planned from the safetensors headers" in output else "transformers"
            runs[tool].append(m)
            log(f"  [{case['name']} rep {r + 1}/{repeats}] {tool:8s} {m['wall_s']:7.2f} s  peak RSS {m['peak_rss'] / 2**30:.2f} GiB "
                f"(anon {m['peak_anon'] / 2**30:.2f})  load {load_avg()}")
    clear_outputs()
    if keep:  # the outputs to inspect, written once more
        write_both_untimed()
    base_bytes = dir_weight_bytes(Path(case["base"]))
    out_bytes = runs["ours"][0]["out_bytes"]
    summary = {}
    for tool, rs in runs.items():
        walls = [m["wall_s"] for m in rs]
        fastest = min(rs, key=lambda m: m["wall_s"])
        summary[tool] = {
            "wall_min_s": min(walls), "wall_median_s": median(walls), "walls_s": walls,
            "plan_s": fastest.get("plan_s"), "write_s": fastest.get("write_s"), "planner": fastest.get("planner"),
            "peak_rss_max_bytes": max(m["peak_rss"] for m in rs),
            "peak_anon_max_bytes": max(m["peak_anon"] for m in rs),
            "vm_hwm_max_bytes": max(m["vm_hwm_sum"] for m in rs),
            "out_bytes": rs[0]["out_bytes"],
        }
    ratios = {
        "ours_over_mergekit_min": summary["ours"]["wall_min_s"] / summary["mergekit"]["wall_min_s"],
        "ours_over_mergekit_median": summary["ours"]["wall_median_s"] / summary["mergekit"]["wall_median_s"],
        "ours_over_copy_min": summary["ours"]["wall_min_s"] / summary["cp"]["wall_min_s"],
        "mergekit_over_copy_min": summary["mergekit"]["wall_min_s"] / summary["cp"]["wall_min_s"],
        "ours_peak_over_mergekit_peak": summary["ours"]["peak_rss_max_bytes"] / summary["mergekit"]["peak_rss_max_bytes"],
    }
    shard = min(SHARD_BYTES, out_bytes)
    budget = shard + 2**30
    targets = {
        "time_vs_mergekit_le_0.5": ratios["ours_over_mergekit_min"] <= 0.5,
        "time_vs_copy_le_1.5": ratios["ours_over_copy_min"] <= 1.5,
        "peak_le_shard_plus_1GiB": summary["ours"]["peak_rss_max_bytes"] <= budget,
    }
    return {"case": case["name"], "base": str(case["base"]), "slices": case["slices"], "dtype": case["dtype"],
            "base_bytes": base_bytes, "out_bytes": out_bytes, "repeats": repeats,
            "out_layers": len(source_map(case["slices"])), "shard_budget_bytes": budget,
            "tools": summary, "ratios": ratios, "targets": targets, "check": check,
            "load_avg_1min_during": [round(x, 2) for x in loads],
            "commands": {k: shlex.join(v) for k, v in cmds.items()}}


def startup_times(log) -> dict:
    """Bare start-up (imports) of each CLI, `--help`: the fixed cost inside every wall time above."""
    exe = Path(sys.executable).parent
    out = {}
    for name, cmd in (("ours", surgery_cmd("--help")),
                      ("mergekit", [shutil.which("mergekit-yaml") or str(exe / "mergekit-yaml"), "--help"])):
        out[name] = run_measured(cmd)["wall_s"]
    log(f"  start-up (--help): ours {out['ours']:.2f} s, mergekit {out['mergekit']:.2f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, 1 repeat (about 1-2 minutes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (rows and ratios) instead of the table")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per tool (default: 1 with --quick, else 3 for SmolLM2 and 2 for the 3B base)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md and docs/results/bench_apply.json (never written with --quick)")
    ap.add_argument("--keep", action="store_true", help="write ours and mergekit's outputs once more after the timed runs (untimed) and keep them under work/bench/apply")
    ap.add_argument("--copy-floor", nargs="+", metavar=("N_BYTES DEST", "SRC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.copy_floor:  # the timed copy, run as its own process like the two tools
        n, dest, *sources = args.copy_floor
        copy_floor(int(n), Path(dest), [Path(x) for x in sources])
        return 0
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))

    if not (SMOL / "config.json").is_file():
        print(f"missing {SMOL}: run `python tools/fetch_smollm2.py` first", file=sys.stderr)
        return 2
    if not (shutil.which("mergekit-yaml") or (Path(sys.executable).parent / "mergekit-yaml").exists()):
        print("mergekit is not installed: `pip install mergekit==0.1.5` (after torch==2.13.0, so pip keeps the CPU torch)", file=sys.stderr)
        return 2
    cases = [{"name": "SmolLM2-135M", "base": SMOL, "slices": [(0, 20), (10, 30)], "dtype": "float32", "tokenizer": True,
              "repeats": args.repeats or (1 if args.quick else 3)}]
    if not args.quick:
        log("preparing the synthetic 3B base (cached) ...")
        make_synthetic(SYNTH, log=log)
        cases.append({"name": "synthetic-Llama-3B", "base": SYNTH, "slices": [(0, 19), (9, 28)], "dtype": "bfloat16", "tokenizer": False,
                      "repeats": args.repeats or 2})
    compile_bytecode()
    load_start = load_avg()
    startup = startup_times(log)
    results = [bench_case(c, c["repeats"], args.keep, log) for c in cases]
    payload = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
        "versions": versions("safetensors", "mergekit", "midus-surgery"), "load_avg_start": load_start, "load_avg_end": load_avg(),
        "command": "python tools/bench_apply.py" + (" --quick" if args.quick else "") + (f" --repeats {args.repeats}" if args.repeats else ""),
        "startup_s": startup, "results": results,
    }
    save_json(BENCH / "apply-results.json", payload)
    finish(args, payload, lambda p: write_docs(p, save_json(JSON, p)),
           f"{table(results)}\n\n" + "\n".join(targets_lines(results))
           + f"\n\nload average start {load_start}, end {payload['load_avg_end']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OutputError as exc:  # a --out folder the tool did not make: one line, as the CLI says it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
