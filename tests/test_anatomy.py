"""Block anatomy found from the graph of one tiny decoder layer.

The table of expected names lives here, in the test; the code under test has none.
"""

from __future__ import annotations

import functools
import time
import warnings

import pytest
import torch
from tiny_configs import ARCHS, tiny_config
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from midus_surgery.anatomy.probe import LayerProbe, StackProbe
from midus_surgery.anatomy.trace import (
    Anatomy,
    AnatomyError,
    _anatomy_from_probe,
    decoder_layers,
    find_anatomy,
    find_stack_anatomy,
)
from midus_surgery.compiler.plan import _ffn_output_tensors

SEQ_ATTN = dict(attn_norms=("input_layernorm",), ffn_norms=("post_attention_layernorm",), residual="sequential")
LLAMA_LIKE = dict(layers_path="model.layers", attention="self_attn", attn_out_proj="self_attn.o_proj",
                  ffn=("mlp",), ffn_down_proj="mlp.down_proj", **SEQ_ATTN)

EXPECTED: dict[str, dict] = {
    "llama": dict(LLAMA_LIKE, layer_class="LlamaDecoderLayer"),
    "mistral": dict(LLAMA_LIKE, layer_class="MistralDecoderLayer"),
    "qwen2": dict(LLAMA_LIKE, layer_class="Qwen2DecoderLayer"),
    "qwen3": dict(LLAMA_LIKE, layer_class="Qwen3DecoderLayer"),
    "phi3": dict(LLAMA_LIKE, layer_class="Phi3DecoderLayer"),
    "gemma2": dict(
        LLAMA_LIKE, layer_class="Gemma2DecoderLayer",
        attn_norms=("input_layernorm", "post_attention_layernorm"),
        ffn_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    ),
    "gpt2": dict(
        layers_path="transformer.h", layer_class="GPT2Block", attention="attn", attn_out_proj="attn.c_proj",
        ffn=("mlp",), ffn_down_proj="mlp.c_proj", attn_norms=("ln_1",), ffn_norms=("ln_2",), residual="sequential",
    ),
    "gpt_neox": dict(
        layers_path="gpt_neox.layers", layer_class="GPTNeoXLayer", attention="attention",
        attn_out_proj="attention.dense", ffn=("mlp",), ffn_down_proj="mlp.dense_4h_to_h",
        attn_norms=("input_layernorm",), ffn_norms=("post_attention_layernorm",), residual="parallel",
    ),
    # Mixtures of experts: the walk back from the FFN's output meets the stacked experts module
    # (Mixtral) or the shared expert's down projection (Qwen2-MoE) first. Identity blocks do not
    # rely on this one name for them: they zero every down_proj under the FFN (plan._ffn_output_tensors).
    "mixtral": dict(
        layers_path="model.layers", layer_class="MixtralDecoderLayer", attention="self_attn", attn_out_proj="self_attn.o_proj",
        ffn=("mlp",), ffn_down_proj="mlp.experts", attn_norms=("input_layernorm",), ffn_norms=("post_attention_layernorm",),
        residual="sequential",
    ),
    "qwen2_moe": dict(
        layers_path="model.layers", layer_class="Qwen2MoeDecoderLayer", attention="self_attn", attn_out_proj="self_attn.o_proj",
        ffn=("mlp",), ffn_down_proj="mlp.shared_expert.down_proj", attn_norms=("input_layernorm",),
        ffn_norms=("post_attention_layernorm",), residual="sequential",
    ),
    "opt": dict(
        layers_path="model.decoder.layers", layer_class="OPTDecoderLayer", attention="self_attn",
        attn_out_proj="self_attn.out_proj", ffn=("fc1", "fc2"), ffn_down_proj="fc2",
        attn_norms=("self_attn_layer_norm",), ffn_norms=("final_layer_norm",), residual="sequential",
    ),
}

