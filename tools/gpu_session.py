#!/usr/bin/env python
"""One prepared GPU session for the memory layer: correctness first, then the timings, in under ten minutes.

A GPU machine is lent for minutes at a time, with nothing installed from here and no network. So:

    python tools/gpu_session.py prepare       # here: every Triton kernel compiled for sm_90 first
                                              # (tools/compile_kernels.py: a kernel that does not compile
                                              # would waste the session), then the SmolLM2 outputs' small
                                              # files (configs, plans, code; no weights) copied into work/gpu-carry/
    python tools/gpu_session.py run           # there (device tool, carry ["work/gpu-carry"]): the steps below,
                                              # logs and JSON under $OUT (else docs/results/gpu-session/)
    python tools/gpu_session.py report DIR    # here, on the files that came back: the docs sections

`run`'s steps, each with its own time limit, each run even when one before it failed:

1. ``check``: tools/gpu_check_hml.py without its HML-vs-FFN, variant and FSDP sections (6, 7, 9):
   correctness on the card (the default path, the Triton kernels, the fused kernels), then the Triton
   kernels' times and section 10: every path of the layer beside the FFN at every size, fp32 and bf16,
   with the bytes floors (``hml_fused.json``, ``gpu_check_hml.log``); section 11: the read at decode on every
   path beside the FFN, eager and replayed from a CUDA graph, with the kernels one call launches.
2. ``step``: tools/bench_step.py at the paper's proportion (15 of 45 blocks), 16 x 1024 tokens, fp32 and
   bf16, freeze=base: DUS, MIDUS (the default Triton kernels), MIDUS on the fused kernels, the FFN-free
   floor (``bench_step.json``).
3. ``decode``: tools/bench_decode.py, greedy generation with the KV cache, base / DUS / LLaMA-Pro / MIDUS
   and MIDUS on the fused read at batch 1 and 16, fp32 and bf16, 3 paired rounds (``bench_decode.json``).
4. ``decode-compiled``: the same in bf16 on a static cache with the decode step compiled (``--compile``: CUDA
   graphs, which take out the per-operator overhead that bounds the eager decode; ``bench_decode_compiled.json``).
5. ``decode-profile``: the compiled decode at batch 1, one round, then ``--profile``: per model the CUDA graphs
   inductor skipped or cut while compiling and the kernels of one more generate (``bench_decode_profile.json``).

One call runs 600 s at most, and a session's 15 minutes of device time hold about one full call and a short
one: ``run`` alone runs DEFAULT_STEPS (check, decode-profile), then ``run --steps step`` (or another step that
fits what is left) in a second call.

The GPU machine has torch, triton and transformers but not the package's other imports (pydantic,
PyYAML, rich): ``prepare`` downloads their wheels for its Python (3.12) into ``work/gpu-carry/pylib``,
which ``run`` puts on PYTHONPATH.

Weights are random (``--random-init``): time does not depend on the values, and only the configs travel.
``report DIR`` writes `## HML on GPU, fused kernels` (from hml_fused.json; targets: the layer at most 1.0x
the bf16 FFN at the SmolLM2 recipe size, 0.5x at the Llama-3.2-1B size, at 16 x 1024), the step and
decode sections (their own reports), and copies the log to docs/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import BENCHMARKS, REPO, RESULTS, save_json, write_section  # noqa: E402

CARRY = REPO / "work" / "gpu-carry"
# what a model directory needs to be built with random weights and tokenise: never its weights
WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
CARRY_LIMIT = 60 * 2**20  # the device tool carries 64 MiB in all
MARKER = ".gpu-session-carry"  # what makes a carry directory ours to replace
# On an H200 (2026-12-04) check took 193-251 s, step 107-124 s, decode 137 s at 3 rounds, decode-compiled 213 s
# without the fused row (about 40 s a batch more with it). One call may run 600 s: the default steps
# (DEFAULT_STEPS) fit one, a second call runs the rest (`run --steps step,decode`).
STEPS = {  # name -> (seconds, the command after `python`, the file its stdout goes to or None)
    "check": (260, ["tools/gpu_check_hml.py", "--skip", "6,7,9", "--json-out", "{out}/hml_fused.json"], None),
    "step": (145, ["tools/bench_step.py", "--device", "cuda", "--random-init", "--layout", "every2", "--batches", "16x1024",
                   "--repeats", "1", "--freezes", "base", "--models", "DUS,MIDUS,MIDUS (fused Triton),FFN-free floor",
                   "--json", "--no-docs"], "bench_step.json"),
    "decode": (185, ["tools/bench_decode.py", "--device", "cuda", "--random-init", "--dtypes", "fp32,bf16", "--rounds", "3",
                     "--json", "--no-docs"], "bench_decode.json"),
    # bf16 only: each model and batch compiles its own graph (25-42 s each on the H200, about a minute on a CPU here)
    "decode-compiled": (330, ["tools/bench_decode.py", "--device", "cuda", "--random-init", "--dtypes", "bf16", "--rounds", "3",
                              "--compile", "--json", "--no-docs"], "bench_decode_compiled.json"),
    # where a compiled Memory block's extra time goes: batch 1, one round, then one profiled generate per model
    # (every model still compiles: about 165 s of the limit on the H200)
    "decode-profile": (240, ["tools/bench_decode.py", "--device", "cuda", "--random-init", "--dtypes", "bf16", "--batches", "1",
                             "--rounds", "1", "--compile", "--profile", "--json", "--no-docs"], "bench_decode_profile.json"),
}
# What the next session measures first (2026-12-04, third session): the kernels' checks, then why a compiled
# Memory block costs about 100 us of a batch-1 decode step over a plain block when its memory read alone, replayed
# from a CUDA graph, costs 40-50 us over the FFN: the CUDA graphs inductor skipped or cut, and the kernels.
DEFAULT_STEPS = ("check", "decode-profile")
# What the package imports and the GPU machine's Python lacks (2026-12-04: torch, triton and transformers
# only, on Python 3.12: bench_step's child died on `import pydantic`). `prepare` downloads their wheels for
# that Python from the package registry and unpacks them into the carry; `run` puts them on PYTHONPATH.
DEVICE_PYTHON = "3.12"
DEVICE_PACKAGES = ("pydantic", "pyyaml", "rich")
PYLIB = "pylib"  # inside the carry: imported from there, never unpacked into the tree
# (size, batch, dtype) -> the most the layer may cost against the FFN it replaces (issue 28's targets)
TARGETS = {("SmolLM2-135M recipe", "16x1024", "bfloat16"): 1.0, ("Llama-3.2-1B", "16x1024", "bfloat16"): 0.5}
PATHS = ("torch", "triton", "triton segment", "triton-fused", "triton-fused segment", "triton-fused atomic")


def model_dirs() -> list[Path]:
    """Every model directory the timed steps read: the base and the outputs of the every5 and every2 layouts."""
    from bench_step import models_for

    dirs = []
    for layout in ("every5", "every2"):
        for path in models_for(layout).values():
            if path not in dirs:
                dirs.append(path)
    return dirs


def carry(dirs: list[Path], dest: Path, root: Path = REPO) -> int:
    """Copy each directory's files but its weights to ``dest``, at the same path relative to ``root``.
    Returns the bytes copied; raises SystemExit when a directory is missing or the copy would not travel."""
    missing = [d for d in dirs if not (d / "config.json").is_file()]
    if missing:
        raise SystemExit("missing " + ", ".join(str(d) for d in missing) + ": run `python tools/fetch_smollm2.py` and "
                         "`midus-surgery apply` on the bundled recipes (recipes/smollm2-135m-*.yaml, recipes/ablation/every2/)")
    files = [f for d in dirs for f in sorted(d.iterdir()) if f.is_file() and not f.name.endswith(WEIGHTS)]
    total = sum(f.stat().st_size for f in files)
    if total > CARRY_LIMIT:
        raise SystemExit(f"the carry would be {total / 2**20:.0f} MiB, over the device tool's limit")
    if dest.exists():
        if not (dest / MARKER).is_file():
            raise SystemExit(f"{dest} exists and was not written by `gpu_session.py prepare`; move it away first")
        foreign = not_written_by_prepare(dest)
        if foreign and not recorded_files(dest):  # nothing to tell them apart by
            raise SystemExit(f"{dest}'s marker records no files this version can check (an earlier gpu_session.py's marker, or "
                             "one that does not read), so what prepare wrote there cannot be told from anything added since; "
                             "move it away first")
        if foreign:  # a marker alone let a user's notes or fetched timings in the carry go with it (trial139 F2)
            raise SystemExit(f"{dest} also holds what `gpu_session.py prepare` did not write there ({', '.join(foreign[:5])}); "
                             "move it away first")
        shutil.rmtree(dest)  # an earlier prepare's copy, every file of it recorded in its marker
    dest.mkdir(parents=True)
    for f in files:
        target = dest / f.resolve().relative_to(root.resolve())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    record_carry(dest)
    return total


def _stamp(path: Path) -> list[int]:
    """[size, modification time in ns]: a file edited in place at the same size is told apart by its time (trial144 F7)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def record_carry(dest: Path) -> None:
    """The marker that makes ``dest`` this tool's to replace: every file in it, with its size and modification time
    (rewritten once the packages are unpacked into it too)."""
    written = {f.relative_to(dest).as_posix(): _stamp(f) for f in sorted(dest.rglob("*")) if f.is_file() and f.name != MARKER}
    (dest / MARKER).write_text(json.dumps({"written_by": "tools/gpu_session.py prepare; replaced by the next prepare",
                                           "files": written}, indent=1) + "\n")


