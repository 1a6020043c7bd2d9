"""Mixed precision: ``train(dtype=torch.bfloat16 | torch.float16)`` (``rlhf train --dtype``).

The policy keeps float32 master weights, and its gradients and Adam moments are float32; the
training step (rollout and updates) runs under ``torch.autocast`` in the low dtype on the run's
device, CPU included, so matmuls compute in bf16/fp16 while log-probs stay float32 (every
log-softmax upcasts its logits first: ``rlhf_env.scoring.token_logprobs``, the KV cache, the
samplers). The frozen reference is stored in the low dtype (no gradients, half the bytes).
float16 scales the loss (``torch.amp.GradScaler`` in ``plumbing.Optimizer``): its gradients
would underflow otherwise. Without a low dtype nothing changes: weights as given (``dtype``
float32 or None), and bf16 autocast on CUDA only, as before.
"""

from __future__ import annotations

import torch

LOW = (torch.bfloat16, torch.float16)


def is_mixed(dtype: torch.dtype | None) -> bool:
    """Whether a run's ``dtype`` asks for mixed precision (float32 masters, low-dtype compute)."""
    return dtype in LOW


def weights_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the trained weights load in: float32 under mixed precision, else ``dtype`` (None: as saved)."""
    return torch.float32 if is_mixed(dtype) else dtype


def autocast(device: torch.device, compute_dtype: torch.dtype | None):
    """The context a training step (and, under mixed precision, an evaluation) runs in.

    ``compute_dtype``: the mixed-precision dtype, autocast on ``device`` whatever its type; None:
    bf16 autocast on CUDA and nothing elsewhere (the default of every run before mixed precision).
    """
    if compute_dtype is not None:
        return torch.autocast(device_type=device.type, dtype=compute_dtype)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def activation_bytes(device: torch.device, compute_dtype: torch.dtype | None, weight_bytes: int) -> int:
    """Bytes of one activation element: the autocast dtype's (2) when autocast is on, else a weight's."""
    if compute_dtype is not None or device.type == "cuda":
        return 2
    return weight_bytes


def float32_trainable(model: torch.nn.Module) -> None:
    """Cast the parameters that get gradients (LoRA's adapters on a low-dtype base) to float32, in place."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
