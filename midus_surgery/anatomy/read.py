"""Reading the block anatomy off a layer's data-flow graph (see ``trace`` for the method)."""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from midus_surgery.anatomy.graph import _CallWrapper, _export_alias_map, _Flow, _fx_trace, _module_path_of
from midus_surgery.anatomy.probe import _first_tensor, _quiet_torch_logs
from midus_surgery.anatomy.problems import AnatomyError, _error
from midus_surgery.errors import one_line
from midus_surgery.recipe.anatomy_spec import Anatomy


def _anatomy_from_flow(probe, flow: _Flow, source: str) -> Anatomy:
    known = dict(probe.known)
    calls = [n for n in flow.nodes if n.kind == "call"]
    role = {n.id: probe.role(n.target) for n in calls}
    major = {i for i, r in role.items() if r in ("major", "attention")}
    norms = {i for i, r in role.items() if r == "norm"}
    att_nodes = [n for n in calls if role[n.id] == "attention"]
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
    if not branches and _reaches_without_modules(flow, inp.id, out.id):  # no `anatomy:` can help: say what no block of it can do
        raise AnatomyError(f"Could not find the residual adds of {probe.layer_class}: no add joins the layer input with a module's "
                           "output, and the input reaches the output only through other operations (mixed, as DeepSeek-V4's "
                           "hyper-connections mix the residual streams with a learned matrix), so no copy of this layer can start as "
                           "the identity: identity and memory blocks cannot be inserted into this model; plain copies (DUS, kind: copy) can.")
    if not att_nodes and len(branches) == 1 and major and major <= branches[0][1]:
        # one residual branch, with every module with weights on it, and no token mixer: an FFN alone (Nemotron-H's MLP and
        # MoE layers, x + mlp(norm(x))). Identity blocks zero its output projections; no memory block reads heads from it.
        return _ffn_only_anatomy(probe, flow, branches[0][1], major, norms, source, known)
    if not att_nodes:
        raise _error(f"an attention module in {probe.layer_class} (no child mixes tokens: children called "
                     f"{[n.target for n in calls]})", known)
    A = att_nodes[0]
    attention = A.target
    known["attention"] = attention
    if not branches:
        raise _error(f"the residual adds of {probe.layer_class} (no add joins the layer input with a module's output)", known)

    a_branch = next((k for k, (_, b) in enumerate(branches) if A.id in b), None)
    if a_branch is None:
        raise _error(f"the residual branch of {attention!r} in {probe.layer_class}", known)
    a_nodes = branches[a_branch][1]
    attn_side = {j for j in a_nodes if j == A.id or j in flow.anc(A.id) or A.id in flow.anc(j)}
    ffn_ids = sorted(i for i in major if i != A.id and i not in attn_side and any(i in b for _, b in branches))
    if not ffn_ids and len(branches) == 1 and a_branch == 0 and major == {A.id}:
        # one residual branch, the token mixer's, and no other module with weights (Mamba's x + mixer(norm(x)),
        # Nemotron-H's attention blocks): an identity block zeroes the mixer's output projection; a memory block has no
        # FFN to stand in for (memory_facts). An FFN the graph shows on no branch (MPT's adds the residual inside
        # itself) is not this: the export graph, which sees inside it, reads that block
        return _mixer_only_anatomy(probe, flow, A, a_nodes, norms, source, known)
    if not ffn_ids:
        raise _error(f"an FFN in {probe.layer_class} (no module with weights besides the attention {attention!r} "
                     f"feeds a residual add)", known)
    # The FFN is the first branch after the attention's (or shares it: Falcon's parallel form);
    # further branches (Gemma-4's per-layer input) are extra: identity blocks zero their output too.
    branch_of = {i: next(k for k, (_, b) in enumerate(branches) if i in b) for i in ffn_ids}
    ffn_branch = min((k for k in branch_of.values() if k != a_branch), default=a_branch)
    extra_ids = [i for i in ffn_ids if branch_of[i] not in (ffn_branch, a_branch)]
    ffn_ids = [i for i in ffn_ids if i not in extra_ids]
    # A module with weights ahead of the FFN branch's own norm is the stream's, not the FFN's: HunYuan-V4's
    # hyper-connection (ffn_hc) folds the residual streams into the branch input and returns the weights its
    # output is written back with. A memory block keeps it, as every block keeps attn_hc before the attention's norm.
    branch_norms = [j for j in norms if j in branches[ffn_branch][1]]
    ahead = {i for i in ffn_ids if any(i in flow.anc(j) and any(j in flow.anc(f) for f in ffn_ids) for j in branch_norms)}
    if len(ahead) < len(ffn_ids):
        ffn_ids = [i for i in ffn_ids if i not in ahead]
    ffn = tuple(dict.fromkeys(flow.by_id[i].target for i in ffn_ids))
    known["ffn"] = list(ffn)
    f_branches = {k for k, (_, b) in enumerate(branches) if set(ffn_ids) & b}
    residual = "sequential" if A.id in flow.anc(ffn_ids[0]) else "parallel"
    known["residual"] = residual

    def related_to_ffn(j: int, b: frozenset[int]) -> bool:
        return any(j == f or j in flow.anc(f) or f in flow.anc(j) for f in ffn_ids if f in b)

    attn_norm_ids: list[int] = [j for j in sorted(a_nodes) if j in norms and j in attn_side]
    attn_post_ids = [j for j in attn_norm_ids if A.id in flow.anc(j)]  # on the branch, after the attention (Gemma-2)
    ffn_norm_ids: list[int] = []
    for k in sorted(f_branches):
        b = branches[k][1]
        ffn_norm_ids += [j for j in sorted(b) if j in norms and related_to_ffn(j, b)]
    for k, js in stream_norms:  # post-LN: a norm on the stream right after a branch's add
        (attn_norm_ids if k == a_branch else ffn_norm_ids if k in f_branches else []).extend(sorted(js))
    names = lambda ids: tuple(dict.fromkeys(flow.by_id[j].target for j in ids))  # noqa: E731
    attn_norms, ffn_norms, attn_post_norms = names(attn_norm_ids), names(ffn_norm_ids), names(attn_post_ids)
    known.update(attn_norms=list(attn_norms), ffn_norms=list(ffn_norms))

    attn_out_proj = _last_linear(probe, attention, source, known, "attn_out_proj")
    known["attn_out_proj"] = attn_out_proj
    last = ffn[-1]
    if _is_linear_leaf(probe.layer.get_submodule(last)):
        ffn_down_proj = last  # the FFN is a set of modules (OPT): its last linear is one of them
    else:
        ffn_down_proj = _last_linear(probe, last, source, known, "ffn_down_proj")
    out_biases = _out_biases(probe, attention, attn_out_proj)
    if not _is_linear_leaf(probe.layer.get_submodule(last)):
        out_biases += _out_biases(probe, last, ffn_down_proj)
    extra = []
    for k in sorted({branch_of[i] for i in extra_ids}):
        last_extra = flow.by_id[max(i for i in extra_ids if branch_of[i] == k)].target
        extra.append(last_extra if _is_linear_leaf(probe.layer.get_submodule(last_extra))
                     else _last_linear(probe, last_extra, source, known, "extra_out_projs"))
    return Anatomy(layers_path=probe.layers_path, layer_class=probe.layer_class, attention=attention,
                   attn_out_proj=attn_out_proj, ffn=ffn, ffn_down_proj=ffn_down_proj, attn_norms=attn_norms,
                   ffn_norms=ffn_norms, attn_post_norms=attn_post_norms, residual=residual, source=source, extra_out_projs=tuple(extra),
                   out_biases=out_biases)


