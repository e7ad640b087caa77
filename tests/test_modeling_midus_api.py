"""The MIDUS classes' from_pretrained / save_pretrained keep the stock classes' API (trial105 findings 2-5):
config overrides passed to from_pretrained, subfolder=, save_pretrained(push_to_hub=True) with the Hub calls
recorded (no network), and the refusal of an untying override. Tiny models from tools/ecosystem_check.py."""

from __future__ import annotations

import shutil

import pytest
from tool_modules import load_tool

eco = load_tool("ecosystem_check")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def midus_out(tmp_path_factory):
    return eco.make_models(tmp_path_factory.mktemp("api"))["own"]


def public_and_runtime():
    import midus_surgery  # noqa: F401 - registers the MIDUS classes
    from midus_surgery.model.modeling_midus import MidusForCausalLM, midus_class_for

    return MidusForCausalLM, midus_class_for("llama")


# ----------------------------------------------------------------------------- finding 3: config overrides

@pytest.mark.parametrize("override", [{"use_cache": False}, {"output_hidden_states": True}])
@pytest.mark.parametrize("via", ["public", "runtime"])
def test_config_overrides_go_to_the_config_as_for_a_stock_class(midus_out, override, via):
    """LlamaForCausalLM.from_pretrained(path, use_cache=False) sets config.use_cache; so must the MIDUS classes."""
    import torch

    cls = dict(zip(("public", "runtime"), public_and_runtime()))[via]
    (key, value), = override.items()
    model = cls.from_pretrained(midus_out, dtype=torch.float64, **override)
    assert getattr(model.config, key) == value
    assert model.dtype == torch.float64  # a model-load kwarg still reaches the load, not the config alone
    assert model._midus_plan is not None


# ----------------------------------------------------------------------------- finding 4: subfolder=

@pytest.mark.parametrize("via", ["auto", "public", "runtime"])
def test_subfolder_reads_config_and_plan_there(midus_out, tmp_path, via):
    from transformers import AutoModelForCausalLM

    root = tmp_path / "repo"
    shutil.copytree(midus_out, root / "sub")
    cls = {"auto": AutoModelForCausalLM, **dict(zip(("public", "runtime"), public_and_runtime()))}[via]
    model = cls.from_pretrained(root, subfolder="sub")
    assert model._midus_plan == (midus_out / "midus_plan.json").read_text()
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "midus_plan.json").read_text() == model._midus_plan


def test_a_subfolder_without_a_config_is_transformers_error_not_a_causal_lm_for_none(midus_out, tmp_path):
    cls, _ = public_and_runtime()
    shutil.copytree(midus_out, tmp_path / "sub")
    with pytest.raises(OSError, match="config.json"):
        cls.from_pretrained(tmp_path, subfolder="nothing-here")


# ----------------------------------------------------------------------------- finding 2: push_to_hub

RECORD_HUB = """
import os, sys, json
import transformers.modeling_utils as mu
import transformers.utils.hub as hub

class FakeApi:  # what save_pretrained(push_to_hub=True) calls on the Hub, recorded
    def create_repo(self, repo_id, **kw):
        return type("Repo", (), {"repo_id": "user/" + repo_id})()
    def create_commit(self, repo_id, operations, **kw):
        uploaded.extend(op.path_in_repo for op in operations)

uploaded = []
mu.hf_api = hub.hf_api = lambda: FakeApi()
mu.create_and_tag_model_card = lambda *a, **k: type("Card", (), {"save": lambda self, path: None})()
"""

PUSH = RECORD_HUB + """
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
model.save_pretrained(sys.argv[2], push_to_hub=True)
print(json.dumps({"module": type(model).__module__, "uploaded": sorted(uploaded)}))
"""