def recorded_files(dest: Path) -> dict:
    """The files ``dest``'s marker records (relative path -> [size, mtime_ns]); empty when it records none, does not read,
    or records them as an earlier version did (sizes alone, or no list)."""
    try:
        recorded = json.loads((dest / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    stamps = isinstance(recorded, dict) and all(isinstance(v, list) and len(v) == 2 for v in recorded.values())
    return recorded if stamps else {}


def not_written_by_prepare(dest: Path) -> list[str]:
    """What ``dest`` holds beyond its marker's record (relative paths): a file not listed, or of another size, a
    folder or link where none was written. An unreadable marker records nothing."""
    recorded = recorded_files(dest)
    folders = {parent.as_posix() for name in recorded for parent in Path(name).parents}
    found = []
    for entry in sorted(dest.rglob("*")):
        name = entry.relative_to(dest).as_posix()
        if entry.name == MARKER and entry.parent == dest:
            continue
        if entry.is_dir() and not entry.is_symlink():
            if name not in folders:  # a folder of the user's, empty or not
                found.append(name + "/")
        elif entry.is_symlink() or not entry.is_file() or recorded.get(name) != _stamp(entry):
            found.append(name)
    return found


def bundle_packages(dest: Path, download=None) -> int:
    """Unpack wheels of DEVICE_PACKAGES (and what they need) for the GPU machine's Python into ``dest``;
    returns the bytes. ``download(folder)``: fetches the wheels into ``folder`` (default: pip download)."""
    import tempfile
    import zipfile

    def pip_download(folder: Path) -> None:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", *DEVICE_PACKAGES, "--only-binary=:all:",
                        "--python-version", DEVICE_PYTHON, "--platform", "manylinux2014_x86_64", "--platform",
                        "manylinux_2_17_x86_64", "-d", str(folder)], check=True)

    with tempfile.TemporaryDirectory() as tmp:
        (download or pip_download)(Path(tmp))
        dest.mkdir(parents=True, exist_ok=True)
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(dest)
    return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())


