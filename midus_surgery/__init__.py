"""midus-surgery: a declarative model-surgery compiler for Memory-Infused Depth Up-Scaling.

Importing the package registers the MIDUS model classes with transformers' Auto classes, so
emitted models load with plain ``AutoModelForCausalLM.from_pretrained(path)``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_midus import MidusConfig
    from .modeling_midus import MidusForCausalLM

    AutoConfig.register("midus", MidusConfig, exist_ok=True)
    AutoModelForCausalLM.register(MidusConfig, MidusForCausalLM, exist_ok=True)


_register()
