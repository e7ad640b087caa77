"""The continued pre-training (CPT) runner, on accelerate.

One process on CPU by default; ``accelerate launch`` for several processes or GPUs (DDP, or
FSDP through an accelerate config). The loop is nanoGPT-shaped and explicit:

    for each optimiser step:
        for each of grad_accum micro-batches (no gradient sync but on the last):
            blocks = sampler(samples_seen, rank, micro)      # pure function of (seed, position)
            loss = model(blocks, labels=blocks).loss / grad_accum; backward
        loss must be finite on every process, else stop (the last checkpoint stays good)
        clip base and memory gradients separately; AdamW step; schedule step
        log / evaluate / checkpoint (temp dir + rename, keep-last-N)
    export the final model directory (temp dir + rename)

A checkpoint holds the model, the optimiser, the scheduler, every process's RNG state and the
data position (``samples_seen``), so a run killed at any moment and resumed from its newest
complete checkpoint ends with exactly the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from midus_surgery.errors import RecipeError, TrainingError
from midus_surgery.io.output_dir import OutputError, atomic_directory, check_output_dir, input_root, read_marker, write_marker
from midus_surgery.model import copy_modeling_files
from midus_surgery.train import data as D
from midus_surgery.train.checkpoint import (
    LEGACY_SCHEDULER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    complete_checkpoints,
    first_unreadable_file,
    legacy_rng_file,
    load_error_line,
    load_legacy_rng_state,
    load_rng_state,
    read_checkpoint_state,
    rng_file,
    save_rng_state,
    scheduler_state,
    verify_checkpoint,
    weights_checksum,
)
from midus_surgery.train.config import LoadedTrainConfig
from midus_surgery.train.evaluate import DTYPES, block_batches, evaluate_batches, load_causal_lm, load_tokenizer
from midus_surgery.train.params import adamw_options, choose_params, describe_groups, lr_lambda, read_plan

RUN_KIND, EXPORT_KIND = "train run", "train export"  # output_dir markers: what train may write into / replace
NORM_LABELS = {"grad_norm": "gnorm", "memory_grad_norm": "mem gnorm"}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "midus_train.json"}


@dataclass
class TrainResult:
    run_dir: Path
    export_dir: Path | None
    steps: int
    tokens: int
    final_eval: dict | None
    tokens_per_s: float
    seconds_per_step: float
    is_main: bool = True


# --------------------------------------------------------------------------- the run

class Runner:
    def __init__(self, loaded: LoadedTrainConfig, *, echo=print):
        self.loaded, self.cfg, self.echo = loaded, loaded.config, echo

    def say(self, text: str) -> None:
        if self.acc.is_main_process:
            if self.bar is not None and not self.bar.disable and self.echo is print:
                self.bar.write(text)  # keeps the progress bar whole
            else:
                self.echo(text)
            sys.stdout.flush()

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        cfg, loaded = self.cfg, self.loaded
        import logging

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bar and log lines only
        logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "Removed shared tensor" for tied embeddings
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # in-process reruns (tests): a fresh state each time
            AcceleratorState._reset_state(reset_partial_state=True)
        on_cpu = not (hasattr(torch, "accelerator") and torch.accelerator.is_available()) and not torch.cuda.is_available()
        # cpu=True also makes several CPU processes (torchrun / accelerate launch --multi_gpu) use DDP over gloo.
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        self.precision = precision
        self.acc = Accelerator(cpu=on_cpu, mixed_precision="bf16" if precision == "bf16" else "no",
                               dynamo_backend="inductor" if cfg.compile else "no")
        self.bar = None
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.fsdp = self.acc.distributed_type.name == "FSDP"

        self.run_dir = loaded.resolve(cfg.run_dir).resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.export_dir = (loaded.resolve(cfg.export.dir) if cfg.export.dir else self.run_dir / "final").resolve()
        self.init_from = loaded.resolve(cfg.init_from).resolve()
        if not (self.init_from / "config.json").is_file():
            raise RecipeError([loaded.problem(("init_from",), f"{self.init_from} is not a model directory (no config.json)")])
        self.check_outputs()

        # Which state to start from.
        self.resume_from: Path | None = None
        existing = complete_checkpoints(self.ckpt_root)
        if cfg.resume is None:
            if existing:
                raise RecipeError([loaded.problem(("resume",), f"{self.ckpt_root} already holds checkpoints (newest: step {existing[-1][0]}); set resume: auto to continue that run, or choose another run_dir")])
        elif cfg.resume == "auto":
            self.resume_from = self.newest_whole_checkpoint(existing)
        else:
            path = loaded.resolve(cfg.resume).resolve()
            problem = f"no {STATE_FILE}" if not (path / STATE_FILE).is_file() else verify_checkpoint(path)
            if problem:
                raise RecipeError([loaded.problem(("resume",), f"{path} is not a complete checkpoint ({problem})")])
            self.resume_from = path
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if read_marker(self.run_dir) is None:
                write_marker(self.run_dir, RUN_KIND)
            self.ckpt_root.mkdir(exist_ok=True)
            for stale in self.ckpt_root.glob(".tmp-*"):  # a checkpoint a killed run was writing
                shutil.rmtree(stale, ignore_errors=True)
        self.acc.wait_for_everyone()
        set_seed(cfg.seed)

        # Data: tokenised once (by the main process; the others then open the cache).
        self.tokenizer = load_tokenizer(self.init_from, cfg.trust_remote_code)
        d = cfg.data
        cache = loaded.resolve(d.cache_dir) if d.cache_dir else D.default_cache_dir()
        progress = cfg.log.progress and self.acc.is_main_process
        with self.acc.main_process_first():
            train_stream = D.prepare_corpus(d.train, loaded.directory, self.tokenizer, dir_glob=d.dir_glob, text_field=d.text_field,
                                            cache_dir=cache, progress=progress, what="data.train", tokenizer_source=str(self.init_from))
            held_stream = None
            if d.held_out:
                held_stream = D.prepare_corpus(d.held_out, loaded.directory, self.tokenizer, dir_glob=d.dir_glob, text_field=d.text_field,
                                               cache_dir=cache, progress=progress, what="data.held_out", tokenizer_source=str(self.init_from))
        self.train_blocks, self.held_blocks = D.split(train_stream, held_stream, d.block_size, d.held_out_fraction, what="data.train")
        self.sampler = D.BlockSampler(self.train_blocks, cfg.seed)
        self.tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * self.world * d.block_size
        self.total_steps = D.steps_for(cfg.token_budget, self.tokens_per_step)
        self.data_identity = {"train": train_stream.path.name, "held_out": held_stream.path.name if held_stream else None,
                              "block_size": d.block_size, "seed": cfg.seed, "held_out_fraction": d.held_out_fraction if held_stream is None else None}

        # Model (fp32 master weights), freeze policy, optimiser groups.
        config_data = json.loads((self.init_from / "config.json").read_text())
        self.init_dtype = config_data.get("dtype") or config_data.get("torch_dtype") or "float32"
        self.is_midus = config_data.get("model_type") == "midus"
        model = load_causal_lm(self.init_from, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, progress=progress)
        vocab = model.get_input_embeddings().weight.shape[0]
        for s in (train_stream, held_stream):
            if s is not None and s.meta.get("max_token", -1) >= vocab:
                raise D.DataError(f"{s.path}: token id {s.meta['max_token']} is outside the model's vocabulary of {vocab} (tokenizer and model do not match)")
        model.config.use_cache = False
        self.plan = read_plan(self.init_from)
        self.groups = choose_params(model, cfg.freeze, self.plan, loaded)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()

        o, m = cfg.optim, cfg.memory
        param_groups, shapes = [], []
        if self.groups.decay:
            param_groups.append({"params": [p for _, p in self.groups.decay], "lr": o.lr, "weight_decay": o.weight_decay, "name": "base"})
            shapes.append(o.schedule)
        if self.groups.no_decay:
            param_groups.append({"params": [p for _, p in self.groups.no_decay], "lr": o.lr, "weight_decay": 0.0, "name": "base_no_decay"})
            shapes.append(o.schedule)
        if self.groups.memory:
            param_groups.append({"params": [p for _, p in self.groups.memory], "lr": m.lr, "weight_decay": m.weight_decay, "name": "memory"})
            shapes.append("constant" if m.schedule == "constant" else o.schedule)
        self.adamw_options = adamw_options(o.implementation, self.acc.device)
        try:
            optimizer = torch.optim.AdamW(param_groups, betas=tuple(o.betas), eps=o.eps, **self.adamw_options)
        except RuntimeError as exc:  # e.g. fused on a device torch has no fused AdamW for
            raise RecipeError([loaded.problem(("optim", "implementation"), f"AdamW cannot run {o.implementation!r} on {self.acc.device}: {exc}")]) from None
        self.warmup_steps = int(o.warmup) if o.warmup >= 1 else int(round(o.warmup * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_lambda(o, self.total_steps, self.warmup_steps, s) for s in shapes])
        if cfg.compile and self.is_midus and self.acc.device.type == "cpu":
            from midus_surgery.model.hml import prepare_cpu_kernels

            prepare_cpu_kernels()  # answered before compiling, the memory layer traces whole
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.raw = self.acc.unwrap_model(self.model)

    def check_outputs(self) -> None:
        """The output-safety rule (output_dir.py) for the run directory and the export, before any work.

        The run directory is written into (checkpoints, logs), never replaced: it must be new, empty
        or a run directory of this tool. The export replaces only an export this tool wrote.
        """
        cfg, loaded = self.cfg, self.loaded
        d = cfg.data
        inputs = [("init_from", self.init_from), ("the config file", Path(loaded.source.file))]
        inputs += [(f"data ({p})", input_root(loaded.resolve(p))) for p in [*d.train, *(d.held_out or [])]]
        inputs.append(("the token cache", loaded.resolve(d.cache_dir) if d.cache_dir else D.default_cache_dir()))
        folders = [("the config's folder", loaded.directory)]
        if read_marker(self.run_dir) is None and complete_checkpoints(self.ckpt_root):
            write_marker(self.run_dir, RUN_KIND)  # a run directory written before markers existed: its checkpoints say it is ours
        for field_name, path, kind, extra in (("run_dir", self.run_dir, RUN_KIND, []),
                                              (("export", "dir"), self.export_dir, EXPORT_KIND, [("the run directory", self.run_dir)])):
            try:
                check_output_dir(path, kind=kind, inputs=inputs, folders=folders + extra, replace_own=(kind,), flag=None)
            except OutputError as exc:
                where = field_name if isinstance(field_name, tuple) else (field_name,)
                raise RecipeError([loaded.problem(where, str(exc))]) from None

    # ---------------------------------------------------------------- pieces
    def evaluate(self) -> dict | None:
        if self.held_blocks is None:
            return None
        cfg = self.cfg
        n = len(self.held_blocks) if cfg.eval.max_blocks is None else min(len(self.held_blocks), cfg.eval.max_blocks)
        model = self.raw  # no collectives inside: ranks may see different numbers of batches
        if self.fsdp:  # sharded weights: every rank runs the wrapped model on the same number of batches
            model, n = self.model, n - n % self.world
            if n == 0:
                return None
        batches = block_batches(self.held_blocks, cfg.eval.batch_size or cfg.micro_batch_size, self.rank, self.world, n)
        result = evaluate_batches(model, batches, device=self.acc.device, autocast=self.acc.autocast,
                                  reduce=lambda t: self.acc.reduce(t, reduction="sum"))
        return {"eval_loss": result.loss, "eval_ppl": result.perplexity, "eval_tokens": result.tokens, "eval_seconds": round(result.seconds, 3)}

    def record(self, rec: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "tokens", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
                    self.tb.add_scalar(tag, v, rec["step"])
            self.tb.flush()

    def trace(self, rec: dict) -> None:
        if not self.cfg.log.data_trace:
            return
        d = self.run_dir / "trace"
        d.mkdir(exist_ok=True)
        with open(d / f"rank{self.rank}.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def newest_whole_checkpoint(self, existing: list[tuple[int, Path]]) -> Path | None:
        """``resume: auto``: the newest checkpoint that verifies. Newer ones that do not are said in one
        line each and moved aside (``step-N.broken``): kept for a look, out of the way of this run's
        own checkpoints and of pruning, which would otherwise keep them over good ones."""
        chosen, broken = None, []
        for _, path in reversed(existing):
            problem = verify_checkpoint(path)
            if problem is None:
                chosen = path
                break
            broken.append((path, problem))
        if broken and chosen is None:
            newest, problem = broken[0]
            raise RecipeError([self.loaded.problem(("resume",), f"no checkpoint in {self.ckpt_root} verifies (newest, {newest.name}: {problem}); "
                                                               "move them away to start afresh, or choose another run_dir")])
        self.acc.wait_for_everyone()  # every process has chosen before one is moved
        for path, problem in broken:
            aside = path.with_name(f"{path.name}.broken")
            if aside.exists():
                aside = path.with_name(f"{path.name}.broken-{uuid.uuid4().hex[:6]}")
            if self.acc.is_main_process:
                os.replace(path, aside)
            self.say(f"checkpoint {path.name} skipped: {problem}; moved to {aside.name}")
        return chosen

    def save_checkpoint(self, step: int, samples_seen: int) -> Path:
        final = self.ckpt_root / f"step-{step:08d}"
        tmp = self.ckpt_root / f".tmp-step-{step:08d}-{uuid.uuid4().hex[:6]}" if self.acc.is_main_process else None
        # All ranks need the same temp name: broadcast it through the file system-free path of accelerate.
        from accelerate.utils import broadcast_object_list

        holder = [str(tmp) if tmp else None]
        if self.world > 1:
            broadcast_object_list(holder)
        tmp = Path(holder[0])
        if self.acc.is_main_process:
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp), safe_serialization=True)  # model (safetensors), optimiser (pickle), RNG (pickle)
        # accelerate's RNG pickle is replaced by a safetensors file; every process writes its own
        (tmp / legacy_rng_file(self.rank)).unlink(missing_ok=True)
        save_rng_state(tmp / rng_file(self.rank))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / SCHEDULER_FILE).write_text(json.dumps(self.scheduler.state_dict()) + "\n")  # plain numbers, no pickle
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            state = {"step": step, "samples_seen": samples_seen, "tokens_seen": samples_seen * self.cfg.data.block_size,
                     "total_steps": self.total_steps, "world_size": self.world, "data": self.data_identity,
                     "config": self.cfg.model_dump(mode="json"), "time": time.time(), "files": files}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # last: marks the checkpoint complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in complete_checkpoints(self.ckpt_root)[:-self.cfg.checkpoint.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> dict:
        """Load a checkpoint that verified. Whatever still fails to load (a file corrupted without
        changing its size, say) is one ``TrainingError`` line naming the file, never a traceback;
        nothing in it is unpickled but with weights_only=True."""
        try:
            state = read_checkpoint_state(path)
        except ValueError as exc:
            raise TrainingError(f"cannot resume from {path}: {exc}") from None
        saved = state.get("data", {})
        changed = [k for k in ("train", "held_out", "block_size", "seed", "held_out_fraction") if saved.get(k) != self.data_identity.get(k)]
        if changed:
            raise TrainingError(f"cannot resume from {path}: the data changed since it was written ({', '.join(f'{k}: {saved.get(k)} -> {self.data_identity.get(k)}' for k in changed)}); resuming would replay or skip data. Use a new run_dir.")
        try:
            self.acc.load_state(str(path))  # accelerate reads its pickles with weights_only=True
        except Exception as exc:  # noqa: BLE001 - said as one line, naming the file that does not read
            files = list(state["files"]) if isinstance(state.get("files"), dict) else sorted(p.name for p in path.iterdir())
            raise TrainingError(f"cannot resume from {path}: {first_unreadable_file(path, files) or load_error_line(exc)}") from None
        # A loaded optimiser state brings the implementation it was saved with; the config decides.
        # The fused kernel also wants each parameter's step count as a float32 tensor beside it.
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for group in inner.param_groups:
            group.update({"fused": None, "foreach": None, **self.adamw_options})
            if group["fused"]:
                for p in group["params"]:
                    if "step" in inner.state.get(p, {}):
                        inner.state[p]["step"] = inner.state[p]["step"].to(p.device, torch.float32)
        name = SCHEDULER_FILE if (path / SCHEDULER_FILE).is_file() else LEGACY_SCHEDULER_FILE
        try:
            self.scheduler.load_state_dict(scheduler_state(path, self.scheduler.state_dict()))
        except Exception as exc:  # noqa: BLE001 - as above
            raise TrainingError(f"cannot resume from {path}: {name}: {load_error_line(exc)}") from None
        # This process's RNG state: ours (safetensors), or accelerate's pickle in older checkpoints,
        # which accelerate's load_state already tried but whose errors it only logs.
        name = rng_file(self.rank) if (path / rng_file(self.rank)).is_file() else legacy_rng_file(self.rank)
        if not (path / name).is_file() and self.rank >= state.get("world_size", 1):
            return state  # a process the saving run did not have: its RNG stays as seeded
        try:
            (load_rng_state if name == rng_file(self.rank) else load_legacy_rng_state)(path / name)
        except Exception as exc:  # noqa: BLE001 - as above
            raise TrainingError(f"cannot resume from {path}: {name}: {load_error_line(exc)}") from None
        return state

    def export(self, final_eval: dict | None, step: int, samples_seen: int) -> Path:
        state_dict = self.acc.get_state_dict(self.model)
        # torch.compile wraps the model: its keys carry an `_orig_mod.` prefix the export must not keep.
        state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
        out = self.export_dir
        if self.acc.is_main_process:
            dtype_name = self.init_dtype if self.cfg.export.dtype == "auto" else self.cfg.export.dtype
            dtype = DTYPES.get(str(dtype_name).replace("torch.", ""), torch.float32)
            state_dict = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
            with atomic_directory(out, kind=EXPORT_KIND, report=self.say) as tmp:
                old_dtype = self.raw.config.dtype
                self.raw.config.dtype = dtype
                self.raw.config.use_cache = True
                try:
                    self.raw.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                finally:
                    self.raw.config.dtype, self.raw.config.use_cache = old_dtype, False
                for src in self.init_from.iterdir():  # tokenizer, midus_plan.json, midus_recipe.yaml, card, templates
                    if src.is_file() and src.name not in SKIP_FILES and not src.name.endswith(WEIGHT_SUFFIXES) and not (tmp / src.name).exists():
                        shutil.copy2(src, tmp / src.name)
                if self.is_midus:
                    copy_modeling_files(tmp)
                summary = {"init_from": str(self.init_from), "steps": step, "tokens": samples_seen * self.cfg.data.block_size,
                           "held_out": final_eval, "config": self.cfg.model_dump(mode="json")}
                (tmp / "midus_train.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.acc.wait_for_everyone()
        return out

    def plot(self) -> None:
        if not (self.cfg.log.plot and self.acc.is_main_process):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
        held = [(r["tokens"], r["eval_loss"]) for r in recs if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1.2)
        if held:
            ax.plot(*zip(*held), "o-", label="held-out loss", lw=1.5)
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{self.init_from.name}: freeze={self.cfg.freeze}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss.png")
        plt.close(fig)

    # ---------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        self.setup()
        cfg, acc = self.cfg, self.acc
        step, samples_seen = 0, 0
        if self.resume_from is not None:
            state = self.load_checkpoint(self.resume_from)
            step, samples_seen = int(state["step"]), int(state["samples_seen"])
        self.tb = None
        if acc.is_main_process:
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists():  # drop what a killed run logged after its last checkpoint
                keep = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
                metrics.write_text("".join(line + "\n" for line in keep) if self.resume_from is not None else "")
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step if step else None)
        where = f"resuming from {self.resume_from} (step {step})" if self.resume_from else "starting fresh"
        self.say(f"train: {self.init_from} -> {self.export_dir}; {where}")
        self.say(f"data: {len(self.train_blocks)} train blocks, {len(self.held_blocks) if self.held_blocks else 0} held-out blocks of {cfg.data.block_size} tokens "
                 f"({len(self.train_blocks) * cfg.data.block_size / 1e6:.2f}M train tokens); budget {cfg.token_budget:,} tokens = {self.total_steps} steps of "
                 f"{self.tokens_per_step:,} ({cfg.micro_batch_size} x {cfg.grad_accum} accum x {self.world} proc x {cfg.data.block_size}), "
                 f"{cfg.token_budget / max(1, len(self.train_blocks) * cfg.data.block_size):.2f} epochs")
        self.say(describe_groups(self.groups, cfg))
        mode = "single process" if self.world == 1 else f"{acc.distributed_type.name} ({acc.state.backend})"
        adamw = "fused" if self.adamw_options.get("fused") else {True: "foreach", False: "for-loop"}.get(self.adamw_options.get("foreach"), "torch's default")
        self.say(f"precision {self.precision}, {mode} on {acc.device} x {self.world}, AdamW {adamw}, warmup {self.warmup_steps} steps, {cfg.optim.schedule} decay")
        if self.is_midus:
            from midus_surgery.model.hml import kernel_path_name

            self.say(f"memory layer: {kernel_path_name(acc.device)} (MIDUS_HML_KERNELS=torch: the pure-torch path)")
        if cfg.compile:
            self.say("compile: the first step compiles the model (about 2 minutes for the 45-layer SmolLM2 outputs on an H200); "
                     "tok/s and ETA count from the second step")

        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (cfg.log.progress and acc.is_main_process))
        final_eval = None
        try:
            if step == 0 and cfg.eval.at_start and self.held_blocks is not None:
                ev = self.evaluate()
                if ev:
                    self.record({"step": 0, "tokens": 0, **ev})
                    self.say(f"step 0 | held-out loss {ev['eval_loss']:.4f} | ppl {ev['eval_ppl']:.2f}")
            trainable = [p for g in (self.groups.decay, self.groups.no_decay) for _, p in g]
            memory = [p for _, p in self.groups.memory]
            started = time.perf_counter()
            interval_t, interval_tokens, interval_losses = time.perf_counter(), 0, []
            rate_t, rate_step = started, step  # tok/s, s/step and ETA count from here
            compiling = cfg.compile  # the first step compiles: minutes that no later step costs
            while step < self.total_steps:
                losses = []
                picked = []
                for micro in range(cfg.grad_accum):
                    ids_np, blocks = self.sampler.micro_batch(samples_seen, self.rank, self.world, micro, cfg.micro_batch_size)
                    picked.extend(blocks)
                    ids = torch.as_tensor(ids_np, dtype=torch.long, device=acc.device)
                    sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(self.model)
                    with sync:
                        with acc.autocast():
                            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
                        # backward outside autocast (torch's advice): the ops' own backward dtypes follow the forward
                        acc.backward(loss / cfg.grad_accum)
                    losses.append(loss.detach().float())
                step_loss = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
                norms = {}
                for key, params, clip in (("grad_norm", trainable, cfg.optim.grad_clip), ("memory_grad_norm", memory, cfg.memory.grad_clip)):
                    if params:
                        n = acc.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
                        norms[key] = float(n) if n is not None else float("nan")
                bad = not math.isfinite(step_loss) or any(not math.isfinite(v) for v in norms.values())
                if bad:
                    last = complete_checkpoints(self.ckpt_root)
                    kept = f"the last good checkpoint is {last[-1][1]} (step {last[-1][0]}); resume from it with resume: auto after lowering optim.lr / memory.lr" if last else "no checkpoint was written yet (set checkpoint.every)"
                    what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                    raise TrainingError(f"non-finite {what} at step {step + 1} (loss {step_loss}, {', '.join(f'{k} {v:.3g}' for k, v in norms.items())}); stopped without updating the weights; {kept}")
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                samples_seen += cfg.micro_batch_size * cfg.grad_accum * self.world
                interval_tokens += self.tokens_per_step
                interval_losses.append(step_loss)
                self.trace({"step": step, "blocks": picked})
                self.bar.update(1)

                if step % cfg.log.every == 0 or step == self.total_steps:
                    now = time.perf_counter()
                    tps = interval_tokens / max(now - interval_t, 1e-9)
                    per_step = (now - rate_t) / max(1, step - rate_step)
                    eta = per_step * (self.total_steps - step)
                    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
                    rec = {"step": step, "tokens": samples_seen * cfg.data.block_size, "loss": float(np.mean(interval_losses)),
                           "lr": lrs.get("base", lrs.get("base_no_decay", float("nan"))), **({"memory_lr": lrs["memory"]} if "memory" in lrs else {}),
                           **norms, "tokens_per_s": tps, "seconds_per_step": per_step, "elapsed": now - started}
                    self.record(rec)
                    mem = f" | mem lr {rec['memory_lr']:.2e}" if "memory_lr" in rec else ""
                    self.say(f"step {step}/{self.total_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e}{mem} | "
                             f"{' | '.join(f'{NORM_LABELS[k]} {v:.3g}' for k, v in norms.items())} | {tps:,.0f} tok/s | "
                             f"{per_step:.2f} s/step | ETA {_hms(eta)}")
                    self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    interval_t, interval_tokens, interval_losses = now, 0, []
                if compiling:
                    compiling = False
                    now = time.perf_counter()
                    self.say(f"step {step}: the first step (compiling) took {now - started:.0f} s")
                    rate_t, rate_step, interval_t, interval_tokens = now, step, now, 0

                if cfg.eval.every and step % cfg.eval.every == 0 and step != self.total_steps:
                    ev = self.evaluate()
                    if ev:
                        self.record({"step": step, "tokens": samples_seen * cfg.data.block_size, **ev})
                        self.say(f"step {step} | held-out loss {ev['eval_loss']:.4f} | ppl {ev['eval_ppl']:.2f}")
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != self.total_steps:
                    self.save_checkpoint(step, samples_seen)

            elapsed = time.perf_counter() - rate_t
            trained_steps = step - rate_step
            if self.held_blocks is not None:
                final_eval = self.evaluate()
                if final_eval and not self._logged_eval_at(step):
                    self.record({"step": step, "tokens": samples_seen * cfg.data.block_size, **final_eval})
                if final_eval:
                    self.say(f"end (step {step}) | held-out loss {final_eval['eval_loss']:.4f} | ppl {final_eval['eval_ppl']:.2f}")
            if not complete_checkpoints(self.ckpt_root) or complete_checkpoints(self.ckpt_root)[-1][0] != step:
                self.save_checkpoint(step, samples_seen)
        finally:
            self.bar.close()
            self.bar = None
            if self.tb is not None:
                self.tb.close()
        if cfg.log.data_trace:
            self.trace({"final_checksum": weights_checksum(self.raw)})
        self.plot()
        out = self.export(final_eval, step, samples_seen)
        self.say(f"exported {out}")
        tps = trained_steps * self.tokens_per_step / elapsed if trained_steps else 0.0
        return TrainResult(self.run_dir, out, step, samples_seen * cfg.data.block_size, final_eval, tps,
                           elapsed / trained_steps if trained_steps else 0.0, acc.is_main_process)

    def _logged_eval_at(self, step: int) -> bool:
        path = self.run_dir / "metrics.jsonl"
        if not self.acc.is_main_process or not path.exists():
            return False
        return any('"eval_loss"' in line and json.loads(line)["step"] == step for line in path.read_text().splitlines() if line.strip())


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def train(loaded: LoadedTrainConfig, *, echo=print) -> TrainResult:
    """Run (or resume) the training a config describes."""
    return Runner(loaded, echo=echo).run()
