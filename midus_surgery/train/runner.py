"""The continued pre-training (CPT) runner, on accelerate.

One process on CPU by default; ``accelerate launch`` for several processes or GPUs (DDP, or
FSDP through an accelerate config). ``Runner.run`` is nanoGPT's loop, top to bottom:

    setup: the processes, the outputs checked, the start (fresh, or the newest whole checkpoint),
           the data, the model (fp32 master weights, the freeze policy), the optimiser
    while step < total_steps:
        train_step: grad_accum micro-batches (no gradient sync but on the last), each
                    blocks = sampler(samples_seen, rank, micro)   # pure function of (seed, position)
                    loss = model(blocks, labels=blocks).loss / grad_accum; backward
                    a non-finite loss or gradient norm on any process stops (the last checkpoint stays good);
                    base and memory gradients clipped separately; AdamW step; schedule step
        log / evaluate / checkpoint (checkpoint.py: temp dir + rename, keep-last-N)
    end: final evaluation, the last checkpoint, the export (export.py: temp dir + rename)

A checkpoint holds the model, the optimiser, the scheduler, every process's RNG state and the
data position (``samples_seen``), so a run killed at any moment and resumed from its newest
complete checkpoint ends with exactly the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from midus_surgery.compiler.plan import read_plan_file
from midus_surgery.errors import RecipeError, TrainingError, disk_advice, one_line, printable
from midus_surgery.io.json_text import loads_as_transformers, loads_checked, strict_json
from midus_surgery.io.output_dir import (
    MARKER,
    RUN_ENTRIES,
    RUN_KIND,
    OutputError,
    check_output_dir,
    data_folder,
    hold_marker,
    input_root,
    links_train_writes_through,
    logs_that_are_not_files,
    marker_in_use,
    not_written_in_checkpoints,
    not_written_in_run_dir,
    probe_write,
    read_marker,
    release_marker,
    rewrite_held_marker,
    write_marker,
)
from midus_surgery.io.small_files import read_small_text, replaced_atomically, write_text_atomically
from midus_surgery.recipe.schema import cwd_relative_hint, parse_size
from midus_surgery.train import data as D
from midus_surgery.train import sharding
from midus_surgery.train.checkpoint import (
    DATA_KEYS,
    FROZEN_KEY,
    START_KEY,
    STATE_FILE,
    NewerCheckpoint,
    NoWholeCheckpoint,
    complete_checkpoints,
    data_change_problem,
    frozen_digest,
    init_from_change,
    load_checkpoint,
    lost_a_process,
    model_identity,
    newest_whole_checkpoint,
    read_checkpoint_state,
    remove_partial_checkpoints,
    save_checkpoint,
    set_aside_later_checkpoints,
    trained_tensors_only,
    verify_checkpoint,
    weights_checksum,
    weights_sha256,
)
from midus_surgery.train.config import LoadedTrainConfig, OptimConfig, TrainConfig, parse_count
from midus_surgery.train.evaluate import (
    DTYPES,
    ModelLoadError,
    WeightFilesError,
    block_batches,
    check_model_dir,
    check_weight_headers,
    context_problem,
    evaluate_batches,
    load_causal_lm,
    load_tokenizer,
    model_on_meta,
    non_finite_tensors,
    positions_problem,
    stated_positions,
)
from midus_surgery.train.export import EXPORT_KIND, export_model
from midus_surgery.train.params import ParamGroups, adamw_options, choose_params, describe_groups, lr_lambda
from midus_surgery.units import human_bytes

NORM_LABELS = {"grad_norm": "gnorm", "memory_grad_norm": "mem gnorm"}  # metrics key -> log line label
RUN_DIR_LOOKS = 11  # reads of a run_dir's marker, half a second apart (5 s), before it is said not to be process 0's

ALLOW_CODE = "read that code, then set trust_remote_code: true in the train config"
ALLOW_PICKLE = "set allow_pickle: true in the train config"


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


@dataclass
class StepNumbers:
    """What one optimiser step measured."""

    loss: float  # mean over micro-batches and processes (nats/token)
    norms: dict[str, float]  # "grad_norm" / "memory_grad_norm" -> total norm before clipping
    blocks: list[int]  # the training blocks this process read (positions in the token stream)
    lrs: dict[str, float]  # param group name -> the lr this step's update used (the scheduler moves it right after)


@dataclass
class Meter:
    """Loss and speed between log lines. tok/s, s/step and the ETA count from ``rate_t`` /
    ``rate_step``: the loop's start, or the end of the first step when it compiled."""

    started: float  # perf_counter() at the loop's start
    rate_t: float
    rate_step: int
    interval_t: float  # the last log line's time
    interval_tokens: int = 0  # tokens trained since the last log line (all processes)
    interval_step: int = 0  # the step of the last log line
    losses: list[float] = field(default_factory=list)  # step losses since the last log line

    @classmethod
    def start(cls, step: int) -> "Meter":
        now = time.perf_counter()
        return cls(started=now, rate_t=now, rate_step=step, interval_t=now, interval_step=step)

    def restart_rate(self, step: int) -> None:
        """After the compiling step: count speed from here (that step's minutes never recur)."""
        now = time.perf_counter()
        self.rate_t, self.rate_step, self.interval_t, self.interval_tokens, self.interval_step = now, step, now, 0, step


# --------------------------------------------------------------------------- the run