@pytest.mark.parametrize("package", [True, False])
def test_save_pretrained_push_to_hub_uploads_the_code_and_the_plan(midus_out, tmp_path, package):
    """transformers uploads inside save_pretrained: the files the MIDUS save adds must be there by then.
    With the package the class is not remote code (transformers copies no code); without it, it is."""
    import json

    from midus_surgery.model import shipped_code_differences
    from midus_surgery.model.midus_names import MODELING_FILES, PLAN_FILE

    script = ("import midus_surgery  # the README's way: registers the MIDUS classes\n" if package else "") + PUSH
    out = json.loads(eco.fresh_python(script, str(midus_out), str(tmp_path / "pushed"), package=package).splitlines()[-1])
    assert out["module"].startswith("midus_surgery" if package else "transformers_modules")
    assert set(MODELING_FILES) | {PLAN_FILE, "config.json", "model.safetensors"} <= set(out["uploaded"]), out["uploaded"]
    # what went up is the package's code byte for byte (verify's code check), also when the remote-code class wrote it
    assert shipped_code_differences(tmp_path / "pushed") == ([], [])


# ----------------------------------------------------------------------------- finding 5: untying a tied output

def test_untying_a_tied_checkpoint_is_refused_saying_why_and_what_to_do(midus_out):
    from transformers import AutoModelForCausalLM

    assert "lm_head.weight" not in __import__("safetensors.torch").torch.load_file(midus_out / "model.safetensors")
    with pytest.raises(ValueError, match=r"no lm_head.weight: it was saved with tied .*tie_word_embeddings=False unties them.*random weights.*"
                                         r"model\.get_output_embeddings\(\)\.weight = torch\.nn\.Parameter\(.*clone\(\)\)"):
        AutoModelForCausalLM.from_pretrained(midus_out, tie_word_embeddings=False)


def test_the_untying_the_message_advises_works(midus_out, tmp_path):
    """The message's way to untie: load tied, give the LM head its own copy, save; it reloads untied with the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(midus_out).eval()
    before = eco.logits(model)
    model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path / "untied")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "untied").eval()
    assert again.lm_head.weight.data_ptr() != again.get_input_embeddings().weight.data_ptr()
    assert torch.equal(eco.logits(again), before)


# ----------------------------------------------------------------------------- keys the base config computes

BAMBA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1)


def test_keys_the_base_computes_follow_a_later_override_and_are_never_stored():
    """Bamba derives layer_types from attn_layer_indices. The MIDUS config answered it from a base config built once in
    __init__: from_pretrained(..., attn_layer_indices=...) (set after __init__) built the old layer kinds and saved the new
    indices, a folder that no longer loaded; and a layer_types given at construction (as an older save wrote it) shadowed
    the derived one until a save dropped it (trial144 F2, F3)."""
    import copy
    import pickle

    from transformers import BambaConfig

    from midus_surgery.model.configuration_midus import MidusConfig

    config = MidusConfig(base_model_type="bamba", attn_layer_indices=[1], **BAMBA)
    assert config.layer_types == BambaConfig(attn_layer_indices=[1], **BAMBA).layer_types
    config.attn_layer_indices = [0, 3]  # as from_pretrained sets an override
    assert config.layer_types == BambaConfig(attn_layer_indices=[0, 3], **BAMBA).layer_types == [
        "full_attention", "linear_attention", "linear_attention", "full_attention"]
    snapshot = config._base_snapshot
    assert config.layer_types and config.hidden_size and config._base_snapshot is snapshot  # reads never rebuild (compiled forwards)
    with pytest.raises(AttributeError, match="layer_types is computed by BambaConfig from the config's other keys"):
        config.layer_types = ["full_attention"] * 4  # as the base class refuses it
    stale = MidusConfig(base_model_type="bamba", attn_layer_indices=[0, 3], layer_types=["full_attention"] * 4, **BAMBA)
    assert stale.layer_types == config.layer_types and "layer_types" not in stale.__dict__
    saved = config.to_dict()
    assert not {"_base_snapshot", "_built"} & set(saved) and "layer_types" not in saved and saved["attn_layer_indices"] == [0, 3]
    for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config)), MidusConfig(**saved)):
        assert copied.layer_types == config.layer_types and copied.to_dict() == saved
