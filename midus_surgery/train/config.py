"""The training config: a strict pydantic schema for `midus-surgery train` YAML files.

Every key is documented (``Field(description=...)``); unknown keys, wrong types and impossible
values are errors naming the field and its file:line:col, as for recipes. Any key can be
overridden from the command line with ``dotted.key=value`` (the value is read as a YAML
scalar, so ``optim.lr=3e-4``, ``freeze=base``, ``data.train=[a.txt, b.txt]`` all work); an
override naming an unknown key is an error.
"""

from __future__ import annotations

import re
import shlex
import types
import typing
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from midus_surgery.errors import Problem, RecipeError
from midus_surgery.recipe.schema import (
    RECIPE_ONLY_KEYS,
    TRAIN_ONLY_KEYS,
    Number,
    OutputPathText,
    PathText,
    Strict,
    checked_shard_size,
    problems_from_validation,
    unknown_key_hint,
    wrong_kind_of_file,
)
from midus_surgery.recipe.yaml_source import PathKey, YamlSource, load_yaml

# Bounds on numbers with a physical meaning, checked before anything is read or allocated.
MAX_TOKENS = 10**15  # a token budget: 1000x the largest published pre-training runs
MAX_BATCH = 65536  # blocks per micro-batch / per evaluation pass on one process
MAX_GRAD_ACCUM = 65536
MAX_BLOCK_SIZE = 2**20  # tokens per sequence
MAX_STEPS = 10**12  # step counts (log/eval/checkpoint intervals, warmup steps)
MAX_SEED = 2**63 - 1

PosInt = Annotated[StrictInt, Field(ge=1)]
StepCount = Annotated[StrictInt, Field(ge=0, le=MAX_STEPS)]


