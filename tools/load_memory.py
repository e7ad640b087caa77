"""What loading a bf16 model into fp32 master weights (as `train`, `eval` and `verify` load it) holds in memory.

A process's peak RSS (``/usr/bin/time``'s maxrss, VmHWM) counts the safetensors files the load maps
(file-backed pages the kernel can drop and read again) beside the memory the process allocates
(anonymous pages, which it cannot drop). This script builds a random bf16 Llama in a temporary folder,
loads it with midus-surgery's ``load_causal_lm`` in fp32 in a fresh process, samples
``/proc/self/status`` every 10 ms, and prints both peaks beside the fp32 weights' size, so the
dry run's "model state" line can say which of the two it answers for (docs/training.md).

    python tools/load_memory.py [--hidden 1536 --layers 16]   # about 500M parameters: 1 GB bf16, 2 GB fp32

Writes docs/results/load_memory.json. Linux only (/proc).
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


def status_kib() -> dict:
    """RssAnon, RssFile and VmHWM of this process, in KiB."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    return {key: int(fields[key].split()[0]) for key in ("RssAnon", "RssFile", "VmHWM")}


def child(model_dir: str) -> None:
    """Load ``model_dir`` in fp32 as train does, sampling the peaks; print them as JSON."""
    import torch

    from midus_surgery.train.evaluate import load_causal_lm

    peaks = {"RssAnon": 0, "RssFile": 0}
    before = status_kib()
    done = threading.Event()

    def sample():
        while not done.is_set():
            now = status_kib()
            for key in peaks:
                peaks[key] = max(peaks[key], now[key])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    model = load_causal_lm(Path(model_dir), dtype=torch.float32, progress=False)
    seconds = time.perf_counter() - start
    time.sleep(0.05)
    done.set()
    sampler.join()
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"fp32_weights_kib": fp32 // 1024, "before": before, "peak_anon_kib": peaks["RssAnon"],
                      "peak_file_kib": peaks["RssFile"], "vmhwm_kib": status_kib()["VmHWM"], "load_s": round(seconds, 2)}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                                      num_key_value_heads=max(1, args.hidden // 512), dtype="bfloat16")
    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        stored = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        out = subprocess.run([sys.executable, __file__, "--child", tmp], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the load failed:\n{out.stderr[-2000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 1024 ** 2  # KiB per GiB
    anon = (measured["peak_anon_kib"] - measured["before"]["RssAnon"]) / gib
    fp32 = measured["fp32_weights_kib"] / gib
    result = {"command": command_line("tools/load_memory.py", argv), "cpu": cpu_name(), "versions": versions(),
              "parameters": params, "stored_bf16_gib": round(stored / 2 ** 30, 3), "fp32_weights_gib": round(fp32, 3),
              "anonymous_growth_gib": round(anon, 3), "peak_file_backed_gib": round(measured["peak_file_kib"] / gib, 3),
              "peak_rss_gib": round(measured["vmhwm_kib"] / gib, 3), "load_s": measured["load_s"]}
    print(f"{params / 1e6:.0f}M parameters, {result['stored_bf16_gib']} GiB stored in bf16, {fp32:.3f} GiB as fp32 weights")
    print(f"  the load's own memory (anonymous pages) grew by {anon:.3f} GiB = {anon / fp32:.2f}x the fp32 weights")
    print(f"  the mapped weights files (file-backed pages, droppable) peaked at {result['peak_file_backed_gib']} GiB")
    print(f"  peak RSS (maxrss: both, plus torch and transformers) {result['peak_rss_gib']} GiB = "
          f"{result['peak_rss_gib'] / fp32:.2f}x the fp32 weights")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
