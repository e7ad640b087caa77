"""Check the emitted MIDUS model against the tools people use on a model directory.

    python tools/ecosystem_check.py [--out docs/results/ecosystem.json]

Builds a tiny random Llama base, applies two MIDUS recipes (each Memory block with its own
latent bank, and one bank shared by all), and runs each check below on both. Every check is a
function that raises on failure; tests/test_ecosystem.py runs the same functions. Prints one row
per check and writes the rows as JSON (docs/ecosystem.md shows them).

Checks that need a second process (a fresh import, without midus-surgery) run one.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog bird fish sat ran flew swam on in mat log tree pond".split()
BANKS = ("own", "shared")


# ------------------------------------------------------------------------------------ the models

def make_base(path: Path) -> Path:
    """A tiny random Llama (4 layers, hidden 32) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, ".": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                         eos_token_id=1, pad_token_id=2, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_models(root: Path) -> dict[str, Path]:
    """``{"own": dir, "shared": dir}``: MIDUS outputs of a tiny base, Memory blocks after every 2 layers."""
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import emit

    base = make_base(root / "base")
    out = {}
    for bank in BANKS:
        recipe = root / f"{bank}.yaml"
        recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: memory\n"
                          f"memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n  share_bank: {str(bank == 'shared').lower()}\n"
                          f"output:\n  dir: {bank}-out\n  dtype: float32\n")
        out[bank] = emit(plan_recipe(recipe), progress=False).out_dir
    return out


def load(model_dir: Path, auto: str = "AutoModelForCausalLM", **kwargs):
    import transformers

    import midus_surgery  # noqa: F401 - registers the MIDUS classes (pyflakes: used for its effect)

    return getattr(transformers, auto).from_pretrained(model_dir, **kwargs).eval()


