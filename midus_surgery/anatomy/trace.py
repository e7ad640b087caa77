"""What a decoder block of an architecture is made of, found from its graph.

The ``Anatomy`` names (relative to one decoder layer) the modules that surgery touches. It is
found by tracing one block (see ``find_anatomy``), can be stated in a recipe (``anatomy:``) when
tracing fails, and is written into the emitted config so loading never traces.

How ``find_anatomy`` works (no per-family table of names anywhere):

1. Build a TINY instance of the architecture on CPU from a shrunk copy of the config (2 layers,
   small widths, every structural flag kept; per-layer lists such as ``layer_types`` truncated).
   If the shrunk config does not build or run, the original widths are tried with 2 layers.
2. Run one forward (``use_cache=False``) and capture, with forward pre-hooks
   (``with_kwargs=True``), the real call of the first decoder layer and of every module in it.
   The decoder layers are the ``ModuleList`` of ``num_hidden_layers`` same-class modules whose
   first element is called with the hidden states.
3. Trace the layer into a graph whose module nodes are its direct children:
   * ``fx``: the layer class's ``forward`` unwrapped through its ``__wrapped__`` chain (HF
     decorators), called from a wrapper module with an explicit ``(hidden_states)`` signature
     and the captured kwargs, traced by an ``fx.Tracer`` whose leaves are the layer's children;
   * ``export``: ``torch.export.export(..., strict=False)`` of the same call; its aten nodes are
     grouped into child-module calls by their ``nn_module_stack``.
4. Classify the children by behaviour on their captured inputs (a norm's output does not change
   when its input is scaled; an attention mixes tokens, so changing token 0 changes the output
   at later tokens; "major" modules carry >= 2-D weights), and the block by data flow: the
   residual adds are the adds with one operand on the residual stream and the other behind a
   major module; each add's branch is what lies between the stream and that add. The FFN is the
   major modules that are not the attention's; the residual is parallel when the FFN does not
   depend on the attention output.
5. The attention's output projection (and the FFN's down projection, when the FFN is one
   module) is the last linear before the module's output: the nearest module with a >= 2-D
   weight walking back from the output (fx trace of that module; HF attention code is rarely
   fx-traceable, so the export graph of the layer answers then, via parameter names).
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from midus_surgery.errors import one_line
from midus_surgery.recipe.anatomy_spec import Anatomy

__all__ = ["Anatomy", "AnatomyError", "find_anatomy", "decoder_layers"]


class AnatomyError(Exception):
    """The block anatomy could not be found from the graph; the message says how to state it."""


def _recipe_hint(known: dict[str, Any] | None = None) -> str:
    known = known or {}
    example = {
        "layers_path": "model.layers", "layer_class": "MyDecoderLayer", "attention": "self_attn",
        "attn_out_proj": "self_attn.o_proj", "ffn": ["mlp"], "ffn_down_proj": "mlp.down_proj",
        "attn_norms": ["input_layernorm"], "ffn_norms": ["post_attention_layernorm"],
        "residual": "sequential",
    }
    lines = []
    for k, v in example.items():
        val = known.get(k, v)
        if isinstance(val, (list, tuple)):
            val = "[" + ", ".join(map(str, val)) + "]"
        note = "" if k in known else "   # e.g."
        lines.append(f"  {k}: {val}{note}")
    return ("State the block anatomy in the recipe instead, with an `anatomy:` block naming the "
            "modules relative to one decoder layer:\n\nanatomy:\n" + "\n".join(lines))


def _error(what: str, known: dict[str, Any] | None = None, cause: BaseException | str | None = None) -> AnatomyError:
    msg = f"Could not find {what}."
    if cause is not None:
        c = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        c = c.strip().splitlines()[0] if c.strip() else c
        msg += f" ({c[:300]})"
    return AnatomyError(msg + "\n" + _recipe_hint(known))


def decoder_layers(model: nn.Module, anatomy: Anatomy) -> nn.ModuleList:
    """The ModuleList of decoder layers of ``model`` named by ``anatomy.layers_path``."""
    try:
        layers = model.get_submodule(anatomy.layers_path)
    except AttributeError as e:
        raise AnatomyError(f"{type(model).__name__} has no module {anatomy.layers_path!r} (anatomy.layers_path): {e}") from e
    if not isinstance(layers, nn.ModuleList):
        raise AnatomyError(f"{anatomy.layers_path!r} in {type(model).__name__} is a {type(layers).__name__}, not a ModuleList of decoder layers")
    return layers


def find_anatomy(config, *, trust_remote_code: bool = False) -> Anatomy:
    """Find the block anatomy of ``config``'s causal LM by tracing one tiny decoder layer.

    Tries torch.fx first and torch.export second (``Anatomy.source`` says which one gave the
    block graph). Needs no weights and builds nothing of real size. Raises ``AnatomyError``
    (whose message shows the ``anatomy:`` recipe block to write instead) when it cannot.
    """
    return _find_anatomy(config, trust_remote_code=trust_remote_code)


def _find_anatomy(config, *, trust_remote_code: bool = False, sources: tuple[str, ...] = ("fx", "export"),
                  cross_check: bool = True) -> Anatomy:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend (3-4x slower on a busy machine)
    try:
        return _anatomy_from_probe(_Probe.build(config, trust_remote_code), sources=sources, cross_check=cross_check)
    finally:
        torch.set_num_threads(threads)


def _anatomy_from_probe(probe: "_Probe", *, sources: tuple[str, ...] = ("fx", "export"),
                        cross_check: bool = True) -> Anatomy:
    failures: list[str] = []
    for src in sources:
        try:
            flow = probe.flow(src)
            anatomy = _anatomy_from_flow(probe, flow, src)
        except AnatomyError as e:
            failures.append(f"{src}: {str(e).splitlines()[0]}")
            continue
        except Exception as e:  # a tracer failing on user code: try the next source
            failures.append(f"{src}: {one_line(e)}")
            continue
        if cross_check and src == "fx" and probe.export_ready():
            # The export graph is already there (the attention's projection came from it):
            # reading the block from it too costs nothing and catches a misread graph.
            answers = dict(probe.answers)
            try:
                other = _anatomy_from_flow(probe, probe.flow("export"), "export")
            except Exception:
                other = None
            probe.answers = answers
            if other is not None and other.model_copy(update={"source": "fx"}) != anatomy:
                warnings.warn(f"block anatomy from torch.fx and torch.export disagree; using fx.\n"
                              f"fx:\n{anatomy.describe()}\nexport:\n{other.describe()}", stacklevel=3)
        return anatomy
    raise _error(f"the block anatomy of {probe.layer_class} (model_type {getattr(probe.config, 'model_type', '?')!r})",
                 probe.known, "; ".join(failures))


# --------------------------------------------------------------------------------------------
# Building the tiny instance and capturing the calls
# --------------------------------------------------------------------------------------------

_TINY_LAYERS = 2
_TINY_HIDDEN, _TINY_HEADS, _TINY_HEAD_DIM, _TINY_FFN, _TINY_VOCAB = 128, 4, 32, 256, 256
_SEQ = 8
_FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size",
             "shared_expert_intermediate_size", "decoder_ffn_dim", "ffn_hidden_size")


def _key(config, name: str) -> str:
    """The attribute name ``config`` stores the standard ``name`` under (GPT-2: n_embd...)."""
    return getattr(config, "attribute_map", {}).get(name, name)


def _candidate_configs(config) -> list[tuple[str, Any]]:
    """Configs to build the probe from: shrunk widths first, then the original widths."""
    try:
        n_layers = int(getattr(config, "num_hidden_layers"))
    except (AttributeError, TypeError, ValueError) as e:
        raise _error("the number of decoder layers (config.num_hidden_layers)", cause=e) from e
    base = config.to_dict()
    n_tiny = max(1, min(n_layers, _TINY_LAYERS))

    def with_changes(changes: dict[str, Any]):
        d = copy.deepcopy(base)
        for k, v in d.items():  # every per-layer list (layer_types, ...) follows the layer count
            if isinstance(v, (list, tuple)) and len(v) == n_layers and n_layers != n_tiny:
                d[k] = type(v)(v[:n_tiny])
        d[_key(config, "num_hidden_layers")] = n_tiny
        d.update(changes)
        d.pop("transformers_version", None)
        return type(config).from_dict(d)

    hid = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)

    def widths(head_dim: int | None) -> dict[str, Any]:
        """Small widths; ``head_dim=None`` shrinks it too, else keeps it (rotary lists follow it)."""
        if not (isinstance(hid, int) and isinstance(heads, int) and heads > 0):
            return {}
        hd = head_dim or _TINY_HEAD_DIM
        small = {_key(config, "hidden_size"): _TINY_HEADS * hd, _key(config, "num_attention_heads"): _TINY_HEADS}
        kv = getattr(config, "num_key_value_heads", None)
        if isinstance(kv, int) and kv > 0:
            small[_key(config, "num_key_value_heads")] = _TINY_HEADS if kv >= heads else (1 if kv == 1 else 2)
        if isinstance(base.get("head_dim"), int):
            small["head_dim"] = hd
        if isinstance(base.get("word_embed_proj_dim"), int) and base["word_embed_proj_dim"] == hid:
            small["word_embed_proj_dim"] = _TINY_HEADS * hd
        if isinstance(base.get("rotary_dim"), int):
            small["rotary_dim"] = min(base["rotary_dim"], hd)
        for k in _FFN_KEYS:
            if isinstance(base.get(k), int):
                small[k] = _TINY_FFN
        return small

    vocab_small: dict[str, Any] = {}  # a small vocabulary; the pad id dropped if it falls outside
    vocab_padded: dict[str, Any] = {}  # a small vocabulary that still holds the pad id
    vocab = base.get(_key(config, "vocab_size"))
    if isinstance(vocab, int):
        pad = base.get("pad_token_id")  # the one id an embedding checks (padding_idx < vocab)
        vocab_small[_key(config, "vocab_size")] = min(vocab, _TINY_VOCAB)
        if isinstance(pad, int) and pad >= vocab_small[_key(config, "vocab_size")]:
            vocab_small["pad_token_id"] = None
        vocab_padded[_key(config, "vocab_size")] = min(vocab, max(_TINY_VOCAB, pad + 1 if isinstance(pad, int) else 0))
    head_dim = base.get("head_dim") if isinstance(base.get("head_dim"), int) else (
        hid // heads if isinstance(hid, int) and isinstance(heads, int) and heads > 0 and hid % heads == 0 else None)

    out: list[tuple[str, Any]] = []
    plans = [("shrunk", {**widths(None), **vocab_small})]
    if head_dim and head_dim != _TINY_HEAD_DIM:  # e.g. rotary factor lists sized by head_dim/2
        plans.append(("shrunk, head_dim kept", {**widths(head_dim), **vocab_small}))
    if vocab_padded != {k: v for k, v in vocab_small.items() if k != "pad_token_id"}:
        plans.append(("shrunk, pad id kept", {**widths(None), **vocab_padded}))
    plans.append(("original widths", vocab_padded))
    for label, changes in plans:
        try:
            out.append((label, with_changes(changes)))
        except Exception as e:  # a config that validates its sizes: try the next one
            out.append((label, e))
    return out


@dataclass
class _Call:
    """One captured call of a module: its args/kwargs and where the hidden states are."""

    args: tuple
    kwargs: dict
    slot: tuple[str, Any]  # ("arg", index) or ("kw", name)

    def hidden(self) -> torch.Tensor:
        kind, where = self.slot
        return self.args[where] if kind == "arg" else self.kwargs[where]

    def with_hidden(self, h) -> tuple[tuple, dict]:
        kind, where = self.slot
        if kind == "arg":
            args = list(self.args)
            args[where] = h
            return tuple(args), dict(self.kwargs)
        return tuple(self.args), {**self.kwargs, where: h}


def _hidden_slot(args: tuple, kwargs: dict, d: int | None) -> tuple[str, Any] | None:
    def ok(t):
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2 and (d is None or t.shape[-1] == d)
    for i, a in enumerate(args):
        if ok(a):
            return ("arg", i)
    if ok(kwargs.get("hidden_states")):
        return ("kw", "hidden_states")
    for k, v in kwargs.items():
        if ok(v):
            return ("kw", k)
    return None


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    return None


def _unwrap(fn: Callable) -> Callable:
    seen = set()
    while hasattr(fn, "__wrapped__") and id(fn) not in seen:
        seen.add(id(fn))
        fn = fn.__wrapped__
    return fn


def _weight_dims(module: nn.Module) -> int:
    """Largest number of dims among the module's own and its children's parameters."""
    return max((p.dim() for p in module.parameters()), default=0)


class _Probe:
    """A tiny built instance with the captured calls of its first decoder layer."""

    def __init__(self):
        self.known: dict[str, Any] = {}
        self.layer_class = "the decoder layer"
        self._flows: dict[str, Any] = {}
        self._export = None
        self._roles: dict[str, str] = {}
        self.answers: dict[str, str] = {}  # which source found each projection (for diagnostics)

    # ---- building ----
    @classmethod
    def build(cls, config, trust_remote_code: bool) -> "_Probe":
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # shrunk configs make transformers chatty
        try:
            return cls._build(config, trust_remote_code, AutoModelForCausalLM)
        finally:
            hf_logging.set_verbosity(verbosity)

    @classmethod
    def _build(cls, config, trust_remote_code: bool, AutoModelForCausalLM) -> "_Probe":
        self = cls()
        problems: list[str] = []
        if not _has_causal_lm(config, AutoModelForCausalLM):
            # fail fast: transformers would import every model module to say the same
            raise _error(f"a causal-LM class for {type(config).__name__} (model_type "
                         f"{getattr(config, 'model_type', '') or 'unset'!r}; not registered with "
                         f"AutoModelForCausalLM and no auto_map)")
        for label, cfg in _candidate_configs(config):
            if isinstance(cfg, Exception):
                problems.append(f"{label} config: {type(cfg).__name__}: {cfg}")
                continue
            try:
                model = _build_model(AutoModelForCausalLM, cfg, trust_remote_code)
            except Exception as e:
                problems.append(f"{label}: building {getattr(cfg, 'model_type', '?')} failed: {type(e).__name__}: {str(e).strip()[:200]}")
                continue
            try:
                self._capture(model, cfg)
            except AnatomyError:
                raise
            except Exception as e:
                problems.append(f"{label}: a forward of the tiny model failed: {type(e).__name__}: {str(e).strip()[:200]}")
                continue
            self.config_label = label
            return self
        hint = "" if trust_remote_code else " (if the architecture ships its own code, pass trust_remote_code=True)"
        raise _error(f"a buildable tiny model of model_type {getattr(config, 'model_type', '?')!r}{hint}",
                     cause="; ".join(problems))

    def _capture(self, model: nn.Module, cfg) -> None:
        n = int(cfg.num_hidden_layers)
        candidates = []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) == n and n > 0 and len({type(m) for m in mod}) == 1:
                candidates.append((name, mod))
        if not candidates:
            raise _error(f"a ModuleList of num_hidden_layers={n} decoder layers in {type(model).__name__}")
        calls: dict[int, dict[str, tuple]] = {}
        hooks = []

        def recorder(store: dict, key: str):
            def hook(module, args, kwargs):
                store.setdefault(key, (args, kwargs))
            return hook

        for i, (_, lst) in enumerate(candidates):
            store = calls.setdefault(i, {})
            for sub_name, sub in lst[0].named_modules():
                hooks.append(sub.register_forward_pre_hook(recorder(store, sub_name), with_kwargs=True))
        vocab = getattr(cfg, "vocab_size", None) or 2
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, max(2, min(int(vocab), 1000)), (1, _SEQ), generator=g)
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        called = [(i, candidates[i]) for i in calls if "" in calls[i]]
        # prefer the list whose first layer takes hidden states; shortest path on ties
        called = [c for c in called if _hidden_slot(*calls[c[0]][""], None) is not None] or called
        if not called:
            raise _error(f"which ModuleList of {type(model).__name__} holds the decoder layers (none of "
                         f"{[c[0] for c in candidates]} was called by a forward)")
        i, (path, layers) = min(called, key=lambda c: (c[1][0].count("."), len(c[1][0])))
        self.model = model
        self.config = cfg
        self.layers_path = path
        self.layer = layers[0].eval()
        self.layer_class = type(self.layer).__name__
        self.known.update(layers_path=path, layer_class=self.layer_class)
        largs, lkw = calls[i][""]
        slot = _hidden_slot(largs, lkw, None)
        if slot is None:
            raise _error(f"the hidden-states input of {self.layer_class}")
        self.layer_call = _Call(tuple(largs), dict(lkw), slot)
        self.d = self.layer_call.hidden().shape[-1]
        self.calls: dict[str, _Call] = {}
        for name, (a, k) in calls[i].items():
            if name == "":
                continue
            s = _hidden_slot(a, k, None)
            if s is not None:
                self.calls[name] = _Call(tuple(a), dict(k), s)

    # ---- graphs ----
    def flow(self, source: str) -> "_Flow":
        if source not in self._flows:
            self._flows[source] = _flow_from_fx(self) if source == "fx" else _flow_from_export(self)
        return self._flows[source]

    def export_ready(self) -> bool:
        return self._export is not None

    def exported(self):
        if self._export is None:
            wrapper = _CallWrapper(self.layer, type(self.layer).__call__, self.layer_call)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._export = torch.export.export(wrapper, (self.layer_call.hidden(),), strict=False)
        return self._export

    # ---- behaviour of a submodule on its captured input ----
    def run(self, path: str, h: torch.Tensor) -> torch.Tensor | None:
        call = self.calls[path]
        args, kwargs = call.with_hidden(h)
        with torch.no_grad():
            return _first_tensor(self.layer.get_submodule(path)(*args, **kwargs))

    def role(self, path: str) -> str:
        """'attention' (mixes tokens, has weights), 'norm', 'major' (>= 2-D weights) or 'minor'."""
        if path not in self._roles:
            self._roles[path] = self._role(path)
        return self._roles[path]

    def _role(self, path: str) -> str:
        module = self.layer.get_submodule(path)
        dims = _weight_dims(module)
        if path not in self.calls:
            return "major" if dims >= 2 else "minor"
        x = self.calls[path].hidden().detach().float()
        x = x / x.std().clamp_min(1e-12)
        x = x.to(self.calls[path].hidden().dtype)
        try:
            y = self.run(path, x)
            if dims <= 1:
                y7 = self.run(path, 7 * x)
                if y is not None and y7 is not None and y.shape == y7.shape:
                    scale = y.abs().max().item()
                    if scale > 1e-6 and torch.allclose(y7, y, rtol=2e-2, atol=2e-3 * scale):
                        return "norm"
                    if scale <= 1e-6 and "norm" in type(module).__name__.lower():
                        return "norm"  # degenerate (zero) weights: the class name is all we have
                return "minor"
            if x.dim() >= 2 and x.shape[-2] > 1 and y is not None and y.dim() >= 2 and y.shape[-2] == x.shape[-2]:
                x2 = x.clone()
                x2[..., 0, :] += 3.0
                y2 = self.run(path, x2)
                if y2 is not None and y2.shape == y.shape:
                    scale = y.abs().max().item() + 1e-12
                    if not torch.allclose(y2[..., 1:, :], y[..., 1:, :], rtol=0, atol=1e-5 * scale):
                        return "attention"
        except Exception:
            pass  # a module that cannot be re-run alone: judged by its weights
        return "major" if dims >= 2 else "minor"


def _has_causal_lm(config, auto_cls) -> bool:
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True
    mapping = getattr(auto_cls, "_model_mapping", None)
    try:
        names = mapping._model_mapping  # model_type -> class name, without importing anything
        extra = mapping._extra_content  # classes registered at run time
    except AttributeError:
        return True  # a transformers we do not know the internals of: just try to build
    return getattr(config, "model_type", None) in names or type(config) in extra


def _build_model(auto_cls, cfg, trust_remote_code: bool) -> nn.Module:
    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = auto_cls.from_config(cfg, attn_implementation="eager", dtype=torch.float32, **kwargs)
        except (TypeError, ValueError):
            model = auto_cls.from_config(cfg, **kwargs)
    return model.to("cpu").float().eval()


class _CallWrapper(nn.Module):
    """``forward(hidden_states)`` calling ``fn(module, ...)`` with a captured call's other inputs."""

    def __init__(self, module: nn.Module, fn: Callable, call: _Call):
        super().__init__()
        self.mod = module
        self._fn = fn
        self._call = call

    def forward(self, hidden_states):
        args, kwargs = self._call.with_hidden(hidden_states)
        return self._fn(self.mod, *args, **kwargs)


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[nn.Module]):
        super().__init__()
        self._leaves = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, module_qualified_name)


