"""Config of an emitted MIDUS model: the base architecture's config, flat, plus a ``midus`` section.

This file is copied beside emitted weights (loaded with ``trust_remote_code=True``), so it
imports only transformers and the standard library.

The model type is ``midus`` so that loading without these classes fails loudly instead of
building the base architecture and silently re-initialising the memory weights. Every base
attribute is stored flat (``hidden_size``, ``layer_types``, ``rope_parameters``...), so the
base architecture's own modeling code reads this config unchanged.
"""

from __future__ import annotations

import functools

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .midus_names import AUTO_MAP, TASK_CLASSES


class MidusConfig(PretrainedConfig):
    model_type = "midus"

    def __init__(self, base_model_type: str | None = None, midus: dict | None = None, **kwargs):
        # ``midus``: layer_map, memory_layers, hml (HML settings), share_bank, anatomy.
        self.base_model_type = base_model_type
        self.midus = midus or {}
        # a key the base computes (Bamba's layer_types) is the base's to answer: kept here, a value an older save wrote
        # would shadow the one computed from the keys it derives from, until the next save dropped it again
        derived = _derived_keys(CONFIG_MAPPING[base_model_type]) if base_model_type in CONFIG_MAPPING else frozenset()
        kwargs = {k: v for k, v in kwargs.items() if k not in derived}
        super().__init__(**kwargs)
        # The base config class, built from the same attributes: answers aliases (GPT-2's hidden_size
        # -> n_embd) and computed properties that the flat attributes don't hold. Built again when an
        # attribute is set later (__setattr__), as from_pretrained sets the overrides it is given.
        fields = {k: v for k, v in kwargs.items() if k not in ("auto_map", "architectures", "transformers_version")}
        snapshot = CONFIG_MAPPING[base_model_type](**fields) if base_model_type else None
        object.__setattr__(self, "_base_snapshot", snapshot)
        # transformers 5.17 remaps "legacy" layer_types of configs it takes for custom code (this class: conv, mamba ->
        # linear_attention, attention -> full_attention) while the base's own modeling code still reads the old names:
        # keep the base class's layer_types (unless the base derives them, read through the snapshot then)
        if snapshot is not None and "layer_types" not in derived and isinstance(getattr(snapshot, "layer_types", None), list):
            self.layer_types = list(snapshot.layer_types)
        for key, value in (vars(snapshot) if snapshot is not None else {}).items():
            # a nested config (MPT's attn_config, a multimodal config's towers) is read as attributes
            # (config.attn_config.softmax_scale): keep the base class's object, not the JSON dict
            if isinstance(value, PretrainedConfig) and isinstance(self.__dict__.get(key), dict):
                self.__dict__[key] = value
        if kwargs.get("per_layer_config"):
            # transformers' per-layer overrides (Gemma-4's head_dim) live in private state that its
            # property setter builds: set them on this config, not answered from the snapshot
            self.per_layer_config = kwargs["per_layer_config"]
        object.__setattr__(self, "_built", True)

    def __setattr__(self, name: str, value) -> None:
        # After __init__, a public attribute set (from_pretrained(..., attn_layer_indices=[0, 2]) sets its overrides
        # this way) changes what the base computes from it: the snapshot is built again here, or the model was built
        # from the old layer kinds and saved with the new indices (trial144 F2). Here, not at the next read: a read
        # inside a compiled forward would trace the rebuild (a graph break after `config.use_cache = False`), and a
        # rebuild that fails would be tried again at every read (trial145)
        built = self.__dict__.get("_built") and not name.startswith("_")
        if built and name in _derived_keys(type(self.__dict__["_base_snapshot"])):
            raise AttributeError(f"{name} is computed by {type(self.__dict__['_base_snapshot']).__name__} from the config's "
                                 "other keys and cannot be set")
        super().__setattr__(name, value)
        if built:
            try:
                object.__setattr__(self, "_base_snapshot", self._base_config())
            except Exception:  # noqa: BLE001 - between two sets the keys may disagree (num_hidden_layers before layer_types):
                pass  # answered as before until a set makes them agree again

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails. Private state is this config's own, never the
        # snapshot's (the snapshot's per-layer state would make this config recurse into itself).
        snapshot = self.__dict__.get("_base_snapshot")
        if snapshot is None or name.startswith("__"):
            raise AttributeError(name)
        if name.startswith("_"):
            # a constant of the base config class (LFM3's _rope_type_labels, which its modeling code reads) is answered;
            # private state of the snapshot instance is not
            value = getattr(type(snapshot), name, None)
            if isinstance(value, (str, int, float, bool, tuple, frozenset)):
                return value
            raise AttributeError(name)
        return getattr(snapshot, name)

    def validate(self) -> None:
        # The base architecture's own rules, which its config class carries (Nemotron-H's layer_types hold 'mlp' and 'moe'
        # layers, which transformers' generic rule refuses): save_pretrained of a MIDUS Nemotron-H failed on them. They are
        # applied to a base config built from this one's values, as the class builds and standardises them (Phi-3's rope
        # rule reads a rope_parameters entry its own init fills in).
        if self.base_model_type not in CONFIG_MAPPING:
            super().validate()
            return
        self._base_config().validate()

    def _base_config(self) -> PretrainedConfig:
        """A base config built from this one's values, as the base class builds and standardises them."""
        own = ("model_type", "base_model_type", "midus", "auto_map", "architectures", "transformers_version")
        return CONFIG_MAPPING[self.base_model_type](**{k: v for k, v in self.to_dict().items() if k not in own})

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.pop("_base_snapshot", None)
        data.pop("_built", None)
        for key in _derived_keys(CONFIG_MAPPING[self.base_model_type]) if self.base_model_type in CONFIG_MAPPING else ():
            data.pop(key, None)  # the base config computes it, and refuses it as an argument
        # save_pretrained names the instance's class (MidusLlamaForCausalLM, built at run time) and,
        # with trust_remote_code, points auto_map at it: write the public classes this file's
        # modeling_midus.py defines by name, so the directory loads again anywhere.
        named = [split_runtime_name(a) for a in data.get("architectures") or []]
        data["architectures"] = [n[0] if n else a for n, a in zip(named, data.get("architectures") or [])] or ["MidusForCausalLM"]
        data["auto_map"] = dict(AUTO_MAP)
        return data


@functools.lru_cache(maxsize=None)  # per class: read at every config built and every to_dict
def _derived_keys(base_class: type) -> frozenset[str]:
    """The names a base config class computes and refuses as arguments: its properties without a setter, and the
    aliases its attribute_map points at them (Bamba's and RecurrentGemma's layer_types -> layers_block_type). Kept
    in this config, a save wrote layer_types, and the reload (or validate) passed it back: AttributeError, so a
    MIDUS Bamba could not be saved again."""
    def read_only(name: str) -> bool:
        attribute = getattr(base_class, name, None)
        return isinstance(attribute, property) and attribute.fset is None

    aliases = {alias for alias, target in getattr(base_class, "attribute_map", {}).items() if read_only(target)}
    return frozenset(aliases | {name for name in dir(base_class) if not name.startswith("_") and read_only(name)})


def split_runtime_name(name: str) -> tuple[str, str] | None:
    """(public MIDUS class, base class) of a runtime class name (MidusLlamaForCausalLM ->
    (MidusForCausalLM, LlamaForCausalLM)); None for any other name."""
    from transformers.models.auto import modeling_auto

    base = name.removeprefix("Midus")
    if base == name or name in TASK_CLASSES:
        return None
    for public, (_, table) in TASK_CLASSES.items():
        if base in getattr(modeling_auto, table).values():
            return public, base
    return None
