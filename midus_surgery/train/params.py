"""Which parameters train, in which optimiser group, at which learning rate.

Freeze policies (``none``, ``base``: only the inserted layers, ``memory-only``), the groups
(base matrices with weight decay, 1-D base tensors without, memory tables with their own lr,
decay and clip), AdamW's implementation per device, and the lr schedule's multiplier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from midus_surgery.compiler.plan import guess_layers_path, is_inserted, plan_mismatch, read_plan_json
from midus_surgery.errors import MidusError, RecipeError
from midus_surgery.model.midus_names import SHARED_BANK, is_memory_parameter
from midus_surgery.train.config import LoadedTrainConfig, TrainConfig
from midus_surgery.units import human_count


def inserted_layers(plan: dict, param_names: list[str] = ()) -> tuple[str, list[int]]:
    """(dotted path of the decoder layers, indices of the inserted layers) of an output's midus_plan.json:
    this apply's blocks and, in a chain of applies, the blocks an earlier one inserted.

    ``plan``: a midus_plan.json's contents in any layout it was ever written in (read through
    ``read_plan_json``). Copy-only plans written before ``layers_path`` was recorded (no anatomy
    traced) say nowhere where the layers are: it is then read off the model's parameter names,
    the prefix followed by every layer index.
    """
    plan = read_plan_json(plan)
    layers = plan["layers"]
    layers_path = plan["layers_path"]
    if not layers_path and param_names:
        layers_path = guess_layers_path(dict.fromkeys(param_names), len(layers))
    if not layers_path:
        raise MidusError("midus_plan.json has no layers_path, and the model's parameter names do not show where the decoder layers are")
    return layers_path, [int(layer["index"]) for layer in layers if is_inserted(layer)]


@dataclass
class ParamGroups:
    decay: list = field(default_factory=list)  # (name, param)
    no_decay: list = field(default_factory=list)
    memory: list = field(default_factory=list)
    frozen: list = field(default_factory=list)
    trained_layers: list[int] | None = None
    earlier_layers: list[int] = field(default_factory=list)  # of trained_layers, those an earlier apply of a chain inserted
    retrieval_frozen: int | None = None  # how many tensors memory.retrieval: frozen holds still
    # under memory.retrieval: frozen, the Memory blocks (layer indices) whose slots stay as at the start, and those whose
    # query still moves because something trains below them (the residual stream it is made from changes)
    fixed_slots: list[int] = field(default_factory=list)
    moving_slots: list[int] = field(default_factory=list)
    base_would_hold: bool = False  # under freeze: none, whether freeze: base would keep the first Memory block's slots

    def numel(self, group: str) -> int:
        return sum(p.numel() for _, p in getattr(self, group))


# What a Memory block's memory reads with (its values) as opposed to how it chooses what to read:
# the parameter names under `.hml.` that `memory.retrieval: frozen` still trains.
VALUE_PARAMETERS = ("bank.", "proj", "values", "gate.", "out_proj.")


def retrieval_parameters(model, names: list[str]) -> set[str]:
    """The names of what decides which slots a Memory block reads: every parameter of a Memory
    block but its values (the attention that makes the queries, their norm and projection, the sub-keys)."""
    from midus_surgery.model.modeling_midus import memory_blocks

    if not (getattr(model.config, "midus", None) or {}).get("memory_layers"):
        return set()
    prefixes = tuple(f"{anatomy['layers_path']}.{i}." for i, (anatomy, _, _) in memory_blocks(model.config).items())
    out = set()
    for name in names:
        if not name.startswith(prefixes) or SHARED_BANK in name:
            continue
        inner = name.split(".hml.", 1)[1] if ".hml." in name else None
        if inner is None or not inner.startswith(VALUE_PARAMETERS):
            out.add(name)
    return out


def slots_held(model, trainable: dict[str, bool]) -> tuple[list[int], list[int]]:
    """(the Memory blocks whose every token reads the slots it read at the start, the others), by layer index, once
    ``trainable`` is decided with their query path frozen. A block's query is made from the residual stream entering
    it, so it holds only where nothing below the block trains: no layer under it (an earlier Memory block's values
    included: they write into that stream) and nothing outside the layers but the memory tables (the embedding
    under freeze: none moves every block's stream). Frozen query parameters alone are not fixed slots (trial122)."""
    from midus_surgery.model.modeling_midus import memory_blocks

    blocks = memory_blocks(model.config)
    prefixes = {f"{anatomy['layers_path']}." for anatomy, _, _ in blocks.values()}

    def layer_of(name: str) -> int | None:  # "model.layers.5.mlp.x" -> 5; None outside the decoder layers
        for prefix in prefixes:
            index = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
            if index.isdigit():
                return int(index)
        return None

    training = [name for name, trains in trainable.items() if trains]
    # a trained tensor outside the layers but the memory tables (the embedding) moves every block's stream
    if any(layer_of(name) is None and not is_memory_parameter(name) for name in training):
        return [], sorted(blocks)
    lowest = min((i for i in map(layer_of, training) if i is not None), default=None)
    fixed = [i for i in sorted(blocks) if lowest is None or lowest >= i]
    return fixed, [i for i in sorted(blocks) if i not in fixed]


def choose_params(model, freeze: str, plan: dict | None, loaded: LoadedTrainConfig, retrieval: str = "learned") -> ParamGroups:
    """Apply the freeze policy (requires_grad) and sort parameters into optimiser groups;
    ``retrieval="frozen"`` also freezes what decides which memory slots are read."""
    trainable = {}
    names = [n for n, _ in model.named_parameters()]
    groups = ParamGroups()
    if freeze == "none":
        trainable = {n: True for n in names}
    elif freeze == "memory-only":
        trainable = {n: is_memory_parameter(n) for n in names}
        if not any(trainable.values()):
            raise RecipeError([loaded.problem(("freeze",), "`memory-only` but the model has no memory tables (no `.hml.` parameters); use `base` or `none`")])
    elif freeze == "base":
        if plan is None:
            raise RecipeError([loaded.problem(("freeze",), f"`base` needs {loaded.config.init_from}/midus_plan.json (written by `midus-surgery apply`) to know which layers were inserted; this model directory has none (use freeze: none)")])
        mismatch = plan_mismatch(read_plan_json(plan), model.config.to_dict())
        if mismatch:
            raise RecipeError([loaded.problem(("freeze",), f"`base` reads which layers were inserted from {loaded.config.init_from}/midus_plan.json, "
                                              f"which does not describe this model: it {mismatch} (a plan copied from another output, or edited)")])
        layers_path, inserted = inserted_layers(plan, names)
        if not inserted:
            raise RecipeError([loaded.problem(("freeze",), "`base` but midus_plan.json lists no inserted layers: nothing would train")])
        prefixes = tuple(f"{layers_path}.{i}." for i in inserted)
        trainable = {n: n.startswith(prefixes) or SHARED_BANK in n for n in names}
        groups.trained_layers = inserted
        groups.earlier_layers = [int(layer["index"]) for layer in read_plan_json(plan)["layers"] if layer.get("inserted_before")]
        if not any(trainable.values()):
            raise RecipeError([loaded.problem(("freeze",), f"`base`: no parameter of the model is under {layers_path}.<inserted layer>")])
    if retrieval == "frozen":
        fixed = retrieval_parameters(model, names)
        if not fixed:
            raise RecipeError([loaded.problem(("memory", "retrieval"), "`frozen` but the model has no Memory block: nothing retrieves")])
        trainable = {n: t and n not in fixed for n, t in trainable.items()}
        groups.retrieval_frozen = len(fixed)
        groups.fixed_slots, groups.moving_slots = slots_held(model, trainable)
        if freeze == "none" and plan is not None and groups.moving_slots:
            # freeze: base trains the inserted blocks only: the first Memory block holds when none sits below it
            _, inserted = inserted_layers(plan, names)
            groups.base_would_hold = not any(i < min(groups.moving_slots) for i in inserted)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.requires_grad_(trainable[name])
        if not trainable[name]:
            groups.frozen.append((name, p))
        elif is_memory_parameter(name):
            groups.memory.append((name, p))
        elif p.ndim >= 2:
            groups.decay.append((name, p))
        else:
            groups.no_decay.append((name, p))
    return groups


def describe_groups(groups: ParamGroups, cfg: TrainConfig) -> str:
    rows = [("group", "tensors", "params", "lr", "weight decay", "grad clip")]
    o, m = cfg.optim, cfg.memory
    # each row named by the config section that sets its lr: under freeze=base the matrices that train are
    # the inserted blocks', so a "base" label read as the base model training
    rows.append(("matrices (optim.*)", str(len(groups.decay)), human_count(groups.numel("decay")), f"{o.lr:g}", f"{o.weight_decay:g}", f"{o.grad_clip:g}"))
    rows.append(("1-D, no decay (optim.*)", str(len(groups.no_decay)), human_count(groups.numel("no_decay")), f"{o.lr:g}", "0", f"{o.grad_clip:g}"))
    rows.append(("memory tables (memory.*)", str(len(groups.memory)), human_count(groups.numel("memory")), f"{m.lr:g} ({m.schedule})", f"{m.weight_decay:g}", f"{m.grad_clip:g}"))
    rows.append(("frozen", str(len(groups.frozen)), human_count(groups.numel("frozen")), "-", "-", "-"))
    trainable = groups.numel("decay") + groups.numel("no_decay") + groups.numel("memory")
    total = trainable + groups.numel("frozen")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"trainable: {human_count(trainable)} of {human_count(total)} parameters ({100 * trainable / max(total, 1):.2f}%), freeze: {cfg.freeze}")
    if groups.trained_layers is not None:
        earlier = f" ({', '.join(map(str, groups.earlier_layers))} inserted by an earlier apply of its base)" if groups.earlier_layers else ""
        lines.append(f"trained layers (the inserted blocks' indices): {', '.join(map(str, groups.trained_layers))}{earlier}")
    if groups.retrieval_frozen is not None:
        lines.append(f"memory retrieval frozen: {groups.retrieval_frozen} tensors of the Memory blocks' query path and sub-keys do not train; "
                     "the values do")
        lines.append(slots_line(groups, cfg.freeze))
    return "\n".join(lines)


