"""The compiler's front half in one call: recipe file -> validated recipe, base config, anatomy, plan
(a PlannedRecipe), through transformers or, for ``apply``, from the safetensors headers where they suffice."""

from __future__ import annotations

import os

from midus_surgery.compiler.base import load_base_config, located_at_base_path, no_experts_problem
from midus_surgery.compiler.layout import COPY, expand_layout
from midus_surgery.compiler.plan import Plan, base_tied_pairs, make_plan
from midus_surgery.compiler.planned import PlannedRecipe
from midus_surgery.errors import BaseModelError, RecipeError
from midus_surgery.io.dtypes import auto_dtype
from midus_surgery.recipe.anatomy_spec import StackAnatomy
from midus_surgery.recipe.schema import LoadedRecipe, load_recipe

FULL_PLAN_ENV = "MIDUS_SURGERY_FULL_PLAN"  # "1": `apply` always plans through transformers (debugging)


def anatomy_for(loaded: LoadedRecipe, config) -> tuple[StackAnatomy | None, str | None]:
    """The recipe's stated anatomy (for every layer), else the traced one per kind of layer;
    (None, why) when tracing cannot tell."""
    if loaded.recipe.anatomy is not None:
        return StackAnatomy.uniform(loaded.recipe.anatomy.model_copy(update={"source": "recipe"}), config.num_hidden_layers), None
    from midus_surgery.anatomy.trace import AnatomyError, find_stack_anatomy

    try:
        return find_stack_anatomy(config, trust_remote_code=loaded.recipe.base.trust_remote_code), None
    except AnatomyError as exc:
        # make_plan reports it, located, if the layout needs the anatomy (identity/memory blocks).
        return None, str(exc)


def plan_recipe(path, *, anatomy_only_if_needed: bool = False) -> PlannedRecipe:
    """Raises RecipeError (every problem, located) when the recipe does not fit its base.

    anatomy_only_if_needed: skip tracing the block anatomy (a second or two) when every block
    is a plain copy, as ``apply`` does; the layer container is then found from tensor names.
    """
    return plan_loaded(load_recipe(path), anatomy_only_if_needed=anatomy_only_if_needed)


def plan_loaded(loaded: LoadedRecipe, *, anatomy_only_if_needed: bool = False) -> PlannedRecipe:
    config = load_base_config(loaded)
    anatomy, why = None, None
    if not anatomy_only_if_needed or _needs_anatomy(loaded, config):
        anatomy, why = anatomy_for(loaded, config)
    # transformers 5 reads an old config's torch_dtype into dtype; its torch_dtype attribute only warns
    base_dtype = auto_dtype(getattr(config, "dtype", None) or vars(config).get("torch_dtype"))
    plan = make_plan(loaded, config, anatomy, anatomy_problem=why)
    with located_at_base_path(loaded):
        problem = no_experts_problem(plan.config, plan.tensors)
        if problem:  # Mixtral with num_local_experts 0 failed only in its first forward pass
            raise BaseModelError(problem)
        check_base_weights(loaded, plan, config)
    record_earlier_insertions(loaded, plan)
    return PlannedRecipe(loaded, config, anatomy, plan, base_dtype=base_dtype, tied=tuple(base_tied_pairs(config).items()))


