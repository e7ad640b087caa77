#!/usr/bin/env python
"""Time greedy generation with the KV cache (prefill, decode tokens/s, ms per decode step) of SmolLM2-135M and its up-scaled outputs.

Models: the base (``work/smollm2-135m``) and the DUS, LLaMA-Pro and MIDUS outputs of the bundled recipes
``recipes/smollm2-135m-{dus,llama-pro,midus}.yaml`` (6 blocks inserted after every 5th layer: 30 -> 36
layers), applied first if missing; ``--layout every2`` takes the paper's proportion instead (15 blocks after
every 2nd layer, 30 -> 45), as in tools/bench_step.py, whose layouts, model list and loader this script
imports. ``--model NAME=DIR`` (repeatable) times any model directories instead (no docs written).

What is timed: ``model.generate(input_ids, do_sample=False, max_new_tokens=N, min_new_tokens=N,
use_cache=True)``, what a user runs for greedy decoding (``min_new_tokens`` = N: no row stops early at an
end-of-text token, so every model does the same work), on a prompt of P random token ids from a seeded
generator (the same prompt for every model), at each batch size. A LogitsProcessor appended to generate's
own list takes a timestamp each time logits reach it, i.e. right after each forward pass (after a
``torch.cuda.synchronize()`` on a GPU): the first stamp follows the prefill, each later one a decode step.
So one generate gives both, without a second run to subtract:

    prefill   = first stamp - the generate call (the prompt's forward, plus generate's own setup)
    decode    = last stamp - first stamp: the N - 1 decode steps between them (picking the token, one
                token per row through the model against the KV cache, the logits processors)
    decode tokens/s = batch x (N - 1) / decode;  ms per step = decode / (N - 1)

Every generate is checked to have made exactly batch x N new tokens.

Rounds: every model of a dtype is loaded in one process and warmed up (a generate of 2 new tokens at the
full batch and prompt), then each round runs every model once, back to back, the order rotating per round.
Rows report medians over rounds, and the ratio to DUS is the median of the per-round ratios (the models of
one round run seconds apart): this shared VM's speed drifts by 10-30% over minutes, which a ratio of two
medians taken minutes apart would carry (tools/bench_step.py pairs its rounds the same way). The
target: MIDUS decode tokens/s at least DUS's, at every batch size.

MIDUS's memory layer runs the compiled CPU kernels on CPU (Triton on CUDA): ``hml.prepare_kernels``
resolves (and on CPU builds) them before anything is timed, and the output names the backend.
``--profile`` adds, per dtype and batch, one more generate of DUS and MIDUS with forward hooks around the
inserted blocks (the FFN and attention output projection of DUS's, the memory readout of MIDUS's: per-call
wall time at decode), and the memory layer alone under torch.profiler on the queries a decode step gave
it (T = batch tokens per call): which of its operators cost what.

    python tools/bench_decode.py [--quick] [--json] [--no-docs] [--profile]
    python tools/bench_decode.py --dtypes fp32,bf16 --profile                      # the docs run
    python tools/bench_decode.py --device cuda --random-init --dtypes fp32,bf16     # a GPU machine
    python tools/bench_decode.py --compile                                          # static cache + torch.compile
    python tools/bench_decode.py --from-json docs/results/bench_decode_gpu.json     # redraw its section here

``--compile`` times what a user runs to take the per-operator overhead out of decoding: generate on a static KV
cache with its decode step compiled whole (``cache_implementation="static"`` and a ``CompileConfig``; CUDA graphs on
a GPU). Each model is warmed up at the timed length (compiling is not timed), and a graph compiled during the
timed rounds is an error. Its own section and JSON (``..., compiled``). The JSON keeps, per model, what inductor
did about CUDA graphs while it compiled (graphs skipped, pieces cut around operators a graph cannot hold, and
why). ``--compile --profile`` adds one profiled generate per model and setting: what ran on the device, how
many launches and how long beside the wall time, and the top kernels (there are no eager blocks to hook).

A full run keeps the raw numbers in docs/results/bench_decode_{cpu|gpu}{_every2|_llama1b}.json and writes
the `## Decode` (`## Decode on GPU`) section of docs/benchmarks.md through tools/bench_decode_report.py;
``--quick``, ``--no-docs`` and ``--model`` runs write nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

from bench_common import bf16_words, command_line, cpu_name, finish, load_avg, median, save_json, versions
from bench_decode_report import FUSED_ROW, REFERENCE, ROWS, json_path, redraw, table, target_lines, targets, write_docs
from bench_step import ensure_outputs, load_model, models_for, paired_ratio_stats
from bench_step_report import FORCED_KERNELS, LAYOUTS

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
WARMUP_TOKENS = 2


class BadInput(Exception):
    """A problem with the command line or the models it names: one line, exit 2."""


# ----------------------------------------------------------------------------- timing one generate

def make_clock(sync):
    """A LogitsProcessor that only takes timestamps: one per forward pass, as its logits arrive."""
    from transformers import LogitsProcessor

    class Clock(LogitsProcessor):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            sync()
            self.stamps.append(time.perf_counter())
            return scores

    return Clock()


def pad_id(model) -> int:
    gc_ = model.generation_config
    for value in (gc_.pad_token_id, gc_.eos_token_id, model.config.eos_token_id):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def compile_config(device_type: str):
    """What ``--compile`` hands generate: a static KV cache and the decode step compiled whole (``fullgraph``:
    a graph break in any model, the memory layer's included, is an error rather than a silent slow path), for
    the one shape a run uses (``dynamic=False``). On CUDA in "reduce-overhead" mode (CUDA graphs: generate's
    own default), on CPU in inductor's default mode, which generate compiles only when told to."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if device_type == "cuda" else "default")
    if device_type != "cuda":
        config._compile_all_devices = True  # generate's own switch for compiling off a GPU
    return config


def allow_compiles() -> None:
    """Each model, batch and dtype compiles its own decode graph: more than dynamo's default 8 per function.
    Past the raised limit it fails rather than fall back to eager steps in the middle of a timed run."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def generate(model, ids, new_tokens: int, sync, compiled=None) -> dict:
    """One greedy generate of exactly ``new_tokens`` per row: its prefill and decode times. ``compiled``:
    compile_config's answer (a static cache and a compiled decode step), or None (generate's defaults)."""
    import torch
    from transformers import LogitsProcessorList

    clock = make_clock(sync)
    batch, prompt = ids.shape
    extra = {} if compiled is None else {"cache_implementation": "static", "compile_config": compiled}
    sync()
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, use_cache=True, logits_processor=LogitsProcessorList([clock]),
                         pad_token_id=pad_id(model), **extra)
    sync()
    t_end = time.perf_counter()
    stamps = clock.stamps
    made = out[:, prompt:]
    if len(stamps) != new_tokens or tuple(made.shape) != (batch, new_tokens):
        raise RuntimeError(f"generate made {tuple(made.shape)} new tokens in {len(stamps)} forward passes, "
                           f"not ({batch}, {new_tokens}) in {new_tokens}")
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"prefill_s": stamps[0] - t0, "decode_s": stamps[-1] - stamps[0], "total_s": t_end - t0,
            "step_median_s": median(steps) if steps else 0.0, "new_tokens": int(made.numel())}


# ----------------------------------------------------------------------------- models

def load(path: Path, dtype: str, device, random_init: bool, kernels: str | None = None):
    """One model on ``device`` in ``dtype``, ready to generate; returns (model, memory-layer backend).
    ``kernels``: what its memory layers are told to run (HMLConfig.kernels), else their own setting."""
    import torch

    from midus_surgery.model import hml

    model = load_model(path, random_init)  # float32, as bench_step loads it (strict: every tensor present)
    model = model.to(device=device, dtype=getattr(torch, DTYPES[dtype])).eval()
    if kernels is not None:
        hml.use_kernels(model, kernels)
    return model, hml.prepare_kernels(model, device)


def inserted_blocks(model, path: Path, anatomy_from: Path | None) -> tuple[list, dict]:
    """(the inserted decoder layers, the block anatomy) of an output, from its midus_plan.json; the anatomy of
    a copy-only DUS apply is read from the MIDUS output of the same base, as bench_step does."""
    from midus_surgery.train.params import inserted_layers

    plan = json.loads((Path(path) / "midus_plan.json").read_text())
    layers_path, inserted = inserted_layers(plan, [n for n, _ in model.named_parameters()])
    anatomy = plan.get("anatomy")
    if not anatomy and anatomy_from is not None:
        anatomy = json.loads((Path(anatomy_from) / "midus_plan.json").read_text())["anatomy"]
    layers = model.get_submodule(layers_path)
    return [layers[i] for i in inserted], anatomy


# ----------------------------------------------------------------------------- the profile

class CallTimer:
    """Forward hooks that time every call of a module whose input holds one token per row (a decode step)."""

    def __init__(self, sync):
        self.sync, self.times, self.handles = sync, {}, []

    def watch(self, label: str, module) -> None:
        starts = []
        self.times.setdefault(label, [])

        def first_tensor(args, kwargs):
            import torch

            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor):
                    return a
            return None

        def pre(mod, args, kwargs):
            x = first_tensor(args, kwargs)
            decode = x is not None and x.dim() >= 2 and x.shape[-2] == 1  # [batch, 1 token, hidden]
            self.sync()
            starts.append(time.perf_counter() if decode else None)

        def post(mod, args, kwargs, out):
            self.sync()
            t0 = starts.pop()
            if t0 is not None:
                self.times[label].append(time.perf_counter() - t0)

        self.handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                         module.register_forward_hook(post, with_kwargs=True)]

    def remove(self) -> dict:
        for h in self.handles:
            h.remove()
        return {label: (median(ts) * 1e6 if ts else None) for label, ts in self.times.items()}


class Regions:
    """A named torch.profiler range (record_function) around every decode-step call of some modules."""

    def __init__(self, label: str, modules, tokens_at: int):
        import torch

        self.handles, open_ = [], []

        def pre(mod, args):
            decode = args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2 and args[0].shape[tokens_at] == 1
            rf = torch.autograd.profiler.record_function(label) if decode else None
            if rf is not None:
                rf.__enter__()
            open_.append(rf)

        def post(mod, args, out):
            rf = open_.pop()
            if rf is not None:
                rf.__exit__(None, None, None)

        for m in modules:
            self.handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def op_breakdown(prof, label: str, device_type: str) -> list[dict]:
    """Per operator inside the ``label`` ranges: the median over the ranges (calls) of its self time in one call
    (0 where a call did not run it) and of its count; the range's own self time is the Python between operators."""
    per_call = []
    for e in prof.events():
        if e.name != label:
            continue
        acc: dict[str, list[float]] = {}
        stack = [e]
        while stack:
            ev = stack.pop()
            t = ev.self_device_time_total if device_type == "cuda" and ev is not e else ev.self_cpu_time_total
            a = acc.setdefault("(Python between the operators)" if ev is e else ev.name, [0.0, 0])
            a[0] += t
            a[1] += 1
            stack.extend(ev.cpu_children)
        per_call.append(acc)
    names = dict.fromkeys(n for acc in per_call for n in acc)
    ops = [{"name": n, "self_us": median([acc.get(n, [0.0, 0])[0] for acc in per_call]),
            "count": median([acc.get(n, [0.0, 0])[1] for acc in per_call])} for n in names]
    total = median([sum(v[0] for v in acc.values()) for acc in per_call]) if per_call else 0.0
    return sorted(ops, key=lambda o: -o["self_us"]), len(per_call), total