def _fx_trace(module: nn.Module, call: _Call, leaves: set[nn.Module]) -> fx.Graph:
    """fx graph of ``module``'s forward on ``call`` (hidden states symbolic, the rest constant)."""
    errors = []
    fwd = type(module).forward
    for fn in dict.fromkeys([_unwrap(fwd), fwd]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _LeafTracer(leaves).trace(_CallWrapper(module, fn, call))
        except Exception as e:
            errors.append(e)
    raise errors[0]


# --------------------------------------------------------------------------------------------
# A source-independent graph: the hidden-states input, calls of the layer's children, adds
# --------------------------------------------------------------------------------------------


@dataclass
class _Node:
    id: int
    kind: str  # "input" | "call" | "add" | "op" | "output"
    target: str | None = None  # the child path for "call"
    inputs: list[int] = field(default_factory=list)


class _Flow:
    def __init__(self, nodes: list[_Node]):
        self.nodes = nodes
        self.by_id = {n.id: n for n in nodes}
        self._anc: dict[int, frozenset[int]] = {}

    def anc(self, i: int) -> frozenset[int]:
        """Strict ancestors of node ``i``."""
        if i in self._anc:
            return self._anc[i]
        stack = [(i, False)]
        while stack:  # iterative post-order: graphs of big layers are deep
            j, done = stack.pop()
            if j in self._anc:
                continue
            ins = self.by_id[j].inputs
            if done:
                acc = set()
                for k in ins:
                    acc.add(k)
                    acc |= self._anc[k]
                self._anc[j] = frozenset(acc)
            else:
                stack.append((j, True))
                stack.extend((k, False) for k in ins if k not in self._anc)
        return self._anc[i]

    def closure(self, i: int) -> frozenset[int]:
        return self.anc(i) | {i}


_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}


