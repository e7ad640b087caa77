"""The planner: layer maps, rewritten configs, tensor maps and counts, on several architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_configs import tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from midus_surgery.anatomy.trace import find_stack_anatomy
from midus_surgery.compiler.plan import attention_dims, make_plan, window_layers_boundary
from midus_surgery.errors import RecipeError
from midus_surgery.model.hml import HeadwiseMemory, HMLConfig
from midus_surgery.recipe.schema import parse_recipe
from midus_surgery.recipe.yaml_source import load_yaml

MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8}


def loaded_from(data: dict):
    data = {"base": {"path": "unused"}, "output": {"dir": "out"}, **data}
    return parse_recipe(load_yaml("test.yaml", text=yaml.safe_dump(data, sort_keys=False)), Path("."))


def plan_for(config, layout: dict, **extra):
    return make_plan(loaded_from({"layout": layout, **extra}), config, find_stack_anatomy(config))


def layer_map(plan):
    return [(layer.index, layer.source, layer.kind) for layer in plan.layers]


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# layer maps


def test_slices_solar_style():
    plan = plan_for(tiny_config("llama"), {"slices": [{"layers": [0, 3]}, {"layers": [1, 4]}]})
    assert layer_map(plan) == [(0, 0, "base"), (1, 1, "base"), (2, 2, "base"), (3, 1, "copy"), (4, 2, "copy"), (5, 3, "base")]


def test_slices_choose_memory_copies():
    layout = {"slices": [{"layers": [0, 3]}, {"layers": [1, 4], "kind": "identity", "memory": [2]}]}
    plan = plan_for(tiny_config("llama"), layout, memory=MEMORY)
    assert [k for _, _, k in layer_map(plan)] == ["base", "base", "base", "identity", "memory", "base"]


def test_interleave_after_every():
    plan = plan_for(tiny_config("llama"), {"interleave": {"after_every": 2, "kind": "memory"}}, memory=MEMORY)
    assert layer_map(plan) == [(0, 0, "base"), (1, 1, "base"), (2, 1, "memory"), (3, 2, "base"), (4, 3, "base"), (5, 3, "memory")]
    assert plan.memory_layers == [2, 5]


def test_interleave_after_list():
    plan = plan_for(tiny_config("llama"), {"interleave": {"after": [0, 3], "kind": "identity"}})
    assert layer_map(plan) == [(0, 0, "base"), (1, 0, "identity"), (2, 1, "base"), (3, 2, "base"), (4, 3, "base"), (5, 3, "identity")]


def test_stack_on_top():
    plan = plan_for(tiny_config("llama"), {"stack": {"layers": [2, 4], "kind": "identity"}})
    assert layer_map(plan)[4:] == [(4, 2, "identity"), (5, 3, "identity")]


def test_explicit_layers_default_kinds():
    plan = plan_for(tiny_config("llama"), {"layers": [{"source": 0}, {"source": 1}, {"source": 1}, {"source": 2}, {"source": 3}, {"source": 3, "kind": "memory"}]}, memory=MEMORY)
    assert [k for _, _, k in layer_map(plan)] == ["base", "base", "copy", "base", "base", "memory"]


def test_explicit_layers_an_inserted_block_listed_before_its_original():
    """The plain use is the original wherever it stands: labelled `copy`, the real base layer was
    trained under freeze: base and verify skipped its identity checks."""
    layers = [{"source": 0}, {"source": 3, "kind": "identity"}, {"source": 1}, {"source": 2}, {"source": 3}, {"source": 3, "kind": "memory"}]
    plan = plan_for(tiny_config("llama"), {"layers": layers}, memory=MEMORY)
    assert layer_map(plan) == [(0, 0, "base"), (1, 3, "identity"), (2, 1, "base"), (3, 2, "base"), (4, 3, "base"), (5, 3, "memory")]
    # an explicit `kind: base` names the original, whichever entry it is; a second one is a problem
    layers = [{"source": 0, "kind": "memory"}, {"source": 0, "kind": "base"}, {"source": 1}, {"source": 1}, {"source": 1, "kind": "base"},
              {"source": 2}, {"source": 3}]
    plan = plan_for(tiny_config("llama"), {"layers": layers}, memory=MEMORY)
    assert [k for _, _, k in layer_map(plan)] == ["memory", "base", "copy", "copy", "base", "base", "base"]
    (p,) = problems_of(tiny_config("llama"), {"layers": [{"source": 0, "kind": "base"}, {"source": 0, "kind": "base"}, *layers[2:]]})
    assert p.field == "layout.layers.1.kind" and "already used as `base` (layout.layers[0])" in p.message


# ----------------------------------------------------------------------------------------------
# semantic problems, located


def problems_of(config, layout, **extra):
    with pytest.raises(RecipeError) as info:
        plan_for(config, layout, **extra)
    return info.value.problems


def test_out_of_range_layers_are_each_reported():
    found = problems_of(tiny_config("llama"), {"slices": [{"layers": [0, 9]}, {"layers": [7, 8]}]})
    assert [p.field for p in found] == ["layout.slices.0.layers.1", "layout.slices.1.layers.0", "layout.slices.1.layers.1"]
    assert "out of range: the base model has 4 layers" in found[0].message
    assert found[0].where.startswith("test.yaml:")


def test_a_layer_listed_twice_in_after_is_named_at_its_item():
    (p,) = problems_of(tiny_config("llama"), {"interleave": {"after": [3, 1, 1], "kind": "copy"}})
    assert p.field == "layout.interleave.after.2" and p.message.startswith("layer 1 is listed twice (also after.1)")


def test_memory_back_to_back_needs_explicit_permission():
    layout = {"layers": [{"source": 0}, {"source": 0, "kind": "memory"}, {"source": 1, "kind": "memory"}, {"source": 1}, {"source": 2}, {"source": 3}]}
    (p,) = problems_of(tiny_config("llama"), layout, memory=MEMORY)
    assert "back to back" in p.message and "allow_adjacent_memory" in p.message
    plan = plan_for(tiny_config("llama"), layout, memory=MEMORY, allow_adjacent_memory=True)
    assert plan.memory_layers == [1, 2]


def test_original_layer_cannot_be_a_memory_block():
    (p,) = problems_of(tiny_config("llama"), {"slices": [{"layers": [0, 2]}, {"layers": [1, 4], "memory": [3]}]}, memory=MEMORY)
    assert p.field == "layout.slices.1.memory.0" and "first used in this slice" in p.message


def test_memory_needs_even_head_dim():
    config = tiny_config("gpt2", n_embd=60)  # 4 heads of 15 (RoPE models refuse odd head dims anyway)
    (p,) = problems_of(config, {"interleave": {"after_every": 2, "kind": "memory"}}, memory=MEMORY)
    assert "head width 15 is odd" in p.message and "output layers 2, 5" in p.message


def test_memory_without_output_projection_needs_matching_width():
    config = tiny_config("qwen3", head_dim=8)  # 4 heads * 8 = 32 != hidden 64
    (p,) = problems_of(config, {"interleave": {"after_every": 2, "kind": "memory"}}, memory={**MEMORY, "output_proj": "never"})
    assert p.field == "memory.output_proj" and "differs from hidden size 64" in p.message


def test_layout_that_inserts_nothing_is_refused_saying_what_it_does():
    (p,) = problems_of(tiny_config("llama"), {"slices": [{"layers": [0, 4]}]})
    assert p.message == "the layout inserts no layer: the output would be the base model"
    (p,) = problems_of(tiny_config("llama"), {"layers": [{"source": 1}, {"source": 0}, {"source": 2}, {"source": 3}]})
    assert p.message.startswith("the layout inserts no layer: it only reorders the base's layers; an up-scaling inserts")
    (p,) = problems_of(tiny_config("llama"), {"layers": [{"source": 0}, {"source": 3}, {"source": 2}]})
    assert p.message.startswith("the layout inserts no layer: it only reorders the base's layers and drops base layer 1;")
    # a plain copy standing in for its own original is that layer: still the base model
    (p,) = problems_of(tiny_config("llama"), {"layers": [{"source": 0}, {"source": 1, "kind": "copy"}, {"source": 2}, {"source": 3}]})
    assert "a plain copy in place of base layer 1 is that same layer; the output would be the base model" in p.message


def test_max_window_layers_says_the_new_layer_types_where_it_can():
    """Qwen2 states sliding layers twice: layer_types, and max_window_layers for readers of the older
    key. Where the output's types are still 'every layer from N on', N is rewritten for the new depth."""
    config = tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    plan = plan_for(config, {"interleave": {"after": [0], "kind": "copy"}})
    assert plan.config["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"] * 2 and plan.config["max_window_layers"] == 3
    plan = plan_for(config, {"slices": [{"layers": [0, 3]}, {"layers": [1, 4]}]})  # full, full, sliding, full, sliding, sliding
    assert plan.config["max_window_layers"] == 2 and window_layers_boundary(plan.config) is None  # cannot say it: kept (plan notes it)


