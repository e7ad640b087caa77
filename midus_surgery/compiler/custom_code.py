"""Bases that ship their own modeling code (config.json's ``auto_map``).

Such code runs only when the recipe sets ``base.trust_remote_code: true``; without it the base
is refused, even when transformers knows the model type, because the stock class would build a
different model (the custom code's own tensors dropped, its forward ignored). Allowed, the code
is read from the base directory only (never from another Hub repository), builds the config and
the model the planner measures, and travels with an output whose config keeps the ``auto_map``.
"""

from __future__ import annotations

import re
from pathlib import Path

# The auto_map entries that decide what the planner builds; others (AutoTokenizer, heads for
# other tasks) do not change the causal LM.
BUILDING_KEYS = ("AutoConfig", "AutoModelForCausalLM")
_LOCAL_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")  # module_file.ClassName


def building_code(data: dict) -> dict[str, str]:
    """The auto_map entries of a raw config dict that replace the stock config or causal-LM class."""
    auto_map = data.get("auto_map")
    if auto_map is None:
        return {}
    if not isinstance(auto_map, dict):
        raise ValueError(f"auto_map must be an object of auto class -> 'module.Class', got {str(auto_map)[:60]}")
    return {k: auto_map[k] for k in BUILDING_KEYS if k in auto_map}


def hub_kernel(data: dict) -> tuple[str, str] | None:
    """(key, value) of a raw config's entry that names a kernel repository on the Hugging Face Hub for its attention or
    experts (``kernels-community/flash-attn``: a name with a slash), which the kernels library downloads and runs; or None."""
    for key in ("attn_implementation", "_attn_implementation", "experts_implementation", "_experts_implementation"):
        value = data.get(key)
        if isinstance(value, str) and "/" in value:
            return key, value
    return None


def refusal(where: str, code: dict[str, str]) -> str:
    names = ", ".join(str(v) for v in code.values())
    return (f"{where}: the base ships its own modeling code (auto_map: {names}), which the stock class would silently "
            f"replace; midus-surgery runs it only when allowed: read that code, then set base.trust_remote_code: true in the recipe")


def _module_file(directory: Path, reference, where: str) -> Path:
    """The base's own .py file a ``module.Class`` reference names; refused when it is not a file there."""
    from midus_surgery.errors import shown
    from midus_surgery.io.tokenizer_files import code_file_problem

    if not isinstance(reference, str) or not _LOCAL_REFERENCE.fullmatch(reference):
        raise ValueError(f"{where}: auto_map entry {shown(str(reference), 80)} is not a 'module.Class' of the base's own files "
                         "(code from another repository is not fetched)")
    name = reference.split(".")[0] + ".py"
    problem = code_file_problem(directory, name)
    if problem:
        raise ValueError(f"{where}: auto_map names {shown(reference, 80)}, but {shown(name, 80)} {problem}")
    return directory / name


def config_with_custom_code(data: dict, directory: Path, where: str):
    """The base config built by its own AutoConfig class (the stock one when it has none).

    The config remembers ``directory`` as transformers' name_or_path: ``AutoModelForCausalLM.from_config``
    finds the modeling code there.
    """
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    code = building_code(data)
    for reference in code.values():
        _module_file(directory, reference, where)
    # and their relative imports, by the same rule, before transformers reads them: a named pipe there hung validate (trial114)
    code_files(directory, code)
    fields = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "_name_or_path")}
    if "AutoConfig" in code:
        config_class = get_class_from_dynamic_module(code["AutoConfig"], str(directory), local_files_only=True)
        config = config_class(**fields)
    else:
        config = AutoConfig.for_model(data["model_type"], **fields)
    config._name_or_path = str(directory)
    return config


def custom_causal_lm(config_data: dict):
    """(config, True) built through the base's own code when a planner's config dict names it, else None.

    Only configs built by ``config_with_custom_code`` (recipes that allow the code) carry both an
    AutoModelForCausalLM entry and the base directory in ``_name_or_path``.
    """
    code = building_code(config_data)
    directory = config_data.get("_name_or_path")
    if "AutoModelForCausalLM" not in code or not directory or not Path(directory).is_dir():
        return None
    return config_with_custom_code(config_data, Path(directory), str(Path(directory) / "config.json"))


