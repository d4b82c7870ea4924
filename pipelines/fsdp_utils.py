"""The few places where FSDP (full shard) differs from DDP / one process, kept in one file.

Under FSDP the live modules hold only shards, so: full state dicts are gathered through
accelerate (rank 0 receives them), optimizer states go through FSDP's optim-state-dict API, grad
clipping goes through the wrapped module, and the user-facing model dir is written from a CPU
"shadow" copy of each module loaded with the gathered weights.
"""
from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn


def plugin(mixed_precision: str) -> FullyShardedDataParallelPlugin:
    """FSDP1, full shard, size-based wrapping, bf16 compute with fp32 reductions when bf16."""
    policy = None
    if mixed_precision == "bf16":
        policy = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32, "buffer_dtype": torch.float32}
    return FullyShardedDataParallelPlugin(
        fsdp_version=1, sharding_strategy="FULL_SHARD", auto_wrap_policy="size_based_wrap",
        min_num_params=1_000_000, mixed_precision_policy=policy, use_orig_params=True,
        state_dict_type="FULL_STATE_DICT")


def is_fsdp(acc: Accelerator) -> bool:
    return acc.distributed_type == DistributedType.FSDP


def module_states(acc: Accelerator, raw: dict[str, nn.Module], prepared: dict[str, nn.Module]) -> dict:
    """Full state dicts with clean keys (FSDP: a collective; rank 0 gets the weights)."""
    if is_fsdp(acc):
        return {name: acc.get_state_dict(unwrap_compiled(m)) for name, m in prepared.items()}
    return {name: m.state_dict() for name, m in raw.items()}


def optimizer_states(acc: Accelerator, prepared: dict[str, nn.Module], optimizers: dict) -> dict[str, dict]:
    if not is_fsdp(acc):
        return {name: opt.state_dict() for name, opt in optimizers.items()}
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    out = {}
    for name, opt in optimizers.items():
        model = _module_for(prepared, name)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            out[name] = FSDP.optim_state_dict(model, opt.optimizer)
    return out


def load_optimizers(prepared: dict[str, nn.Module], optimizers: dict, states: dict[str, dict]) -> None:
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    for name, opt in optimizers.items():
        model = _module_for(prepared, name)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(rank0_only=False), FullOptimStateDictConfig(rank0_only=False)):
            osd = FSDP.optim_state_dict_to_load(model, opt.optimizer, states[name])
        opt.optimizer.load_state_dict(osd)


def clip_params(acc: Accelerator, prepared: dict[str, nn.Module], name: str, opt) -> list[torch.Tensor]:
    """The parameters to clip for optimizer ``name`` (FSDP: exactly its wrapped module's)."""
    if is_fsdp(acc):
        return list(_module_for(prepared, name).parameters())
    return [p for g in opt.param_groups for p in g["params"] if p.grad is not None]


def shadow_copies(raw: dict[str, nn.Module]) -> dict[str, nn.Module]:
    return {name: copy.deepcopy(m).cpu() for name, m in raw.items()}


def load_shadows(shadow: dict[str, nn.Module], tensors: dict) -> dict[str, nn.Module]:
    for name, m in shadow.items():
        m.load_state_dict(tensors[name], strict=True)
    return dict(shadow)


def _module_for(prepared: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in prepared:
        raise ValueError(f"with distributed: fsdp, optimizer '{name}' must be named after the module it "
                         f"trains; modules are {list(prepared)}")
    return unwrap_compiled(prepared[name])


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The FSDP module under torch.compile's wrapper: its state dicts have no ``_orig_mod.`` prefix."""
    return getattr(module, "_orig_mod", module)
