"""`verify` cannot be fooled: rows that depend on each other, identity blocks that are the identity
only at the base's init, KV-cache paths that break only with a padded batch.

Tiny random models on CPU: the bases of test_apply, emitted with its recipes, then broken on
purpose (the outputs' tensors edited, or a module's forward patched) and run through ``verify``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_apply import bases, write_recipe  # noqa: F401 - bases: a fixture
from transformers import AutoModelForCausalLM

import midus_surgery  # noqa: F401 - registers the MIDUS classes
from midus_surgery.compiler.planner import plan_recipe
from midus_surgery.emit import verify as verify_module
from midus_surgery.emit.emitter import emit
from midus_surgery.emit.verify import batch_check, opened, perturbed_identity_check, verify
from midus_surgery.model import modeling_midus

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest, and steady on a busy machine

NAMES = ["tensors", "batch", "identity", "identity (perturbed)", "weights", "kv-cache", "kv-cache (padded batch)", "round-trip"]  # + config where the base has per-layer lists


def emitted(bases, tmp_path, arch: str, kind: str):
    return emit(plan_recipe(write_recipe(tmp_path, bases[arch], kind)), progress=False).out_dir


def run(out) -> dict:
    checks = verify(out, report=lambda c: None)
    assert [c for c in checks if "\n" in c.detail] == []  # every detail one line
    return {c.name: c for c in checks}


# the least of what train writes into midus_train.json (train/runner.py's export)
RECORD = {"steps": 1, "tokens": 16, "config": {"init_from": "m", "run_dir": "run", "data": {"train": ["c.txt"]}, "tokens": 16,
                                               "freeze": "none"}}


def as_if_trained(out: Path) -> None:
    """What a run's export holds beside apply's files: the record train writes, in a folder its marker says a run exported."""
    from midus_surgery.io.output_dir import EXPORT_KIND, MARKER

    (out / "midus_train.json").write_text(json.dumps(RECORD))
    if (out / MARKER).is_file():
        marker = json.loads((out / MARKER).read_text())
        (out / MARKER).write_text(json.dumps({**marker, "kind": EXPORT_KIND}))


def failed(checks: dict) -> list[str]:
    return [name for name, c in checks.items() if not c.ok]


@pytest.mark.parametrize(("arch", "kind"), [("llama", "llama-pro"), ("llama", "midus"), ("gpt2", "llama-pro")])
def test_correct_outputs_pass_every_check(arch, kind, bases, tmp_path):
    """gpt2: biases everywhere, and an identity block's zeroed output projection has a zero bias
    that the base's (at init) equals: zero by the surgery's rule, so not perturbed."""
    checks = run(emitted(bases, tmp_path, arch, kind))
    assert list(checks) == (["code"] if kind == "midus" else []) + NAMES  # MIDUS outputs ship their modeling code
    assert failed(checks) == [], {n: c.detail for n, c in checks.items()}
    assert "against the base: 0 (" in checks["identity"].detail
    perturbed = checks["identity (perturbed)"].detail
    assert "in both models" in perturbed and ": 0 (must be 0" in perturbed
    assert "as loaded and with the all-zero weights filled" in checks["batch"].detail
    assert "agrees with and without KV cache and with each prompt alone" in checks["kv-cache (padded batch)"].detail
    assert re.search(r"agree: ids \[\d+(, \d+)*\]$", checks["kv-cache"].detail), checks["kv-cache"].detail  # no tokenizer: the ids
    assert "tensors equal, bit for bit, the base tensors the layer map says they copy" in checks["weights"].detail
    # LLaMA-Pro zeroes its blocks' output projections; a MIDUS block drops them (its FFN is the memory)
    assert ("zeroed or reshaped in identity and memory blocks" in checks["weights"].detail) == (kind == "llama-pro")


def _row0_for_every_row(self, x, *args, **kwargs):
    """A Memory block whose readout is indexed as if it returned a tuple, ``h = mlp(h)[0]``: row 0's
    output, broadcast by the residual add to every row of the batch."""
    return _readout_forward(self, x, *args, **kwargs)[0]


def _unpacked_as_tuple(self, x, *args, **kwargs):
    """``h, _ = mlp(h)`` on a readout that returns one tensor: splits a batch of 2 along its rows
    (row 0 for every row), and fails at any other batch size."""
    h, _ = _readout_forward(self, x, *args, **kwargs)
    return h


_readout_forward = modeling_midus.MemoryReadout.forward


def test_a_memory_block_that_mixes_rows_fails_once_its_zero_weights_are_filled(bases, tmp_path, monkeypatch):
    """The memory's values start at zero, so row 0's zeros added to every row change nothing: the
    output equals the base, one prompt's generation agrees with and without the cache. Only with
    the zero weights filled (as after training) do the rows depend on each other, in a forward
    pass and in a padded batch's generation."""
    out = emitted(bases, tmp_path, "llama", "midus")
    monkeypatch.setattr(modeling_midus.MemoryReadout, "forward", _row0_for_every_row)
    checks = run(out)
    assert failed(checks) == ["batch", "kv-cache (padded batch)"]
    assert "depend on the other rows of the batch" in checks["batch"].detail
    assert "with its 2 all-zero weights filled)" in checks["batch"].detail  # the two memory blocks' zero-initialised projections


def test_a_memory_block_that_unpacks_its_readout_as_a_tuple_fails_at_batch_size_1(bases, tmp_path, monkeypatch):
    out = emitted(bases, tmp_path, "llama", "midus")
    monkeypatch.setattr(modeling_midus.MemoryReadout, "forward", _unpacked_as_tuple)
    checks = run(out)
    assert checks["identity"].ok  # verify's own sample batch has 2 rows: the old checks ran it fine
    assert not checks["batch"].ok
    assert checks["batch"].detail.startswith("the forward pass fails at batch size 1: ValueError: not enough values to unpack")


def test_batch_check_catches_a_model_that_averages_its_rows(bases):
    """In memory: every row of a batch becomes the batch mean after the first layer (no zero
    branch to hide it); a batch of one is unchanged, so only comparing rows with rows alone sees it."""
    model = AutoModelForCausalLM.from_pretrained(bases["llama"], dtype=torch.float32).eval()
    assert batch_check(model, 128).ok

    def mean_of_rows(module, args, output):
        return output.mean(0, keepdim=True).expand_as(output)

    handle = model.model.layers[0].register_forward_hook(mean_of_rows)
    check = batch_check(model, 128)
    handle.remove()
    assert not check.ok and "depend on the other rows of the batch (batch size 3, rows [0, 1, 2], as loaded)" in check.detail


