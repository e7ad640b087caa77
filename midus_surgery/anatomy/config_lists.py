"""Which of a config's lists hold one entry per decoder layer, asked of the config class itself.

A list with as many entries as the base has layers is not always one entry a layer: FalconH1's five
``ssm_multipliers`` (one per part of the Mamba input projection) on a five-layer base, or its two
``mlp_multipliers`` on a two-layer one. And a two-layer base's per-layer 0/1 flags ([1, 0]: SmolLM3's
``no_rope_layers``) read as distinct layer indices. The planner renumbers per-layer lists for the new
layout and the anatomy probe cuts them for its tiny instance; both ask here first, and fall back on the
length and name rules only where the class has no default to ask.
"""

from __future__ import annotations


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
    if not isinstance(value, (list, tuple)) or kinds.get(key) == "fixed":
        return False
    return len(value) == num_layers and (num_layers > 1 or kinds.get(key) == "per-layer")
