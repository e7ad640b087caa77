"""A layer's forward as a small data-flow graph of its direct children, from torch.fx or torch.export.

The graph keeps what reading the block needs: the hidden-states input, calls of the layer's
children (of a child's children where ``LayerProbe.units`` says so), residual adds, other ops,
and the output. Both tracers call the layer through
``_CallWrapper``: an explicit ``(hidden_states)`` signature with the captured call's other inputs.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from midus_surgery.anatomy.problems import AnatomyError


def _unwrap(fn: Callable) -> Callable:
    seen = set()
    while hasattr(fn, "__wrapped__") and id(fn) not in seen:
        seen.add(id(fn))
        fn = fn.__wrapped__
    return fn



class _CallWrapper(nn.Module):
    """``forward(hidden_states)`` calling ``fn(module, ...)`` with a captured call's other inputs."""

    def __init__(self, module: nn.Module, fn: Callable, call):
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


def _fx_trace(module: nn.Module, call, leaves: set[nn.Module]) -> fx.Graph:
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
        open_: set[int] = set()  # expanded, ancestors not yet known: meeting one again is a cycle
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
                open_.discard(j)
            else:
                if j in open_:
                    # grouping ops into calls of the layer's children joined two calls of one child
                    raise AnatomyError(f"the layer's graph has a cycle through {self.by_id[j].target or 'an op'} (a module called more than once)")
                open_.add(j)
                stack.append((j, True))
                stack.extend((k, False) for k in ins if k not in self._anc)
        return self._anc[i]

    def closure(self, i: int) -> frozenset[int]:
        return self.anc(i) | {i}


_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}


def _flow_from_fx(probe) -> _Flow:
    leaves = {probe.layer.get_submodule(unit) for unit in probe.units()}
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


def _residual_inside(node: fx.Node, key: Any, group_of: dict[fx.Node, Any], alias: dict[fx.Node, fx.Node], unit: str) -> bool:
    """Whether ``node``, an add inside the call ``key`` of ``unit``, is that module's residual add: the
    last thing it computes (nothing of the child uses its sum), joining a value from outside the
    child (the residual stream, handed in as an argument) with one the child computed. BLOOM's
    attention and MLP and MPT's MLP take the residual and add it themselves: lifted out of the
    call, such an add reads as the layer's own residual add."""
    sides = [group_of.get(alias.get(a, a)) for a in node.all_input_nodes]
    if len(sides) != 2 or key not in sides or all(side == key for side in sides) or None in sides:
        return False
    return not any(_inside(_module_path_of(u), unit) for u in _users(node, alias) if u.op == "call_function")


def _inside(path: str, unit: str) -> bool:
    return path == unit or path.startswith(unit + ".")


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


def _is_add(node: fx.Node) -> bool:
    return str(node.target).startswith(("aten.add.", "aten.add_."))


def _users(node: fx.Node, alias: dict[fx.Node, fx.Node]) -> list[fx.Node]:
    """The nodes that use ``node``'s value, looking through the aliases of it."""
    found, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        if user in alias:
            stack.extend(user.users)
        else:
            found.append(user)
    return found


def _flow_from_export(probe) -> _Flow:
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
            unit = probe.unit_of(_module_path_of(node))
            if unit:
                stack = node.meta.get("nn_module_stack") or {}
                call_key = next((k for k, v in stack.items() if v[0] in (f"mod.{unit}", unit)), unit)
                key = ("call", unit, call_key)
                if _is_add(node) and _residual_inside(node, key, group_of, alias, unit):
                    key = ("node", node.name)  # the residual add of a child that is handed the stream (BLOOM, MPT)
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
            kind = "add" if _is_add(members[key][0]) and len(ins) >= 2 else "op"
            target = None
        nodes.append(_Node(ids[key], kind, target, ins))
    if sum(n.kind == "input" for n in nodes) != 1:
        raise AnatomyError("export graph has no single hidden-states input")
    return _Flow(nodes)


