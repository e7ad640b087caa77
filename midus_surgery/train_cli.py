"""CLI wiring for `midus-surgery train` and `midus-surgery eval`."""

from __future__ import annotations

import json
import sys


def cmd_train(args) -> int:
    from .train_config import config_reference_markdown, load_train_config

    if args.keys:
        sys.stdout.write(config_reference_markdown())
        return 0
    if not args.config:
        from .errors import MidusError

        raise MidusError("train needs a config file (see `midus-surgery train --keys` for every key)")
    loaded = load_train_config(args.config, [*args.overrides, *(["log.progress=false"] if args.quiet else [])])
    from .trainer import train

    result = train(loaded)
    if not result.is_main:
        return 0
    final = result.final_eval or {}
    ppl = f", held-out ppl {final['eval_ppl']:.3f}" if final else ""
    print(f"done: {result.steps} steps, {result.tokens:,} tokens{ppl}; model in {result.export_dir}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import run_eval

    result = run_eval(args.model, args.data, block_size=args.block_size, per_document=args.per_document,
                      batch_size=args.batch_size, max_blocks=args.max_blocks, dtype=args.dtype, text_field=args.text_field,
                      cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code,
                      progress=not (args.quiet or args.json), threads=args.threads, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']}: perplexity {result['perplexity']:.4f} (loss {result['loss']:.4f} nats/token) over "
              f"{result['tokens']:,} predicted tokens in {result['sequences']} {result['mode']} of <= {result['block_size']} tokens; "
              f"{result['tokens_per_s']:,.0f} tokens/s ({result['dtype']} on {result['device']}, {result['seconds']:.1f} s)")
    return 0


def add_commands(subparsers) -> None:
    """Register the train/eval subcommands on the main parser's subparsers."""
    p = subparsers.add_parser("train", help="continued pre-training of a model directory from a YAML config (accelerate)",
                              description="Train from a YAML config. Any key can be overridden: `midus-surgery train run.yaml optim.lr=1e-4 freeze=base`. "
                                          "Several processes or GPUs: `accelerate launch [--num_processes N] -m midus_surgery.cli train run.yaml`.")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="the training config (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides, values read as YAML (e.g. optim.lr=3e-4 data.block_size=256)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--keys", action="store_true", help="print every config key with its default and meaning (Markdown), then exit")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="held-out perplexity and tokens/s of any causal LM directory")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files, directories, globs, JSONL, or a token cache directory")
    p.add_argument("--block-size", type=int, default=512, help="tokens per block / window (default 512)")
    p.add_argument("--per-document", action="store_true", help="evaluate each document on its own (windows of --block-size) instead of packed blocks")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--max-blocks", type=int, default=None, help="evaluate at most this many blocks / windows")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype to run the model in (default float32)")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: $MIDUS_CACHE/tokens or ~/.cache/midus-surgery/tokens)")
    p.add_argument("--device", default="auto", help="auto (default: the first CUDA device when there is one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model directory's own modeling code")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