def _mixer_only_anatomy(probe, flow: _Flow, A, a_nodes: frozenset[int], norms: set[int], source: str, known: dict) -> Anatomy:
    """The anatomy of a block whose one residual branch is its token mixer: no FFN."""
    attention = A.target
    attn_norms = tuple(dict.fromkeys(flow.by_id[j].target for j in sorted(a_nodes) if j in norms))
    attn_post_norms = tuple(dict.fromkeys(flow.by_id[j].target for j in sorted(a_nodes) if j in norms and A.id in flow.anc(j)))
    known.update(ffn=[], attn_norms=list(attn_norms), ffn_norms=[])
    attn_out_proj = _last_linear(probe, attention, source, known, "attn_out_proj")
    return Anatomy(layers_path=probe.layers_path, layer_class=probe.layer_class, attention=attention, attn_out_proj=attn_out_proj,
                   ffn=(), ffn_down_proj=None, attn_norms=attn_norms, ffn_norms=(), attn_post_norms=attn_post_norms,
                   residual="sequential", source=source, out_biases=_out_biases(probe, attention, attn_out_proj))


def _ffn_only_anatomy(probe, flow: _Flow, branch: frozenset[int], major: set[int], norms: set[int], source: str, known: dict) -> Anatomy:
    """The anatomy of a block whose one residual branch is an FFN and which mixes no tokens: no attention."""
    ffn = tuple(dict.fromkeys(flow.by_id[i].target for i in sorted(major)))
    ffn_norms = tuple(dict.fromkeys(flow.by_id[j].target for j in sorted(branch) if j in norms))
    known.update(attention=None, ffn=list(ffn), attn_norms=[], ffn_norms=list(ffn_norms), residual="sequential")
    last = ffn[-1]
    down = last if _is_linear_leaf(probe.layer.get_submodule(last)) else _last_linear(probe, last, source, known, "ffn_down_proj")
    out_biases = () if _is_linear_leaf(probe.layer.get_submodule(last)) else _out_biases(probe, last, down)
    return Anatomy(layers_path=probe.layers_path, layer_class=probe.layer_class, attention=None, attn_out_proj=None, ffn=ffn,
                   ffn_down_proj=down, attn_norms=(), ffn_norms=ffn_norms, residual="sequential", source=source, out_biases=out_biases,
                   mixer="none")


