"""The recipe language: a strict pydantic schema for YAML recipes.

A recipe names a base model, the layout of the new depth (slices, interleaved insertion, top
stacking or an explicit list), the kind of every inserted block (``copy``, ``identity``
or ``memory``; ``transformer`` is the older name of ``copy``), the memory (HML) settings, and where and how to write the output. Unknown
keys, wrong types and impossible values are errors naming the field and file:line:col.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from midus_surgery.errors import Problem, RecipeError, control_character_in_name, printable
from midus_surgery.recipe.anatomy_spec import Anatomy
from midus_surgery.recipe.yaml_source import YamlSource, load_yaml

SCHEMA_URL_COMMENT = "# yaml-language-server: $schema=../docs/recipe.schema.json"

# `copy`: a plain copy of its source (DUS); `transformer` is the same, the name older recipes use.
InsertedKind = Literal["copy", "transformer", "identity", "memory"]
LayerKind = Literal["base", "copy", "transformer", "identity", "memory"]
# Bounds on numbers with a physical meaning, checked before anything is built or allocated.
MAX_BASE_LAYERS = 1024  # decoder layers of a base model (the deepest published LMs have ~200)
MAX_OUTPUT_LAYERS = 2048  # decoder layers after up-scaling
MAX_N_SUBKEYS = 8192  # n: n*n = 67M memory slots per head
MAX_TOPK = 4096
MAX_LATENT_DIM = 65536
MAX_BANK_ELEMENTS = 2**40  # n*n*d_l of one HIVE bank: 1.1e12 values, 4.4 TB in fp32
MAX_SHARD_BYTES = 10**15  # 1 PB: larger than any model, i.e. "one shard"
MAX_SEQ_LEN = 100_000_000
MAX_SEED = 2**63 - 1
# float32's smallest normal number (model.hml.MIN_NORM_EPS, without importing torch): the query norm computes in
# float32, where a smaller epsilon is 0 or subnormal and a pad position's zero query normalises to NaN (trial99 W3)
MIN_NORM_EPS = 2.0**-126

HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}", re.ASCII)  # [org/]name

NonNegInt = Annotated[StrictInt, Field(ge=0, le=MAX_BASE_LAYERS)]  # a base layer index (or a slice's end)

# $NAME, ${NAME} (or ${...} that is no name: an error), and $$ for a $ itself
_ENV_REFERENCE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<dollar>\$)|(?P<open>\{))")
# inside ${...}: NAME:-WORD (WORD where NAME is unset or set to nothing) and NAME-WORD (WORD where NAME is unset), as in a shell
_WITH_DEFAULT = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?-)(?P<word>.*)", re.DOTALL)


def expand_environment(text: str) -> str:
    """A path as written in a YAML file with $NAME and ${NAME} read from the environment, as a shell
    would ($SCRATCH/models on a cluster). Not left as they are: an output written to a folder named
    `$HOME` under the recipe's folder is no user's intent (trial49). An unset name is an error, not
    an empty text (`$OUT/model` would become `/model`), and so is a name set to nothing, for the same
    reason (trial144 F1); $$ is a literal $. A shell's defaults say what to use instead, and that
    nothing is fine where it is said so: `${SUFFIX:-}` (unset or empty: nothing), `${RUNS:-$HOME/runs}`,
    `${TAG-v1}` (unset: v1; set to nothing: refused as $TAG is). A path of nothing but blanks is
    refused too: a folder named one space is a slip, never a wish."""
    set_to_nothing: list[str] = []

    def value(match: re.Match) -> str:
        if match["dollar"]:
            return "$"
        if match["open"]:
            raise ValueError(f"{text!r} opens ${{ without closing it (write $$ for a $ itself)")
        name = match["braced"] if match["braced"] is not None else match["name"]
        default = _WITH_DEFAULT.fullmatch(name) if match["braced"] is not None else None
        if default is not None:
            name, word = default["name"], default["word"]
            if "${" in word:  # the reference's end is the first }, so ${A:-${B}} would be cut at B's
                raise ValueError(f"{text!r}: the default of ${{{name}{default['op']}...}} holds a ${{...}} (write $NAME there)")
            if name not in os.environ or (default["op"] == ":-" and os.environ[name] == ""):
                return _ENV_REFERENCE.sub(value, word)  # the default, its own $NAME expanded by the same rules
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{text!r}: ${{{name}}} is not an environment variable's name (write $$ for a $ itself)")
        if name not in os.environ:
            raise ValueError(f"{text!r} names ${name}, which is not set in the environment (write $$ for a $ itself, "
                             f"${{{name}:-DEFAULT}} for a default)")
        if os.environ[name] == "":
            set_to_nothing.append(name)
        return os.environ[name]

    expanded = _ENV_REFERENCE.sub(value, text)
    if text and not expanded:  # init_from: $EMPTY was "", the config's own folder (as an empty data path was: trial138 F2)
        raise ValueError(f"should be a path, got an empty text ({text!r} expands to nothing)")
    if set_to_nothing:  # $OUT/model with OUT="" is /model: written as root at the top of the filesystem
        raise ValueError(f"{text!r} names ${set_to_nothing[0]}, which is set to nothing: the path would be {expanded!r} "
                         f"(set it, leave it out of the path, or write ${{{set_to_nothing[0]}:-}} where nothing is meant)")
    if text and not expanded.strip():
        raise ValueError(f"should be a path, got only blanks ({expanded!r})")
    return expanded


# A path a user writes in a recipe or a training config: ~ and $NAME / ${NAME} expanded
PathText = Annotated[str, AfterValidator(expand_environment)]


def no_control_characters(text: str) -> str:
    """A folder the tool creates may not be named with a newline, tab or other control character (control_character_in_name).
    (Blanks at either end of a name the tool makes: check_output_dir.)"""
    why = control_character_in_name(text)
    if why:
        raise ValueError(why)
    return text


# A folder the tool writes: a PathText without control characters
OutputPathText = Annotated[PathText, AfterValidator(no_control_characters)]


def not_a_boolean(value):
    """YAML's true/false (and yes/no, on/off) are no number: pydantic's lax float took true for 1.0, so `optim.lr:
    true` trained at a learning rate of 1 (trial138 F4). Whole numbers and numbers written as text (3e-4, which YAML
    1.1 reads as a string) still are numbers."""
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


Number = Annotated[float, BeforeValidator(not_a_boolean)]  # a float field: every number but a boolean


class Strict(BaseModel):
    """The base of both YAML schemas (recipes and training configs): unknown keys are errors,
    values are frozen once validated, and no float may be infinite or NaN."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BaseModelSpec(Strict):
    """The pre-trained model to up-scale."""

    path: PathText = Field(min_length=1, description="A local Hugging Face model directory (config.json + safetensors) or a .gguf file. Relative paths are resolved against the recipe's directory; `~` and `$NAME` / `${NAME}` expand (an unset variable or one set to nothing is an error, as is a path that expands to nothing or to blanks; `${NAME:-DEFAULT}` and `${NAME-DEFAULT}` give a default as in a shell, `${NAME:-}` says that nothing is fine; `$$` is a `$`).")
    config: PathText | None = Field(None, min_length=1, description="A config.json to plan from when `path` is not present (lets `validate`/`plan` run on a machine without the weights). Defaults to `path`/config.json, or the GGUF's own metadata.")
    gguf_file: PathText | None = Field(None, min_length=1, description="The GGUF file's name inside `path` when `path` is a directory holding one (`$NAME` expands as in `path`).")
    trust_remote_code: StrictBool = Field(False, description="Allow the base model's own modeling code (Hub `auto_map`). Off by default.")
    hub_id: str | None = Field(None, description="The base's Hugging Face Hub id (`org/name`), written as `base_model` in the output's model card. Found without it when `path` is a snapshot in the Hub cache (`models--org--name/snapshots/...`). Nothing is downloaded.")

    @field_validator("hub_id")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        # the Hub's own rule (huggingface_hub.utils.validate_repo_id): [org/]name of letters, digits, - _ .
        if value is not None and (not HUB_ID.fullmatch(value) or "--" in value or ".." in value or value.endswith(".git")):
            raise ValueError(f"should be a Hub id such as HuggingFaceTB/SmolLM2-135M (letters, digits, '-', '_', '.'), got {value!r}")
        return value