def check_base_weights(loaded: LoadedRecipe, plan: Plan, config=None) -> None:
    """When the base's safetensors are there: refuse weights its config.json does not describe, and a
    checkpoint that lacks a tensor the output copies (unless transformers converts this architecture's
    checkpoints on load: then ``apply`` loads it through transformers, whose strict load decides).

    Reads only the headers (cheap), so ``validate`` and ``plan`` check too (validate passed a base
    with a tensor missing that apply then refused). A GGUF base's tensor
    infos are checked against the shapes the config transformers derives from its metadata implies
    (``config``, the base's: the two halves of one file can disagree); pickle checkpoints are checked
    when ``apply`` opens them (emit).
    """
    from midus_surgery.compiler.base import resolve_base
    from midus_surgery.io.tensor_source import SafetensorsSource, check_matches_config, checkpoint_renames, gguf_shape_problem

    ref = resolve_base(loaded)
    if ref.exists and ref.is_gguf and config is not None:
        from midus_surgery.compiler.plan import base_tensor_shapes

        problem = gguf_shape_problem(ref.directory / ref.gguf_file, config, base_tensor_shapes(config))
        if problem:
            raise RecipeError([loaded.problem(("base", "path" if loaded.recipe.base.gguf_file is None else "gguf_file"), problem)])
        return
    if not ref.exists or ref.is_gguf or not any(ref.directory.glob("*.safetensors")):
        return
    from midus_surgery.compiler.plan import base_load_renames

    renames = base_load_renames(config) if config is not None else None  # None: transformers converts more than names
    source = SafetensorsSource(ref.directory, plan.name_prefixes, renames if renames is not None else checkpoint_renames(plan.model_type))
    read = [(t.source, t.shape) for t in plan.tensors if t.source is not None]
    check_matches_config(source, read, plan.layers_path, plan.base_num_layers, plan.config, str(ref.directory / "config.json"))
    absent = sorted({name for name, _ in read if source.resolve(name) is None})
    if absent and renames is not None:
        raise BaseModelError(f"the base checkpoint {ref.directory} lacks {len(absent)} tensor(s) the output copies, e.g. "
                             f"{', '.join(absent[:3])}: its safetensors files hold no tensor of that name")
    if config is not None:  # the model's own integer tensors (buffers) known: weights stored as integers are refused
        from midus_surgery.compiler.plan import base_integer_tensors
        from midus_surgery.io.stored_dtypes import is_float_tag

        stored, by_right = source.stored(), base_integer_tensors(config)
        integers = sorted({f"{name} ({stored[key][0]})" for name, _ in read if name not in by_right
                           and (key := source.resolve(name)) is not None and not is_float_tag(stored[key][0])})
        if integers:  # the output's tensors are floating point: a cast would write the integers as weights (trial61)
            raise BaseModelError(integer_base_tensors(ref.directory, integers))


def integer_base_tensors(directory, integers: list[str]) -> str:
    """The problem of a base whose tensors the output copies are stored as integers or booleans (``integers``:
    "name (dtype)"): the output is floating point, and a cast would write their integer values as weights."""
    shown = ", ".join(integers[:3]) + (f" and {len(integers) - 3} more" if len(integers) > 3 else "")
    where = f" {directory}" if directory is not None else ""
    return (f"the base checkpoint{where} stores {len(integers)} tensor(s) the output copies as integers or booleans "
            f"({shown}): the model's weights are floating point, and a cast would write those integers as weights "
            "(a broken file, or a quantized checkpoint, which apply does not read)")


def record_earlier_insertions(loaded: LoadedRecipe, plan: Plan) -> None:
    """A base that an earlier `apply` made: which of its layers that apply inserted, into the plan
    (trial55: chained, they read as base layers, and `train --freeze base` kept a LLaMA-Pro step's
    zeroed blocks at zero for good)."""
    from midus_surgery.compiler.base import resolve_base
    from midus_surgery.compiler.plan import earlier_insertions

    ref = resolve_base(loaded)
    if ref.exists and not ref.is_gguf:
        plan.inserted_before = earlier_insertions(ref.directory, plan.base_num_layers)


def plan_for_apply(recipe: str | os.PathLike | LoadedRecipe, *, full: bool = False) -> tuple[PlannedRecipe, str | None]:
    """What ``apply`` runs: the plan from the safetensors headers when the recipe allows it, else the full one.
    ``recipe``: its path, or the recipe already loaded.

    Returns the planned recipe and, when the full planner made it, why the header planner did not
    (None when it did). full (or MIDUS_SURGERY_FULL_PLAN=1): always the full planner.
    """
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    if full or os.environ.get(FULL_PLAN_ENV) == "1":
        return plan_loaded(loaded, anatomy_only_if_needed=True), "the full plan was asked for"
    from midus_surgery.compiler.header_plan import plan_from_headers

    planned, why = plan_from_headers(loaded)
    if planned is not None:
        record_earlier_insertions(loaded, planned.plan)
        return planned, None
    return plan_loaded(loaded, anatomy_only_if_needed=True), why


def _needs_anatomy(loaded: LoadedRecipe, config) -> bool:
    layers, _ = expand_layout(loaded, config.num_hidden_layers)
    return loaded.recipe.anatomy is not None or any(layer.kind not in ("base", COPY) for layer in layers)