def profile_setting(loaded: dict, paths: dict, ids, new_tokens: int, sync, device, reps: int = 3) -> dict:
    """The inserted blocks of DUS and MIDUS at decode, per call, and the operators of the FFN and of the memory
    layer in the model (T = batch tokens per call); then the memory layer alone, on queries a decode step gave it."""
    import torch

    out = {}
    anatomy_from = paths.get("MIDUS")
    parts = {}
    for name, prefix in ((REFERENCE, "dus"), ("MIDUS", "midus")):
        model = loaded[name][0]
        blocks, anatomy = inserted_blocks(model, paths[name], anatomy_from)
        ffns = [block.get_submodule(anatomy["ffn"][-1]) for block in blocks]
        parts[prefix] = (model, blocks, ffns, anatomy)
    # per-call wall time, hooks on (reps generates each, DUS and MIDUS interleaved)
    timers = {}
    for prefix, (model, blocks, ffns, anatomy) in parts.items():
        timers[prefix] = timer = CallTimer(sync)
        for block, ffn in zip(blocks, ffns):
            timer.watch("block", block)
            if prefix == "dus":
                timer.watch("ffn", ffn)
                timer.watch("o_proj", block.get_submodule(anatomy["attn_out_proj"]))
            else:
                timer.watch("readout", ffn)
    for _ in range(reps):
        for prefix, (model, *_) in parts.items():
            generate(model, ids, new_tokens, sync)
    for prefix, timer in timers.items():
        for label, us in timer.remove().items():
            out[f"{prefix}_{label}_us"] = us
    # the operators, in the model: one profiled generate each
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    queries = []
    for prefix, (model, blocks, ffns, anatomy) in parts.items():
        if prefix == "dus":
            label, modules, tokens_at = "dus.ffn", ffns, -2  # [batch, tokens, hidden]
        else:
            modules = [ffn.hml for ffn in ffns]
            heads = modules[0].config.query_source == "heads"
            label, tokens_at = "midus.memory_layer", (-3 if heads else -2)  # [batch, tokens, H, d_h] or [batch, tokens, hidden]

            def keep(mod, args):
                if args[0].shape[tokens_at] == 1 and not queries:
                    queries.append(args[0].detach().clone())
            grab = modules[0].register_forward_pre_hook(keep)
        regions = Regions(label, modules, tokens_at)
        with torch.profiler.profile(activities=activities) as prof:
            generate(model, ids, new_tokens, sync)
        regions.remove()
        if prefix == "midus":
            grab.remove()
        ops, calls, total = op_breakdown(prof, label, device.type)
        out[f"{prefix}_ops"], out[f"{prefix}_profiled_calls"], out[f"{prefix}_profiled_us"] = ops, calls, total
    # the memory layer alone, called back to back (its tables hot in cache)
    if queries:
        layer, q = parts["midus"][2][0].hml, queries[0]
        for _ in range(10):
            layer(q)
        ts = []
        for _ in range(200):
            sync()
            t0 = time.perf_counter()
            layer(q)
            sync()
            ts.append(time.perf_counter() - t0)
        out["hml_alone_us"] = median(ts) * 1e6
        out["hml_queries_shape"] = list(q.shape)
    return out