def test_every_nth_layer_integers_say_the_new_lists_where_they_can():
    """Gemma-3 and Cohere-2 restate layer_types as sliding_window_pattern, Llama-4 no_rope_layers and moe_layers as
    no_rope_layer_interval and interleave_moe_layer_step: 'layer i is special where (i + 1) % N == 0'. The integers
    were kept as the base had them, another pattern than the rewritten lists for a tool that reads them (trial142 F1)."""
    from tiny_configs import TINY
    from transformers import Gemma3TextConfig

    from midus_surgery.compiler.plan import every_nth_keys_unsaid, sync_every_nth_keys

    config = Gemma3TextConfig(**{**TINY["gemma2"], "num_hidden_layers": 6, "sliding_window_pattern": 3})
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    layers = [{"source": i} for i in (0, 1, 0, 2, 3, 4, 3, 5)]  # S S S F S S S F: every 4th
    plan = plan_for(config, {"layers": layers})
    assert [t[0] for t in plan.config["layer_types"]] == list("sssfsssf")
    assert plan.config["sliding_window_pattern"] == plan.config["_sliding_window_pattern"] == 4
    assert every_nth_keys_unsaid(plan.config) == []
    plan = plan_for(config, {"interleave": {"after": [2], "kind": "copy"}})  # S S F F S S F: no N says it, kept and noted
    assert plan.config["sliding_window_pattern"] == 3 and every_nth_keys_unsaid(plan.config) == ["sliding_window_pattern", "_sliding_window_pattern"]
    llama4 = {"num_hidden_layers": 5, "no_rope_layer_interval": 2, "no_rope_layers": [1, 1, 0, 1, 0], "interleave_moe_layer_step": 2,
              "moe_layers": [2, 4]}  # a copy of layer 0 first: the special layers moved from 1, 3 to 2, 4
    sync_every_nth_keys(llama4)
    assert (llama4["no_rope_layer_interval"], llama4["interleave_moe_layer_step"]) == (2, 2)  # (i + 1) % 2 == 0 at 1, 3: not said
    assert every_nth_keys_unsaid(llama4) == ["no_rope_layer_interval", "interleave_moe_layer_step"]
    llama4 |= {"no_rope_layers": [1, 1, 0, 1, 1], "moe_layers": [2]}
    sync_every_nth_keys(llama4)
    assert (llama4["no_rope_layer_interval"], llama4["interleave_moe_layer_step"]) == (3, 3) and every_nth_keys_unsaid(llama4) == []
    llama4 |= {"moe_layers": [], "interleave_moe_layer_step": 9}  # no MoE layer, and 9 says so already: left as it is
    sync_every_nth_keys(llama4)
    assert llama4["interleave_moe_layer_step"] == 9


