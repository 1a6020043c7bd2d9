"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the policy of a data-parallel run: ``rlhf train --fsdp``.

Each transformer block (the model's ``_no_split_modules``) and the root are sharded over the
ranks, so weights, gradients and Adam's moments are split W ways. The reduce-scatter
averages gradients over ranks, so the optimizer step scales the loss by W: the sum is the
one the data-parallel all-reduce makes, and so is the update. The full weights are gathered once a
step, after the update, for rollouts and evaluation (whose forward counts differ between
ranks, so they cannot all-gather layer by layer); training forwards gather block by block.
Checkpoints are sharded (``torch.distributed.checkpoint``: every rank writes its shards
into ``checkpoint/sharded``) and resume on any world size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rlhf_env.errors import SettingError

SHARDED = "sharded"


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard(model: torch.nn.Module, dp) -> None:
    """Shard ``model`` in place over ``dp``'s ranks (blocks, then the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dp.device.type, (dp.world_size,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    dp.sharded = True  # the reduce-scatter averages over ranks (gloo has no pre-scaled sum): losses are scaled by W


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(_fsdp_modules(model))


def gather(model: torch.nn.Module) -> None:
    """All-gather every shard now (all ranks), so forwards until the next backward need no collective.

    While gathered, ``model.parameters()`` are the full tensors: build optimizers before.
    """
    for module in _fsdp_modules(model):
        module.unshard()


def reshard(model: torch.nn.Module) -> None:
    for module in _fsdp_modules(model):
        module.reshard()


def check_trainer(trainer) -> None:
    """FSDP checkpoints hold the policy and its optimizer: trainers with more state are refused."""
    state = getattr(trainer, "state", None)
    if state != {"optimizer": "optimizer"}:
        raise SettingError(
            f"--fsdp supports trainers whose state is the policy's optimizer; {type(trainer).__module__} keeps {state}"
        )


def _state(policy, trainer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(policy, trainer.optimizer.torch)
    return {"model": model, "optim": optim}


def save_checkpoint(out: Path, policy, tokenizer, trainer, step: int, lead: bool) -> None:
    """Every rank writes its shards to a staging folder; rank 0 then moves it in as ``checkpoint/``."""
    import torch.distributed.checkpoint as dcp

    from rlhf_env.algorithms.run.runfolder import write_checkpoint
    from rlhf_env.algorithms.scale import distributed

    staging = out / ".checkpoint-sharded"
    if lead:
        shutil.rmtree(staging, ignore_errors=True)
    distributed.barrier()
    reshard(policy)  # the state dict of sharded parameters
    dcp.save(_state(policy, trainer), checkpoint_id=str(staging / SHARDED))
    distributed.barrier()
    if lead:

        def save(folder: Path) -> None:
            shutil.move(str(staging / SHARDED), str(folder / SHARDED))
            policy.config.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            torch.save({"step": step, "fsdp": True}, folder / "trainer_state.pt")

        write_checkpoint(out, save)
        shutil.rmtree(staging, ignore_errors=True)
    distributed.barrier()
    gather(policy)


def load_checkpoint(ckpt: Path, policy, trainer) -> None:
    """Load the sharded policy and optimizer state of ``ckpt`` (written on any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(policy, trainer)
    dcp.load(state, checkpoint_id=str(ckpt / SHARDED))
    set_state_dict(policy, trainer.optimizer.torch, model_state_dict=state["model"], optim_state_dict=state["optim"])
    gather(policy)


def full_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's weights of a sharded checkpoint, in one process (e.g. to compare or export)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(Path(ckpt) / SHARDED), f"{tmp}/full.pt")
        return torch.load(f"{tmp}/full.pt", weights_only=False)["model"]
