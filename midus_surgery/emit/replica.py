"""Function preservation decided before writing: the recipe applied to a tiny random replica.

Identity (LLaMA-Pro) and memory blocks promise that the up-scaled model starts as the base's
function. Whether zeroing some projections keeps that promise depends on code no anatomy can
fully describe: a norm on the residual stream after the branch (post-LN), a bias that survives
a zeroed projection, a layer whose math depends on its index or on ``num_hidden_layers``. So the
planner does not guess: it builds a tiny random instance of the base at full depth (small widths,
norm weights and biases perturbed away from their init, as a trained model's are), runs the real
planner and emitter on it, loads the result and compares logits bit for bit. A difference is a
refusal that names the first block where the hidden states part, unless the recipe says
``accept_function_change: true``.

Cost: one tiny model per distinct (config, layout, memory settings), cached in the process;
about a second or two on a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

from midus_surgery.compiler.planned import PlannedRecipe
from midus_surgery.errors import MachineError, MidusError, RecipeError, disk_problem, one_line, temp_disk_advice
from midus_surgery.recipe.anatomy_spec import index_ranges

REPLICA_SEED = 0
NORM_PERTURBATION = 0.3  # added to every 1-D parameter (norm weights, biases), times N(0, 1)


def promises_identity(planned: PlannedRecipe) -> bool:
    """True when the layout inserts identity or memory blocks and no plain copy (whose function
    changes anyway) and the memory is not randomly initialised."""
    kinds = {layer.kind for layer in planned.plan.layers if layer.inserted}
    if not kinds & {"identity", "memory"} or "copy" in kinds:
        return False
    return not ("memory" in kinds and planned.loaded.recipe.memory.init == "random")


def check_function_preserving(planned: PlannedRecipe, emit) -> PlannedRecipe:
    """``planned`` with ``plan.function_preserving`` set, or RecipeError when the identity and
    memory blocks would not start as the identity and the recipe does not accept that.

    emit: the emitter's ``emit`` (passed in: the emitter calls this before it writes anything). A recipe whose function
    changes anyway (a plain copy beside them, or memory blocks initialised at random) still has its identity blocks, and
    its memory blocks when they start at zero, checked one by one: each must output exactly its input."""
    if planned.plan.function_preserving is not None:
        return planned
    if not promises_identity(planned):
        why = blocks_difference(planned, emit)
        if why is not None and not planned.loaded.recipe.accept_function_change:
            raise RecipeError([planned.loaded.problem(("layout",), f"{why}. To write it anyway, set accept_function_change: true")])
        # accepted: said where the output is described (plan, the model card), not left behind "plain copies change it" (trial72 N5)
        return dataclasses.replace(planned, plan=dataclasses.replace(planned.plan, accepted_change=why)) if why else planned
    why = skeleton_change(planned) or replica_difference(planned, emit)
    if why is not None and not planned.loaded.recipe.accept_function_change:
        raise RecipeError([planned.loaded.problem(("layout",), f"{why}. To write it anyway, set accept_function_change: true "
                                                               f"(verify then skips its identity check and shows both perplexities)")])
    return dataclasses.replace(planned, plan=dataclasses.replace(planned.plan, function_preserving=why is None))


def skeleton_change(planned: PlannedRecipe) -> str | None:
    """Why the layout cannot keep the base's function whatever the blocks compute: the base's own
    layers are not all in the output, once each and in order (a block put in place of one); None
    when they are."""
    plan = planned.plan
    kept = [layer.source for layer in plan.layers if not layer.inserted]
    if kept == list(range(plan.base_num_layers)):
        return None
    missing = sorted(set(range(plan.base_num_layers)) - set(kept))
    if missing:
        first = missing[0]
        uses = [f"the inserted {layer.kind} block at output layer {layer.index}" for layer in plan.layers if layer.source == first]
        how = f"its only use is {' and '.join(uses)}" if uses else "the layout leaves it out"
        more = f" (and base layer{'s' if len(missing) > 2 else ''} {index_ranges(missing[1:])})" if len(missing) > 1 else ""
        return (f"base layer {first}{more} is not in the output: {how}, so the up-scaled model cannot start as the base's function; "
                f"an identity or memory block goes beside its source's original, which the layout keeps as `base`")
    return ("the base's own layers are not in their order in the output, so the up-scaled model cannot start as the base's "
            "function; identity and memory blocks are inserted between the base layers, which keep their order")


def replica_difference(planned: PlannedRecipe, emit) -> str | None:
    """None when the recipe keeps a tiny replica's logits exactly; else why not, one line."""
    return _cached(_recipe_key(planned, "identity"), lambda: _difference(planned, emit))