def _flow_from_fx(probe: _Probe) -> _Flow:
    leaves = set(probe.layer.children())
    graph = _fx_trace(probe.layer, probe.layer_call, leaves)
    ids: dict[fx.Node, int] = {}
    nodes: list[_Node] = []
    n_inputs = 0
    for node in graph.nodes:
        ins = [ids[a] for a in node.all_input_nodes if a in ids]
        if node.op == "placeholder":
            kind, target = "input", None
            n_inputs += 1
        elif node.op == "get_attr":
            continue  # constants (the captured mask, rotary tables...) are not data flow
        elif node.op == "call_module":
            kind, target = "call", str(node.target).removeprefix("mod.")
        elif node.op == "output":  # the layer's first output is the hidden states
            flat = torch.utils._pytree.tree_leaves(node.args)
            first = next((a for a in flat if isinstance(a, fx.Node)), None)
            kind, target, ins = "output", None, ([ids[first]] if first in ids else [])
        elif (node.op == "call_function" and node.target in _ADD_TARGETS) or (
                node.op == "call_method" and node.target in ("add", "__add__", "add_")):
            kind, target = ("add" if len(ins) >= 2 else "op"), None
        else:
            kind, target = "op", None
        ids[node] = len(nodes)
        nodes.append(_Node(len(nodes), kind, target, ins))
    if n_inputs != 1:
        raise AnatomyError(f"fx graph has {n_inputs} inputs")
    return _Flow(nodes)


