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