def test_opened_fills_only_all_zero_weights_and_restores_them(bases, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(emitted(bases, tmp_path, "llama", "llama-pro"), dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero = {n for n, p in before.items() if p.ndim >= 2 and not p.any()}
    assert len(zero) == 4  # o_proj and down_proj of the two identity blocks
    with opened(model) as filled:
        assert filled == 4
        now = dict(model.named_parameters())
        assert all(now[n].any() for n in zero)
        assert all(torch.equal(now[n], before[n]) for n in before if n not in zero)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("kind", ["llama-pro", "midus"])
def test_an_output_narrower_than_its_base_is_the_identity_of_the_rounded_base(kind, bases, tmp_path):
    """A float32 base written as bfloat16: the output's copies of the base layers are the rounded
    values, so its logits equal the rounded base's exactly (not the float32 base's, which failed the
    identity check of a correct output); a block that is not the identity still fails."""
    recipe = write_recipe(tmp_path, bases["llama"], kind)
    recipe.write_text(recipe.read_text().replace("dtype: float32", "dtype: bfloat16"))
    out = emit(plan_recipe(recipe), progress=False).out_dir
    checks = run(out)
    assert failed(checks) == [], {n: c.detail for n, c in checks.items()}
    assert "against the base rounded to bfloat16, the output's dtype: 0 (" in checks["identity"].detail

    layer = next(la for la in json.loads((out / "midus_plan.json").read_text())["layers"] if la["kind"] != "base")
    tensors = load_file(out / "model.safetensors")
    # the all-zero matrix that makes the inserted block the identity (the FFN's or the memory's output projection)
    name = next(k for k, v in tensors.items() if k.startswith(f"model.layers.{layer['index']}.") and v.dim() >= 2 and not v.any())
    tensors[name] = torch.full_like(tensors[name], 0.01)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert "identity" in failed(run(out))


def test_an_identity_block_that_is_the_identity_only_at_init_fails_the_perturbed_check(bases, tmp_path):
    """A LLaMA-Pro block made another way: instead of zeroing the FFN's output projection, zero
    the gain of the norm before the FFN. In a model without biases (Llama) that is the identity
    whatever the base's weights: the norm gives 0, the FFN of 0 is 0. In GPT-2 the FFN of 0 is
    ``c_proj(gelu(c_fc.bias)) + c_proj.bias``, 0 only because a random base's biases are at their
    init, 0: on a trained base the block adds a constant to every token. The plain identity check
    passes it; with the base's norms and biases perturbed (in both models), it fails.

    Built by editing the emitted tensors: the inserted layer's ln_2.weight zeroed, its
    mlp.c_proj.weight set back to the base layer's.
    """
    out = emitted(bases, tmp_path, "gpt2", "llama-pro")
    layer = next(la for la in json.loads((out / "midus_plan.json").read_text())["layers"] if la["kind"] == "identity")
    i, src = layer["index"], layer["source"]
    tensors = load_file(out / "model.safetensors")
    base = load_file(bases["gpt2"] / "model.safetensors")
    base_key = next(k for k in base if k.endswith(f"h.{src}.mlp.c_proj.weight"))  # with or without the "transformer." prefix
    assert not tensors[f"transformer.h.{i}.mlp.c_proj.weight"].any()
    tensors[f"transformer.h.{i}.mlp.c_proj.weight"] = base[base_key].clone()
    tensors[f"transformer.h.{i}.ln_2.weight"] = torch.zeros_like(tensors[f"transformer.h.{i}.ln_2.weight"])
    assert not tensors[f"transformer.h.{i}.ln_2.bias"].any() and not tensors[f"transformer.h.{i}.mlp.c_fc.bias"].any()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    checks = run(out)
    assert failed(checks) == ["identity (perturbed)"]
    assert "against the base: 0 (" in checks["identity"].detail
    assert "must be 0: an inserted block may not be the identity only at the base's init" in checks["identity (perturbed)"].detail


def test_perturbed_identity_check_restores_both_models(bases, tmp_path):
    out = emitted(bases, tmp_path, "gpt2", "llama-pro")
    plan = json.loads((out / "midus_plan.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base_model = AutoModelForCausalLM.from_pretrained(bases["gpt2"], dtype=torch.float32)
    before = [{n: t.clone() for n, t in m.state_dict().items()} for m in (model, base_model)]
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    check = perturbed_identity_check(model, base_model, plan, ids)
    assert check.ok, check.detail
    for m, saved in zip((model, base_model), before):
        assert all(torch.equal(t, saved[n]) for n, t in m.state_dict().items())
    # without the plan's layer map the check cannot pair the tensors: it says so
    assert perturbed_identity_check(model, base_model, None, ids).skipped


def _only_in_the_output(out, broken, original, monkeypatch=None):
    """``broken`` for the model verify loads from ``out``, ``original`` for every other instance of the
    class (the base shares it, and a failure the base shares is not blamed on the output). With
    ``monkeypatch``, only that loaded object is broken; without, every model as deep as the output
    (a fresh instance of its config too)."""
    depth = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    if monkeypatch is not None:
        load = verify_module._load

        def tagged(path, *args, **kwargs):
            model, info = load(path, *args, **kwargs)
            if Path(path) == Path(out):
                model._broken_for_test = True
            return model, info
        monkeypatch.setattr(verify_module, "_load", tagged)

    def forward(self, *args, **kwargs):
        hit = getattr(self, "_broken_for_test", False) if monkeypatch is not None else self.config.num_hidden_layers == depth
        return (broken if hit else original)(self, *args, **kwargs)
    return forward


def test_a_failure_the_base_shares_is_not_blamed_on_the_output(bases, tmp_path, monkeypatch):
    out = emitted(bases, tmp_path, "llama", "llama-pro")
    cls = type(AutoModelForCausalLM.from_pretrained(out))
    monkeypatch.setattr(cls, "forward", _forward_breaking_cached_padded_steps(cls.forward))  # base and output alike
    checks = run(out)
    assert failed(checks) == []
    assert checks["kv-cache (padded batch)"].skipped and checks["kv-cache (padded batch)"].detail.startswith("the base model fails it too (")


def _forward_breaking_cached_padded_steps(original):
    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        if mask is not None and not bool(mask.all()) and ids is not None and ids.shape[1] == 1:  # a cached step of a padded batch
            output.logits = output.logits.roll(1, dims=-1)
        return output

    return forward


def test_a_cache_path_broken_only_for_a_padded_batch_fails_the_padded_check(bases, tmp_path, monkeypatch):
    """Synthetic: the model's cached decoding steps go wrong only when the batch has padding (as a
    cache that mis-tracks positions of left-padded rows would). One prompt with and without the
    cache agrees, so the plain kv-cache check passes; the padded batch does not."""
    out = emitted(bases, tmp_path, "llama", "llama-pro")
    assert failed(run(out)) == []
    cls = type(AutoModelForCausalLM.from_pretrained(out))
    monkeypatch.setattr(cls, "forward", _only_in_the_output(out, _forward_breaking_cached_padded_steps(cls.forward), cls.forward, monkeypatch))
    checks = run(out)
    assert failed(checks) == ["kv-cache (padded batch)"]
    assert "DIFFERS with and without KV cache" in checks["kv-cache (padded batch)"].detail


def test_a_model_that_ignores_the_attention_mask_fails_the_padded_check(bases, tmp_path, monkeypatch):
    """With and without the cache it attends to the padding alike; the row then differs from its
    prompt generated alone."""
    out = emitted(bases, tmp_path, "llama", "llama-pro")
    cls = type(AutoModelForCausalLM.from_pretrained(out))
    original = cls.forward

    def forward(self, *args, **kwargs):
        kwargs["attention_mask"] = None
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", _only_in_the_output(out, forward, original, monkeypatch))
    checks = run(out)
    assert not checks["kv-cache (padded batch)"].ok
    assert "DIFFERS from each prompt's alone" in checks["kv-cache (padded batch)"].detail


def test_a_generation_that_fails_on_a_padded_batch_is_a_one_line_failed_check(bases, tmp_path, monkeypatch):
    out = emitted(bases, tmp_path, "llama", "llama-pro")
    cls = type(AutoModelForCausalLM.from_pretrained(out))
    original = cls.forward

    def forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise RuntimeError("index out of range in self\nsecond line")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", _only_in_the_output(out, forward, original, monkeypatch))
    checks = run(out)
    assert failed(checks) == ["kv-cache (padded batch)"]
    assert checks["kv-cache (padded batch)"].detail == (
        "generation for a left-padded batch of 2 fails: RuntimeError: index out of range in self (as loaded)")


@pytest.mark.parametrize("kind", ["dus", "llama-pro", "midus"])
def test_a_layer_type_unlike_its_source_layers_fails_the_config_check(kind, bases, tmp_path):
    """Qwen2's layers 2 and 3 slide; after_every 2 makes output layer 5 a copy of layer 3. Its layer_types entry
    made full attention passed every check: an identity block's output is zero whatever its window, and DUS has
    no reference to compare logits with (trial106 F2). The config check compares each per-layer list with the
    base's through the layer map; without a base, it says it could not."""
    out = emitted(bases, tmp_path, "qwen2", kind)
    checks = run(out)
    assert failed(checks) == [] and "layer_types" in checks["config"].detail, {n: c.detail for n, c in checks.items()}
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"][5] == "sliding_attention"
    config["layer_types"][5] = "full_attention"
    (out / "config.json").write_text(json.dumps(config))
    checks = run(out)
    assert failed(checks) == ["config"], {n: c.detail for n, c in checks.items()}
    assert checks["config"].detail == ("config.json's layer_types gives output layer 5 'full_attention', but the layer map makes it from "
                                       "base layer 3, whose entry is 'sliding_attention' (config.json edited, or written wrong)")
    from midus_surgery.io.output_dir import MARKER

    marker = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({**marker, "base_path": str(tmp_path / "moved-away")}))  # the recorded base is gone
    skipped = run(out)["config"]
    assert skipped.skipped and skipped.detail == "no base to compare the per-layer config lists with (see identity)"


def nudge_first_block_tensor(out: Path, kind: str, tensor: str) -> tuple[str, torch.Tensor]:
    """Add 1e-3 to ``tensor`` of the output's first inserted block of ``kind``, in its file; (its name, its value before)."""
    layer = next(la for la in json.loads((out / "midus_plan.json").read_text())["layers"] if la["kind"] == kind)
    tensors = load_file(out / "model.safetensors")
    name = f"model.layers.{layer['index']}.{tensor}"
    before = tensors[name].clone()
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return name, before


def test_a_dus_copy_must_be_its_base_layer_bit_for_bit(bases, tmp_path):
    """Plain copies change the function, so no logit check can say they are copies: the weights
    check does, tensor by tensor along the layer map."""
    out = emitted(bases, tmp_path, "llama", "dus")
    checks = run(out)
    assert failed(checks) == [] and checks["logits"].ok, {n: c.detail for n, c in checks.items()}
    assert checks["identity"].skipped and checks["identity"].detail.startswith("plain copies or random memory change the function: not meant")
    name, _ = nudge_first_block_tensor(out, "copy", "self_attn.q_proj.weight")
    checks = run(out)
    assert failed(checks) == ["weights"]
    assert checks["weights"].detail.startswith(f"1 of the output's tensors differ from the base tensors the layer map says they copy (e.g. {name})")


def test_an_edited_zeroed_tensor_is_said_to_differ_from_the_zeros_apply_wrote(bases, tmp_path):
    """An identity block's output projection is zeros, not a copy: verify said an edited one differed
    from what it "copies" (trial52)."""
    out = emitted(bases, tmp_path, "llama", "llama-pro")
    name, before = nudge_first_block_tensor(out, "identity", "mlp.down_proj.weight")
    assert not before.any()
    checks = run(out)
    assert "weights" in failed(checks)
    assert checks["weights"].detail.startswith("1 of the output's tensors differ from the base tensors the layer map says they copy or, "
                                               f"in identity blocks, from the zeros apply wrote (e.g. {name})"), checks["weights"].detail


def test_an_edited_tensor_of_a_memory_block_whose_attention_apply_did_not_zero_names_no_zeros(bases, tmp_path):
    """A memory block reading the heads (the default) holds no zeros apply wrote: a changed q_proj in one (LoRA merged
    into a random-init MIDUS model) was said to differ "from the zeros apply wrote" (trial55)."""
    out = emitted(bases, tmp_path, "llama", "midus")
    name, _ = nudge_first_block_tensor(out, "memory", "self_attn.q_proj.weight")
    checks = run(out)
    assert checks["weights"].detail.startswith("1 of the output's tensors differ from the base tensors the layer map says they copy "
                                               f"(e.g. {name})"), checks["weights"].detail


@pytest.mark.parametrize(("kind", "failing"), [("dus", ["weights"]), ("llama-pro", ["identity", "identity (perturbed)", "weights"])])
def test_a_base_of_the_same_shapes_that_is_not_the_outputs_fails(kind, failing, bases, tmp_path):
    """A model of the same config and vocabulary, other weights: plain copies passed every check
    against it (logits are only compared, perplexity only printed, when blocks are copies)."""
    from transformers import AutoConfig

    out = emitted(bases, tmp_path, "llama", kind)
    torch.manual_seed(123)
    other = tmp_path / "not-the-base"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(bases["llama"])).save_pretrained(other)
    checks = {c.name: c for c in verify(out, other, report=lambda c: None)}
    assert failed(checks) == failing
    assert "this is not the base the output was made from, or the output was changed since apply" in checks["weights"].detail


def test_pad_id_is_the_models_when_in_the_vocabulary_else_0(bases):
    model = AutoModelForCausalLM.from_pretrained(bases["gpt2"])
    assert verify_module._pad_id(model, 128) == 2  # no pad id: the eos id
    model.config.eos_token_id = model.generation_config.eos_token_id = 500
    assert verify_module._pad_id(model, 128) == 0


def test_a_trained_output_is_compared_by_perplexity_not_by_identity(bases, tmp_path):
    """`train` writes midus_train.json beside its export: the blocks are no longer the identity by design."""
    out = emitted(bases, tmp_path, "llama", "midus")
    weights = load_file(out / "model.safetensors")
    name = next(n for n in weights if ".hml." in n and weights[n].dim() >= 2 and not weights[n].any())  # a zero-initialised table
    weights[name] = torch.full_like(weights[name], 0.05)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    assert not run(out)["identity"].ok  # as if untrained: must be the base's function

    as_if_trained(out)
    checks = run(out)
    assert "identity (perturbed)" not in checks
    assert checks["weights"].skipped and checks["weights"].detail == "trained since apply, so its weights are no longer the base's"
    # nothing to compare the function with is a SKIP, never a PASS (trial67); the logits row checks they are finite
    assert checks["identity"].skipped and checks["identity"].detail.startswith("trained since apply: ")
    assert checks["logits"].ok and checks["logits"].detail.startswith("the output's logits are finite;") and "perplexity" in checks["logits"].detail
    assert failed(checks) == []


@pytest.mark.parametrize("record", ["{}", '{"unchanged_since_apply": "all"}', "not json", "whole, beside apply's marker",
                                    '{"steps": 1, "tokens": 16, "config": {}}', "no steps", "no steps, no marker", "no tokens"])
def test_a_midus_train_json_train_did_not_write_excuses_no_changed_weights(bases, tmp_path, record):
    """A midus_train.json makes verify skip identity and compare only the frozen weights: an empty one beside a changed base
    layer passed every check, exit 0 (trial99 W1). Believed only in the shape train writes, in a folder apply did not mark."""
    out = emitted(bases, tmp_path, "llama", "midus")
    weights = load_file(out / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"] *= 1.5  # a base layer, not an inserted block
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    whole = json.dumps(RECORD)
    if record.startswith(("no steps", "no tokens")):  # trial104: a record of 0 steps and 0 tokens excused every change
        from midus_surgery.io.output_dir import EXPORT_KIND, MARKER

        if record == "no steps, no marker":
            (out / MARKER).unlink()  # a model from the Hub may lack it: the record alone must then say a run changed it
        else:
            (out / MARKER).write_text(json.dumps({**json.loads((out / MARKER).read_text()), "kind": EXPORT_KIND}))
        whole = json.dumps({**RECORD, "steps": 0 if record.startswith("no steps") else 1, "tokens": 0})
    (out / "midus_train.json").write_text(whole if record.startswith(("whole", "no ")) else record)
    # the marker names the base; without it, the base is given (verify --base)
    checks = {c.name: c for c in verify(out, bases["llama"], report=lambda c: None)} if record.endswith("no marker") else run(out)
    assert {"record", "identity", "weights"} <= set(failed(checks)), failed(checks)
    said = checks["record"].detail
    if record.startswith("no "):
        assert said.startswith("midus_train.json records ") and "a run of no steps changed no weight, so it excuses none" in said, said
    elif record.startswith("whole"):
        assert "but its .midus-surgery marker says 'apply' wrote it" in said, said
    elif record == "not json":
        assert said.startswith("midus_train.json does not read ("), said
    else:
        assert said.startswith("midus_train.json is not the record `midus-surgery train` writes (its steps, tokens and config)"), said


def test_a_trained_model_that_no_apply_made_is_not_said_to_be_trained_since_apply(bases, tmp_path):
    """`train` also trains a plain model (no midus_plan.json): against its base the logit row
    says it was trained, not "since apply" (trial48)."""
    import shutil

    out = tmp_path / "trained-plain"
    shutil.copytree(bases["llama"], out)
    as_if_trained(out)
    checks = {c.name: c for c in verify(out, bases["llama"], report=lambda c: None)}
    assert "since apply" not in checks["identity"].detail
    assert checks["identity"].skipped and "trained by `midus-surgery train`; no apply made it" in checks["identity"].detail


def test_a_generate_bug_of_the_stock_architecture_is_not_blamed_on_a_copy(bases, tmp_path, monkeypatch):
    """A DUS output is a stock architecture: when a fresh random instance of it fails the padded
    check too (as CpmAnt's cache with left padding does at some weights), the surgery is not to blame.
    A MIDUS output's memory code is the surgery's own: there a fresh instance proves nothing."""
    out = emitted(bases, tmp_path, "llama", "dus")
    cls = type(AutoModelForCausalLM.from_pretrained(out))
    # breaks every model deeper than the base: the output and any fresh instance of its config, not the base
    monkeypatch.setattr(cls, "forward", _only_in_the_output(out, _forward_breaking_cached_padded_steps(cls.forward), cls.forward))
    checks = run(out)
    assert failed(checks) == []
    assert checks["kv-cache (padded batch)"].skipped and checks["kv-cache (padded batch)"].detail.startswith("a fresh random instance of this architecture")

    midus_out = emitted(bases, tmp_path, "llama", "midus")
    monkeypatch.setattr(modeling_midus.MemoryReadout, "forward", _row0_for_every_row)
    assert "kv-cache (padded batch)" in failed(run(midus_out))


# ----------------------------------------------------------------------------------------------
# A MIDUS output's shipped modeling code

MARK_RUN = "from __future__ import annotations\nimport pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


def verify_in_subprocess(out: Path, tmp_path: Path, *flags: str, command: str = "verify") -> subprocess.CompletedProcess:
    """A fresh process: transformers copies the shipped code into its modules cache, kept in tmp_path."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    return subprocess.run([sys.executable, "-m", "midus_surgery.cli", command, str(out), *flags], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=300, cwd=tmp_path)


@pytest.mark.slow
def test_shipped_code_that_is_not_the_packages_fails_unless_verify_may_run_it(bases, tmp_path):
    """With midus_surgery imported, transformers loads the package's registered classes, not the
    files beside the weights that a trust_remote_code load runs elsewhere: an edited (or stale)
    modeling_midus.py used to pass every check unseen."""
    out = emitted(bases, tmp_path, "llama", "midus")
    assert run(out)["code"].ok and "midus-surgery 0.1.0's own" in run(out)["code"].detail
    marker = tmp_path / "ran"
    modeling = out / "modeling_midus.py"
    modeling.write_text(modeling.read_text().replace("from __future__ import annotations\n", MARK_RUN.format(marker=str(marker)), 1))

    without = verify_in_subprocess(out, tmp_path)
    assert without.returncode == 1, without.stdout + without.stderr
    assert "FAIL code: modeling_midus.py differs from midus-surgery" in without.stdout and "pass --trust-remote-code" in without.stdout
    assert "verify failed: code" in without.stderr and not marker.exists()  # the shipped code never ran

    # eval scores the package's code with a note, or with --trust-remote-code the shipped files
    from train_fixtures.tiny import make_tokenizer, write_corpus

    make_tokenizer().save_pretrained(out)
    corpus = write_corpus(tmp_path / "corpus", files=1, sentences_per_file=20)[0]
    scored = verify_in_subprocess(out, tmp_path, "--data", str(corpus), "--block-size", "16", "--cache-dir", str(tmp_path / "c"), "--quiet",
                                  command="eval")
    assert scored.returncode == 0 and "note: " in scored.stderr and "modeling_midus.py differs from this package's copy" in scored.stderr
    assert not marker.exists(), scored.stderr
    scored = verify_in_subprocess(out, tmp_path, "--data", str(corpus), "--block-size", "16", "--cache-dir", str(tmp_path / "c"), "--quiet",
                                  "--trust-remote-code", command="eval")
    assert scored.returncode == 0 and "note: " not in scored.stderr and marker.exists(), scored.stderr
    marker.unlink()
    # so does train, with the config's trust_remote_code
    from train_fixtures.tiny import write_config

    config = write_config(tmp_path / "train.yaml", out, tmp_path / "run", [str(corpus)], tmp_path / "c", tokens=16 * 4 * 2,
                          **{"data.block_size": 16, "data.held_out_fraction": 0.0, "eval.at_start": False})
    trained = verify_in_subprocess(config, tmp_path, "--quiet", "trust_remote_code=true", command="train")
    assert trained.returncode == 0 and marker.exists(), trained.stdout + trained.stderr
    marker.unlink()

    allowed = verify_in_subprocess(out, tmp_path, "--trust-remote-code")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "PASS code: modeling_midus.py differs" in allowed.stdout and "run the shipped files" in allowed.stdout
    assert marker.exists()  # the checks ran the shipped code

    modeling.write_text("from __future__ import annotations\nraise RuntimeError('stale')\n")  # shipped code that cannot load
    broken = verify_in_subprocess(out, tmp_path, "--trust-remote-code")
    assert broken.returncode == 1 and "FAIL load: RuntimeError: stale" in broken.stdout, broken.stdout + broken.stderr


def test_a_midus_output_without_its_modeling_files_fails_the_code_check(bases, tmp_path):
    out = emitted(bases, tmp_path, "llama", "midus")
    (out / "hml.py").unlink()
    checks = run(out)
    assert failed(checks) == ["code"] and checks["code"].detail.startswith("hml.py missing")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil.Model"
    (out / "config.json").write_text(json.dumps(config))
    (out / "hml.py").write_bytes((Path(modeling_midus.__file__).parent / "hml.py").read_bytes())
    assert "auto_map does not name MIDUS's own classes" in run(out)["code"].detail


def test_a_midus_output_shipping_tokenizer_code_fails_the_code_check(bases, tmp_path):
    """Its modeling files untouched, a MIDUS output whose tokenizer_config.json maps the tokenizer to a shipped evil_tok.py
    passed (trial75 F1): a load with trust_remote_code=True, as a MIDUS output is loaded without the package, runs it."""
    out = emitted(bases, tmp_path, "llama", "midus")
    (out / "evil_tok.py").write_text("raise SystemExit('ran')\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}))
    checks = run(out)
    assert "code" in failed(checks), {n: c.detail for n, c in checks.items()}
    assert checks["code"].detail.startswith("the folder ships code besides MIDUS's modeling files that is not its base's (evil_tok.py, "
                                            "tokenizer_config.json's auto_map: "), checks["code"].detail


def test_what_is_no_model_directory_is_a_usage_error_not_a_failed_check(tmp_path, capsys):
    """exit 1 means verify ran and a check failed; a path that is no model directory is exit 2."""
    from midus_surgery.cli import main

    for path in (tmp_path / "missing", tmp_path):
        assert main(["verify", str(path)]) == 2
        assert capsys.readouterr().err.strip() == f"error: {path} is not a model directory (no config.json)"


def test_a_folder_of_pickle_weights_only_is_one_line_and_never_unpickled(bases, tmp_path, capsys):
    """A folder saved with safe_serialization=False: a FileNotFoundError traceback (trial66)."""
    import shutil

    from midus_surgery.cli import main

    folder = tmp_path / "pickled"
    shutil.copytree(bases["llama"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")  # as older save_pretrained wrote it
    (folder / "model.safetensors").unlink()
    assert main(["verify", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {folder} holds its weights as pickle files only (pytorch_model.bin): verify reads safetensors, which apply and "
                   "train write; re-save it with save_pretrained (transformers 5 writes safetensors) to check it"), err


def test_a_base_moved_away_or_not_a_base_is_one_line(bases, tmp_path, capsys):
    """The recorded base moved since apply: identity is skipped, saying so (transformers took the
    path for a hub id: a traceback). --base that is no model, or another model's base: one line."""
    import shutil

    from midus_surgery.cli import main

    moved = tmp_path / "base-copy"
    shutil.copytree(bases["llama"], moved)
    out = emit(plan_recipe(write_recipe(tmp_path, moved, "llama-pro")), progress=False).out_dir
    shutil.rmtree(moved)
    checks = run(out)
    assert checks["identity"].skipped and checks["identity"].detail.startswith(f"the base recorded at apply time, {moved}, is not there")
    assert checks["weights"].skipped and checks["identity (perturbed)"].skipped  # the others the base is needed for: listed, not left out
    capsys.readouterr()
    for given, why in ((bases["llama"] / "model.safetensors", "a file, not a model directory"), (tmp_path / "nowhere", "no such directory"),
                       (tmp_path, "not a model directory (no config.json)")):
        assert main(["verify", str(out), "--base", str(given)]) == 2
        assert capsys.readouterr().err.strip() == f"error: --base {given}: {why}" + ("" if why.startswith("not") or why.startswith("no ")
                                                                                        else " (config.json beside the weights) or a .gguf file")
    from tiny_configs import tiny_config

    other = tmp_path / "other-vocabulary"
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=96)).save_pretrained(other)
    checks = {c.name: c for c in verify(out, other, report=lambda c: None)}
    assert not checks["identity"].ok and checks["identity"].detail == (f"the base model {other} has a vocabulary of 96 tokens and the "
                                                                      "output 128: it is not this output's base")
    # a base of another depth: said first, not after every comparison failed (trial82 F12)
    deeper = tmp_path / "other-depth"
    config = tiny_config("llama")
    config.num_hidden_layers += 2
    AutoModelForCausalLM.from_config(config).save_pretrained(deeper)
    checks = {c.name: c for c in verify(out, deeper, report=lambda c: None)}
    made_from = json.loads((out / "midus_plan.json").read_text())["base_num_hidden_layers"]
    assert not checks["identity"].ok and checks["identity"].detail == (f"the base model {deeper} has {made_from + 2} layers, and this "
                                                                      f"output was made from a base of {made_from}: it is not this output's base")
    assert "weights" not in checks


def test_a_skipped_check_is_said_as_skip_not_pass(bases, capsys):
    """A directory that is not an apply output (a base model) has nothing to compare with: the
    identity check is SKIP, counted apart from the passes, and the summary says what was checked."""
    from midus_surgery.cli import main

    assert main(["verify", str(bases["llama"])]) == 0
    text = capsys.readouterr().out
    assert "SKIP identity: no base given (--base) and none recorded" in text and "PASS identity" not in text
    passes = text.count("PASS ")
    assert passes >= 4 and f"verify: all {passes} checks passed, 1 skipped (identity)" in text
    assert "note: no midus_plan.json, so this is not an output of `midus-surgery apply`" in text


def test_a_full_temp_disk_is_said_as_such_not_skipped_as_the_bases_failure(bases, tmp_path, capsys, monkeypatch):
    """The round-trip check saves the model under TMPDIR: a full one read 'SKIP round-trip: the base model fails it
    too (... No space left on device)' and 'all checks passed', exit 0 (trial39)."""
    from midus_surgery.cli import main

    out = emitted(bases, tmp_path, "llama", "llama-pro")

    def full(*args, **kwargs):  # as safetensors words it
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(verify_module.tempfile, "TemporaryDirectory", full)
    assert main(["verify", str(out)]) == 1
    captured = capsys.readouterr()
    assert "cannot run the round-trip check: saving the model into " in captured.err and "point TMPDIR at a disk with room" in captured.err
    assert "SKIP round-trip" not in captured.out and "checks passed" not in captured.out and "Traceback" not in captured.err


def test_a_config_dtype_that_is_not_the_weights_fails_the_tensors_check(bases, tmp_path):
    """transformers loads dtype="auto" by what config.json says: a float32 output said bfloat16
    would load rounded, a bf16 one said float32 at twice the memory (a training export did)."""
    out = emitted(bases, tmp_path, "llama", "llama-pro")
    assert run(out)["tensors"].ok
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    checks = run(out)
    check = checks["tensors"]
    assert not check.ok and check.detail == ('config.json says dtype bfloat16, but the weights are stored as float32: '
                                             'a dtype="auto" load gets bfloat16')
    # the weights are the base's as stored: the base is compared rounded to what is stored, not to what config says, and
    # the weights row did not blame "not the base the output was made from" for one edit of config.json (trial150 L5)
    assert checks["weights"].ok and checks["identity"].ok, (checks["weights"], checks["identity"])


def test_a_non_finite_weight_is_named_not_blamed_on_batching(bases, tmp_path):
    """A NaN weight made the batch check blame batch dependence and the round trip blame save/reload."""
    out = emitted(bases, tmp_path, "llama", "llama-pro")
    weights = load_file(out / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    checks = run(out)
    assert failed(checks) == ["finite"] and checks["finite"].detail == "1 tensor(s) hold NaN or inf: model.layers.0.mlp.down_proj.weight"
    assert "batch" not in checks and "round-trip" not in checks


def test_an_output_without_tokenizer_files_gets_a_note(bases, tmp_path, capsys):
    """Its checks run on random ids and pass, but the card's loading code fails on the folder."""
    from midus_surgery.cli import main

    out = emitted(bases, tmp_path, "llama", "llama-pro")
    tokenizer_files = [p for p in out.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template"))]
    assert main(["verify", str(out)]) == 0
    assert ("note: no tokenizer files" in capsys.readouterr().out) == (not tokenizer_files)
    for p in tokenizer_files:
        p.unlink()
    assert main(["verify", str(out)]) == 0
    assert "note: no tokenizer files: the checks ran on random token ids" in capsys.readouterr().out


def test_an_output_whose_tokenizer_does_not_load_is_said_not_passed_silently(bases, tmp_path, capsys):
    """trial33: a garbage tokenizer.json (copied from a broken base) gave "all checks passed" and nothing
    else, while the card's AutoTokenizer line fails on the folder. It is a SKIP row with the reason."""
    from midus_surgery.cli import main

    out = emitted(bases, tmp_path, "llama", "llama-pro")
    (out / "tokenizer.json").write_bytes(bytes(range(256)) * 8)
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    assert main(["verify", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SKIP tokenizer: the folder's tokenizer does not load (AutoTokenizer.from_pretrained fails on it: " in text
    assert "the checks ran on random token ids" in text and "1 skipped (tokenizer)" in text
    assert "note: no tokenizer files" not in text


@pytest.mark.parametrize("how", ["fifo", "folder", "cut"])
def test_weights_that_cannot_be_read_are_a_model_that_cannot_be_checked(how, bases, tmp_path, capsys):
    """A model.safetensors that is a pipe, a folder or cut short: FAIL load with transformers' "no file named
    model.safetensors" (the file is there) or a bare SafetensorError naming no file, exit 1, where --help promises 2 for
    a model that cannot be checked (trial138 F6). Now eval's words for the file, one line, exit 2."""
    from midus_surgery.cli import main

    out = emitted(bases, tmp_path, "llama", "llama-pro")
    capsys.readouterr()  # apply's own warnings
    weights = out / "model.safetensors"
    whole = weights.read_bytes()
    weights.unlink()
    if how == "fifo":
        os.mkfifo(weights)
    elif how == "folder":
        weights.mkdir()
    else:
        weights.write_bytes(whole[:len(whole) // 2])
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    said = "is not a regular file (a pipe, a device or a folder)" if how != "cut" else "a corrupt or truncated safetensors file"
    assert err.startswith(f"error: {out}: cannot load the weights: {weights}") and said in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "no file named" not in err, err


def test_a_tokenizer_past_the_models_vocabulary_is_said_as_the_tokenizers_not_the_forward_pass(bases, tmp_path, capsys):
    """A folder whose tokenizer gives ids past the model's embedding: "FAIL forward: the model fails to run a forward pass:
    IndexError", blaming the model (trial138 F6). Now a FAIL tokenizer row in eval's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from midus_surgery.cli import main
    from midus_surgery.emit.verify import SAMPLE_TEXT

    out = emitted(bases, tmp_path, "llama", "llama-pro")
    words = dict.fromkeys(SAMPLE_TEXT.split())
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<eos>": 1, **{w: 100_000 + i for i, w in enumerate(words)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(out)
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr()
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    assert f"FAIL tokenizer: the tokenizer of {out} produces id 1000" in printed.out
    assert f"outside the model's vocabulary of {vocab}: the folder's tokenizer files are not this model's" in printed.out
    assert "FAIL forward" not in printed.out and "verify failed: tokenizer" in printed.err


def test_verify_with_the_flag_runs_no_code_of_a_stock_base(bases, tmp_path):
    """trial49: `verify --trust-remote-code OUT` loaded the recorded base with the flag too, and transformers then ran
    the base's custom_generate/generate.py, which no message named. The flag is for the output's own code: a base
    whose config maps to no code of its own is loaded without it."""
    import shutil

    base = tmp_path / "llama-with-generate"
    shutil.copytree(bases["llama"], base)
    marker = tmp_path / "generate-ran"
    (base / "custom_generate").mkdir()
    (base / "custom_generate" / "generate.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n\ndef generate(model, *args, **kwargs):\n    return model.generate(*args, **kwargs)\n")
    out = emit(plan_recipe(write_recipe(tmp_path, base, "midus")), progress=False).out_dir
    checks = {c.name: c for c in verify(out, trust_remote_code=True, report=lambda c: None)}
    assert checks["identity"].ok and not marker.exists()


def test_the_base_is_let_go_before_the_round_trip_loads_the_output_again(bases, tmp_path, monkeypatch):
    """The output, the base and the round trip's reload, each in float32, were held at once: 22 GB for a 1.7B model
    (trial93 F1). The base is no longer alive when the round trip runs, and a round trip the base fails too is still
    not blamed on the output (the base is loaded again for it)."""
    import gc
    import weakref

    out = emitted(bases, tmp_path, "llama", "llama-pro")
    loaded, alive_at_round_trip = [], []
    load, round_trip = verify_module._load, verify_module.round_trip_check

    def recorded(path, *args, **kwargs):
        model, info = load(path, *args, **kwargs)
        loaded.append((Path(path), weakref.ref(model)))
        return model, info

    def failing_round_trip(handed, ids, trust, shipped=False):
        gc.collect()
        alive_at_round_trip.append([p for p, ref in loaded if ref() is not None and ref() is not handed[0]])
        round_trip(handed, ids, trust, shipped=shipped)
        return verify_module.Check("round-trip", False, "broken for the test")  # the base fails it too, below

    monkeypatch.setattr(verify_module, "_load", recorded)
    monkeypatch.setattr(verify_module, "round_trip_check", failing_round_trip)
    checks = run(out)
    assert alive_at_round_trip[0] == [], alive_at_round_trip  # nothing but the output itself when the output's round trip runs
    assert checks["round-trip"].skipped and checks["round-trip"].detail.startswith("the base model fails it too ("), checks["round-trip"]


def test_the_output_is_let_go_once_saved_so_the_round_trips_reload_is_the_only_model_in_memory(bases, tmp_path, monkeypatch):
    """The round trip held the output and its reload at once, twice the float32 weights (the peak of a 1.7B verify).
    What the reload must give back is kept as digests: when the reload starts, no model verify loaded is alive, and a
    tensor the save changes is still caught."""
    import gc
    import weakref

    out = emitted(bases, tmp_path, "llama", "midus")
    loaded, alive_at_reload = [], []
    load = verify_module._load

    def recorded(path, *args, **kwargs):
        if Path(path) not in (out, bases["llama"]):  # the round trip's reload, from its temporary folder
            gc.collect()
            alive_at_reload.append([p for p, ref in loaded if ref() is not None])
        model, info = load(path, *args, **kwargs)
        loaded.append((Path(path), weakref.ref(model)))
        return model, info

    monkeypatch.setattr(verify_module, "_load", recorded)
    checks = run(out)
    assert checks["round-trip"].ok and alive_at_reload == [[]], alive_at_reload

    def saving_changed(self, folder, *args, **kwargs):
        with torch.no_grad():
            self.lm_head.weight[0, 0] += 1.0  # the saved tensor differs from the one verify hashed
        return original(self, folder, *args, **kwargs)

    model_class = type(load(out)[0])
    original = model_class.save_pretrained
    monkeypatch.setattr(model_class, "save_pretrained", saving_changed)
    check = run(out)["round-trip"]
    assert not check.ok and check.detail.startswith("save_pretrained + reload changed "), check
    assert re.search(r"e\.g\. (lm_head|model\.embed_tokens)\.weight$", check.detail), check  # tied, it is both


@pytest.mark.parametrize("kind", ["llama-pro", "midus", "dus"])
def test_no_two_models_are_in_memory_at_once(kind, bases, tmp_path, monkeypatch):
    """The output and its base, both in float32, were held together for the identity checks: the peak of a verify
    (3.2x the output's float32 weights, docs/results/verify_memory.json). Now each load (the output, its round trip's
    reload, the base, the output again for the perturbed identity) finds no other model verify loaded alive, and the
    checks still pass as they did with both at hand."""
    import gc
    import weakref

    out = emitted(bases, tmp_path, "llama", kind)
    loaded, alive_at_load = [], []
    load = verify_module._load

    def recorded(path, *args, **kwargs):
        gc.collect()
        alive_at_load.append((Path(path).name, [p.name for p, ref in loaded if ref() is not None]))
        model, info = load(path, *args, **kwargs)
        loaded.append((Path(path), weakref.ref(model)))
        return model, info

    monkeypatch.setattr(verify_module, "_load", recorded)
    checks = run(out)
    assert failed(checks) == [], {n: c.detail for n, c in checks.items() if not c.ok}
    assert all(alive == [] for _, alive in alive_at_load), alive_at_load
    names = [name for name, _ in alive_at_load]
    base = bases["llama"].name
    if kind == "dus":  # not the identity: compared by perplexity, nothing to perturb, so the output is not loaded again
        assert names[0] == out.name and names[2:] == [base] and "identity (perturbed)" not in checks, names
    else:
        assert names[0] == out.name and names[2:] == [base, out.name], names  # [1]: the round trip's reload
        assert checks["identity (perturbed)"].ok and "tensors of the output): 0 (must be 0" in checks["identity (perturbed)"].detail


@pytest.mark.parametrize("how", ["gone", "memory"])
def test_a_base_that_cannot_be_loaded_leaves_the_round_trip_failure_said(bases, tmp_path, monkeypatch, capsys, how):
    """trial95 F4: a base moved away after the output failed its round trip, or a MemoryError when the base loads, was
    a traceback that hid the output's failure. Now the round trip's failure stands, and the identity row says why the
    base could not compare, each in one line."""
    import shutil

    from midus_surgery.cli import main

    base = tmp_path / "base"
    shutil.copytree(bases["llama"], base)
    out = emit(plan_recipe(write_recipe(tmp_path, base, "llama-pro")), progress=False).out_dir
    load = verify_module._load

    def failing_round_trip(handed, ids, trust, shipped=False):
        if how == "gone":
            shutil.move(base, tmp_path / "moved")
        return verify_module.Check("round-trip", False, "broken for the test")

    def loading(path, *args, **kwargs):
        if how == "memory" and Path(path) == base:
            raise MemoryError()
        return load(path, *args, **kwargs)

    monkeypatch.setattr(verify_module, "round_trip_check", failing_round_trip)
    monkeypatch.setattr(verify_module, "_load", loading)
    assert main(["verify", str(out), "--base", str(base)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    lines = {m[2]: x for x in captured.out.splitlines() if (m := re.match(r"(PASS|FAIL|SKIP) ([^:]+): ", x))}
    assert lines["round-trip"].startswith("FAIL") and lines["round-trip"].endswith("broken for the test"), lines
    assert lines["identity"].startswith("FAIL") and f"the base model {base} does not load: " in lines["identity"], lines
    assert ("out of memory" in lines["identity"]) == (how == "memory"), lines


def test_verify_writes_nothing_into_the_model_folder(bases, tmp_path):
    """`verify --help` says nothing is written beside the model: its round trip saves into a temporary folder."""
    import hashlib

    out = emitted(bases, tmp_path, "llama", "midus")

    def tree() -> dict:
        return {str(p.relative_to(out)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in sorted(out.rglob("*")) if p.is_file()}

    before = tree()
    assert failed(run(out)) == []
    assert tree() == before


@pytest.mark.parametrize("platform", ["linux", "win32", "darwin"])
def test_handing_freed_memory_back_never_fails_where_there_is_no_glibc(platform, monkeypatch):
    """release_memory calls glibc's malloc_trim through ctypes; on Windows ctypes.CDLL(None) raises TypeError, and a
    C library without the call (musl) has no such attribute: neither may end a verify in a traceback."""
    import ctypes

    from midus_surgery.emit import comparable

    monkeypatch.setattr(comparable.sys, "platform", platform)
    calls = []

    class NoTrim:
        def __init__(self, name):
            calls.append(name)
            if platform == "win32":
                raise TypeError("expected str, got NoneType")

    monkeypatch.setattr(ctypes, "CDLL", NoTrim)
    comparable.release_memory()  # no exception
    assert calls == ([None] if platform == "linux" else [])  # only glibc's platform calls it: musl's AttributeError passes


def test_an_unfinished_output_fails_even_when_its_weights_are_whole(bases, tmp_path):
    """A killed apply's hidden `.NAME.partial-XXXXXXXX` could hold every weight: verify passed it and from_pretrained loaded
    it (trial143 F1). Its marker records no files (an output records them as it is put in place): a FAIL row says so. A
    finished output of a version that recorded no files, under its own name, is not failed for it."""
    import shutil

    from midus_surgery.io.output_dir import MARKER

    out = emitted(bases, tmp_path, "llama", "dus")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that has ended: the pid a killed apply left in its marker
    partial = tmp_path / f".{out.name}.partial-0123abcd"
    shutil.copytree(out, partial)
    marker = json.loads((partial / MARKER).read_text())
    (partial / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "files"} | {"pid": gone.pid}))
    checks = run(partial)
    assert failed(checks) == ["whole"], checks
    assert checks["whole"].detail == (f"{partial} is an unfinished output of midus-surgery apply (the process that wrote it did not "
                                      "finish it): what it holds may be a part of the model; run the command again for a whole one")
    from midus_surgery.io.output_dir import hold_directory, release_marker

    (partial / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "files"} | {"pid": os.getpid()}))  # its writer lives
    held = hold_directory(partial)  # as apply holds the folder it writes: the lock goes with it when it is renamed by hand
    renamed = tmp_path / "renamed"
    partial.rename(renamed)
    try:
        assert run(renamed)["whole"].detail.startswith(f"{renamed} is an unfinished output of midus-surgery apply (a running "
                                                      "process is still writing it)")  # trial147 F2
    finally:
        release_marker(held)
    older = tmp_path / "older"
    renamed.rename(older)  # under an output's own name, a marker without files is an older version's finished output,
    (older / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "files"} | {"pid": os.getpid()}))
    assert "whole" not in run(older) and failed(run(older)) == []  # whatever live process has its recorded pid now (trial145)
    # any process may flock a folder (a user's `flock OUT cmd`): an older output whose writer is gone is not being written
    (older / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "files"} | {"pid": gone.pid}))
    held = hold_directory(older)
    try:
        assert "whole" not in run(older), run(older).get("whole")  # trial149 F3
    finally:
        release_marker(held)


@pytest.mark.parametrize("base_fails_too", [True, False])
def test_a_forward_the_base_fails_too_is_said_with_the_outputs_failure(bases, tmp_path, monkeypatch, base_fails_too):
    """A copy-only output of a base whose own config cannot run (a hand-edited head_dim) failed 'forward' with the blame on
    the output alone (trial142 F3): the row now says that the base fails it too. It stays a FAIL: the output cannot run."""
    out = emitted(bases, tmp_path, "llama", "dus")
    cls = type(AutoModelForCausalLM.from_pretrained(out))
    deeper, original = AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers, cls.forward

    def broken(self, *args, **kwargs):
        if base_fails_too or self.config.num_hidden_layers == deeper:
            raise RuntimeError("The size of tensor a (4) must match the size of tensor b (8)")
        return original(self, *args, **kwargs)  # the base runs

    monkeypatch.setattr(cls, "forward", broken)
    checks = run(out)
    assert failed(checks) == ["forward"]
    detail = checks["forward"].detail
    assert detail.startswith("the model fails to run a forward pass: RuntimeError: The size of tensor a (4)"), detail
    said = f"; the base {bases['llama']} fails it too (RuntimeError: The size of tensor a (4)"
    assert (said in detail) == base_fails_too and ("fails it too" in detail) == base_fails_too, detail
    if base_fails_too:
        assert detail.endswith("): the base's config or code is the cause, not the surgery"), detail


def test_shipped_code_of_an_earlier_version_unedited_since_is_said_as_such(bases, tmp_path):
    """Every earlier version's MIDUS output failed the code check as "edited, or written by another version", all of them
    0.1.0 (trial152 F4): where the folder's marker shows the files as the tool wrote them, it says which, and the way
    to this version's code. It still fails: the checks ran the package's copy, not the shipped one."""
    from midus_surgery.emit.verify import shipped_code_check
    from midus_surgery.io.output_dir import record_written_files

    out = emitted(bases, tmp_path, "llama", "midus")
    modeling = out / "modeling_midus.py"
    modeling.write_text(modeling.read_text() + "\n# as an earlier version wrote it\n")
    config = json.loads((out / "config.json").read_text())
    edited = shipped_code_check(out, config, trust_remote_code=False)
    assert not edited.ok and "(edited, or written by another version)" in edited.detail, edited
    record_written_files(out)  # the marker's record as the version that wrote these files made it
    earlier = shipped_code_check(out, config, trust_remote_code=False)
    assert not earlier.ok and ("(as the folder's marker records midus-surgery wrote them: another version's, unless the marker "
                               "was edited too; `apply --overwrite` with this one ships this version's)") in earlier.detail, earlier
