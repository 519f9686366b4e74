"""Sharded training (FSDP2) for models whose weights do not fit one device's memory.

Why FSDP2 (``torch.distributed.fsdp.fully_shard`` through Lightning's ``ModelParallelStrategy``) and not
FSDP1: a PRISM model mixes a frozen base (bf16 on GPU) with trainable fp32 LoRA weights inside the
same decoder layer, plus an fp32 gate. FSDP1 flattens a unit into one flat parameter that needs one
dtype and one ``requires_grad``; FSDP2 shards every parameter on its own (DTensor), all-gathers mixed
dtypes in one unit, and only asks that the *trainable* parameters of a unit share a dtype.

Units: one per decoder layer (its frozen projections and its LoRA matrices), and the root, which is
the :class:`~prism_lightning.model.module.PrismModule` itself (embeddings, final norm, LM head and
the gate). The module's training step calls the decoder and the LM head directly (logits only at
response positions), not through ``forward``; the step is registered as an FSDP forward method, so
the root's weights are gathered around it and gradients are reduced after backward as for a forward.

Dtypes (:func:`mixed_precision_policy`): each parameter is stored, gathered and used in its own dtype
(base bf16 as loaded, LoRA and gate fp32; ``bf16-mixed`` autocasts the matmuls exactly as under DDP),
and gradients are reduced in fp32.

Loading: only rank 0 reads the base from disk; the other processes build it on the meta device and
receive their shards from rank 0, one tensor at a time (one host copy of the base per job, not one per
process). Training from an exported checkpoint (``model.checkpoint``) still loads it on every rank.

Checkpoints (:class:`PrismFSDPStrategy`): a ``.ckpt`` is one file with the full (gathered) adapter,
gate and optimizer state, written by rank 0; the frozen base is never gathered or saved.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

# Methods of PrismModule that run the network outside ``forward``: FSDP gathers the root's weights
# around them (see the module docstring).
FORWARD_METHODS = ("_common_step", "_gate_features_batch", "_gate_route_probs_batch")


class PrismFSDPStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 data parallelism over every process (no
    tensor parallelism), with checkpoints of the trainable weights only.

    ``PrismModule.configure_model`` applies :func:`shard_module` on the strategy's device mesh. NCCL on
    GPUs, gloo on CPUs: the tests check it against DDP on two CPU processes.

    Args:
        process_group_backend: ``nccl``/``gloo``; default by device.
        timeout: collective timeout.
    """

    def __init__(
        self, process_group_backend: str | None = None, timeout: timedelta | None = timedelta(minutes=30)
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        # "auto" would mean one data-parallel group per node with tensor parallelism inside it; PRISM
        # shards over all processes instead (a 1-D mesh in effect: world x 1).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full adapter + gate tensors on rank 0 (every rank takes part); frozen base weights are left
        out, so a checkpoint never gathers the base (PrismModule.on_save_checkpoint drops them anyway)."""
        return trainable_state_dict(self.lightning_module)


def fsdp_strategy(**kwargs: Any) -> PrismFSDPStrategy:
    """The sharded strategy for ``Trainer(strategy=...)`` (``configs/trainer/fsdp.yaml`` names the class)."""
    return PrismFSDPStrategy(**kwargs)


def mixed_precision_policy():
    """Keep each parameter's own dtype (frozen base as loaded, trainable LoRA and gate in fp32) and
    reduce gradients in fp32; forward inputs are left alone (teacher logits stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_module(module: nn.Module, layers: nn.ModuleList, mesh, *, from_rank0: bool = False) -> None:
    """``fully_shard`` each decoder layer, then ``module`` as the root, and register the module's
    non-``forward`` network methods (:data:`FORWARD_METHODS`) as FSDP forward methods. ``from_rank0``:
    only rank 0 holds real weights (the others were built on the meta device); every rank's shards are
    then filled from rank 0 (:func:`load_from_rank0`)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    full = module.state_dict() if from_rank0 and torch.distributed.get_rank() == 0 else None
    policy = mixed_precision_policy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root reshards after each step too: validation and the feature pass run without backward.
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for name in FORWARD_METHODS:
        if hasattr(module, name):
            register_fsdp_forward_method(module, name)
    if from_rank0:
        load_from_rank0(module, full)


def load_from_rank0(module: nn.Module, full_state: dict[str, torch.Tensor] | None) -> None:
    """Fill every rank's shards from rank 0's whole state (a collective). Rank 0 passes the module's
    state taken before sharding (base, adapter and gate); the other ranks built theirs on the meta
    device and pass None. Each tensor is broadcast on its own, so no rank ever holds a second copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full_state or {}, options=options)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"rank 0 sent no value for {', '.join(leftover[:5])}")


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) was sharded with ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def reshard(module: nn.Module) -> None:
    """Free a sharded module's gathered weights (a no-op for an unsharded one). Needed after a forward
    that the routing controller stops early, where FSDP's post-forward hook of the last layer run does
    not fire."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.reshard()


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and the buffers of ``module`` as full CPU tensors. For a sharded module
    this is a collective (every rank must call it) and only rank 0 gets a non-empty dict."""
    if not is_sharded(module):
        state = module.state_dict()
        keep = {n for n, p in module.named_parameters() if not p.requires_grad}
        return {k: v.detach().cpu() for k, v in state.items() if k not in keep}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(module, options=options)