class Slice(Strict):
    """A contiguous range of base layers, mergekit-style half-open [start, end)."""

    layers: tuple[NonNegInt, NonNegInt] = Field(description="[start, end): base layers start..end-1, e.g. [0, 24].")
    kind: InsertedKind = Field("copy", description="Kind given to the copies in this slice (base layers that already appeared in an earlier slice).")
    memory: list[NonNegInt] = Field(default=[], description="Base layer indices whose copies in this slice become `memory` blocks (overrides `kind` for them).")

    @model_validator(mode="after")
    def _ordered(self) -> "Slice":
        start, end = self.layers
        if end <= start:
            raise ValueError(f"layers must be [start, end) with end > start, got [{start}, {end}]")
        outside = [i for i in self.memory if not start <= i < end]
        if outside:
            raise ValueError(f"memory lists layers {outside} that are outside this slice [{start}, {end})")
        return self


class Interleave(Strict):
    """Insert a copy of a base layer right after it (LLaMA-Pro / MIDUS placement)."""

    after_every: StrictInt | None = Field(None, ge=1, le=MAX_BASE_LAYERS, description="Insert after every N base layers: after layers N-1, 2N-1, ... (the last layer of each group).")
    after: list[NonNegInt] | None = Field(None, description="Insert after exactly these base layers.")
    kind: InsertedKind = Field("memory", description="Kind of the inserted blocks.")

    @model_validator(mode="after")
    def _one_rule(self) -> "Interleave":
        if (self.after_every is None) == (self.after is None):
            raise ValueError("give exactly one of `after_every` or `after`")
        return self


