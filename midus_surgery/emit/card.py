"""The output's model card (README.md): what was made from which base, how to load it, its counts,
layer map and recipe, in the layout the Hub reads (YAML front matter, ``base_model`` when known).

The card names the base by its Hub id or its folder's name, never by a path of this machine: a
card is written to be published. The recipe it quotes is the user's own text, as written.
"""

from __future__ import annotations

import re
from pathlib import Path

from midus_surgery.compiler.base import BaseRef
from midus_surgery.compiler.planned import PlannedRecipe
from midus_surgery.errors import printable
from midus_surgery.io.model_card import NOT_TRAINED, SETTINGS, STARTS_AS_BASE, TRAINING_END, TRAINING_START, training_section

# how huggingface_hub lays out its cache: .../models--ORG--NAME/snapshots/REVISION/
_HUB_CACHE_FOLDER = re.compile(r"^models--(?P<repo>[\w.-]+)$")

_KINDS = {  # kind: (one, several, what each is)
    "copy": ("copy", "copies", "a plain copy of its source layer"),
    "identity": ("identity block", "identity blocks", "a copy with its output projections zeroed: it adds nothing until trained"),
    "memory": ("memory block", "memory blocks", "a copy with its FFN replaced by a Head-wise Memory Layer: per-head product keys, HIVE values"),
}


def base_hub_id(planned: PlannedRecipe, ref: BaseRef) -> str | None:
    """The base's Hub id: the recipe's ``base.hub_id``, else read from a Hub cache snapshot's path."""
    if planned.loaded.recipe.base.hub_id:
        return planned.loaded.recipe.base.hub_id
    parts = ref.directory.resolve().parts
    for folder, below in zip(parts, parts[1:]):
        if below == "snapshots" and (found := _HUB_CACHE_FOLDER.match(folder)):
            return found["repo"].replace("--", "/", 1)  # repo names cannot hold "--": the first one is the org's end
    return None


def earlier_apply(planned: PlannedRecipe, ref: BaseRef) -> tuple[str | None, str]:
    """When the base is itself an `apply` output (a chain): (the Hub id its card names as base_model, or
    None; what the card says of it: the layers inserted there, and its training since when its card
    has any). (None, "") for any other base."""
    inserted = planned.plan.inserted_before
    if not inserted or ref.is_gguf:
        return None, ""
    layers = ", ".join(f"{i} ({kind})" for i, kind in sorted(inserted.items()))
    text = f"Its base is itself a `midus-surgery apply` output: its layers {layers} were inserted by that apply or one before it."
    card = ref.directory / "README.md"
    try:
        earlier = card.read_text() if card.is_file() else ""
    except (OSError, UnicodeDecodeError):
        earlier = ""
    front = earlier.split("---", 2)[1] if earlier.startswith("---") and earlier.count("---") >= 2 else ""
    hub_id = next((m["id"] for m in re.finditer(r"^base_model:\s*(?P<id>[\w./-]+)\s*$", front, re.M)), None)
    if hub_id:
        text += f" The chain starts from `{hub_id}`."
    start, end = earlier.find(TRAINING_START), earlier.find(TRAINING_END)
    trained = earlier[start + len(TRAINING_START):end].strip() if 0 <= start < end else ""
    if trained and trained != NOT_TRAINED:
        text += f" The base's training, from its card: {trained.replace(SETTINGS, '')}"
    return hub_id, text


def method_title(kinds: set[str]) -> str:
    if "memory" in kinds:
        return "MIDUS (Memory-Infused Depth Up-Scaling)"
    if kinds == {"identity"}:
        return "LLaMA-Pro block expansion"
    return "Depth Up-Scaling" + (" with identity blocks" if "identity" in kinds else "")


def start_sentence(function_preserving: bool | None, kinds: set[str], dropped: list[int] = (), accepted_change: str | None = None) -> str:
    """How the model starts; ``dropped``: base layers the layout leaves out (allow_dropped_layers), the
    cause of the change then, whatever the inserted blocks do; ``accepted_change``: which blocks meant as the identity
    beside plain copies were found not to start as it (accepted by the recipe)."""
    if dropped:
        layers = f"base layer{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))}"
        return (f"It leaves out {layers} (`allow_dropped_layers`), so it computes another function than the base "
                "until trained.")
    if function_preserving:
        return STARTS_AS_BASE
    if function_preserving is False:
        return ("Its inserted blocks were found not to start as the identity, and the recipe accepted it (`accept_function_change`): "
                "it computes another function than the base until trained.")
    if "copy" in kinds and accepted_change:
        return ("Copies change the function: like any DUS model it needs continued pre-training to recover and pass the base. "
                f"Its blocks meant as the identity do not start as it either, and the recipe accepted it (`accept_function_change`): {accepted_change}.")
    if "copy" in kinds:
        return "Copies change the function: like any DUS model it needs continued pre-training to recover and pass the base."
    return "Its memory blocks start from random values: it computes another function than the base until trained."


