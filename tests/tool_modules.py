"""Import a script under tools/ as a module, for tests of its logic (tools/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))  # the benchmark scripts import bench_common as a script would


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered while it executes
    spec.loader.exec_module(module)
    return module


def import_tool(name: str):
    """A module under tools/ as the scripts import it (``import bench_step_report``): the one object a driver
    uses, so that a test patches what the driver reads. Report modules are imported this way."""
    import importlib

    return importlib.import_module(name)