class Stack(Strict):
    """Append copies of a range of base layers on top of the whole base stack."""

    layers: tuple[NonNegInt, NonNegInt] = Field(description="[start, end): the base layers to copy, appended in order after the last base layer.")
    kind: InsertedKind = Field("copy", description="Kind of the appended copies.")

    @model_validator(mode="after")
    def _ordered(self) -> "Stack":
        if self.layers[1] <= self.layers[0]:
            raise ValueError(f"layers must be [start, end) with end > start, got {list(self.layers)}")
        return self


class LayerEntry(Strict):
    """One output layer of an explicit layout."""

    source: NonNegInt = Field(description="The base layer this output layer is made from.")
    kind: LayerKind | None = Field(None, description="`base` (the original layer), or the kind of a copy. Default: `base` for the first entry of a source layer without a kind (unless another of its entries says `kind: base`), `copy` for the others; an identity or memory entry listed before its source's original is still the inserted copy.")


class Layout(Strict):
    """The new depth. Give exactly one of `slices`, `interleave`, `stack`, `layers`."""

    slices: list[Slice] | None = Field(None, min_length=1, description="SOLAR-style: output = the slices concatenated. The first use of a base layer is the original; later uses are copies.")
    interleave: Interleave | None = Field(None, description="LLaMA-Pro/MIDUS-style insertion of copies after chosen base layers.")
    stack: Stack | None = Field(None, description="Top stacking: copies of a range of layers appended at the top.")
    layers: list[LayerEntry] | None = Field(None, min_length=1, max_length=MAX_OUTPUT_LAYERS, description="Explicit per-layer list, for anything else.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Layout":
        given = [name for name in ("slices", "interleave", "stack", "layers") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of slices, interleave, stack, layers (got {', '.join(given) or 'none'})")
        return self


class MemorySettings(Strict):
    """The Head-wise Memory Layer (HML + HIVE) of every `memory` block (docs/method.md: the MIDUS paper's sections 3-5)."""

    n_subkeys: StrictInt = Field(256, ge=2, le=MAX_N_SUBKEYS, description=f"n: sub-keys per query half; each head addresses n*n slots (2 to {MAX_N_SUBKEYS}).")
    topk: StrictInt = Field(32, ge=1, le=MAX_TOPK, validate_default=True, description=f"k: slots read per head and token (two-stage top-k); 1 to n (and at most {MAX_TOPK}).")
    latent_dim: StrictInt = Field(256, ge=1, le=MAX_LATENT_DIM, description=f"d_l: width of the shared HIVE latent bank (n*n x d_l; 1 to {MAX_LATENT_DIM}, and n*n*d_l at most {MAX_BANK_ELEMENTS:.3g}). Not used when hive is false (its range is still checked).")
    hive: StrictBool = Field(True, description="HIVE values: one latent bank shared by all heads plus a d_l x d_h projection per head. False: a value table of width d_h per head.")
    query_norm: Literal["none", "rms", "layer", "batch"] = Field("rms", description="Per-head normalisation of the query before scoring. "
        "`batch`: each query feature standardised with running statistics over the tokens seen in training (the product-key "
        "memory paper's query BatchNorm, without batch statistics: no token's query depends on another token), then rms. The "
        "statistics count every token a training forward sees, pad tokens too: `midus-surgery train` packs blocks with none, "
        "a trainer with a padding collator counts its pads. Under several processes (DDP, FSDP) they count every "
        "process's micro-batches: each training forward gathers every process's statistics and applies them in rank order, "
        "so they are the same on every process; every process must then run each training forward together, as "
        "`midus-surgery train` does (the gather is a collective that every process enters). Its "
        "statistics (2 x heads x head_dim + 1 values a memory block) are written with the weights but are no parameters, so "
        "plan's parameter counts leave them out.")
    gate: StrictBool = Field(False, description="Memory+-style SiLU gate on the memory output.")
    output_proj: Literal["auto", "always", "never"] = Field("auto", description="Output projection to the hidden size: `auto` adds one only when heads*head_dim != hidden size.")
    query_source: Literal["heads", "hidden"] = Field("heads", description="`heads`: each head's attention output queries its memory (MIDUS). `hidden`: the generic variant, queries projected from x + Attn(Norm(x)); the attention keeps its output projection, zeroed as in LLaMA-Pro so the block starts as the identity.")
    init: Literal["zero_proj", "zero_bank", "random"] = Field("zero_proj", description="`zero_proj`: head projections zero, bank random (output exactly 0 at start, function-preserving). `zero_bank`: bank zero, projections random (also function-preserving). `random`: not function-preserving.")
    norm_eps: Number = Field(1e-6, ge=MIN_NORM_EPS, le=1.0, description=f"Epsilon of the per-head query norm; at least {MIN_NORM_EPS!r} "
                            "(float32's smallest normal number, which the norm computes in: a smaller one is 0 or subnormal there, and "
                            "a pad position's zero query then normalises to NaN).")
    bank_grad: Literal["auto", "sparse_mm", "embedding_bag", "index_add", "segment"] = Field("auto", description="How the backward accumulates the bank (or value table) gradient; all give the same dense gradient, at different speeds (docs/hml.md). auto: sparse_mm on CPU, embedding_bag on CUDA (segment on the Triton kernels for rows of 128+ and 2^23+ contributions). segment: the Triton kernels' deterministic sort-free segment reduce (CUDA; auto on a path without Triton kernels). index_add on the fused kernels: float atomics, not deterministic.")
    share_bank: StrictBool = Field(False, description="One latent bank shared by all memory blocks of the model instead of one per block.")
    kernels: Literal["auto", "fused", "torch", "triton", "triton-fused"] | None = Field(None, description="What the memory layer runs on, written into the output's config when set: `auto` (compiled CPU kernels on CPU, Triton on CUDA, else pure torch), `fused` (insist on the CPU kernels), `torch`, `triton`, `triton-fused` (the whole read in one Triton kernel on CUDA; opt-in: slower than `triton` at 16 x 1024 on an H200). Unset: `MIDUS_HML_KERNELS` where the model is loaded, else `auto` (docs/hml.md).")

    @field_validator("topk")
    @classmethod
    def _k_le_n(cls, topk: int, info) -> int:
        # a field's check, not the model's: located at topk, and said beside the other fields' problems (trial52)
        n = info.data.get("n_subkeys")
        if n is not None and topk > n:
            raise ValueError(f"topk ({topk}) must be <= n_subkeys ({n})")
        return topk

    @model_validator(mode="after")
    def _bank_size(self) -> "MemorySettings":
        if self.hive and self.n_subkeys**2 * self.latent_dim > MAX_BANK_ELEMENTS:
            # exact counts: rounded, a bank just past the limit read "= 1.1e+12 values (more than 1.1e+12)" (trial150 L4)
            raise ValueError(f"the HIVE bank would hold n_subkeys^2 * latent_dim = {self.n_subkeys**2 * self.latent_dim:,} values per memory "
                             f"block (more than {MAX_BANK_ELEMENTS:,} = 2^40, {MAX_BANK_ELEMENTS * 4 / 1e12:.1f} TB in fp32); use a smaller "
                             "n_subkeys or latent_dim")
        if self.share_bank and not self.hive:
            raise ValueError("share_bank needs hive: true (the shared object is the HIVE latent bank)")
        return self

    def hml_dict(self) -> dict:
        """The settings the HML layer itself takes (everything but model-level sharing)."""
        data = self.model_dump(exclude={"share_bank"})
        if data["kernels"] is None:
            del data["kernels"]  # the environment decides where the model runs, not the output's config
        return data


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}  # PB: the bound the shard size states


def parse_size(value: int | str) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MiB"`` -> 524_288_000, ints are bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 2GB, 500MB, 1GiB or a number of bytes)")
    number = match.group(1)
    if len(number.split(".")[0].lstrip("0")) > 20:  # exact below, but no float overflow or 400-digit arithmetic
        raise ValueError(f"size {_short(value)} is far too large")
    return int(Decimal(number) * _UNITS[(match.group(2) or "B").lower()])


