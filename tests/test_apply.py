"""`apply` + `verify` on tiny random models of eleven architectures (two of them mixtures of experts), three recipes each.

For each: apply a DUS, a LLaMA-Pro and a MIDUS recipe -> load (registered Auto classes) ->
verify passes -> one training step of the new blocks lowers the loss. Loading with
trust_remote_code without midus_surgery importable is checked once for all, in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_configs import ARCHS, tiny_config
from transformers import AutoModelForCausalLM

import midus_surgery  # noqa: F401 - registers the MIDUS classes
from midus_surgery.compiler.planner import plan_recipe
from midus_surgery.emit import emitter
from midus_surgery.emit.emitter import emit
from midus_surgery.emit.verify import _round_trip_check, _tensor_digests, verify
from midus_surgery.errors import MidusError, RecipeError
from midus_surgery.io.tokenizer_files import tokenizer_code_files, tokenizer_code_repos

KINDS = {"dus": "transformer", "llama-pro": "identity", "midus": "memory"}
MEMORY = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    paths = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
        paths[arch] = root / arch
        model.save_pretrained(paths[arch])
    return paths


def write_recipe(tmp: Path, base: Path, kind: str, extra: str = "", name: str | None = None) -> Path:
    name = name or f"{base.name}-{kind}"
    text = f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: {KINDS[kind]}\n{MEMORY if kind == 'midus' else ''}{extra}output:\n  dir: out/{name}\n  dtype: float32\n"
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def new_block_params(model, plan) -> list[torch.nn.Parameter]:
    layers_path = plan.anatomy.layers_path
    inserted = {layer.index for layer in plan.layers if layer.inserted}
    chosen = []
    for name, p in model.named_parameters():
        parts = name[len(layers_path) + 1:].split(".") if name.startswith(layers_path + ".") else None
        keep = bool(parts) and int(parts[0]) in inserted
        p.requires_grad_(keep)
        if keep:
            chosen.append(p)
    return chosen


def one_step_lowers_loss(model, plan) -> tuple[float, float]:
    params = new_block_params(model, plan)
    model.eval()  # no dropout: the two losses must differ only by the step
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(params, lr=0.05)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "no gradient reaches the new blocks"
    opt.step()
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids, use_cache=False).loss
    return loss.item(), after.item()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", ARCHS)
def test_apply_verify_train(arch, kind, bases, tmp_path):
    planned = plan_recipe(write_recipe(tmp_path, bases[arch], kind))
    result = emit(planned, progress=False)
    config = json.loads((result.out_dir / "config.json").read_text())
    if kind == "midus":
        assert config["model_type"] == "midus" and config["base_model_type"] == arch
        assert (result.out_dir / "modeling_midus.py").is_file() and (result.out_dir / "hml.py").is_file()
    else:
        assert config["model_type"] == arch  # a stock architecture, just deeper
    assert (result.out_dir / "README.md").read_text().count("| memory |") == (2 if kind == "midus" else 0)

    checks = {c.name: c for c in verify(result.out_dir, report=lambda c: None)}
    assert all(c.ok for c in checks.values()), {n: c.detail for n, c in checks.items() if not c.ok}
    if kind != "dus":  # identity and zero-initialised memory blocks: exactly the base function
        assert "against the base: 0 (" in checks["identity"].detail

    model = AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32)
    assert model.config.num_hidden_layers == 6
    layers = model.get_submodule(planned.plan.anatomy.layers_path)
    for i, layer in enumerate(layers):  # renumbered: a stale layer_idx corrupts cached generation
        attn = layer.get_submodule(planned.plan.anatomy.single.attention)
        if hasattr(attn, "layer_idx"):
            assert attn.layer_idx == i
    before, after = one_step_lowers_loss(model, planned.plan)
    assert after < before


def test_emitted_tensors_follow_the_plan(bases, tmp_path):
    planned = plan_recipe(write_recipe(tmp_path, bases["llama"], "llama-pro"))
    out = emit(planned, progress=False).out_dir
    base = safe_open(str(bases["llama"] / "model.safetensors"), framework="pt")
    made = safe_open(str(out / "model.safetensors"), framework="pt")
    assert torch.equal(made.get_tensor("model.layers.2.mlp.up_proj.weight"), base.get_tensor("model.layers.1.mlp.up_proj.weight"))
    assert torch.equal(made.get_tensor("model.layers.4.mlp.up_proj.weight"), base.get_tensor("model.layers.3.mlp.up_proj.weight"))
    assert not made.get_tensor("model.layers.2.mlp.down_proj.weight").any()
    assert not made.get_tensor("model.layers.2.self_attn.o_proj.weight").any()
    assert "lm_head.weight" not in made.keys()  # tied embeddings are written once


def test_a_memory_block_drops_the_attention_post_norm_that_would_normalise_the_taps_zeros(bases, tmp_path):
    """Gemma-2 normalises the attention's output before the residual add (post_attention_layernorm). In a
    memory block the attention's output projection is a tap that returns zeros, so that norm's weight
    was copied, counted and trained for nothing; it is an identity now. With query_source: hidden the
    attention keeps its output projection, and the norm is kept with it."""
    for source, dropped in (("heads", True), ("hidden", False)):
        recipe = write_recipe(tmp_path, bases["gemma2"], "midus", name=f"gemma2-{source}")
        recipe.write_text(recipe.read_text().replace("  latent_dim: 8\n", f"  latent_dim: 8\n  query_source: {source}\n"))
        planned = plan_recipe(recipe)
        assert planned.plan.anatomy.single.attn_post_norms == ("post_attention_layernorm",)
        names = {t.name for t in planned.plan.tensors}
        assert ("model.layers.2.post_attention_layernorm.weight" not in names) == dropped
        assert "model.layers.2.input_layernorm.weight" in names and "model.layers.3.post_attention_layernorm.weight" in names
        out = emit(planned, progress=False).out_dir
        if dropped:  # still the base's function, KV cache and reload included
            checks = verify(out, report=lambda c: None)
            assert all(c.ok for c in checks), [c.detail for c in checks if not c.ok]
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        norm = model.model.layers[2].post_attention_layernorm
        assert isinstance(norm, torch.nn.Identity) == dropped
        assert not any(n.startswith("model.layers.2.post_attention_layernorm") for n, _ in model.named_parameters()) == dropped


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_identity_blocks_of_a_mixture_of_experts_zero_only_the_output_projections(arch, bases, tmp_path):
    """LLaMA-Pro on a MoE: every expert's and the shared expert's down_proj is zero, the rest copied,
    so the block adds 0 and yet the experts' down projections get gradients from the first step."""
    planned = plan_recipe(write_recipe(tmp_path, bases[arch], "llama-pro"))
    out = emit(planned, progress=False).out_dir
    base = AutoModelForCausalLM.from_pretrained(bases[arch], dtype=torch.float32).state_dict()  # the checkpoint stores experts one by one
    made = safe_open(str(out / "model.safetensors"), framework="pt")
    mlp = [k for k in made.keys() if k.startswith("model.layers.2.mlp.")]
    zeroed = {k for k in mlp if not made.get_tensor(k).any()}
    expected = {"model.layers.2.mlp.experts.down_proj"} | ({"model.layers.2.mlp.shared_expert.down_proj.weight"} if arch == "qwen2_moe" else set())
    assert zeroed == expected
    for k in set(mlp) - zeroed:  # the router, the experts' gate/up projections, the shared expert's gate
        assert torch.equal(made.get_tensor(k), base[k.replace("layers.2.", "layers.1.")]), k

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert model.get_parameter("model.layers.2.mlp.experts.down_proj").grad.abs().sum() > 0