def _reaches_without_modules(flow: _Flow, source: int, target: int) -> bool:
    """Whether ``source`` reaches ``target`` through operations alone, no child module in between: the residual
    stream of a layer that mixes it (DeepSeek-V4: comb^T @ streams), not one that hands it to a module which
    adds it (BERT's output modules)."""
    seen, todo = set(), [target]
    while todo:
        node = flow.by_id[todo.pop()]
        if node.id == source:
            return True
        if node.id in seen or (node.kind == "call" and node.id != target):
            continue
        seen.add(node.id)
        todo.extend(node.inputs)
    return False


def _is_linear_leaf(module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False)) and not any(True for _ in module.children())


def _last_linear(probe, path: str, source: str, known: dict, field_name: str) -> str:
    """The module with a >= 2-D weight nearest to ``path``'s output (walking the data flow back)."""
    errors = []
    finders = ([("fx", _last_linear_fx)] if source == "fx" else []) + [
        ("export", _last_linear_export), ("export alone", _last_linear_export_alone), ("run", _last_weight_run)]
    for name, find in finders:  # HF attention code is rarely fx-traceable: the export graph answers then
        try:
            found = find(probe, path)
        except Exception as e:
            errors.append(f"{name}: {one_line(e, 150)}")
            continue
        probe.answers[field_name] = name
        return found
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


def _last_linear_fx(probe, path: str) -> str:
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


def _last_linear_export(probe, path: str) -> str:
    return _last_linear_in(probe.exported(), path)


def _last_linear_export_alone(probe, path: str) -> str:
    """The module exported alone on its captured call: where the whole layer does not export (DBRX's
    experts loop over the experts a batch hits, a data-dependent count)."""
    module = probe.layer.get_submodule(path)
    call = probe.calls[path]
    with warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        ep = torch.export.export(_CallWrapper(module, type(module).__call__, call), (call.hidden(),), strict=False)
    return f"{path}.{_last_linear_in(ep, '')}"


_ADD_OPS = ("aten.add.", "aten.add_.", "aten.sub.", "aten.sub_.")