def checked_shard_size(value: int | str) -> int | str:
    """A shard size (apply's ``output.shard_size``, train's ``export.shard_size``) from 1MB to 1PB, else ValueError."""
    size = parse_size(value)
    if size < 1_000_000:
        raise ValueError(f"should be at least 1MB, got {_short(value)}")
    if size > MAX_SHARD_BYTES:
        raise ValueError(f"should be at most 1PB (larger than any model: one shard), got {_short(value)}")
    return value


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class OutputSpec(Strict):
    """Where and how the up-scaled model is written."""

    dir: OutputPathText = Field(min_length=1, description="Output directory (relative to the recipe's directory; `~` and `$NAME` expand, as in `base.path`). `apply --out DIR` replaces it; DIR, as every path given on the command line, is relative to the current directory. Written atomically. It may not be, contain or lie inside an input; an existing output of midus-surgery is replaced only with --overwrite, and a directory the tool did not write never (docs/reliability.md).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Dtype of the written weights. `auto`: the base's dtype.")
    shard_size: StrictInt | str = Field("2GB", description="Largest output shard's tensor data, e.g. 2GB, 500MB, 1GiB, or bytes (from 1MB to 1PB); each file adds its header (the tensors' names and shapes, padded for alignment), and a tensor larger than this gets a shard of its own.")

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: int | str) -> int | str:
        return checked_shard_size(value)

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)


