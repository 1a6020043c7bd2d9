"""Loading models and tokenizers from local paths, and checking they fit together.

Nothing here downloads: paths must be local directories (``local_files_only``), weights are
read as safetensors, and ``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from rlhf_env.errors import DeviceError, ModelLoadError, VocabMismatchError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def _local_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"model path {str(path)!r} is not a local directory (nothing is downloaded; "
            "pass a directory saved with save_pretrained)"
        )
    return p


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(
        _local_dir(path), local_files_only=True, trust_remote_code=trust_remote_code
    )


def _load(auto_cls, model: Any, device, dtype, trust_remote_code: bool) -> PreTrainedModel:
    device = resolve_device(device)  # before reading any weights
    if isinstance(model, (str, Path)):
        model = _from_pretrained(auto_cls, _local_dir(model), trust_remote_code)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()  # no dropout; gradients are off where it runs (inference_mode)


def _from_pretrained(auto_cls, path: Path, trust_remote_code: bool) -> PreTrainedModel:
    """``auto_cls.from_pretrained`` on a local folder; pickle-only or damaged weights raise ``ModelLoadError``."""
    weights = sorted(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights and pickles:
        raise ModelLoadError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); models are loaded from safetensors only "
            "(unpickling can run arbitrary code): convert it once, where you trust it, with "
            "model.save_pretrained(path, safe_serialization=True)"
        )
    try:
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
    return _load(AutoModelForCausalLM, model, device, dtype, trust_remote_code)


def load_reward_model(model, device=None, dtype=None, trust_remote_code: bool = False) -> PreTrainedModel:
    """A sequence-classification model with one label (a scalar reward head), in eval mode."""
    model = _load(AutoModelForSequenceClassification, model, device, dtype, trust_remote_code)
    if model.config.num_labels != 1:
        raise ValueError(f"a reward model needs exactly one label, this one has {model.config.num_labels}")
    return model


def model_vocab_size(model) -> int:
    """Rows of the input embedding (the ids the model can read)."""
    return model.get_input_embeddings().num_embeddings


def check_vocab(tokenizer, model, what: str = "model") -> None:
    """Raise ``VocabMismatchError`` if the tokenizer can emit ids the model cannot embed."""
    n_tok, n_model = len(tokenizer), model_vocab_size(model)
    if n_tok > n_model:
        raise VocabMismatchError(
            f"tokenizer has {n_tok} tokens but the {what} embeds only {n_model}: "
            "they were not made for each other"
        )