# ----------------------------------------------------------------------------- the compiled step's anatomy

class CudaGraphWatch:
    """What inductor did about CUDA graphs while a model compiled: how many graphs it left out of CUDA graphs
    (``cudagraph_skips``), how many pieces it cut a graph into around operators a graph cannot hold
    (``cudagraph_partitions``: each cut is a return to eager launches mid-step), and its own words why (the
    ``cudagraphs`` log, at debug level, kept here instead of printed). On an H200 a compiled Memory block's step
    cost 2.3x a plain block's, more than its memory read alone (docs/benchmarks.md): a cut in every Memory block
    would explain it, and this says whether there is one. On a CPU inductor makes no CUDA graphs: all zero."""

    KEYS = ("cudagraph_skips", "cudagraph_partitions")
    NOTES = 20  # the log's lines kept per model: the reasons, not every node

    def __enter__(self):
        import logging

        from torch._dynamo.utils import counters

        self.before = {k: counters["inductor"][k] for k in self.KEYS}
        self.lines: list[str] = []
        watch = self

        class Keep(logging.Handler):
            def emit(self, record):
                if len(watch.lines) < 200:
                    watch.lines.append(record.getMessage().strip())

        self.handler, self.loggers = Keep(level=logging.DEBUG), []
        for name in self._logger_names():
            logger = logging.getLogger(name)
            self.loggers.append((logger, logger.level))
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self.handler)
        return self

    @staticmethod
    def _logger_names() -> list[str]:
        # torch's artifact loggers are named "<module>.__<artifact>"; the registry is private, hence the fallback
        try:
            from torch._logging._internal import log_registry

            names = [n for n in log_registry.get_artifact_log_qnames() if n.endswith(".__cudagraphs")]
        except Exception:  # noqa: BLE001 - a torch without the registry: the two modules that say why
            names = []
        return names or ["torch._inductor.cudagraph_utils.__cudagraphs", "torch._inductor.scheduler.__cudagraphs"]

    def __exit__(self, *exc):
        from torch._dynamo.utils import counters

        for logger, level in self.loggers:
            logger.removeHandler(self.handler)
            logger.setLevel(level)
        self.result = {k: counters["inductor"][k] - self.before[k] for k in self.KEYS}
        why = [line for line in dict.fromkeys(self.lines)
               if any(w in line for w in ("skipping", "partition", "reason=", "non-cudagraphable"))]
        self.result["cudagraph_notes"] = why[:self.NOTES]
        return False