def test_a_layout_that_drops_a_base_layer_while_inserting_is_refused_unless_allowed():
    """SOLAR [0, 3] + [1, 4] mistyped as [0, 2] + [1, 2] + [3, 4] inserts a copy of layer 1 and loses
    layer 2: the same depth, a different model. Named, located at the list, and allowed on purpose."""
    slices = {"slices": [{"layers": [0, 2]}, {"layers": [1, 2]}, {"layers": [3, 4]}]}
    (p,) = problems_of(tiny_config("llama"), slices)
    assert p.field == "layout.slices" and p.message.startswith("base layer 2 is in no slice, so the output would drop it (slices are half-open")
    assert p.message.endswith("set allow_dropped_layers: true to prune on purpose")
    (p,) = problems_of(tiny_config("llama"), {"layers": [{"source": 0}, {"source": 0}, {"source": 3}]})
    assert p.field == "layout.layers" and p.message.startswith("base layers 1, 2 are in no entry, so the output would drop them;")
    plan = plan_for(tiny_config("llama"), slices, allow_dropped_layers=True)
    assert layer_map(plan) == [(0, 0, "base"), (1, 1, "base"), (2, 1, "copy"), (3, 3, "base")]


# ----------------------------------------------------------------------------------------------
# rewritten configs: depth, every per-layer list, accepted by transformers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2", "opt"])
def test_rewritten_config_builds_the_deeper_model(arch):
    config = tiny_config(arch)
    plan = plan_for(config, {"slices": [{"layers": [0, 3]}, {"layers": [1, 4]}]})
    data = dict(plan.config)
    new = AutoConfig.for_model(data.pop("model_type"), **data)
    assert new.num_hidden_layers == 6
    model = AutoModelForCausalLM.from_config(new)
    assert count(model) == plan.params["total"]  # plain copies: the counts must match a real instance


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_layer_types_follow_the_source_layer(arch):
    config = tiny_config(arch)
    base_types = list(config.layer_types)
    plan = plan_for(config, {"slices": [{"layers": [0, 3]}, {"layers": [1, 4]}]})
    assert plan.config["layer_types"] == [base_types[s] for s in (0, 1, 2, 1, 2, 3)]
    if arch == "gemma2":  # alternating sliding windows keep each copy's own kind
        assert plan.config["layer_types"][3] == "full_attention" and plan.config["layer_types"][4] == "sliding_attention"


