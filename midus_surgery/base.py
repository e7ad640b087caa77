"""Find the base model a recipe names and read its config (never its weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import RecipeError
from .recipe import LoadedRecipe


@dataclass(frozen=True)
class BaseRef:
    """Where the base model is: a HF directory, or a GGUF file (``directory`` + ``gguf_file``)."""

    directory: Path
    gguf_file: str | None
    exists: bool

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve_base(loaded: LoadedRecipe) -> BaseRef:
    spec = loaded.recipe.base
    path = loaded.resolve(spec.path)
    if path.suffix.lower() == ".gguf":
        return BaseRef(path.parent, path.name, path.is_file())
    if spec.gguf_file:
        return BaseRef(path, spec.gguf_file, (path / spec.gguf_file).is_file())
    return BaseRef(path, None, (path / "config.json").is_file())


def _config_from_dict(data: dict, where: str, trust_remote_code: bool):
    from transformers import AutoConfig

    model_type = data.get("model_type")
    if not model_type:
        raise ValueError(f"{where} has no model_type")
    if "auto_map" in data and not trust_remote_code:
        # Custom code would be needed to build this architecture; never run it unasked.
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"{where}: model_type {model_type!r} needs its own code (auto_map); set base.trust_remote_code: true to allow it")
    fields = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as exc:
        raise ValueError(f"{where}: transformers does not accept this config: {exc}") from None


def load_base_config(loaded: LoadedRecipe):
    """The base model's ``PretrainedConfig``, from its directory, its GGUF, or ``base.config``."""
    spec = loaded.recipe.base
    ref = resolve_base(loaded)
    try:
        if ref.exists and ref.is_gguf:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(ref.directory, gguf_file=ref.gguf_file)
        if ref.exists:
            path = ref.directory / "config.json"
            return _config_from_dict(json.loads(path.read_text()), str(path), spec.trust_remote_code)
        if spec.config is not None:
            path = loaded.resolve(spec.config)
            if not path.is_file():
                raise RecipeError([loaded.problem(("base", "config"), f"config file not found: {path}")])
            return _config_from_dict(json.loads(path.read_text()), str(path), spec.trust_remote_code)
    except json.JSONDecodeError as exc:
        raise RecipeError([loaded.problem(("base",), f"base config is not valid JSON: {exc}")]) from None
    except (ValueError, OSError) as exc:
        raise RecipeError([loaded.problem(("base",), str(exc))]) from None
    wanted = ref.directory / (ref.gguf_file or "config.json")
    raise RecipeError([loaded.problem(("base", "path"), f"base model not found: {wanted} (give base.config, a config.json, to validate and plan without the weights)")])
