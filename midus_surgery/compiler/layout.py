"""Expand a recipe's layout into the output layer map: (output index, source base layer, kind)."""

from __future__ import annotations

from dataclasses import dataclass

from midus_surgery.errors import Problem
from midus_surgery.recipe.schema import MAX_OUTPUT_LAYERS, LoadedRecipe

COPY = "copy"  # a plain copy of its source layer (DUS, SOLAR)
RECIPE_COPY_KINDS = ("copy", "transformer")  # recipes say either; `transformer` is the older name


@dataclass(frozen=True)
class LayerSpec:
    index: int  # position in the up-scaled model
    source: int  # base layer it is made from
    kind: str  # "base" | "copy" | "identity" | "memory" (a recipe's `transformer` is a plain "copy")

    @property
    def inserted(self) -> bool:
        return self.kind != "base"


def expand_layout(loaded: LoadedRecipe, num_base_layers: int) -> tuple[list[LayerSpec], list[Problem]]:
    """The layer map, and every problem found (indices out of range, adjacent memory blocks...)."""
    layout = loaded.recipe.layout
    problems: list[Problem] = []
    L = num_base_layers

    def check_range(path: tuple, index: int, end: bool = False) -> bool:
        limit = L if end else L - 1
        if not 0 <= index <= limit:
            bound = f"[0, {L}]" if end else f"0..{L - 1}"
            problems.append(loaded.problem(path, f"layer {index} is out of range: the base model has {L} layers ({bound})"))
            return False
        return True

    pairs: list[tuple[int, str | None]] = []  # (source, kind or None = decide by first use)
    if layout.slices is not None:
        for s, piece in enumerate(layout.slices):
            start, end = piece.layers
            if len(pairs) + max(0, min(end, L) - start) > MAX_OUTPUT_LAYERS:
                problems.append(loaded.problem(("layout", "slices", s), f"the slices make more than {MAX_OUTPUT_LAYERS} output layers"))
                break
            ok = check_range(("layout", "slices", s, "layers", 0), start) & check_range(("layout", "slices", s, "layers", 1), end, end=True)
            if not ok:
                continue
            seen_before = {src for src, _ in pairs}
            for m, layer in enumerate(piece.memory):
                if layer not in seen_before:
                    problems.append(loaded.problem(("layout", "slices", s, "memory", m),
                                                   f"base layer {layer} is first used in this slice, so it is the original, not a copy; only copies can become memory blocks"))
            for i in range(start, end):
                if i in seen_before:
                    pairs.append((i, "memory" if i in piece.memory else piece.kind))
                else:
                    pairs.append((i, "base"))
    elif layout.interleave is not None:
        rule = layout.interleave
        if rule.after_every is not None:
            if rule.after_every > L:
                problems.append(loaded.problem(("layout", "interleave", "after_every"), f"after_every {rule.after_every} exceeds the base model's {L} layers"))
            after = set(range(rule.after_every - 1, L, rule.after_every))
        else:
            after: dict[int, int] = {}  # layer -> its first item
            for a, layer in enumerate(rule.after):
                if layer in after:
                    problems.append(loaded.problem(("layout", "interleave", "after", a), f"layer {layer} is listed twice (also after.{after[layer]}); "
                                                   "one block is inserted after each listed layer"))
                elif check_range(("layout", "interleave", "after", a), layer):
                    after[layer] = a
        for i in range(L):
            pairs.append((i, "base"))
            if i in after:
                pairs.append((i, rule.kind))
    elif layout.stack is not None:
        start, end = layout.stack.layers
        ok = check_range(("layout", "stack", "layers", 0), start) & check_range(("layout", "stack", "layers", 1), end, end=True)
        pairs = [(i, "base") for i in range(L)]
        if ok:
            pairs += [(i, layout.stack.kind) for i in range(start, end)]
    else:
        # a source's original is its `kind: base` entry, else its first entry without a kind (an
        # identity or memory block listed before the plain use is still the inserted one)
        original: dict[int, int] = {}  # source -> entry index
        for e, entry in enumerate(layout.layers):
            if entry.kind == "base" and 0 <= entry.source < L:
                if entry.source in original:
                    problems.append(loaded.problem(("layout", "layers", e, "kind"), f"base layer {entry.source} is already used as `base` "
                                                   f"(layout.layers[{original[entry.source]}]); another use is a copy (copy, identity or memory)"))
                else:
                    original[entry.source] = e
        for e, entry in enumerate(layout.layers):
            if entry.kind is None and 0 <= entry.source < L:
                original.setdefault(entry.source, e)
        for e, entry in enumerate(layout.layers):
            if not check_range(("layout", "layers", e, "source"), entry.source):
                continue
            pairs.append((entry.source, "base" if original.get(entry.source) == e else entry.kind or COPY))

    if len(pairs) > MAX_OUTPUT_LAYERS:
        problems.append(loaded.problem(("layout",), f"the layout makes {len(pairs)} output layers; at most {MAX_OUTPUT_LAYERS} are supported"))
        return [], problems
    layers = [LayerSpec(index, source, COPY if kind in RECIPE_COPY_KINDS else kind) for index, (source, kind) in enumerate(pairs)]
    if not loaded.recipe.allow_adjacent_memory:
        for prev, cur in zip(layers, layers[1:]):
            if prev.kind == "memory" and cur.kind == "memory":
                problems.append(loaded.problem(("layout",), f"output layers {prev.index} and {cur.index} are two memory blocks back to back; MIDUS never does this (set allow_adjacent_memory: true to do it anyway)"))
    dropped = sorted(set(range(L)) - {layer.source for layer in layers})
    if layers and not problems and dropped and any(layer.inserted for layer in layers) and not loaded.recipe.allow_dropped_layers:
        problems.append(loaded.problem(_entries_path(layout), _drops_layers(dropped, layout.slices is not None)))
    if layers and not problems and not any(layer.inserted for layer in layers):
        problems.append(loaded.problem(("layout",), _inserts_nothing([layer.source for layer in layers], L)))
    elif layers and not problems and [layer.source for layer in layers] == list(range(L)) and {layer.kind for layer in layers} <= {"base", COPY}:
        copied = [layer.source for layer in layers if layer.inserted]
        problems.append(loaded.problem(("layout",), f"the layout inserts no layer: it lists each base layer once, in order, and a plain copy in "
                                                    f"place of base layer{'s' if len(copied) > 1 else ''} {', '.join(map(str, copied))} is that "
                                                    "same layer; the output would be the base model"))
    return layers, problems


