"""`apply`'s header planner (midus_surgery/compiler/header_plan.py) against the full planner.

For copy-only recipes on the covered architectures the plan is made from config.json and the
safetensors headers; the emitted directory must be the one the full planner (transformers, a
meta-device model) makes: same tensors, order, shards and bytes, a config that loads to the same
config object, the same companions. Everything else must fall back to the full planner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from midus_surgery.cli import main
from midus_surgery.compiler.header_plan import ARCHS, Dims, _expected_shapes, plan_from_headers
from midus_surgery.compiler.plan import base_tensor_shapes
from midus_surgery.compiler.planner import FULL_PLAN_ENV, plan_for_apply, plan_loaded
from midus_surgery.emit.emitter import emit
from midus_surgery.emit.verify import verify
from midus_surgery.io.output_dir import MARKER
from midus_surgery.io.tensor_source import checkpoint_renames
from midus_surgery.recipe.schema import load_recipe

REPO = Path(__file__).resolve().parents[1]
SLICES = "layout:\n  slices:\n    - layers: [0, 3]\n    - layers: [1, 4]\n"

# name -> (model type, config overrides, save_pretrained kwargs, dtype of the stored weights)
BASES = {
    "llama-tied": ("llama", {}, {}, torch.float32),
    "llama-untied-bias": ("llama", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True), {}, torch.float32),
    "llama-sharded-bf16": ("llama", dict(hidden_size=128, intermediate_size=256, tie_word_embeddings=False), dict(max_shard_size="100KB"), torch.bfloat16),
    "mistral": ("mistral", {}, {}, torch.float32),
    "qwen2": ("qwen2", dict(use_sliding_window=False), {}, torch.float32),
    "qwen3": ("qwen3", {}, {}, torch.float32),
    # not covered: per-layer behaviour by index, or architectures outside ARCHS
    "qwen2-sliding": ("qwen2", {}, {}, torch.float32),
    "gpt2": ("gpt2", {}, {}, torch.float32),
    "phi3": ("phi3", {}, {}, torch.float32),
}
COVERED = ["llama-tied", "llama-untied-bias", "llama-sharded-bf16", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("header-bases")
    paths = {}
    for name, (arch, overrides, save_kwargs, dtype) in BASES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).to(dtype)
        paths[name] = root / name
        model.save_pretrained(paths[name], **save_kwargs)
    # as Qwen2 checkpoints on the Hub have it: no layer_types, which the config class computes
    config = json.loads((paths["qwen2-sliding"] / "config.json").read_text())
    del config["layer_types"]
    (paths["qwen2-sliding"] / "config.json").write_text(json.dumps(config))
    return paths


def write_recipe(tmp: Path, base: Path, *, layout: str = SLICES, dtype: str = "auto", extra: str = "", shard_size: str = "1MB") -> Path:
    path = tmp / f"{base.name}.yaml"
    path.write_text(f"base:\n  path: {base}\n{layout}{extra}output:\n  dir: out/{base.name}\n  dtype: {dtype}\n  shard_size: {shard_size}\n")
    return path


def loaded_config(directory: Path) -> dict:
    data = AutoConfig.from_pretrained(directory).to_dict()
    for key in ("transformers_version", "_name_or_path"):  # where and by which version, not what
        data.pop(key, None)
    return data


def assert_same_output(fast: Path, full: Path) -> None:
    names = sorted(p.name for p in full.iterdir())
    assert sorted(p.name for p in fast.iterdir()) == names
    for name in names:
        if name.endswith((".safetensors", ".index.json")) or name in ("README.md", "generation_config.json", "midus_recipe.yaml"):
            assert (fast / name).read_bytes() == (full / name).read_bytes(), name
    assert loaded_config(fast) == loaded_config(full)
    fast_plan, full_plan = (json.loads((d / "midus_plan.json").read_text()) for d in (fast, full))
    # the plan's config is config.json's source: the full planner writes every default out
    assert AutoConfig.for_model(**fast_plan.pop("config")).to_dict() == AutoConfig.for_model(**full_plan.pop("config")).to_dict()
    assert fast_plan == full_plan


def plan_both(recipe: Path):
    fast, why = plan_for_apply(recipe)
    assert why is None and fast.planner == "headers" and fast.config is None
    full = plan_loaded(load_recipe(recipe), anatomy_only_if_needed=True)
    assert full.planner == "transformers"
    return fast, full


@pytest.mark.parametrize("name", COVERED)
def test_header_plan_writes_what_the_full_plan_writes(name, bases, tmp_path):
    recipe = write_recipe(tmp_path, bases[name])
    fast, full = plan_both(recipe)
    assert [(t.name, t.shape, t.source, t.rule) for t in fast.plan.tensors] == [(t.name, t.shape, t.source, t.rule) for t in full.plan.tensors]
    assert (fast.plan.params, fast.plan.flops_per_token, fast.plan.layer_params) == (full.plan.params, full.plan.flops_per_token, full.plan.layer_params)
    assert fast.base_dtype == full.base_dtype
    out_fast = emit(fast, out_dir=tmp_path / "fast", progress=False).out_dir
    out_full = emit(full, out_dir=tmp_path / "full", progress=False).out_dir
    assert_same_output(out_fast, out_full)
    if name == "llama-sharded-bf16":  # a sharded base in, several shards out
        assert (bases[name] / "model.safetensors.index.json").is_file()
        assert len(list(out_fast.glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("name", ["llama-untied-bias", "qwen3"])
def test_header_plan_output_verifies(name, bases, tmp_path):
    fast, _ = plan_for_apply(write_recipe(tmp_path, bases[name]))
    out = emit(fast, out_dir=tmp_path / "fast", progress=False).out_dir
    checks = verify(out, report=lambda c: None)
    assert all(c.ok for c in checks), {c.name: c.detail for c in checks if not c.ok}


def test_explicit_layer_types_are_remapped(bases, tmp_path):
    """A qwen2 config.json that lists layer_types (newer checkpoints do) keeps each layer's own kind."""
    base = tmp_path / "qwen2-types"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("qwen2", use_sliding_window=True, max_window_layers=2)).save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    assert config["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    fast, full = plan_both(write_recipe(tmp_path, base))
    full_, sliding = "full_attention", "sliding_attention"  # sources 0 1 2 | 1 2 3
    assert fast.plan.config["layer_types"] == [full_, full_, sliding, full_, sliding, sliding]
    assert AutoConfig.for_model(**fast.plan.config).to_dict() == AutoConfig.for_model(**full.plan.config).to_dict()
    assert fast.plan.flops_per_token == full.plan.flops_per_token


def why_not(recipe: Path) -> str | None:
    planned, why = plan_from_headers(load_recipe(recipe))
    assert (planned is None) == (why is not None)
    return why


@pytest.mark.parametrize("kind", ["memory", "identity"])
def test_memory_and_identity_blocks_take_the_full_plan(kind, bases, tmp_path):
    layout = f"layout:\n  interleave:\n    after_every: 2\n    kind: {kind}\n"
    memory = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n" if kind == "memory" else ""
    recipe = write_recipe(tmp_path, bases["llama-tied"], layout=layout, extra=memory)
    assert "anatomy" in why_not(recipe)
    planned, why = plan_for_apply(recipe)
    assert planned.planner == "transformers" and why and planned.anatomy is not None


@pytest.mark.parametrize("name, reason", [("gpt2", "'gpt2'"), ("phi3", "'phi3'"), ("qwen2-sliding", "sliding layers are chosen by index")])
def test_uncovered_architectures_take_the_full_plan(name, reason, bases, tmp_path):
    assert reason in why_not(write_recipe(tmp_path, bases[name]))


def test_dtype_conversion_takes_the_full_plan(bases, tmp_path):
    recipe = write_recipe(tmp_path, bases["llama-tied"], dtype="bfloat16")
    assert "conversion" in why_not(recipe)
    planned, why = plan_for_apply(recipe)
    assert planned.planner == "transformers"
    out = emit(planned, out_dir=tmp_path / "out", progress=False).out_dir
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_gguf_base_takes_the_full_plan(tmp_path):
    recipe = tmp_path / "gguf.yaml"
    recipe.write_text(f"base:\n  path: {tmp_path / 'model.gguf'}\n{SLICES}output:\n  dir: out\n")
    assert why_not(recipe) == "the base is a GGUF file"


def copy_base(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_odd_configs_and_checkpoints_take_the_full_plan(bases, tmp_path):
    base = copy_base(bases["llama-tied"], tmp_path / "base")
    recipe = write_recipe(tmp_path, base)
    assert why_not(recipe) is None

    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "first_k_dense_replace": 1}))
    assert "by layer index" in why_not(recipe)
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}}))
    assert "auto_map" in why_not(recipe)
    (base / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))  # weights say 128
    assert "shape" in why_not(recipe)
    (base / "config.json").write_text(json.dumps(config))

    # a tensor the architecture does not have (old checkpoints stored rotary inv_freq)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(base / "model.safetensors"))
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert ("the checkpoint holds 1 tensor(s) the architecture lacks, e.g. model.layers.0.self_attn.rotary_emb.inv_freq: left out of the "
            "output" in why_not(recipe))

    recipe.write_text(recipe.read_text() + "anatomy:\n  layers_path: model.layers\n  layer_class: LlamaDecoderLayer\n  attention: self_attn\n"
                      "  attn_out_proj: self_attn.o_proj\n  ffn: [mlp]\n  ffn_down_proj: mlp.down_proj\n  attn_norms: [input_layernorm]\n"
                      "  ffn_norms: [post_attention_layernorm]\n  residual: sequential\n")
    assert why_not(recipe) == "the recipe states an anatomy"


