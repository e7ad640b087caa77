"""midus-surgery: a declarative model-surgery compiler for Memory-Infused Depth Up-Scaling.

Importing the package registers the MIDUS model classes with transformers' Auto classes, so
emitted models load with plain ``AutoModelForCausalLM.from_pretrained(path)``.

The registration is deferred until transformers' Auto modules are imported: building the MIDUS
model class imports ``transformers.modeling_utils`` (seconds of start-up here), which commands
like ``--help`` or ``schema`` never need. Whoever uses an Auto class imports its module first,
which runs the registration right after it loads.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Callable

__version__ = "0.1.0"

_AUTO_CONFIG = "transformers.models.auto.configuration_auto"
_AUTO_MODEL = "transformers.models.auto.modeling_auto"
_OUR_CONFIG = "midus_surgery.model.configuration_midus"
_OUR_MODEL = "midus_surgery.model.modeling_midus"


def _being_imported(name: str) -> bool:
    """True while the module ``name`` executes (CPython marks its spec ``_initializing``)."""
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register_config(ours_loaded: bool = False) -> None:
    if not ours_loaded and _being_imported(_OUR_CONFIG):
        return  # transformers' Auto module loaded from inside ours: registered once ours has loaded
    from transformers import AutoConfig

    from .model.configuration_midus import MidusConfig

    AutoConfig.register("midus", MidusConfig, exist_ok=True)


def _register_model(ours_loaded: bool = False) -> None:
    if not ours_loaded and (_being_imported(_OUR_CONFIG) or _being_imported(_OUR_MODEL)):
        return  # as above
    import transformers

    from .model import modeling_midus
    from .model.configuration_midus import MidusConfig
    from .model.midus_names import AUTO_MAP

    _register_config(ours_loaded)
    for auto_class, reference in AUTO_MAP.items():  # the causal LM and every task head
        if auto_class != "AutoConfig":
            getattr(transformers, auto_class).register(MidusConfig, getattr(modeling_midus, reference.split(".")[1]), exist_ok=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once, right after the module ``name`` has been executed."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or not isinstance(spec.loader, importlib.abc.FileLoader):
            # Not a per-module loader instance we can wrap (never the case for an installed
            # transformers): register now instead; the Auto module is importable anyway.
            _run(self.callback)
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _run(self.callback)

        spec.loader.exec_module = exec_then_register  # this module's own loader instance only
        return spec


def _run(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception as exc:  # noqa: BLE001 - never break the user's transformers import
        warnings.warn(f"midus-surgery could not register the MIDUS classes with transformers: {exc}", stacklevel=2)


def _register_after_import(name: str, callback: Callable[[], None]) -> None:
    if name in sys.modules:
        _run(callback)
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


_register_after_import(_AUTO_CONFIG, _register_config)
_register_after_import(_AUTO_MODEL, _register_model)
# Whoever imports our modeling files first (before any Auto class) registers them when they have
# loaded (the callback runs at the end of their execution, while they are still marked initialising).
_register_after_import(_OUR_CONFIG, lambda: _AUTO_CONFIG in sys.modules and _register_config(ours_loaded=True))
_register_after_import(_OUR_MODEL, lambda: _AUTO_MODEL in sys.modules and _register_model(ours_loaded=True))