def test_memory_model_of_a_mixture_of_experts_runs_the_bases_kernels(bases, tmp_path):
    """transformers picks a class's experts / attention kernels by reading its module's source;
    the MIDUS classes answer with their base class's choice (else MoE experts fall back to eager)."""
    out = emit(plan_recipe(write_recipe(tmp_path, bases["qwen2_moe"], "midus")), progress=False).out_dir
    # A fresh process that meets the MIDUS class first: transformers caches the answer on the class
    # it asked, and a subclass asked after its base inherits the base's cached answer.
    script = textwrap.dedent(f"""
        import json, midus_surgery
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        base = AutoModelForCausalLM.from_pretrained({str(bases["qwen2_moe"])!r})
        print(json.dumps([type(model).__name__] + [[m.config._experts_implementation, m.config._attn_implementation] for m in (model, base)]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, midus_kernels, base_kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert name == "MidusQwen2MoeForCausalLM"
    assert midus_kernels == base_kernels


def test_round_trip_check_wants_every_tensor_back_bit_for_bit_and_the_logits_up_to_rounding():
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2)}
    before = _tensor_digests(tensors)
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    assert _round_trip_check(before, _tensor_digests(dict(tensors)), logits, logits.clone()).ok
    rounded = _round_trip_check(before, _tensor_digests(dict(tensors)), logits, logits + 1e-7)
    assert rounded.ok and "within float rounding" in rounded.detail
    assert not _round_trip_check(before, _tensor_digests(dict(tensors)), logits, logits + 1e-2).ok
    for changed in ({"b": torch.zeros(2)}, {"b": torch.ones(2, dtype=torch.float64)}, {"b": torch.ones(1, 2)},
                    {"a": torch.tensor([-0.0, 1.0, 2.0, 3.0])}):  # a value, a dtype, a shape, a sign bit (-0.0 == 0.0)
        check = _round_trip_check(before, _tensor_digests({**tensors, **changed}), logits, logits)
        assert not check.ok and check.detail == f"save_pretrained + reload changed 1 tensors, e.g. {next(iter(changed))}"
    assert not _round_trip_check(before, _tensor_digests({"a": tensors["a"]}), logits, logits).ok


def test_a_mixture_of_experts_base_too_big_for_memory_is_refused_before_loading(bases, tmp_path, monkeypatch):
    import midus_surgery.io.tensor_source as tensor_source

    planned = plan_recipe(write_recipe(tmp_path, bases["mixtral"], "dus"))
    monkeypatch.setattr(tensor_source, "available_memory", lambda: 1024)
    with pytest.raises(MidusError, match=r"must load this base whole .* 0\.0 GiB of memory is available"):
        emit(planned, progress=False)
    assert not (tmp_path / "out").exists()


def test_plan_counts_the_routed_experts_flops_only(bases, tmp_path):
    """FLOPs per token count the router's top-k of the stacked experts, not all of them."""
    planned = plan_recipe(write_recipe(tmp_path, bases["mixtral"], "dus"))
    model = AutoModelForCausalLM.from_pretrained(bases["mixtral"])
    config = model.config
    k, n = config.num_experts_per_tok, config.num_local_experts
    assert k < n
    layer = {name: p.shape for name, p in model.model.layers[0].named_parameters()}
    active = sum(math.prod(s) * (k / n if len(s) == 3 else 1) for s in layer.values() if len(s) >= 2)
    assert any(len(s) == 3 for s in layer.values())
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    scores = 4 * planned.loaded.recipe.flops_seq_len * config.num_attention_heads * head_dim
    added = planned.plan.flops_per_token["dus"] - planned.plan.flops_per_token["base"]
    assert added == 2 * (2 * active + scores)  # two inserted copies


def test_same_recipe_same_bytes_and_seed_matters(bases, tmp_path):
    recipe = write_recipe(tmp_path, bases["llama"], "midus")
    a = emit(plan_recipe(recipe), out_dir=tmp_path / "a", progress=False).out_dir
    b = emit(plan_recipe(recipe), out_dir=tmp_path / "b", progress=False).out_dir
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    other = write_recipe(tmp_path, bases["llama"], "midus", extra="seed: 1\n", name="seed1")
    c = emit(plan_recipe(other), out_dir=tmp_path / "c", progress=False).out_dir
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_emitted_memory_matches_the_models_own_init(bases, tmp_path):
    """Same seed + name -> same bytes, whether the emitter or the model initialises."""
    recipe = write_recipe(tmp_path, bases["llama"], "midus", extra="seed: 7\n")
    out = emit(plan_recipe(recipe), progress=False).out_dir
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if ".hml." in n}
    model.reset_memory_parameters(seed=7)
    for name, p in model.named_parameters():
        if name in saved:
            assert torch.equal(p, saved[name]), name