def test_full_plan_can_be_forced(bases, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, bases["llama-tied"])
    assert plan_for_apply(recipe)[0].planner == "headers"
    assert plan_for_apply(recipe, full=True)[0].planner == "transformers"
    monkeypatch.setenv(FULL_PLAN_ENV, "1")
    assert plan_for_apply(recipe)[0].planner == "transformers"


def test_a_base_config_nested_too_deeply_is_one_line(bases, tmp_path, capsys):
    """trial95 F6: the header planner read the base's config.json with bare json.loads: nested 200,000 deep it was a
    RecursionError traceback (the full planner already said it in one line)."""
    base = copy_base(bases["llama-tied"], tmp_path / "base")
    text = (base / "config.json").read_text().rstrip().removesuffix("}")
    (base / "config.json").write_text(text + ', "deep": ' + "[" * 200_000 + "]" * 200_000 + "}")
    recipe = write_recipe(tmp_path, base)
    assert "nested too deeply" in why_not(recipe)
    assert main(["apply", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config.json is nested too deeply to be a config" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_layout_error_is_one_located_message_and_writes_nothing(bases, tmp_path, capsys):
    recipe = write_recipe(tmp_path, bases["llama-tied"], layout="layout:\n  slices:\n    - layers: [0, 3]\n    - layers: [1, 9]\n")
    assert main(["apply", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:" in err and "layer 9 is out of range" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_header_plan_imports_neither_transformers_nor_torch(bases, tmp_path):
    recipe = write_recipe(tmp_path, bases["llama-sharded-bf16"])
    code = textwrap.dedent(f"""
        import sys
        from midus_surgery.cli import main
        assert main(["apply", {str(recipe)!r}, "--quiet"]) == 0
        print(sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(FULL_PLAN_ENV, None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "planned from the safetensors headers" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_the_program_reports_and_exits_cleanly_after_apply(bases, tmp_path):
    """``python -m midus_surgery.cli apply`` (the console script's path) skips the interpreter's
    teardown after success: the lines it printed must still arrive, with exit 0 and a whole
    output; a failing apply exits normally with its error."""
    recipe = write_recipe(tmp_path, bases["llama-tied"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONUNBUFFERED", None)  # a pipe's stdout is block-buffered, as for most users
    program = [sys.executable, "-m", "midus_surgery.cli", "apply", str(recipe), "--quiet"]
    ok = subprocess.run(program, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{recipe}: 4 -> 6 layers") and lines[1].startswith("wrote ")
    checks = verify(tmp_path / "out" / "llama-tied", bases["llama-tied"])
    assert checks and all(c.ok for c in checks)
    again = subprocess.run(program, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # the output exists now
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


# ----------------------------------------------------------------------------------------------
# What the header planner knows of each architecture, checked against transformers itself


@pytest.mark.parametrize("flags", [{}, dict(attention_bias=True, mlp_bias=True), dict(tie_word_embeddings=True), dict(tie_word_embeddings=False)])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_tables_match_transformers(arch, flags):
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)
    config = AutoConfig.for_model(arch, **sizes, **flags)
    data = {"model_type": arch, **flags}  # flags left out take the config class's default
    dims = Dims(config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
                config.head_dim, config.vocab_size)
    assert list(_expected_shapes(data, ARCHS[arch], dims, config.num_hidden_layers).items()) == list(base_tensor_shapes(config).items())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_covered_architectures_have_no_checkpoint_renames(arch):
    # the header plan hands the emitter no renames (Compiled.renames == ()); transformers must agree
    assert checkpoint_renames(arch) == []


def test_copy_shards_written_in_parallel_equal_one_at_a_time(bases, tmp_path, monkeypatch):
    """A copy-only output of several shards is written by two threads: the bytes are those of the one-at-a-time writer."""
    import midus_surgery.emit.emitter as emit_module

    recipe = write_recipe(tmp_path, bases["llama-sharded-bf16"], shard_size="1MB")
    planned, _ = plan_for_apply(recipe)
    calls = []
    real = emit_module._write_copy_shards_in_parallel
    monkeypatch.setattr(emit_module, "_write_copy_shards_in_parallel", lambda *a: calls.append(a[3]) or real(*a))
    parallel = emit(planned, out_dir=tmp_path / "parallel", progress=True).out_dir
    assert calls == [2]  # the parallel writer ran, with two workers
    monkeypatch.setattr(emit_module, "COPY_WORKERS", 1)
    serial = emit(planned, out_dir=tmp_path / "serial", progress=False).out_dir
    assert calls == [2]
    files = sorted(p.name for p in serial.iterdir())
    assert sorted(p.name for p in parallel.iterdir()) == files and len([f for f in files if f.startswith("model-")]) > 1
    for name in files:
        if name not in ("midus_plan.json", MARKER):  # the marker names the writing process
            assert (parallel / name).read_bytes() == (serial / name).read_bytes(), name
        assert (parallel / name).stat().st_mode == (serial / name).stat().st_mode, name


def test_a_failing_parallel_shard_leaves_no_output(bases, tmp_path, monkeypatch):
    import midus_surgery.emit.emitter as emit_module

    recipe = write_recipe(tmp_path, bases["llama-sharded-bf16"], shard_size="1MB")
    planned, _ = plan_for_apply(recipe)
    real = emit_module.write_shard

    def failing(path, items, **kw):
        if path.name.startswith("model-00002"):
            raise OSError(28, "No space left on device")
        return real(path, items, **kw)

    monkeypatch.setattr(emit_module, "write_shard", failing)
    with pytest.raises(OSError, match="No space left"):
        emit(planned, out_dir=tmp_path / "out", progress=False)
    assert list(tmp_path.glob("*out*")) == []  # neither the output nor its hidden work directory


def test_plan_says_which_planner_apply_will_use(bases, tmp_path, capsys):
    assert main(["plan", str(write_recipe(tmp_path, bases["llama-tied"]))]) == 0
    assert "apply: plans from the safetensors headers" in capsys.readouterr().out
    assert main(["plan", str(write_recipe(tmp_path, bases["gpt2"]))]) == 0
    assert "apply: plans through transformers (model type 'gpt2' is not one the header planner covers)" in capsys.readouterr().out


@pytest.mark.parametrize("base, dtype", [("llama-tied", "auto"), ("llama-tied", "bfloat16"), ("llama-sharded-bf16", "auto"),
                                         ("llama-sharded-bf16", "float16"), ("gpt2", "bfloat16")])
def test_plan_json_states_the_output_dtype(base, dtype, bases, tmp_path, capsys):
    """`plan --json`'s config and the published midus_plan.json say the dtype apply writes, not the base's (trial64)."""
    recipe = write_recipe(tmp_path, bases[base], dtype=dtype)
    assert main(["plan", str(recipe), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["config"]["dtype"]
    assert main(["apply", str(recipe)]) == 0
    out = tmp_path / "out" / base
    written = json.loads((out / "config.json").read_text())["dtype"]
    assert planned == written == json.loads((out / "midus_plan.json").read_text())["config"]["dtype"]
    assert written == {"auto": {"llama-tied": "float32", "llama-sharded-bf16": "bfloat16"}.get(base)}.get(dtype, dtype)


def test_an_absurd_layer_count_is_refused_before_the_layout_is_expanded(bases, tmp_path, capsys, monkeypatch):
    """trial99 C1: apply's header planner expanded the layout over config.json's num_hidden_layers before its
    numbers were checked: 10^9 layers were an OOM kill or a MemoryError traceback (validate refused it in one line)."""
    import midus_surgery.compiler.header_plan as header_plan

    expanded = []
    real = header_plan.expand_layout

    def expand_layout(loaded, L):
        expanded.append(L)
        assert L <= 1024, "the layout was expanded over an unchecked layer count"
        return real(loaded, L)

    monkeypatch.setattr(header_plan, "expand_layout", expand_layout)
    base = copy_base(bases["llama-tied"], tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    recipe = write_recipe(tmp_path, base)
    assert main(["apply", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "num_hidden_layers is 1000000000; it must be between 1 and 1024" in err and "config.json" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not expanded and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, sources", [
    ("layout:\n  interleave: {after: [0], kind: transformer}\n", [0, 0, 1, 2]),
    # depth pruning: base layer 2 is dropped, and with it, through the length rule, eos id 7 was
    ("allow_dropped_layers: true\nlayout:\n  layers: [{source: 0}, {source: 0, kind: copy}, {source: 1}]\n", [0, 0, 1]),
])
def test_token_id_lists_as_long_as_the_base_is_deep_are_kept(layout, sources, tmp_path, capsys):
    """A 3-layer base with Llama-3-style eos ids [2, 5, 7]: the length rule took them for one entry a layer and wrote
    [2, 2, 5, 7] (or [2, 2, 5], id 7 lost) in config.json and the generation_config.json made from it (trial106 F1).
    Both planners keep token ids as they are; a list nothing explains is still remapped, and plan says so."""
    base = tmp_path / "llama-eos"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=3, eos_token_id=[2, 5, 7], bos_token_id=1,
                                                 pad_token_id=0)).save_pretrained(base)
    (base / "generation_config.json").unlink()  # many checkpoints ship config.json only: the output's is made from config.json
    config = json.loads((base / "config.json").read_text())
    config.update(stop_token_ids=[1, 2], my_scales=[0.5, 1.0, 2.0])  # ids that read as layer indices, and a list nothing explains
    (base / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, base, layout=layout)
    fast, full = plan_both(recipe)
    for planned in (fast, full):
        assert planned.plan.config["eos_token_id"] == [2, 5, 7] and planned.plan.config["stop_token_ids"] == [1, 2]
        assert planned.plan.config["my_scales"] == [[0.5, 1.0, 2.0][s] for s in sources]  # what it holds is a guess ...
        assert planned.plan.lists_by_length == ("my_scales",)
        out = emit(planned, out_dir=tmp_path / planned.planner, progress=False).out_dir
        assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 5, 7]
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 5, 7]
    assert main(["plan", str(recipe)]) == 0
    assert "config.json's my_scales has as many entries as the base has layers" in capsys.readouterr().out  # ... said out loud