_ALIAS_OPS = ("aten.to.", "aten._to_copy.", "aten.alias.", "aten.type_as.", "aten.contiguous.",
              "aten.clone.", "aten.detach.", "aten.lift_fresh_copy.")


def _module_path_of(node: fx.Node) -> str:
    """The deepest module path of an export node, relative to the layer ('' for the layer)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values()]
    path = paths[-1] if paths else ""
    if path == "mod":
        return ""
    return path.removeprefix("mod.") if path.startswith("mod.") else ("" if path in ("", "mod") else path)


def _export_alias_map(ep) -> dict[fx.Node, fx.Node]:
    """Nodes that return their input unchanged (dtype casts to the same dtype...) -> input."""
    alias: dict[fx.Node, fx.Node] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith(_ALIAS_OPS):
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None:
            continue
        a, b = node.meta.get("val"), src.meta.get("val")
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape:
            alias[node] = alias.get(src, src)
    return alias


def _flow_from_export(probe: _Probe) -> _Flow:
    ep = probe.exported()
    user_inputs = {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    alias = _export_alias_map(ep)
    # group the aten nodes into calls of the layer's direct children
    group_of: dict[fx.Node, Any] = {}
    order: list[Any] = []
    members: dict[Any, list[fx.Node]] = {}
    for node in ep.graph.nodes:
        if node in alias:
            continue
        if node.op == "placeholder":
            if node.name not in user_inputs:
                continue
            key: Any = ("input", node.name)
        elif node.op == "output":
            key = ("output",)
        elif node.op == "call_function":
            if node.meta.get("val") is None and not node.users:
                continue  # asserts
            path = _module_path_of(node)
            if path:
                stack = node.meta.get("nn_module_stack") or {}
                child = path.split(".")[0]
                call_key = next((k for k, v in stack.items() if v[0] in (f"mod.{child}", child)), child)
                key = ("call", child, call_key)
            else:
                key = ("node", node.name)
        else:
            continue
        group_of[node] = key
        if key not in members:
            members[key] = []
            order.append(key)
        members[key].append(node)
    ids = {key: i for i, key in enumerate(order)}
    nodes: list[_Node] = []
    for key in order:
        ins: list[int] = []
        for m in members[key]:
            srcs = m.all_input_nodes
            if key[0] == "output":
                flat = torch.utils._pytree.tree_leaves(m.args)
                srcs = [next(a for a in flat if isinstance(a, fx.Node))]
            for a in srcs:
                a = alias.get(a, a)
                g = group_of.get(a)
                if g is not None and g != key and ids[g] not in ins:
                    ins.append(ids[g])
        if key[0] == "input":
            kind, target = "input", None
        elif key[0] == "output":
            kind, target = "output", None
        elif key[0] == "call":
            kind, target = "call", key[1]
        else:
            t = str(members[key][0].target)
            kind = "add" if t.startswith(("aten.add.", "aten.add_.")) and len(ins) >= 2 else "op"
            target = None
        nodes.append(_Node(ids[key], kind, target, ins))
    if sum(n.kind == "input" for n in nodes) != 1:
        raise AnatomyError("export graph has no single hidden-states input")
    return _Flow(nodes)


# --------------------------------------------------------------------------------------------
# Reading the block from the graph
# --------------------------------------------------------------------------------------------


def _anatomy_from_flow(probe: _Probe, flow: _Flow, source: str) -> Anatomy:
    known = dict(probe.known)
    calls = [n for n in flow.nodes if n.kind == "call"]
    role = {n.id: probe.role(n.target) for n in calls}
    major = {i for i, r in role.items() if r in ("major", "attention")}
    norms = {i for i, r in role.items() if r == "norm"}
    att_nodes = [n for n in calls if role[n.id] == "attention"]
    if not att_nodes:
        raise _error(f"an attention module in {probe.layer_class} (no child mixes tokens: children called "
                     f"{[n.target for n in calls]})", known)
    A = att_nodes[0]
    attention = A.target
    known["attention"] = attention
    inp = next(n for n in flow.nodes if n.kind == "input")
    out = next(n for n in flow.nodes if n.kind == "output")
    # residual stream: walk the adds in order
    cur = inp.id
    branches: list[tuple[int, frozenset[int]]] = []  # (residual add, nodes of its branch)
    stream_norms: list[tuple[int, set[int]]] = []  # norms on the stream after branch k (post-LN)
    for n in flow.nodes:
        if n.kind != "add" or cur not in flow.closure(n.id):
            continue
        base = flow.closure(cur)
        sides = []
        for i in n.inputs:
            extra = flow.closure(i) - base
            sides.append((i, extra, bool(extra & major), cur in flow.closure(i)))
        stream = [s for s in sides if s[3] and not s[2]]
        branch = [s for s in sides if s[2]]
        if len(stream) != 1 or len(branch) != 1:
            continue
        branch = [(branch[0][0], branch[0][1] - flow.closure(stream[0][0]))]
        k = len(branches)
        on_stream = {j for j in stream[0][1] if j in norms}
        if on_stream and branches:
            stream_norms.append((k - 1, on_stream))
        branches.append((n.id, frozenset(branch[0][1])))
        cur = n.id
    tail = {j for j in flow.closure(out.id) - flow.closure(cur) if j in norms}
    if tail and branches:
        stream_norms.append((len(branches) - 1, tail))
    if not branches:
        raise _error(f"the residual adds of {probe.layer_class} (no add joins the layer input with a module's output)", known)

    a_branch = next((k for k, (_, b) in enumerate(branches) if A.id in b), None)
    if a_branch is None:
        raise _error(f"the residual branch of {attention!r} in {probe.layer_class}", known)
    a_nodes = branches[a_branch][1]
    attn_side = {j for j in a_nodes if j == A.id or j in flow.anc(A.id) or A.id in flow.anc(j)}
    ffn_ids = sorted(i for i in major if i != A.id and i not in attn_side and any(i in b for _, b in branches))
    if not ffn_ids:
        raise _error(f"an FFN in {probe.layer_class} (no module with weights besides the attention {attention!r} "
                     f"feeds a residual add)", known)
    ffn = tuple(dict.fromkeys(flow.by_id[i].target for i in ffn_ids))
    known["ffn"] = list(ffn)
    f_branches = {k for k, (_, b) in enumerate(branches) if set(ffn_ids) & b}
    residual = "sequential" if A.id in flow.anc(ffn_ids[0]) else "parallel"
    known["residual"] = residual

    def related_to_ffn(j: int, b: frozenset[int]) -> bool:
        return any(j == f or j in flow.anc(f) or f in flow.anc(j) for f in ffn_ids if f in b)

    attn_norm_ids: list[int] = [j for j in sorted(a_nodes) if j in norms and j in attn_side]
    ffn_norm_ids: list[int] = []
    for k in sorted(f_branches):
        b = branches[k][1]
        ffn_norm_ids += [j for j in sorted(b) if j in norms and related_to_ffn(j, b)]
    for k, js in stream_norms:  # post-LN: a norm on the stream right after a branch's add
        (attn_norm_ids if k == a_branch else ffn_norm_ids if k in f_branches else []).extend(sorted(js))
    names = lambda ids: tuple(dict.fromkeys(flow.by_id[j].target for j in ids))  # noqa: E731
    attn_norms, ffn_norms = names(attn_norm_ids), names(ffn_norm_ids)
    known.update(attn_norms=list(attn_norms), ffn_norms=list(ffn_norms))

    attn_out_proj = _last_linear(probe, attention, source, known, "attn_out_proj")
    known["attn_out_proj"] = attn_out_proj
    last = ffn[-1]
    last_mod = probe.layer.get_submodule(last)
    if any(p.dim() >= 2 for p in last_mod.parameters(recurse=False)) and not any(True for _ in last_mod.children()):
        ffn_down_proj = last  # the FFN is a set of modules (OPT): its last linear is one of them
    else:
        ffn_down_proj = _last_linear(probe, last, source, known, "ffn_down_proj")
    return Anatomy(layers_path=probe.layers_path, layer_class=probe.layer_class, attention=attention,
                   attn_out_proj=attn_out_proj, ffn=ffn, ffn_down_proj=ffn_down_proj, attn_norms=attn_norms,
                   ffn_norms=ffn_norms, residual=residual, source=source)


def _last_linear(probe: _Probe, path: str, source: str, known: dict, field_name: str) -> str:
    """The module with a >= 2-D weight nearest to ``path``'s output (walking the data flow back)."""
    errors = []
    if source == "fx":
        try:
            found = _last_linear_fx(probe, path)
            probe.answers[field_name] = "fx"
            return found
        except Exception as e:
            errors.append(f"fx: {one_line(e, 150)}")
    try:
        found = _last_linear_export(probe, path)
        probe.answers[field_name] = "export"
        return found
    except Exception as e:
        errors.append(f"export: {one_line(e, 150)}")
    raise _error(f"{field_name}: the last linear inside {path!r} of {probe.layer_class}", known, "; ".join(errors))