def pythonpath(carry_dir: Path = CARRY) -> str:
    """The tools' PYTHONPATH on the GPU machine: the repository, then the carried packages."""
    parts = [str(REPO), *([str(carry_dir / PYLIB)] if (carry_dir / PYLIB).is_dir() else []), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def unpack(src: Path, root: Path = REPO) -> list[Path]:
    """On the GPU machine: put the carried files where the tools look for them (the packages stay in
    the carry). Existing files are kept."""
    placed = []
    for f in sorted(p for p in src.rglob("*") if p.is_file() and p.name != MARKER and p.relative_to(src).parts[0] != PYLIB):
        target = root / f.relative_to(src)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            placed.append(target)
    return placed


def run_steps(names: list[str], out: Path, python: str = sys.executable, log=print) -> dict:
    """Run ``names`` (of STEPS) in order, each under its time limit; a failure is recorded and the rest run."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=pythonpath())
    results = {}
    for name in names:
        seconds, args, stdout_name = STEPS[name]
        cmd = [python] + [a.replace("{out}", str(out)) for a in args]
        log(f"[session] {name}: {' '.join(cmd[1:])} (limit {seconds} s)")
        t0 = time.time()
        with open(out / f"{name}.log", "w") as err:
            sink = open(out / stdout_name, "w") if stdout_name else err
            try:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=sink, stderr=err, timeout=seconds).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            finally:
                if stdout_name:
                    sink.close()
        results[name] = {"rc": rc, "seconds": round(time.time() - t0, 1)}
        log(f"[session] {name}: exit {rc} after {results[name]['seconds']} s")
    save_json(out / "session.json", results)
    return results


def fused_table(payload: dict) -> str:
    """The `## HML on GPU, fused kernels` section's table and target lines from section 10's JSON."""
    head = ("| size | tokens | dtype | FFN ms | " + " | ".join(f"{p} ms (/FFN)" for p in PATHS)
            + " | floor ms: unique / gathered at the copy bandwidth |\n|---|---|---|---:|"
            + "---:|" * len(PATHS) + "---|\n")
    lines, verdicts = [], []
    for r in payload["rows"]:
        cells = []
        for p in PATHS:
            ms = r.get(f"{p} ms")
            cells.append("-" if ms is None else f"{ms:.2f} ({ms / r['ffn_ms']:.2f}x)")
        lines.append(f"| {r['size']} | {r['batch']} | {r['dtype']} | {r['ffn_ms']:.2f} | " + " | ".join(cells)
                     + f" | {r['unique_floor_ms']:.3f} / {r['gathered_floor_ms']:.3f} |")
        limit = TARGETS.get((r["size"], r["batch"], r["dtype"]))
        if limit is not None:
            timed = {p: r[f"{p} ms"] / r["ffn_ms"] for p in PATHS if r.get(f"{p} ms") is not None}
            if timed:
                best = min(timed, key=timed.get)
                met = "met" if timed[best] <= limit else "NOT met"
                verdicts.append(f"- {r['size']} {r['dtype']} {r['batch']}: best path {best} at {timed[best]:.2f}x the FFN "
                                f"(target <= {limit}: {met})")
            else:
                verdicts.append(f"- {r['size']} {r['dtype']} {r['batch']}: no path ran (target <= {limit}: NOT measured)")
    copy = payload["rows"][0]["copy_gbps"] if payload["rows"] else float("nan")
    return (head + "\n".join(lines) + "\n\n"
            + f"Measured copy bandwidth {copy:.0f} GB/s (the floors' divisor). Targets (layer fwd+bwd / FFN fwd+bwd):\n\n"
            + ("\n".join(verdicts) if verdicts else "- no targeted row in this run") + "\n")


def bank_grad_table(rows: list) -> str:
    """The bank gradient alone (section 10's ``bank_grad_rows``): the segment reduce beside PyTorch's sorted
    embedding-bag backward (the deterministic method it would replace) and float atomics."""
    if not rows:
        return ""
    lines = ["| size | bags x k, d | embedding_bag backward ms | segment ms (/embedding_bag) [counting blocks] | "
             "segment asked for 1024 counting blocks | index_add atomics ms |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        eb, seg, wide = r["embedding_bag ms"], r["segment ms"], r.get("segment 1024 blocks ms")
        lines.append(f"| {r['size']} | {r['bags']} x {r['k']}, {r['d']} | {eb:.3f} | {seg:.3f} ({seg / eb:.2f}x) "
                     f"[{r.get('blocks', '?')}] | "
                     + ("-" if wide is None else f"{wide:.3f} ({wide / eb:.2f}x) [{r.get('wide blocks', '?')}]")
                     + f" | {r['atomic ms']:.3f} |")
    return ("\nThe bank's gradient alone (uniform random slots, float32 dz), deterministic methods beside the atomics:\n\n"
            + "\n".join(lines) + "\n")


def report(src: Path, docs: Path = BENCHMARKS, results: Path = RESULTS) -> list[str]:
    """Write the docs from a session's returned files; returns what was written."""
    done = []
    fused = src / "hml_fused.json"
    if fused.is_file():
        payload = json.loads(fused.read_text())
        kept = save_json(results / "gpu_hml_fused.json", payload)
        body = ("## HML on GPU, fused kernels\n\n"
                f"The memory layer's forward + backward on every path, beside the FFN it replaces (`LlamaMLP`), "
                f"{payload['device']}, torch {payload['torch']}: `python tools/gpu_session.py run` (tools/gpu_check_hml.py "
                f"section 10; raw numbers [{kept.name}](results/{kept.name})). Paths: `torch` (pure torch), `triton` (the "
                "default kernels: Triton top-k and bag weight gradient; the bank gradient by PyTorch's sorted embedding-bag "
                "backward), `triton-fused` (the fused read, the same bank gradient), `segment` (`bank_grad: segment`, the "
                "sort-free deterministic segment reduce, which `bank_grad: auto` takes for rows of 128 or more at 2^23 or "
                "more contributions, hml.SEGMENT_MIN_*), `triton-fused atomic` (`bank_grad: index_add`). Floors: tools/bench_hml.py's `traffic`, "
                "docs/hml.md \"The physical picture\".\n\n" + fused_table(payload)
                + bank_grad_table(payload.get("bank_grad_rows", [])))
        write_section(docs, "## HML on GPU, fused kernels", body)
        done.append(f"{docs.name}: ## HML on GPU, fused kernels")
    log = src / "check.log"
    if log.is_file():
        shutil.copy2(log, results / "gpu_check_hml_session.log")
        done.append("results/gpu_check_hml_session.log")
    profile = src / "bench_decode_profile.json"
    if profile.is_file() and profile.stat().st_size:
        # one round at one batch: not a measurement to replace the compiled section's, so its profile is printed for
        # a hand-written reading and its JSON kept
        import bench_decode_report

        payload = json.loads(profile.read_text())
        kept = save_json(results / "bench_decode_gpu_compiled_profile.json", payload)
        print("\n".join(bench_decode_report.cudagraph_lines(payload) + [""] + bench_decode_report.profile_lines(payload)))
        done.append(f"results/{kept.name} (its CUDA graphs and profile printed above, for a reading by hand)")
    for name, tool in (("bench_step.json", "bench_step_report.py"), ("bench_decode.json", "bench_decode_report.py"),
                       ("bench_decode_compiled.json", "bench_decode_report.py")):
        path = src / name
        if path.is_file() and path.stat().st_size:
            rc = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--from-json", str(path)], cwd=REPO).returncode
            done.append(f"{tool} --from-json {path}: exit {rc}")
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Steps of run: " + ", ".join(STEPS))
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("prepare", help="copy the outputs' small files (no weights) into work/gpu-carry/")
    run = sub.add_parser("run", help="on the GPU machine: the steps, logs and JSON under $OUT")
    run.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                     help=f"comma-separated, of {', '.join(STEPS)} (default {','.join(DEFAULT_STEPS)}: one call's 600 s)")
    rep = sub.add_parser("report", help="write the docs from the files a run returned")
    rep.add_argument("dir", type=Path)
    args = ap.parse_args(argv)
    if args.what == "prepare":
        from bench_step import ensure_outputs

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if subprocess.run([sys.executable, str(REPO / "tools" / "compile_kernels.py")], cwd=REPO, env=env).returncode != 0:
            print("gpu_session prepare: a Triton kernel does not compile for sm_90 (above); fix it before a GPU session",
                  file=sys.stderr)
            return 1

        for layout in ("every5", "every2"):  # applies a bundled recipe whose output is missing (needs the SmolLM2 base)
            ensure_outputs(print, False, layout)
        total = carry(model_dirs(), CARRY)
        total += bundle_packages(CARRY / PYLIB)
        record_carry(CARRY)  # the packages too: the next prepare replaces them
        if total > CARRY_LIMIT:
            print(f"gpu_session prepare: the carry is {total / 2**20:.0f} MiB with the packages, over the device tool's limit",
                  file=sys.stderr)
            return 1
        print(f"wrote {CARRY.relative_to(REPO)} ({total / 2**20:.1f} MiB, {', '.join(DEVICE_PACKAGES)} for Python "
              f"{DEVICE_PYTHON} among them); on the device: carry [\"work/gpu-carry\"], command `python tools/gpu_session.py run`")
        return 0
    if args.what == "run":
        steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        unknown = [s for s in steps if s not in STEPS]
        if unknown or not steps:
            ap.error(f"--steps: unknown {unknown or 'none given'}; known: {', '.join(STEPS)}")
        import torch

        if not torch.cuda.is_available():
            print("gpu_session: no CUDA device here; `run` is for the GPU machine (tools/gpu_check_hml.py --dry-run "
                  "checks the kernels on the CPU)", file=sys.stderr)
            return 2
        if CARRY.is_dir():
            print(f"[session] placed {len(unpack(CARRY))} carried files")
        out = Path(os.environ.get("OUT") or RESULTS / "gpu-session")
        results = run_steps(steps, out)
        return 0 if all(r["rc"] == 0 for r in results.values()) else 1
    if not args.dir.is_dir():
        print(f"gpu_session report: {args.dir} is not a directory", file=sys.stderr)
        return 2
    for line in report(args.dir):
        print("wrote", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
