"""One model in a DeepSpeed engine on one rank: the engine holder every role worker builds on.

Trained roles get an engine with an optimizer and schedule; frozen roles below ZeRO-3 need none (the module sits on
the device with gradients off); frozen ZeRO-3 roles get an engine so their weights are partitioned. Under ZeRO-3 a
rank never holds the whole model: it is built partitioned (`deepspeed.zero.Init`) and each rank reads only its own
partition of every weight from the safetensors files (`load_partitioned`); saving gathers, as before. Token losses
arrive already divided by the GLOBAL token count; `backward_step` multiplies by the world size because DeepSpeed
averages gradients over ranks. Token-budget micro-batches vary in number from rank to rank and step to step, so
`micro_steps` has the ranks agree on a count and marks the optimizer step's boundary itself.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import sys
from typing import Any, Callable, Iterator

import torch

from rlhf.batching import Batch, fill_bins, micro_batches, select
from rlhf.checkpoint import load_rng, save_rng
from rlhf.config import OptimConfig, RoleConfig
from rlhf.modeling import SafetensorsIndex, local_model_dir


class Engine:
    def __init__(self, module: torch.nn.Module, role: RoleConfig, trainable: bool, grad_accum: int,
                 total_steps: int, world_size: int, device: torch.device, dtype: torch.dtype):
        self.world_size = world_size
        self.device = device
        self.zero_stage = role.deepspeed.zero_stage
        self.trainable = trainable
        self.nonfinite = 0
        # The config's, which a restored checkpoint's schedule must not override; a frozen role has none.
        self.base_lr = role.optim.lr if trainable else 0.0
        self.stage0_grad_norm = float("nan")
        self.engine: Any = None
        if not trainable and self.zero_stage < 3:
            self.module = module.to(device, dtype=dtype).eval().requires_grad_(False)
            return
        import deepspeed
        optim = role.optim if trainable else None
        cuda = device.type == "cuda"
        conf = deepspeed_config(role, trainable, grad_accum, world_size, device, dtype,
                                getattr(getattr(module, "config", None), "hidden_size", None))
        if not trainable:
            module.requires_grad_(False)
            self.engine, *_ = deepspeed.initialize(model=module, config=conf)
            self.engine.eval()
        else:
            params = [p for p in module.parameters() if p.requires_grad]
            schedule = lr_schedule(optim, total_steps)
            adam = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
            if cuda:
                conf["optimizer"] = {"type": "AdamW", "params": {**adam, "betas": list(optim.betas)}}
                self.engine, *_ = deepspeed.initialize(
                    model=module, model_parameters=params, config=conf,
                    lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
            else:
                opt = torch.optim.AdamW(params, **adam)
                self.engine, *_ = deepspeed.initialize(model=module, model_parameters=params, optimizer=opt,
                                                       config=conf,
                                                       lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.module = self.engine.module

    # --- forward and backward ----------------------------------------------------------------------------------
    @property
    def forward(self) -> torch.nn.Module:
        """What to call for a forward pass (the engine, so ZeRO-3 gathers; or the plain module)."""
        return self.engine if self.engine is not None else self.module

    def train(self) -> None:
        self.forward.train()

    def eval(self) -> None:
        self.forward.eval()

    def backward_step(self, loss: torch.Tensor, real: bool = True) -> bool:
        """Backward and (at the accumulation boundary) step; a NaN/inf loss contributes nothing and is counted. A
        pass that is not `real` (a repeat that keeps the ranks' pass counts equal) adds no gradient either."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if not (finite and real):  # keep the micro-step count of every rank in lockstep, but add no gradient
            loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        self.nonfinite += real and not finite
        # The loss is already a share of the global mean; DeepSpeed averages over ranks, so undo that here.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed discards the norm it clips with at stage 0; the grads are already all-reduced here.
            grads = [p.grad.float().norm() for p in self.module.parameters() if p.grad is not None]
            self.stage0_grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        self.engine.step()
        return finite

    def micro_steps(self, parts: list, train: bool = True) -> Iterator[tuple[Any, bool]]:
        """The micro-batches of one optimizer step (or of one forward-only pass), each with whether it is real.
        Every rank runs as many passes as the rank with the most (ZeRO's gathers and reductions are collective), the
        missing ones repeating its last micro-batch, whose loss the caller then passes as not real; in training the
        last pass is marked as the optimizer step's boundary, however many there were."""
        count = len(parts)
        import torch.distributed as dist
        if self.world_size > 1 and dist.is_initialized():
            agreed = torch.tensor([count], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            count = int(agreed)
        for k in range(count):
            if train:
                self.engine.set_gradient_accumulation_boundary(k == count - 1)
            yield parts[min(k, len(parts) - 1)], k < len(parts)

    def micro_batches(self, batch: Batch, rows: int, max_tokens: int = 0,
                      train: bool = True) -> Iterator[tuple[Batch, bool]]:
        """A rank's micro-batches of `batch`, each with whether it is real: `rows` rows each, or with `max_tokens`
        rows grouped by their attended tokens (first fit from the longest down, `rlhf.batching.fill_bins`), in as
        many passes as `micro_steps` agrees on."""
        if not max_tokens:
            yield from ((mb, True) for mb in micro_batches(batch, rows))
            return
        groups = fill_bins(batch["attention_mask"].sum(1).tolist(), max_tokens)
        yield from self.micro_steps([select(batch, torch.tensor(g)) for g in groups], train)

    def forward_rows(self, batch: Batch, max_tokens: int, forward: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """`forward` over token-budget micro-batches of the batch's rows (eval mode, no gradients), its rows put back
        in the batch's order, on the CPU."""
        groups = fill_bins(batch["attention_mask"].sum(1).tolist(), max_tokens)
        out: list = [None] * len(batch["attention_mask"])
        self.eval()
        with torch.no_grad():
            for (group, mb), real in self.micro_steps([(g, select(batch, torch.tensor(g))) for g in groups], False):
                result = forward(mb).float().cpu()
                for j, i in enumerate(group if real else ()):
                    out[i] = result[j]
        return torch.stack(out)

    def take_nonfinite(self) -> float:
        count, self.nonfinite = self.nonfinite, 0
        return float(count)

    def grad_norm(self) -> float:
        if self.zero_stage == 0:
            return self.stage0_grad_norm
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # --- weights ---------------------------------------------------------------------------------------------------
    @property
    def partitioned(self) -> bool:
        """ZeRO-3: each rank holds a shard of every weight."""
        return self.engine is not None and self.zero_stage == 3

    @contextlib.contextmanager
    def gathered(self, enabled: bool = True) -> Iterator[None]:
        """The full weights on every rank for the block (ZeRO-3; a no-op otherwise). Every rank must enter."""
        if not (enabled and self.partitioned):
            yield
            return
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank must call this: under ZeRO-3 the weights are gathered from all ranks."""
        with self.gathered():
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def write_on_rank0(self, rank: int, write: Callable[[], None]) -> None:
        """Every rank calls this (ZeRO-3 gathers the weights from all of them); rank 0 runs `write`."""
        with self.gathered():
            if rank == 0:
                write()
        import torch.distributed as dist
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    # --- checkpoints (DeepSpeed's format: optimizer and ZeRO partitions included) -----------------------------
    def save_checkpoint(self, directory: str, tag: str, rank: int) -> None:
        if not self.trainable:
            return  # frozen roles are rebuilt from their model path; nothing trained to save
        self.engine.save_checkpoint(directory, tag=tag, client_state={})
        # Each rank's sampling RNG, so a resumed run draws the same replies an uninterrupted one would.
        save_rng(os.path.join(directory, tag, f"rng_rank{rank}.pt"))

    def load_checkpoint(self, directory: str, tag: str, rank: int) -> None:
        if not self.trainable:
            return
        self.engine.load_checkpoint(directory, tag=tag, load_module_strict=True)
        self._config_lr()
        rng = os.path.join(directory, tag, f"rng_rank{rank}.pt")
        if os.path.exists(rng):
            load_rng(rng)

    def _config_lr(self) -> None:
        """The config's learning rate over the checkpoint's, at the restored schedule's step: a value PBT mutated
        (optim.lr) is the one the optimizer then uses; for the same config this changes nothing."""
        schedule = self.engine.lr_scheduler
        if schedule is None:
            return
        schedule.base_lrs = [self.base_lr] * len(schedule.base_lrs)
        for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas):
            group["initial_lr"] = self.base_lr
            group["lr"] = self.base_lr * factor(schedule.last_epoch)


def lr_schedule(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer step: linear warm-up, then constant or cosine to 10%."""
    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "cosine" and total_steps > optim.warmup_steps:
            progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return factor


def deepspeed_config(role: RoleConfig, trainable: bool, grad_accum: int, world_size: int, device: torch.device,
                     dtype: torch.dtype, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a rank's engine, and of the `zero.Init` its ZeRO-3 model is built under."""
    ds, micro = role.deepspeed, role.micro_batch_size
    cuda = device.type == "cuda"  # offloading to CPU memory only means something when there is a GPU
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if hidden_size and ds.zero_stage > 0:
        # Buckets sized by the model, as transformers' "auto" values are: DeepSpeed's defaults (5e8 elements, 2 GB in
        # float32) hold a 300M model's whole gradient in one bucket, which undoes what partitioning saves.
        bucket = max(hidden_size * hidden_size, 1 << 22)
        zero |= {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        if ds.zero_stage == 3:
            # The optimizer steps a sub-group at a time with temporaries its size (1e9 elements by default: 4 GB of
            # float32 beside the states); eight buckets keep that a small share of a rank's memory.
            zero |= {"stage3_prefetch_bucket_size": int(0.9 * bucket),
                     "stage3_param_persistence_threshold": 10 * hidden_size, "sub_group_size": 8 * bucket}
    if cuda and ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cuda and ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 1 << 30,
        "gradient_clipping": (role.optim.grad_clip if trainable else 0.0) or 0.0,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def partitioned_construction(config: dict[str, Any]) -> Iterator[None]:
    """Modules made inside are partitioned over the group's ranks as each is built (`deepspeed.zero.Init`): a rank
    holds at most one module's weights in full, briefly, and never runs their random init (the caller loads them)."""
    import deepspeed
    from transformers.initialization import no_init_weights
    with contextlib.ExitStack() as stack:
        stack.enter_context(no_init_weights())
        try:  # zero.Init would cast torch.arange to the weights' dtype, RoPE positions with it (transformers does this)
            from transformers.integrations.deepspeed import prevent_arange_dtype_change
            stack.enter_context(prevent_arange_dtype_change())
        except ImportError:
            pass
        stack.enter_context(deepspeed.zero.Init(config_dict_or_path=config))
        yield


def load_partitioned(model: torch.nn.Module, path: str) -> tuple[set[str], set[str], int]:
    """Fill a model built under `partitioned_construction` from the HF directory at `path`: each rank reads only its
    own partition of every weight (a flat range, `rlhf.modeling.SafetensorsIndex`), never a whole tensor, let alone
    the model. Weights the checkpoint lacks are initialised as transformers would (rank 0's, gathered one module at
    a time). Returns the checkpoint's unused keys, the model's missing ones, and the elements this rank read."""
    import deepspeed
    import torch.distributed as dist
    index = SafetensorsIndex(local_model_dir(path))
    rank = dist.get_rank() if dist.is_initialized() else 0
    aliases: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}  # tied weights are one parameter with two names
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), (param, []))[1].append(name)
    missing: set[str] = set()
    read = 0
    for param, names in aliases.values():
        key = next((n for n in names if n in index), None)
        if key is None:
            missing |= set(names)
            continue
        if index.numel(key) != param.ds_numel:
            raise ValueError(f"{path}: {key} has shape {list(index.shape(key))} but the model's is "
                             f"{list(param.ds_shape)}; the checkpoint does not fit its config.json")
        part = param.ds_tensor  # this rank's flat share: elements [rank * size, (rank + 1) * size) of the weight
        start = rank * part.ds_numel
        count = max(0, min(part.ds_numel, param.ds_numel - start))
        if count:
            with torch.no_grad():
                part.narrow(0, 0, count).copy_(index.read(key, start, count))
            read += count
    buffers = dict(model.named_buffers())
    for name, buffer in buffers.items():  # persistent buffers are small and whole on every rank
        if name in index:
            with torch.no_grad():
                buffer.copy_(index.read(name).view(buffer.shape))
    known = {n for _, names in aliases.values() for n in names} | set(buffers)
    unused = set(index.names) - known
    owners = [module for prefix, module in model.named_modules()
              if any(f"{prefix}.{n}".lstrip(".") in missing for n, _ in module.named_parameters(recurse=False))]
    init = getattr(model, "_init_weights", None)
    for module in owners if init is not None else ():
        with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
            if rank == 0:
                init(module)
    return unused, missing, read


def peak_rss_gb() -> float:
    """The largest resident set this process has had so far, in GB (what a rank's model load cost it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # kilobytes on Linux


def say_unloaded(path: str, model: torch.nn.Module, unused: set[str], missing: set[str]) -> None:
    """One line each for a partitioned load's checkpoint keys the model has no place for (but those transformers
    itself ignores) and for the model's weights the checkpoint lacks (initialised as new), as from_pretrained says."""
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    unused = {k for k in unused if not any(re.search(p, k) for p in ignored)}
    for what, keys in (("checkpoint weights the model does not use", unused),
                       ("model weights not in the checkpoint, initialised", missing)):
        if keys:
            shown = ", ".join(sorted(keys)[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            print(f"{path}: {what}: {shown}", file=sys.stderr)


def check_packable(config: Any, path: str) -> None:
    """Packed micro-batches need an attention that takes a 4D block-diagonal mask (SDPA or eager)."""
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"{path}: max_tokens_per_micro_batch packs sequences with a 4D attention mask, which "
                         f"{attention} attention does not take; load the model with sdpa or eager attention, or set "
                         f"max_tokens_per_micro_batch: 0")
