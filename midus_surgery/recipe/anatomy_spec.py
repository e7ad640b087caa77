"""The ``Anatomy`` record: where surgery finds the parts of a decoder block.

Kept apart from ``anatomy`` (which traces blocks with torch) so that recipes, which may state an
anatomy, parse without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Anatomy(BaseModel):
    """Module paths inside one decoder layer, plus where the layers live in the causal LM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers_path: str = Field(description="Dotted path of the ModuleList of decoder layers in the causal LM, e.g. 'model.layers'.")
    layer_class: str = Field(description="Class name of the decoder layer, e.g. 'LlamaDecoderLayer'.")
    attention: str = Field(description="The attention module, relative to the layer, e.g. 'self_attn'.")
    attn_out_proj: str = Field(description="The attention's output projection (last linear of the attention branch), e.g. 'self_attn.o_proj'.")
    ffn: tuple[str, ...] = Field(description="Modules making the FFN branch in call order, e.g. ['mlp'] or ['fc1', 'fc2'].")
    ffn_down_proj: str = Field(description="The last linear of the FFN branch, e.g. 'mlp.down_proj' or 'fc2'.")
    attn_norms: tuple[str, ...] = Field(description="Norms on the attention branch (pre and post), e.g. ['input_layernorm'].")
    ffn_norms: tuple[str, ...] = Field(description="Norms on the FFN branch (pre and post), e.g. ['post_attention_layernorm'].")
    residual: Literal["sequential", "parallel"] = Field(description="'sequential' (x + attn, then + ffn) or 'parallel' (x + attn(x) + ffn(x), GPT-NeoX/Falcon/Phi).")
    source: Literal["fx", "export", "recipe"] = Field("fx", description="How the anatomy was found.")

    def describe(self) -> str:
        """A few human-readable lines, e.g. for ``midus-surgery plan``."""
        form = ("x + attn(x) + ffn(x)" if self.residual == "parallel" else "x = x + attn(x); x = x + ffn(x)")
        return "\n".join([
            f"{self.layer_class} at {self.layers_path}[i]   (found by {self.source})",
            f"  residual:          {self.residual}   ({form})",
            f"  attention branch:  norms [{', '.join(self.attn_norms)}]  attention {self.attention}"
            f"  output projection {self.attn_out_proj}",
            f"  FFN branch:        norms [{', '.join(self.ffn_norms)}]  ffn [{', '.join(self.ffn)}]"
            f"  down projection {self.ffn_down_proj}",
        ])