def test_sharded_output_with_index(bases, tmp_path):
    recipe = write_recipe(tmp_path, bases["llama"], "midus", name="sharded")
    recipe.write_text(recipe.read_text().replace("  dtype: float32\n", "  dtype: float32\n  shard_size: 1MB\n"))
    bigger = tmp_path / "bigbase"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=256, intermediate_size=512, vocab_size=1024)).save_pretrained(bigger)
    recipe.write_text(recipe.read_text().replace(str(bases["llama"]), str(bigger)))
    out = emit(plan_recipe(recipe), progress=False).out_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all(c.ok for c in verify(out, report=lambda c: None))


def test_existing_output_needs_overwrite_and_failures_leave_nothing(bases, tmp_path):
    recipe = write_recipe(tmp_path, bases["llama"], "dus")
    planned = plan_recipe(recipe)
    out = emit(planned, progress=False).out_dir
    with pytest.raises(MidusError, match="already exists"):
        emit(planned, progress=False)
    emit(planned, overwrite=True, progress=False)
    # a base whose weights don't match its config: the error names it, and no output appears
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((bases["llama"] / "config.json").read_text())
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(broken / "model.safetensors"))
    bad = write_recipe(tmp_path, broken, "dus", name="broken")
    with pytest.raises(MidusError, match="has no tensor|shape"):
        emit(plan_recipe(bad), progress=False)
    assert not (tmp_path / "out" / "broken").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    assert out.is_dir()


