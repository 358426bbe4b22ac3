"""Weight sync from the policy's training ranks to the rollout engine's ranks.

The policy's rank 0 and every rollout rank join one process group of their own (gloo on CPU, NCCL on GPUs), apart
from each group's DeepSpeed world: `sync_group` builds it from a TCP store, as inference engines' weight-update
groups are built. A sync sends the weights the rollout engine holds (the policy's, with LoRA adapters merged in) in
buckets of `bucket_mb`: each bucket one flat broadcast from rank 0. Under ZeRO-3 every policy rank gathers each
bucket's shards with rank 0, so no rank ever holds more than one bucket of gathered weights.

Both sides walk the same manifest: (name, shape, dtype) of every tensor in order, which the controller reads from
both groups once and compares, so a rollout model that is not the policy's architecture is one clear error.
"""
from __future__ import annotations

import contextlib
import datetime
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

Manifest = list[tuple[str, tuple[int, ...], str]]
"""(name, shape, dtype) of each tensor a sync sends, in order."""

SYNC_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class Source:
    """One tensor the policy sends: the parameters to gather first (ZeRO-3) and how to make the full tensor."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    gather: list[torch.nn.Parameter]
    full: Callable[[], torch.Tensor]


def sync_group(addr: str, port: int, rank: int, world: int, cuda: bool, own_ip: str) -> Any:
    """A process group of `world` ranks (the policy's rank 0 is rank 0) outside torch.distributed's default one."""
    import torch.distributed as dist
    store = dist.TCPStore(addr, port, world, rank == 0, timeout=SYNC_TIMEOUT)
    if cuda:
        return dist.ProcessGroupNCCL(store, rank, world)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = SYNC_TIMEOUT
    device = (dist.ProcessGroupGloo.create_device(interface="lo") if addr.startswith("127.")
              else dist.ProcessGroupGloo.create_device(hostname=own_ip))
    options._devices = [device]
    return dist.ProcessGroupGloo(store, rank, world, options)


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    import torch.distributed as dist
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def buckets(manifest: Manifest, bucket_mb: float) -> list[list[int]]:
    """Indices of the manifest's tensors in each bucket: consecutive tensors of one dtype up to `bucket_mb` (a tensor
    larger than that is a bucket alone)."""
    limit = bucket_mb * 2**20
    out: list[list[int]] = []
    size, dtype = 0.0, None
    for i, (_, shape, name) in enumerate(manifest):
        nbytes = math.prod(shape) * getattr(torch, name).itemsize
        if not out or name != dtype or size + nbytes > limit:
            out.append([])
            size, dtype = 0.0, name
        out[-1].append(i)
        size += nbytes
    return out


# --- the policy's side ------------------------------------------------------------------------------------------

def trainer_sources(module: torch.nn.Module) -> list[Source]:
    """What the rollout engine receives from a policy module (a transformers model, or PEFT's around one): every
    parameter under the plain model's name, LoRA's base weights with their adapters' update merged in, the adapters
    themselves left out."""
    lora_layers = {}
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    try:
        from peft.tuners.lora import LoraLayer
        lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    except ImportError:
        pass
    sources = []
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        shape = tuple(getattr(param, "ds_shape", param.shape))
        layer = lora_layers.get(owner) if leaf == "weight" else None
        if layer is None:
            sources.append(Source(name.replace(".base_layer.", "."), shape, param.dtype, [param],
                                  lambda p=param: p.data))
            continue
        adapters = [p for n, p in layer.named_parameters() if n.startswith("lora_")]
        sources.append(Source(f"{owner}.{leaf}", shape, param.dtype, [param, *adapters],
                              lambda p=param, lay=layer: p.data + _delta(lay).to(p.dtype)))
    return sources


def _delta(layer: Any) -> torch.Tensor:
    """The weight update of a LoRA layer's active adapters (scaling included), as PEFT's merge adds it."""
    delta = None
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            d = layer.get_delta_weight(adapter)
            delta = d if delta is None else delta + d
    return delta if delta is not None else torch.zeros(())


def manifest_of(sources: list[Source]) -> Manifest:
    return [(s.name, s.shape, str(s.dtype).removeprefix("torch.")) for s in sources]


def send(group: Optional[Any], sources: list[Source], bucket_mb: float, partitioned: bool, device: Any) -> None:
    """Every policy rank calls this (ZeRO-3 gathers each bucket from all of them); rank 0, the one with `group`,
    broadcasts each bucket."""
    for index in buckets(manifest_of(sources), bucket_mb):
        chosen = [sources[i] for i in index]
        gather = contextlib.nullcontext()
        if partitioned:
            import deepspeed
            gather = deepspeed.zero.GatheredParameters([p for s in chosen for p in s.gather], modifier_rank=None)
        with gather, torch.no_grad():
            if group is not None:
                flat = torch.cat([s.full().reshape(-1).to(device) for s in chosen])
                broadcast(group, flat)


# --- the rollout engine's side ----------------------------------------------------------------------------------

def receive(group: Any, manifest: Manifest, bucket_mb: float, device: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of one sync, bucket by bucket as they arrive (views of each bucket's flat buffer)."""
    for index in buckets(manifest, bucket_mb):
        entries = [manifest[i] for i in index]
        flat = torch.empty(sum(math.prod(shape) for _, shape, _ in entries), dtype=getattr(torch, entries[0][2]),
                           device=device)
        broadcast(group, flat)
        at = 0
        for name, shape, _ in entries:
            n = math.prod(shape)
            yield name, flat[at:at + n].view(shape)
            at += n