def kernel_profile(model, ids, new_tokens: int, sync, device, compiled, top: int = 15) -> dict:
    """One more compiled generate under torch.profiler: what ran on the device (CUDA kernels; on a CPU the
    operators), how many and for how long in all, beside the generate's wall time, and the ``top`` of them by
    time. The prefill is in it too (one pass against N - 1 decode steps). Device time far under the wall time
    says the step waits on the host (launches, an eager piece between graphs), not on kernels."""
    import torch

    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        res = generate(model, ids, new_tokens, sync, compiled)
    on_device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    rows = []
    for e in prof.key_averages():
        if e.device_type != on_device:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0 or cuda:
            rows.append({"name": e.key, "count": int(e.count), "us": float(us)})
    rows.sort(key=lambda r: -r["us"])
    return {"what": "CUDA kernels" if cuda else "CPU operators (self time)", "launched": sum(r["count"] for r in rows),
            "device_ms": sum(r["us"] for r in rows) / 1e3, "wall_ms": res["total_s"] * 1e3,
            "decode_ms": res["decode_s"] * 1e3, "top": rows[:top], "all": {r["name"]: [r["count"], r["us"]] for r in rows}}


# ----------------------------------------------------------------------------- the rounds

def bench(models: dict[str, Path], dtypes: list[str], batches: list[int], prompt: int, new_tokens: int, rounds: int,
          device: str, random_init: bool, log, profile: bool = False, compile: bool = False) -> tuple[list[dict], list[dict], dict]:
    """Rows (one per dtype, batch and model), profiles (--profile) and the memory layer's backend per model.
    ``compile``: every generate on a static cache with its decode step compiled (compile_config); a graph
    compiled during the timed rounds is an error. Returns also, for ``compile``, the graphs compiled before each
    setting's rounds."""
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    compiled = compile_config(dev.type) if compile else None
    if compile:
        allow_compiles()
    rows, profiles, backends, compiles = [], [], {}, []
    for dtype in dtypes:
        loaded = {}
        for name, path in models.items():
            t0 = time.perf_counter()
            loaded[name] = load(path, dtype, dev, random_init, FORCED_KERNELS.get(name))
            backends[name] = loaded[name][1]
            log(f"  loaded {name} ({dtype}, memory layer: {loaded[name][1]}) in {time.perf_counter() - t0:.1f} s")
        vocab = min(m.get_input_embeddings().weight.shape[0] for m, _ in loaded.values())
        for batch in batches:
            ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(dev)
            cudagraphs: dict[str, dict] = {}
            for name, (model, _) in loaded.items():
                if compiled is None:
                    with torch.inference_mode():
                        generate(model, ids, WARMUP_TOKENS, sync)
                    continue
                # As timed (outside inference mode, which the graphs' guards would tell apart), at the timed length
                # (the static cache's size is part of the graph), twice: the first compiles, the second records
                # the CUDA graphs.
                t1 = time.perf_counter()
                with CudaGraphWatch() as watch:
                    for _ in range(2):
                        generate(model, ids, new_tokens, sync, compiled)
                cudagraphs[name] = watch.result
                log(f"  compiled {name} ({dtype}, batch {batch}) in {time.perf_counter() - t1:.0f} s"
                    + (f"; CUDA graphs: {watch.result['cudagraph_skips']} skipped, {watch.result['cudagraph_partitions']} "
                       "partition(s)" if dev.type == "cuda" else ""))
            graphs = graphs_compiled()
            results: dict[str, list[dict]] = {name: [] for name in loaded}
            order = list(loaded)
            for r in range(rounds):
                k = r % len(order)
                t0 = time.perf_counter()
                for name in order[k:] + order[:k]:
                    res = generate(loaded[name][0], ids, new_tokens, sync, compiled)
                    res["load1"] = round(os.getloadavg()[0], 2)
                    results[name].append(res)
                log(f"  [{dtype} batch {batch} round {r + 1}/{rounds}] " + ", ".join(
                    f"{name} {batch * (new_tokens - 1) / rs[-1]['decode_s']:.1f} tok/s" for name, rs in results.items())
                    + f"  [{time.perf_counter() - t0:.0f} s]  load {load_avg()}")
            if compiled is not None:
                if graphs_compiled() != graphs:  # a timed step paid for a compile: the rounds mean nothing
                    raise RuntimeError(f"{dtype} batch {batch}: {graphs_compiled() - graphs} graph(s) compiled during the "
                                       "timed rounds, after the warm-up")
                compiles.append({"dtype": dtype, "batch": batch, "graphs_so_far": graphs, "cudagraphs": cudagraphs})
            for name, rs in results.items():
                model = loaded[name][0]
                rows.append(summarise(name, dtype, batch, prompt, new_tokens, rs, sum(p.numel() for p in model.parameters()),
                                      loaded[name][1]))
            if profile and compiled is not None:  # the compiled step has no eager blocks to hook: its kernels
                kernels = {name: kernel_profile(m, ids, new_tokens, sync, dev, compiled) for name, (m, _) in loaded.items()}
                if graphs_compiled() != graphs:
                    raise RuntimeError(f"{dtype} batch {batch}: the profiled generates compiled a graph")
                profiles.append({"dtype": dtype, "batch": batch, "compiled": True, "models": kernels})
                log(f"  [{dtype} batch {batch} profile] " + ", ".join(
                    f"{name} {k['launched']} launched, {k['device_ms']:.1f} ms on the device of {k['wall_ms']:.1f} ms"
                    for name, k in kernels.items()))
            elif profile and REFERENCE in loaded and "MIDUS" in loaded:
                with torch.inference_mode():
                    p = profile_setting(loaded, models, ids, new_tokens, sync, dev)
                profiles.append({"dtype": dtype, "batch": batch, **p})
                log(f"  [{dtype} batch {batch} profile] DUS block {p.get('dus_block_us') or 0:.0f} us (FFN "
                    f"{p.get('dus_ffn_us') or 0:.0f}), MIDUS block {p.get('midus_block_us') or 0:.0f} us (readout "
                    f"{p.get('midus_readout_us') or 0:.0f}, layer alone {p.get('hml_alone_us') or 0:.0f})")
        del loaded
        gc.collect()
    add_ratios(rows)
    return rows, profiles, backends, compiles