def test_index_lists_are_renumbered():
    config = tiny_config("llama")
    config.mlp_only_layers = [1, 3]  # an MoE-style list of layer indices
    plan = plan_for(config, {"interleave": {"after_every": 2, "kind": "transformer"}})
    assert plan.config["mlp_only_layers"] == [1, 2, 4, 5]


FALCON_H1 = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                 mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_ssm=128, pad_token_id=0)


@pytest.mark.parametrize("depth,key,value", [
    (5, "ssm_multipliers", [1.0, 2.0, 0.5, 1.5, 0.25]),  # one per part of the Mamba input projection
    (2, "mlp_multipliers", [1.0, 0.5]),                  # the gate's and the down projection's
])
def test_a_list_of_as_many_entries_as_layers_by_chance_is_not_remapped(depth, key, value):
    """FalconH1's multiplier lists have a fixed length that can equal the base's depth: taken for one entry a
    layer, a copy after layer 0 shifted them and every Mamba layer, the base's own included, computed with
    other multipliers (trial38). The config class builds them at a fixed length whatever the depth."""
    config = AutoConfig.for_model("falcon_h1", num_hidden_layers=depth, **{**FALCON_H1, key: value})
    plan = plan_for(config, {"interleave": {"after": [0], "kind": "copy"}})
    assert plan.config["num_hidden_layers"] == depth + 1 and plan.config[key] == value


