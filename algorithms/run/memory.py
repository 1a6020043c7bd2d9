"""Peak memory of a training run: an analytic estimate and a measurement (docs/maths.md §24).

``estimate`` counts, in bytes, what one training iteration of an algorithm holds at its
peak: the weights of every model in memory (policy, reference, reward model, PPO's value
head), the gradients and the two Adam moments of what is trained, and the activations of
the largest forward/backward (the update's minibatch with gradients, or the rollout's KV
caches and no-grad forward over the whole batch, whichever is larger).

``PeakMeter`` measures the peak of tensor memory over a window (the loop's first two
iterations, so the gradients and Adam moments of step 1 are live while step 2's
activations build up): on CUDA ``torch.cuda.max_memory_allocated``; on CPU the tensors
alive when the window opens (their storages, counted once) plus the highest running total
of the CPU allocator's allocations and frees inside the window, from the PyTorch profiler's
memory events. The CPU figure counts tensor storage only (not Python objects, the
tokenizer or the allocator's slack) and never less than the true tensor peak: a tensor
allocated before the window and freed inside it keeps counting.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch

from rlhf_env.algorithms.run import precision

MIB = 2**20


# -- the estimate ------------------------------------------------------------------------------


def layer_activation_floats(hidden: int, inner: int) -> int:
    """Floats one transformer block saves for backward per token (docs/maths.md §24).

    Attention 7h: the first LayerNorm's input, the QKV projection's input and output (3h),
    the attention output and the output projection's input. MLP 2h + 5i: the second
    LayerNorm's input, the up-projection's input and output (i), three intermediates of
    GPT-2's tanh GELU (tanh, ½x, 1 + tanh) and the down-projection's input (i).
    """
    return 9 * hidden + 5 * inner


def nograd_forward_floats(hidden: int, inner: int, layers: int) -> int:
    """Floats per token of a forward without gradients that keeps its KV cache (docs/maths.md §24):
    K and V of every layer (2Lh) and the widest layer's working set, five h-sized tensors
    (hidden, residual, Q, K, V) and four i-sized ones (the up-projection and three GELU temporaries)."""
    return 2 * layers * hidden + 5 * hidden + 4 * inner


@dataclass(frozen=True)
class Estimate:
    """Bytes of each part (``parts``) and their total: static memory plus the larger activation phase."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        static = sum(v for k, v in self.parts.items() if not k.startswith("activations"))
        return static + max(self.parts.get("activations/update", 0), self.parts.get("activations/rollout", 0))

    @property
    def mb(self) -> float:
        return self.total / MIB


def rows_of(config) -> tuple[int, int] | None:
    """(rows of the largest forward with gradients, rows of one rollout) as the config declares them
    (``batch_shape()``, a ``BatchShape``); None for a config that declares none (a third-party
    algorithm may): no estimate then."""
    declared = getattr(config, "batch_shape", None)
    if declared is None:
        return None
    shape = declared()
    return shape.update_rows, shape.rollout_rows


