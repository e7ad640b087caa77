"""The compiler's front half in one call: recipe file -> validated recipe, base config, anatomy, plan."""

from __future__ import annotations

from dataclasses import dataclass

from .anatomy import Anatomy
from .base import load_base_config
from .layout import expand_layout
from .plan import Plan, make_plan
from .recipe import LoadedRecipe, load_recipe


@dataclass(frozen=True)
class Compiled:
    loaded: LoadedRecipe
    config: object  # transformers.PretrainedConfig of the base
    anatomy: Anatomy | None
    plan: Plan


def anatomy_for(loaded: LoadedRecipe, config) -> tuple[Anatomy | None, str | None]:
    """The recipe's stated anatomy, else the traced one; (None, why) when tracing cannot tell."""
    if loaded.recipe.anatomy is not None:
        return loaded.recipe.anatomy.model_copy(update={"source": "recipe"}), None
    from .anatomy import AnatomyError, find_anatomy

    try:
        return find_anatomy(config, trust_remote_code=loaded.recipe.base.trust_remote_code), None
    except AnatomyError as exc:
        # make_plan reports it, located, if the layout needs the anatomy (identity/memory blocks).
        return None, str(exc)


def compile_recipe(path, *, anatomy_only_if_needed: bool = False) -> Compiled:
    """Raises RecipeError (every problem, located) when the recipe does not fit its base.

    anatomy_only_if_needed: skip tracing the block anatomy (a second or two) when every block
    is a plain copy, as ``apply`` does; the layer container is then found from tensor names.
    """
    loaded = load_recipe(path)
    config = load_base_config(loaded)
    anatomy, why = None, None
    if not anatomy_only_if_needed or _needs_anatomy(loaded, config):
        anatomy, why = anatomy_for(loaded, config)
    return Compiled(loaded, config, anatomy, make_plan(loaded, config, anatomy, anatomy_problem=why))


def _needs_anatomy(loaded: LoadedRecipe, config) -> bool:
    layers, _ = expand_layout(loaded, config.num_hidden_layers)
    return loaded.recipe.anatomy is not None or any(layer.kind not in ("base", "transformer") for layer in layers)
