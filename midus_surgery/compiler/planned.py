"""A recipe planned against its base model: what both planners produce and the emitter executes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from midus_surgery.compiler.plan import Plan
from midus_surgery.recipe.anatomy_spec import StackAnatomy
from midus_surgery.recipe.schema import LoadedRecipe


@dataclass(frozen=True)
class PlannedRecipe:
    loaded: LoadedRecipe
    config: object | None  # transformers.PretrainedConfig of the base; None when planned from the headers
    anatomy: StackAnatomy | None  # every kind of base layer; None for plans that need none
    plan: Plan
    base_dtype: str = "float32"  # the base config's dtype: what `output.dtype: auto` writes
    # checkpoint -> module tensor renames when known without transformers; None: the emitter asks it
    renames: tuple[tuple[str, str], ...] | None = None
    planner: Literal["transformers", "headers"] = "transformers"
    # the base's tied tensors, target -> source (lm_head.weight -> the embedding): the target is not planned,
    # so a checkpoint holding it with other values than the source is refused (emitter.check_tied_copies)
    tied: tuple[tuple[str, str], ...] = ()