def _backward_first(start: list, inputs_of: Callable[[Any], list], hit: Callable[[Any], str | None]) -> str | None:
    seen = set(start)
    q = deque(start)
    while q:
        level = list(q)
        q.clear()
        found = [h for h in (hit(n) for n in level) if h]
        if found:
            return found[-1]
        for n in level:
            for a in inputs_of(n):
                if a not in seen:
                    seen.add(a)
                    q.append(a)
    return None


def _last_linear_fx(probe: _Probe, path: str) -> str:
    module = probe.layer.get_submodule(path)
    if path not in probe.calls:
        raise AnatomyError(f"{path!r} was not called")
    leaves = {m for m in module.modules() if m is not module and not any(True for _ in m.children())}
    graph = _fx_trace(module, probe.calls[path], leaves)
    out = next(n for n in graph.nodes if n.op == "output")
    first = next((a for a in torch.utils._pytree.tree_leaves(out.args) if isinstance(a, fx.Node)), None)
    if first is None:
        raise AnatomyError("no output")

    def hit(n: fx.Node):
        if n.op == "call_module":
            sub = str(n.target).removeprefix("mod.")
            m = module.get_submodule(sub)
            if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
                return f"{path}.{sub}"
        return None

    found = _backward_first([first], lambda n: n.all_input_nodes, hit)
    if found is None:
        raise AnatomyError(f"no linear inside {path!r} in the fx graph")
    return found


