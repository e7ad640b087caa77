"""Config of an emitted MIDUS model: the base architecture's config, flat, plus a ``midus`` section.

This file is copied beside emitted weights (loaded with ``trust_remote_code=True``), so it
imports only transformers and the standard library.

The model type is ``midus`` so that loading without these classes fails loudly instead of
building the base architecture and silently re-initialising the memory weights. Every base
attribute is stored flat (``hidden_size``, ``layer_types``, ``rope_parameters``...), so the
base architecture's own modeling code reads this config unchanged.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


class MidusConfig(PretrainedConfig):
    model_type = "midus"

    def __init__(self, base_model_type: str | None = None, midus: dict | None = None, **kwargs):
        # ``midus``: layer_map, memory_layers, hml (HML settings), share_bank, anatomy.
        self.base_model_type = base_model_type
        self.midus = midus or {}
        super().__init__(**kwargs)
        # The base config class, built once from the same attributes: answers aliases (GPT-2's
        # hidden_size -> n_embd) and computed properties that the flat attributes don't hold.
        fields = {k: v for k, v in kwargs.items() if k not in ("auto_map", "architectures", "transformers_version")}
        snapshot = CONFIG_MAPPING[base_model_type](**fields) if base_model_type else None
        object.__setattr__(self, "_base_snapshot", snapshot)
        if kwargs.get("per_layer_config"):
            # transformers' per-layer overrides (Gemma-4's head_dim) live in private state that its
            # property setter builds: set them on this config, not answered from the snapshot
            self.per_layer_config = kwargs["per_layer_config"]

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails. Private state is this config's own, never the
        # snapshot's (the snapshot's per-layer state would make this config recurse into itself).
        snapshot = self.__dict__.get("_base_snapshot")
        if snapshot is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(snapshot, name)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.pop("_base_snapshot", None)
        data["architectures"] = ["MidusForCausalLM"]
        return data
