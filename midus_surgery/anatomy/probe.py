"""The tiny instance of an architecture that the anatomy is read from, with its captured calls."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from midus_surgery.anatomy.config_lists import is_per_layer, list_kinds
from midus_surgery.anatomy.graph import _CallWrapper, _flow_from_export, _flow_from_fx
from midus_surgery.anatomy.problems import AnatomyError, _error

_TINY_HIDDEN, _TINY_HEADS, _TINY_HEAD_DIM, _TINY_FFN, _TINY_VOCAB = 128, 4, 32, 256, 256
_TINY_EXPERTS, _TINY_EXPERTS_PER_TOKEN = 8, 2
_TINY_RANK = 32  # low-rank projections (MLA's q_lora_rank, kv_lora_rank)
_SEQ = 8
_MAX_PROBE_PARAMS = 50_000_000  # a probe larger than this is not "tiny": refuse, never build it
_FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size",
             "shared_expert_intermediate_size", "decoder_ffn_dim", "ffn_hidden_size")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk")
_GROUP_KEYS = ("n_group", "topk_group")  # expert groups (DeepSeek-V3): one group of the shrunk experts


def _key(config, name: str) -> str:
    """The attribute name ``config`` stores the standard ``name`` under (GPT-2: n_embd...)."""
    return getattr(config, "attribute_map", {}).get(name, name)


def config_int(config, name: str):
    """``config.<name>`` as its dict holds it (also where transformers refuses a global read of a
    per-layer attribute, as for Gemma-4's head_dim): an int, or None."""
    value = config.to_dict().get(_key(config, name))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class _Shrink:
    """One way of shrinking a config: the changed keys; ``config(n)`` builds it with n layers."""

    label: str
    changes: dict
    original: Any
    list_kinds: dict  # config_lists.list_kinds of the original

    def config(self, n_layers: int):
        base = self.original.to_dict()
        n_full = int(self.original.num_hidden_layers)
        d = copy.deepcopy(base)
        d.update(copy.deepcopy(self.changes))
        if n_layers != n_full:
            for k, v in d.items():  # every per-layer list (layer_types, ...) follows the layer count
                if is_per_layer(k, v, n_full, self.list_kinds):
                    d[k] = type(v)(v[:n_layers])
            if isinstance(d.get("per_layer_config"), dict):  # transformers' per-layer overrides, keyed by index
                d["per_layer_config"] = {k: v for k, v in d["per_layer_config"].items() if int(k) < n_layers}
        d[_key(self.original, "num_hidden_layers")] = n_layers
        d.pop("transformers_version", None)
        return type(self.original).from_dict(d)

    def narrower(self) -> "_Shrink":
        """This shrinking with the FFNs, the expert count and low ranks cut further: for a replica at full depth,
        where a deep mixture of experts (DeepSeek-V3's 61 layers) is past the cap at the probe's widths."""
        base = self.original.to_dict()
        changes = dict(self.changes)
        for k in _FFN_KEYS:
            if isinstance(changes.get(k, base.get(k)), int):
                changes[k] = min(changes.get(k, base.get(k)), _TINY_FFN // 4)
        for k in _EXPERT_KEYS:
            if isinstance(changes.get(k), int):
                changes[k] = min(changes[k], _TINY_EXPERTS // 2)
        for k, v in base.items():
            if k.endswith("_lora_rank") and isinstance(v, int) and not isinstance(v, bool):
                changes[k] = min(v, _TINY_RANK // 2)
        return _Shrink(self.label + ", narrower", changes, self.original, self.list_kinds)


def _shrinks(config) -> list[_Shrink]:
    """Ways to shrink ``config``, smallest first; the last keeps the original widths."""
    try:
        int(getattr(config, "num_hidden_layers"))
    except (AttributeError, TypeError, ValueError) as e:
        raise _error("the number of decoder layers (config.num_hidden_layers)", cause=e) from e
    base = config.to_dict()
    hid = config_int(config, "hidden_size")
    heads = config_int(config, "num_attention_heads")

    def widths(head_dim: int | None) -> dict[str, Any]:
        """Small widths; ``head_dim=None`` shrinks it too, else keeps it (rotary lists follow it)."""
        if not (isinstance(hid, int) and isinstance(heads, int) and heads > 0):
            return {}
        hd = head_dim or _TINY_HEAD_DIM
        small = {_key(config, "hidden_size"): _TINY_HEADS * hd, _key(config, "num_attention_heads"): _TINY_HEADS}
        kv = config_int(config, "num_key_value_heads")
        if isinstance(kv, int) and kv > 0:
            small[_key(config, "num_key_value_heads")] = _TINY_HEADS if kv >= heads else (1 if kv == 1 else 2)
        if isinstance(base.get("head_dim"), int):
            small["head_dim"] = hd
        if isinstance(base.get("word_embed_proj_dim"), int) and base["word_embed_proj_dim"] == hid:
            small["word_embed_proj_dim"] = _TINY_HEADS * hd
        if isinstance(base.get("rotary_dim"), int):
            small["rotary_dim"] = min(base["rotary_dim"], hd)
        # multi-head latent attention (DeepSeek-V2/V3): its low ranks and per-part head widths are as large as the rest;
        # left whole, one layer held ~2M parameters and a 61-layer replica was past the probe's cap at any shrinking
        for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if isinstance(base.get(k), int) and not isinstance(base[k], bool) and base[k] > 0:
                small[k] = min(base[k], hd // 2 if k == "qk_rope_head_dim" else hd)
        if "qk_rope_head_dim" in small and base.get("head_dim") == base.get("qk_rope_head_dim"):
            small["head_dim"] = small["qk_rope_head_dim"]  # the rotary width, which these configs call head_dim
        if "qk_head_dim" in base and "qk_nope_head_dim" in small:
            small["qk_head_dim"] = small["qk_nope_head_dim"] + small["qk_rope_head_dim"]
        for k, v in base.items():
            if k.endswith("_lora_rank") and isinstance(v, int) and not isinstance(v, bool) and v > _TINY_RANK:
                small[k] = _TINY_RANK
        for k in _FFN_KEYS:
            if isinstance(base.get(k), int):
                small[k] = _TINY_FFN
            elif isinstance(base.get(k), list) and all(isinstance(v, int) for v in base[k]):  # per layer (Gemma-3n)
                small[k] = [min(v, _TINY_FFN) for v in base[k]]
        return small

    experts: dict[str, Any] = {}
    for k in _EXPERT_KEYS:
        if isinstance(base.get(k), int) and base[k] > _TINY_EXPERTS:
            experts[k] = _TINY_EXPERTS
    if experts:
        experts.update({k: min(base[k], _TINY_EXPERTS_PER_TOKEN) for k in _EXPERTS_PER_TOKEN_KEYS if isinstance(base.get(k), int)})
        experts.update({k: 1 for k in _GROUP_KEYS if isinstance(base.get(k), int)})

    vocab_small: dict[str, Any] = {}  # a small vocabulary; the pad id dropped if it falls outside
    vocab_padded: dict[str, Any] = {}  # a small vocabulary that still holds the pad id
    vocab = base.get(_key(config, "vocab_size"))
    # per-layer input embeddings (Gemma-3n/4) have a vocabulary of their own, as large
    extra_vocabs = {k: min(v, _TINY_VOCAB) for k, v in base.items()
                    if k.startswith("vocab_size_") and isinstance(v, int) and not isinstance(v, bool)}
    if isinstance(vocab, int):
        pad = base.get("pad_token_id")  # the one id an embedding checks (padding_idx < vocab)
        vocab_small[_key(config, "vocab_size")] = min(vocab, _TINY_VOCAB)
        if isinstance(pad, int) and pad >= vocab_small[_key(config, "vocab_size")]:
            vocab_small["pad_token_id"] = None
        vocab_padded[_key(config, "vocab_size")] = min(vocab, max(_TINY_VOCAB, pad + 1 if isinstance(pad, int) else 0))
        # the rows a padded vocabulary really uses (Inkling2) stay within the shrunk one: saving pads the head up to it
        # (a replica of an Inkling2 base failed to save, and the check it served said nothing: trial90 F1)
        if isinstance(base.get("unpadded_vocab_size"), int):
            for small in (vocab_small, vocab_padded):
                small["unpadded_vocab_size"] = min(base["unpadded_vocab_size"], small[_key(config, "vocab_size")])
    vocab_small.update(extra_vocabs)
    vocab_padded.update(extra_vocabs)
    head_dim = base.get("head_dim") if isinstance(base.get("head_dim"), int) else (
        hid // heads if isinstance(hid, int) and isinstance(heads, int) and heads > 0 and hid % heads == 0 else None)

    widths_plans = [("shrunk", {**widths(None), **vocab_small})]
    if head_dim and head_dim != _TINY_HEAD_DIM:  # e.g. rotary factor lists sized by head_dim/2
        widths_plans.append(("shrunk, head_dim kept", {**widths(head_dim), **vocab_small}))
    if vocab_padded != {k: v for k, v in vocab_small.items() if k != "pad_token_id"}:
        widths_plans.append(("shrunk, pad id kept", {**widths(None), **vocab_padded}))
    widths_plans.append(("original widths", vocab_padded))
    plans = []
    for label, changes in widths_plans:  # few experts first: a config may tie other sizes to their count
        if experts:
            plans.append((label, {**changes, **experts}))
        plans.append((label + (", all experts" if experts else ""), changes))
    kinds = list_kinds(config)
    return [_Shrink(label, changes, config, kinds) for label, changes in plans]


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



def _weight_dims(module: nn.Module) -> int:
    """Largest number of dims among the module's own and its children's parameters."""
    return max((p.dim() for p in module.parameters()), default=0)


def _layer_signature(layer: nn.Module) -> tuple:
    """What makes two decoder layers the same kind: their class and their module tree."""
    return (type(layer).__name__,) + tuple(sorted((name, type(m).__name__) for name, m in layer.named_modules() if name))


def _layer_lists(model: nn.Module, n: int) -> list[tuple[str, nn.ModuleList]]:
    """Every ModuleList of n modules: the decoder layers are one of them (hybrid stacks mix classes)."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n and n > 0]


def _kinds(layers: nn.ModuleList) -> tuple[list[tuple], list[int]]:
    """(the distinct layer signatures in order of first appearance, each layer's index into them)."""
    signatures: list[tuple] = []
    of_layer: list[int] = []
    for layer in layers:
        sig = _layer_signature(layer)
        if sig not in signatures:
            signatures.append(sig)
        of_layer.append(signatures.index(sig))
    return signatures, of_layer


def _outermost(pairs: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (module path, class) pairs not inside another of them, sorted: ``mlp`` for ``mlp`` and ``mlp.up``."""
    return [(n, c) for n, c in sorted(pairs) if not any(n.startswith(o + ".") for o, _ in pairs if o != n)]


def _kind_labels(signatures: list[tuple], of_layer: list[int], config) -> list[str]:
    """A short name per kind: the class, and what sets the kind apart when several share one."""
    classes = [sig[0] for sig in signatures]
    labels = []
    data = config.to_dict()
    per_layer_str = [v for v in data.values() if isinstance(v, list) and len(v) == len(of_layer) and all(isinstance(x, str) for x in v)]
    for k, sig in enumerate(signatures):
        if classes.count(sig[0]) == 1:
            labels.append(sig[0])
            continue
        layers = [i for i, kk in enumerate(of_layer) if kk == k]
        named = next((vals[layers[0]] for vals in per_layer_str if len({vals[i] for i in layers}) == 1
                      and all(vals[i] != vals[layers[0]] for i, kk in enumerate(of_layer) if kk != k)), None)
        if named is None:
            others = set().union(*(set(s[1:]) for j, s in enumerate(signatures) if j != k))
            top = _outermost(set(sig[1:]) - others)  # (module path, class) pairs only this kind has
            if not top:  # each module is in some other kind: name those not in every other kind of the class (trial47:
                # Llama-4's MoE layers, mixed with dense and with attention-named ones, were labelled "without feed_forward")
                common = set.intersection(*(set(s[1:]) for j, s in enumerate(signatures) if j != k and s[0] == sig[0]))
                top = _outermost(set(sig[1:]) - common)
            if top:
                named = "with " + ", ".join(f"{n}: {c}" for n, c in top[:2])
            else:  # a subset of another kind's modules: say what it lacks
                lacks = [n for n, _ in _outermost(others - set(sig[1:]))]
                named = "without " + ", ".join(lacks[:2]) if lacks else f"kind {k + 1}"
        labels.append(f"{sig[0]} ({named})")
    return labels


class StackProbe:
    """A tiny built instance of the architecture, one probed layer per kind of decoder layer.

    ``layer_kinds``: per layer of the FULL-depth stack, its kind (an index into ``layers``);
    found on the meta device, where building costs no memory. The tiny instance that runs has just
    enough layers to hold the first layer of every kind (per-layer config lists cut to match).
    """

    def __init__(self, model: nn.Module, config, config_label: str, layers_path: str,
                 layers: list["LayerProbe"], layer_kinds: list[int], labels: list[str]):
        self.model, self.config, self.config_label = model, config, config_label
        self.layers_path, self.layers, self.layer_kinds, self.labels = layers_path, layers, layer_kinds, labels

    @property
    def first(self) -> "LayerProbe":
        """The probe of layer 0's kind."""
        return self.layers[self.layer_kinds[0]]

    @classmethod
    def build(cls, config, trust_remote_code: bool) -> "StackProbe":
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # shrunk configs make transformers chatty
        try:
            return cls._build(config, trust_remote_code, AutoModelForCausalLM)
        finally:
            hf_logging.set_verbosity(verbosity)

    @classmethod
    def _build(cls, config, trust_remote_code: bool, auto_cls) -> "StackProbe":
        if not _has_causal_lm(config, auto_cls):
            # fail fast: transformers would import every model module to say the same
            raise _error(f"a causal-LM class for {type(config).__name__} (model_type "
                         f"{getattr(config, 'model_type', '') or 'unset'!r}; not registered with "
                         f"AutoModelForCausalLM and no auto_map)")
        problems: list[str] = []
        n_full = int(config.num_hidden_layers)
        for shrink in _shrinks(config):
            try:
                probe = cls._from_shrink(shrink, n_full, trust_remote_code, auto_cls)
            except AnatomyError:
                raise
            except _Skip as e:
                problems.append(f"{shrink.label}: {e}")
                continue
            if probe is not None:
                return probe
        hint = "" if trust_remote_code else " (if the architecture ships its own code, pass trust_remote_code=True)"
        raise _error(f"a buildable tiny model of model_type {getattr(config, 'model_type', '?')!r}{hint}",
                     cause="; ".join(problems))

    @classmethod
    def _from_shrink(cls, shrink: _Shrink, n_full: int, trust_remote_code: bool, auto_cls) -> "StackProbe":
        try:
            full_cfg = shrink.config(n_full)
            with torch.device("meta"):
                meta = _build_model(auto_cls, full_cfg, trust_remote_code, to_cpu=False)
        except Exception as e:
            raise _Skip(f"config or model refused: {type(e).__name__}: {str(e).strip()[:200]}") from e
        lists = _layer_lists(meta, n_full)
        if not lists:
            raise _error(f"a ModuleList of num_hidden_layers={n_full} decoder layers in {type(meta).__name__}")
        kinds = {name: _kinds(lst) for name, lst in lists}
        # enough layers to hold the first layer of every kind of every candidate list
        n_tiny = max(max(of_layer.index(k) for k in range(len(sigs))) for sigs, of_layer in kinds.values()) + 1
        n_tiny = max(n_tiny, min(n_full, 2))
        # the full depth too when fewer layers build other kinds (Gemma-3n shares KV caches among its last layers)
        depths = [n_tiny] + ([n_full] if n_full != n_tiny else [])
        sizes = {n: _params_with_layers(meta, lists, n) for n in depths}
        del meta
        if sizes[n_tiny] > _MAX_PROBE_PARAMS:
            raise _Skip(f"{sizes[n_tiny] / 1e6:.0f}M parameters at these widths: too large to probe")
        failure: Exception | None = None
        for n in depths:
            if sizes[n] > _MAX_PROBE_PARAMS:
                break
            # eager attention first (its softmax is an op of its own); a model whose eager path does
            # not run where its default one does (DeepSeek-V3 with fewer key/value heads) gets the default
            for attn in ("eager", None):
                try:
                    cfg = shrink.config(n)
                    model = _build_model(auto_cls, cfg, trust_remote_code, attn_implementation=attn)
                except Exception as e:
                    failure = _Skip(f"building {getattr(shrink.original, 'model_type', '?')} failed: {type(e).__name__}: {str(e).strip()[:200]}")
                    if n != depths[-1]:
                        # a config that ties its layer pattern to the depth (Gemma-4's num_kv_shared_layers: the last
                        # layers read caches only earlier layers of each type make) may build only at its full depth
                        break
                    raise failure from e
                tiny_lists = dict(_layer_lists(model, n))
                if any(name in tiny_lists and [sigs[k] for k in of_layer[:n]] != [_layer_signature(m) for m in tiny_lists[name]]
                       for name, (sigs, of_layer) in kinds.items()):
                    failure = _Skip(f"{n} layers build other kinds of layer than the first {n} of {n_full}")
                    break
                try:
                    return cls._capture(model, cfg, shrink.label, tiny_lists, kinds, shrink.original)
                except AnatomyError:
                    raise
                except Exception as e:
                    failure = e if failure is None or isinstance(failure, _Skip) else failure
        if isinstance(failure, _Skip):
            raise failure
        raise _Skip(f"a forward of the tiny model failed: {type(failure).__name__}: {str(failure).strip()[:200]}") from failure

    @classmethod
    def _capture(cls, model: nn.Module, cfg, label: str, lists: dict[str, nn.ModuleList],
                 kinds: dict[str, tuple[list[tuple], list[int]]], original) -> "StackProbe":
        calls: dict[tuple[str, int], dict[str, tuple]] = {}
        outputs: dict[tuple[str, int], dict[str, Any]] = {}
        hooks = []

        def before(store: dict, key: str):
            def hook(module, args, kwargs):
                store.setdefault(key, (args, kwargs))
            return hook

        def after(store: dict, key: str):
            def hook(module, args, output):
                store.setdefault(key, output)
            return hook

        for name, lst in lists.items():
            sigs, of_layer = kinds[name]
            for k in range(len(sigs)):
                i = of_layer.index(k)
                store, outs = calls.setdefault((name, i), {}), outputs.setdefault((name, i), {})
                for sub_name, sub in lst[i].named_modules():
                    hooks.append(sub.register_forward_pre_hook(before(store, sub_name), with_kwargs=True))
                    hooks.append(sub.register_forward_hook(after(outs, sub_name)))
        vocab = getattr(cfg, "vocab_size", None) or 2
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, max(2, min(int(vocab), 1000)), (1, _SEQ), generator=g)
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        if not lists:
            raise _error(f"the decoder layers of {type(model).__name__}: no list of {cfg.num_hidden_layers} modules (num_hidden_layers) "
                         f"in a build with that many; its layer count follows another config key")
        called = [name for name in lists if "" in calls.get((name, 0), {})]
        # prefer the list whose first layer takes hidden states; shortest path on ties
        called = [n for n in called if _hidden_slot(*calls[(n, 0)][""], None) is not None] or called
        if not called:
            raise _error(f"which ModuleList of {type(model).__name__} holds the decoder layers (none of "
                         f"{list(lists)} was called by a forward)")
        path = min(called, key=lambda n: (n.count("."), len(n)))
        sigs, of_layer = kinds[path]
        labels = _kind_labels(sigs, of_layer, original)
        probes = []
        for k in range(len(sigs)):
            i = of_layer.index(k)
            if "" not in calls[(path, i)]:
                raise _error(f"the call of layer {i} ({labels[k]}): the forward did not run it")
            probes.append(LayerProbe(lists[path][i], i, path, cfg, calls[(path, i)], outputs[(path, i)], labels[k]))
        return cls(model, cfg, label, path, probes, of_layer, labels)


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs whole graphs when a trace goes wrong, and prints the partial graph to stderr
    (DBRX's experts loop: 600 lines before validate's answer): a refusal must stay one or two lines."""
    loggers = [logging.getLogger(name) for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx",
                                                     "torch._subclasses", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _Skip(Exception):
    """This way of shrinking the config does not give a usable probe: try the next."""


def _params_with_layers(meta: nn.Module, lists: list[tuple[str, nn.ModuleList]], n_layers: int) -> int:
    """Parameters of ``meta`` if each of its layer lists kept only its first ``n_layers`` layers."""
    total = sum(p.numel() for p in meta.parameters())
    for _, lst in lists:
        total -= sum(p.numel() for layer in lst[n_layers:] for p in layer.parameters())
    return total


class LayerProbe:
    """One decoder layer of the tiny instance (the first of its kind) with its captured calls."""

    def __init__(self, layer: nn.Module, index: int, layers_path: str, config, calls: dict[str, tuple],
                 outputs: dict[str, Any], label: str):
        self.layer = layer.eval()
        self.index, self.layers_path, self.config, self.label = index, layers_path, config, label
        self.layer_class = type(layer).__name__
        self.known: dict[str, Any] = {"layers_path": layers_path, "layer_class": self.layer_class}
        self._flows: dict[str, Any] = {}
        self._export = None
        self._units: list[str] | None = None
        self._roles: dict[str, str] = {}
        self.answers: dict[str, str] = {}  # which source found each projection (for diagnostics)
        largs, lkw = calls[""]
        slot = _hidden_slot(largs, lkw, None)
        if slot is None:
            raise _error(f"the hidden-states input of {self.layer_class}")
        self.layer_call = _Call(tuple(largs), dict(lkw), slot)
        self.d = self.layer_call.hidden().shape[-1]
        self.calls: dict[str, _Call] = {}
        for name, (a, k) in calls.items():
            if name == "":
                continue
            s = _hidden_slot(a, k, None)
            if s is not None:
                self.calls[name] = _Call(tuple(a), dict(k), s)
        self.outputs = outputs  # module path -> what its call returned

    # ---- graphs ----
    def units(self) -> list[str]:
        """The modules the layer's graph is read in: its direct children, except that a child made of
        an attention and norms only, one of them a norm of the child's own input, is read in its own
        children, so that its norms and the residual add between them show (DBRX's ``norm_attn_norm``:
        norm, attention, residual add, norm). Kept whole: an attention whose parts include a norm and a
        token mixer of their own (an MLA's latent norms beside its sparse indexer: they norm no input of
        the attention's own), and a pre-norm BERT's attention, whose output projection is a part of its
        own beside the token mixer (read in parts, the mixer's last linear would be its value projection)."""
        if self._units is None:
            self._units = []
            for name, child in self.layer.named_children():
                inner = [f"{name}.{sub}" for sub, _ in child.named_children() if f"{name}.{sub}" in self.calls]
                own_input = self.calls[name].hidden() if name in self.calls else None
                opens_like_block = own_input is not None and any(
                    self.role(path) == "norm" and self.calls[path].hidden().shape == own_input.shape
                    and torch.equal(self.calls[path].hidden(), own_input) for path in inner)
                roles = [self.role(path) for path in inner]
                only_attention_and_norms = "attention" in roles and set(roles) <= {"attention", "norm"}
                self._units += inner if opens_like_block and only_attention_and_norms else [name]
        return self._units

    def unit_of(self, path: str) -> str | None:
        """The unit (see ``units``) that ``path`` is or lies in; None for the layer itself or a container's own code."""
        return next((u for u in self.units() if path == u or path.startswith(u + ".")), None)

    def flow(self, source: str):
        if source not in self._flows:
            self._flows[source] = _flow_from_fx(self) if source == "fx" else _flow_from_export(self)
        return self._flows[source]

    def export_ready(self) -> bool:
        return self._export is not None

    def exported(self):
        if self._export is None:
            wrapper = _CallWrapper(self.layer, type(self.layer).__call__, self.layer_call)
            with warnings.catch_warnings(), _quiet_torch_logs():
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
                # a shift that is not uniform over the features: a LayerNorm at the module's input would
                # erase a uniform one, and the module would look as if it did not mix tokens
                x2[..., 0, :] += 3.0 * torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0)).to(x.dtype)
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


def _build_model(auto_cls, cfg, trust_remote_code: bool, *, to_cpu: bool = True, attn_implementation: str | None = "eager") -> nn.Module:
    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = auto_cls.from_config(cfg, dtype=torch.float32, **kwargs)
        except (TypeError, ValueError):
            model = auto_cls.from_config(cfg, trust_remote_code=trust_remote_code)
    return model.to("cpu").float().eval() if to_cpu else model