# what the graph reading names (the memory facts -- mixer, heads, FFN return -- are tested apart)
NAME_FIELDS = {"layers_path", "layer_class", "attention", "attn_out_proj", "ffn", "ffn_down_proj", "attn_norms", "ffn_norms", "residual"}

# (arch, overrides) cases: the tiny configs plus GPT-NeoX with a sequential residual
CASES = [(a, ()) for a in ARCHS] + [("gpt_neox", (("use_parallel_residual", False),))]
CASE_IDS = [a if not o else f"{a}-sequential" for a, o in CASES]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only contend (the suite runs 2-3x faster on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _expected(arch: str, overrides: tuple) -> dict:
    exp = dict(EXPECTED[arch])
    if dict(overrides).get("use_parallel_residual") is False:
        exp["residual"] = "sequential"
    return exp


@functools.lru_cache(maxsize=None)
def _probe(arch: str, overrides: tuple) -> LayerProbe:
    return StackProbe.build(tiny_config(arch, **dict(overrides)), trust_remote_code=False).first


@functools.lru_cache(maxsize=None)
def _found(arch: str, overrides: tuple, source: str) -> Anatomy:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # fx and export disagreeing is a failure here
        if source == "fx":
            return _anatomy_from_probe(_probe(arch, overrides))
        return _anatomy_from_probe(_probe(arch, overrides), sources=("export",))


def test_every_tiny_arch_has_an_expectation():
    assert sorted(EXPECTED) == ARCHS


@pytest.mark.parametrize("arch,overrides", CASES, ids=CASE_IDS)
def test_find_anatomy_names(arch, overrides):
    anatomy = _found(arch, overrides, "fx")
    assert anatomy.model_dump(include=NAME_FIELDS) == _expected(arch, overrides)
    assert anatomy.source == "fx"


@pytest.mark.parametrize("arch,overrides", CASES, ids=CASE_IDS)
def test_export_source_gives_the_same_anatomy(arch, overrides):
    anatomy = _found(arch, overrides, "export")
    assert anatomy.model_dump(include=NAME_FIELDS) == _expected(arch, overrides)
    assert anatomy.source == "export"


@pytest.mark.parametrize("source", ["fx", "export"])
def test_gemma2_post_norms_sit_on_their_branches(source):
    anatomy = _found("gemma2", (), source)
    # post_attention_layernorm is, in Gemma2, the norm AFTER the attention, before the first add
    assert "post_attention_layernorm" in anatomy.attn_norms
    assert anatomy.attn_post_norms == ("post_attention_layernorm",)  # a tapped memory block drops it
    assert _found("llama", (), source).attn_post_norms == () and _found("gpt_neox", (), source).attn_post_norms == ()
    assert "post_attention_layernorm" not in anatomy.ffn_norms
    assert set(anatomy.ffn_norms) == {"pre_feedforward_layernorm", "post_feedforward_layernorm"}
    text = anatomy.describe()
    assert "post_attention_layernorm" in text and "self_attn.o_proj" in text and "mlp.down_proj" in text


def test_gpt_neox_residual_form_follows_the_flag():
    assert _found("gpt_neox", (), "fx").residual == "parallel"
    assert _found("gpt_neox", (("use_parallel_residual", False),), "fx").residual == "sequential"


def test_opt_ffn_is_a_set_of_modules():
    anatomy = _found("opt", (), "fx")
    assert anatomy.ffn == ("fc1", "fc2")
    assert anatomy.ffn_down_proj == "fc2"
    assert anatomy.ffn_norms == ("final_layer_norm",)


def _layer_io(model: nn.Module, layer: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}

    def pre(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def post(module, args, kwargs, out):
        seen["out"] = (out[0] if isinstance(out, tuple) else out).clone()

    h1 = layer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = layer.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    return seen["in"], seen["out"].reshape(seen["in"].shape)


def _zero(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


@pytest.mark.parametrize("arch,overrides", CASES, ids=CASE_IDS)
def test_zeroing_the_projections_makes_the_layer_the_identity(arch, overrides):
    """The behavioural check: the found projections are exactly what writes into the residual."""
    anatomy = _found(arch, overrides, "fx")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **dict(overrides))).eval()
    layers = decoder_layers(model, anatomy.layers_path)
    assert len(layers) == model.config.num_hidden_layers
    layer = layers[1]
    assert type(layer).__name__ == anatomy.layer_class
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))

    x, y = _layer_io(model, layer, ids)
    assert not torch.allclose(x, y, atol=1e-4)  # the layer does something to begin with

    # what an identity block zeroes in the FFN: the down projection, or every down_proj of a MoE
    params = dict(layer.named_parameters())
    ffn_outputs = _ffn_output_tensors({n: tuple(p.shape) for n, p in params.items()}, anatomy)
    assert ffn_outputs
    with torch.no_grad():
        for name in ffn_outputs:
            params[name].zero_()
    x, y = _layer_io(model, layer, ids)
    assert not torch.allclose(x, y, atol=1e-4)  # the attention branch still writes

    _zero(layer.get_submodule(anatomy.attn_out_proj))
    x, y = _layer_io(model, layer, ids)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