def summarise(name: str, dtype: str, batch: int, prompt: int, new_tokens: int, rs: list[dict], params: int, backend: str) -> dict:
    steps = new_tokens - 1
    tps = [batch * steps / r["decode_s"] for r in rs]
    return {
        "model": name, "dtype": dtype, "batch": batch, "prompt_tokens": prompt, "new_tokens_per_row": new_tokens,
        "new_tokens": batch * new_tokens, "new_tokens_per_round": [r["new_tokens"] for r in rs],
        "params": params, "hml_backend": backend,
        "prefill_ms": median([r["prefill_s"] for r in rs]) * 1e3,
        "decode_ms_per_step": median([r["decode_s"] / steps for r in rs]) * 1e3,
        "decode_tokens_per_s": median(tps),
        "step_median_ms": median([r["step_median_s"] for r in rs]) * 1e3,
        "total_ms": median([r["total_s"] for r in rs]) * 1e3,
        "tokens_per_s_per_round": tps, "step_median_s_per_round": [r["step_median_s"] for r in rs],
        "prefill_s_per_round": [r["prefill_s"] for r in rs],
        "load_avg_1min": [r["load1"] for r in rs],
    }


def add_ratios(rows: list[dict]) -> None:
    """Per-round ratios to DUS of the same dtype and batch (the rounds pair them by index), of two speeds:
    ``tps``: decode tokens/s over the whole decode (a burst of the neighbours' load inside one generate moves it);
    ``step``: the generate's median decode step, inverted (the same speed, blind to bursts shorter than half the
    steps: what the target is judged on)."""
    for row in rows:
        ref = next((r for r in rows if r["model"] == REFERENCE and (r["dtype"], r["batch"]) == (row["dtype"], row["batch"])), None)
        if ref is None:
            continue
        for key, mine, theirs in (("tps", row["tokens_per_s_per_round"], ref["tokens_per_s_per_round"]),
                                  ("step", ref["step_median_s_per_round"], row["step_median_s_per_round"])):
            stats = paired_ratio_stats(mine, theirs)
            row.update({f"{key}_vs_dus": stats["paired_vs_dus"], f"{key}_vs_dus_q1": stats["paired_vs_dus_q1"],
                        f"{key}_vs_dus_q3": stats["paired_vs_dus_q3"]})
        row["paired_rounds"] = len(row["tokens_per_s_per_round"])
        row["prefill_vs_dus"] = paired_ratio_stats(row["prefill_s_per_round"], ref["prefill_s_per_round"])["paired_vs_dus"]