IDS = torch.tensor([[4, 5, 9, 4, 12, 17, 4, 6, 10, 3, 4, 7]])  # [1, 12]: "the cat sat the on mat ..."


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def fresh_python(script: str, *args: str, package: bool) -> str:
    """Run ``script`` in a new interpreter (with or without midus-surgery importable); its stdout."""
    prelude = "import sys\n" + ("" if package else "sys.modules['midus_surgery'] = None  # only the copied modeling files\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"the fresh process failed: {proc.stderr.strip()[-1500:]}")
    return proc.stdout


# ------------------------------------------------------------------------------------ the checks

RESAVE = """
    import shutil, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from peft import LoraConfig, get_peft_model
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    ids = torch.tensor([[4, 5, 9, 4, 12, 17, 4, 6, 10, 3, 4, 7]])
    def fresh():
        return AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True)
    def keep(model, name):
        model.eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, out / f"{name}.logits.pt")
    m = fresh(); m.save_pretrained(out / "plain"); keep(m, "plain")
    p = get_peft_model(fresh(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False))
    merged = p.merge_and_unload(); merged.save_pretrained(out / "peft-merged"); keep(merged, "peft-merged")
    m = fresh()
    data = [{"input_ids": ids[0], "labels": ids[0]} for _ in range(8)]
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=2, per_device_train_batch_size=4, save_steps=2,
                             report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    trainer = Trainer(model=m, args=args, train_dataset=data)
    trainer.train(); trainer.save_model(str(out / "trainer-final")); keep(m, "trainer-final")
    shutil.copy(out / "trainer-final.logits.pt", out / "trainer-checkpoint.logits.pt")
    print(type(m).__module__)
"""

RELOAD = """
    import torch, json
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    out = Path(sys.argv[1])
    ids = torch.tensor([[4, 5, 9, 4, 12, 17, 4, 6, 10, 3, 4, 7]])
    for name, d in (("plain", "plain"), ("peft-merged", "peft-merged"), ("trainer-final", "trainer-final"),
                    ("trainer-checkpoint", "trainer/checkpoint-2")):
        m = AutoModelForCausalLM.from_pretrained(out / d, trust_remote_code=True).eval()
        with torch.no_grad():
            same = torch.equal(m(input_ids=ids).logits, torch.load(out / f"{name}.logits.pt"))
        carried = (out / d / "midus_plan.json").is_file()
        print(json.dumps({"saved": name, "same_logits": same, "plan_carried": carried, "module": type(m).__module__}))
"""

RESAVED = ("plain", "peft-merged", "trainer-final", "trainer-checkpoint")


def check_resave_round_trips(model_dir: Path) -> str:
    """save_pretrained from a model loaded without the package (plain, after a PEFT merge, by
    transformers.Trainer: save_model and its checkpoint) loads in a fresh process without the
    package, with the same logits and midus_plan.json carried."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_python(RESAVE, str(model_dir), tmp, package=False)
        rows = [json.loads(line) for line in fresh_python(RELOAD, tmp, package=False).splitlines() if line.startswith("{")]
    assert [r["saved"] for r in rows] == list(RESAVED), rows
    for r in rows:
        assert r["same_logits"], f"{r['saved']}: other logits after the round trip"
        assert r["plan_carried"], f"{r['saved']}: midus_plan.json was not carried"
        assert r["module"].startswith("transformers_modules"), r["module"]
    return "plain, PEFT-merged, Trainer save_model and checkpoint: same logits, plan carried"


def check_resave_with_the_package(model_dir: Path) -> str:
    """Loaded through the package's registration (no trust_remote_code), a save still writes the
    modeling files and a config that names the public classes: it loads without the package."""
    from midus_surgery.model.midus_names import AUTO_MAP, MODELING_FILES, PLAN_FILE

    model = load(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config = json.loads((Path(tmp) / "config.json").read_text())
        assert config["auto_map"] == AUTO_MAP and config["architectures"] == ["MidusForCausalLM"], config
        assert all((Path(tmp) / f).is_file() for f in (*MODELING_FILES, PLAN_FILE))
        torch.save(logits(model), Path(tmp) / "ref.pt")
        same = fresh_python("""
            import torch
            from transformers import AutoModelForCausalLM
            m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
            with torch.no_grad():
                print(torch.equal(m(input_ids=torch.tensor([[4, 5, 9, 4, 12, 17, 4, 6, 10, 3, 4, 7]])).logits, torch.load(sys.argv[1] + "/ref.pt")))
        """, tmp, package=False)
    assert same.strip() == "True"
    return "config names the public classes; modeling files and plan written"


def check_copies(model_dir: Path) -> str:
    """copy.deepcopy, pickle and torch.save(model) give a model with the same logits; a pickle
    loads in a fresh process (with the package: pickle finds classes by module name)."""
    model = load(model_dir)
    ref = logits(model)
    assert torch.equal(logits(copy.deepcopy(model)), ref), "deepcopy"
    assert torch.equal(logits(pickle.loads(pickle.dumps(model))), ref), "pickle"
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(logits(torch.load(buf, weights_only=False)), ref), "torch.save"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "model.pkl").write_bytes(pickle.dumps(model))
        torch.save(ref, Path(tmp) / "ref.pt")
        same = fresh_python("""
            import pickle, torch
            m = pickle.loads(open(sys.argv[1] + "/model.pkl", "rb").read())
            with torch.no_grad():
                print(type(m).__name__, torch.equal(m(input_ids=torch.tensor([[4, 5, 9, 4, 12, 17, 4, 6, 10, 3, 4, 7]])).logits, torch.load(sys.argv[1] + "/ref.pt")))
        """, tmp, package=True)
    assert same.split() == [type(model).__name__, "True"], same
    return "deepcopy, pickle, torch.save: same logits; unpickled in a fresh process"


MIDUS_MODULE = "midus_surgery.model.modeling_midus"  # where the MIDUS classes live: what a PEFT adapter of one records
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_a_few_steps(model, steps: int = 5) -> list[float]:
    """AdamW on the model's trainable parameters over IDS; the loss must fall. Leaves the model in eval mode; the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    return losses


def check_lora_usual_names(model_dir: Path) -> str:
    """LoRA on the usual seven projection names applies (a Memory block's tap is not an o_proj to
    PEFT), trains with the memory tables, saves adapter-only with the memory as modules_to_save and
    reloads the same, and merges into the same function. (The memory trains
    too: a Memory block's attention reaches the output only through the memory's readout, zero
    until trained, so with the memory frozen its adapters get no gradient.)"""
    import tempfile

    from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model

    from midus_surgery.model.midus_names import HML_MODULE, SHARED_BANK, is_memory_parameter

    torch.manual_seed(0)
    base = load(model_dir)
    # the memory trains beside the adapters and is saved with them: an adapter-only save drops what is not in
    # modules_to_save (trial36: the trained memory was lost on reload). Not with a shared bank: PEFT's copy of each
    # memory layer would carry a copy of the one bank they share (no longer shared), so it trains in place and
    # travels in a merged save.
    shared = hasattr(base, SHARED_BANK)
    keep = None if shared else [HML_MODULE]
    model = get_peft_model(base, LoraConfig(r=4, target_modules=SEVEN, lora_dropout=0.0, modules_to_save=keep))
    for name, p in model.named_parameters():  # PEFT trains the modules_to_save copies; the originals stay as they are
        p.requires_grad_(p.requires_grad or (is_memory_parameter(name) and ".original_module." not in name))
    names = [n for n, _ in model.named_modules()]
    taps = [n for n in names if n.endswith("self_attn.midus_o_proj")]
    assert taps and not any(n.startswith(t + ".") for t in taps for n in names), "a tap was adapted"
    adapted = {n.rsplit(".", 2)[-2] for n in names if n.endswith(".lora_A")}
    assert adapted == set(SEVEN), adapted
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    losses = train_a_few_steps(model)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable)), "a parameter did not train"
    adapted_logits = logits(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the adapters and the modules_to_save: what PEFT saves by default
        reloaded = PeftModel.from_pretrained(load(model_dir), tmp).eval()
        same = torch.allclose(logits(reloaded), adapted_logits, rtol=1e-5, atol=1e-5)
        # PEFT's one-call reload: the adapter records the base's class by module, and PEFT imports only the modules
        # it is told to (trial55: without the allowlist it refuses the MIDUS module)
        try:
            AutoPeftModelForCausalLM.from_pretrained(tmp)
            allowlist = "not needed"
        except ValueError as exc:
            assert "allowlist" in str(exc), exc
            allowlist = "needs import_allowlist=[the MIDUS module]"
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp, import_allowlist=[MIDUS_MODULE]).eval()
        auto_same = torch.allclose(logits(auto), adapted_logits, rtol=1e-5, atol=1e-5)
    assert auto_same == same, "AutoPeftModelForCausalLM reloads another model than PeftModel.from_pretrained"
    assert same != shared, "an adapter-only save kept the memory without modules_to_save" if shared else "an adapter-only save lost the memory"
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), adapted_logits, rtol=1e-5, atol=1e-5)
    n_adapters = sum(n.endswith(".lora_A") for n in names)
    saved = ("the memory (a shared bank) trains in place, so an adapter-only save reloads without it (save merged)" if shared else
             f"an adapter-only save with modules_to_save=['{HML_MODULE}'] reloads the same, with PeftModel.from_pretrained and with "
             f"AutoPeftModelForCausalLM ({allowlist})")
    return f"{n_adapters} adapters on the 7 names, taps skipped; loss {losses[0]:.3f} -> {losses[-1]:.3f}; {saved}; merged = adapted"


