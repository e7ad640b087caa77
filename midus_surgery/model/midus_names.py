"""Module names the emitted model and the tools that read it share.

One place for them: the planner names tensors with them, the modeling code registers modules
under them, and the trainer sorts memory parameters by them. This file travels beside the
weights and imports nothing, so the planner can read it without importing torch.
"""

SHARED_BANK = "midus_shared_bank"  # the top-level module holding the latent bank when memory.share_bank
HML_MODULE = "hml"  # a Memory block's memory layer: <layer>.<last FFN module>.hml


def is_memory_parameter(name: str) -> bool:
    """The memory tables: everything under a memory layer and the shared latent bank."""
    return f".{HML_MODULE}." in f".{name}" or SHARED_BANK in name