def _out_biases(probe, path: str, projection: str) -> tuple[str, ...]:
    """The 1-D parameters of module ``path`` that it adds to its output after its last linear
    ``projection`` (JetMoE's mixtures add a bias of their own after the experts' output projection):
    an identity block zeroes them with the projection, or the branch adds them. Found by running
    the module with its ops logged and walking back from its output through floating-point values,
    stopping at any op that reads a >= 2-D weight. () where the module has no such parameter."""
    module = probe.layer.get_submodule(path)
    rel = projection[len(path) + 1:] if projection.startswith(path + ".") else None
    candidates = {p.untyped_storage().data_ptr(): name for name, p in module.named_parameters()
                  if p.dim() == 1 and p.is_floating_point() and not (rel and (name == rel or name.startswith(rel + ".")))}
    if not candidates or path not in probe.calls:
        return ()
    weights = {p.untyped_storage().data_ptr() for p in module.parameters() if p.dim() >= 2}
    try:
        out, producer = _run_logged(probe, path)
    except Exception:  # noqa: BLE001 - a module that does not run alone: none found (the replica check still judges the block)
        return ()

    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def bias_of(t: torch.Tensor) -> str | None:
        """The candidate ``t`` is, or is re-laid out from (a cast, a view, a broadcast)."""
        for _ in range(4):
            if storage(t) in candidates:
                return candidates[storage(t)]
            step = producer.get(id(t))
            if step is None or not step[0].startswith(_RELAYOUT_OPS) or not step[1]:
                return None
            t = step[1][0]
        return None

    found: list[str] = []
    seen: set[int] = set()
    stack = [out] if out is not None else []
    while stack:
        t = stack.pop()
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        step = producer.get(id(t))
        if step is None:
            continue
        name, inputs, _ = step
        if any(storage(a) in weights for a in inputs):
            continue  # a linear: what lies behind it is not added after the last one
        if name.startswith(_ADD_OPS):
            found += [b for b in map(bias_of, inputs) if b and b not in found]
        stack += [a for a in inputs if storage(a) not in candidates]
    return tuple(f"{path}.{name}" for name in found)


def _last_weight_run(probe, path: str) -> str:
    """The module run alone on its captured call with its ops logged (no tracer has to follow a loop
    over the experts a batch hits, as DBRX's): the >= 2-D parameter nearest its output, walking back
    from the output. Its module's path; the parameter's own where that module holds several (DBRX's
    experts keep w1, v1 and w2 side by side: an identity block zeroes w2 alone, so that gradients
    still reach w1 and v1)."""
    module = probe.layer.get_submodule(path)
    weights = {p.untyped_storage().data_ptr(): name for name, p in module.named_parameters() if p.dim() >= 2}
    out, producer = _run_logged(probe, path)
    if out is None:
        raise AnatomyError(f"{path!r} returned no tensor")
    by_id = {id(t): t for _, inputs, _ in producer.values() for t in inputs}
    by_id[id(out)] = out

    def hit(tid: int) -> str | None:
        t = by_id[tid]
        return weights.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None

    found = _backward_first([id(out)], lambda tid: [id(a) for a in producer.get(tid, ("", []))[1]], hit)
    if found is None:
        raise AnatomyError(f"no weight on the way to the output of {path!r}")
    owner = found.rpartition(".")[0]
    owner_module = module.get_submodule(owner) if owner else module
    several = sum(p.dim() >= 2 for p in owner_module.parameters(recurse=False)) > 1
    return ".".join(part for part in (path, found if several else owner) if part)


def _last_linear_in(ep, path: str) -> str:
    """The module with a >= 2-D weight nearest to the output of ``path`` ('': the exported module itself)
    in the export graph ``ep``."""
    params = ep.graph_signature.inputs_to_parameters
    alias = _export_alias_map(ep)

    def inside(n: fx.Node) -> bool:
        p = _module_path_of(n) if n.op == "call_function" else ""
        return n.op == "call_function" if not path else (p == path or p.startswith(path + "."))

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
            if (owner.startswith(path + ".") if path else owner) and isinstance(val, torch.Tensor) and val.dim() >= 2:
                return owner
        return None

    found = _backward_first(outs, lambda n: [a for a in (alias.get(x, x) for x in n.all_input_nodes) if a in member_set], hit)
    if found is None:
        raise AnatomyError(f"no linear inside {path!r} in the export graph")
    return found