# ----------------------------------------------------------------------------- the command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(what: str, least: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: not a whole number: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{what}: must be at least {least}, got {value}")
        return value
    return parse


def parse_batches(text: str) -> list[int]:
    parse = positive_int("batch")
    out = [parse(x.strip()) for x in text.split(",")]
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"--batches repeats a size: {text!r}")
    return out


def parse_dtypes(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",")]
    bad = [x for x in out if x not in DTYPES]
    if bad or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"--dtypes: want a comma-separated list of {', '.join(DTYPES)}, got {text!r}")
    return out


def parse_model(text: str) -> tuple[str, Path]:
    name, eq, path = text.partition("=")
    if not eq or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"--model wants NAME=DIR, got {text!r}")
    return name.strip(), Path(path.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="bench_decode.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run in under a minute: prompt 16, 8 new tokens, 2 rounds "
                    "(unless given); never writes the docs")
    ap.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    ap.add_argument("--no-docs", action="store_true", help="write neither docs/benchmarks.md nor the JSON under docs/results/")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models run (default cpu)")
    ap.add_argument("--random-init", action="store_true", help="random weights from each model's config.json instead of "
                    "loading them (a GPU machine without the SmolLM2 files; decode time does not depend on the values)")
    ap.add_argument("--layout", choices=list(LAYOUTS), default="every5",
                    help="every5: the bundled recipes (6 inserted blocks, 30 -> 36); every2: the paper's proportion "
                         "(15 of 45); llama1b-every2: an 8-layer Llama-3.2-1B-shaped base (see tools/bench_step.py); default every5")
    ap.add_argument("--model", dest="models", type=parse_model, action="append", metavar="NAME=DIR",
                    help="time these model directories instead of the layout's (repeatable; ratios against the one named "
                         "DUS; writes no docs)")
    ap.add_argument("--batches", type=parse_batches, default=[1, 16], help="comma-separated batch sizes (default 1,16)")
    ap.add_argument("--dtypes", type=parse_dtypes, default=["fp32"], help="comma-separated: fp32, bf16 (weights cast to it; default fp32)")
    ap.add_argument("--prompt-tokens", type=positive_int("--prompt-tokens"), default=None, help="prompt length P (default 128; 16 with --quick)")
    ap.add_argument("--new-tokens", type=positive_int("--new-tokens", 2), default=None,
                    help="new tokens N per row (default 32; 8 with --quick); N - 1 decode steps are timed")
    ap.add_argument("--rounds", type=positive_int("--rounds"), default=None, help="paired rounds per dtype and batch (default 12; 2 with --quick)")
    ap.add_argument("--threads", type=positive_int("--threads"), default=None,
                    help="torch CPU threads (torch.set_num_threads; default: torch's, one per core); a run with it has its own "
                         "section and JSON (`..., 1 torch thread`)")
    ap.add_argument("--profile", action="store_true", help="also profile the inserted blocks of DUS and MIDUS at decode, "
                    "and the memory layer's operators (one more generate per model and setting); with --compile, every "
                    "model's kernels in one more compiled generate")
    ap.add_argument("--compile", action="store_true", help="generate on a static KV cache with the decode step compiled "
                    "whole (torch.compile through generate's compile_config; CUDA graphs on a GPU); its own section and JSON")
    ap.add_argument("--from-json", metavar="RESULTS_JSON", help="only rewrite the docs section from the --json output of an "
                    "earlier run (e.g. one on a GPU machine); the same as tools/bench_decode_report.py --from-json")
    return ap