# 20M, 1.5B, 2000000, and scientific notation as researchers write budgets (1e6, 2.5e9: YAML reads those as text)
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\+?\d{1,2})?)\s*([KMGT])?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def parse_count(value: int | str) -> int:
    """``"20M"`` -> 20_000_000, ``"1.5B"`` -> 1_500_000_000, ``"1e6"`` -> 1_000_000; ints pass through."""
    if isinstance(value, bool):
        raise ValueError(f"not a count: {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text[-1:].lower() == "b" and len(text) > 1 and text[-2].isdigit():
        text = text[:-1] + "G"
    match = _COUNT.match(text)
    if not match:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ValueError(f"not a token count: {shown} (use e.g. 2000000, 20M, 1.5B, 1e6)")
    number = match.group(1)
    if len(number.lower().split("e")[0].split(".")[0].lstrip("0")) > 20:  # no float overflow or 400-digit arithmetic
        raise ValueError(f"token count {text[:40]}... is far too large")
    return int(Decimal(number) * _SCALE[(match.group(2) or "").lower()])


DIR_GLOB = ("**/*.txt", "**/*.md", "**/*.rst", "**/*.jsonl", "**/*.ndjson")  # the files read inside a folder named as data


# A data entry: an empty text would be Path("") - the current folder, every file under it read as training or
# held-out text without a word (trial138 F2); refused as init_from: "" is
DataPathText = Annotated[PathText, Field(min_length=1)]


class DataConfig(Strict):
    """The text to train on and the held-out split."""

    train: list[DataPathText] = Field(min_length=1, description="Training text: files (.txt/.md/.rst read as one document each; .jsonl/.ndjson one JSON record per line, see `text_field`; any other file is read as text), directories (every file matching `dir_glob` under them) and glob patterns. Relative paths are resolved against the config file's directory; `~` and `$NAME` / `${NAME}` expand in every path of this config (an unset variable or one set to nothing is an error, as is a path that expands to nothing or to blanks; `${NAME:-DEFAULT}` and `${NAME-DEFAULT}` give a default as in a shell, `${NAME:-}` says that nothing is fine; `$$` is a `$`).")
    held_out: list[DataPathText] | None = Field(None, description="Separate held-out files, directories or globs. When given, `held_out_fraction` is ignored and all training text is trained on; an empty list is as not given.")
    held_out_fraction: Number = Field(0.01, ge=0.0, lt=0.5, description="Without `held_out`: the fraction of packed blocks kept out of training, spread evenly over the corpus (block i is held out when floor((i+1)f) > floor(i f)). 0 disables held-out evaluation.")
    text_field: str = Field("text", min_length=1, description="The field of each JSONL record that holds the document's text.")
    dir_glob: list[str] = Field(default_factory=lambda: list(DIR_GLOB), min_length=1, description="Patterns selecting files inside directories named in `train` / `held_out` (sorted, deduplicated; hidden files and folders skipped, linked folders followed once each).")
    block_size: StrictInt = Field(512, ge=2, le=MAX_BLOCK_SIZE, description="Tokens per training sequence (at least 2: one to read, one to predict). Documents are joined with the tokenizer's EOS token and the stream is cut into blocks of this length (the tail shorter than one block is dropped).")
    cache_dir: PathText | None = Field(None, min_length=1, description="Where tokenised corpora are cached (memory-mapped token files keyed by a hash of the files' contents and the tokenizer). Default: $MIDUS_CACHE/tokens, or ~/.cache/midus-surgery/tokens without MIDUS_CACHE.")

    @field_validator("train", "held_out", "dir_glob", mode="before")
    @classmethod
    def _listify(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("held_out", mode="after")
    @classmethod
    def _empty_is_not_given(cls, value):
        """`held_out: []` names no file: read as not given (the fraction is judged and used), as the runner read it
        while the fraction beside it went unjudged (0.9 held out 90% of the corpus)."""
        return value or None

    @field_validator("held_out_fraction", mode="wrap")
    @classmethod
    def _not_judged_beside_held_out(cls, value, handler, info):
        """Beside data.held_out the fraction is ignored, so its range is not judged: 0.5 was refused there while 0.3
        was accepted and ignored (trial122 F4). A value that is not a number is still refused."""
        if info.data.get("held_out") is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return handler(value)


class OptimConfig(Strict):
    """AdamW and the learning-rate schedule of every parameter outside the memory tables."""

    lr: Number = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: Number = Field(0.1, ge=0.0, le=1.0, description="The decay ends at lr * min_lr_ratio.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup: cosine or linear to lr * min_lr_ratio at the end of the run (the last step runs just above it), or constant.")
    warmup: Number = Field(0.02, ge=0, le=MAX_STEPS, description="Linear warmup over this many steps (step s of W runs at lr * (s + 1) / W, so the first at lr / W and step W at lr): a number of optimiser steps if >= 1, a fraction of all steps if < 1 (rounded to the nearest step, a half to the even one: the default 0.02 warms up no step in a run under 25 steps).")
    weight_decay: Number = Field(0.1, ge=0.0, description="AdamW decoupled weight decay, applied to matrices only (not to biases, norms or 1-D tensors).")
    betas: tuple[Annotated[Number, Field(ge=0.0, lt=1.0)], Annotated[Number, Field(ge=0.0, lt=1.0)]] = Field((0.9, 0.95), description="AdamW betas.")
    eps: Number = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: Number = Field(1.0, ge=0.0, description="Clip the global gradient norm of these parameters to this value (0: no clipping).")
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = Field(
        "auto", description="How torch runs the AdamW update of every parameter, the memory tables' included: `fused` (one kernel over all tensors), "
        "`foreach` (batched tensor ops) or `for-loop` (one tensor at a time): the same update up to float rounding, at different speeds "
        "(docs/benchmarks.md, AdamW). `auto`: fused on CPU and CUDA, torch's own choice elsewhere.")

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("warmup >= 1 is a number of steps and must be a whole number")
        return value


class MemoryOptimConfig(Strict):
    """Optimiser settings of the memory tables: every parameter under `.hml.` (sub-keys, latent bank, head projections, the
    query norm's weights, and a query projection, gate or output projection where the recipe has them) and the shared bank
    `midus_shared_bank`."""

    lr: Number = Field(1e-3, gt=0, description="Learning rate of the memory tables (Meta's memory-layer code uses about 1e-3).")
    schedule: Literal["constant", "same"] = Field("constant", description="`constant`: fixed after the common warmup. `same`: the base schedule's shape scaled to this lr.")
    weight_decay: Number = Field(0.0, ge=0.0, description="Weight decay of the memory tables (none by default).")
    grad_clip: Number = Field(1.0, ge=0.0, description="Clip the memory tables' gradient norm separately from the rest (0: no clipping).")
    retrieval: Literal["learned", "frozen"] = Field(
        "learned", description="`frozen`: the Memory blocks' query path (their attention, query norm (and a `batch` norm's running "
        "statistics) and projection) and the sub-keys do not train; only the values (latent bank, head projections, value tables, "
        "gate, output projection) train. A block's query is made from the residual stream entering it, so the slots its tokens "
        "read stay as at the start only where nothing trains below it: with `freeze: base`, the first Memory block (when no "
        "other inserted block sits under it); later blocks read a stream the earlier blocks' trained values write into, and "
        "with `freeze: none` every block's stream moves. The start says which blocks keep their slots. The fixed-retrieval "
        "analysis: compare its held-out loss with a `learned` run's (`midus-surgery analyze --fixed-retrieval`).")


class EvalConfig(Strict):
    """Held-out perplexity during training (at step 0, every `every` steps and at the end)."""

    every: StepCount = Field(0, description="Evaluate every N optimiser steps (0: only at the start and the end).")
    max_blocks: StrictInt | None = Field(None, ge=1, le=MAX_STEPS, description="Evaluate on at most this many held-out blocks (the first ones; all when unset).")
    batch_size: PosInt | None = Field(None, le=MAX_BATCH, description="Blocks per forward pass in evaluation (default: `micro_batch_size`).")
    at_start: StrictBool = Field(True, description="Evaluate before the first step.")


class LogConfig(Strict):
    """What the run reports, and where (all files go to `run_dir`)."""

    every: PosInt = Field(10, le=MAX_STEPS, description="Write one line (loss, lr, tokens/s, ETA) and a metrics record every N optimiser steps.")
    progress: StrictBool = Field(True, description="Show tqdm progress bars (tokenising, loading, training) when the console is a terminal; in a log file (stderr not a terminal) the training bar is left out (the log lines carry the step, tokens/s and ETA) and tokenising writes a plain line every 30 s. Off: the log lines only.")
    tensorboard: StrictBool = Field(True, description="Write TensorBoard event files to `run_dir`/tensorboard.")
    plot: StrictBool = Field(True, description="Write `run_dir`/loss.png (train and held-out loss) at the end.")
    data_trace: StrictBool = Field(False, description="Debugging: each process appends the block indices it trains on, and a checksum of its weights at the end, to `run_dir`/trace/rank<N>.jsonl.")


class CheckpointConfig(Strict):
    """Full training state (model, optimiser, scheduler, RNG, data position), written atomically."""

    every: StepCount = Field(0, description="Save every N optimiser steps (0: only at the end).")
    keep_last: PosInt = Field(2, le=10_000, description="Keep the newest N checkpoints; older ones are deleted after a new one is complete.")


class ExportConfig(Strict):
    """The final model directory, loadable by transformers, `verify` and `eval`."""

    dir: OutputPathText | None = Field(None, min_length=1, description="Where to write the trained model (default: `run_dir`/final). Relative to the config file's directory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Dtype of the exported weights (`auto`: the dtype `init_from` was stored in).")
    shard_size: StrictInt | str = Field("2GB", description="Largest export shard, e.g. 2GB, 500MB, 1GiB, or bytes (from 1MB to 1PB), as `apply`'s `output.shard_size` (transformers' own default is one 50GB file).")

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: int | str) -> int | str:
        return checked_shard_size(value)


class TrainConfig(Strict):
    """A continued pre-training run of a model directory (an `apply` output or any causal LM)."""

    init_from: PathText = Field(min_length=1, description="The model directory to start from (weights, config, tokenizer; `midus_plan.json` when made by `apply`). Relative to the config file's directory.")
    resume: PathText | None = Field(None, description="Continue a run from its full state: `auto` (the newest complete checkpoint in `run_dir`/checkpoints; start fresh if there is none) or a checkpoint directory. Unset: start fresh (an error if `run_dir` already holds checkpoints, or if the export holds an earlier run's model: a fresh start would replace it).")
    run_dir: OutputPathText = Field(min_length=1, description="Where checkpoints, metrics.jsonl, TensorBoard logs, the loss plot and (by default) the final model go. Relative to the config file's directory.")
    trust_remote_code: StrictBool = Field(False, description="Allow the model directory's own modeling code (config.json `auto_map`); without it such a model is refused, as the stock class of its type would silently replace it. Not needed for MIDUS outputs: `import midus_surgery` registers their classes.")
    allow_pickle: StrictBool = Field(False, description="Read an `init_from` whose weights are pickle .bin files alone (with weights_only=True); without it such a model is refused, as `apply` refuses such a base without --allow-pickle. Outputs of `apply` and `train` are safetensors.")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="Seed of the data order (a deterministic function of it) and of torch's RNG.")
    data: DataConfig = Field(description="Training and held-out text (see `data`).")
    tokens: StrictInt | str = Field(description="Token budget: train for ceil(tokens / tokens_per_step) optimiser steps, where tokens_per_step = micro_batch_size * grad_accum * processes * block_size (a resume: the steps taken plus ceil(tokens left / tokens_per_step), so another step size still ends at the budget, rounded up to a whole step). E.g. 20000000, 20M, 1.5B or 1e6.")
    micro_batch_size: PosInt = Field(4, le=MAX_BATCH, description="Blocks per forward/backward pass on each process.")
    grad_accum: PosInt = Field(1, le=MAX_GRAD_ACCUM, description="Micro-batches accumulated per optimiser step.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="`bf16`: bf16 autocast with fp32 master weights and optimiser state (for GPUs and CPUs with native bf16, e.g. AVX512-BF16/AMX). `fp32`: everything in fp32 (bit-reproducible; on CPUs without native bf16 it is the faster one: measured 4x here). `auto`: bf16 on a GPU that supports it, else fp32.")
    freeze: Literal["none", "base", "memory-only"] = Field("none", description="`none`: train everything. `base`: train only inserted blocks (layers whose kind is not `base` in midus_plan.json: the LLaMA-Pro/MIDUS protocol; of a chain of applies, also the blocks an earlier apply inserted, its `inserted_before`). `memory-only`: train only the memory tables.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="AdamW and schedule of the non-memory parameters (see `optim`).")
    memory: MemoryOptimConfig = Field(default_factory=MemoryOptimConfig, description="Optimiser settings of the memory tables (see `memory`).")
    ddp_find_unused_parameters: StrictBool = Field(False, description="Several processes (DDP) only: let trained parameters that get no gradient in a step take part (torch's find_unused_parameters, a walk of the autograd graph every step). A model part the loss never reaches (HunYuan-V4's attention indexer) needs it; without it such a run stops at its first step, naming those parameters.")
    gradient_checkpointing: StrictBool = Field(False, description="Recompute activations in the backward pass (less memory, about 30% more compute).")
    compile: StrictBool = Field(False, description="torch.compile the model (on a 2-core CPU: a minute or two of compiling, then 0-12% off the step. On an H200, bf16, 16 x 1024 tokens: a step of the 45-layer SmolLM2 outputs takes 0.55x (DUS) and 0.70x (MIDUS) its eager time, after about 2 minutes of compiling; docs/benchmarks.md).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation (see `eval`).")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging (see `log`).")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints (see `checkpoint`).")
    export: ExportConfig = Field(default_factory=ExportConfig, description="The final model (see `export`).")

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, value: int | str) -> int | str:
        count = parse_count(value)
        if count < 1:
            raise ValueError(f"should be at least 1 token, got {value!r}")
        if count > MAX_TOKENS:
            raise ValueError(f"should be at most {MAX_TOKENS:.0e} tokens (1000x the largest published pre-training runs), got {value!r}")
        return value

    @field_validator("resume")
    @classmethod
    def _resume(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("resume is `auto`, a checkpoint directory, or unset")
        return value

    @property
    def token_budget(self) -> int:
        return parse_count(self.tokens)


class LoadedTrainConfig(BaseModel):
    """A validated config plus where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    config: TrainConfig
    source: typing.Any  # YamlSource or _OverriddenSource
    directory: Path

    def resolve(self, relative: str) -> Path:
        p = Path(relative)
        try:
            p = p.expanduser()
        except RuntimeError:  # ~user of an unknown user: taken literally
            pass
        return p if p.is_absolute() else (self.directory / p)

    def problem(self, path: PathKey, message: str) -> Problem:
        return Problem(self.source.where(tuple(path)), ".".join(map(str, path)), message)


class _OverriddenSource:
    """A YamlSource whose overridden keys are located on the command line."""

    def __init__(self, source: YamlSource, overridden: dict[PathKey, str]):
        self.file, self.data, self.marks, self._source, self._overridden = source.file, source.data, source.marks, source, overridden

    def where(self, path: PathKey = ()) -> str:
        for cut in range(len(path), 0, -1):
            text = self._overridden.get(tuple(path[:cut]))
            if text is not None:
                return text
        return self._source.where(path)

    def from_command_line(self, path: PathKey) -> bool:
        """Whether the value at ``path`` (or a section holding it) was set by an override."""
        return any(tuple(path[:cut]) in self._overridden for cut in range(len(path), 0, -1))

    def in_block(self, path: PathKey) -> bool:
        """Whether the key is the file's, in a block mapping (an override's value has no indent to speak of)."""
        return not self.from_command_line(path) and self._source.in_block(path)

    def position(self, path: PathKey = ()) -> tuple[int, int] | None:
        """An overridden key sorts after the file's lines: the command line comes after the file."""
        if any(tuple(path[:cut]) in self._overridden for cut in range(len(path), 0, -1)):
            return (1 << 30, 0)
        return self._source.position(path)


