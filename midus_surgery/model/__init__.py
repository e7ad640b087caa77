"""The emitted model's code: exactly the files copied beside the weights of a MIDUS output.

They import nothing else from this package (a test checks it), so an output loads with
``trust_remote_code=True`` where midus-surgery is not installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .midus_names import MODELING_FILES


def copy_modeling_files(dest: Path) -> None:
    """Copy the MIDUS modeling files into the model directory ``dest``."""
    here = Path(__file__).resolve().parent
    for name in MODELING_FILES:
        shutil.copy2(here / name, Path(dest) / name)


def shipped_code_differences(model_dir: Path) -> tuple[list[str], list[str]]:
    """(missing, different): the modeling files a MIDUS directory lacks, and those that are not byte
    for byte this package's copy (edited, or written by another version). With midus_surgery
    imported transformers runs the package's copy; ``trust_remote_code=True`` elsewhere runs these."""
    here, there = Path(__file__).resolve().parent, Path(model_dir)
    missing = [name for name in MODELING_FILES if not (there / name).is_file()]
    different = [name for name in MODELING_FILES
                 if name not in missing and (there / name).read_bytes() != (here / name).read_bytes()]
    return missing, different


def shipped_causal_lm_class(model_dir: Path) -> type:
    """The causal-LM class of a MIDUS directory built from the files beside its weights, as a
    trust_remote_code load without midus-surgery builds it (runs that code: the caller asks the user first)."""
    import json

    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    # json, not io's checked reader: model/ is a leaf (tests/test_package_layout.py); a config nested past Python's reader is
    # a ValueError as there, which its callers (eval, verify) say in one line (trial95 F6)
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    reference = config["auto_map"]["AutoModelForCausalLM"]
    model_class = get_class_from_dynamic_module(reference, str(model_dir), local_files_only=True)
    model_class.register_for_auto_class("AutoModelForCausalLM")  # its saves write the code and auto_map again
    return model_class