# --------------------------------------------------------------------------------------------
# What a memory block needs beyond the module names: softmax attention, its head geometry, and
# the FFN's calling convention. Found by running the module alone on its captured call, with
# every aten op it runs logged (a dispatch mode: no tracer has to understand the code).
# --------------------------------------------------------------------------------------------

_ATTENTION_OP_WORDS = ("softmax", "scaled_dot_product", "flash_attention", "flex_attention", "efficient_attention")
# ops that hand on their input's values re-laid out: walked through back from the output projection
_RELAYOUT_OPS = ("aten.view.", "aten._unsafe_view.", "aten.reshape.", "aten.clone.", "aten.contiguous.", "aten.transpose.",
                 "aten.permute.", "aten._to_copy.", "aten.alias.", "aten.flatten.", "aten.expand.", "aten.squeeze.", "aten.unsqueeze.")


class _OpLog(TorchDispatchMode):
    """Every aten op run inside: (op name, its tensor inputs, its output)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[torch.Tensor], Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        self.ops.append((str(func), inputs, out))
        return out


def _producers(log: _OpLog) -> dict[int, tuple[str, list[torch.Tensor], torch.Tensor]]:
    """id of each tensor an op made -> (the op's name, its tensor inputs, the tensor, held so that its id stays its
    own): what a walk back from an output follows."""
    return {id(t): (name, inputs, t) for name, inputs, result in log.ops
            for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)}


def _run_logged(probe, path: str) -> tuple[torch.Tensor | None, dict]:
    """Module ``path`` run alone on its captured call with its ops logged: (its first output tensor, ``_producers``)."""
    module, call = probe.layer.get_submodule(path), probe.calls[path]
    log = _OpLog()
    with torch.no_grad(), log:
        out = _first_tensor(module(*call.args, **call.kwargs))
    return out, _producers(log)


def _logged_run(probe, attention: str, out_proj: str) -> tuple[_OpLog, torch.Tensor | None]:
    """Run ``attention`` alone on its captured call, logging its ops and catching what ``out_proj`` receives."""
    seen: list[torch.Tensor] = []
    handle = probe.layer.get_submodule(out_proj).register_forward_pre_hook(
        lambda module, args: seen.append(args[0]) if args and isinstance(args[0], torch.Tensor) else None)
    log = _OpLog()
    try:
        with torch.no_grad(), log:
            probe.run(attention, probe.calls[attention].hidden())
    finally:
        handle.remove()
    return log, (seen[0] if seen else None)


def _head_split(log: _OpLog, handed: torch.Tensor) -> tuple[int, int] | None:
    """(heads, head width) of the per-head outputs the output projection received, concatenated:
    walking back from what it got, through re-layout and elementwise ops, to a tensor [..., H, d]
    with H*d its width."""
    producer = _producers(log)
    width = handed.shape[-1]
    t = handed
    for _ in range(32):
        if t.dim() >= 3 and t.shape[-1] != width and t.shape[-1] * t.shape[-2] == width:
            return int(t.shape[-2]), int(t.shape[-1])
        step = producer.get(id(t))
        if step is None or not step[1]:
            return None
        name, inputs, _ = step
        if name.startswith(_RELAYOUT_OPS):
            t = inputs[0]
        else:  # an elementwise op (an output gate: Qwen3-Next): on along its input shaped as its output
            same = [a for a in inputs if a.shape == t.shape]
            if not same:
                return None
            t = same[0]
    return None


def _heads_key(config, heads: int) -> str | None:
    """The config key whose value is the traced head count (num_attention_heads first)."""
    data = config.to_dict()
    preferred = getattr(config, "attribute_map", {}).get("num_attention_heads", "num_attention_heads")
    if data.get(preferred) == heads:
        return preferred
    found = [k for k, v in data.items() if v == heads and isinstance(v, int) and "head" in k
             and not any(w in k for w in ("kv", "key_value", "dim", "size"))]
    return found[0] if len(found) == 1 else None


def _parallel_ffn_parts(probe, ffn: tuple[str, ...]) -> list[str]:
    """The FFN's modules, when two of them read the very same input (GraniteMoeShared's ``block_sparse_moe(h) +
    shared_mlp(h)``); empty for one module or a chain, where each reads the one before's output."""
    if len(ffn) < 2 or any(m not in probe.calls for m in ffn):
        return []
    inputs = [probe.calls[m].hidden() for m in ffn]
    same = [m for m, x in zip(ffn[:-1], inputs[:-1])
            if x is inputs[-1] or (isinstance(x, torch.Tensor) and isinstance(inputs[-1], torch.Tensor)
                                   and x.shape == inputs[-1].shape and torch.equal(x, inputs[-1]))]
    return [*same, ffn[-1]] if same else []