def _submodel(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (also through ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _check_key(dotted: str) -> list[str] | str:
    """The key's parts, or an error message when the schema has no such key."""
    parts = dotted.split(".")
    model: type[BaseModel] | None = TrainConfig
    for i, part in enumerate(parts):
        if model is None:
            return f"{'.'.join(parts[:i])} is not a section (it has no key {part!r})"
        if part not in model.model_fields:
            return f"unknown key {part!r}" + unknown_key_hint(TrainConfig, tuple(parts[: i + 1]))  # as the file's own key is told
        model = _submodel(model.model_fields[part].annotation)
    return parts


def _on_command_line(text: str, limit: int = 80) -> str:
    """Where an override is: ``command line (key=value)``, a long value shortened."""
    return f"command line ({text if len(text) <= limit else text[:limit] + '...'})"


def _leading_star_hint(key: str, parts: list[str], raw: str) -> str:
    """How to write an override whose value YAML read as an alias (a leading *): each starred item in YAML's single
    quotes (an inner ' doubled: '*it''s'), the whole quoted for the shell, in double quotes unless it holds what the
    shell reads inside them. A bare comma list (*.md, *.txt) is a list only in brackets: quoted item by item without
    them, the suggestion was itself a YAML error (trial136 F9). A suggestion that still would not read is not given."""
    quoted = re.sub(r"(^|[\[{,]\s*|:\s+)(\*[^,\]}]*)", lambda m: m[1] + "'" + m[2].replace("'", "''") + "'", raw.strip())
    if not quoted.startswith(("[", "{")) and "," in quoted:
        quoted = f"[{quoted}]" if _holds_a_list(parts) else "'" + raw.strip().replace("'", "''") + "'"
    try:
        load_yaml("command line", text=quoted)
    except RecipeError:  # e.g. [*a]b: no quoting of its items makes it YAML
        return " (YAML reads a leading * as an alias: put the value in YAML's single quotes, inside the shell's quotes)"
    suggestion = f"{key}={quoted}"
    shell = f'"{suggestion}"' if not re.search(r'["$`\\!]', suggestion) else shlex.quote(suggestion)
    return f" (YAML reads a leading * as an alias: quote the value inside the shell's quotes, {shell})"


def _holds_a_list(parts: list[str]) -> bool:
    """Whether the config key at ``parts`` (checked by _check_key) takes a list (also through ``X | None``)."""
    model: type[BaseModel] = TrainConfig
    for part in parts[:-1]:
        model = _submodel(model.model_fields[part].annotation)
    annotation = model.model_fields[parts[-1]].annotation
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return any(typing.get_origin(kind) is list for kind in kinds)


def apply_overrides(source: YamlSource, overrides: list[str]) -> tuple[_OverriddenSource, list[Problem]]:
    """Apply ``dotted.key=value`` overrides (values read as YAML) to ``source.data`` in place; the
    problems of those that cannot be applied (an unknown key, a value that is not YAML) are returned,
    to be listed with the file's own (trial50: an override's unknown key hid them)."""
    problems: list[Problem] = []
    overridden: dict[PathKey, str] = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem("command line", "", f"override {text[:80]!r} is not key=value (e.g. optim.lr=3e-4)"))
            continue
        parts = _check_key(key)
        if isinstance(parts, str):
            problems.append(Problem(_on_command_line(text), key, parts))
            continue
        try:
            # the recipe loader, with its limits (no alias bombs, no unknown tags, no 5000-digit numbers)
            value = load_yaml("command line", text=raw).data if raw.strip() else None
        except RecipeError as exc:
            said = "; ".join(p.message for p in exc.problems)
            if re.search(r"(^|[\[{,]|:\s)\s*\*", raw.strip()):  # data.dir_glob=*.md: a leading * is a YAML alias (trial122 F5)
                said += _leading_star_hint(key, parts, raw)
            problems.append(Problem(_on_command_line(text), key, f"cannot read the value as YAML: {said}"))
            continue
        node = source.data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        overridden[tuple(parts)] = _on_command_line(text)
    return _OverriddenSource(source, overridden), problems


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> LoadedTrainConfig:
    """Read, override and schema-check a training config; every problem is reported at once."""
    path = Path(path)
    source = load_yaml(path)
    if not isinstance(source.data, dict):
        raise RecipeError([Problem(source.where(), "", "a training config is a YAML mapping (key: value pairs) at the top level")])
    if wrong_kind_of_file(source, TRAIN_ONLY_KEYS, RECIPE_ONLY_KEYS):
        raise RecipeError([Problem(source.where(), "", "this is a recipe (it has base: and layout:), not a training config: `midus-surgery apply` "
                                   "writes its model; a training config has init_from:, run_dir:, data: and tokens: "
                                   "(`midus-surgery train --keys`, recipes/train/)")])
    located, unapplied = apply_overrides(source, list(overrides or []))
    try:
        config = TrainConfig.model_validate(located.data)
    except ValidationError as exc:  # the file's problems in its order, then the command line's
        raise RecipeError(problems_from_validation(exc, located, TrainConfig) + unapplied) from None
    if unapplied:
        raise RecipeError(unapplied)
    return LoadedTrainConfig(config=config, source=located, directory=path.resolve().parent)


def config_reference_markdown() -> str:
    """A table of every key, its default and its meaning (for docs/training.md)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = _submodel(field.annotation)
            key = f"{prefix}{name}"
            if sub is not None and field.is_required() is False and field.default_factory is not None:
                lines.append(f"| `{key}` | (section) | {field.description} |")
                walk(sub, key + ".")
                continue
            if sub is not None:
                lines.append(f"| `{key}` | (section, required) | {field.description} |")
                walk(sub, key + ".")
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.default_factory() if field.default_factory is not None else field.default
                default = "unset" if value is None else f"`{yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True).strip().removesuffix('...').strip()}`"
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {default} | {desc} |")

    walk(TrainConfig, "")
    return "\n".join(lines) + "\n"