def check_lora_memory_projection(model_dir: Path) -> str:
    """LoRA into the memory itself: PEFT's ``target_parameters`` on HIVE's per-head projection ``proj`` (a 3-D
    parameter, no module: ``target_modules`` cannot name it, nor the bank or the keys). The adapters start as a no-op,
    train, merge to the same function, and the merged save reloads the same (trial144 F8)."""
    import tempfile

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load(model_dir)
    start = logits(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=[], target_parameters=["proj"], lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    memory_layers = {n.split(".lora_")[0] for n in trainable}
    assert trainable and all(".hml.lora_" in n for n in trainable), trainable
    assert torch.equal(logits(model), start), "the adapters are not a no-op at the start"
    train_a_few_steps(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, start), "the adapters did not change the model"
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        torch.testing.assert_close(logits(load(Path(tmp))), adapted, rtol=1e-5, atol=1e-5)
    return f"{len(memory_layers)} memory layers adapted through proj; trained, merged and reloaded the same"


def check_task_heads(model_dir: Path) -> str:
    """AutoModelForSequenceClassification / TokenClassification build the base's head over the
    MIDUS body (the same hidden states as the causal LM's body); a head transformers lacks for
    the base is refused with one line naming those it has."""
    lm = load(model_dir)
    with torch.no_grad():
        body = lm.model(input_ids=IDS).last_hidden_state
    for auto, shape in (("AutoModelForSequenceClassification", (1, 3)), ("AutoModelForTokenClassification", (1, 12, 3))):
        head = load(model_dir, auto, num_labels=3)
        with torch.no_grad():
            assert torch.equal(head.model(input_ids=IDS).last_hidden_state, body), auto
            assert tuple(head(input_ids=IDS).logits.shape) == shape, auto
    try:
        load(model_dir, "AutoModelForQuestionAnswering")
    except ValueError as exc:
        assert str(exc) == ("a MIDUS model of 'llama' cannot load as question answering: LlamaForQuestionAnswering names its body "
                            "'transformer' where the causal LM's is 'model', so the weights would not load; it loads as causal LM, "
                            "sequence classification, token classification"), exc
    else:
        raise AssertionError("LlamaForQuestionAnswering (body 'transformer') was not refused")
    return "sequence and token classification: same body; question answering (body named 'transformer') refused in one line"


def check_generation(model_dir: Path) -> str:
    """generate: greedy with and without the KV cache, a static cache, beam search, sampling from a
    seed; the text-generation pipeline with the tokenizer."""
    from transformers import AutoTokenizer, pipeline

    model = load(model_dir)
    kw = dict(max_new_tokens=6, pad_token_id=2)
    greedy = model.generate(IDS, do_sample=False, **kw)
    assert torch.equal(model.generate(IDS, do_sample=False, use_cache=False, **kw), greedy), "cache"
    assert torch.equal(model.generate(IDS, do_sample=False, cache_implementation="static", **kw), greedy), "static cache"
    assert model.generate(IDS, num_beams=3, do_sample=False, **kw).shape == greedy.shape
    torch.manual_seed(0)
    a = model.generate(IDS, do_sample=True, top_k=5, **kw)
    torch.manual_seed(0)
    assert torch.equal(model.generate(IDS, do_sample=True, top_k=5, **kw), a), "sampling from a seed"
    errors: list[str] = []
    catch = logging.Handler(logging.ERROR)
    catch.emit = lambda record: errors.append(record.getMessage())
    logger = logging.getLogger("transformers.pipelines.base")  # where "The model ... is not supported for ..." goes
    logger.addHandler(catch)
    try:
        text = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(model_dir))("the cat sat", max_new_tokens=4,
                                                                                                            do_sample=False)
    finally:
        logger.removeHandler(catch)
    assert text[0]["generated_text"].startswith("the cat sat")
    assert not errors, f"the pipeline logged an error: {errors[0][:100]}"
    return "greedy = no-cache = static cache; beam search; seeded sampling; pipeline"