class Recipe(Strict):
    """A MIDUS / DUS up-scaling recipe."""

    base: BaseModelSpec = Field(description="The pre-trained model to up-scale (see `base`).")
    layout: Layout = Field(description="The new depth (see `layout`).")
    memory: MemorySettings = Field(default_factory=MemorySettings, description="HML settings for `memory` blocks.")
    allow_adjacent_memory: StrictBool = Field(False, description="Allow two memory blocks back to back (MIDUS never does; say so explicitly to do it).")
    allow_dropped_layers: StrictBool = Field(False, description="Allow a layout that leaves base layers out of the output while inserting others (depth pruning with up-scaling). Without it such a layout is refused, naming the layers: a slice list that skips a layer is usually an off-by-one. With identity or memory blocks the output then cannot start as the base's function: set accept_function_change too.")
    accept_function_change: StrictBool = Field(False, description="Write identity and memory blocks that the planner finds do not start as the identity (it applies the recipe to a tiny random replica of the base first: post-norm blocks, layers whose code depends on their index or on the depth). Without it such a recipe is refused; with it `verify` skips its identity check, saying why, and shows the perplexities of base and output.")
    anatomy: Anatomy | None = Field(None, description="State the decoder block's anatomy when it cannot be traced (normally found automatically).")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="Seed of every new tensor's initialisation (each tensor is seeded from this and its name).")
    flops_seq_len: StrictInt = Field(2048, ge=1, le=MAX_SEQ_LEN, description="Sequence length assumed by the FLOPs-per-token estimate (attention cost grows with it).")
    output: OutputSpec = Field(description="Where and how the up-scaled model is written (see `output`).")


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from, for locating later (semantic) problems."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    recipe: Recipe
    source: YamlSource
    directory: Path

    def problem(self, path: tuple[str | int, ...], message: str) -> Problem:
        return Problem(self.source.where(path), ".".join(map(str, path)), message)

    def resolve(self, relative: str) -> Path:
        """A path written in the recipe, resolved against the recipe's directory."""
        p = Path(relative)
        try:
            p = p.expanduser()
        except RuntimeError:  # ~user of an unknown user: taken literally, as a relative path
            pass
        return p if p.is_absolute() else (self.directory / p)


# pydantic's wrong-type errors, said in YAML's words ("Input should be a valid dictionary or instance of Slice")
_EXPECTED = {
    "int_type": "a whole number", "int_from_float": "a whole number", "bool_type": "true or false",
    "string_type": "text", "float_type": "a number", "list_type": "a list", "tuple_type": "a list",
    "dict_type": "a mapping (key: value pairs)", "model_type": "a mapping (key: value pairs)",
    "model_attributes_type": "a mapping (key: value pairs)",
    "float_parsing": "a number", "int_parsing": "a whole number",
}
_MAPPING_TYPES = ("dict_type", "model_type", "model_attributes_type")