def resolve_models(args, log) -> tuple[dict[str, Path], dict | None]:
    """Row name -> model directory (the layout's, applied first if missing, or --model's)."""
    if args.models:
        models = dict(args.models)
        if len(models) != len(args.models):
            raise BadInput("--model: a NAME is given twice")
        for name, path in models.items():
            if not (path / "config.json").is_file():
                raise BadInput(f"--model {name}={path}: not a model directory (no config.json)")
        return models, {name: str(path) for name, path in models.items()}
    base = LAYOUTS[args.layout]["base"]
    if "random_base_from" not in LAYOUTS[args.layout] and not (base / "config.json").is_file():
        raise BadInput(f"missing base model {base}: run `python tools/fetch_smollm2.py` first")
    ensure_outputs(log, args.random_init, args.layout)
    every = models_for(args.layout)
    # On a GPU the decode is bound by per-operator overhead, eager or in a CUDA graph (on an H200, 2026-12-04, a
    # compiled Memory block's step cost 2.3x a plain block's): the fused read (one kernel for the scores, selection,
    # softmax and pooled gather, where the default path launches about ten) is timed beside it.
    fused = (FUSED_ROW,) if args.device == "cuda" else ()
    return {name: every[name] for name in ROWS + fused}, None


def run(args, argv) -> int:
    if args.from_json:
        source = Path(args.from_json)
        try:
            json.loads(source.read_text())
        except (OSError, ValueError) as exc:
            raise BadInput(f"--from-json {source}: cannot read a run's JSON ({type(exc).__name__}: {exc})") from None
        return redraw(source)
    if args.quick:
        args.prompt_tokens = args.prompt_tokens or 16
        args.new_tokens = args.new_tokens or 8
        args.rounds = args.rounds or 2
    prompt, new_tokens, rounds = args.prompt_tokens or 128, args.new_tokens or 32, args.rounds or 12
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise BadInput("--device cuda, but torch sees no CUDA device")
        machine = f"{torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores"
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} CPU cores, " + bf16_words()
    models, custom = resolve_models(args, log)
    from midus_surgery.errors import MidusError
    from midus_surgery.model.hml import backend_words

    load_start = load_avg()
    t0 = time.perf_counter()
    try:
        rows, profiles, backends, compiles = bench(models, args.dtypes, args.batches, prompt, new_tokens, rounds, args.device,
                                         args.random_init, log, args.profile, args.compile)
    except MidusError as exc:  # a model directory that does not load: one line
        raise BadInput(str(exc).splitlines()[0]) from None
    # the MIDUS row's memory layer; the fused row says its own in the section's notes
    memory = sorted({b for name, b in backends.items() if b != "torch" and name != FUSED_ROW} or {"torch"})
    payload = {
        "tool": "bench_decode", "device": args.device, "layout": args.layout, "machine": machine, "random_init": args.random_init,
        "threads": torch.get_num_threads(), "threads_set": args.threads, "compiled": args.compile, "versions": versions(),
        "load_avg_start": load_start, "load_avg_end": load_avg(), "command": command_line("tools/bench_decode.py", argv),
        "prompt_tokens": prompt, "new_tokens": new_tokens, "rounds": rounds, "batches": args.batches, "dtypes": args.dtypes,
        "hml_backend": "+".join(memory), "hml_backend_words": " + ".join(backend_words(b) for b in memory),
        "rows": rows, "targets": targets(rows), "wall_s": time.perf_counter() - t0,
    }
    if profiles:
        payload["profile"] = profiles
    if compiles:
        payload["compiles"] = compiles  # graphs compiled before each setting's timed rounds (none during them)
    if custom:
        payload["custom_models"] = custom
        args.no_docs = True  # not the layout's rows: never in its section
    finish(args, payload, lambda p: write_docs(p, save_json(json_path(p), p)),
           f"{table(rows)}\n\n" + "\n".join(target_lines(payload["targets"]))
           + f"\n\nmemory layer: {payload['hml_backend_words']}; load average start {load_start}, end {payload['load_avg_end']}; "
             f"{payload['wall_s']:.0f} s")
    return 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument (its one line is printed): the exit code
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return run(args, argv)
    except BadInput as exc:
        print(f"bench_decode.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