def check_attention_and_checkpointing(model_dir: Path) -> str:
    """eager and sdpa attention give the same logits; gradient checkpointing the same gradients."""
    eager, sdpa = load(model_dir, attn_implementation="eager"), load(model_dir, attn_implementation="sdpa")
    torch.testing.assert_close(logits(sdpa), logits(eager), rtol=1e-5, atol=1e-5)
    grads = []
    for checkpointing in (False, True):
        model = load(model_dir).train()
        if checkpointing:  # by its current name; gradient_checkpointing_enable before transformers renamed it
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    return "eager = sdpa; checkpointed gradients equal"


def check_compile(model_dir: Path) -> str:
    """torch.compile traces the whole model (loss included) into one graph with no break, and the
    compiled model (aot_eager: the graph without inductor's minutes of C++ here) gives the eager logits."""
    from midus_surgery.model.hml import prepare_kernels

    model = load(model_dir)
    prepare_kernels(model, "cpu")  # as the trainer does: the memory layer's backend answered before tracing
    model.config.use_cache = False  # as the trainer sets it before compiling: a set config key must not break the graph
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(IDS)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:3]
    torch._dynamo.reset()
    torch.testing.assert_close(logits(torch.compile(model, backend="aot_eager")), logits(model), rtol=1e-5, atol=1e-5)
    return "one graph, no break; compiled = eager"