def _as_yaml(value) -> str:
    """A value as the user wrote it in YAML, with its kind where the kind is the mistake."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return f"the text {_short(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return _short(value)


# pydantic's bound errors, by error type: (the context key, how the bound reads)
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "less_than_equal": ("le", "at most"),
           "greater_than": ("gt", "above"), "less_than": ("lt", "below")}
_UNION_MEMBERS = {"int", "str", "float", "bool", "list", "dict", "none"}  # the loc pydantic adds per member of `int | str`


def _say(item: dict, loc: tuple) -> tuple[str, str | None]:
    """(the message, what was expected when it is a wrong type) for one pydantic error, in YAML's words."""
    kind, ctx, got = item["type"], item.get("ctx") or {}, _as_yaml(item.get("input"))
    if kind == "extra_forbidden":
        return (f"unknown key {loc[-1]!r}" if loc else "unknown key"), None
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length list (optim.betas) one item short
        return f"needs {loc[-1] + 1} items, got {loc[-1]}", None
    if kind == "missing":
        return (f"missing required key {loc[-1]!r}" if loc else "missing required key"), None
    if kind == "too_long":
        return f"should have at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length', 'more')}", None
    if kind == "string_type" and item.get("input") is None:  # `dir: ~` meant home: YAML's ~ is null
        return ("should be text, got nothing (null: YAML reads ~, null and an empty value so; quote a path that starts with ~, "
                "e.g. '~/models')"), _EXPECTED[kind]
    if kind in ("literal_error", "string_type") and isinstance(item.get("input"), bool):  # freeze=no read as false (trial122 F5)
        got += " (YAML reads yes/no, on/off and true/false as booleans; quote a word meant as text)"
    if kind in _EXPECTED:
        return f"should be {_EXPECTED[kind]}, got {got}", _EXPECTED[kind]
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        return f"should be {_BOUNDS[kind][1]} {ctx[_BOUNDS[kind][0]]}, got {got}", None
    if kind == "literal_error":
        return f"should be one of {ctx.get('expected')}, got {got}", None
    if kind == "string_too_short" and loc and loc[-1] == "text_field":
        return "should name the field of each JSONL record that holds its text, got an empty text", None
    if kind == "string_too_short":
        return "should be a path, got an empty text", None
    if kind == "too_short" and item.get("input") == "":  # a path field's empty text (export.dir='')
        return "should be a path, got an empty text", None
    if kind == "too_short":
        return f"should have at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length', 'fewer')}", None
    message = item["msg"]
    return (message[len("Value error, "):] if message.startswith("Value error, ") else message), None


def _model_in(annotation) -> type[BaseModel] | None:
    """The schema class a field holds, through ``X | None`` and ``list[X]``; None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _keys_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the mapping at ``loc`` may have (list items skipped); [] when it cannot be told."""
    model: type[BaseModel] | None = schema
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


# keys of the tools these users know, and the key a recipe says the same with
_OTHER_TOOLS_KEYS = {"layer_range": ("layers", "mergekit's layer_range: the same half-open [start, end)"),
                     # a mergekit slice inside a recipe's layout (trial82 F9)
                     "sources": ("layers", "a mergekit slice's sources: [{model, layer_range}]; here a slice is layers: "
                                           "[start, end) of the recipe's one base")}


def did_you_mean(schema: type[BaseModel] | None, loc: tuple) -> str:
    """`; did you mean 'topk'?` for a key one typo away from a known one (after_evry, top_k), or
    another tool's name for it (mergekit's layer_range)."""
    if schema is None or not loc or not isinstance(loc[-1], str):
        return ""
    known = _keys_at(schema, loc[:-1])
    if loc[-1] in _OTHER_TOOLS_KEYS and _OTHER_TOOLS_KEYS[loc[-1]][0] in known:
        return f"; did you mean {_OTHER_TOOLS_KEYS[loc[-1]][0]!r} ({_OTHER_TOOLS_KEYS[loc[-1]][1]})?"
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.75) or [k for k in known if k.replace("_", "") == loc[-1].replace("_", "")]
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key_hint(schema: type[BaseModel] | None, loc: tuple) -> str:
    """What follows "unknown key 'x'": the known key it is a typo of, else the keys that place has
    (the same words for a config file's key and a command-line override's, trial77 F7)."""
    hint = did_you_mean(schema, loc)
    if hint or schema is None or not loc or not isinstance(loc[-1], str):
        return hint
    known = _keys_at(schema, loc[:-1])
    return f" (known: {', '.join(known)})" if known else ""