def code_files(directory: Path, auto_map: dict) -> list[Path]:
    """The base's .py files an output keeping ``auto_map`` needs: each module it names and their relative imports.
    Raises ValueError for one the base does not hold as a module file inside it (code_file_problem, the tokenizer path's
    rule too): the output's code would not load."""
    from midus_surgery.errors import shown
    from midus_surgery.io.tokenizer_files import code_file_problem, relative_import_files

    where = str(directory / "config.json")
    files: list[Path] = []
    for reference in auto_map.values():
        for ref in reference if isinstance(reference, list) else [reference]:
            if ref is None:
                continue
            module = _module_file(directory, ref, where)
            for name in [module.name, *relative_import_files(module)]:
                problem = code_file_problem(directory, name, entry=name == module.name)  # a helper's mark loads
                if problem and name == module.name:
                    raise ValueError(f"{where}: auto_map names {shown(ref, 80)}, but {shown(name, 80)} {problem}")
                if problem:
                    raise ValueError(f"{where}: auto_map names {shown(ref, 80)}, whose module imports {shown(name, 80)}, which "
                                     f"{problem}: the output's code would not load without it")
                if directory / name not in files:
                    files.append(directory / name)
    return files


def base_code_entries(auto_map) -> dict:
    """The entries of a base's ``auto_map`` a MIDUS output keeps: those that build no model (``AutoTokenizer``,
    ``AutoProcessor``...). Its model classes would build the base's code from a MIDUS config."""
    from midus_surgery.model.midus_names import AUTO_MAP

    if not isinstance(auto_map, dict):
        return {}
    return {key: ref for key, ref in auto_map.items() if key not in AUTO_MAP and not key.startswith("AutoModel")}


def base_code_in_output(ref, plan, trusted: bool) -> tuple[list[str], list[str]]:
    """(the base's code files apply copies into the output, the other Hub repositories whose code the output's files name):
    what config.json's kept auto_map and tokenizer_config.json's name, with their relative imports. A load of the output
    with trust_remote_code=True (AutoTokenizer, AutoProcessor...) runs them, so the note and the card name them all (trial111).
    ``trusted``: the recipe's base.trust_remote_code. Raises BaseModelError for config.json code apply cannot carry (a
    module or a relative import the base does not hold, another repository's reference): validate and plan refuse it as
    apply does, before they say OK (trial113: plan named no code at all, and apply refused)."""
    from midus_surgery.errors import BaseModelError, shown
    from midus_surgery.io.tokenizer_files import (
        auto_tokenizer_entry,
        auto_tokenizer_files,
        code_file_problem,
        entry_reference,
        tokenizer_code,
        tokenizer_code_repos,
    )

    if not ref.exists:
        return [], []
    if ref.is_gguf:
        # a GGUF base's tokenizer is loaded through transformers, which runs its own code only when trusted; apply then
        # carries that code as it carries a folder's (trial113: save_pretrained carried it unnamed). What transformers opens
        # while loading it (the AutoTokenizer entry's module and its imports) is refused here when opening it would do harm
        # (a named pipe hung apply) or cannot be checked (one over the size bound: its imports unread); the rest, and a
        # missing file, apply warns of as for a folder (trial121 F2)
        if not trusted:
            return [], []
        entry = auto_tokenizer_entry(ref.directory)
        if isinstance(entry, str):  # transformers indexes it as a pair: "t.Tok"[1] is ".", and it runs the file .py
            raise BaseModelError(f"{ref.directory / 'tokenizer_config.json'}: auto_map's AutoTokenizer entry is one string "
                                 f"({shown(entry, 80)}), not a [slow, fast] pair: transformers would read the module named "
                                 "by its second character while loading the GGUF's tokenizer")
        reference = entry_reference(entry)
        if reference is not None and "--" in reference:  # another repository's code, or a folder's outside the base
            raise BaseModelError(f"{ref.directory / 'tokenizer_config.json'}: auto_map's AutoTokenizer entry names code outside "
                                 f"the base ({shown(reference, 160)}): transformers would read and run it from that repository "
                                 "or folder while loading the GGUF's tokenizer during apply (remove the entry to load the GGUF's "
                                 "own tokenizer, or set base.trust_remote_code: false)")
        for i, name in enumerate(auto_tokenizer_files(ref.directory)):  # the entry module first, then its relative imports
            problem = code_file_problem(ref.directory, name, hazards_only=True, entry=i == 0)
            if problem:
                raise BaseModelError(f"{ref.directory / 'tokenizer_config.json'}: its tokenizer code names {shown(name, 80)}, which "
                                     f"{problem}: transformers would run it while loading the GGUF's tokenizer during apply")
        return tokenizer_code(ref.directory)[0], []
    kept = base_code_entries(plan.config.get("auto_map")) if plan.memory_layers else plan.config.get("auto_map")
    try:
        files = [path.name for path in code_files(ref.directory, kept)] if isinstance(kept, dict) else []
    except ValueError as exc:
        raise BaseModelError(str(exc)) from None
    files += [name for name in tokenizer_code(ref.directory)[0] if name not in files]
    return files, tokenizer_code_repos(ref.directory / "tokenizer_config.json")