def test_pickle_base_needs_permission(bases, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((bases["llama"] / "config.json").read_text())
    torch.save(AutoModelForCausalLM.from_pretrained(bases["llama"]).state_dict(), pickled / "pytorch_model.bin")
    recipe = write_recipe(tmp_path, pickled, "dus", name="pickled")
    with pytest.raises(MidusError, match="--allow-pickle"):
        emit(plan_recipe(recipe), progress=False)
    out = emit(plan_recipe(recipe), allow_pickle=True, progress=False).out_dir
    assert all(c.ok for c in verify(out, base=bases["llama"], report=lambda c: None))


def test_loads_with_trust_remote_code_without_the_package(bases, tmp_path):
    """The README's and the model card's loading lines, model and tokenizer, in a process that
    cannot import midus_surgery, with no terminal to answer transformers' remote-code question."""
    import shutil

    from train_fixtures.tiny import make_tokenizer

    with_tokenizer = shutil.copytree(bases["llama"], tmp_path / "llama-tok")
    make_tokenizer().save_pretrained(with_tokenizer)
    outs = []
    for base in (with_tokenizer, bases["gpt2"], bases["opt"], bases["gpt_neox"]):
        outs.append(str(emit(plan_recipe(write_recipe(tmp_path, base, "midus")), progress=False).out_dir))
    script = textwrap.dedent(
        """
        import os
        import sys
        sys.modules["midus_surgery"] = None  # importing it now fails: only the copied code may be used
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        for path in sys.argv[1:]:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            ids = torch.randint(0, model.config.vocab_size, (1, 8))
            assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
            print("ok", type(model).__name__)
            if os.path.exists(os.path.join(path, "tokenizer.json")):
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
                print("tokenizer ok", len(tokenizer("the cat sat").input_ids))
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script, *outs], capture_output=True, text=True, env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok Midus") == 4 and result.stdout.count("tokenizer ok 3") == 1
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr


def test_loading_without_our_classes_fails_loudly(bases, tmp_path):
    out = emit(plan_recipe(write_recipe(tmp_path, bases["llama"], "midus")), progress=False).out_dir
    script = "import sys\nfrom transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True)
    assert result.returncode != 0 and "midus" in result.stderr


def test_verify_reports_a_model_that_cannot_run_as_a_failed_check(bases, tmp_path, monkeypatch, capsys):
    import midus_surgery.emit.verify as verify_module
    from midus_surgery.cli import main

    out = emit(plan_recipe(write_recipe(tmp_path, bases["llama"], "dus")), progress=False).out_dir

    def broken(model, ids):
        raise RuntimeError("The size of tensor a (4) must match the size of tensor b (8)\nmore lines")

    monkeypatch.setattr(verify_module, "_logits", broken)
    assert main(["verify", str(out)]) == 1
    text = capsys.readouterr()
    assert "FAIL forward: the model fails to run a forward pass: RuntimeError: The size of tensor a (4)" in text.out + text.err
    assert "Traceback" not in text.out + text.err and "more lines" not in text.out + text.err


def test_verify_prints_its_checklist_without_transformers_bars(bases, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    from midus_surgery.cli import main

    out = emit(plan_recipe(write_recipe(tmp_path, bases["llama"], "llama-pro")), progress=False).out_dir
    hf_logging.enable_progress_bar()  # as in a fresh process
    assert main(["verify", str(out)]) == 0
    text = capsys.readouterr()
    assert text.out.count("PASS ") == 8 and "verify: all 8 checks passed" in text.out  # tensors, batch, identity (+ perturbed), weights, kv-cache (+ padded batch), round-trip (no config row: Llama has no per-layer lists)
    assert "Loading weights" not in text.err and "Writing" not in text.err and hf_logging.is_progress_bar_enabled()


def test_a_pruned_layer_is_named_as_why_the_output_is_not_the_base(bases, tmp_path):
    """Dropping base layer 2 (allowed) with an identity block beside layer 1: the identity block is an
    identity; the card and verify blamed it ('found not to start as the identity') instead of the pruning."""
    from midus_surgery.emit.verify import verify

    recipe = tmp_path / "pruned.yaml"
    recipe.write_text(f"base:\n  path: {bases['llama']}\nlayout:\n  layers:\n    - {{source: 0}}\n    - {{source: 1}}\n"
                      "    - {source: 1, kind: identity}\n    - {source: 3}\nallow_dropped_layers: true\naccept_function_change: true\n"
                      "output:\n  dir: out/pruned\n  dtype: float32\n")
    out = emit(plan_recipe(recipe), progress=False).out_dir
    card = (out / "README.md").read_text()
    assert "It leaves out base layer 2 (`allow_dropped_layers`), so it computes another function than the base until trained." in card
    assert "found not to start as the identity" not in card
    checks = {c.name: c for c in verify(out, report=lambda c: None)}
    assert checks["logits"].ok and checks["identity"].skipped
    assert checks["identity"].detail.startswith("base layer 2 is left out (allow_dropped_layers): not meant"), checks["identity"].detail


def test_only_the_marker_holds_this_machines_paths(bases, tmp_path, capsys):
    """An output is published by upload_folder as it is: no file in it but the .midus-surgery
    marker (local bookkeeping, docs/ecosystem.md) names a path of this machine, and verify still
    finds the base it was made from (recorded in the marker) without --base."""
    import shutil

    from midus_surgery.cli import main
    from midus_surgery.io.output_dir import MARKER, read_marker

    shutil.copytree(bases["llama"], tmp_path / "bases" / "llama")
    recipe = write_recipe(tmp_path, Path("bases/llama"), "midus")  # as written: relative to the recipe
    out = emit(plan_recipe(recipe), progress=False).out_dir
    here = str(tmp_path.resolve()).encode()
    assert [p.name for p in out.iterdir() if p.is_file() and here in p.read_bytes()] == [MARKER]
    assert read_marker(out)["base_path"] == str((tmp_path / "bases" / "llama").resolve())
    assert main(["verify", str(out)]) == 0
    assert "PASS identity: max |logit difference| against the base: 0" in capsys.readouterr().out


def test_an_output_names_its_architecture_when_the_base_config_does_not(bases, tmp_path):
    """A GGUF base's config (transformers' GGUF reader) has "architectures": null and the GGUF's own
    model name under _model_name_or_path: the output's config.json kept both, and tools that read
    architectures[0] (vLLM, llama.cpp's converter) could not take it."""
    import shutil

    base = tmp_path / "gguf-like"
    shutil.copytree(bases["llama"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": None, "_model_name_or_path": "Some GGUF Model"}))
    out = emit(plan_recipe(write_recipe(tmp_path, base, "dus")), progress=False).out_dir
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and "_model_name_or_path" not in written


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("kind, title, start", [
    ("dus", "Depth Up-Scaling of", "Copies change the function"),
    ("llama-pro", "LLaMA-Pro block expansion of", "It starts computing the base's function exactly"),
    ("midus", "MIDUS (Memory-Infused Depth Up-Scaling) of", "It starts computing the base's function exactly"),
])
def test_the_model_card_names_the_method_the_base_and_how_the_model_starts(kind, title, start, bases, tmp_path):
    """A LLaMA-Pro card was titled "Depth Up-Scaling" and did not say its blocks start as the
    identity; no card had a base_model key; the card named the base by its path on this machine."""
    import shutil

    base = tmp_path / "bases" / "tiny-llama"
    shutil.copytree(bases["llama"], base)
    card = (emit(plan_recipe(write_recipe(tmp_path, base, kind)), progress=False).out_dir / "README.md").read_text()
    about = card[:card.index("## Recipe")]  # the recipe below is the user's text, as written
    assert f"# {title} `tiny-llama`\n\nMade by `midus-surgery apply`" in about  # the same bytes wherever it is written
    assert start in about and str(tmp_path) not in about
    meta = front_matter(card)
    assert "base_model" not in meta and meta["library_name"] == "transformers"  # no Hub id known: none claimed
    assert {"llama-pro": "llama-pro", "midus": "midus"}.get(kind, "depth-up-scaling") in meta["tags"]


def test_the_model_card_names_the_hub_base_from_the_recipe_or_the_hub_cache(bases, tmp_path, capsys):
    import shutil

    from midus_surgery.cli import main

    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "0123abc"
    shutil.copytree(bases["llama"], snapshot)
    out = emit(plan_recipe(write_recipe(tmp_path, snapshot, "dus", name="cached")), progress=False).out_dir
    assert front_matter((out / "README.md").read_text())["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "Depth Up-Scaling of `HuggingFaceTB/SmolLM2-135M`" in (out / "README.md").read_text()
    named = write_recipe(tmp_path, bases["llama"], "dus", name="named")
    named.write_text(named.read_text().replace("base:\n", "base:\n  hub_id: my-org/my-model\n"))
    out = emit(plan_recipe(named), progress=False).out_dir
    assert front_matter((out / "README.md").read_text())["base_model"] == "my-org/my-model"
    named.write_text(named.read_text().replace("my-org/my-model", "../my-model"))
    assert main(["validate", str(named)]) == 2
    err = capsys.readouterr().err
    assert "named.yaml:2:3: base.hub_id" in err and "base.hub_id: should be a Hub id such as HuggingFaceTB/SmolLM2-135M" in err and "Traceback" not in err


def test_verify_draws_no_bare_bar_of_transformers_into_its_output(tmp_path, capsys, monkeypatch):
    """transformers' GGUF reader draws a bare tqdm bar ("Converting and de-quantizing GGUF
    tensors") outside its own progress-bar switch: verify against a GGUF base wrote its frames into
    the checklist's log."""
    import sys

    from tqdm import tqdm

    from midus_surgery.cli import main
    from midus_surgery.emit import verify as verify_module

    def loads_a_gguf(path, base, *, trust_remote_code, report):
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=sys.stderr):
            pass
        check = verify_module.Check("tensors", True, "3 tensors on disk, all loaded")
        report(check)
        return [check]

    monkeypatch.setattr(verify_module, "verify", loads_a_gguf)
    assert main(["verify", str(tmp_path)]) == 0
    text = capsys.readouterr()
    assert "GGUF" not in text.err + text.out and "PASS tensors" in text.out


def test_missing_tensor_is_a_load_error(bases, tmp_path):
    out = emit(plan_recipe(write_recipe(tmp_path, bases["llama"], "midus")), progress=False).out_dir
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    dropped = next(n for n in tensors if ".hml." in n)
    del tensors[dropped]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing 1"):
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("extra", ["  query_source: hidden\n", "  gate: true\n  output_proj: always\n", "  share_bank: true\n"])
def test_memory_variants_apply_load_and_train(extra, bases, tmp_path):
    """Every memory variant's plan holds exactly the tensors its model has (query_source: hidden
    keeps the attention's output projection), loads function-preserving, and trains."""
    recipe = write_recipe(tmp_path, bases["llama"], "midus")
    recipe.write_text(recipe.read_text().replace("  latent_dim: 8\n", "  latent_dim: 8\n" + extra))
    planned = plan_recipe(recipe)
    result = emit(planned, progress=False)
    checks = {c.name: c for c in verify(result.out_dir, report=lambda c: None)}
    assert all(c.ok for c in checks.values()), {n: c.detail for n, c in checks.items() if not c.ok}
    assert "against the base: 0 (" in checks["identity"].detail
    model = AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32)
    names, loaded = {t.name for t in planned.plan.tensors}, set(model.state_dict())
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert (loaded - names - tied, names - loaded) == (set(), set())
    o_proj = f"{planned.plan.anatomy.layers_path}.{planned.plan.memory_layers[0]}.{planned.plan.anatomy.single.attn_out_proj}.weight"
    assert (o_proj in model.state_dict()) == ("query_source: hidden" in extra)
    before, after = one_step_lowers_loss(model, planned.plan)
    assert after < before


@pytest.mark.parametrize("planner", ["headers", "full"])
def test_a_tied_base_holding_another_head_is_refused_not_written_without_it(tmp_path, capsys, planner):
    """config.json ties lm_head to the embedding, but the checkpoint stores a different lm_head:
    transformers loads such a base untied, with that head, so an output that follows the config
    (and drops the head) would compute another function. Refused, nothing written; a head saved
    equal to the embedding applies, and so does the base once its config says it is untied."""
    from safetensors.torch import load_file, save_file

    from midus_surgery.cli import main

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    weights = load_file(base / "model.safetensors")
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1.0
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after: [1]\n    kind: transformer\noutput:\n  dir: out\n  dtype: float32\n")
    flags = ["--quiet"] + (["--full-plan"] if planner == "full" else [])

    assert main(["apply", str(recipe), *flags]) == 2
    err = capsys.readouterr().err
    assert "ties lm_head.weight to model.embed_tokens.weight (tie_word_embeddings: true), but its checkpoint holds both, with different values" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()

    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # a tied head saved anyway
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    assert main(["apply", str(recipe), *flags]) == 0
    capsys.readouterr()

    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1.0
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    data = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**data, "tie_word_embeddings": False}))
    assert main(["apply", str(recipe), *flags, "--overwrite", "--verify"]) == 0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), weights["lm_head.weight"])


