"""One model in a DeepSpeed engine on one rank: the engine holder every role worker builds on.

Trained roles get an engine with an optimizer and schedule; frozen roles below ZeRO-3 need none (the module sits on
the device with gradients off); frozen ZeRO-3 roles get an engine so their weights are partitioned. Token losses
arrive already divided by the GLOBAL token count; `backward_step` multiplies by the world size because DeepSpeed
averages gradients over ranks.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterator

import torch

from rlhf.config import OptimConfig, RoleConfig


class Engine:
    def __init__(self, module: torch.nn.Module, role: RoleConfig, trainable: bool, grad_accum: int,
                 total_steps: int, world_size: int, device: torch.device, dtype: torch.dtype):
        self.world_size = world_size
        self.zero_stage = role.deepspeed.zero_stage
        self.trainable = trainable
        self.nonfinite = 0
        self.stage0_grad_norm = float("nan")
        self.engine: Any = None
        if not trainable and self.zero_stage < 3:
            self.module = module.to(device, dtype=dtype).eval().requires_grad_(False)
            return
        import deepspeed
        ds, optim = role.deepspeed, role.optim
        cuda = device.type == "cuda"  # offloading to CPU memory only means something when there is a GPU
        zero: dict[str, Any] = {"stage": ds.zero_stage}
        if cuda and ds.offload_optimizer and ds.zero_stage > 0:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if cuda and ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        micro = role.micro_batch_size
        conf: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro * grad_accum * world_size,
            "zero_optimization": zero,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 1 << 30,
            "gradient_clipping": (optim.grad_clip if trainable else 0.0) or 0.0,
            "wall_clock_breakdown": False,
        }
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

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward and (at the accumulation boundary) step; a NaN/inf loss contributes nothing and is counted."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if not finite:  # keep the micro-step count of every rank in lockstep, but add no gradient
            loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        self.nonfinite += not finite
        # The loss is already a share of the global mean; DeepSpeed averages over ranks, so undo that here.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed discards the norm it clips with at stage 0; the grads are already all-reduced here.
            grads = [p.grad.float().norm() for p in self.module.parameters() if p.grad is not None]
            self.stage0_grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        self.engine.step()
        return finite

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
        from rlhf.checkpoint import save_rng
        self.engine.save_checkpoint(directory, tag=tag, client_state={})
        # Each rank's sampling RNG, so a resumed run draws the same replies an uninterrupted one would.
        save_rng(os.path.join(directory, tag, f"rng_rank{rank}.pt"))

    def load_checkpoint(self, directory: str, tag: str, rank: int) -> None:
        if not self.trainable:
            return
        from rlhf.checkpoint import load_rng
        self.engine.load_checkpoint(directory, tag=tag, load_module_strict=True)
        rng = os.path.join(directory, tag, f"rng_rank{rank}.pt")
        if os.path.exists(rng):
            load_rng(rng)


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