# ---- architectures the finder has never seen --------------------------------------------


class _ToyConfig(PretrainedConfig):
    model_type = "midus_test_toy"

    def __init__(self, hidden_size=32, num_hidden_layers=3, vocab_size=64, with_attention=True, second_ffn=False, **kwargs):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.vocab_size = vocab_size
        self.with_attention = with_attention
        self.second_ffn = second_ffn
        super().__init__(**kwargs)


class _Mixer(nn.Module):
    """Causal single-head attention under unusual names."""

    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj_out = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj_out(a)


class _ToyBlock(nn.Module):
    """A parallel block with names no table knows: x + mix(n1(x)) + chan(n2(x))."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.n2 = nn.LayerNorm(d)
        self.chan = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        if config.with_attention:
            self.n1 = nn.LayerNorm(d)
            self.mix = _Mixer(d)
        if config.second_ffn:
            self.chan2 = nn.Linear(d, d)

    def forward(self, x):
        out = x + self.chan(self.n2(x))
        if hasattr(self, "mix"):
            out = out + self.mix(self.n1(x))
        if hasattr(self, "chan2"):
            out = out + self.chan2(out)
        return out


class _ToyForCausalLM(PreTrainedModel):
    config_class = _ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(_ToyBlock(config) for _ in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids=None, use_cache=None, **kwargs):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return CausalLMOutput(logits=self.head(h))


@pytest.fixture(scope="module")
def toy_registered():
    try:
        AutoConfig.register(_ToyConfig.model_type, _ToyConfig, exist_ok=True)
        AutoModelForCausalLM.register(_ToyConfig, _ToyForCausalLM, exist_ok=True)
    except TypeError:  # older signature without exist_ok
        AutoConfig.register(_ToyConfig.model_type, _ToyConfig)
        AutoModelForCausalLM.register(_ToyConfig, _ToyForCausalLM)


def test_unknown_names_are_found_from_the_graph(toy_registered):
    anatomy = find_anatomy(_ToyConfig())
    assert anatomy.model_dump(include=NAME_FIELDS) == dict(
        layers_path="blocks", layer_class="_ToyBlock", attention="mix", attn_out_proj="mix.proj_out",
        ffn=("chan",), ffn_down_proj="chan.2", attn_norms=("n1",), ffn_norms=("n2",), residual="parallel",
    )


def test_a_layer_that_is_one_ffn_branch_is_read_as_an_ffn_alone(toy_registered):
    """x + chan(n2(x)), no token mixer (Nemotron-H's MLP layers): identity blocks zero its output projection; no memory."""
    anatomy = find_anatomy(_ToyConfig(with_attention=False))
    assert anatomy.model_dump(include=NAME_FIELDS) == dict(
        layers_path="blocks", layer_class="_ToyBlock", attention=None, attn_out_proj=None,
        ffn=("chan",), ffn_down_proj="chan.2", attn_norms=(), ffn_norms=("n2",), residual="sequential")
    kind = find_stack_anatomy(_ToyConfig(with_attention=False)).kind_of(0)
    assert kind.anatomy.mixer == "none" and kind.refusal("identity") is None
    assert kind.refusal("memory").startswith("it has no token mixer (its one residual branch is its FFN 'chan'): the memory reads attention heads")


def test_a_layer_without_attention_raises_with_the_recipe_hint(toy_registered):
    with pytest.raises(AnatomyError) as info:  # two residual branches and neither mixes tokens: no block the planner knows
        find_anatomy(_ToyConfig(with_attention=False, second_ffn=True))
    msg = str(info.value)
    assert len(msg.splitlines()) <= 2, msg  # a refusal is short: what is missing, what was found, what to state
    assert "attention module" in msg.splitlines()[0] and "`anatomy:` block" in msg
    assert "layers_path=blocks" in msg  # what was found is said


def test_a_config_without_a_model_raises_with_the_recipe_hint():
    with pytest.raises(AnatomyError, match="anatomy:"):
        find_anatomy(PretrainedConfig(num_hidden_layers=2))


def test_decoder_layers_rejects_a_wrong_path():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    anatomy = Anatomy(**EXPECTED["llama"]).model_copy(update={"layers_path": "model.norm"})
    with pytest.raises(AnatomyError, match="ModuleList"):
        decoder_layers(model, anatomy.layers_path)
    with pytest.raises(AnatomyError):
        decoder_layers(model, "model.nope")


def test_real_size_config_is_traced_at_tiny_size(monkeypatch):
    """Llama-3.2-1B shape: the finder builds nothing of real size (time printed, not asserted).

    Two witnesses: every model the finder builds is counted (its parameters), and every tensor any
    torch op makes while it runs is seen by a dispatch mode (its element count). The real model's
    smallest weight matrix holds 2048 x 512 = 1M values, its embedding 262M."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from midus_surgery.anatomy import probe as probe_module

    config = LlamaConfig(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, head_dim=64, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                         "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    )
    built = []
    real_build = probe_module._build_model

    def counted(auto_cls, cfg, trust_remote_code, **kwargs):
        model = real_build(auto_cls, cfg, trust_remote_code, **kwargs)
        if next(model.parameters()).is_meta:
            return model  # the full-depth stack on the meta device: no memory, only its layer kinds are read
        built.append((cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, sum(p.numel() for p in model.parameters()),
                      max(p.numel() for p in model.parameters())))
        return model

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    monkeypatch.setattr(probe_module, "_build_model", counted)
    t = time.perf_counter()
    with LargestTensor():
        anatomy = find_anatomy(config)
    print(f"\nfind_anatomy on a Llama-3.2-1B-shaped config: {time.perf_counter() - t:.2f} s")
    assert anatomy.model_dump(include=NAME_FIELDS) == EXPECTED["llama"]
    # one tiny model (the first, shrunk config traced), 2 layers of width 128, a 256-token vocabulary
    assert [b[:3] for b in built] == [(128, 2, 256)], built
    assert built[0][3] < 400_000 and built[0][4] <= 256 * 128  # all its parameters, and its largest
    assert 0 < LargestTensor.largest <= 256 * 128  # no tensor of any op larger than that embedding


def test_a_config_that_does_not_shrink_falls_back():
    """Phi-3-128k's longrope lists are sized by head_dim/2: shrinking head_dim breaks the config."""
    from transformers import Phi3Config

    config = Phi3Config(
        hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, vocab_size=32064, pad_token_id=32000, max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 48,
                         "long_factor": [1.0] * 48},
    )
    probe = StackProbe.build(config, trust_remote_code=False)
    assert probe.config_label == "shrunk, head_dim kept"
    assert _anatomy_from_probe(probe.first).model_dump(include=NAME_FIELDS) == EXPECTED["phi3"]