def test_a_base_missing_a_tensor_of_its_architecture_is_exit_2_naming_it(tmp_path, capsys):
    """An untied base (tie_word_embeddings: false) saved without its lm_head.weight: broken base
    files, so exit 2 like every other (was 1), and the line names the tensor. validate says so
    too, from the safetensors headers (it passed such a base, and apply then refused it)."""
    from safetensors.torch import load_file, save_file

    from midus_surgery.cli import main

    base = tmp_path / "base"
    config = tiny_config("llama")
    config.tie_word_embeddings = False
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    weights = load_file(base / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after: [1]\n    kind: transformer\noutput:\n  dir: out\n")
    said = f"the base checkpoint {base} lacks 1 tensor(s) the output copies, e.g. lm_head.weight: its safetensors files hold no tensor of that name"
    for command in (["validate", str(recipe)], ["plan", str(recipe)], ["apply", str(recipe), "--quiet"]):
        assert main(command) == 2
        captured = capsys.readouterr()
        assert said in captured.out + captured.err, command
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["memory", "transformer"])
def test_a_base_storing_a_float_tensor_as_integers_is_refused_naming_it(tmp_path, capsys, kind):
    """A base whose up_proj is stored as int32: apply cast it into the float output, verify passed, and eval and
    train then accepted the output (trial61). validate, plan and apply now refuse it from the headers (exit 2,
    nothing written), and verify fails a model that stores one."""
    from safetensors.torch import load_file, save_file

    from midus_surgery.cli import main
    from midus_surgery.emit.verify import verify

    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(base)
    weights = load_file(base / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = (weights[name] * 1000).to(torch.int32)
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    memory = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n" if kind == "memory" else ""
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after: [1]\n    kind: {kind}\n{memory}output:\n  dir: out\n")
    said = (f"the base checkpoint {base} stores 1 tensor(s) the output copies as integers or booleans ({name} (I32)): "
            "the model's weights are floating point")
    for command in (["validate", str(recipe)], ["plan", str(recipe)], ["apply", str(recipe), "--quiet"]):
        assert main(command) == 2, command
        captured = capsys.readouterr()
        assert said in captured.out + captured.err and "Traceback" not in captured.err, (command, captured)
    assert not (tmp_path / "out").exists()
    tensors = {c.name: c for c in verify(base, report=lambda *a: None)}["tensors"]  # the base itself, verified as a model
    assert not tensors.ok and f"{name} (I32)" in tensors.detail, tensors
    # a pickle base (read with --allow-pickle, its headers unread): refused as its tensors are read, nothing written
    pickled = tmp_path / "pickled"
    shutil.copytree(base, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    recipe.write_text(recipe.read_text().replace(str(base), str(pickled)))
    assert main(["apply", str(recipe), "--quiet", "--allow-pickle"]) == 2
    err = capsys.readouterr().err
    assert f"the base checkpoint stores 1 tensor(s) the output copies as integers or booleans ({name} (int32))" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_base_missing_a_tensor_transformers_would_convert_is_refused_by_its_strict_load(tmp_path, capsys):
    """Mixtral: transformers stacks the per-expert tensors on load, so a module name is in no file and
    the headers cannot tell; apply loads the base through transformers, and its strict load names
    the tensor it could not build (exit 2, nothing written; it said "look at the report above", a report
    the quiet load never printed)."""
    from safetensors.torch import load_file, save_file

    from midus_surgery.cli import main

    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(tiny_config("mixtral")).save_pretrained(base)
    weights = load_file(base / "model.safetensors")
    gone = next(k for k in weights if k.startswith("model.layers.1.") and "experts" in k)
    del weights[gone]
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after: [1]\n    kind: transformer\noutput:\n  dir: out\n")
    assert main(["apply", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"error: the base checkpoint {base} does not give transformers every tensor of the model: it could not build "
            "model.layers.1.mlp.experts.gate_up_proj (missing, conversion failed) from the files") in err
    assert "a tensor it is made from is missing or of another shape" in err and "above report" not in err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_with_its_own_code_travels_with_it_and_never_runs(bases, tmp_path, capsys):
    """trial33: the module a tokenizer_config.json's auto_map names (tok.py) was left behind, so the output's
    tokenizer could not load where the base's did. It is copied like the other tokenizer files (never
    imported: a file it would write when run stays unwritten); a module the base lacks is warned about."""
    import shutil

    base = tmp_path / "tokcode"
    shutil.copytree(bases["llama"], base)
    ran = tmp_path / "RAN"
    (base / "tok.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.MyTok", None]},
                                                            "tokenizer_class": "MyTok"}))
    recipe = write_recipe(tmp_path, base, "dus")
    out = emit(plan_recipe(recipe), progress=False).out_dir
    assert (out / "tok.py").read_text() == (base / "tok.py").read_text() and not ran.exists()
    # said before apply and on the card: a MIDUS output's documented load passes trust_remote_code=True, which runs it (trial99 S1)
    card = (out / "README.md").read_text()
    assert "This model carries code of its own, from the base (`tok.py`, named by" in card and "Read it first." in card
    from midus_surgery.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["validate", str(recipe)]) == 0
    said = capsys.readouterr().out
    assert "note: the base has code of its own that the output carries (tok.py, named by the auto_map of its config.json or tokenizer_config.json): apply copies it" in said, said
    assert not ran.exists()
    (base / "tok.py").unlink()
    out = emit(plan_recipe(write_recipe(tmp_path, base, "dus", name="again")), progress=False).out_dir
    assert not (out / "tok.py").exists() and "names its own code in tok.py, which is not a file in the base directory" in capsys.readouterr().err
    assert tokenizer_code_files(base / "tokenizer_config.json") == ["tok.py"]
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": "owner/repo--tok.MyTok",
                                                                         "AutoProcessor": "../evil.X", "AutoConfig": "sub.tok.X"}}))
    assert tokenizer_code_files(base / "tokenizer_config.json") == []  # transformers loads none of these either
    # another Hub repository's code: nothing to copy, but the output keeps the reference, which a trusted load downloads (trial102 R08)
    assert tokenizer_code_repos(base / "tokenizer_config.json") == ["owner/repo"]
    capsys.readouterr()
    assert cli_main(["validate", str(recipe)]) == 0
    said = capsys.readouterr().out
    assert ("the base has code of its own that the output carries (code of the Hub repository owner/repo, named by the auto_map of its config.json or "
            "tokenizer_config.json): apply keeps the reference") in said and "downloads and runs it" in said, said
    out = emit(plan_recipe(write_recipe(tmp_path, base, "dus", name="hub")), progress=False).out_dir
    assert "This model carries code of its own, from the base (code of the Hub repository `owner/repo`" in (out / "README.md").read_text()
    # "/abs/path--tok.Tok" is read by transformers from that local folder when it exists (nothing downloaded);
    # it was called code of a Hub repository. The output keeps the reference and not the folder's code, and says so
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tok.py").write_text("X = 1\n")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, f"{elsewhere}--tok.Tok"]}}))
    capsys.readouterr()
    assert cli_main(["validate", str(recipe)]) == 0
    said = capsys.readouterr().out
    assert (f"the base has code of its own that the output carries (code of the local folder {elsewhere}, outside the base, "
            "named by the auto_map of its config.json or tokenizer_config.json): apply keeps the reference") in said, said
    assert "Hub" not in said and "downloads" not in said and "the output does not hold a local folder's code" in said, said
    out = emit(plan_recipe(write_recipe(tmp_path, base, "dus", name="local")), progress=False).out_dir
    assert f"from the base (code of the local folder `{elsewhere}`, outside the base, named by" in (out / "README.md").read_text()
    assert not (out / "tok.py").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"] == [None, f"{elsewhere}--tok.Tok"]