def test_per_layer_flags_of_a_two_layer_base_are_not_taken_for_layer_indices():
    """SmolLM3's no_rope_layers is a 0/1 flag a layer; at two layers [1, 0] also reads as the distinct layer
    indices 1 and 0 of a list named *_layers, and was renumbered to [0, 1, 2]: output layer 0 lost its
    rotary embedding and layer 2 gained one (trial38). The config class builds one flag a layer."""
    config = AutoConfig.for_model("smollm3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=128, no_rope_layer_interval=2, pad_token_id=0)
    assert config.no_rope_layers == [1, 0]
    plan = plan_for(config, {"interleave": {"after": [0], "kind": "copy"}})
    assert layer_map(plan) == [(0, 0, "base"), (1, 0, "copy"), (2, 1, "base")]
    assert plan.config["no_rope_layers"] == [1, 1, 0]


def test_the_config_class_decides_a_lists_kind_only_where_its_answer_is_clear():
    """Asked at two other depths: a default that follows the depth is per-layer, one of a fixed length is not; a
    default of every layer's index (LFM2's full_attn_idxs, Llama-4's moe_layers) reads as an index list and a
    per-layer list alike, and a class whose depth follows a list (NemotronH) answers nothing: the name and
    length rules decide those, as before."""
    from midus_surgery.anatomy.config_lists import list_kinds

    def kinds(model_type, **kw):
        return list_kinds(AutoConfig.for_model(model_type, **kw))

    assert kinds("smollm3", num_hidden_layers=2, no_rope_layer_interval=2)["no_rope_layers"] == "per-layer"
    assert kinds("falcon_h1", num_hidden_layers=5)["ssm_multipliers"] == "fixed"
    assert "full_attn_idxs" not in kinds("lfm2", num_hidden_layers=4) and "moe_layers" not in kinds("llama4_text", num_hidden_layers=4)
    assert "layers_block_type" not in kinds("nemotron_h")
    # Reformer's attn_layers is one entry a layer, but its default (as long as the class's default depth) does not
    # grow with the depth: no verdict, so the length rule extends it (the sweep's Reformer DUS was refused: the
    # up-scaled model indexed past the list)
    assert "attn_layers" not in kinds("reformer", attn_layers=["local", "lsh"] * 4, num_hidden_layers=8)


def test_the_header_planners_architectures_make_no_list_but_layer_types():
    """docs/apply.md: the header planner (no config class to ask) keeps the length rule; its architectures' classes
    make no other list that the rule could mistake."""
    from midus_surgery.compiler.header_plan import ARCHS

    for model_type in ARCHS:
        lists = {k for k, v in AutoConfig.for_model(model_type).to_dict().items() if isinstance(v, (list, tuple))}
        assert lists <= {"layer_types"}, (model_type, lists)


def test_gpt_neo_states_the_new_layers_attention_in_both_its_keys():
    """GPT-Neo's attention_types ([[kinds, repeats]]) describes the layers as attention_layers does; left at the
    base's, it described four layers of a six-layer model, and GPTNeoConfig built from it refused (trial38)."""
    config = AutoConfig.for_model("gpt_neo", hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, vocab_size=128,
                                  attention_types=[[["global", "local"], 2]], window_size=4, max_position_embeddings=64)
    plan = plan_for(config, {"interleave": {"after_every": 2, "kind": "copy"}})
    kinds = ["global", "local", "local", "global", "local", "local"]
    assert plan.config["attention_layers"] == kinds
    data = {k: v for k, v in plan.config.items() if k != "attention_layers"}
    assert AutoConfig.for_model(data.pop("model_type"), **data).attention_layers == kinds  # rebuilt from attention_types


def test_layer_kinds_chosen_by_an_index_rule_must_keep_their_pattern():
    """Jamba picks MoE vs dense FFN (and Mamba vs attention) by ``i % period == offset``, a rule
    no config rewrite can carry to a new layout: caught from the tensors the new config builds."""
    config = AutoConfig.for_model("jamba", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=64, num_experts=2, num_experts_per_tok=1,
                                  expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                                  mamba_d_state=4, mamba_expand=2, use_mamba_kernels=False)
    with pytest.raises(RecipeError, match=r"output layer 2 unlike its source, base layer 1 .*feed_forward"):
        make_plan(loaded_from({"layout": {"interleave": {"after_every": 2, "kind": "transformer"}}}), config, None)
    # copies of layers 2 and 3 appended after layer 3 land on indices 4 and 5, the same parities
    plan = make_plan(loaded_from({"layout": {"slices": [{"layers": [0, 4]}, {"layers": [2, 4]}]}}), config, None)
    assert layer_map(plan)[4:] == [(4, 2, "copy"), (5, 3, "copy")]


# ----------------------------------------------------------------------------------------------
# tensor map and counts


def test_tensor_map_of_memory_and_identity_blocks():
    config = tiny_config("llama")
    layout = {"layers": [{"source": 0}, {"source": 0, "kind": "identity"}, {"source": 1}, {"source": 1, "kind": "memory"}, {"source": 2}, {"source": 3}]}
    plan = plan_for(config, layout, memory=MEMORY)
    entries = {t.name: t for t in plan.tensors}
    assert entries["model.layers.1.self_attn.o_proj.weight"].rule == "zeros"
    assert entries["model.layers.1.mlp.down_proj.weight"].rule == "zeros"
    assert entries["model.layers.1.mlp.up_proj.weight"].source == "model.layers.0.mlp.up_proj.weight"
    assert entries["model.layers.3.self_attn.q_proj.weight"].source == "model.layers.1.self_attn.q_proj.weight"
    assert "model.layers.3.self_attn.o_proj.weight" not in entries
    assert not any(n.startswith("model.layers.3.mlp.") and ".hml." not in n for n in entries)
    assert "model.layers.3.post_attention_layernorm.weight" not in entries
    new = [t for t in plan.tensors if t.source is None]
    assert new and all(t.name.startswith("model.layers.3.mlp.hml.") for t in new)
    assert entries["model.layers.5.input_layernorm.weight"].source == "model.layers.3.input_layernorm.weight"
    assert "lm_head.weight" not in entries  # tied to the embedding: written once


def test_a_batch_query_norms_running_statistics_are_written_but_not_counted_as_parameters():
    """plan and the model card counted them: 258 'parameters' too many on a tiny model."""
    config = tiny_config("llama")
    stack = find_stack_anatomy(config)
    layout = {"interleave": {"after_every": 2, "kind": "memory"}}
    rms, batch = (make_plan(loaded_from({"layout": layout, "memory": {**MEMORY, "query_norm": norm}}), config, stack) for norm in ("rms", "batch"))
    assert batch.params == rms.params and batch.layer_params == rms.layer_params  # the same parameters (the norm's weight)
    written = {t.name for t in batch.tensors} - {t.name for t in rms.tensors}
    assert written and all(name.endswith(("running_mean", "running_var", "updates")) for name in written)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt", "gpt_neox"])
def test_memory_counts_match_real_modules(arch):
    """params of a memory plan = base + copies - (o_proj, FFN, FFN norms, the attention's post-norms) + real HML modules."""
    config = tiny_config(arch)
    stack = find_stack_anatomy(config)
    anatomy = stack.single
    plan = make_plan(loaded_from({"layout": {"interleave": {"after_every": 2, "kind": "memory"}}, "memory": MEMORY}), config, stack)
    base = AutoModelForCausalLM.from_config(config)
    layers = base.get_submodule(anatomy.layers_path)
    heads, head_dim = attention_dims(config)
    hml = HeadwiseMemory(heads, head_dim, config.hidden_size, HMLConfig.from_dict(MEMORY))
    expected = count(base)
    for source in (1, 3):
        layer = layers[source]
        removed = {anatomy.attn_out_proj, *anatomy.ffn, *anatomy.ffn_norms, *anatomy.attn_post_norms}
        expected += count(layer) - sum(count(layer.get_submodule(m)) for m in removed) + count(hml)
    assert plan.params["total"] == expected
    assert plan.params["added"] == expected - count(base)
    assert plan.params["dus_added"] == count(layers[1]) + count(layers[3])
    assert plan.flops_per_token["plan"] < plan.flops_per_token["dus"]
    assert plan.flops_per_token["base"] < plan.flops_per_token["dus"]


def test_shared_bank_is_counted_once():
    config = tiny_config("llama")
    layout = {"interleave": {"after_every": 2, "kind": "memory"}}
    own = plan_for(config, layout, memory=MEMORY)
    shared = plan_for(config, layout, memory={**MEMORY, "share_bank": True})
    bank = MEMORY["n_subkeys"] ** 2 * MEMORY["latent_dim"]
    assert own.params["total"] - shared.params["total"] == bank
    assert [t.name for t in shared.tensors if "bank" in t.name] == ["midus_shared_bank.weight"]


def test_attention_flops_count_a_window_where_the_model_attends_over_one():
    """Mistral has no layer_types: its sliding_window is every layer's, and the FLOPs counted every
    layer over the whole context, 6x too many on trial52's base. Layer types, where a config has
    them, say which layers slide; Qwen2 without use_sliding_window has no window."""
    def scores(config, seq_len=64):  # the attention-context term of the base's FLOPs per token
        layout = {"slices": [{"layers": [0, 4]}, {"layers": [3, 4]}]}
        plan = plan_for(config, layout, flops_seq_len=seq_len)
        heads, head_dim = attention_dims(config)
        linear = plan_for(config, layout, flops_seq_len=1).flops_per_token["base"] - 4 * 4 * heads * head_dim
        return (plan.flops_per_token["base"] - linear) // (4 * heads * head_dim)  # tokens attended, summed over the 4 layers

    assert scores(tiny_config("mistral")) == 4 * 16  # every layer: its window of 16, not the 64 positions
    assert scores(tiny_config("mistral", sliding_window=None)) == 4 * 64
    assert scores(tiny_config("llama")) == 4 * 64
    assert scores(tiny_config("qwen2")) == 2 * 64 + 2 * 16  # layer_types: 2 full layers, then 2 sliding
    assert scores(tiny_config("qwen2", use_sliding_window=False)) == 4 * 64


def test_flops_per_token_are_the_formula_docs_apply_md_states():
    """2 x the weights a token multiplies per layer, 4 x context x heads x head_dim of attention per layer, the LM head's
    2 x vocab x hidden once; embeddings, norms and activations uncounted (trial79 F1: the formula was not written down)."""
    config = tiny_config("llama", tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    heads, head_dim = attention_dims(config)
    seq = 128
    per_layer = [sum(p.numel() for p in layer.parameters() if p.dim() >= 2) for layer in model.model.layers]
    base = sum(2 * w + 4 * seq * heads * head_dim for w in per_layer) + 2 * config.vocab_size * config.hidden_size
    plan = plan_for(config, {"slices": [{"layers": [0, 4]}, {"layers": [3, 4]}]}, flops_seq_len=seq)
    assert plan.flops_per_token["base"] == base
    assert plan.flops_per_token["dus"] == base + 2 * per_layer[3] + 4 * seq * heads * head_dim


@pytest.mark.parametrize("slices", [[[0, 3], [1, 4]], [[0, 3], [1, 3]]])  # the second drops base layer 3
def test_dus_counts_equal_plan_counts_for_plain_copies(slices):
    """A copy-only layout is plain DUS: 1.000x in every row, also where it drops base layers (trial82 F1: 0.955x
    parameters and 0.667x added parameters, while the FLOPs said 1.000x)."""
    plan = plan_for(tiny_config("llama"), {"slices": [{"layers": s} for s in slices]}, allow_dropped_layers=True)
    assert plan.flops_per_token["plan"] == plan.flops_per_token["dus"]
    assert plan.params["added"] == plan.params["dus_added"]


def test_plan_json_has_the_documented_keys():
    plan = plan_for(tiny_config("llama"), {"interleave": {"after_every": 2, "kind": "memory"}}, memory=MEMORY)
    data = plan.to_json()
    assert data["num_hidden_layers"] == 6
    assert data["layers"][2] == {"index": 2, "source": 1, "kind": "memory", "params": plan.layer_params[2]}
    assert set(data["params"]) == {"base", "added", "total", "dus_added"}
    assert set(data["flops_per_token"]) == {"base", "dus", "plan"}
    assert data["flops_seq_len"] == 2048  # the recipe's default context, said beside the counts


def test_plan_json_says_the_context_its_flops_are_counted_at():
    """The FLOPs per token depend on the context (attention over it): the JSON carries it beside them."""
    layout = {"interleave": {"after_every": 2, "kind": "memory"}}
    short, long = (plan_for(tiny_config("llama"), layout, memory=MEMORY, flops_seq_len=n) for n in (64, 4096))
    assert (short.to_json()["flops_seq_len"], long.to_json()["flops_seq_len"]) == (64, 4096)
    assert short.to_json()["flops_per_token"]["base"] < long.to_json()["flops_per_token"]["base"]


# ----------------------------------------------------------------------------------------------
# property: any recipe either plans or fails with a recipe error


layer_index = st.integers(min_value=-1, max_value=6)
kinds = st.sampled_from(["transformer", "identity", "memory"])
layouts = st.one_of(
    st.builds(lambda s: {"slices": s}, st.lists(st.fixed_dictionaries({"layers": st.tuples(layer_index, layer_index).map(list)}, optional={"kind": kinds, "memory": st.lists(layer_index, max_size=3)}), min_size=1, max_size=3)),
    st.builds(lambda n, k: {"interleave": {"after_every": n, "kind": k}}, st.integers(-1, 6), kinds),
    st.builds(lambda a, k: {"interleave": {"after": a, "kind": k}}, st.lists(layer_index, max_size=4), kinds),
    st.builds(lambda r, k: {"stack": {"layers": r, "kind": k}}, st.tuples(layer_index, layer_index).map(list), kinds),
    st.builds(lambda ls: {"layers": ls}, st.lists(st.fixed_dictionaries({"source": layer_index}, optional={"kind": st.sampled_from(["base", "transformer", "identity", "memory"])}), min_size=0, max_size=8)),
)
memories = st.fixed_dictionaries({}, optional={"n_subkeys": st.integers(0, 16), "topk": st.integers(0, 20), "latent_dim": st.integers(0, 8), "hive": st.booleans(), "share_bank": st.booleans(), "output_proj": st.sampled_from(["auto", "never", "bogus"])})

LLAMA = tiny_config("llama")
LLAMA_ANATOMY = find_stack_anatomy(LLAMA)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts, memory=memories, adjacent=st.booleans())
def test_random_recipes_plan_or_fail_with_a_recipe_error(layout, memory, adjacent):
    try:
        loaded = loaded_from({"layout": layout, "memory": memory, "allow_adjacent_memory": adjacent})
        plan = make_plan(loaded, LLAMA, LLAMA_ANATOMY)
    except RecipeError as exc:
        assert exc.problems and all(p.message for p in exc.problems)
        return
    assert plan.num_hidden_layers == len(plan.layers) > 0
    assert all(0 <= layer.source < LLAMA.num_hidden_layers for layer in plan.layers)
    statistics = ("query_norm.running_mean", "query_norm.running_var", "query_norm.updates")  # written, not parameters
    assert plan.params["total"] == sum(t.numel for t in plan.tensors if not t.name.endswith(statistics))


def test_a_stated_anatomy_is_checked_against_the_model():
    """`anatomy.layers_path: model.nope` was said at `base` as a model that keeps its layers in parallel lists, and
    `layer_class: Foo` was written into the output's config unchecked (trial150 L2): each is one problem at its key."""
    from midus_surgery.compiler.planner import anatomy_for

    config = tiny_config("llama")
    stated = {"layers_path": "model.layers", "layer_class": "LlamaDecoderLayer", "attention": "self_attn",
              "attn_out_proj": "self_attn.o_proj", "ffn": ["mlp"], "ffn_down_proj": "mlp.down_proj",
              "attn_norms": ["input_layernorm"], "ffn_norms": ["post_attention_layernorm"], "residual": "sequential"}
    layout = {"interleave": {"after_every": 2, "kind": "identity"}}

    def plan_with(**changed):
        loaded = loaded_from({"layout": layout, "anatomy": {**stated, **changed}})
        return make_plan(loaded, config, anatomy_for(loaded, config)[0])

    assert plan_with().anatomy.layers_path == "model.layers"
    for key, value, said in (("layers_path", "model.nope", f"'model.nope' is no list of modules in this model; its lists of "
                                                           f"{config.num_hidden_layers} modules: 'model.layers'"),
                             ("layer_class", "Foo", "the layers at model.layers are LlamaDecoderLayer, not Foo")):
        with pytest.raises(RecipeError) as info:
            plan_with(**{key: value})
        (problem,) = info.value.problems
        assert (problem.field, problem.message) == (f"anatomy.{key}", said), problem


def test_a_stated_layers_path_must_hold_as_many_modules_as_the_model_has_layers(monkeypatch):
    """Any list of modules passed as layers_path, whatever its length (a model's experts or per-layer norms: trial153 L3)."""
    import midus_surgery.compiler.plan as plan_module
    from midus_surgery.compiler.planner import anatomy_for

    config = tiny_config("llama")
    lists = {**plan_module.base_module_lists(config), "model.extra": (config.num_hidden_layers - 1, ("LlamaDecoderLayer",))}
    monkeypatch.setattr(plan_module, "base_module_lists", lambda config: lists)
    stated = {"layers_path": "model.extra", "layer_class": "LlamaDecoderLayer", "attention": "self_attn",
              "attn_out_proj": "self_attn.o_proj", "ffn": ["mlp"], "ffn_down_proj": "mlp.down_proj",
              "attn_norms": ["input_layernorm"], "ffn_norms": ["post_attention_layernorm"], "residual": "sequential"}
    loaded = loaded_from({"layout": {"interleave": {"after_every": 2, "kind": "identity"}}, "anatomy": stated})
    with pytest.raises(RecipeError) as info:
        make_plan(loaded, config, anatomy_for(loaded, config)[0])
    (problem,) = info.value.problems
    assert (problem.field, problem.message) == ("anatomy.layers_path", f"'model.extra' holds {config.num_hidden_layers - 1} modules, not "
                                                                      f"the model's {config.num_hidden_layers} decoder layers; its lists "
                                                                      f"of {config.num_hidden_layers} modules: 'model.layers'"), problem