def _output_form(out, like: torch.Tensor | None) -> str | None:
    """How an FFN's output ``out`` is laid out against its input ``like``: "same" shape, "flat"
    (the tokens flattened into one axis, [tokens, hidden]: Llama-4's mixture of experts), or None."""
    if not isinstance(out, torch.Tensor) or like is None:
        return None
    if out.shape == like.shape:
        return "same"
    if like.dim() > 2 and out.shape == (like.numel() // like.shape[-1], like.shape[-1]):
        return "flat"
    return None


def _residual_argument(probe, path: str, down_proj: str) -> int | str | None:
    """The argument of ``path``'s call that hands in the residual stream when the module adds it to
    its output itself (BLOOM's and MPT's MLP take ``(hidden, residual)``): zeroing that argument
    takes exactly its value off the output. 0 when the module adds its own input to its last
    linear's output (``down_proj``, inside it: CPM-Ant's FFN block). None when it adds neither (the
    layer adds the residual); "unreadable" when one does but the hidden states are not the first
    positional argument (the memory readout's calling convention)."""
    call = probe.calls.get(path)
    if call is None:
        return None
    module = probe.layer.get_submodule(path)
    last: list[torch.Tensor] = []
    try:
        target = probe.layer.get_submodule(down_proj) if down_proj.startswith(path + ".") else None
    except AttributeError:  # a weight, not a module (DBRX's experts hold w1, v1 and w2 in one module)
        target = None
    hook = target.register_forward_hook(lambda m, a, o: last.append(o)) if target is not None else None
    try:
        with torch.no_grad():
            out = _first_tensor(module(*call.args, **call.kwargs))
    finally:
        if hook is not None:
            hook.remove()
    if out is None:
        return None
    own = call.hidden()
    if len(last) == 1 and isinstance(last[0], torch.Tensor) and last[0].shape == out.shape == own.shape:
        scale = own.abs().max().item() + 1e-12
        if torch.allclose(out - last[0], own, rtol=0, atol=1e-5 * scale):
            return 0 if call.slot == ("arg", 0) else "unreadable"
    slots = [("arg", i, a) for i, a in enumerate(call.args)] + [("kw", k, v) for k, v in call.kwargs.items()]
    for kind, where, value in slots:
        if (kind, where) == call.slot or not isinstance(value, torch.Tensor) or value.shape != out.shape:
            continue
        args, kwargs = list(call.args), dict(call.kwargs)
        if kind == "arg":
            args[where] = torch.zeros_like(value)
        else:
            kwargs[where] = torch.zeros_like(value)
        with torch.no_grad():
            without = _first_tensor(module(*args, **kwargs))
        scale = value.abs().max().item() + 1e-12
        if without is not None and without.shape == out.shape and torch.allclose(out - without, value, rtol=0, atol=1e-5 * scale):
            if call.slot != ("arg", 0):
                return "unreadable"
            return where
    return None


def memory_facts(probe, anatomy: Anatomy) -> tuple[dict[str, Any], str | None]:
    """What a memory block made from this layer needs beyond the names, as Anatomy fields, and
    why one cannot be made (None when it can)."""
    facts: dict[str, Any] = {}
    if anatomy.attention is None:
        return {"mixer": "none"}, (f"it has no token mixer (its one residual branch is its FFN {', '.join(map(repr, anatomy.ffn))}): the memory reads "
                                   "attention heads\nIdentity and copy blocks of it can be inserted.")
    try:
        log, handed = _logged_run(probe, anatomy.attention, anatomy.attn_out_proj)
    except Exception as e:  # noqa: BLE001 - a module that does not run alone: no memory from it
        return {"mixer": "other"}, f"its attention {anatomy.attention!r} does not run alone on its captured inputs ({one_line(e, 120)})"
    softmax = any(any(w in name for w in _ATTENTION_OP_WORDS) for name, _, _ in log.ops)
    facts["mixer"] = "attention" if softmax else "other"
    if not softmax:
        return facts, f"its token mixer {anatomy.attention!r} is not softmax attention (a convolution, linear attention or state-space layer): the memory reads attention heads"
    # a block whose one residual branch is its attention (Nemotron-H's attention layers) has no FFN facts to read: its memory
    # readout stands in for the attention's output projection (modeling_midus.HeadsReadout)
    problem = _ffn_facts(probe, anatomy, facts) if anatomy.ffn else None
    if problem:
        return facts, problem
    split = _head_split(log, handed) if handed is not None else None
    if split is None:
        return facts, f"the per-head outputs that {anatomy.attn_out_proj!r} receives could not be traced to [..., heads, head_dim]"
    heads, head_dim = split
    key = _heads_key(probe.config, heads)
    if key is None:
        return facts, f"{anatomy.attn_out_proj!r} receives {heads} heads of width {head_dim}, but no config key holds the head count {heads}"
    facts["heads_key"] = key
    weight = getattr(probe.layer.get_submodule(anatomy.attn_out_proj), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] != heads * head_dim and weight.shape[0] == heads * head_dim:
        facts["out_proj_in_axis"] = 0  # GPT-2's Conv1D: [in, out]
    return facts, None


def _ffn_facts(probe, anatomy: Anatomy, facts: dict[str, Any]) -> str | None:
    """Add to ``facts`` how the FFN a memory readout stands in for is called and returns; why it cannot be, or None."""
    parallel = _parallel_ffn_parts(probe, anatomy.ffn)
    if parallel:
        # a memory readout stands in for the last part and the others become pass-throughs: in a sum each would add its
        # input again, a block computing about twice its input that accept_function_change still wrote (trial68)
        return (f"its FFN is parts that each read the same input and add their outputs ({', '.join(parallel)}): a memory block "
                "stands in for a single FFN module\nIdentity and copy blocks of it can be inserted.")
    ffn_out = probe.outputs.get(anatomy.ffn[-1])
    ffn_in = probe.calls[anatomy.ffn[-1]].hidden() if anatomy.ffn[-1] in probe.calls else None
    if isinstance(ffn_out, (tuple, list)):
        at = next((i for i, o in enumerate(ffn_out) if _output_form(o, ffn_in)), None)
        if at is None:
            return f"its FFN {anatomy.ffn[-1]!r} returns a {type(ffn_out).__name__} without a tensor shaped like its input"
        facts["ffn_tuple"] = (len(ffn_out), at)
        ffn_out = ffn_out[at]
    elif not isinstance(ffn_out, torch.Tensor):
        return f"its FFN {anatomy.ffn[-1]!r} returns a {type(ffn_out).__name__}, not a tensor or tuple"
    if _output_form(ffn_out, ffn_in) == "flat":
        facts["ffn_flat"] = True
    residual = _residual_argument(probe, anatomy.ffn[-1], anatomy.ffn_down_proj)
    if residual == "unreadable":
        return f"its FFN {anatomy.ffn[-1]!r} adds the residual stream itself, but its hidden states are not its first argument"
    if residual is not None:
        facts["ffn_residual"] = residual
    return None