def test_a_base_value_past_the_output_dtypes_range_is_refused_before_anything_is_written(bases, tmp_path):
    """output.dtype: float16 over a weight of 1e6 (float16 ends at 65504) wrote inf with exit 0;
    only verify said so (trial52). A finite value the cast would make infinite is the recipe's
    output.dtype problem, located, and the output folder is not left behind."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "large-weight"
    shutil.copytree(bases["llama"], base)
    weights = load_file(base / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][0, 0] = 1e6
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    path = write_recipe(tmp_path, base, "dus")
    path.write_text(path.read_text().replace("dtype: float32", "dtype: float16"))
    with pytest.raises(RecipeError) as refused:
        emit(plan_recipe(path), progress=False)
    (problem,) = refused.value.problems
    assert problem.field == "output.dtype" and problem.where.endswith(":9:3"), problem
    assert problem.message == (f"float16 cannot hold base tensor {name}: it holds 1e+06, and float16's largest value is 65504, so the "
                               "output would hold inf; write bfloat16 (float32's range) or float32")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    path.write_text(path.read_text().replace("dtype: float16", "dtype: bfloat16"))
    assert emit(plan_recipe(path), progress=False).out_dir.is_dir()  # bfloat16 holds it


def test_shards_fill_to_shard_size_and_a_larger_tensor_gets_one_of_its_own():
    """recipes.md: shard_size bounds a shard's tensor data; one tensor larger than it is a shard alone."""
    from midus_surgery.compiler.plan import TensorEntry

    entries = [TensorEntry(f"t{i}", shape, f"t{i}", "copy") for i, shape in enumerate([(100,), (100,), (600,), (100,), (150,), (100,)])]
    shards = emitter.shard_tensors(entries, "float32", 1000)  # 4 bytes a value: 400, 400, 2400, 400, 600, 400 bytes
    assert [[e.name for e in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"], ["t5"]]


def test_a_tokenizer_code_name_is_shown_escaped_and_every_entry_is_noted(bases, tmp_path, capsys):
    """trial104: a module name from auto_map was printed raw in the note (stdout for validate, stderr for apply) and on
    the card, so a decoy entry of another class (`"AutoConfig": "\\n...\\x1b[8m.X"`, sorted first) forged lines and hid the
    warning. Every name is escaped; a name that is no module is called suspicious. trial111: naming AutoTokenizer's entry
    alone left the other entries' files (copied, and run by AutoProcessor.from_pretrained) and Hub references unnamed."""
    import shutil

    from midus_surgery.cli import main as cli_main

    base = tmp_path / "tokcode"
    shutil.copytree(bases["llama"], base)
    decoy = "\nOK forged\x1b[8m"
    (base / "tok.py").write_text("")
    (base / f"{decoy}.py").write_text("")
    (base / "w\x1b[8m.py").write_text("")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoConfig": f"{decoy}.X", "AutoProcessor": "o/r--p.X",
                                                                         "AutoTokenizer": ["tok.Evil", "w\x1b[8m.Fast"]}}))
    recipe = write_recipe(tmp_path, base, "dus")
    capsys.readouterr()
    assert cli_main(["validate", str(recipe)]) == 0
    said = capsys.readouterr().out
    assert "\x1b" not in said and "\nOK" not in said, said
    assert ("note: the base has code of its own that the output carries (\\nOK forged\\x1b[8m.py (not a Python module name: suspicious), "
            "tok.py, w\\x1b[8m.py (not a Python module name: suspicious), code of the Hub repository o/r, named by") in said, said
    assert cli_main(["apply", str(recipe), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.err + captured.out and "\nOK" not in captured.err, captured
    out = tmp_path / "out" / "tokcode-dus"
    card = (out / "README.md").read_text()
    assert "\x1b" not in card and "\nOK" not in card, card
    assert "(`\\nOK forged\\x1b[8m.py`, `tok.py`, `w\\x1b[8m.py`, code of the Hub repository `o/r`, named by" in card, card
    assert (out / "tok.py").is_file() and (out / f"{decoy}.py").is_file()  # what is named is what is copied


def test_base_code_named_like_midus_modeling_files_is_refused_and_a_pipe_is_not_read(bases, tmp_path, capsys):
    """trial113: a tokenizer module's `from .hml import X` (or a config.json auto_map entry) carried the base's hml.py into a
    MIDUS output over MIDUS's own, and loading the output as a model ran it: refused before anything is written. And a
    relative import that is a named pipe hung validate, plan and apply: only regular files are read."""
    import os
    import signal

    from midus_surgery.cli import main as cli_main

    base = tmp_path / "code"
    shutil.copytree(bases["llama"], base)
    (base / "tok.py").write_text("from .hml import X\nfrom .piped import Y\n")
    (base / "hml.py").write_text("X = 1\n")
    os.mkfifo(base / "piped.py")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    signal.alarm(120)  # a read of the pipe blocks for ever: fail the test instead
    try:
        capsys.readouterr()
        midus = write_recipe(tmp_path, base, "midus")
        assert cli_main(["validate", str(midus)]) == 2
        err = capsys.readouterr().err
        assert "the base has code of its own named like MIDUS's modeling files (hml.py)" in err, err
        assert cli_main(["apply", str(midus)]) == 2 and not (tmp_path / "out").exists()
        capsys.readouterr()
        assert cli_main(["validate", str(write_recipe(tmp_path, base, "dus"))]) == 0  # a DUS output ships no MIDUS files
        assert "(hml.py, tok.py, named by" in capsys.readouterr().out  # the pipe is no module file: not read, not named
    finally:
        signal.alarm(0)


def test_every_code_file_the_output_carries_is_named_and_relative_imports_travel(bases, tmp_path, capsys):
    """trial111: apply copied the module of every auto_map entry (tokenizer_config.json's AutoProcessor, config.json's
    AutoProcessor, which AutoProcessor.from_pretrained(out, trust_remote_code=True) runs) but the note and the card named
    AutoTokenizer's alone; and a module's relative import (from .helper import X) was not copied, so the output's
    tokenizer did not load. Every file copied is named, imports included."""
    from midus_surgery.cli import main as cli_main

    base = tmp_path / "code"
    shutil.copytree(bases["llama"], base)
    (base / "tok.py").write_text("from .helper import X\n")
    (base / "helper.py").write_text("X = 1\n")
    (base / "proc.py").write_text("")
    (base / "cproc.py").write_text("")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "tok.Tok"], "AutoProcessor": "proc.P"}}))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoProcessor": "cproc.Q"}}))
    for kind in ("dus", "midus"):
        recipe = write_recipe(tmp_path, base, kind)
        capsys.readouterr()
        assert cli_main(["validate", str(recipe)]) == 0
        said = capsys.readouterr().out
        assert "note: the base has code of its own that the output carries (cproc.py, helper.py, proc.py, tok.py, named by" in said, said
        out = emit(plan_recipe(recipe), progress=False).out_dir
        assert {p.name for p in out.glob("*.py")} >= {"cproc.py", "helper.py", "proc.py", "tok.py"}
        assert "(`cproc.py`, `helper.py`, `proc.py`, `tok.py`, named by" in (out / "README.md").read_text()
        assert json.loads((out / "config.json").read_text())["auto_map"]["AutoProcessor"] == "cproc.Q"
    assert tokenizer_code_files(base / "tokenizer_config.json") == ["helper.py", "proc.py", "tok.py"]


