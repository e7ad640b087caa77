"""`midus-surgery analyze`: what the memory of a MIDUS model learned, on held-out text.

- **Head importance**: for every Memory block and head, the change in held-out loss when that
  head's memory read is zeroed (each memory head alone). For a model without memory blocks
  (LLaMA-Pro, DUS outputs), the same for the attention heads of the inserted blocks: that head's
  slice of the attention output projection's input zeroed.
- **Slot usage**: per Memory block and head, over the held-out tokens: the fraction of slots
  selected at least once, the entropy of the selection distribution over the slots as a fraction
  of a uniform selection's (1.0: every slot equally often), the share of selections that go to
  the most used 1% of slots, and the mean norm over tokens of the memory's output (what the block
  adds to the residual stream) over the mean norm of the residual stream entering the block (a
  ratio of means, not a mean of per-token ratios).
- **Fixed retrieval** (``fixed_retrieval``): the held-out loss, on the same blocks, of a model
  trained like this one but with ``memory.retrieval: frozen`` (the Memory blocks' query path and
  sub-keys held, only the values trained: the slots stay as at the start only in blocks nothing
  trains below), against this model's learned retrieval.

Writes ``analysis.json`` and two PNGs (``head_importance.png``, a blocks x heads heatmap;
``slot_usage.png``, each block's slot-use counts, sorted) into an output directory that appears
whole. The held-out blocks are packed as `eval --data` packs them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from midus_surgery.downstream.harness import TaskError
from midus_surgery.errors import one_line, printable
from midus_surgery.io.json_text import loads_checked, strict_json
from midus_surgery.io.small_files import read_small_text
from midus_surgery.train.config import DIR_GLOB

ANALYSIS_KIND = "analysis"  # the output_dir marker
NO_OWN_CODE = "eval --trust-remote-code runs it; analyze never runs a model's own code"  # and has no flag to allow it: a MIDUS output needs none
DEFAULT_ANALYSIS_BLOCK = 256  # tokens per block unless told (fewer when the model has fewer positions)


def _memory_layers(model) -> dict[int, torch.nn.Module]:
    """Output layer index -> its HeadwiseMemory, for every Memory block."""
    from midus_surgery.model.hml import HeadwiseMemory

    midus = getattr(model.config, "midus", None) or {}
    if not midus.get("memory_layers"):
        return {}
    layers_of = {}
    for name, module in model.named_modules():
        if isinstance(module, HeadwiseMemory):
            index = next(int(p) for p in name.split(".") if p.isdigit())
            layers_of[index] = module
    return dict(sorted(layers_of.items()))


def _inserted_attention(model, plan: dict | None, model_dir: Path) -> dict[int, tuple[torch.nn.Module, int]]:
    """Output layer index -> (its attention output projection, heads) for every inserted block of a
    model without memory (a DUS or LLaMA-Pro output's midus_plan.json says which)."""
    from midus_surgery.compiler.plan import PLAN_FILE, inserted_attention_out_projs

    if not plan:
        return {}
    layers_path = plan.get("layers_path") or (plan.get("anatomy") or {}).get("layers_path")
    if not isinstance(layers_path, str):  # an edited or foreign plan (trial83 F4)
        raise TaskError(f"{model_dir / PLAN_FILE}: not a readable plan (it names no layers_path, where the model's layers are)")
    try:
        layers = model.get_submodule(layers_path)
        heads = model.config.num_attention_heads
        return {index: (layers[index].get_submodule(path), heads) for index, path in inserted_attention_out_projs(plan, model.config).items()}
    except (AttributeError, TypeError, KeyError, IndexError, ValueError, OverflowError) as exc:  # an edited or foreign plan (trial83 F4)
        raise TaskError(f"{model_dir / PLAN_FILE}: does not describe this model's layers (layers_path {layers_path!r}: "
                        f"{one_line(exc, 200)})") from None


class SlotCounter:
    """Counts, per head, how often each slot is selected, and sums the memory's and the residual
    stream's norms: one per Memory block, fed by the layer's observer and two hooks."""

    def __init__(self, heads: int, slots: int):
        self.counts = torch.zeros(heads, slots, dtype=torch.float64)
        self.memory_norm = self.residual_norm = 0.0
        self.tokens = 0

    def observe(self, w: torch.Tensor, slots: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        H = slots.shape[0]
        flat = slots.reshape(H, -1).long().cpu()  # [H, T*k]
        self.counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
        return m

    def summary(self) -> dict:
        counts = self.counts
        n = counts.shape[1]
        total = counts.sum(1, keepdim=True).clamp_min(1)
        p = counts / total
        entropy = -(p * p.clamp_min(1e-300).log()).sum(1) / math.log(n)
        top = max(1, math.ceil(0.01 * n))
        top_share = counts.sort(1, descending=True).values[:, :top].sum(1) / total.squeeze(1)
        return {
            "slots": n,
            "used_fraction": (counts > 0).double().mean(1).tolist(),
            "entropy_vs_uniform": entropy.tolist(),
            "top1pct_share": top_share.tolist(),
            "memory_to_residual_norm": self.memory_norm / max(1, self.tokens) / max(1e-30, self.residual_norm / max(1, self.tokens)),
        }


@contextmanager
def _watching(layers: dict, counters: dict, model) -> Iterable[None]:
    """Each Memory block's observer counts slots; hooks sum the memory's output norm and the
    residual stream's norm at the block's input."""
    anatomy_layers = _decoder_layers(model) if layers else None
    handles = []
    for index, hml in layers.items():
        counter = counters[index]
        hml.observer = counter.observe

        def out_hook(_module, _args, output, counter=counter):
            counter.memory_norm += output.detach().float().norm(dim=-1).sum().item()

        def in_hook(_module, args, kwargs, counter=counter):
            hidden = args[0] if args else kwargs["hidden_states"]
            counter.residual_norm += hidden.detach().float().norm(dim=-1).sum().item()
            counter.tokens += hidden.shape[:-1].numel()

        handles.append(hml.register_forward_hook(out_hook))
        handles.append(anatomy_layers[index].register_forward_pre_hook(in_hook, with_kwargs=True))
    try:
        yield
    finally:
        for hml in layers.values():
            hml.observer = None
        for h in handles:
            h.remove()


def _decoder_layers(model):
    from midus_surgery.model.modeling_midus import memory_blocks

    return model.get_submodule(next(iter(memory_blocks(model.config).values()))[0]["layers_path"])


@contextmanager
def _memory_head_zeroed(hml, head: int):
    def observer(w, slots, m):
        m = m.clone()
        m[head] = 0
        return m

    hml.observer = observer
    try:
        yield
    finally:
        hml.observer = None


@contextmanager
def _attention_head_zeroed(out_proj, heads: int, head: int):
    def pre_hook(_module, args):
        x = args[0].clone()  # [..., heads * head_dim]
        width = x.shape[-1] // heads
        x[..., head * width:(head + 1) * width] = 0
        return (x,)

    handle = out_proj.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


# What must agree between a model and its --fixed-retrieval twin (midus_plan.json): the same recipe applied to the same base
SAME_MODEL_KEYS = ("model_type", "layers", "midus", "config")


def _train_summary(folder: Path) -> dict | None:
    """A training export's midus_train.json as a dict (its ``config`` a dict too); None when there is none;
    ValueError, in words, when it does not read as one."""

    path = Path(folder) / "midus_train.json"
    if not (path.exists() or path.is_symlink()):
        return None
    if not path.is_file():  # a dangling link or a folder says the folder was trained as little as broken JSON does (trial137 F4)
        raise ValueError(f"unreadable midus_train.json ({'a link to nothing' if not path.exists() else 'not a regular file'})")
    try:
        summary = loads_checked(read_small_text(path))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"unreadable midus_train.json ({type(exc).__name__})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("config", {}), dict):
        raise ValueError("unreadable midus_train.json (not a JSON object with a config object)")
    return summary


def check_fixed_retrieval(model_dir: Path, twin: Path) -> list[str]:
    """TaskError, one line, unless ``twin`` is what --fixed-retrieval asks for: the same up-scaled model as ``model_dir``
    (the same plan: base, layer map, memory, and the same starting weights: midus_train.json's init_weights_sha256)
    exported by a training run with ``memory.retrieval: frozen``, and ``model_dir`` another folder not trained so.
    Checked from the two folders' JSON (and an untrained ``model_dir``'s weight files) before any work. Returns notes (the two runs' budgets differ: a comparison of unequal runs)."""
    from midus_surgery.compiler.plan import read_plan_file

    if Path(twin).resolve() == Path(model_dir).resolve():
        raise TaskError(f"--fixed-retrieval {printable(str(twin))}: the model analysed itself; pass the learned run's export as "
                        "MODEL_DIR and the frozen run's as --fixed-retrieval")
    mine, theirs = read_plan_file(model_dir), read_plan_file(twin)
    if theirs is None or not theirs.get("midus"):
        raise TaskError(f"--fixed-retrieval {twin}: not a MIDUS model (no midus_plan.json with Memory blocks)")
    if mine is not None:
        differ = [k for k in SAME_MODEL_KEYS if mine.get(k) != theirs.get(k)]
        if differ:
            raise TaskError(f"--fixed-retrieval {twin}: not the same model as {model_dir} (their midus_plan.json differ in "
                            f"{', '.join(differ)}): pass an export of a run trained from the same apply output")
    try:
        summary = _train_summary(twin)
    except ValueError as exc:
        raise TaskError(f"--fixed-retrieval {twin}: {exc}") from None
    memory = summary.get("config", {}).get("memory", {}) if summary else {}
    retrieval = memory.get("retrieval") if isinstance(memory, dict) else None
    if retrieval != "frozen":
        said = "no midus_train.json: not a training run's export" if summary is None else f"trained with memory.retrieval: {retrieval}"
        raise TaskError(f"--fixed-retrieval {twin}: {said}; it must be the export of a run with memory.retrieval: frozen")
    try:
        own = _train_summary(model_dir)
    except ValueError as exc:  # it says whether MODEL_DIR trained and from what: unread, it was taken for untrained
        raise TaskError(f"{printable(str(model_dir))}: {exc}: --fixed-retrieval cannot tell what it was trained from") from None
    # the analysed model is the learned side: a frozen run there (the two arguments swapped) was reported as "learned"
    own_memory = own.get("config", {}).get("memory", {}) if own else {}
    if isinstance(own_memory, dict) and own_memory.get("retrieval") == "frozen":
        raise TaskError(f"{printable(str(model_dir))} was trained with memory.retrieval: frozen: it is not the learned retrieval "
                        "--fixed-retrieval is compared with; pass the learned run's export as MODEL_DIR")
    # the plans read alike for two apply outputs of one recipe at other seeds (other sub-keys and bank): the weights each run
    # started from tell them apart (an untrained MODEL_DIR is its own start)
    from midus_surgery.train.checkpoint import weights_sha256

    theirs_start = summary.get("init_weights_sha256")
    mine_start = own.get("init_weights_sha256") if own else weights_sha256(model_dir)
    if isinstance(theirs_start, str) and isinstance(mine_start, str) and theirs_start != mine_start:
        mine_from = f"trained from {printable(str(own.get('init_from')))}" if own else "untrained"
        raise TaskError(f"--fixed-retrieval {printable(str(twin))}: trained from {printable(str(summary.get('init_from')))}, whose weight "
                        f"files differ from those {printable(str(model_dir))} ({mine_from}) started from (the digest is over the files: "
                        "the same tensors re-sharded or re-saved differ too): not the same start; pass an export of a run trained from "
                        "the same apply output")
    notes = []
    if not (isinstance(theirs_start, str) and isinstance(mine_start, str)):
        notes.append(f"note: --fixed-retrieval {printable(str(twin))} and {printable(str(model_dir))}: a midus_train.json records no digest "
                     "of the weights its run started from (an earlier midus-surgery wrote it, or the checkpoint its run resumed from), so whether both started from the "
                     "same apply output is not checked")
    # the budget is in tokens (training.md): the same tokens in other steps is another batch size, not another budget (trial98 F4)
    twin, model_dir = printable(str(twin)), printable(str(model_dir))
    theirs_said = f"{summary.get('tokens')} tokens in {summary.get('steps')} steps"
    if own is None:
        return [*notes, f"note: --fixed-retrieval {twin} trained {theirs_said}; {model_dir} is untrained: the two are not the same budget"]
    if own.get("tokens") != summary.get("tokens"):
        return [*notes, f"note: --fixed-retrieval {twin} trained {theirs_said}; {model_dir}: {own.get('tokens')} tokens in {own.get('steps')} "
                "steps: the two are not the same budget"]
    if own.get("steps") != summary.get("steps"):
        return [*notes, f"note: --fixed-retrieval {twin} and {model_dir} trained the same {summary.get('tokens')} tokens, in {summary.get('steps')} "
                f"and {own.get('steps')} steps: another batch size, so the two are not compared step for step"]
    return notes


def run_analysis(model_dir: Path, data: list[str], out: Path, *, block_size: int | None = None, max_blocks: int = 16,
                 max_memory_blocks: int | None = None, batch_size: int = 4, device: str = "auto", dtype: str = "float32",
                 progress: bool = True, threads: int | None = None, fixed_retrieval: Path | None = None,
                 importance: bool = True, text_field: str = "text", cache_dir: str | None = None, allow_pickle: bool = False,
                 overwrite: bool = False) -> dict:
    """Analyse ``model_dir`` on ``data``; writes ``out`` (analysis.json and the PNGs) and returns the JSON. An earlier
    analysis in ``out`` is replaced only with ``overwrite``, as apply's output is (it was replaced without a word, another
    model's too: trial82 F3)."""
    from midus_surgery.compiler.plan import read_plan_file
    from midus_surgery.io.output_dir import atomic_directory, check_output_dir, data_folder, input_root
    from midus_surgery.io.progress import progress_bar
    from midus_surgery.train import data as D
    from midus_surgery.train.evaluate import (
        DTYPES,
        block_batches,
        check_finite_weights,
        check_model_dir,
        check_model_loads,
        check_vocabulary,
        context_problem,
        eval_device,
        evaluate_batches,
        load_causal_lm,
        position_limit,
    )

    if threads:
        torch.set_num_threads(threads)
    model_dir = check_model_dir(model_dir, how_to_allow=NO_OWN_CODE, allow_pickle=allow_pickle)
    notes = []
    if fixed_retrieval is not None:
        check_model_dir(fixed_retrieval, how_to_allow=NO_OWN_CODE, allow_pickle=allow_pickle)
        notes = check_fixed_retrieval(model_dir, Path(fixed_retrieval))
    inputs = [("the model", model_dir), *((f"data ({p})", input_root(p)) for p in data)]
    if fixed_retrieval is not None:
        inputs.append(("the fixed-retrieval model", Path(fixed_retrieval)))
    # as eval's: never into the model or the data's folders (trial39, trial40)
    cache = D.token_cache_location(Path(cache_dir) if cache_dir else None, inputs=inputs,
                                 data_folders=[(f"the data folder of {p}", data_folder(p)) for p in data])
    # the token cache is an input too: a cache inside the output was tokenised into it, and the finished analysis then
    # found its folder "changed since this run checked it" (trial73 F7)
    out = check_output_dir(out, kind=ANALYSIS_KIND, inputs=[*inputs, ("the token cache (--cache-dir)", cache)], overwrite=overwrite)
    if dtype not in DTYPES:
        raise TaskError(f"--dtype must be one of {', '.join(DTYPES)}")
    run_on = eval_device(device)
    # what needs no data is refused before the corpus is tokenised into the cache, as eval does (trial99 L1)
    tokenizer = check_model_loads(model_dir, block_size=block_size, allow_pickle=allow_pickle, how_to_allow=NO_OWN_CODE)
    model = load_causal_lm(model_dir, dtype=DTYPES[dtype], progress=progress, how_to_allow=NO_OWN_CODE, allow_pickle=allow_pickle,
                           headers_checked=True).to(run_on).eval()
    # NaN weights gave slot statistics of NaN scores (every token in one slot) and a nan loss, exit 0: refused before
    # the data is read, as train refuses such an init_from (trial99 W2)
    check_finite_weights(model, model_dir, dtype)
    stream = D.prepare_corpus(list(data), Path.cwd(), tokenizer, dir_glob=DIR_GLOB,
                              text_field=text_field, cache_dir=cache, progress=progress, what="analysis data",
                              tokenizer_source=str(model_dir))
    if nul := D.nul_note(stream):
        notes.append(f"note: {nul}")
    check_vocabulary(stream, model, model_dir)
    if block_size is None:  # 256, or the model's positions when it has fewer
        block_size = min(DEFAULT_ANALYSIS_BLOCK, (position_limit(model) or (DEFAULT_ANALYSIS_BLOCK, ""))[0])
    too_long = context_problem(model, block_size)
    if too_long:
        raise TaskError(f"--block-size: {too_long}")
    blocks, _ = D.split(stream, None, block_size, 0.0, what="analysis data", block_option="--block-size")
    memory = _memory_layers(model)
    attention = {} if memory else _inserted_attention(model, read_plan_file(model_dir), model_dir)
    if not memory and not attention:
        raise TaskError(f"{model_dir}: no Memory block and no inserted block (midus_plan.json) to analyse")
    if not importance and not memory:
        raise TaskError(f"{model_dir}: slot usage only, but the model has no Memory block")
    chosen = list(memory or attention)[:max_memory_blocks] if max_memory_blocks else list(memory or attention)

    def loss() -> float:
        return evaluate_batches(model, block_batches(blocks, batch_size, max_blocks=max_blocks), device=run_on).loss

    counters = {i: SlotCounter(memory[i].num_heads, memory[i].config.n_subkeys ** 2) for i in chosen} if memory else {}
    with torch.no_grad(), _watching({i: memory[i] for i in counters}, counters, model):
        base_loss = loss()
    heads = {i: (memory[i].num_heads if memory else attention[i][1]) for i in chosen if importance}
    importance = {}
    with progress_bar(sum(heads.values()), "head importance", enabled=progress and bool(heads), unit="head") as bar, torch.no_grad():
        for i in heads:
            row = []
            for h in range(heads[i]):
                zeroed = _memory_head_zeroed(memory[i], h) if memory else _attention_head_zeroed(attention[i][0], heads[i], h)
                with zeroed:
                    row.append(loss() - base_loss)
                bar.update(1)
            importance[i] = row
    fixed = None
    if fixed_retrieval is not None:
        del model
        model = load_causal_lm(Path(fixed_retrieval), dtype=DTYPES[dtype], progress=progress, how_to_allow=NO_OWN_CODE,
                               allow_pickle=allow_pickle).to(run_on).eval()
        check_finite_weights(model, Path(fixed_retrieval), dtype)
        if not _memory_layers(model):
            raise TaskError(f"--fixed-retrieval {fixed_retrieval}: not a MIDUS model (no Memory block)")
        frozen_loss = loss()
        fixed = {"model": str(fixed_retrieval), "learned_loss": base_loss, "frozen_loss": frozen_loss, "difference": frozen_loss - base_loss}
    result = {
        "model": str(model_dir), "what": "memory heads" if memory else "attention heads of the inserted blocks",
        "held_out": {"blocks": min(len(blocks), max_blocks), "block_size": block_size, "loss": base_loss},
        "head_importance": {str(i): r for i, r in importance.items()},
        "slot_usage": {str(i): c.summary() for i, c in counters.items()},
        "fixed_retrieval": fixed,
        "notes": notes,
    }
    with atomic_directory(out, kind=ANALYSIS_KIND, replace=True) as tmp:
        (tmp / "analysis.json").write_text(strict_json(result, indent=1) + "\n")
        if importance:
            _plot_importance(result, tmp / "head_importance.png")
        if counters:
            _plot_slots(counters, tmp / "slot_usage.png")
    return result


def _plot_importance(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["head_importance"]
    grid = np.array([rows[k] for k in rows])  # [blocks, heads]
    from matplotlib.colors import TwoSlopeNorm

    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.5 * grid.shape[1]), max(3.0, 1.2 + 0.3 * grid.shape[0])))
    span = float(np.abs(grid).max())  # 0 in the middle: red hurts when zeroed, blue helps
    silent = span == 0.0  # an untrained memory: every head exactly 0 (a span of 1e-12 drew an offset label over the title)
    image = ax.imshow(grid, aspect="auto", cmap="coolwarm", norm=TwoSlopeNorm(0.0, -(span or 1.0), span or 1.0))
    ax.set_yticks(range(len(rows)), [f"layer {k}" for k in rows])
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("head")
    ax.set_title(f"held-out loss increase, {result['what']} zeroed one at a time" + (": every one 0" if silent else ""), fontsize=9)
    bar = fig.colorbar(image, ax=ax, label="Δ loss (nats/token)")
    bar.formatter.set_useOffset(False)  # the values themselves on the ticks, not an offset drawn above them
    bar.update_ticks()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_slots(counters: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for index, counter in counters.items():
        counts = counter.counts.sum(0).sort(descending=True).values.numpy()
        ax.plot(np.arange(1, len(counts) + 1), counts + 1, label=f"layer {index}", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("slot rank (most used first)")
    ax.set_ylabel("selections + 1 (all heads)")
    ax.set_title("slot usage per Memory block", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
