"""The ``Anatomy`` record: where surgery finds the parts of a decoder block.

Kept apart from ``anatomy`` (which traces blocks with torch) so that recipes, which may state an
anatomy, parse without importing torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator


class Anatomy(BaseModel):
    """Module paths inside one decoder layer, plus where the layers live in the causal LM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers_path: str = Field(description="Dotted path of the ModuleList of decoder layers in the causal LM, e.g. 'model.layers'.")
    layer_class: str = Field(description="Class name of the decoder layer, e.g. 'LlamaDecoderLayer'.")
    attention: str | None = Field(description="The attention module, relative to the layer, e.g. 'self_attn'; null for a block whose one residual branch is its FFN (Nemotron-H's MLP and MoE layers: `x + mlp(norm(x))`), which identity blocks of it zero and which cannot make a memory block.")
    attn_out_proj: str | None = Field(description="The attention's output projection (last linear of the attention branch), e.g. 'self_attn.o_proj'; null when `attention` is.")
    ffn: tuple[str, ...] = Field(description="Modules making the FFN branch in call order, e.g. ['mlp'] or ['fc1', 'fc2']; [] for a block whose one residual branch is its token mixer (Mamba's `x + mixer(norm(x))`): identity blocks of it zero the mixer's output projection, and it cannot make a memory block.")
    ffn_down_proj: str | None = Field(description="The last linear of the FFN branch, e.g. 'mlp.down_proj' or 'fc2'; null when `ffn` is [].")
    attn_norms: tuple[str, ...] = Field(description="Norms on the attention branch (pre and post), e.g. ['input_layernorm'].")
    ffn_norms: tuple[str, ...] = Field(description="Norms on the FFN branch (pre and post), e.g. ['post_attention_layernorm']. A norm both branches read (Falcon's, Phi's, GPT-J's one norm before a parallel attention and MLP) is the attention's: listed in attn_norms, it is taken out of ffn_norms, so a memory block keeps it.")
    attn_post_norms: tuple[str, ...] = Field((), description="The attention branch's norms that read the attention's output, before the residual add (Gemma-2's and OLMo-2's post_attention_layernorm), listed in attn_norms too. A memory block whose attention adds nothing (query_source: heads) drops them: they would only normalise zeros.")
    out_biases: tuple[str, ...] = Field((), description="Parameters a branch adds to its output after its last linear (JetMoE's mixtures of attention heads and of experts add a bias of their own): zeroed with the output projections, so that identity and memory blocks start as the identity.")
    extra_out_projs: tuple[str, ...] = Field((), description="The last linear of each further residual branch (Gemma-4's per-layer input): zeroed, like the FFN's, so that identity and memory blocks start as the identity.")
    residual: Literal["sequential", "parallel"] = Field(description="'sequential' (x + attn, then + ffn) or 'parallel' (x + attn(x) + ffn(x), GPT-NeoX/Falcon/Phi).")
    source: Literal["fx", "export", "recipe"] = Field("fx", description="How the anatomy was found.")
    mixer: Literal["attention", "other", "none"] = Field("attention", description="'attention' when the token mixer is softmax attention (a memory block needs it); 'other' for convolutions, linear attention, state-space layers; 'none' for a block with no token mixer (`attention` null).")
    heads_key: str | None = Field(None, description="The config key holding the attention's query-head count (traced from the heads its output projection receives); None: num_attention_heads.")
    out_proj_in_axis: StrictInt = Field(1, ge=0, le=1, description="The axis of the output projection's weight that takes the concatenated heads: 1 for nn.Linear ([out, in]), 0 for GPT-2's Conv1D ([in, out]).")
    ffn_tuple: tuple[StrictInt, StrictInt] | None = Field(None, description="When the FFN returns a tuple (mixtures of experts that also return router scores): (its length, the position of the hidden states); None: it returns a tensor.")
    ffn_flat: bool = Field(False, description="Whether the FFN returns its output with the tokens flattened into one axis ([tokens, hidden] for a [batch, sequence, hidden] input: Llama-4's mixture of experts); a memory readout standing in for it does the same.")
    ffn_residual: Annotated[StrictInt, Field(ge=0)] | str | None = Field(None, description="When the FFN adds the residual stream itself (BLOOM, MPT: `mlp(hidden, residual)`): the argument that hands it in, a position among the call's positional arguments, or a keyword; 0: the hidden states it is called with, its own input (CPM-Ant's FFN block normalises its input, runs the FFN and adds the input back); a memory readout standing in for the FFN adds it too. None: the layer adds it.")

    @model_validator(mode="after")
    def _shared_norms_are_the_attentions(self) -> "Anatomy":
        # A norm both branches read (Falcon's, Phi's, GPT-J's one norm before a parallel attention and MLP) is the
        # attention's: a memory block drops its FFN's norms, and dropped, this one left the attention reading the
        # raw residual stream (trial53). Recorded once, with the attention.
        shared = set(self.ffn_norms) & set(self.attn_norms)
        if shared:
            object.__setattr__(self, "ffn_norms", tuple(n for n in self.ffn_norms if n not in shared))
        if (not self.ffn) != (self.ffn_down_proj is None):
            raise ValueError("ffn and ffn_down_proj go together: a block without an FFN (ffn: []) has no down projection (null), "
                             "and one with an FFN names its down projection")
        if (self.attention is None) != (self.attn_out_proj is None):
            raise ValueError("attention and attn_out_proj go together: a block without a token mixer (attention: null) has no output "
                             "projection of it (null)")
        if self.attention is None and (not self.ffn or self.attn_norms or self.residual != "sequential"):
            raise ValueError("a block without a token mixer (attention: null) is its FFN alone: ffn names it, attn_norms is [] and "
                             "residual is 'sequential'")
        if (self.attention is None) != (self.mixer == "none"):
            object.__setattr__(self, "mixer", "none" if self.attention is None else ("attention" if self.mixer == "none" else self.mixer))
        stray = [n for n in self.attn_post_norms if n not in self.attn_norms]
        if stray:
            raise ValueError(f"attn_post_norms {stray} are not among attn_norms {list(self.attn_norms)}: a post-norm is one of the attention branch's norms")
        return self

    def describe(self) -> str:
        """A few human-readable lines, e.g. for ``midus-surgery plan``."""
        form = ("x = x + mixer(x)" if not self.ffn else "x = x + ffn(x)" if self.attention is None
                else "x + attn(x) + ffn(x)" if self.residual == "parallel" else "x = x + attn(x); x = x + ffn(x)")
        attention_line = ("  attention branch:  none (the FFN's is the block's one residual branch)" if self.attention is None else
                          f"  attention branch:  norms [{', '.join(self.attn_norms)}]"
                          + (f" (after the attention: {', '.join(self.attn_post_norms)})" if self.attn_post_norms else "")
                          + f"  attention {self.attention}"
                          f"  output projection {self.attn_out_proj}")
        return "\n".join([
            f"{self.layer_class} at {self.layers_path}[i]   (found by {self.source})",
            f"  residual:          {self.residual}   ({form})",
            attention_line,
            (f"  FFN branch:        norms [{', '.join(self.ffn_norms)}]  ffn [{', '.join(self.ffn)}]"
             f"  down projection {self.ffn_down_proj}"
             + (f"  (adds the residual itself, {'its own input' if self.ffn_residual == 0 else f'from its argument {self.ffn_residual}'})"
                if self.ffn_residual is not None else "")
             + ("  (returns the tokens flattened)" if self.ffn_flat else "")) if self.ffn else
            "  FFN branch:        none (the token mixer's is the block's one residual branch)",
        ] + ([f"  further branches:  output projections [{', '.join(self.extra_out_projs)}]"] if self.extra_out_projs else [])
          + ([f"  output biases:     [{', '.join(self.out_biases)}]   (added after the output projections)"] if self.out_biases else []))