def _unique_bytes(tensors) -> int:
    seen: dict[tuple, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def _modules(ctx) -> list[torch.nn.Module]:
    reward = getattr(ctx, "reward", None)
    reward = reward if isinstance(reward, torch.nn.Module) else getattr(reward, "model", None)
    return [m for m in (ctx.policy, ctx.ref, reward) if isinstance(m, torch.nn.Module)]


def estimate(ctx, config, trainer=None, seq_len: int | None = None) -> Estimate | None:
    """The analytic peak of one training iteration of ``config``'s algorithm on ``ctx`` (docs/maths.md §24).

    ``trainer``: its ``optimizer.params`` are what gets gradients and Adam moments (PPO's value
    head included); None: the policy's trainable parameters. ``seq_len``: the longest row
    (default: the longest training prompt plus ``max_new_tokens``).
    """
    rows = rows_of(config)
    if rows is None:
        return None
    update_rows, rollout_rows = rows
    cfg = ctx.policy.config
    hidden, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    p = next(ctx.policy.parameters())
    # Autocast (mixed precision, or bf16 on CUDA: run.precision): activations in 2 bytes; log-probs float32 always.
    act = precision.activation_bytes(ctx.device, getattr(ctx, "compute_dtype", None), p.element_size())
    if seq_len is None:
        prompts = list(ctx.task.train_prompts)
        # As the env encodes them (chat template included).
        seq_len = max(len(ids) for ids in ctx.prompt_format.encode_prompts(prompts)) + ctx.task.max_new_tokens
    T = seq_len
    params = [t for m in _modules(ctx) for t in (*m.parameters(), *m.buffers())]
    trained = list(getattr(getattr(trainer, "optimizer", None), "params", None) or [])
    if not trained:
        trained = [q for q in ctx.policy.parameters() if q.requires_grad]
    n_trained_bytes = sum(q.numel() * q.element_size() for q in trained)
    extra = [q for q in trained if all(q is not r for r in params)]  # PPO's value head: weights too
    parts = {
        "weights": _unique_bytes(params + extra),
        "gradients": n_trained_bytes,
        "adam_moments": 2 * n_trained_bytes,
        # Saved activations of every block, then the float32 logits, their log-softmax and its gradient.
        "activations/update": update_rows * T * layers * layer_activation_floats(hidden, inner) * act
        + logit_bytes(update_rows * T, vocab, 3, hidden),
    }
    if rollout_rows:
        # One no-grad forward over the whole rollout batch (the reference's pass through its KV
        # cache, or PPO's π_old and values): its K and V (or hidden states), the widest layer's
        # working set, and the float32 logits and log-softmax.
        parts["activations/rollout"] = rollout_rows * T * nograd_forward_floats(
            hidden, inner, layers
        ) * act + logit_bytes(rollout_rows * T, vocab, 2, hidden, grad=False)
    return Estimate(parts)


def logit_bytes(tokens: int, vocab: int, copies: int, hidden: int, grad: bool = True) -> int:
    """Bytes of ``copies`` float32 (tokens, V) logit-sized tensors (logits, log-softmax, gradient) of one pass.

    Past one chunk (``rlhf_env.lmhead``) only a chunk's worth is alive at once, plus the lm-head
    weight gradient (V, H) that each chunk's backward builds before it is accumulated.
    """
    from rlhf_env.lmhead import LOGPROB_CHUNK_BYTES

    if tokens * vocab * 4 <= LOGPROB_CHUNK_BYTES:
        return copies * tokens * vocab * 4
    chunk = max(1, LOGPROB_CHUNK_BYTES // (4 * vocab))
    return copies * chunk * vocab * 4 + (vocab * hidden * 4 if grad else 0)


# -- the measurement ---------------------------------------------------------------------------


def live_tensor_bytes(device: torch.device) -> int:
    """Bytes of every tensor storage alive on ``device`` (each storage once), gradients included."""
    gc.collect()  # unreachable cycles still holding tensors (a previous cell's) are not alive
    tensors = []
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == device.type:  # type(): no __class__ lookups
            tensors.append(obj)
            if obj.grad is not None:
                tensors.append(obj.grad)
    return _unique_bytes(tensors)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints a line to stderr each time a profiler starts and stops; keep it out of the logs."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _memory_profiler():
    """A started ``torch.autograd.profiler.profile`` recording the allocator's memory events.

    Recording only the user scope keeps operator events out (a training step has tens of
    thousands, and processing them took seconds); memory events come through regardless.
    ``torch.profiler.profile`` is avoided too: its first use costs ~3 s. Should a torch
    version lack the private entry points, a plain profile is started instead (slower, same figures).
    """
    from torch.autograd.profiler import profile

    prof = profile(use_cpu=True, profile_memory=True)
    try:
        from torch._C._autograd import _enable_profiler
        from torch._C._profiler import RecordScope

        prof._prepare_trace()
        _enable_profiler(prof.config(create_trace_id=False), prof.kineto_activities, {RecordScope.USER_SCOPE})
        prof.entered = True
    except (AttributeError, ImportError, TypeError):
        prof = profile(use_cpu=True, profile_memory=True)
        prof.__enter__()
    return prof


class PeakMeter:
    """Peak tensor memory between ``start()`` and ``stop()`` (returns MiB); see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.profiler = None
        self.baseline = 0
        self.running = False

    def start(self) -> None:
        self.running = True
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.baseline = live_tensor_bytes(self.device)
        with _quiet_stderr():
            self.profiler = _memory_profiler()

    def stop(self) -> float:
        self.running = False
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        with _quiet_stderr():
            self.profiler.__exit__(None, None, None)
        events = [e for e in self.profiler.kineto_results.events() if e.name() == "[memory]"]
        self.profiler = None
        current = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            if e.device_type() == torch.autograd.DeviceType.CPU:
                current += e.nbytes()
                peak = max(peak, current)
        return (self.baseline + peak) / MIB