@pytest.mark.parametrize("how", ["failed", "could not check", "full disk", "system error"])
def test_apply_verify_that_fails_is_exit_1_and_says_the_output_is_written(bases, tmp_path, monkeypatch, capsys, how):
    """apply --verify exited 1 after a failed check, which its --help gave as "nothing half-written kept", and 2 where verify
    could not check, read as a problem in the recipe: a whole output stood there either way (trial150 M1)."""
    from midus_surgery.cli import main
    from midus_surgery.emit import verify as verify_module
    from midus_surgery.emit.verify import Check
    from midus_surgery.errors import MachineError, UsageError

    def verify(out, base=None, *, trust_remote_code=False, report=print):
        if how == "could not check":
            raise UsageError(f"{out} runs its own code")
        if how == "full disk":
            raise MachineError("cannot run the round-trip check: no space left on the temporary disk")
        if how == "system error":  # said as "nothing half-written was kept" by the command's own handler (trial153 L2)
            raise OSError(28, "No space left on device", str(out / "model.safetensors"))  # the file said too (trial154 L1)
        report(Check("identity", False, "max |logit difference| against the base: 0.5"))
        return [Check("identity", False, "max |logit difference| against the base: 0.5")]

    monkeypatch.setattr(verify_module, "verify", verify)
    recipe = write_recipe(tmp_path, bases["llama"], "llama-pro")
    assert main(["apply", str(recipe), "--verify", "--quiet"]) == 1
    err = capsys.readouterr().err
    out = tmp_path / "out" / f"{bases['llama'].name}-llama-pro"
    assert err.rstrip().endswith(f"the output is written, whole, at {out}: the lines above say what verify found"), err
    said = {"failed": "verify failed: identity", "could not check": f"verify could not check it: {out} runs its own code",
            "full disk": "verify could not check it: cannot run the round-trip check: no space left",
            "system error": f"verify could not check it: No space left on device: {out / 'model.safetensors'}"}[how]
    assert said in err, err
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
