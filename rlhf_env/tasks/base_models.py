"""Base models for the embedded tasks: a tiny GPT-2 trained by SFT, shipped or cached on disk.

The default configuration of each embedded task (and the one-digit addition task of the
quick suite and the learning tests) has a **canonical** base model shipped in the package (``rlhf_env/tasks/shipped/<cache key>/``, a few MB of safetensors). SFT is not
bit-reproducible across CPUs (AVX2 and AVX-512 kernels round differently, and 300 noisy
steps amplify that), so a build on another machine gives a different model: the sampled
gold of the arithmetic base model ranged 0.29-0.41 over machines. Shipping the weights makes
every machine start from the same model.

Any other configuration builds its base model on first use (a progress bar shows the SFT
steps) and saves it under the user cache directory, keyed by the task's configuration;
later uses load it. A model in the cache (``rlhf base-model --force`` rebuilds one) takes
precedence over the shipped one. Writes are atomic (a temporary directory renamed into
place), so an interrupted build never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rlhf_env.cache import cache_root
from rlhf_env.errors import SettingError
from rlhf_env.models import load_pretrained
from rlhf_env.progress import Progress
from rlhf_env.scoring import sft_loss
from rlhf_env.tasks.base import Task
from rlhf_env.tiny import DEFAULT_CHARS, build_char_tokenizer, build_tiny_model, save_tiny

SHIPPED = Path(__file__).with_name("shipped")


def base_model_dir(task: Task) -> Path:
    """Where a build of ``task``'s base model is cached."""
    return cache_root() / "base_models" / task.cache_key()


def shipped_base_model(task: Task) -> Path | None:
    """The canonical base model shipped for ``task``'s configuration, if there is one."""
    path = SHIPPED / task.cache_key()
    return path if (path / "model.safetensors").is_file() else None


def train_sft(
    model, tokenizer, pairs, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = True, callback=None
):
    """AdamW on ``sft_loss`` over random minibatches, linear warm-up then linear decay.

    ``callback(step, steps)``, if given, is called after every step (progress displays);
    ``progress``: show the steps on stderr (``rlhf_env.progress``: a bar on a terminal, else a few lines).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup + 1)))
    )
    model.train()
    bar = Progress(steps, "SFT base model", "steps", enabled=progress)
    loss = torch.tensor(float("nan"))
    for i in range(steps):
        idx = torch.randint(len(pairs), (batch_size,), generator=gen).tolist()
        loss = sft_loss(model, tokenizer, [pairs[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set(i + 1, loss=f"{loss.item():.3f}")
        if callback is not None:
            callback(i + 1, steps)
    bar.close()
    return model.eval(), loss.item()


def build_base_model(
    task: Task, *, force: bool = False, progress: bool = True, callback=None, device: torch.device | str | None = None
) -> Path:
    """The task's base model directory: cached, else shipped, else built (SFT) and cached.

    ``force`` builds afresh into the cache. ``callback``: see ``train_sft``. ``device``: where
    the SFT runs (default: the CPU), e.g. the GPU a suite's cells will use; the weights are
    saved in float32 either way.
    """
    if not task.sft_data:  # a task for given models: nothing to build one from
        source = f" ({task.config['path']} has no completion or answer column)" if "path" in task.config else ""
        raise SettingError(
            f"task {task.name!r} has no SFT data to build a base model from{source}; pass a model with --model"
        )
    target = base_model_dir(task)
    if not force:
        if (target / "model.safetensors").exists():
            return target
        if (shipped := shipped_base_model(task)) is not None:
            return shipped
    r = task.recipe
    tokenizer = build_char_tokenizer(r.chars or DEFAULT_CHARS)
    model, _ = build_tiny_model(
        tokenizer, n_layer=r.n_layer, n_head=r.n_head, n_embd=r.n_embd, n_positions=r.n_positions, seed=r.seed
    )
    device = torch.device(device or "cpu")
    model.to(device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)  # the CPU generator: train_sft draws minibatches there
        model, final_loss = train_sft(
            model,
            tokenizer,
            task.sft_data,
            steps=r.sft_steps,
            batch_size=r.batch_size,
            lr=r.lr,
            seed=r.seed,
            progress=progress,
            callback=callback,
        )
    info = {
        "task": task.name,
        "config": task.config,
        "recipe": r.__dict__,
        "final_sft_loss": final_loss,
        "build_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save_tiny(model.cpu(), tokenizer, tmp)
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base_model(
    task: Task,
    model_path: str | os.PathLike | None = None,
    *,
    device=None,
    dtype=None,
    progress: bool = True,
    callback=None,
):
    """``(model, tokenizer)``: the checkpoint at ``model_path`` if given, else the task's base model."""
    if model_path is not None:
        path = Path(model_path)
    else:  # a model built on first use is built where it will run
        path = build_base_model(task, progress=progress, callback=callback, device=device)
    return load_pretrained(path, device=device, dtype=dtype)
