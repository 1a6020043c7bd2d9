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

from rlhf_env.errors import VocabMismatchError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    if isinstance(model, (str, Path)):
        model = auto_cls.from_pretrained(
            _local_dir(model),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()  # no dropout; gradients are off where it runs (inference_mode)


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