def _entries_path(layout) -> tuple[str, ...]:
    """Where a problem of the whole layer list is reported: the list the recipe wrote."""
    return ("layout", "slices") if layout.slices is not None else ("layout", "layers") if layout.layers is not None else ("layout",)


def _drops_layers(dropped: list[int], slices: bool) -> str:
    """Why a layout that inserts blocks but leaves base layers out is refused (an off-by-one, most often)."""
    named = f"base layer{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped[:8]))}{' ...' if len(dropped) > 8 else ''}"
    hint = (" (slices are half-open [start, end): SOLAR's [0, 24] + [8, 32] keeps all 32 layers of its base)" if slices else "")
    return (f"{named} {'are' if len(dropped) > 1 else 'is'} in no {'slice' if slices else 'entry'}, so the output would drop {'them' if len(dropped) > 1 else 'it'}"
            f"{hint}; set allow_dropped_layers: true to prune on purpose")


def _inserts_nothing(sources: list[int], num_layers: int) -> str:
    """Why a layout that inserts no layer is refused, saying what it does instead."""
    dropped = sorted(set(range(num_layers)) - set(sources))
    done = []
    if sources != sorted(sources):
        done.append("reorders the base's layers")
    if dropped:
        done.append(f"drops base layer{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))}")
    if not done:
        return "the layout inserts no layer: the output would be the base model"
    return (f"the layout inserts no layer: it only {' and '.join(done)}; an up-scaling inserts at least one block "
            "(a base layer used again, or an entry with kind: copy, identity or memory)")
