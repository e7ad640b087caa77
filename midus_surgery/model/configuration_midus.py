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

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails.
        snapshot = self.__dict__.get("_base_snapshot")
        if snapshot is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(snapshot, name)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.pop("_base_snapshot", None)
        data["architectures"] = ["MidusForCausalLM"]
        return data