def problems_from_validation(error: ValidationError, source: YamlSource, schema: type[BaseModel] | None = None) -> list[Problem]:
    """One located problem per place, in the file's order; ``schema``: the validated class, for
    suggesting the known key an unknown one is a typo of."""
    problems: dict[tuple, Problem] = {}
    expected: dict[tuple, list[str]] = {}
    missing: list[tuple] = []  # the places of missing required keys
    bare_layers: list = []  # `layers: [0, 1, 1, 2]`: said once, with the form an entry has (trial71 L1)
    for item in error.errors():
        # pydantic adds pseudo-locations for union members and validators; keep the data path.
        loc = tuple(part for part in item["loc"] if not (isinstance(part, str) and ("[" in part or part.startswith("function-"))))
        if len(loc) > 1 and loc[-1] in _UNION_MEMBERS:
            loc = loc[:-1]
        if (len(loc) == 3 and loc[:2] == ("layout", "layers") and isinstance(loc[2], int) and item["type"] in _MAPPING_TYPES
                and isinstance(item.get("input"), int) and not isinstance(item.get("input"), bool)):
            bare_layers.append((loc, item["input"]))
            continue
        message, wanted = _say(item, loc)
        # a required key the data lacks: pydantic's `missing` at the key itself, not at a list's index (a list an item
        # short, `layers: [2]`, is no missing key: its problem must stay, trial126 F1)
        missing_key = item["type"] == "missing" and bool(loc) and isinstance(loc[-1], str)
        if item["type"] == "extra_forbidden":
            message += unknown_key_hint(schema, loc)
        if item["type"] == "missing" and loc and isinstance(loc[-1], int):
            loc = loc[:-1]  # a list an item short: said of the list, where the user wrote it
        if loc in problems and wanted and expected.get(loc):  # `tokens: true` against `int | str`: one line, both kinds
            expected[loc].append(wanted)
            message = f"should be {' or '.join(expected[loc])}, got {_as_yaml(item.get('input'))}"
        elif loc in problems:
            continue
        else:
            expected[loc] = [wanted] if wanted else []
        problems[loc] = Problem(source.where(loc), ".".join(map(str, loc)), message)
        if missing_key:
            missing.append(loc)
    _fold_missing_into_misplaced(problems, missing, schema, source)
    if bare_layers:  # at the first such entry
        numbers = [n for _, n in bare_layers]
        shown_numbers = ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")
        problems[bare_layers[0][0]] = Problem(source.where(bare_layers[0][0]), "layout.layers", (
            f"its entries are mappings, not bare layer numbers (got {shown_numbers}): write each as {{source: N}}, or "
            f"{{source: N, kind: identity}} for an inserted block, e.g. - {{source: {numbers[0]}}}"))
    # in the file's order, as a reader goes down it (pydantic reports missing keys, then unknown ones)
    return [problems[loc] for loc in sorted(problems, key=lambda loc: source.position(loc) or (0, 0))]


def _fold_missing_into_misplaced(problems: dict[tuple, Problem], missing: list[tuple], schema: type[BaseModel] | None,
                                 source: YamlSource) -> None:
    """A required key the file lacks because it wrote it misspelt (``output_:``), indented one level too far
    (``layout:`` under ``base:``) or lost its line (``interleave:`` left under ``base:``) is one problem, at the
    key the file holds: a top-level missing key has no line of its own, so it was a second line naming the file only.
    The exact misspelling at the key's own level is tried first, for every missing key, then the key one level too deep,
    then a child of the missing key elsewhere: a stray ``dtype:`` under ``base:`` is not taken for output's while
    ``outptu:`` is in the file (trial126 F2); each unknown key is folded into one missing key at most. Indentation is
    spoken of only for a key of the file's block mappings: not in ``{...}`` or JSON, not on the command line, whose
    keys are not "the file's" either (trial126 F3)."""
    missing = [loc for loc in missing if loc in problems and problems[loc].message.startswith("missing required key")]

    def misspelt(loc: tuple, other: tuple, problem: Problem) -> str | None:
        if len(other) == len(loc) and f"did you mean {loc[-1]!r}?" in problem.message:
            return problem.message + (" (a required key that is missing)" if source.from_command_line(other)
                                      else " (a required key the file lacks)")
        return None

    def too_deep(loc: tuple, other: tuple, problem: Problem) -> str | None:
        if len(other) == len(loc) + 1 and other[-1] == loc[-1]:
            return (f"unknown key {loc[-1]!r} here: it belongs one level up, where it is missing"
                    + (" (indented too far?)" if source.in_block(other) else ""))
        return None

    def child(loc: tuple, other: tuple, problem: Problem) -> str | None:
        if len(other) == len(loc) + 1 and schema is not None and other[-1] in _keys_at(schema, loc):
            if source.from_command_line(other):
                return f"unknown key {other[-1]!r} here: it is a key of {loc[-1]}:, which is missing"
            return (f"unknown key {other[-1]!r} here: it is a key of {loc[-1]}:, which the file lacks"
                    + (f" (the {loc[-1]}: line above it missing, or this key indented wrongly?)" if source.in_block(other) else ""))
        return None

    folded: set[tuple] = set()
    for rule in (misspelt, too_deep, child):
        for loc in missing:
            if loc not in problems:
                continue  # folded by an earlier rule
            for other, problem in problems.items():
                if other in folded or not (problem.message.startswith("unknown key ") and other
                                           and other[:-1][:len(loc) - 1] == loc[:-1]):
                    continue
                message = rule(loc, other, problem)
                if message is not None:
                    problems[other] = Problem(problem.where, problem.field, message)
                    folded.add(other)
                    del problems[loc]
                    break