def _count(n: int, one: str, several: str, what: str) -> str:
    return f"{n} {one if n == 1 else several} (each {what})"


def model_card(planned: PlannedRecipe, recipe_text: str, ref: BaseRef) -> str:
    plan = planned.plan
    p, f = plan.params, plan.flops_per_token
    inserted = [layer for layer in plan.layers if layer.inserted]
    kinds = {layer.kind for layer in inserted}
    hub_id = base_hub_id(planned, ref)
    base_name = hub_id or (ref.gguf_file if ref.is_gguf else ref.directory.resolve().name)
    earlier_hub_id, lineage = earlier_apply(planned, ref)
    hub_id = hub_id or earlier_hub_id  # a chain's first base, for the Hub's lineage (the title keeps this base's name)
    counts = "; ".join(_count(sum(layer.kind == kind for layer in inserted), *_KINDS[kind]) for kind in _KINDS if kind in kinds)
    was = {i: f" (was {kind})" for i, kind in plan.inserted_before.items()}
    rows = "\n".join(f"| {layer.index} | {layer.source} | {layer.kind}{was.get(layer.source, '')} | {n:,} |" for layer, n in zip(plan.layers, plan.layer_params))
    front = ["library_name: transformers"] + ([f"base_model: {hub_id}"] if hub_id else [])
    tags = ["midus-surgery", "depth-up-scaling"] + (["midus"] if plan.memory_layers else ["llama-pro"] if "identity" in kinds else [])
    loading = (
        "```python\nimport midus_surgery  # registers the MIDUS classes\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n"
        "# or, without midus_surgery installed (the tokenizer reads config.json too, so it needs the flag as well):\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)\n```"
        if plan.memory_layers
        else "```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(PATH)\n```"
    )
    from midus_surgery.compiler.custom_code import base_code_in_output
    from midus_surgery.io.tokenizer_files import reference_place

    files, repos = base_code_in_output(ref, plan, planned.loaded.recipe.base.trust_remote_code)
    # escaped: a name is the base's text, and `cat README.md` showed a raw ESC[8m in it (trial104)
    code = [f"`{printable(name)[:80]}`" for name in files] + [
        reference_place(repo).format(f"`{printable(repo)[:300]}`") for repo in repos]  # a Hub repository, or a local folder
    if code:  # the load lines above pass trust_remote_code=True, which runs it too (trial99 S1, trial102 R08, trial111)
        loading += (f"\n\nThis model carries code of its own, from the base ({', '.join(code)}, named by the `auto_map` of its "
                    "`config.json` or `tokenizer_config.json`): `trust_remote_code=True` runs it. Read it first.")
    bank = plan.shared_bank_params
    shared = (f"\nThe latent bank the {len(plan.memory_layers)} memory layers share (`midus_shared_bank.weight`, {bank:,} parameters) is "
              "counted once in the totals above and in no layer's row.\n" if bank else "")
    return f"""---
{chr(10).join(front)}
tags: [{', '.join(tags)}]
---
# {method_title(kinds)} of `{base_name}`

Made by `midus-surgery apply`: the base's {plan.base_num_layers} `{plan.model_type}` layers
become {plan.num_hidden_layers}, with {len(inserted)} inserted: {counts}.
{start_sentence(plan.function_preserving, kinds, plan.dropped_layers, plan.accepted_change)}{chr(10) + chr(10) + lineage if lineage else ""}

{training_section(NOT_TRAINED)}

## Loading
{loading}

## Counts
| | base | DUS equivalent | this model |
| --- | --- | --- | --- |
| parameters | {p['base']:,} | {p['base'] + p['dus_added']:,} | {p['total']:,} |
| added parameters | - | {p['dus_added']:,} | {p['added']:,} |
| forward FLOPs per token at a context of {plan.flops_seq_len:,} tokens (estimate) | {f['base']:,} | {f['dus']:,} | {f['plan']:,} |

## Layer map
| out | source | kind | parameters |
| --- | --- | --- | --- |
{rows}
{shared}
## Recipe
```yaml
{recipe_text.rstrip()}
```
"""


def write_model_card(planned: PlannedRecipe, recipe_text: str, ref: BaseRef, dest: Path) -> None:
    (dest / "README.md").write_text(model_card(planned, recipe_text, ref))
