"""What the decoder blocks of an architecture are made of, found from their graphs.

The ``Anatomy`` names (relative to one decoder layer) the modules that surgery touches. Hybrid
stacks have several kinds of layer (attention mixed with convolution, linear-attention or
state-space layers; dense FFNs mixed with experts), so the ``StackAnatomy`` holds one per kind
and says which kind each layer is (``find_stack_anatomy``). It can be stated in a recipe
(``anatomy:``, one kind) when tracing fails, and is written into the emitted config so loading
never traces.

How it is found (no per-family table of names anywhere; probe.py, graph.py, read.py):

1. Shrink the config (small widths, a small vocabulary, few experts; every structural flag
   kept) and build it at full depth on the meta device (no memory): layers with the same module
   tree are one kind. Then build a TINY instance on CPU with just enough layers to hold the first
   layer of every kind (per-layer lists such as ``layer_types`` cut to match). When a shrunk
   config does not build or run, less shrunk ones are tried; none larger than 50M parameters.
2. Run one forward (``use_cache=False``) and capture, with forward pre-hooks
   (``with_kwargs=True``), the real call of the first layer of each kind and of every module in
   it (and, with forward hooks, what each returned). The decoder layers are the ``ModuleList``
   of ``num_hidden_layers`` modules whose first element is called with the hidden states.
3. Trace the layer into a graph whose module nodes are its direct children (a child made of an
   attention and norms only, opening with a norm of its own input, is read in its own children:
   DBRX's ``norm_attn_norm`` holds the attention's norm, residual add and the FFN's norm):
   * ``fx``: the layer class's ``forward`` unwrapped through its ``__wrapped__`` chain (HF
     decorators), called from a wrapper module with an explicit ``(hidden_states)`` signature
     and the captured kwargs, traced by an ``fx.Tracer`` whose leaves are the layer's children;
   * ``export``: ``torch.export.export(..., strict=False)`` of the same call; its aten nodes are
     grouped into child-module calls by their ``nn_module_stack``. An add that a child computes
     last, joining a value from outside the child with its own, is the layer's residual add made
     inside the child (BLOOM and MPT hand their modules the residual): it is kept out of the call.
4. Classify the children by behaviour on their captured inputs (a norm's output does not change
   when its input is scaled; an attention mixes tokens, so changing token 0, by a random vector
   that a LayerNorm at the module's input does not erase, changes the output at later tokens;
   "major" modules carry >= 2-D weights), and the block by data flow: the
   residual adds are the adds with one operand on the residual stream and the other behind a
   major module; each add's branch is what lies between the stream and that add. The FFN is the
   major modules that are not the attention's; the residual is parallel when the FFN does not
   depend on the attention output.
5. The attention's output projection (and the FFN's down projection, when the FFN is one
   module) is the last linear before the module's output: the nearest module with a >= 2-D
   weight walking back from the output (fx trace of that module; HF attention code is rarely
   fx-traceable, so the export graph of the layer answers then, via parameter names, or of the
   module alone; where nothing exports, as DBRX's loop over the experts a batch hits, the module
   is run with its ops logged and the walk goes back through them to a parameter: the
   parameter's own path when its module holds several, as DBRX's w1, v1 and w2).
6. For memory blocks (read.memory_facts): the attention is run alone with every aten op logged.
   It is softmax attention when a softmax (or fused attention) op runs; the head count and width
   are those of the [..., heads, head_dim] tensor that the output projection's input is a
   re-layout of (so MLA's value heads, narrower than its query heads, are read right); and the
   FFN's return value (a tensor, or a tuple with the hidden states at some position) is what the
   memory readout must return in its place; an FFN argument that zeroing takes exactly off the
   output is the residual it adds itself, which the readout then adds too.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from midus_surgery.anatomy.probe import LayerProbe, StackProbe
from midus_surgery.anatomy.problems import AnatomyError, _error
from midus_surgery.anatomy.read import _anatomy_from_flow, memory_facts
from midus_surgery.errors import one_line
from midus_surgery.recipe.anatomy_spec import Anatomy, BlockKind, StackAnatomy

__all__ = ["Anatomy", "AnatomyError", "StackAnatomy", "find_anatomy", "find_stack_anatomy", "decoder_layers"]


def decoder_layers(model: nn.Module, layers_path: str) -> nn.ModuleList:
    """The ModuleList of decoder layers of ``model`` at ``layers_path``."""
    try:
        layers = model.get_submodule(layers_path)
    except AttributeError as e:
        raise AnatomyError(f"{type(model).__name__} has no module {layers_path!r} (anatomy.layers_path): {e}") from e
    if not isinstance(layers, nn.ModuleList):
        raise AnatomyError(f"{layers_path!r} in {type(model).__name__} is a {type(layers).__name__}, not a ModuleList of decoder layers")
    return layers


def find_stack_anatomy(config, *, trust_remote_code: bool = False) -> StackAnatomy:
    """The anatomy of every kind of decoder layer of ``config``'s causal LM, from a tiny instance.

    Needs no weights and builds nothing of real size. A kind whose anatomy cannot be read gets its
    reason (``BlockKind.problem``): plain copies of it still work, identity and memory blocks are
    refused. Raises ``AnatomyError`` when no tiny instance can be built or run at all.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend (3-4x slower on a busy machine)
    try:
        probe = StackProbe.build(config, trust_remote_code)
        kinds = tuple(block_kind(layer) for layer in probe.layers)
        return StackAnatomy(layers_path=probe.layers_path, kinds=kinds, layer_kinds=tuple(probe.layer_kinds))
    finally:
        torch.set_num_threads(threads)


def find_anatomy(config, *, trust_remote_code: bool = False) -> Anatomy:
    """The anatomy of layer 0's kind (every layer's, in a stack of one kind); AnatomyError if none."""
    stack = find_stack_anatomy(config, trust_remote_code=trust_remote_code)
    kind = stack.kind_of(0)
    if kind.anatomy is None:
        raise AnatomyError(kind.problem)
    return kind.anatomy


def block_kind(probe: LayerProbe) -> BlockKind:
    """One layer kind: its anatomy with what memory blocks need, or why it has none."""
    try:
        anatomy = _anatomy_from_probe(probe)
    except AnatomyError as e:
        return BlockKind(label=probe.label, problem=str(e))
    facts, memory_problem = memory_facts(probe, anatomy)
    return BlockKind(label=probe.label, anatomy=anatomy.model_copy(update=facts), memory_problem=memory_problem)


def _anatomy_from_probe(probe: LayerProbe, *, sources: tuple[str, ...] = ("fx", "export"),
                        cross_check: bool = True) -> Anatomy:
    failures: list[str] = []
    read_error: AnatomyError | None = None  # a graph was traced, and the block lacks something
    for src in sources:
        try:
            flow = probe.flow(src)
            anatomy = _anatomy_from_flow(probe, flow, src)
        except AnatomyError as e:
            read_error = read_error or e
            failures.append(f"{src}: {str(e).splitlines()[0]}")
            continue
        except Exception as e:  # a tracer failing on user code: try the next source
            failures.append(f"{src}: {one_line(e, 200)}")
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
    if read_error is not None:
        raise read_error  # says what is missing better than any tracer's failure
    raise _error(f"the block anatomy of {probe.label}", probe.known, "; ".join(_unique(failures)))


def _unique(failures: list[str]) -> list[str]:
    """The sources' reasons, once each when both say the same."""
    out: list[str] = []
    for f in failures:
        reason = f.split(": ", 1)[-1]
        if not any(o.split(": ", 1)[-1] == reason for o in out):
            out.append(f)
    return out
