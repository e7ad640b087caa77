"""The emitted model as a first-class transformers model (issue 26): every check of
tools/ecosystem_check.py (re-saves that load in a fresh process without the package, copies,
LoRA on the usual names, task heads, generation, attention kernels, quantisation), on a MIDUS
output with its own latent banks and one with a shared bank. The FSDP checks are tests/test_fsdp.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tool_modules import load_tool

REPO = Path(__file__).resolve().parents[1]
eco = load_tool("ecosystem_check")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return eco.make_models(tmp_path_factory.mktemp("ecosystem"))


@pytest.mark.parametrize("bank", eco.BANKS)
@pytest.mark.parametrize("check", list(eco.CHECKS))
def test_ecosystem_check(models, check, bank):
    detail = eco.CHECKS[check](models[bank])
    assert detail and "\n" not in detail


def test_a_head_transformers_lacks_is_refused_naming_those_it_has():
    from midus_surgery.model.modeling_midus import midus_class_for

    with pytest.raises(ValueError, match=r"^transformers has no token classification class for 'opt': a MIDUS model of it loads as "
                                         r"causal LM, sequence classification, question answering$"):
        midus_class_for("opt", "MidusForTokenClassification")
    assert midus_class_for("gpt2").__name__ == "MidusGPT2LMHeadModel"


def test_runtime_classes_are_module_attributes_by_name():
    """What pickle and auto_map entries written by older saves look up."""
    from midus_surgery.model import modeling_midus

    cls = modeling_midus.MidusLlamaForSequenceClassification
    assert cls is modeling_midus.midus_class_for("llama", "MidusForSequenceClassification")
    assert cls.__module__ == modeling_midus.__name__ and cls.__qualname__ == cls.__name__
    with pytest.raises(AttributeError):
        modeling_midus.MidusNoSuchForCausalLM


@pytest.mark.parametrize("first", ["from midus_surgery.model import modeling_midus",
                                   "from midus_surgery.model.configuration_midus import MidusConfig",
                                   "import transformers.modeling_utils"])
def test_the_auto_classes_know_midus_whatever_is_imported_first(first):
    script = (f"import midus_surgery\n{first}\n"
              "from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification\n"
              "from midus_surgery.model import modeling_midus as m\n"
              "assert AutoModelForCausalLM._model_mapping[m.MidusConfig] is m.MidusForCausalLM\n"
              "assert AutoModelForTokenClassification._model_mapping[m.MidusConfig] is m.MidusForTokenClassification\n"
              "print(AutoConfig.for_model('midus').model_type)\n")
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "midus", proc.stderr[-2000:]


def test_automodel_is_not_offered_and_the_causal_lms_body_is_the_way_to_hidden_states(models):
    """docs/ecosystem.md: AutoModel would build the base's body without the Memory blocks, so it is refused
    (transformers' own error), and the causal LM's `.model` gives the hidden states, Memory blocks included."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModel.from_pretrained(models["own"])
    lm = AutoModelForCausalLM.from_pretrained(models["own"]).eval()
    with torch.no_grad():
        body = lm.model(input_ids=eco.IDS).last_hidden_state
        full = lm(input_ids=eco.IDS, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(body, full) and body.shape[:2] == eco.IDS.shape