def check_dynamic_quantisation(model_dir: Path) -> str:
    """torch.ao.quantization.quantize_dynamic (it deep-copies the model) runs, close to fp32."""
    import warnings

    model = load(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantised = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    ref, q = logits(model), logits(quantised)
    assert q.shape == ref.shape and torch.isfinite(q).all()
    agree = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return f"int8 dynamic: top-1 agrees on {agree:.0%} of positions"


def check_offload(model_dir: Path) -> str:
    """accelerate's offload (a device_map sending the Memory blocks and a shared bank to disk, as
    device_map="auto" does past max_memory): the same logits as in memory, in float32 and bfloat16.
    The latent bank was read as an attribute, which the offload hooks never load: it stayed on the
    meta device, and the logits were garbage without an error (trial51)."""
    import json
    import tempfile

    config = json.loads((model_dir / "config.json").read_text())
    memory = {f"model.layers.{i}" for i in config["midus"]["memory_blocks"]}
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if f"model.layers.{i}" in memory else "cpu" for i in range(config["num_hidden_layers"])}}
    if config["midus"].get("share_bank"):
        device_map["midus_shared_bank"] = "disk"
    for dtype in (torch.float32, torch.bfloat16):
        with tempfile.TemporaryDirectory() as offload:
            offloaded = load(model_dir, dtype=dtype, device_map=device_map, offload_folder=offload)
            assert {k for k, v in offloaded.hf_device_map.items() if v == "disk"} >= memory
            assert torch.equal(logits(offloaded), logits(load(model_dir, dtype=dtype))), dtype
    return f"{len(memory)} Memory blocks{' and the shared bank' if config['midus'].get('share_bank') else ''} on disk: the same logits, fp32 and bf16"


CHECKS = {
    "re-save round trips, fresh process, no package": check_resave_round_trips,
    "re-save with the package imported": check_resave_with_the_package,
    "deepcopy / pickle / torch.save": check_copies,
    "PEFT LoRA, the usual 7 projection names": check_lora_usual_names,
    "PEFT LoRA into the memory (target_parameters)": check_lora_memory_projection,
    "task heads": check_task_heads,
    "generation and pipeline": check_generation,
    "eager / sdpa, gradient checkpointing": check_attention_and_checkpointing,
    "torch.compile": check_compile,
    "dynamic int8 quantisation": check_dynamic_quantisation,
    "accelerate offload to disk": check_offload,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "ecosystem.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import peft
    import transformers

    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp))
        for name, check in CHECKS.items():
            for bank in BANKS:
                start = time.perf_counter()
                try:
                    detail, ok = check(models[bank]), True
                except Exception as exc:  # noqa: BLE001 - a failed check is a row
                    detail, ok = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", False
                failed += not ok
                rows.append({"check": name, "bank": bank, "ok": ok, "detail": detail, "seconds": round(time.perf_counter() - start, 1)})
                print(f"{'PASS' if ok else 'FAIL'}  {name} [{bank} bank]: {detail}", flush=True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"versions": versions, "rows": rows}, indent=1) + "\n")
    print(f"{len(rows) - failed}/{len(rows)} passed ({', '.join(f'{k} {v}' for k, v in versions.items())}); wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
