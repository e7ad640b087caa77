"""What `midus-surgery verify` holds in memory, and what its round trip adds, side by side.

verify loads the output in float32 (4 bytes a parameter), runs the checks that need only it, keeps what the base's
checks compare (its logits on the sample, its norm weights and biases) and saves it for its round trip (save_pretrained
+ reload), then loads the base alone, then the output again for the perturbed identity. The round trip used to reload
with the output still in memory (twice the float32 weights); it keeps each tensor's digest and lets the output go once
it is saved. Until 2026-12-07 the base was loaded beside the output (both in float32: the peak of a verify). This script
builds a random bf16 Llama, applies a LLaMA-Pro recipe to it (one identity block after every fourth layer), and in
fresh processes measures the round trip's growth of anonymous memory (the process's own pages, ``RssAnon``, sampled
every 10 ms) both ways, the output **held** by its caller through the reload and **handed** over (as verify does),
then the peaks of a whole `verify` run, by check: anonymous memory beside the output's and the base's float32 weights
together (what holding both at once took), and RSS with the file-backed pages of the mapped weights files.

    python tools/verify_memory.py [--hidden 1536 --layers 16]   # about 500M parameters: 2 GB as float32

Writes docs/results/verify_memory.json. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_common import RESULTS, command_line, cpu_name, versions

GIB_KIB = 1024 ** 2  # KiB per GiB


def status_kib() -> dict:
    """RssAnon, RssFile and VmRSS of this process, in KiB."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return {key: int(fields[key].split()[0]) for key in ("RssAnon", "RssFile", "VmRSS")}


class Sampler:
    """Samples this process's memory every 10 ms on a thread; ``phase`` tags the samples, ``peaks`` keeps each tag's maxima."""

    def __init__(self):
        self.phase, self.peaks, self._done = None, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            now, peak = status_kib(), self.peaks.setdefault(self.phase, {"RssAnon": 0, "VmRSS": 0})
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.05)
        self._done.set()
        self._thread.join()


def stored_numel(folder: Path) -> int:
    """How many numbers the safetensors files of ``folder`` hold."""
    import math

    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def child_round_trip(out: str, how: str) -> None:
    """Load ``out`` as verify does, then run its round trip with the model ``held`` by this frame or ``handed`` over."""
    import gc

    from midus_surgery.emit import verify as verify_module

    model, _ = verify_module._load(Path(out))
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    base_fp32 = 4 * stored_numel(Path(out).parent / "base")  # from the headers: a load here would warm the heaps
    ids = verify_module._row_ids(model.config.vocab_size)
    gc.collect()
    before = status_kib()
    with Sampler() as sampler:
        sampler.phase = "round-trip"
        if how == "held":
            check = verify_module.round_trip_check([model], ids, trust=False)
        else:
            handed, model = [model], None
            check = verify_module.round_trip_check(handed, ids, trust=False)
    peak = sampler.peaks["round-trip"]
    print(json.dumps({"ok": check.ok, "fp32_weights_kib": fp32 // 1024, "base_fp32_weights_kib": base_fp32 // 1024, "before": before,
                      "peak": peak}))


def child_verify(out: str) -> None:
    """A whole ``verify`` run of ``out`` (against the base apply recorded), its peaks tagged by the check running: the
    samples after a check's line belong to the next check (its load or its base's, then its work)."""
    from midus_surgery.emit.verify import verify

    names = []

    def report(check) -> None:
        names.append(f"{'PASS' if check.ok else 'SKIP' if check.skipped else 'FAIL'} {check.name}")
        sampler.phase = len(names)

    start = time.perf_counter()
    with Sampler() as sampler:
        sampler.phase = 0
        verify(Path(out), report=report)
    running = [name.split(" ", 1)[1] for name in names] + ["(after the last check)"]
    peaks = {running[phase]: peak for phase, peak in sampler.peaks.items()}
    print(json.dumps({"checks": names, "peaks": peaks, "seconds": round(time.perf_counter() - start, 1)}))


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the child {args[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build(folder: Path, hidden: int, layers: int) -> Path:
    """A random bf16 Llama in ``folder/base`` and its LLaMA-Pro output (float32: verify's dtype) in ``folder/out``."""
    import torch
    import transformers
    import yaml

    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import emit

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                      num_key_value_heads=max(1, hidden // 512), dtype="bfloat16")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder / "base")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": {"path": str(folder / "base")}, "output": {"dir": str(folder / "out")},
                                      "layout": {"interleave": {"after_every": 4, "kind": "identity"}}}))
    return emit(plan_recipe(recipe), progress=False).out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_round_trip(*args.child) if args.child[0] != "verify" else child_verify(args.child[1])
        return
    with tempfile.TemporaryDirectory(prefix="verify-memory-") as tmp:
        out = build(Path(tmp), args.hidden, args.layers)
        trips = {how: run_child("--child", str(out), how) for how in ("held", "handed")}
        whole = run_child("--child", "verify", str(out))
    fp32 = trips["held"]["fp32_weights_kib"] / GIB_KIB
    growth = {how: (t["peak"]["RssAnon"] - t["before"]["RssAnon"]) / GIB_KIB for how, t in trips.items()}
    if not all(t["ok"] for t in trips.values()):
        sys.exit(f"a round trip failed: {trips}")
    peaks = {phase: round(p["VmRSS"] / GIB_KIB, 3) for phase, p in whole["peaks"].items()}
    anon = {phase: round(p["RssAnon"] / GIB_KIB, 3) for phase, p in whole["peaks"].items()}
    both = fp32 + trips["held"]["base_fp32_weights_kib"] / GIB_KIB
    result = {"command": command_line("tools/verify_memory.py", argv), "cpu": cpu_name(), "versions": versions(),
              "output_fp32_weights_gib": round(fp32, 3),
              "round_trip_growth_gib": {how: round(g, 3) for how, g in growth.items()},
              "round_trip_growth_ratio_handed_to_held": round(growth["handed"] / growth["held"], 3),
              "base_fp32_weights_gib": round(trips["held"]["base_fp32_weights_kib"] / GIB_KIB, 3),
              "verify_checks": whole["checks"], "verify_peak_rss_gib_by_check": peaks, "verify_peak_anon_gib_by_check": anon,
              "verify_peak_anon_over_output_and_base": round(max(anon.values()) / both, 3), "verify_s": whole["seconds"]}
    print(f"a LLaMA-Pro output of {fp32:.3f} GiB as float32 weights")
    for how, g in growth.items():
        print(f"  round trip, the output {how:6s}: anonymous memory grew {g:.3f} GiB = {g / fp32:.2f}x the float32 weights")
    print(f"  handed / held: {result['round_trip_growth_ratio_handed_to_held']:.2f}")
    print(f"  a whole verify ({whole['seconds']} s; {', '.join(whole['checks'])}): peak RSS while each check ran (GiB, file-backed pages included):")
    for phase, gib in peaks.items():
        print(f"    {phase:26s} {gib:.3f} = {gib / fp32:.2f}x the float32 weights (anonymous: {anon[phase]:.3f})")
    print(f"  peak anonymous memory {max(anon.values()):.3f} GiB against {both:.3f} GiB for the output's and the base's float32 "
          f"weights together: {result['verify_peak_anon_over_output_and_base']:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "verify_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