def cwd_relative_hint(written: str, directory: Path) -> str:
    """When a path a file's author wrote relative to the working directory (as mergekit reads them)
    is missing where the file reads it (relative to its own ``directory``) but exists from the working
    directory: a clause saying so and what to write instead; else ""."""
    path = Path(written)
    here = Path.cwd() / path
    if path.is_absolute() or not here.exists() or here.resolve() == (directory / path).resolve():
        return ""
    return (f"; {printable(written)} exists relative to the current directory, but paths in this file are relative to the file's own "
            f"directory: write {printable(os.path.relpath(here.resolve(), directory.resolve()))} or an absolute path")


# The top-level keys only one kind of file has: a recipe given to train, or a train config given to apply,
# is named as such in one line instead of a dozen "unknown key" ones.
RECIPE_ONLY_KEYS = ("base", "layout")
TRAIN_ONLY_KEYS = ("init_from", "run_dir")


def wrong_kind_of_file(source: YamlSource, own_keys: tuple[str, ...], other_keys: tuple[str, ...]) -> bool:
    """Whether the mapping has none of this kind's own keys and some of the other kind's."""
    data = source.data
    return isinstance(data, dict) and not any(k in data for k in own_keys) and any(k in data for k in other_keys)


def parse_recipe(source: YamlSource, directory: Path) -> LoadedRecipe:
    """Validate parsed YAML against the schema; every schema problem is reported at once."""
    if not isinstance(source.data, dict):
        raise RecipeError([Problem(source.where(), "", "a recipe is a YAML mapping (key: value pairs) at the top level")])
    if wrong_kind_of_file(source, RECIPE_ONLY_KEYS, TRAIN_ONLY_KEYS):
        raise RecipeError([Problem(source.where(), "", "this is a training config (it has init_from: and run_dir:), not a recipe: "
                                   "run it with `midus-surgery train`; a recipe has base:, layout: and output: (docs/recipes.md)")])
    mergekit = _mergekit_config(source.data)
    if mergekit is not None:
        raise RecipeError([Problem(source.where(), "", mergekit)])
    try:
        recipe = Recipe.model_validate(source.data)
    except ValidationError as exc:
        raise RecipeError(problems_from_validation(exc, source, Recipe)) from None
    return LoadedRecipe(recipe=recipe, source=source, directory=directory)


def _mergekit_config(data: dict) -> str | None:
    """One line for a mergekit config given as a recipe (merge_method:, slices: of sources:): the recipe
    that says the same when it is a passthrough of one model, else what a recipe is (trial52: six
    lines of missing and unknown keys that named neither)."""
    slices = data.get("slices")
    if "layout" in data or not ("merge_method" in data or (isinstance(slices, list) and any(isinstance(s, dict) and "sources" in s for s in slices))):
        return None
    head = "this is a mergekit config (merge_method:, slices: of sources:), not a recipe"
    try:
        sources = [s["sources"] for s in slices]
        models = {src["model"] for group in sources for src in group}
        ranges = [list(group[0]["layer_range"]) for group in sources]
        simple = (len(models) == 1 and all(len(group) == 1 for group in sources) and data.get("merge_method", "passthrough") == "passthrough"
                  and all(len(r) == 2 and all(isinstance(i, int) for i in r) for r in ranges))
    except (KeyError, TypeError, IndexError):
        simple = False
    if not simple:
        return (f"{head}: a recipe up-scales one base model by its layers (mergekit's passthrough); merging several models is "
                "mergekit's work. A recipe: base: {path: MODEL}, layout: {slices: [{layers: [START, END]}, ...]} (mergekit's "
                "layer_range, the same half-open range), output: {dir: OUT} (docs/recipes.md)")
    dtype = data.get("dtype")
    output = f"{{dir: OUT{', dtype: ' + str(dtype) if dtype in ('float32', 'bfloat16', 'float16') else ''}}}"
    layout = ", ".join(f"{{layers: [{a}, {b}]}}" for a, b in ranges)
    return (f"{head}; the recipe that says the same: base: {{path: {next(iter(models))}}}, layout: {{slices: [{layout}]}}, "
            f"output: {output} (each on its own line; mergekit's layer_range is a recipe's layers, the same half-open range)")


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read, parse and schema-check a recipe file."""
    path = Path(path)
    source = load_yaml(path)
    return parse_recipe(source, path.resolve().parent)


def recipe_json_schema() -> dict:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "midus-surgery recipe"
    return schema


def recipe_json_schema_text() -> str:
    return json.dumps(recipe_json_schema(), indent=2, sort_keys=False) + "\n"