class BlockKind(BaseModel):
    """One kind of decoder layer in the stack: its anatomy, or why it has none surgery can use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(description="What the layers of this kind are, e.g. 'Lfm2DecoderLayer (conv)'.")
    anatomy: Anatomy | None = None
    problem: str | None = Field(None, description="Why the anatomy could not be read (identity and memory blocks of this kind are refused with it).")

    memory_problem: str | None = Field(None, description="Why a memory block cannot be made from a layer of this kind (no softmax attention, heads not found...); None: it can.")

    @model_validator(mode="after")
    def _one_of(self) -> "BlockKind":
        if (self.anatomy is None) == (self.problem is None):
            raise ValueError("a block kind has either an anatomy or a problem")
        return self

    def refusal(self, kind: str) -> str | None:
        """Why an inserted block of ``kind`` ('identity' or 'memory') cannot copy a layer of this kind."""
        if self.problem is not None:
            return self.problem
        return self.memory_problem if kind == "memory" else None


class StackAnatomy(BaseModel):
    """The anatomy of every decoder layer: hybrid stacks (attention mixed with convolution, linear
    attention or state-space layers; dense mixed with MoE FFNs) have several kinds of layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers_path: str
    kinds: tuple[BlockKind, ...]
    layer_kinds: tuple[StrictInt, ...] = Field(description="Per base layer: its index into `kinds`.")

    @classmethod
    def uniform(cls, anatomy: Anatomy, num_layers: int) -> "StackAnatomy":
        """Every layer of one kind (a recipe's stated anatomy)."""
        return cls(layers_path=anatomy.layers_path, kinds=(BlockKind(label=anatomy.layer_class, anatomy=anatomy),),
                   layer_kinds=(0,) * num_layers)

    def kind_of(self, layer: int) -> BlockKind:
        return self.kinds[self.layer_kinds[layer]]

    @property
    def single(self) -> Anatomy | None:
        """The anatomy when every layer is of one kind that has one (what older plans recorded)."""
        return self.kinds[0].anatomy if len(self.kinds) == 1 else None

    def layers_of(self, kind: int) -> list[int]:
        return [i for i, k in enumerate(self.layer_kinds) if k == kind]

    def describe(self) -> str:
        if self.single is not None:
            return self.single.describe()
        lines = [f"{len(self.kinds)} kinds of decoder layer at {self.layers_path}[i]"]
        for k, kind in enumerate(self.kinds):
            lines.append(f"  layers {index_ranges(self.layers_of(k))}: {kind.label}")
            body = kind.anatomy.describe().splitlines()[1:] if kind.anatomy else [f"  no anatomy: {kind.problem}"]
            lines += ["  " + line for line in body]
        return "\n".join(lines)


def index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)