# Config keys that name a path: a node's own mount may name the same files under another path, so they may differ
# across processes (the data itself is compared by what it holds)
PER_PROCESS_KEYS = ("init_from", "run_dir", "data.train", "data.held_out", "data.cache_dir", "export.dir")


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as dotted key -> value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Runner:
    """One training run, from a loaded config. ``setup()`` builds everything, ``run()`` trains."""

    # Given.
    loaded: LoadedTrainConfig  # the config and where each key came from (errors name the line)
    cfg: TrainConfig  # loaded.config
    echo: Callable[[str], None]  # where the main process's lines go (print; a list's append in tests)

    # Processes (setup_processes).
    acc: Any  # accelerate.Accelerator: devices, processes, mixed precision, torch.compile
    precision: str  # "bf16" or "fp32" (`precision: auto` resolved)
    rank: int  # this process
    world: int  # processes in the run
    fsdp: bool  # sharded weights (accelerate's FSDP): evaluation runs the wrapped model on every rank

    # Paths (setup_processes) and the start (choose_start).
    run_dir: Path  # checkpoints/, metrics.jsonl, tensorboard/, trace/, loss.png
    ckpt_root: Path  # run_dir/checkpoints
    export_dir: Path  # the final model directory (export.dir, else run_dir/final)
    init_from: Path  # the model directory training starts from
    init_identity: dict  # its identity (checkpoint.model_identity), recorded in every checkpoint: what a resume compares
    resume_from: Path | None = None  # the checkpoint this run continues, None: a fresh start
    resume_state: dict | None = None  # its state file (step, samples_seen, tokens_seen...), read before the run is sized
    resume_notes: list[str]  # what the resume changed (the schedule, the optimiser's settings), said after the start line
    run_lock: int | None = None  # the run directory's marker, held (flock) while this run writes there

    # Data (setup_data).
    tokenizer: Any  # init_from's tokenizer: the corpora are tokenised (and cached) with it
    streams: list  # the tokenised corpora (D.TokenStream): train, then held-out when given
    train_blocks: D.BlockSet  # the blocks of data.block_size tokens training samples from
    held_blocks: D.BlockSet | None  # held-out blocks for evaluation; None: no evaluation
    sampler: D.BlockSampler  # sample number -> training block, a pure function of (seed, number)
    tokens_per_step: int  # micro_batch_size * grad_accum * world * block_size
    total_steps: int  # optimiser steps of the token budget (a resume: the steps taken plus those the tokens left need)
    data_identity: dict  # what a checkpoint records of the data, and a resume must find unchanged

    # Model (setup_model).
    init_dtype: str  # init_from's dtype name: the export's under `export.dtype: auto`
    is_midus: bool  # a MIDUS model (memory layers): its modeling files travel with the export
    meter: Meter | None = None  # the loop's loss and speed meter (a checkpoint records its losses since the last log line)
    memory_backend: str = "torch"  # what the memory layers run (model.hml.prepare_kernels: "cpu", "triton", "triton-fused", "torch")
    groups: ParamGroups  # the freeze policy's result: (name, parameter) lists per optimiser group
    model: torch.nn.Module  # as accelerate prepared it (DDP / FSDP / compiled wrapper)
    raw: torch.nn.Module  # the model itself (fp32 master weights)

    # Optimiser (setup_optimizer).
    optimizer: torch.optim.Optimizer  # AdamW (accelerate's wrapper), groups base / base_no_decay / memory
    scheduler: torch.optim.lr_scheduler.LambdaLR  # one lr multiplier per group, stepped with the optimiser
    adamw_options: dict  # fused / foreach, from optim.implementation and the device
    warmup_steps: int  # optim.warmup in steps (a fraction of total_steps when below 1)
    clip_groups: list  # (metrics key, parameters, max norm): base and memory gradients clip apart

    # The loop: the data position and the outputs it writes.
    step: int = 0  # optimiser steps taken
    samples_seen: int = 0  # blocks trained on, all processes together: where the sampler continues
    bar: Any = None  # tqdm progress bar (main process), while the loop runs
    dry: bool = False  # `train --dry-run`: checked and said, nothing written (dry_run)
    untokenised: list  # (data key, files, cache entry) of each corpus a dry run found not yet tokenised
    tb: Any = None  # tensorboard SummaryWriter, when log.tensorboard

    def __init__(self, loaded: LoadedTrainConfig, *, echo=print):
        self.loaded, self.cfg, self.echo = loaded, loaded.config, echo
        self.resume_notes = []
        self.untokenised = []
        self.export_owner: str | None = None  # set by check_outputs
        self.created: list[Path] = []  # the folders setup made on the way to the run directory, deepest first
        self.run_dir_was_empty = False  # the run directory was there, empty, before setup

    @property
    def bars(self) -> bool:
        """Progress bars: on the main process, and only on a terminal. In a log file a bar's carriage
        returns glue its frames onto the log lines, which carry the step, tok/s and ETA anyway."""
        return self.cfg.log.progress and self.acc.is_main_process and sys.stderr.isatty()

    def say(self, text: str) -> None:
        """One line of the run's output, from the main process only."""
        if self.acc.is_main_process:
            if self.bar is not None and not self.bar.disable and self.echo is print:
                self.bar.write(text)  # keeps the progress bar whole
            else:
                self.echo(text)
            sys.stdout.flush()

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """Everything before the first step, in order; any config problem is raised before work is done."""
        from accelerate.utils import set_seed

        self.setup_processes()
        self.same_config_on_every_process()
        self.check_outputs()
        self.resume_from = self.choose_start()
        self.resume_state = read_checkpoint_state(self.resume_from) if self.resume_from is not None else None
        self.same_start_on_every_process()
        self.check_same_groups()
        self.check_same_model()
        self.choose_groups(self.model_on_meta())  # the real model's groups come with its weights (setup_model)
        self.created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]  # deepest first
        # a folder the user made for the run, empty: a failed start leaves it empty again, not marked as a run (trial83 F5)
        self.run_dir_was_empty = self.run_dir.is_dir() and not self.run_dir.is_symlink() and not any(self.run_dir.iterdir())
        try:
            # inside: its closing wait fails when another process refused its start, which leaves this skeleton
            self.prepare_run_dir()
            set_seed(self.cfg.seed)
            self.setup_data()
            self.setup_model()
            self.setup_optimizer()
            self.restore()
            # after the restore: a whole checkpoint (written before checkpoints left frozen weights out) brings frozen
            # values of its own, and those are what the run goes on with and its checkpoints must record (trial97 F4)
            self.check_same_frozen_weights(self.raw)
            if self.resume_from is not None:  # held by this run, and the resume loaded: nothing moves for a refused one
                set_aside_later_checkpoints(self.ckpt_root, self.resume_from, int(self.resume_state["step"]), self.acc, self.say)
        except BaseException:
            self.remove_unused_run_dir(self.created)
            raise

    def dry_run(self) -> None:
        """``train --dry-run``: the checks a start makes and the lines it says, with nothing written: no run
        directory, no token cache (a corpus not tokenised yet is said so; its blocks and epochs come with the
        tokens), no checkpoint moved, no kernel build, and no weights read (the model is built on the meta
        device for its parameter groups, so a model of any size is planned in seconds)."""
        cfg, d = self.cfg, self.cfg.data
        self.dry = True
        self.setup_processes()
        self.check_outputs(dry=True)
        self.resume_from = self.choose_start(dry=True)
        self.resume_state = read_checkpoint_state(self.resume_from) if self.resume_from is not None else None
        if self.resume_state is not None:
            self.step, self.samples_seen = int(self.resume_state["step"]), int(self.resume_state["samples_seen"])
        self.check_same_groups()
        self.check_same_model()
        self.model = model = self.model_on_meta()  # parameters on the meta device: names and shapes, no storage
        self.groups = self.choose_groups(model)
        self.load_tokenizer()
        streams, names = {}, {}  # data key -> its token stream (None: not tokenised yet), its cache entry's name
        for what, entries in (("data.train", d.train), ("data.held_out", d.held_out)):
            if entries:
                files, streams[what], entry = D.find_corpus(entries, self.loaded.directory, self.tokenizer, dir_glob=d.dir_glob,
                                                            text_field=d.text_field, cache_dir=self.token_cache, what=what)
                names[what] = streams[what].path.name if streams[what] is not None else entry.name
                if streams[what] is None:
                    self.untokenised.append((what, files, entry))
        self.size_run()
        if not self.untokenised:
            self.split_data(streams["data.train"], streams.get("data.held_out"))
        else:
            self.streams = [s for s in streams.values() if s is not None]
        if self.resume_state is not None:  # the start's restore refuses other data: so does its dry run
            changed = data_change_problem(self.resume_state, self.identity_of_data(names["data.train"], names.get("data.held_out")))
            if changed:
                raise TrainingError(f"cannot resume from {self.resume_from}: {changed}")
        self.check_model_fits(model)
        self.check_weight_headers(model)
        self.warmup_steps = warmup_steps(cfg.optim, self.total_steps)
        self.adamw_options = adamw_options(cfg.optim.implementation, self.acc.device)
        if self.resume_state is not None:
            self.note_resume_changes(self.resume_state)
        self.say_what_runs()

    def choose_groups(self, model) -> ParamGroups:
        """The freeze policy applied to ``model``: refused where it cannot be (freeze: base without midus_plan.json), by the
        dry run and the start alike before the data is read, as it needs none (the start tokenised first: trial99 L1)."""
        cfg = self.cfg
        return choose_params(model, cfg.freeze, read_plan_file(self.init_from), self.loaded, retrieval=cfg.memory.retrieval)

    def model_on_meta(self) -> torch.nn.Module:
        """init_from's model built from its config on the meta device, as the start loads it: its parameters' names
        and shapes, no weights read."""
        self.is_midus = loads_as_transformers((self.init_from / "config.json").read_text()).get("model_type") == "midus"
        return model_on_meta(self.init_from, trust_remote_code=self.cfg.trust_remote_code, how_to_allow=ALLOW_CODE,
                             allow_pickle=self.cfg.allow_pickle, how_to_allow_pickle=ALLOW_PICKLE)

    def check_weight_headers(self, model) -> None:
        """What the start's strict load refuses at once, found from the weights' headers alone (a dry run reads no
        weights; trial50: the dry run said the run would train): ``evaluate.check_weight_headers``, eval's check
        too. The files and shapes are init_from's problem, the names said as the start's load says them."""
        try:
            check_weight_headers(self.init_from, model)
        except WeightFilesError as exc:
            raise RecipeError([self.loaded.problem(("init_from",), str(exc))]) from None

    def state_bytes_line(self) -> str:
        """What the weights, gradients and AdamW moments hold in memory, per process: fp32 master weights (bf16
        runs under autocast), and a float32 gradient and two moments per trainable parameter."""
        g = self.groups
        trainable = g.numel("decay") + g.numel("no_decay") + g.numel("memory")
        weights, training = 4 * (trainable + g.numel("frozen")), 12 * trainable
        sharded = ", before FSDP shards it" if self.fsdp else ""
        recompute = ("gradient_checkpointing is on: each layer's are recomputed in the backward pass" if self.cfg.gradient_checkpointing
                     else "gradient_checkpointing: true trades them for recompute")  # trial48: the advice was given when it was on
        line = (f"model state: {human_bytes(weights + training)} per process{sharded} (fp32 weights {human_bytes(weights)}; "
                f"gradients and AdamW moments {human_bytes(training)}); the load maps the weights files beside them (page cache the "
                f"system can reclaim, counted in peak RSS), and activations come on top, growing with micro_batch_size x block_size "
                f"({recompute})")
        # a bf16 1.7B model's maxrss was 1.54x this line (trial93 F2): the mapped files, not memory the load allocates
        # (tools/load_memory.py: anonymous pages 1.08x the fp32 weights)
        if self.acc.device.type == "cpu":  # a 1.03 TiB state was said on a 23.5 GiB machine without a word (trial93 F3)
            import psutil

            memory = psutil.virtual_memory().total
            if weights + training > memory:
                when = "the start would run out of memory loading the model" if self.dry else "the steps will swap or run out of memory"
                line += (f"\nnote: that is more than this machine's memory ({human_bytes(memory)}): {when}; freeze more (freeze: base), "
                         "or train on a machine with more")
        return line

    def restore(self) -> None:
        """The model, optimiser, scheduler, RNG and data position of the checkpoint to continue: a
        checkpoint of another data order or optimiser fails here, inside setup, so a run directory
        made for it is removed again."""
        if self.resume_from is None:
            return
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        wanted = [{k: group[k] for k in ("weight_decay", "betas", "eps")} for group in inner.param_groups]
        wanted_lrs = list(self.scheduler.base_lrs)
        state = load_checkpoint(self.resume_from, self.acc, self.optimizer, self.scheduler,
                                adamw_options=self.adamw_options, data_identity=self.data_identity, fsdp=self.fsdp, model=self.model)
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        # the checkpoint's optimiser and scheduler bring the lr, weight decay, betas and eps they were
        # written with; this run's config, which the start table shows, decides (the moments are kept)
        self.scheduler.base_lrs = wanted_lrs
        for group, values, lr, factor in zip(inner.param_groups, wanted, wanted_lrs, self.scheduler.lr_lambdas):
            group.update(values, initial_lr=lr, lr=lr * factor(self.scheduler.last_epoch))
        self.scheduler._last_lr = [group["lr"] for group in inner.param_groups]
        self.note_resume_changes(state)

    def note_resume_changes(self, state: dict) -> None:
        """What a resume changes against its checkpoint's run (the optimiser's settings, the schedule, the
        held-out text, the precision), added to the notes said after the start line."""
        changed = [f"{key} {was} -> {now}" for key, was, now in self.changed_since_checkpoint(OPTIMISER_KEYS)]
        if changed:
            self.resume_notes.append(f"resuming with {', '.join(changed)} (changed since the checkpoint): the new values apply from step "
                                     f"{self.step + 1}; the optimiser's moments are kept")
        if isinstance(state.get("total_steps"), int) and state["total_steps"] != self.total_steps:
            self.resume_notes.append(self.budget_change_note(state))
        identity = getattr(self, "data_identity", None) or {}  # a dry run of text not tokenised yet has none
        saved = state.get("data") or {}
        held_before, held_now = saved.get("held_out"), identity.get("held_out")
        same = identity.get("held_out_same_as") == held_before or (bool(saved.get("held_out_sha256"))
                                                                   and saved.get("held_out_sha256") == identity.get("held_out_sha256"))
        if held_before is not None and held_now is not None and held_before != held_now and not same:
            held = self.streams[-1] if len(getattr(self, "streams", [])) > 1 else None
            marked = D.files_with_a_byte_order_mark([str(f) for f in held.meta.get("files", [])]) if held is not None else []
            why = (f" (its tokens changed: {len(marked)} of its files start{'s' if len(marked) == 1 else ''} with a UTF-8 byte-order "
                   "mark, which versions before 2026-12-07 tokenised)" if marked else "")
            self.resume_notes.append(f"note: data.held_out is not the text the checkpoint's run evaluated on{why}: its held-out losses "
                                     "from here on are not comparable with the earlier ones in metrics.jsonl (the training blocks are "
                                     "the same)")
        if self.saved_config().get("precision") not in (None, self.cfg.precision):
            self.resume_notes.append(f"note: precision {self.saved_config()['precision']} -> {self.cfg.precision} since the checkpoint: "
                                     "the run goes on, but is no longer the bit-for-bit continuation of the one it resumes")

    def saved_config(self) -> dict:
        """The config the checkpoint to resume was written under ({} for older checkpoints)."""
        saved = (self.resume_state or {}).get("config")
        return saved if isinstance(saved, dict) else {}

    def changed_since_checkpoint(self, keys) -> list[tuple[str, object, object]]:
        """(key, the checkpoint's value, this run's) for each dotted key whose value changed."""
        saved, now = self.saved_config(), self.cfg.model_dump(mode="json")
        return [(key, _at(saved, key), _at(now, key)) for key in keys if _at(saved, key) is not None and _at(saved, key) != _at(now, key)]

    def check_same_groups(self) -> None:
        """A resume keeps which parameters train: the checkpoint's optimiser state is per group (else
        torch's "loaded state dict has a different number of parameter groups", after the data's work)."""
        regrouped = [f"{key}: {was} -> {now}" for key, was, now in self.changed_since_checkpoint(REGROUPING_KEYS)]
        if regrouped:
            raise TrainingError(f"cannot resume from {self.resume_from}: {', '.join(regrouped)} since it was written, so its optimiser "
                                "state is for other parameters; resume with the setting it was written with, or start afresh (resume unset) "
                                "in a run_dir of its own")

    def check_same_model(self) -> None:
        """A resume starts from the model the checkpoint's run started from (its identity, checkpoint.model_identity):
        the export copies init_from's files and takes its dtype and history, so another model would be exported as this
        run's. Refused before any work, as a regrouping is."""
        self.init_identity = model_identity(self.init_from)
        saved = (self.resume_state or {}).get("init_from")
        start = saved.get(START_KEY) if isinstance(saved, dict) else None
        if isinstance(start, str):  # what the run started from, kept: init_from may have been rewritten since (apply --overwrite)
            self.init_identity[START_KEY] = start
        refused, note = init_from_change(saved, self.init_identity)
        if refused:
            raise TrainingError(f"cannot resume from {self.resume_from}: {refused}")
        if note:
            self.resume_notes.append(note)

    def check_same_frozen_weights(self, model) -> None:
        """The digest (checkpoint.frozen_digest) of the frozen weights ``model`` holds once a resume restored its
        checkpoint: recorded in every checkpoint with init_from's identity, since those checkpoints hold the trained
        tensors only, and compared on resume (init_from_change), where the frozen ones are init_from's again. Not under
        FSDP, whose sharded checkpoints hold every tensor."""
        if self.fsdp:
            return
        digest = frozen_digest(model)
        if digest is None:
            return
        self.init_identity = {**self.init_identity, FROZEN_KEY: digest}
        refused, _ = init_from_change((self.resume_state or {}).get("init_from"), self.init_identity)
        if refused:
            raise TrainingError(f"cannot resume from {self.resume_from}: {refused}")

    def remove_unused_run_dir(self, created: list[Path]) -> None:
        """A run that fails before its first step (data that cannot be read, a block too long for
        the model, its output's reader gone) leaves no trace: the run directory (emptied when it was there, empty) and folders it made,
        if they still hold only the marker, the empty checkpoints folder ``prepare_run_dir`` put
        there and the logs ``open_logs`` started (an empty metrics.jsonl, tensorboard's event files)."""
        if not self.acc.is_main_process or (self.run_dir not in created and not self.run_dir_was_empty):
            return
        if not self.run_dir.is_dir():  # the start stopped before making it (prepare_run_dir's first wait): nothing to remove
            return
        if self.run_lock is None and marker_in_use(self.run_dir):
            return  # another live run took the folder first: what is there is its
        held = {p.name for p in self.run_dir.iterdir()}
        metrics, tensorboard = self.run_dir / "metrics.jsonl", self.run_dir / "tensorboard"
        logs = [p for p in (metrics, tensorboard) if p.exists()]
        if (held - {MARKER, self.ckpt_root.name, *(p.name for p in logs)} or (self.ckpt_root.is_dir() and any(self.ckpt_root.iterdir()))
                or (metrics.exists() and (metrics.is_symlink() or metrics.stat().st_size)) or not_written_in_run_dir(self.run_dir)):
            return
        for log in logs:
            if log.is_dir():
                shutil.rmtree(log)
            else:
                log.unlink()
        if self.ckpt_root.is_dir():
            self.ckpt_root.rmdir()
        (self.run_dir / MARKER).unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break

    def setup_processes(self) -> None:
        """The accelerator (devices, processes, precision, compile) and the run's paths."""
        import logging

        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from transformers.utils import logging as hf_logging

        cfg, loaded = self.cfg, self.loaded
        hf_logging.disable_progress_bar()  # our own bar and log lines only
        logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "Removed shared tensor" for tied embeddings
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # in-process reruns (tests): a fresh state each time
            AcceleratorState._reset_state(reset_partial_state=True)
        on_cpu = not (hasattr(torch, "accelerator") and torch.accelerator.is_available()) and not torch.cuda.is_available()
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        self.precision = precision
        cpu_fsdp_note = sharding.before_accelerator(on_cpu)
        # cpu=True also makes several CPU processes (torchrun / accelerate launch --multi_gpu) use DDP over gloo.
        from accelerate.utils import DistributedDataParallelKwargs

        self.acc = Accelerator(cpu=on_cpu, mixed_precision="bf16" if precision == "bf16" else "no",
                               dynamo_backend="inductor" if cfg.compile else "no",
                               kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)])
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.acc.register_save_state_pre_hook(trained_tensors_only)  # frozen weights are init_from's: not in checkpoints
        self.sharding_note = cpu_fsdp_note or sharding.after_accelerator(self.acc) or sharding.one_process_note(self.acc.num_processes)
        self.fsdp = self.acc.distributed_type.name == "FSDP"

        self.run_dir = loaded.resolve(cfg.run_dir).resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.export_dir = (loaded.resolve(cfg.export.dir) if cfg.export.dir else self.run_dir / "final").resolve()
        self.init_from = loaded.resolve(cfg.init_from).resolve()
        try:
            check_model_dir(self.init_from, trust_remote_code=cfg.trust_remote_code, how_to_allow=ALLOW_CODE,
                            allow_pickle=cfg.allow_pickle, how_to_allow_pickle=ALLOW_PICKLE)
        except ModelLoadError as exc:
            raise RecipeError([loaded.problem(("init_from",), f"{exc}{cwd_relative_hint(cfg.init_from, loaded.directory)}")]) from None

    def check_outputs(self, *, dry: bool = False) -> None:
        """The output-safety rule (output_dir.py) for the run directory and the export, before any work.

        The run directory is written into (checkpoints, logs), never replaced: it must be new, empty
        or a run directory of this tool. The export replaces only an export of this same run (its
        marker names the run directory as owner), never another run's or another command's output.
        """
        cfg, loaded = self.cfg, self.loaded
        d = cfg.data
        inputs = [("init_from", self.init_from), ("the config file", Path(loaded.source.file))]
        D.check_data_links(loaded.resolve(p) for p in [*d.train, *(d.held_out or [])])  # resolving a loop below would be a path error
        inputs += [(f"data ({p})", input_root(loaded.resolve(p))) for p in [*d.train, *(d.held_out or [])]]
        cache = self.token_cache
        try:
            D.token_cache_location(loaded.resolve(d.cache_dir) if d.cache_dir else None, inputs=inputs,
                                   data_folders=[(f"the data folder of {p}", data_folder(loaded.resolve(p)))
                                                 for p in [*d.train, *(d.held_out or [])]])
        except OutputError as exc:
            if not d.cache_dir and os.environ.get("MIDUS_CACHE"):  # not the config's: the variable's, said as such
                raise
            raise RecipeError([loaded.problem(("data", "cache_dir") if d.cache_dir else ("data",), str(exc))]) from None
        inputs.append(("the token cache", cache))
        folders = [("the config's folder", loaded.directory)]
        # the main process asks (the others would find it holding the marker it takes in prepare_run_dir)
        if self.acc.is_main_process and self.run_dir.is_dir() and marker_in_use(self.run_dir):
            # first: what a live run's directory holds changes as it is read (a checkpoint pruned away between the listing
            # and the look was said as "not written by midus-surgery", not "in use")
            raise self.in_use()
        marker_file = self.run_dir / MARKER
        if self.acc.is_main_process and marker_file.is_symlink():
            # through a link to another run's marker this run took that run's lock and wrote its pid there (trial95 F9)
            raise RecipeError([loaded.problem(("run_dir",), f"{self.run_dir} holds a {MARKER} that is a symlink; train never writes "
                                              "through a link, which would change the file it points to: remove the link, or choose "
                                              "another run_dir")])
        # the main process asks, as above (what process 0 does to its marker meanwhile is its own)
        if self.acc.is_main_process and read_marker(self.run_dir) is None and marker_file.exists():
            # a file of that name that is not this tool's marker is the user's: adopting the folder would overwrite it (trial92 F10)
            raise RecipeError([loaded.problem(("run_dir",), f"{self.run_dir} holds a {MARKER} file that midus-surgery did not write "
                                              "(not its marker); train never overwrites it: move it away, or choose another run_dir")])
        unmarked_run = read_marker(self.run_dir) is None and bool(complete_checkpoints(self.ckpt_root))
        if unmarked_run and not dry and self.acc.is_main_process:
            write_marker(self.run_dir, RUN_KIND)  # a run directory written before markers existed: its checkpoints say it is ours
        # An export inside this run directory is this run's, whichever run wrote it: the run
        # directory may be a copy of another (cp -r runs/a runs/b), export and all.
        export_owner = str(self.run_dir)
        found = read_marker(self.export_dir)
        if found and found.get("kind") == EXPORT_KIND and self.run_dir in self.export_dir.parents:
            export_owner = found.get("owner")
        self.export_owner = export_owner  # the export's final swap checks again against it (output_dir.replace_directory)
        if self.run_dir in self.export_dir.parents:
            part = self.export_dir.relative_to(self.run_dir).parts[0]
            if part in (RUN_ENTRIES - {"final"}) | {MARKER}:  # checkpoints/ (pruned, rewritten), tensorboard/, the marker: an export there deletes them
                raise RecipeError([loaded.problem(("export", "dir"), f"{self.export_dir} is or lies inside {self.run_dir / part}, which "
                                                  "train itself writes; choose another directory (the default is run_dir/final)")])
        if os.path.lexists(self.ckpt_root) and not self.ckpt_root.is_symlink() and not self.ckpt_root.is_dir():
            # a file there read as "no checkpoint to continue", or as the system's "File exists" (trial148 L1)
            raise RecipeError([loaded.problem(("run_dir",), f"{self.ckpt_root} is a file, where train keeps its checkpoints (a folder): "
                                              "move it away, or choose another run_dir")])
        extras = [f"checkpoints/{x}" for x in not_written_in_checkpoints(self.ckpt_root)] if self.ckpt_root.is_dir() else []
        if extras:  # checkpoints are pruned (keep_last) and rewritten: what else they hold would go with them
            raise RecipeError([loaded.problem(("run_dir",), f"{self.ckpt_root} also holds what midus-surgery did not write there "
                                              f"({', '.join(extras[:5])}); train prunes and rewrites checkpoints: move them out first")])
        odd = logs_that_are_not_files(self.run_dir) if self.run_dir.is_dir() else []
        if odd:
            raise RecipeError([loaded.problem(("run_dir",), f"{self.run_dir} holds {', '.join(odd[:5])} as something other than a regular "
                                              "file (a named pipe, a device or a folder), where train reads back and appends its logs: "
                                              "move it away, or choose another run_dir")])
        links = links_train_writes_through(self.run_dir) if self.run_dir.is_dir() else []
        if links:
            raise RecipeError([loaded.problem(("run_dir",), f"{self.run_dir} holds symlinks where train writes ({', '.join(links[:5])}); "
                                              "train never writes through a link, which would change the file it points to: remove "
                                              "the links, or choose another run_dir")])
        if not dry and self.acc.is_main_process and self.ckpt_root.is_dir() and not self.ckpt_root.is_symlink():
            # the run_dir probe below does not reach into an existing checkpoints/: unwritable (an immutable attribute, a
            # read-only mount), it was found at the first save, after checkpoint.every steps (trial143 F2). The main
            # process saves the checkpoints, and probes alone: the others list checkpoints/ meanwhile
            try:
                probe_write(self.ckpt_root)
            except OSError as exc:
                raise RecipeError([loaded.problem(("run_dir",), f"cannot write in {self.ckpt_root}, where the checkpoints go "
                                                  f"({one_line(exc, 160)}): {disk_advice(exc)}")]) from None
        # where a problem is reported: the key in the config, or run_dir for the default export
        export_at = (("export", "dir"), "") if cfg.export.dir else (("run_dir",), f"the export (export.dir not set: {self.export_dir}): ")
        for where, said, path, kind, owner, extra, into in (
                (("run_dir",), "", self.run_dir, RUN_KIND, None, [], True),
                (*export_at, self.export_dir, EXPORT_KIND, export_owner, [("the run directory", self.run_dir)], False)):
            if dry and unmarked_run and path == self.run_dir:
                continue  # the start marks it as this tool's (above), which a dry run does not write
            try:
                check_output_dir(path, kind=kind, owner=owner, inputs=inputs, folders=folders + extra, reuse=True, writes_into=into, flag=None,
                                 probe=not dry)
            except OutputError as exc:
                raise RecipeError([loaded.problem(where, said + str(exc))]) from None

    def choose_start(self, *, dry: bool = False) -> Path | None:
        """The checkpoint to continue (``resume``), or None for a fresh start (``dry``: broken ones are said, not moved)."""
        cfg, loaded = self.cfg, self.loaded
        if cfg.resume is None:
            existing = complete_checkpoints(self.ckpt_root)
            if existing:
                raise RecipeError([loaded.problem(("resume",), f"resume is not set, and {self.ckpt_root} already holds checkpoints (newest: step "
                                                               f"{existing[-1][0]}); set resume: auto to continue that run, or choose another run_dir")])
            self.refuse_to_replace_an_earlier_export()
            return None
        if cfg.resume == "auto":
            try:
                chosen = newest_whole_checkpoint(self.ckpt_root, self.acc, self.say, move=not dry)
            except NoWholeCheckpoint as exc:
                raise RecipeError([loaded.problem(("resume",), str(exc))]) from None
            except NewerCheckpoint as exc:
                raise RecipeError([loaded.problem(("resume",), f"cannot resume from {exc}")]) from None
            if chosen is None:
                self.refuse_to_replace_an_earlier_export()
            return chosen
        path = loaded.resolve(cfg.resume).resolve()
        if not path.exists():
            raise RecipeError([loaded.problem(("resume",), f"{printable(str(path))} does not exist (resume: auto continues the newest checkpoint of run_dir)")])
        try:
            problem = f"no {STATE_FILE}" if not (path / STATE_FILE).is_file() else verify_checkpoint(path)
        except NewerCheckpoint as exc:
            raise RecipeError([loaded.problem(("resume",), f"cannot resume from {path}: {exc}")]) from None
        if problem:
            raise RecipeError([loaded.problem(("resume",), f"{path} is not a complete checkpoint ({problem})")])
        return path

    def refuse_to_replace_an_earlier_export(self) -> None:
        """A fresh start where an earlier run's export holds its trained weights (its checkpoints deleted to free the disk, the
        model kept): the new run's export would replace it when it finishes, without a word (trial74 F1). Refused: the
        trained model is what a run is for, and apply without --overwrite refuses its own earlier output alike."""
        out = self.export_dir
        marker = read_marker(out) if out.is_dir() else None
        weights = sorted(p.name for p in out.glob("*.safetensors")) if marker and marker.get("kind") == EXPORT_KIND else []
        if weights:
            where = ("export", "dir") if self.cfg.export.dir else ("run_dir",)
            raise RecipeError([self.loaded.problem(where, f"{out} holds the model an earlier run exported ({', '.join(weights[:3])}), "
                                                          "and this run starts afresh (no checkpoint to continue): its export would "
                                                          "replace that model; move it out first, or choose another "
                                                          f"{'export.dir' if self.cfg.export.dir else 'run_dir'}")])

    def in_use(self) -> RecipeError:
        """The refusal of a run directory another live train run holds."""
        marker = read_marker(self.run_dir) or {}
        return RecipeError([self.loaded.problem(("run_dir",), f"{self.run_dir} is in use by another train run (pid {marker.get('pid')} "
                                                "started it, or resumed it, and still runs); two runs in one run_dir would mix their "
                                                "checkpoints and logs: wait for it to end, or choose another run_dir")])

    def prepare_run_dir(self) -> None:
        """The run directory, marked as this tool's and held by this run (a second run started in it
        is refused), with no half-written checkpoint in it."""
        # every process has read the run directory (check_outputs) before process 0 writes its marker there: a marker read
        # while it was being written looked like another tool's, and the run was refused (seen once, FSDP2 in the suite)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if read_marker(self.run_dir) is None:
                write_marker(self.run_dir, RUN_KIND)
            self.run_lock = hold_marker(self.run_dir)
            if self.run_lock is None:  # before anything is removed: the partial checkpoint below may be that run's
                raise self.in_use()
            self.run_lock = rewrite_held_marker(self.run_dir, RUN_KIND, self.run_lock)  # this process is the one writing now
            self.ckpt_root.mkdir(exist_ok=True)
            remove_partial_checkpoints(self.ckpt_root, report=self.say)
        self.acc.wait_for_everyone()
        if self.acc.num_processes > 1:
            self.same_run_dir_on_every_process()

    def same_run_dir_on_every_process(self) -> None:
        """A process whose run_dir (a node's own path) is not the folder process 0 made: its own logs went nowhere, found at
        its first step (log.data_trace), and its resume would find no checkpoint (trial148 L2). Said at the start, by every
        process. The folder is known by what it holds, the same through any mount of it: the marker process 0 has just
        written, with its pid, host and time. Another run's folder, marked as one, passed where a device number or a host
        name was compared (trial153 M4, trial154 M2)."""
        from accelerate.utils import gather_object

        # said by every process, not the one alone: the others went on to wait in their first collective for it. A node
        # whose network file system shows the folder a little late may still read the marker process 0 replaced: it reads
        # again for a few seconds before it says so (a copy of the folder holds that old marker for good: trial157 1)
        mine = read_marker(self.run_dir) if self.run_dir.is_dir() else None
        first = gather_object([mine])[0]
        for _ in range(RUN_DIR_LOOKS - 1):
            if mine == first:
                break
            time.sleep(0.5)
            mine = read_marker(self.run_dir) if self.run_dir.is_dir() else None
        seen = gather_object([(self.run_dir.is_dir(), mine, str(self.run_dir))])
        rank = next((r for r, (_, marker, _) in enumerate(seen) if marker is None or marker != first), None)
        if rank is None:
            return
        exists, marker, path = seen[rank]
        why = ("it does not exist" if not exists else "it holds no marker of a training run" if marker is None or marker.get("kind") !=
               RUN_KIND else f"its marker, written by pid {marker.get('pid')} on {marker.get('host')}, is not the one process 0's start "
               f"has just written (pid {(first or {}).get('pid')} on {(first or {}).get('host')}): another run's folder, a copy of "
               "this one, or a view of it that did not catch up in 5 s")
        raise TrainingError(f"process {rank}'s run_dir {path} is not the run directory process 0 made ({why}): every process must "
                            "write into the same run_dir (one folder, or a node's mount of it)")

    def load_tokenizer(self) -> None:
        """init_from's tokenizer, once the blocks are known to fit the model's positions (said now, not
        after tokenising, or as "all blocks held out")."""
        cfg, d = self.cfg, self.cfg.data
        too_long = positions_problem(stated_positions(loads_as_transformers((self.init_from / "config.json").read_text())), d.block_size)
        if too_long:
            raise RecipeError([self.loaded.problem(("data", "block_size"), too_long)])
        self.tokenizer = load_tokenizer(self.init_from, cfg.trust_remote_code, how_to_allow=ALLOW_CODE)

    @property
    def token_cache(self) -> Path:
        """The token cache folder, resolved as check_outputs checked it: a cache_dir of `tok<TAB>x/../cache` made the folder
        named with a tab on the way to the one checked (trial157)."""
        d = self.cfg.data
        return (self.loaded.resolve(d.cache_dir) if d.cache_dir else D.default_cache_dir()).resolve()

    def setup_data(self) -> None:
        """Tokenise the corpora (once, by the main process; the others then open the cache), split
        off the held-out blocks, and size the run in optimiser steps."""
        cfg, loaded, d = self.cfg, self.loaded, self.cfg.data
        self.load_tokenizer()
        # tokenising has no log line of its own: its bar, which in a log file is a line every 30 s
        common = dict(dir_glob=d.dir_glob, text_field=d.text_field, cache_dir=self.token_cache,
                      progress=cfg.log.progress and self.acc.is_main_process, tokenizer_source=str(self.init_from))
        with self.acc.main_process_first():
            train_stream = D.prepare_corpus(d.train, loaded.directory, self.tokenizer, what="data.train", **common)
            held_stream = D.prepare_corpus(d.held_out, loaded.directory, self.tokenizer, what="data.held_out", **common) if d.held_out else None
        self.split_data(train_stream, held_stream)
        self.same_data_on_every_process()
        self.size_run()

    def same_config_on_every_process(self) -> None:
        """Every process runs the same config: one given another optim.lr trained another model, exported as process 0's;
        another tokens or micro_batch_size hung the run in a collective (trial87 F1). Paths may differ (a node's own
        mount of the same files): the data is compared by what it holds (same_data_on_every_process)."""
        if self.acc.num_processes < 2:
            return
        from accelerate.utils import gather_object

        seen = gather_object([{key: value for key, value in _flat(self.cfg.model_dump(mode="json")).items()
                               if not key.startswith(PER_PROCESS_KEYS)}])
        for rank, other in enumerate(seen):
            if other != seen[0]:
                key = next(k for k in sorted(set(other) | set(seen[0])) if other.get(k) != seen[0].get(k))
                raise TrainingError(f"process {rank} runs another config than process 0: {key} is {other.get(key)!r} there and "
                                    f"{seen[0].get(key)!r} on process 0; give every process the same config and overrides")

    def same_start_on_every_process(self) -> None:
        """Every process starts from the same step: a process whose run_dir (a node's own path) held no checkpoint started
        afresh beside one that resumed, and the two waited for each other in different collectives, silently, for ever
        (trial148 H1). The checkpoint is compared by its step and name, not its path (a node's own mount of the same files)."""
        if self.acc.num_processes < 2:
            return
        from accelerate.utils import gather_object

        def start(found: dict) -> str:
            return f"resumes {found['name']} (step {found['step']})" if found["step"] is not None else "starts afresh (no checkpoint)"

        mine = {"step": int(self.resume_state["step"]) if self.resume_state is not None else None,
                "name": self.resume_from.name if self.resume_from is not None else None}
        seen = gather_object([mine])
        rank = next((i for i, other in enumerate(seen) if other != seen[0]), None)
        if rank is not None:
            raise TrainingError(f"process {rank} {start(seen[rank])} and process 0 {start(seen[0])}: every process must find the "
                                "same checkpoints; give every process the same run_dir (or a mount of the same folder)")

    def same_data_on_every_process(self) -> None:
        """Every process trains on the same corpus: one whose data.train reads other files (a per-node path, a variable
        expanded per rank) trained on without a word, its log and checkpoints naming the main process's data alone (trial74 F7)."""
        if self.acc.num_processes < 2:
            return
        from accelerate.utils import gather_object

        # the blocks each reads, not where from: the same files under a node's own path are the same data
        seen = gather_object([{key: self.data_identity.get(key) for key in DATA_KEYS}])
        if any(other != seen[0] for other in seen):
            rank = next(i for i, other in enumerate(seen) if other != seen[0])
            raise TrainingError(f"process {rank} reads other data than process 0 (token cache entry {seen[rank].get('train')} against "
                                f"{seen[0].get('train')}): every process must read the same data.train and data.held_out files")

    def split_data(self, train_stream: D.TokenStream, held_stream: D.TokenStream | None) -> None:
        """The training and held-out blocks of the tokenised corpora, the sampler, and the data identity."""
        cfg, d = self.cfg, self.cfg.data
        self.streams = [s for s in (train_stream, held_stream) if s is not None]
        self.train_blocks, self.held_blocks = D.split(train_stream, held_stream, d.block_size, d.held_out_fraction, what="data.train")
        self.sampler = D.BlockSampler(self.train_blocks, cfg.seed)
        self.data_identity = self.identity_of_data(train_stream.path.name, held_stream.path.name if held_stream else None)
        self.data_identity["train_reads"] = D.reads_of(train_stream)
        # the entries' own digests: a resume whose entry is named otherwise (an upgrade's key rules, a tokenizer setting
        # that changes no id of this text) reads the same tokens, and goes on (trial149 F1, F2). A checkpoint written before
        # it recorded them names its entry only: that entry, still in the cache beside this one, records its own, and the
        # same ones are the same blocks (a Python tokenizer's entries were renamed by an upgrade's key rules, and the run was
        # refused as reading other tokens: trial152 F1; its held-out text was said to be other text: F5)
        saved = (self.resume_state or {}).get("data") or {}
        for key, stream in (("train", train_stream), ("held_out", held_stream)):
            if stream is None:
                continue
            self.data_identity[f"{key}_sha256"] = stream.meta.get("sha256")
            was = saved.get(key)
            if isinstance(was, str) and was != stream.path.name and not saved.get(f"{key}_sha256"):
                theirs = D.entry_digests(stream.path.parent / was, like=stream.path)
                if theirs is not None:  # the checkpoint's own entry, still in the cache: the same tokens, or said to differ
                    self.data_identity[f"{key}_same_as" if theirs == stream.meta.get("sha256") else f"{key}_differs_from_saved"] = was

    def identity_of_data(self, train: str, held_out: str | None) -> dict:
        """What a checkpoint records of the data (its corpora's cache entries and how blocks are cut), and a resume
        must find unchanged."""
        d = self.cfg.data
        return {"train": train, "held_out": held_out, "block_size": d.block_size, "seed": self.cfg.seed,
                "held_out_fraction": d.held_out_fraction if held_out is None else None}

    def size_run(self) -> None:
        """The token budget in optimiser steps of micro_batch_size x grad_accum x processes x block_size tokens."""
        cfg, d = self.cfg, self.cfg.data
        self.tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * self.world * d.block_size
        self.total_steps = D.steps_for(cfg.token_budget, self.tokens_per_step)
        if self.resume_state is not None:
            # the budget is in tokens: a resume under another micro_batch_size, grad_accum or number of
            # processes takes as many steps as the tokens left need, not the new step size's whole count
            state = self.resume_state
            seen = state["samples_seen"] * d.block_size  # the block size is the checkpoint's (the data identity, checked at restore)
            left = cfg.token_budget - seen
            self.total_steps = state["step"] + (D.steps_for(left, self.tokens_per_step) if left > 0 else 0)

    def setup_model(self) -> None:
        """The model in fp32 (master weights; bf16 runs under autocast), the freeze policy applied."""
        cfg, loaded = self.cfg, self.loaded
        config_data = loads_as_transformers((self.init_from / "config.json").read_text())
        self.init_dtype = config_data.get("dtype") or config_data.get("torch_dtype") or "float32"
        self.is_midus = config_data.get("model_type") == "midus"
        model = load_causal_lm(self.init_from, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, progress=self.bars,
                               how_to_allow=ALLOW_CODE, allow_pickle=cfg.allow_pickle, how_to_allow_pickle=ALLOW_PICKLE)
        if self.resume_from is None:  # a resume's weights are the checkpoint's, checked by its first step
            # the start's weight files, digested as the run starts (just read: from the page cache) by every process alike,
            # carried in every checkpoint and written at export for analyze --fixed-retrieval (two apply seeds share a plan)
            self.init_identity[START_KEY] = weights_sha256(self.init_from)
            broken = non_finite_tensors(model)
            if broken:  # else the run stops at step 1 on a "non-finite loss" that hides the cause
                raise RecipeError([loaded.problem(("init_from",), f"{self.init_from}'s weights hold non-finite values (NaN or inf) in "
                                                  f"{len(broken)} tensor(s), e.g. {', '.join(broken[:3])}: training cannot start from them")])
        self.check_model_fits(model)
        model.config.use_cache = False
        self.groups = self.choose_groups(model)
        if cfg.gradient_checkpointing:
            _enable_activation_checkpointing(model)
        model.train()
        self.model = model  # prepared with the optimiser (setup_optimizer)

    def check_model_fits(self, model) -> None:
        """The blocks fit the model's context, and the tokenised corpora its vocabulary."""
        too_long = context_problem(model, self.cfg.data.block_size)
        if too_long:
            raise RecipeError([self.loaded.problem(("data", "block_size"), too_long)])
        vocab = model.get_input_embeddings().weight.shape[0]
        for s in self.streams:
            if s.meta.get("max_token", -1) >= vocab:
                raise D.DataError(f"{s.path}: token id {s.meta['max_token']} is outside the model's vocabulary of {vocab} (tokenizer and model do not match)")

    def setup_optimizer(self) -> None:
        """AdamW over the parameter groups, the lr schedule, then accelerate's prepare."""
        cfg, loaded = self.cfg, self.loaded
        o, m = cfg.optim, cfg.memory
        param_groups, shapes = [], []  # shapes: each group's schedule shape, in group order
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
        self.warmup_steps = warmup_steps(o, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_lambda(o, self.total_steps, self.warmup_steps, s) for s in shapes])
        # max norm 0 (clipping off) is an infinite max norm: the norm is still measured and checked
        clip_names = [(key, names, clip if clip > 0 else float("inf")) for key, names, clip in (
            ("grad_norm", [n for g in (self.groups.decay, self.groups.no_decay) for n, _ in g], o.grad_clip),
            ("memory_grad_norm", [n for n, _ in self.groups.memory], m.grad_clip)) if names]
        if self.is_midus:
            from midus_surgery.model.hml import prepare_kernels

            # Which kernels the memory layers run, answered now, eagerly (on CPU this builds the compiled
            # kernels): a model compiled afterwards reads the answer and traces whole, no graph break.
            self.memory_backend = prepare_kernels(self.model, self.acc.device)
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        self.raw = self.acc.unwrap_model(self.model)
        # by name, after prepare: FSDP2 replaces every parameter with its sharded self (and a
        # compiled model's names carry torch.compile's `_orig_mod.`)
        current = {n.replace("_orig_mod.", ""): p for n, p in self.raw.named_parameters(remove_duplicate=False)}
        # in the model's own parameter order: under FSDP accelerate's clip_grad_norm_ compares the list
        # with model.parameters() by ==, which for a group of every parameter in another order compares
        # tensors element-wise and raises ("Boolean value of Tensor ... is ambiguous", freeze: none)
        order = {id(p): i for i, p in enumerate(self.model.parameters())}
        self.clip_groups = [(key, sorted((current[n] for n in names), key=lambda p: order.get(id(p), len(order))), clip)
                            for key, names, clip in clip_names]

    # ---------------------------------------------------------------- one optimiser step
    def train_step(self) -> StepNumbers:
        """One optimiser step over grad_accum micro-batches of every process; advances ``step``
        and ``samples_seen``. A non-finite loss or gradient norm raises before the weights change."""
        cfg, acc = self.cfg, self.acc
        losses, picked = [], []
        for micro in range(cfg.grad_accum):
            ids_np, blocks = self.sampler.micro_batch(self.samples_seen, self.rank, self.world, micro, cfg.micro_batch_size)
            picked.extend(blocks)
            ids = torch.as_tensor(ids_np, dtype=torch.long, device=acc.device)  # [micro_batch_size, block_size]
            # gradients are summed locally and synchronised across processes on the last micro-batch only
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
                # backward outside autocast (torch's advice): the ops' own backward dtypes follow the forward
                acc.backward(loss / cfg.grad_accum)
            losses.append(loss.detach().float())
        step_loss = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()  # every process gets the same number
        norms = {}
        for key, params, max_norm in self.clip_groups:
            n = acc.clip_grad_norm_(params, max_norm)
            norms[key] = float(n) if n is not None else float("nan")
        if not math.isfinite(step_loss) or any(not math.isfinite(v) for v in norms.values()):
            raise self.non_finite(step_loss, norms)  # the same decision on every process: the numbers were reduced
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += cfg.micro_batch_size * cfg.grad_accum * self.world
        return StepNumbers(step_loss, norms, picked, lrs)

    def say_where_to_resume(self) -> None:
        """After an interruption during the steps: the newest whole checkpoint, which resume: auto takes."""
        ckpt_root = getattr(self, "ckpt_root", None)
        acc = getattr(self, "acc", None)
        if self.step == 0 or ckpt_root is None or acc is None or not acc.is_main_process:
            return
        last = complete_checkpoints(ckpt_root)
        self.say(f"stopped at step {self.step}: the newest whole checkpoint is {last[-1][1]} (step {last[-1][0]}); run again with "
                 "resume: auto to continue from it" if last else f"stopped at step {self.step}, before the first checkpoint "
                 "(checkpoint.every): a new run starts from the beginning")

    def non_finite(self, loss: float, norms: dict[str, float]) -> TrainingError:
        last = complete_checkpoints(self.ckpt_root)
        kept = (f"the last good checkpoint is {last[-1][1]} (step {last[-1][0]}); resume from it with resume: auto after lowering optim.lr / memory.lr"
                if last else "no checkpoint was written yet" + (f" (checkpoint.every: {self.cfg.checkpoint.every})"
                                                                 if self.cfg.checkpoint.every else " (set checkpoint.every)"))
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        return TrainingError(f"non-finite {what} at step {self.step + 1} (loss {loss}, {', '.join(f'{k} {v:.3g}' for k, v in norms.items())}); "
                             f"stopped without updating the weights; {kept}")

    def unusable_end(self, loss: float) -> TrainingError:
        """A non-finite held-out loss at the end: weights the per-step checks let through (the last step's update made
        them overflow, or a checkpoint resumed from had its tensor bytes changed at the same size: trial37). Exported,
        they would replace a good export; stopped before the export and before a checkpoint of them is written."""
        broken = non_finite_tensors(self.model)
        why = (f"the weights hold non-finite values in {len(broken)} tensor(s), e.g. {', '.join(broken[:3])}" if broken
               else "the weights are finite but the model's outputs overflow")
        last = complete_checkpoints(self.ckpt_root)
        hint = (f"the newest checkpoint is {last[-1][1]} (step {last[-1][0]}): resume from an earlier one (resume: <its path>) "
                "after lowering optim.lr / memory.lr, or check that checkpoint's files" if last else "lower optim.lr / memory.lr")
        return TrainingError(f"held-out loss {loss} at the end (step {self.step}): {why}; not exported, and the export "
                             f"directory is left as it was; {hint}")

    # ---------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        cfg = self.cfg
        self.setup()
        try:
            self.open_logs()
            self.say_what_runs()
        except BaseException:  # before any work (its output's reader gone, `| head`): no trace, as a failed setup
            self.close_logs()
            self.remove_unused_run_dir(self.created)
            raise
        final_eval = None
        try:
            if self.step == 0 and cfg.eval.at_start:
                self.evaluate_and_log(f"step {self.step}")
            self.meter = meter = Meter.start(self.step)
            meter.losses = self.losses_since_log()
            compiling = cfg.compile  # the first step compiles: minutes that no later step costs
            while self.step < self.total_steps:
                numbers = self.train_step()
                meter.interval_tokens += self.tokens_per_step
                meter.losses.append(numbers.loss)
                self.trace({"step": self.step, "blocks": numbers.blocks})
                self.bar.update(1)
                last = self.step == self.total_steps  # the end evaluates and checkpoints below, once
                if self.step % cfg.log.every == 0 or last:
                    self.log_step(numbers, meter, compiling=compiling)
                if compiling:
                    compiling = False
                    self.say(f"step {self.step}: the first step (compiling) took {time.perf_counter() - meter.started:.0f} s")
                    meter.restart_rate(self.step)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and not last:
                    self.evaluate_and_log(f"step {self.step}")
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not last:
                    self.save_checkpoint()
            elapsed, trained_steps = time.perf_counter() - meter.rate_t, self.step - meter.rate_step
            final_eval = self.evaluate_and_log(f"end (step {self.step})", once=True)
            if final_eval is not None and not math.isfinite(final_eval["eval_loss"]):
                raise self.unusable_end(final_eval["eval_loss"])
            written = complete_checkpoints(self.ckpt_root)
            if not written or written[-1][0] != self.step:
                self.save_checkpoint()
        except BaseException:
            if self.step == 0:  # stopped before its first step (the step-0 evaluation or the first step compiling, minutes of
                # it under compile: true): no trace, as a failed setup; an evaluation already logged keeps the run (trial48)
                self.close_logs()
                self.remove_unused_run_dir(self.created)
            raise
        finally:
            self.close_logs()
        if cfg.log.data_trace:
            self.trace({"final_checksum": weights_checksum(self.raw)})
        self.plot()
        out = self.export(final_eval)
        self.say(f"exported {printable(str(out))}")
        tps = trained_steps * self.tokens_per_step / elapsed if trained_steps else 0.0
        return TrainResult(self.run_dir, out, self.step, self.samples_seen * cfg.data.block_size, final_eval, tps,
                           elapsed / trained_steps if trained_steps else 0.0, self.acc.is_main_process)

    def budget_change_note(self, state: dict) -> str:
        """A resume whose step count changed (another token budget, or another number of tokens per
        step): the schedule is laid over the new total, not continued."""
        o, saved_total = self.cfg.optim, state["total_steps"]
        seen = self.samples_seen * self.cfg.data.block_size
        saved_config = state.get("config") if isinstance(state.get("config"), dict) else {}
        causes = []
        try:
            saved_budget = parse_count(saved_config["tokens"])
        except (KeyError, TypeError, ValueError):
            saved_budget = None
        if saved_budget != self.cfg.token_budget:
            causes.append(f"the budget is now {self.cfg.token_budget:,} tokens" + (f", not {saved_budget:,}" if saved_budget else ""))
        saved_step = _step_tokens(saved_config, state.get("world_size"))
        if saved_step is not None and saved_step != self.tokens_per_step:
            causes.append(f"a step is now {self.tokens_per_step:,} tokens, not {saved_step:,}: micro_batch_size x grad_accum x processes changed")
        why = "; ".join(causes)
        try:  # the lr the checkpoint's run had: its own peak, warmup and schedule, not this run's
            was = OptimConfig.model_validate(saved_config["optim"])
        except (KeyError, TypeError, ValueError):  # a checkpoint written before configs were saved
            was = o
        warmup_before = int(was.warmup) if was.warmup >= 1 else int(round(was.warmup * saved_total))
        before = lr_lambda(was, saved_total, warmup_before, was.schedule)(self.step) * was.lr
        after = lr_lambda(o, self.total_steps, self.warmup_steps, o.schedule)(self.step) * o.lr
        left = max(0, self.cfg.token_budget - seen)
        end = seen + (self.total_steps - self.step) * self.tokens_per_step
        rounded = f" (ending at {end:,} tokens: the budget rounded up to a whole step)" if end != self.cfg.token_budget else ""
        return (f"resuming at step {self.step} with {seen:,} tokens trained and {left:,} left of the budget{f' ({why})' if why else ''}: "
                f"the run now has {self.total_steps} optimiser steps, not {saved_total}{rounded}; the {o.schedule} learning-rate schedule "
                f"is laid over the new total, so the next step ({self.step + 1}) runs at lr {after:.3g} where the checkpoint's run had "
                f"{before:.3g}")  # lr_lambda(s) is the rate of the step the log numbers s + 1 (trial46: said one step early)

    def spent_budget_note(self) -> str | None:
        """A resume whose checkpoint has already trained the whole budget (or more): nothing to train."""
        seen = self.samples_seen * self.cfg.data.block_size
        if self.resume_from is None or self.step < self.total_steps or seen <= self.cfg.token_budget:
            return None
        return (f"the checkpoint has trained {seen:,} tokens, past the budget of {self.cfg.token_budget:,}: no step is left to train; "
                "the run evaluates and exports it (raise tokens to train on)")

    # ---------------------------------------------------------------- checkpoint and export
    def save_checkpoint(self) -> Path:
        facts = {"tokens_seen": self.samples_seen * self.cfg.data.block_size, "total_steps": self.total_steps, "world_size": self.world,
                 "data": self.data_identity, "config": self.cfg.model_dump(mode="json"), "init_from": self.init_identity,
                 "losses_since_log": list(self.meter.losses) if self.meter is not None else []}
        path = save_checkpoint(self.ckpt_root, self.acc, self.scheduler, step=self.step, samples_seen=self.samples_seen,
                               keep_last=self.cfg.checkpoint.keep_last, facts=facts, report=self.say)
        # said as Trainer says it: how much a stop would lose was found only in the folder (trial82 F11)
        self.say(f"checkpoint saved: {printable(str(path))}")
        return path

    def losses_since_log(self) -> list[float]:
        """The step losses the checkpoint resumed from had taken since its last log line: the first record after a
        resume then averages the same steps as an uninterrupted run's (trial46: it averaged only the steps since the
        checkpoint, unmarked). Older checkpoints record none."""
        saved = (self.resume_state or {}).get("losses_since_log")
        if not isinstance(saved, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in saved):
            return []
        return [float(v) for v in saved]

    def unchanged_since_apply(self) -> str | None:
        """Which of apply's tensors no run since apply has trained, for `verify`'s bit-for-bit weights
        check: "base" (the base layers and the tensors outside the layers), "all but memory", or None.
        A run from another run's export keeps only what both left alone."""
        kept = {"none": None, "base": "base", "memory-only": "all but memory"}[self.cfg.freeze]
        earlier = self.init_from / "midus_train.json"
        if earlier.is_file():
            try:
                before = loads_checked(read_small_text(earlier)).get("unchanged_since_apply")
            except (OSError, ValueError, AttributeError):
                before = None
            order = [None, "base", "all but memory"]
            kept = order[min(order.index(kept), order.index(before) if before in order else 0)]
        return kept

    def export(self, final_eval: dict | None) -> Path:
        dtype_name = self.init_dtype if self.cfg.export.dtype == "auto" else self.cfg.export.dtype
        summary = {"init_from": self.cfg.init_from,
                   # the starting weights' digest: analyze --fixed-retrieval compares it (two apply seeds share a plan)
                   "init_weights_sha256": self.init_identity.get(START_KEY),  # None: resumed from a checkpoint that had none
                   "steps": self.step, "tokens": self.samples_seen * self.cfg.data.block_size,
                   "held_out": final_eval, "precision": self.precision, "processes": self.world,
                   "memory_trained": bool(self.groups.memory),  # the card names a memory lr only then (trial55: a LLaMA-Pro run's did)
                   "unchanged_since_apply": self.unchanged_since_apply(), "init_dtype": str(self.init_dtype).removeprefix("torch."),
                   "export_dtype": str(dtype_name).removeprefix("torch."),  # held_out is of the float32 weights before this rounding
                   "config": self.cfg.model_dump(mode="json")}
        return export_model(self.acc, self.model, self.export_dir, run_dir=self.run_dir, init_from=self.init_from,
                            dtype=DTYPES.get(str(dtype_name).replace("torch.", ""), torch.float32), is_midus=self.is_midus,
                            summary=summary, report=self.say, replaces_owner=self.export_owner,
                            max_shard_bytes=parse_size(self.cfg.export.shard_size))

    # ---------------------------------------------------------------- evaluation and logs
    def evaluate(self) -> dict | None:
        """Held-out loss and perplexity (token-weighted over all processes); None without held-out data."""
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
        # under compile: true the evaluation runs eager: compiled, each batch shape compiled anew without a word (trial48:
        # 36-147 s of silence before step 0, and after the last step's ETA 0:00), for a pass that runs a few times a run
        with torch.compiler.set_stance("force_eager") if cfg.compile else contextlib.nullcontext():
            result = evaluate_batches(model, batches, device=self.acc.device, autocast=self.acc.autocast,
                                      reduce=lambda t: self.acc.reduce(t, reduction="sum"))
        return {"eval_loss": result.loss, "eval_ppl": result.perplexity, "eval_tokens": result.tokens, "eval_seconds": round(result.seconds, 3)}

    def evaluate_and_log(self, label: str, *, once: bool = False) -> dict | None:
        """Evaluate, record and say it (``label | held-out loss ...``). ``once``: not recorded again
        when metrics.jsonl already holds this step's evaluation (a finished run resumed)."""
        ev = self.evaluate()
        if ev:
            if not (once and self._logged_eval_at(self.step)):
                self.record({"step": self.step, "tokens": self.samples_seen * self.cfg.data.block_size, **ev})
            self.say(f"{label} | held-out loss {ev['eval_loss']:.4f} | ppl {ev['eval_ppl']:.2f}")
        return ev

    def log_step(self, numbers: StepNumbers, meter: Meter, compiling: bool = False) -> None:
        """The metrics record and the log line of the steps since the last one. ``compiling``: the steps include the one
        that compiled the model: no speed or ETA is said or recorded for them (trial65: "9 tok/s | 57.43 s/step | ETA
        6:42" with a second of training left), the next line's count from after it."""
        cfg = self.cfg
        now = time.perf_counter()
        # tok/s and s/step: the same steps, those since the last line (an evaluation or checkpoint
        # between them counts); the ETA: the mean step since the start, the evaluations and
        # checkpoints to come included
        tps = meter.interval_tokens / max(now - meter.interval_t, 1e-9)
        per_step = (now - meter.interval_t) / max(1, self.step - meter.interval_step)
        eta = (now - meter.rate_t) / max(1, self.step - meter.rate_step) * (self.total_steps - self.step)
        lrs = numbers.lrs  # what the step's update used (read after it, the groups hold the next step's: trial37)
        base_lr = lrs.get("base", lrs.get("base_no_decay"))  # None: no base parameter trains (memory only), no lr to write
        rec = {"step": self.step, "tokens": self.samples_seen * cfg.data.block_size, "loss": float(np.mean(meter.losses)),
               **({"lr": base_lr} if base_lr is not None else {}), **({"memory_lr": lrs["memory"]} if "memory" in lrs else {}),
               **numbers.norms, **({} if compiling else {"tokens_per_s": tps, "seconds_per_step": per_step}), "elapsed": now - meter.started}
        self.record(rec)
        mem = f" | mem lr {rec['memory_lr']:.2e}" if "memory_lr" in rec else ""
        base = f" | lr {rec['lr']:.2e}" if "lr" in rec else ""
        speed = "compiled in this step: tok/s and ETA from the next line" if compiling else f"{tps:,.0f} tok/s | {per_step:.2f} s/step | ETA {_hms(eta)}"
        self.say(f"step {self.step}/{self.total_steps} | loss {rec['loss']:.4f}{base}{mem} | "
                 f"{' | '.join(f'{NORM_LABELS[k]} {v:.3g}' for k, v in numbers.norms.items())} | {speed}")
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", **({} if compiling else {"tok_s": f"{tps:,.0f}"}))
        meter.interval_t, meter.interval_tokens, meter.interval_step, meter.losses = now, 0, self.step, []

    def open_logs(self) -> None:
        """metrics.jsonl (cut back to the checkpoint resumed from), tensorboard, the progress bar."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.acc.is_main_process:
            metrics = self.run_dir / "metrics.jsonl"
            self.cut_back(metrics, stepless=True)  # drop what a killed run logged after its last checkpoint
            if cfg.log.data_trace:  # the other processes' files too when this run has fewer: nobody else writes them
                for path in sorted((self.run_dir / "trace").glob("rank*.jsonl")):
                    if _rank_of(path.name) >= self.world:
                        self.cut_back(path)
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1 if self.step else None)  # the step resumed from was logged: kept
        if cfg.log.data_trace:  # each process its own file, before it writes again
            self.cut_back(self.run_dir / "trace" / f"rank{self.rank}.jsonl")
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not self.bars)

    def cut_back(self, path: Path, *, stepless: bool = False) -> None:
        """A log of this run's (metrics.jsonl, a data trace) cut back to the checkpoint resumed from, emptied on a fresh
        start (trial46: a trace kept a killed run's steps past its checkpoint, which the resumed run wrote again: 203
        records for 200 steps). ``stepless``: keep records without a step; a trace's end-of-run checksum is not kept,
        the run writes it again when it ends."""
        if not path.exists():
            return
        keep = [line for line, record in metric_lines(path) if (record["step"] <= self.step if "step" in record else stepless)]
        # a new file renamed over it, never truncated in place: a run directory copied with hard links (cp -al runs/a
        # runs/b) shares its logs' inodes with the original, and a run in the copy rewrote and appended to run a's own
        # log (trial139 F1); the appends that follow go to this run's file
        write_text_atomically(path, "".join(line + "\n" for line in keep) if self.resume_from is not None else "")

    def close_logs(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()

    def say_what_runs(self) -> None:
        """The start lines: model and export, the data and budget, the groups, precision and processes."""
        cfg, acc = self.cfg, self.acc
        where = f"resuming from {self.resume_from} (step {self.step})" if self.resume_from else "starting fresh"
        self.say(f"{'dry run: ' if self.dry else ''}train: {self.init_from} -> {self.export_dir}; {where}")
        for note in self.resume_notes:
            self.say(note)
        self.say(self.data_line())
        for note in self.data_notes():
            self.say(f"note: {note}")
        spent = self.spent_budget_note()
        if spent:
            self.say(spent)
        self.say(describe_groups(self.groups, cfg))
        # the start says it too: a run's log says what the run was expected to hold (trial93 F6)
        self.say(self.state_bytes_line())
        mode = "single process" if self.world == 1 else f"{acc.distributed_type.name} ({acc.state.backend})"
        adamw = "fused" if self.adamw_options.get("fused") else {True: "foreach", False: "for-loop"}.get(self.adamw_options.get("foreach"), "torch's default")
        self.say(f"precision {self.precision}, {mode} on {acc.device} x {self.world}, AdamW {adamw}, warmup {self.warmup_steps} step{'' if self.warmup_steps == 1 else 's'}, "
                 + ("then a constant lr" if cfg.optim.schedule == "constant" else f"{cfg.optim.schedule} decay"))
        if self.sharding_note:
            self.say(self.sharding_note)
        if launched := sharding.launcher_precision_note(self.precision):
            self.say(launched)
        if self.is_midus:
            self.say_memory_backend()
        if cfg.compile:
            self.say("compile: the first step compiles the model (minutes: about 2 for the 45-layer SmolLM2 outputs on an H200, "
                     "1-3 for a tiny model on a 2-core CPU); tok/s and ETA count from the second step; the held-out evaluations "
                     "run uncompiled")

    def say_memory_backend(self) -> None:
        """The memory layer's line: the kernels the start built, or for a dry run (which builds none) the
        ones a successful build gives; a failed build runs the pure-torch path, and the start says so."""
        from midus_surgery.model.hml import backend_words, bank_grad_note, prepare_kernels

        backend = prepare_kernels(self.model, self.acc.device, build=False) if self.dry else self.memory_backend
        hint = "" if backend == "torch" else " (MIDUS_HML_KERNELS=torch runs the pure-torch path instead)"
        built = ", built at the start, or found in the cache (a dry run builds none)" if self.dry and backend != "torch" else ""
        self.say(f"memory layer: {' + '.join(map(backend_words, backend.split('+')))}{built}{hint}")
        note = bank_grad_note(self.model, backend, self.acc.device.type)
        if note:
            self.say(note)

    def budget_words(self) -> str:
        """The token budget in steps: 'budget 1,024 tokens = 8 steps of 128 (...)'."""
        cfg, d = self.cfg, self.cfg.data
        size = f"{self.tokens_per_step:,} ({cfg.micro_batch_size} x {cfg.grad_accum} accum x {self.world} proc x {d.block_size})"
        steps = (f"{_count(self.total_steps, 'step')} of {size}{self.rounded_words()}" if not self.resume_from else  # a resume: the steps taken may have had another size
                 f"{self.total_steps} steps, {self.step} taken ({self.samples_seen * d.block_size:,} tokens) and {self.total_steps - self.step} to go of {size}")
        return f"budget {cfg.token_budget:,} tokens = {steps}"

    def rounded_words(self) -> str:
        """A fresh run whose budget is not a whole number of steps: the tokens it trains, said beside the budget."""
        ends = self.total_steps * self.tokens_per_step
        return "" if ends == self.cfg.token_budget else f", training {ends:,} tokens (the budget rounded up to a whole step)"

    def data_line(self) -> str:
        d = self.cfg.data
        if self.untokenised:  # a dry run: the blocks are known once the text is tokenised
            lines = [f"data: {what}: {_count(len(files), 'file')}, {human_bytes(sum(f.stat().st_size for f in files))} of text, "
                     f"not tokenised yet: the run tokenises it first, into {entry}" for what, files, entry in self.untokenised]
            return "\n".join([*lines, f"data: {self.budget_words()} (the epochs are known once the text is tokenised)"])
        held = len(self.held_blocks) if self.held_blocks else 0
        return (f"data: {_count(len(self.train_blocks), 'train block')}, {_count(held, 'held-out block')} of {d.block_size} tokens "
                f"({len(self.train_blocks) * d.block_size:,} train tokens); {self.budget_words()}, "
                f"{self.ends_at_tokens() / max(1, len(self.train_blocks) * d.block_size):.2f} epochs")

    def ends_at_tokens(self) -> int:
        """The tokens the run has trained when it ends: those trained so far (a resume's checkpoint) and the whole steps
        left, so the budget rounded up to a whole step, or what a resumed checkpoint already trained past it (trial46:
        a resume past the budget said the budget's epochs, half of what the model had trained)."""
        return self.samples_seen * self.cfg.data.block_size + (self.total_steps - self.step) * self.tokens_per_step

    def held_out_overlap(self) -> str | None:
        """The note on held-out files that are also training files byte for byte (listed in both, or
        a copy under another name), or None. Only when data.held_out is given: it walks both lists."""
        d, directory = self.cfg.data, self.loaded.directory
        train = D.resolve_inputs(d.train, directory, d.dir_glob, "data.train")
        held = D.resolve_inputs(d.held_out, directory, d.dir_glob, "data.held_out")
        if any(p.is_dir() for p in train + held):  # a tokenised corpus: its files are not here to compare
            return None
        shared = D.shared_files(train, held)
        if not shared:
            return None
        named = ", ".join(f"{h.name} (= {t.name})" if h.name != t.name else h.name for h, t in shared[:3])
        k, n = len(shared), len(held)
        which = ("data.held_out's one file is" if n == 1 else f"all {n} of data.held_out's files are" if k == n
                 else f"{k} of data.held_out's {n} files {'is' if k == 1 else 'are'}")
        return (f"{which} also in data.train, byte for byte: {named}{' ...' if k > 3 else ''}; the held-out perplexity is "
                f"{'' if k == n else 'partly '}measured on text the run trains on")

    def data_notes(self) -> list[str]:
        """What the run accepts but a user would want to know before it trains for hours."""
        notes = []
        identity = getattr(self, "data_identity", None) or {}  # a dry run of text not tokenised yet has none
        if identity and identity.get("held_out") == identity["train"]:
            notes.append("data.held_out is the same text as data.train: the held-out perplexity is measured on text the run trains on")
        elif self.cfg.data.held_out and (overlap := self.held_out_overlap()):
            notes.append(overlap)
        if nul := D.nul_note(*self.streams):
            notes.append(nul)
        read = [*(f for s in self.streams for f in s.meta.get("files", [])), *(f for _, files, _ in self.untokenised for f in files)]
        json_files = sorted({Path(f).name for f in read if Path(f).suffix.lower() == ".json"})
        if json_files:
            notes.append(f"{', '.join(json_files[:3])} {'is' if len(json_files) == 1 else 'are'} read as plain text, braces and all "
                         "(records are read from JSON Lines: .jsonl)")
        per_step = getattr(self, "tokens_per_step", None)
        if per_step and self.resume_state is None and self.cfg.token_budget < per_step:  # rounded up to one step (trial87 F10)
            notes.append(f"the budget of {self.cfg.token_budget:,} tokens is less than one step of {per_step:,} (micro_batch_size x "
                         f"grad_accum x processes x block_size): the run trains one step, about {per_step / self.cfg.token_budget:.0f}x the budget")
        held = getattr(self, "held_blocks", None)
        if getattr(self, "fsdp", False) and held is not None:  # every rank runs the wrapped model on as many blocks: a multiple of the processes (trial87 F7)
            n = len(held) if self.cfg.eval.max_blocks is None else min(len(held), self.cfg.eval.max_blocks)
            if n < self.world:
                notes.append(f"no held-out evaluation: under FSDP each of the {self.world} processes evaluates as many held-out blocks, "
                             f"and there {'is' if n == 1 else 'are'} {n}; add held-out text or raise data.held_out_fraction")
            elif n % self.world:
                notes.append(f"under FSDP the held-out pass reads {n - n % self.world} of its {n} blocks (a multiple of the "
                             f"{self.world} processes)")
        if self.total_steps and self.warmup_steps > self.total_steps:  # step s runs at (s + 1) / warmup: the last reaches it when equal
            notes.append(f"the warmup ({_count(self.warmup_steps, 'step')}) is longer than the run ({_count(self.total_steps, 'step')}): "
                         f"the learning rate never reaches optim.lr")
        return notes

    def record(self, rec: dict) -> None:
        """One metrics.jsonl line, and its numbers to tensorboard (main process)."""
        if not self.acc.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(strict_json(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "tokens", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
                    self.tb.add_scalar(tag, v, rec["step"])
            self.tb.flush()

    def trace(self, rec: dict) -> None:
        """log.data_trace: each process's blocks per step and final checksum (trace/rank<N>.jsonl)."""
        if not self.cfg.log.data_trace:
            return
        d = self.run_dir / "trace"
        d.mkdir(exist_ok=True)
        with open(d / f"rank{self.rank}.jsonl", "a") as fh:
            fh.write(strict_json(rec) + "\n")

    def plot(self) -> None:
        """log.plot: loss.png, train and held-out loss against tokens (main process)."""
        if not (self.cfg.log.plot and self.acc.is_main_process):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = [record for _, record in metric_lines(self.run_dir / "metrics.jsonl")]
        train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r and "tokens" in r]
        held = [(r["tokens"], r["eval_loss"]) for r in recs if "eval_loss" in r and "tokens" in r]
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
        try:  # a new file renamed over it: a hard-linked copy's loss.png is the original run's too (trial139 F1)
            with replaced_atomically(self.run_dir / "loss.png") as tmp:
                fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)

    def _logged_eval_at(self, step: int) -> bool:
        path = self.run_dir / "metrics.jsonl"
        if not self.acc.is_main_process or not path.exists():
            return False
        return any("eval_loss" in record and record.get("step") == step for _, record in metric_lines(path))


def _rank_of(name: str) -> int:
    """The process rank of a data trace file name (rank3.jsonl -> 3); -1 when it names none."""
    digits = name.removeprefix("rank").removesuffix(".jsonl")
    return int(digits) if digits.isdigit() else -1


def metric_lines(path: Path) -> list[tuple[str, dict]]:
    """The lines of metrics.jsonl with their records. A line that is not a JSON object is skipped:
    what a run killed (or out of disk) in the middle of a write leaves as its last line, after the
    last checkpoint, which a resume drops anyway."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = loads_checked(line, special_floats=True)  # lines of older versions kept NaN losses
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int):
            found.append((line, record))
    return found


def _enable_activation_checkpointing(model) -> None:
    """transformers' activation checkpointing, non-reentrant, by the name the installed release gives it:
    ``activation_checkpointing_enable``, or ``gradient_checkpointing_enable`` before the rename (after it, a
    deprecated alias that warns on every run and goes in v6)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# settings a resume takes from this run's config, though the checkpoint's optimiser state holds others, said in one line
# when they changed: the optimiser's, the schedule's (laid over the run again from the config each step) and the
# clipping (trial46: the schedule's and the clipping's changed silently)
OPTIMISER_KEYS = ("optim.lr", "optim.weight_decay", "optim.betas", "optim.eps", "memory.lr", "memory.weight_decay",
                  "optim.schedule", "optim.warmup", "optim.min_lr_ratio", "memory.schedule", "optim.grad_clip", "memory.grad_clip")
# settings that decide which parameters train (the optimiser's groups): a resume cannot change them
REGROUPING_KEYS = ("freeze", "memory.retrieval")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _at(config: dict, dotted: str):
    """config["a"]["b"] for "a.b", or None where the saved config lacks it (older checkpoints)."""
    for key in dotted.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def _step_tokens(config: dict, world_size) -> int | None:
    """Tokens per optimiser step of a checkpoint's run, from its saved config and process count."""
    try:
        return int(config["micro_batch_size"]) * int(config["grad_accum"]) * int(world_size) * int(config["data"]["block_size"])
    except (KeyError, TypeError, ValueError):
        return None


def warmup_steps(o: OptimConfig, total_steps: int) -> int:
    """optim.warmup in steps: a count, or below 1 a fraction of the run."""
    return int(o.warmup) if o.warmup >= 1 else int(round(o.warmup * total_steps))


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def train(loaded: LoadedTrainConfig, *, echo=print) -> TrainResult:
    """Run (or resume) the training a config describes."""
    runner = Runner(loaded, echo=echo)
    try:
        return runner.run()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cli.Terminated): say what is kept before the one-word report
        runner.say_where_to_resume()
        raise
    except RuntimeError as exc:
        unused = _parameters_without_gradient(exc, runner)
        if unused is not None:
            raise TrainingError(unused) from None
        if not lost_a_process(exc):
            raise
        said = one_line(exc, 300).split(". ")[0]  # gloo's first sentence says what broke; the rest is advice
        # its own error line, printed beside this one, says why: a refusal at the start (a run dir in use) is no crash to
        # resume from (trial74 F8: this process's advice read as the reason)
        raise TrainingError(f"another process of this run stopped ({said}): its own error says why; if it was killed, every "
                            "checkpoint written is whole: launch the run again with resume: auto to continue from the newest") from None
    finally:
        release_marker(runner.run_lock)


def _parameters_without_gradient(exc: RuntimeError, runner) -> str | None:
    """DDP's error when a trained parameter got no gradient in a step (a model part the loss never reaches), said in
    one line naming the parameters (DDP numbers them among the trained ones, in the model's order), with the
    setting that lets it train (trial53: hy_v4's indexer, a traceback from every process)."""
    text = str(exc)
    if "Expected to have finished reduction in the prior iteration" not in text:
        return None
    found = re.search(r"did not receive grad for rank \d+: ([\d ]+)", text)
    model = getattr(runner, "raw", None)
    trained = [name for name, p in model.named_parameters() if p.requires_grad] if model is not None else []
    indices = [int(i) for i in found.group(1).split()] if found else []
    names = [trained[i] for i in indices if i < len(trained)]
    which = (f"{len(names)} trained parameter(s) got no gradient in a step (e.g. {', '.join(names[:3])})" if names
             else "trained parameters got no gradient in a step")
    return (f"several processes (DDP) need every trained parameter to get a gradient each step, and {which}: the loss does "
            "not reach them; set ddp_find_unused_parameters: true (or freeze them)")