def _recipe_key(planned: PlannedRecipe, check: str) -> str:
    """What a replica check's answer depends on: the base's config, the layout and memory settings, the anatomy."""
    recipe = planned.loaded.recipe
    return json.dumps({"check": check, "config": _config_key(planned.config), "layout": recipe.layout.model_dump(mode="json"),
                       "memory": recipe.memory.model_dump(mode="json"), "seed": recipe.seed,
                       "anatomy": planned.anatomy.model_dump(mode="json") if planned.anatomy else None}, sort_keys=True, default=str)


def _config_key(config) -> dict:
    data = config.to_dict()
    data.pop("transformers_version", None)
    data.pop("_name_or_path", None)
    return data


_RESULTS: dict[str, str | None] = {}  # per key: the answer, kept for the process (tests plan the same recipes often)


def _cached(key: str, compute) -> str | None:
    if key not in _RESULTS:
        if len(_RESULTS) >= 64:
            _RESULTS.clear()
        _RESULTS[key] = compute()
    return _RESULTS[key]


@contextlib.contextmanager
def _sandbox():
    """A temporary folder for a replica, with one torch thread (tiny tensors: threads only contend) and the
    replica's own warnings and output swallowed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _temp_folder() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet = io.StringIO()
            with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
                yield Path(tmp)
    finally:
        torch.set_num_threads(threads)


def _difference(planned: PlannedRecipe, emit) -> str | None:
    _check_bank_fits(planned)
    with _sandbox() as tmp:
        try:
            return _run_replica(planned, tmp, emit)
        except RecipeError as exc:
            return f"the recipe applied to a tiny replica of the base is refused: {str(exc).strip().splitlines()[0]}"
        except Exception as exc:  # noqa: BLE001 - what would break the real output: a refusal, not a traceback
            if _out_of_memory(exc):  # no accept_function_change can help: say what is too large
                raise _too_large(planned, exc) from None
            if disk_problem(exc):  # the machine's temp disk, not the recipe
                raise _temp_disk_error(str(tmp), exc) from None
            inside = _inside_the_tool(exc)
            if inside:  # no recipe change helps a bug of the tool's: say so rather than advise accept_function_change
                raise MidusError(f"the check that the recipe keeps the base's function failed inside midus-surgery at {inside} "
                                 f"({one_line(exc, 200)}): a bug of the tool, not of the recipe; please report it") from None
            if isinstance(exc, ImportError):  # a package the base's config asks for (a quantisation backend): no
                # accept_function_change can help (trial45)
                raise RecipeError([planned.loaded.problem(("base",), f"transformers cannot build the base's model here: a package it "
                                                                     f"needs is missing ({one_line(exc, 200)})")]) from None
            return (f"the recipe applied to a tiny replica of the base fails ({one_line(exc, 200)}), so the output would not load or "
                    "run; `plan` prints the block anatomy it was built from, and an `anatomy:` section corrects a misreading")


def _temp_disk_error(tmp: str | None, exc: BaseException) -> MachineError:
    where = tmp or tempfile.gettempdir()
    return MachineError(f"cannot check the recipe on a tiny replica of the base: writing its temporary files in {where} failed "
                      f"({one_line(exc, 160)}); {temp_disk_advice(exc)}, and run again")


@contextlib.contextmanager
def _temp_folder():
    """The replica's temporary folder; a temp disk that cannot hold it is said as such, not as the recipe's fault."""
    try:
        folder = tempfile.TemporaryDirectory(prefix="midus-replica-")
    except OSError as exc:
        raise _temp_disk_error(None, exc) from None
    try:
        yield folder.name
    finally:
        try:
            folder.cleanup()
        except OSError:
            pass


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc)


# The replica's memory: as small as the layer allows. Whether a block starts as the identity does not hang on the bank's
# size, and a recipe's full-size banks (n_subkeys 1024, latent_dim 512: 2 GiB each) made `plan` take a minute and 9 GB
# (trial82 F5); whether one bank fits this machine is asked of its memory instead (_check_bank_fits).
REPLICA_N_SUBKEYS, REPLICA_LATENT_DIM = 8, 16


def _tiny_memory(memory):
    n = min(memory.n_subkeys, REPLICA_N_SUBKEYS)
    return memory.model_copy(update={"n_subkeys": n, "topk": min(memory.topk, n), "latent_dim": min(memory.latent_dim, REPLICA_LATENT_DIM)})


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: nothing to compare with
        return None


def _check_bank_fits(planned: PlannedRecipe) -> None:
    """One memory block's latent bank, in float32, fits in this machine's memory: apply builds it, and the output loads
    it; said before anything is built (the replica's own banks are tiny)."""
    memory = planned.loaded.recipe.memory
    if not memory.hive or not any(layer.kind == "memory" for layer in planned.plan.layers):
        return
    values, total = memory.n_subkeys ** 2 * memory.latent_dim, _physical_memory()
    if total is not None and values * 4 > total:
        raise RecipeError([planned.loaded.problem(("memory",), (
            f"n_subkeys {memory.n_subkeys}^2 x latent_dim {memory.latent_dim} make a latent bank of {values:,} values "
            f"({values * 4 / 2**30:,.1f} GiB in float32) per memory block, more than this machine's {total / 2**30:,.1f} GiB of "
            "memory: apply could not build it, nor could the output load here; choose a smaller n_subkeys or latent_dim"))])


def _too_large(planned: PlannedRecipe, exc: BaseException) -> RecipeError:
    memory = planned.loaded.recipe.memory
    values = memory.n_subkeys ** 2 * memory.latent_dim
    return RecipeError([planned.loaded.problem(("memory",), (
        f"building the recipe on a tiny replica of the base ran out of memory ({type(exc).__name__}): n_subkeys {memory.n_subkeys}^2 x "
        f"latent_dim {memory.latent_dim} make a latent bank of {values:,} values ({values * 4 / 2**30:,.1f} GiB in float32) per memory "
        "block, which this machine cannot hold, nor load the output; choose a smaller n_subkeys or latent_dim"))])


def _tiny_base(planned: PlannedRecipe):
    """(a tiny random replica of the base at full depth, its attn_implementation, token ids, why none builds): the
    widths shrunk until it builds and runs, its norms perturbed away from their init."""
    import torch
    from transformers import AutoModelForCausalLM

    from midus_surgery.anatomy.probe import _MAX_PROBE_PARAMS, _build_model, _shrinks

    trust = planned.loaded.recipe.base.trust_remote_code
    n_layers = planned.plan.base_num_layers
    problems = []

    def size_problem(shrink) -> tuple[str | None, bool]:
        """(why ``shrink`` makes no replica, whether for its size), counted on the meta device: the last ways of shrinking
        keep the base's widths, and a replica of a 671B-parameter config was built for real to learn it was too large
        (the process was killed for memory)."""
        try:
            with torch.device("meta"):
                size = sum(p.numel() for p in _build_model(AutoModelForCausalLM, shrink.config(n_layers), trust, to_cpu=False).parameters())
        except Exception as exc:  # noqa: BLE001 - a way of shrinking the config or model refuses: try the next
            return f"{shrink.label}: {one_line(exc, 120)}", False
        if size > _MAX_PROBE_PARAMS:
            return f"{shrink.label}: {size / 1e6:,.0f}M parameters at {n_layers} layers, past the {_MAX_PROBE_PARAMS / 1e6:.0f}M cap", True
        return None, False

    for shrink in _shrinks(planned.config):
        why, too_large = size_problem(shrink)
        if too_large:  # the same, narrower: a deep mixture of experts (DeepSeek-V3's 61 layers) is past the cap at the probe's widths
            shrink = shrink.narrower()
            why, _ = size_problem(shrink)
        if why:
            problems.append(why)
            continue
        for attn in ("eager", None):
            try:
                cfg = shrink.config(n_layers)
                base = _build_model(AutoModelForCausalLM, cfg, trust, attn_implementation=attn)
                _perturb(base)
                ids = torch.randint(0, max(2, min(int(cfg.vocab_size), 1000)), (2, 12), generator=torch.Generator().manual_seed(REPLICA_SEED))
                with torch.no_grad():
                    base(input_ids=ids, use_cache=False, output_hidden_states=True)
                return base, attn, ids, problems
            except Exception as exc:  # noqa: BLE001 - a way of shrinking that does not run: try the next
                problems.append(f"{shrink.label}: {one_line(exc, 120)}")
    return None, None, None, problems


def _emit_tiny(planned: PlannedRecipe, base, attn, tmp: Path, emit, function_preserving: bool | None):
    """The recipe applied to the tiny replica ``base`` (saved to tmp/base), loaded back from tmp/out."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from midus_surgery.compiler.plan import make_plan

    trust = planned.loaded.recipe.base.trust_remote_code
    base.save_pretrained(tmp / "base")
    _keep_building_code_only(tmp / "base" / "config.json")
    recipe = planned.loaded.recipe
    tiny_recipe = recipe.model_copy(update={
        "base": recipe.base.model_copy(update={"path": str(tmp / "base"), "config": None, "gguf_file": None}),
        "output": recipe.output.model_copy(update={"dir": str(tmp / "out"), "dtype": "float32"}),
        "memory": _tiny_memory(recipe.memory),
    })
    loaded = planned.loaded.model_copy(update={"recipe": tiny_recipe})
    config = AutoConfig.from_pretrained(tmp / "base", trust_remote_code=trust)
    plan = dataclasses.replace(make_plan(loaded, config, planned.anatomy), function_preserving=function_preserving)
    emit(PlannedRecipe(loaded, config, planned.anatomy, plan, base_dtype="float32"), progress=False)
    from midus_surgery.emit.comparable import own_memory

    kwargs = {"attn_implementation": attn} if attn else {}
    return own_memory(AutoModelForCausalLM.from_pretrained(tmp / "out", dtype=torch.float32, trust_remote_code=trust, **kwargs).eval())


def _inside_the_tool(exc: BaseException) -> str | None:
    """``file:line`` when ``exc`` was raised by midus-surgery's own code (its planner, emitter, I/O), not by the model's
    code (transformers', or the MIDUS modeling files in ``model/``, which run as the model's) nor by a library; else None."""
    import traceback

    if not isinstance(exc, (TypeError, AttributeError, NameError, AssertionError)):  # what a programming error raises;
        return None  # the tool's own refusals (MidusError, ValueError on a config) are the recipe's or the base's
    package = Path(__file__).resolve().parents[1]
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    where = Path(frames[-1].filename).resolve()
    if not where.is_relative_to(package) or where.is_relative_to(package / "model"):
        return None
    return f"{where.relative_to(package.parent)}:{frames[-1].lineno}"


def _run_replica(planned: PlannedRecipe, tmp: Path, emit) -> str | None:
    import torch

    base, attn, ids, problems = _tiny_base(planned)
    if base is None:
        return ("whether the identity and memory blocks start as the identity could not be checked: no tiny replica of the base "
                f"builds and runs ({'; '.join(problems[:2]) or 'too large'})")
    with torch.no_grad():
        want = base(input_ids=ids, use_cache=False, output_hidden_states=True)
    out = _emit_tiny(planned, base, attn, tmp, emit, function_preserving=True)  # what is being checked
    with torch.no_grad():
        got = out(input_ids=ids, use_cache=False, output_hidden_states=True)
    diff = float((got.logits.float() - want.logits.float()).abs().max())
    if diff == 0.0:
        return None
    return _where_it_parts(planned, want.hidden_states, got.hidden_states, diff)


def _layer_input(args, kwargs):
    """A decoder layer's hidden states, as a forward pre-hook with kwargs sees its call."""
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(output):
    """A decoder layer's hidden states out of what it returns (a tensor, or a tuple that starts with them)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def blocks_meant_as_identity(planned: PlannedRecipe) -> list:
    """The inserted blocks that start as the identity by the recipe's word: identity blocks, and memory blocks unless
    initialised at random."""
    random_memory = planned.loaded.recipe.memory.init == "random"
    return [layer for layer in planned.plan.layers
            if layer.inserted and (layer.kind == "identity" or (layer.kind == "memory" and not random_memory))]


def blocks_difference(planned: PlannedRecipe, emit) -> str | None:
    """For a recipe whose function changes anyway (a plain copy, random memory): None when each block meant as the
    identity outputs exactly its input on a tiny replica; else which does not, one line. Without this, a copy anywhere
    in a recipe let FalconH1 identity blocks whose parallel attention still adds its output be written as identity
    blocks, with no word (trial71)."""
    blocks = blocks_meant_as_identity(planned)
    if not blocks or not planned.plan.layers_path:
        return None
    return _cached(_recipe_key(planned, "blocks"), lambda: _blocks_checked(planned, blocks, emit))


def _blocks_checked(planned: PlannedRecipe, blocks: list, emit) -> str | None:
    with _sandbox() as tmp:
        try:
            return _run_blocks(planned, blocks, tmp, emit)
        except RecipeError as exc:
            return f"the recipe applied to a tiny replica of the base is refused: {str(exc).strip().splitlines()[0]}"
        except Exception as exc:  # noqa: BLE001 - as the whole-model check says it
            if _out_of_memory(exc):
                raise _too_large(planned, exc) from None
            return f"whether the identity and memory blocks start as the identity could not be checked: the recipe applied to a tiny replica fails ({one_line(exc, 200)})"


def _run_blocks(planned: PlannedRecipe, blocks: list, tmp: Path, emit) -> str | None:
    import torch

    from midus_surgery.anatomy.trace import decoder_layers

    base, attn, ids, problems = _tiny_base(planned)
    if base is None:
        return ("whether the identity and memory blocks start as the identity could not be checked: no tiny replica of the base "
                f"builds and runs ({'; '.join(problems[:2]) or 'too large'})")
    out = _emit_tiny(planned, base, attn, tmp, emit, function_preserving=False)  # False: a copy changes it anyway
    seen: dict[int, tuple] = {}
    layers = decoder_layers(out, planned.plan.layers_path)

    def record(index):
        def pre(_module, args, kwargs):
            seen[index] = (_layer_input(args, kwargs).clone(),)

        def post(_module, _args, _kwargs, output):
            seen[index] += (_layer_output(output).clone(),)
        return pre, post

    for block in blocks:
        pre, post = record(block.index)
        layers[block.index].register_forward_pre_hook(pre, with_kwargs=True)
        layers[block.index].register_forward_hook(post, with_kwargs=True)
    with torch.no_grad():
        out(input_ids=ids, use_cache=False)
    differ = [(block, float((seen[block.index][1].float() - seen[block.index][0].float()).abs().max())) for block in blocks
              if seen[block.index][1].shape != seen[block.index][0].shape or not bool((seen[block.index][1] == seen[block.index][0]).all())]
    if not differ:
        return None
    named = ", ".join(f"{b.index} ({b.kind} from base layer {b.source}"
                      + (f", a {planned.anatomy.kind_of(b.source).label}" if planned.anatomy else "") + ")" for b, _ in differ[:3])
    return (f"on a tiny random replica of the base (norms perturbed from their init), the inserted block(s) at output layer(s) {named} "
            f"do not start as the identity: a block's output differs from its input by up to {max(d for _, d in differ):.3g} "
            "(post-norm blocks, or a branch that adds something even with its output projections zeroed)")


def moved_layer_difference(planned: PlannedRecipe, emit) -> str | None:
    """For a layout with plain copies (DUS): None when every layer at another output position than its source's (a
    copy, or a base layer an insertion moved) computes on a tiny replica what its source computes from the same input;
    else which does not, one line. A layer whose code reads its index or the depth (GPT-2's
    scale_attn_by_inverse_layer_idx, DiffLlama's lambda_init, Inkling2's block boundaries every
    n_layers_per_attn_res_block layers) does not: its copies compute as their new position, and the base's own layers
    after an insertion no longer compute as they did in the base. Nothing is said when no replica runs."""
    plan = planned.plan
    # copies too: a stack after the last layer moves no base layer, and its copies computed as their new index unsaid (trial90 F3)
    moved = [layer for layer in plan.layers if layer.index != layer.source and (not layer.inserted or layer.kind == "copy")]
    if not moved or not plan.layers_path or promises_identity(planned):  # identity and memory: the replica check says it
        return None
    return _cached(_recipe_key(planned, "moved layers"), lambda: _quietly(planned, moved, emit))


def _quietly(planned: PlannedRecipe, moved: list, emit) -> str | None:
    """_run_moved in a sandbox; None if anything in it fails (a note that cannot be checked is not said: the recipe
    itself is valid)."""
    try:
        with _sandbox() as tmp:
            return _run_moved(planned, moved, tmp, emit)
    except Exception:  # noqa: BLE001
        return None


def _run_moved(planned: PlannedRecipe, moved: list, tmp: Path, emit) -> str | None:
    import torch

    from midus_surgery.anatomy.trace import decoder_layers

    base, attn, ids, _ = _tiny_base(planned)
    if base is None:
        return None
    out = _emit_tiny(planned, base, attn, tmp, emit, function_preserving=None)
    path = planned.plan.layers_path
    seen_in, seen_out = {}, {}  # base layer index -> its hidden-states input and output in the base's run

    def record(i):
        def pre(_module, args, kwargs):
            seen_in[i] = _layer_input(args, kwargs).clone()

        def post(_module, _args, _kwargs, output):
            seen_out[i] = _layer_output(output).clone()
        return pre, post

    handles = []
    for i, layer in enumerate(decoder_layers(base, path)):
        pre, post = record(i)
        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post, with_kwargs=True)]
    with torch.no_grad():
        base(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    got = {}

    def substitute(source, index):
        def pre(_module, args, kwargs):  # the input its source had in the base
            if args:
                return (seen_in[source], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": seen_in[source]}

        def post(_module, _args, _kwargs, output):
            got[index] = _layer_output(output).clone()
        return pre, post

    layers = decoder_layers(out, path)
    for layer in moved:
        pre, post = substitute(layer.source, layer.index)
        layers[layer.index].register_forward_pre_hook(pre, with_kwargs=True)
        layers[layer.index].register_forward_hook(post, with_kwargs=True)
    with torch.no_grad():
        out(input_ids=ids, use_cache=False)
    for layer in moved:
        a, b = got[layer.index], seen_out[layer.source]
        if a.shape != b.shape or not bool((a == b).all()):
            which = (f"the copy of base layer {layer.source} at output position {layer.index} computes differently from its source"
                     if layer.inserted else f"base layer {layer.source} computes differently at output position {layer.index}")
            return (f"on a tiny random replica of the base, {which} from the same input: its code depends on its index or on the "
                    "depth (num_hidden_layers), so copies compute as their new position, not as their source layer, and the base's "
                    "own layers after an insertion do not compute as they did in the base")
    return None


def _keep_building_code_only(config_path: Path) -> None:
    """The replica's config keeps only the auto_map entries that build the model: a base whose
    auto_map also names, say, its tokenizer's class has that file in its own folder, not in the
    replica's, and the emitter (which copies the files auto_map names) would fail there for a
    reason that has nothing to do with the function being checked."""
    from midus_surgery.compiler.custom_code import BUILDING_KEYS

    config = json.loads(config_path.read_text())
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return
    building = {k: v for k, v in auto_map.items() if k in BUILDING_KEYS}
    if building == auto_map:
        return
    if building:
        config["auto_map"] = building
    else:
        del config["auto_map"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _perturb(model) -> None:
    """Move every norm weight and bias away from its init: a trained model is not at its init."""
    import torch

    generator = torch.Generator().manual_seed(REPLICA_SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.is_floating_point():
                p.add_(NORM_PERTURBATION * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _where_it_parts(planned: PlannedRecipe, want: tuple, got: tuple, diff: float) -> str:
    """Which output layer first computes what its source does not, in words."""
    layers = planned.plan.layers
    anatomy = planned.anatomy
    inserted_since: list = []
    for layer in layers:
        if layer.inserted:
            inserted_since.append(layer)
            continue
        # hidden_states[k + 1] is the output of layer k; the last entry may be taken after the final norm (BLOOM), so
        # the last base layer's output compares only where it is the last entry of both (trial47: a block appended
        # after it was blamed on index-dependent code)
        comparable = layer.index + 1 < len(got) and layer.source + 1 < len(want) and \
            (layer.index + 1 == len(got) - 1) == (layer.source + 1 == len(want) - 1)
        if comparable and not bool((got[layer.index + 1] == want[layer.source + 1]).all()):
            moved_only = all(bool((got[b.index + 1] == got[b.index]).all()) for b in inserted_since)
            if inserted_since and not moved_only:
                return _not_identity(inserted_since, anatomy, diff)
            shared = _reads_a_shared_cache(planned, layer.source, diff)
            if shared:
                return shared
            return (f"on a tiny random replica of the base, base layer {layer.source} computes differently at output position "
                    f"{layer.index} though its input is the same: its code depends on its index or on the depth (num_hidden_layers), "
                    f"so no inserted block keeps the function; the logits differ by up to {diff:.3g}")
        inserted_since = []
    if inserted_since:  # blocks after the last base layer: what they add shows in the logits only
        return _not_identity(inserted_since, anatomy, diff)
    return (f"on a tiny random replica of the base (norms perturbed from their init), the up-scaled model's logits differ from the "
            f"base's by up to {diff:.3g} although each layer's hidden states match: the final layers or head depend on the depth")


def _reads_a_shared_cache(planned: PlannedRecipe, source: int, diff: float) -> str | None:
    """Why base layer ``source`` computes differently, when it is one of Gemma-3n/4's last num_kv_shared_layers: those
    take their keys and values from the last earlier layer of their type, which an inserted block after it becomes."""
    config = planned.plan.config
    shared, types, n = config.get("num_kv_shared_layers"), config.get("layer_types"), planned.plan.base_num_layers
    if planned.config is not None:
        types = getattr(planned.config, "layer_types", None)
    if not (isinstance(shared, int) and 0 < shared < n and isinstance(types, list) and len(types) == n and source >= n - shared):
        return None
    first_shared = n - shared
    providers = {t: max(i for i in range(first_shared) if types[i] == t) for t in set(types[first_shared:]) if t in types[:first_shared]}
    advice = " and ".join(f"no {t} block after base layer {i}" for t, i in sorted(providers.items(), key=lambda kv: kv[1]))
    return (f"on a tiny random replica of the base, base layer {source} computes differently though its input is the same: "
            f"it is one of the last num_kv_shared_layers={shared}, which reuse the keys and values of the last earlier layer "
            f"of their type, and in this layout it reads other ones or none (the logits differ by up to {diff:.3g}); insert blocks only "
            f"before base layer {first_shared}, and {advice}")


def _not_identity(blocks: list, anatomy, diff: float) -> str:
    named = ", ".join(f"{b.index} ({b.kind} from base layer {b.source}" + (f", a {anatomy.kind_of(b.source).label}" if anatomy else "") + ")"
                      for b in blocks[:3])
    return (f"on a tiny random replica of the base (norms perturbed from their init), the inserted block(s) at output layer(s) "
            f"{named} do not start as the identity: the logits differ by up to {diff:.3g} (post-norm blocks, or a "
            f"branch that adds something even with its output projections zeroed)")
