"""Names the emitted model and the tools that read it share.

One place for them: the planner names tensors with them, the modeling code registers modules
under them, the trainer sorts memory parameters by them, and every writer of a MIDUS model
directory names its files and classes by them. This file travels beside the weights and imports
nothing, so the planner can read it without importing torch.
"""

SHARED_BANK = "midus_shared_bank"  # the top-level module holding the latent bank when memory.share_bank
HML_MODULE = "hml"  # a Memory block's memory layer: <layer>.<last FFN module>.hml
STAND_IN_PREFIX = "midus_"  # a parameterless stand-in (the attention tap, FFN identities) is registered as midus_<name>

PLAN_FILE = "midus_plan.json"  # the compiled plan beside the weights (train's freeze policy reads it)
MODELING_FILES = ("configuration_midus.py", "modeling_midus.py", "hml.py", "midus_names.py")

# The public MIDUS class of each transformers task -> (the task's name in messages, the name of
# transformers' table of model type -> class name for it in transformers.models.auto.modeling_auto).
# Each dispatches to the base architecture's own class (MidusForCausalLM -> LlamaForCausalLM...).
TASK_CLASSES = {
    "MidusForCausalLM": ("causal LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "MidusForSequenceClassification": ("sequence classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "MidusForTokenClassification": ("token classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "MidusForQuestionAnswering": ("question answering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
}
# config.json's auto_map: what transformers loads with trust_remote_code, for every task.
AUTO_MAP = {
    "AutoConfig": "configuration_midus.MidusConfig",
    **{f"AutoModelFor{cls.removeprefix('MidusFor')}": f"modeling_midus.{cls}" for cls in TASK_CLASSES},
}


def is_memory_parameter(name: str) -> bool:
    """The memory tables: everything under a memory layer and the shared latent bank."""
    return f".{HML_MODULE}." in f".{name}" or SHARED_BANK in name