def _last_linear_export(probe: _Probe, path: str) -> str:
    ep = probe.exported()
    params = ep.graph_signature.inputs_to_parameters
    alias = _export_alias_map(ep)

    def inside(n: fx.Node) -> bool:
        p = _module_path_of(n) if n.op == "call_function" else ""
        return p == path or p.startswith(path + ".")

    members = [n for n in ep.graph.nodes if n.op == "call_function" and inside(n)]
    member_set = set(members)
    reaches_out: set[fx.Node] = set()
    stack = [ep.graph.output_node()]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            a = alias.get(a, a)
            if a not in reaches_out:
                reaches_out.add(a)
                stack.append(a)
    outs = [n for n in members if n in reaches_out and any(u not in member_set for u in n.users)]
    if not outs:
        raise AnatomyError(f"no output of {path!r} in the export graph")

    def hit(n: fx.Node):
        for a in n.all_input_nodes:
            fqn = params.get(a.name)
            if fqn is None:
                continue
            fqn = fqn.removeprefix("mod.")
            owner, _, _ = fqn.rpartition(".")
            val = a.meta.get("val")
            if owner.startswith(path + ".") and isinstance(val, torch.Tensor) and val.dim() >= 2:
                return owner
        return None

    found = _backward_first(outs, lambda n: [a for a in (alias.get(x, x) for x in n.all_input_nodes) if a in member_set], hit)
    if found is None:
        raise AnatomyError(f"no linear inside {path!r} in the export graph")
    return found
