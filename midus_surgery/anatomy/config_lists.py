"""Which of a config's lists hold one entry per decoder layer, asked of the config class itself.

A list with as many entries as the base has layers is not always one entry a layer: FalconH1's five
``ssm_multipliers`` (one per part of the Mamba input projection) on a five-layer base, or its two
``mlp_multipliers`` on a two-layer one. And a two-layer base's per-layer 0/1 flags ([1, 0]: SmolLM3's
``no_rope_layers``) read as distinct layer indices. The planner renumbers per-layer lists for the new
layout and the anatomy probe cuts them for its tiny instance; both ask here first, and fall back on the
length and name rules only where the class has no default to ask.

Some lists are never one entry a layer, whatever their length: token ids (a Llama-3-style ``eos_token_id``
of three ids on a three-layer base went through the layer map, and a pruning layout dropped an id: trial106)
and the other keys in ``NOT_PER_LAYER``. Those are kept as they are before any rule is asked.
"""

from __future__ import annotations

import re

# Config lists about tokens, rotary frequencies or the model's classes, never about layers (trial106):
# their length can equal the depth by chance, and the length rule would push them through the layer map.
NOT_PER_LAYER = frozenset({
    "architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids",
    "sequence_bias", "long_factor", "short_factor", "mrope_section",
})
# every *_token_id / *_token_ids / *_token_index (eos, bos, pad, image, ...): token ids, never layers
_TOKEN_KEY = re.compile(r"(^|_)token_(id|ids|index|indices)$")
# a name that says the list is about layers or blocks (layer_types, no_rope_layers, attn_layers, block_types)
_LAYER_NAME = re.compile(r"layer|block")


def never_per_layer(key: str) -> bool:
    """Whether config key ``key`` holds something other than layers (token ids, rope factors), whatever its length."""
    return key in NOT_PER_LAYER or bool(_TOKEN_KEY.search(key))


def list_kinds(config) -> dict[str, str]:
    """What the config class makes of each list in ``config`` when it is left out, at two other depths:
    "per-layer" (one entry a layer at both), "fixed" (one length at both, not zero: FalconH1's five
    ``ssm_multipliers``). A list with no default of its own, or a class
    that will not build without it, gets no entry, and the name and length rules decide
    (``remap_per_layer``). A base's list can have as many entries as it has layers by chance, and a
    two-layer base's 0/1 flags can read as layer indices: the class knows which it is."""
    data = config.to_dict()
    depth_key = getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    L = config.num_hidden_layers
    lists = [k for k, v in data.items() if isinstance(v, (list, tuple))]
    kinds: dict[str, str] = {}
    for key in lists:
        lengths = []
        for depth in (L + 1, L + 2):
            # every list of the base's depth left out too: a class that checks them against the depth would refuse
            kwargs = {k: v for k, v in data.items() if k != key and not (k in lists and len(data[k]) == L)}
            kwargs[depth_key] = depth
            try:
                probe = type(config)(**kwargs)
                value = getattr(probe, key, None)
            except Exception:  # noqa: BLE001 - a class that needs the list given: no verdict
                break
            if getattr(probe, "num_hidden_layers", None) != depth:  # the depth follows a list (NemotronH's layers_block_type)
                break
            if not isinstance(value, (list, tuple)) or list(value) == list(range(depth)):
                break  # no list (FalconH1's time_step_limit is a tuple), or every layer's index: per-layer and index list alike
            lengths.append(len(value))
        if lengths == [L + 1, L + 2]:
            kinds[key] = "per-layer"
        elif len(lengths) == 2 and lengths[0] == lengths[1] > 0 and lengths[0] != _default_depth(config):
            # an empty default says nothing of what a list holds, nor does one as long as the class's default depth:
            # Reformer's attn_layers is one entry a layer, whose default (6) the class does not grow with the depth
            kinds[key] = "fixed"
    return kinds


def _default_depth(config) -> int | None:
    """The number of layers the config class builds by default, or None when it will not build without arguments."""
    try:
        return getattr(type(config)(), "num_hidden_layers", None)
    except Exception:  # noqa: BLE001 - a class that needs arguments
        return None


def is_per_layer(key: str, value, num_layers: int, kinds: dict[str, str]) -> bool:
    """Whether config list ``key`` holds one entry a layer: the class's verdict (``list_kinds``), else its length."""
    if not isinstance(value, (list, tuple)) or kinds.get(key) == "fixed" or never_per_layer(key):
        return False
    return len(value) == num_layers and (num_layers > 1 or kinds.get(key) == "per-layer")


def taken_by_length(data: dict, num_layers: int, kinds: dict[str, str]) -> list[str]:
    """The lists ``is_per_layer`` takes for one entry a layer on their length alone: neither the config class
    (``kinds``) nor their name says they are about layers. They are remapped as before (real per-layer lists of
    classes without defaults are such), but what they hold is a guess that plan and apply say out loud."""
    return [k for k, v in data.items() if is_per_layer(k, v, num_layers, kinds)
            and kinds.get(k) != "per-layer" and not _LAYER_NAME.search(k)]