def slots_line(groups: ParamGroups, freeze: str) -> str:
    """What memory.retrieval: frozen holds: the slots themselves only in the blocks nothing trains below."""
    def blocks(indices: list[int]) -> str:
        return ("Memory block " if len(indices) == 1 else "Memory blocks ") + ", ".join(map(str, indices))

    if not groups.moving_slots:
        return "the slots each token reads stay as at the start in every Memory block"
    one = len(groups.moving_slots) == 1
    moving = (f"{blocks(groups.moving_slots)} {'reads' if one else 'read'} a residual stream that parameters training before "
              f"{'it' if one else 'them'} change (the embedding or layers below), so the slots {'its' if one else 'their'} "
              "tokens read move with it")
    if groups.fixed_slots:
        return f"the slots each token reads stay as at the start in {blocks(groups.fixed_slots)} only; {moving}"
    advice = " (freeze: base would keep the first Memory block's)" if groups.base_would_hold else ""
    return f"no Memory block keeps the slots it read at the start: {moving}{advice}"


def adamw_options(implementation: str, device: torch.device) -> dict:
    """torch.optim.AdamW keyword arguments for `optim.implementation` on this device.

    Torch's own default on CPU is the for-loop, one tensor at a time; its fused kernel does the
    same update in one pass over all tensors, in 0.13-0.42x the for-loop's time on the SmolLM2
    outputs (docs/benchmarks.md, AdamW implementations).
    """
    if implementation == "auto":
        return {"fused": True} if device.type in ("cpu", "cuda") else {}
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[implementation]


def lr_lambda(step_cfg, total_steps: int, warmup_steps: int, shape: str):
    """Multiplier of the peak lr at scheduler step s (s = optimiser steps taken)."""
    floor = step_cfg.min_lr_ratio

    def f(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if shape == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        if shape == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return f
