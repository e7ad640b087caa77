"""The end of a run: the trained model as a model directory, beside what ``init_from`` carried.

The export is a directory transformers loads like any other (safetensors weights in the export
dtype, config.json) plus every non-weight file of ``init_from`` (tokenizer, midus_plan.json,
midus_recipe.yaml, model card (its training section saying how this run trained it), templates), the MIDUS modeling files for a MIDUS model, and
``midus_train.json`` (what was trained how). It appears whole or not at all (a temp directory
renamed into place), and replaces only an export of the same run (output_dir.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from midus_surgery.errors import MidusError
from midus_surgery.io.json_text import strict_json
from midus_surgery.io.model_card import card_with_training, training_line
from midus_surgery.io.output_dir import EXPORT_KIND, add_to_marker, atomic_directory, give_default_mode, recorded_base
from midus_surgery.io.tensor_source import inside_base
from midus_surgery.model import copy_modeling_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")  # init_from's weights: never copied
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "midus_train.json"}  # written anew


def export_model(acc, model, out: Path, *, run_dir: Path, init_from: Path, dtype: torch.dtype, is_midus: bool, summary: dict,
                 report: Callable[[str], None], replaces_owner: str | None = None, max_shard_bytes: int = 2 * 10**9) -> Path:
    """Write the prepared ``model``'s weights, cast to ``dtype``, as the model directory ``out``,
    marked as the export of ``run_dir`` (only a later export of the same run may replace it).
    ``replaces_owner``: the run whose export at ``out`` the start-of-run check let this one replace
    (a copied run directory's export names the run it was copied from); default ``run_dir``.

    Every process calls it (gathering a sharded model's state dict is collective); the main
    process writes. ``summary`` becomes midus_train.json. ``report``: where the line about each
    leftover of a killed export removed first goes. ``max_shard_bytes``: the largest weights file (``export.shard_size``).
    """
    state_dict = acc.get_state_dict(model)
    # torch.compile wraps the model: its keys carry an `_orig_mod.` prefix the export must not keep.
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    if acc.is_main_process:
        raw = acc.unwrap_model(model)
        # A gathered (FSDP) state dict holds a tied weight under each of its names, as separate
        # tensors that save_pretrained cannot tell are one: keep the name a plain save keeps.
        every = {n for n, _ in raw.named_parameters(remove_duplicate=False)}
        state_dict = {k: v for k, v in state_dict.items() if k not in every - {n for n, _ in raw.named_parameters()}}
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
        with atomic_directory(out, kind=EXPORT_KIND, owner=str(run_dir), replace=True, replaces_owner=replaces_owner, report=report) as tmp:
            # the config says the export's dtype and, for generation, that the KV cache is on again
            old_dtype = raw.config.dtype
            raw.config.dtype, raw.config.use_cache = dtype, True
            try:
                raw.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_bytes)  # safetensors: transformers 5 writes no other
            finally:
                raw.config.dtype, raw.config.use_cache = old_dtype, False
            for weights in tmp.glob("*.safetensors"):
                give_default_mode(weights)  # safetensors writes 0600
            # save_pretrained writes the dtype of the model it was given (the training copy, fp32) over
            # ours; the config must say the stored weights' dtype, or "auto" loads a bf16 export as fp32
            config_file = tmp / "config.json"
            config = json.loads(config_file.read_text())
            config["dtype"] = str(dtype).removeprefix("torch.")
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for src in init_from.iterdir():
                if src.is_file() and src.name not in SKIP_FILES and not src.name.endswith(WEIGHT_SUFFIXES) and not (tmp / src.name).exists():
                    try:  # a link leading out of init_from: the export would carry (and a user publish) a file the model does not hold
                        inside_base(init_from, src.name, f"init_from's {src.name}")
                    except MidusError as exc:
                        report(f"warning: {src.name} not copied into the export: {exc}")
                        continue
                    shutil.copy2(src, tmp / src.name)
            card = tmp / "README.md"
            if card.is_file():  # its training section (apply's, or one added to a card its author wrote) says how this model was trained
                card.write_text(card_with_training(card.read_text(), training_line(summary)))
            if is_midus:
                copy_modeling_files(tmp)
            (tmp / "midus_train.json").write_text(strict_json(summary, indent=2) + "\n")
            if (base := recorded_base(init_from)) is not None:
                add_to_marker(tmp, base_path=base)  # what `verify` compares the trained model with
    acc.wait_for_everyone()
    return out
