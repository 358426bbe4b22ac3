"""One rank of a role: its process group, seeded RNGs, and one DeepSpeed engine around a model.

`RankWorker` is the shared shell (rendezvous, engine, checkpoints); `LMWorker` holds a causal LM (SFT, policy,
reference) and `ScalarWorker` a scalar-head model (preference model, reward, critic). Losses come from pure
functions in `rlhf/` and `reward/`; token losses are divided by the GLOBAL token count and multiplied by the world
size, because DeepSpeed averages gradients over ranks.
"""
from __future__ import annotations

import logging
import math
import os
import random
import socket
from typing import Any, Optional

import numpy as np
import torch

from actors.faults import fault_point
from actors.group import chunked
from rlhf.batching import Batch, micro_batches, position_ids, trim_left_padding, trim_padding
from rlhf.config import DeepSpeedConfig, LoRAConfig, OptimConfig, from_dict

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RankWorker:
    """The part every rank shares: device choice, rendezvous, the DeepSpeed engine and its checkpoints."""

    def __init__(self, role: str, rank: int, world_size: int, *, config: dict, num_threads: int = 1):
        self.role, self.rank, self.world_size = role, rank, world_size
        self.cfg = from_dict(config)
        torch.set_num_threads(num_threads)
        # A bundle may declare a GPU that has no CUDA behind it (simulated clusters): run on CPU then.
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            os.environ["DS_ACCELERATOR"] = "cpu"
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.engine: Any = None
        self.module: Optional[torch.nn.Module] = None
        self.micro_batch_size = 1
        seed_everything(self.cfg.seed)

    # --- placement and rendezvous -------------------------------------------------------------------------
    def node_info(self) -> dict:
        import ray
        return {"role": self.role, "rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "hostname": socket.gethostname(), "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda": self.cuda}

    def master_endpoint(self, loopback: bool) -> tuple[str, int]:
        """Address and free port for the group's rendezvous: loopback when every rank shares this node."""
        import ray
        ip = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def init_distributed(self, addr: str, port: int) -> None:
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        if addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's pairs on loopback too
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", auto_mpi_discovery=False,
                                   verbose=False)

    def pid(self) -> int:
        return os.getpid()

    # --- engines ----------------------------------------------------------------------------------------
    def dtype(self) -> torch.dtype:
        name = self.cfg.model.dtype
        if name == "auto":
            return torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]

    def make_engine(self, module: torch.nn.Module, ds: DeepSpeedConfig, optim: Optional[OptimConfig],
                    micro_batch: int, grad_accum: int, total_steps: int) -> Any:
        """Wrap `module` in a DeepSpeed engine; frozen roles (optim None) below ZeRO-3 need none."""
        import deepspeed
        self.micro_batch_size = micro_batch
        dtype = self.dtype()
        if optim is None and ds.zero_stage < 3:
            module.to(self.device, dtype=dtype).eval().requires_grad_(False)
            self.module = module
            return None
        offload = self.cuda  # offloading to CPU memory only means something when there is a GPU
        zero: dict[str, Any] = {"stage": ds.zero_stage}
        if offload and ds.offload_optimizer and ds.zero_stage > 0:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if offload and ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        conf: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * self.world_size,
            "zero_optimization": zero,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 1 << 30,
            "gradient_clipping": (optim.grad_clip if optim else 0.0) or 0.0,
            "wall_clock_breakdown": False,
        }
        if optim is None:
            module.requires_grad_(False)
            engine, *_ = deepspeed.initialize(model=module, config=conf)
            engine.eval()
        else:
            params = [p for p in module.parameters() if p.requires_grad]
            schedule = _schedule(optim, total_steps)
            adam = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
            if self.cuda:
                conf["optimizer"] = {"type": "AdamW", "params": {**adam, "betas": list(optim.betas)}}
                engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=conf,
                                                  lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
            else:
                opt = torch.optim.AdamW(params, **adam)
                engine, *_ = deepspeed.initialize(model=module, model_parameters=params, optimizer=opt, config=conf,
                                                  lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.engine = engine
        self.module = engine.module
        return engine

    def forward_module(self) -> torch.nn.Module:
        return self.engine if self.engine is not None else self.module

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward and (at the accumulation boundary) step; a NaN/inf loss contributes nothing and is reported."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if not finite:  # keep the micro-step count of every rank in lockstep, but add no gradient
            loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        self.nonfinite = getattr(self, "nonfinite", 0) + (not finite)
        # The loss is already a share of the global mean; DeepSpeed averages over ranks, so undo that here.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if self.engine.zero_optimization_stage() == 0 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed discards the norm it clips with at stage 0; the grads are already all-reduced here.
            grads = [p.grad.float().norm() for p in self.module.parameters() if p.grad is not None]
            self._stage0_grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        self.engine.step()
        return finite

    def take_nonfinite(self) -> float:
        count, self.nonfinite = getattr(self, "nonfinite", 0), 0
        return float(count)

    def grad_norm(self) -> float:
        if self.engine is not None and self.engine.zero_optimization_stage() == 0:
            return getattr(self, "_stage0_grad_norm", float("nan"))
        norm = self.engine.get_global_grad_norm() if self.engine is not None else None
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # --- checkpoints (DeepSpeed's format: optimizer and ZeRO partitions included) -------------------------
    def save_checkpoint(self, directory: str, client_state: Optional[dict] = None) -> None:
        fault_point(self.role, self.rank, "save_checkpoint")
        if self.engine is None or self.engine.optimizer is None:
            return  # frozen roles are rebuilt from their checkpoint path; nothing trained to save
        from rlhf.checkpoint import save_rng
        self.engine.save_checkpoint(directory, tag=self.role, client_state=client_state or {})
        # Each rank's sampling RNG, so a resumed run draws the same replies an uninterrupted one would.
        save_rng(os.path.join(directory, self.role, f"rng_rank{self.rank}.pt"))

    def load_checkpoint(self, directory: str) -> dict:
        if self.engine is None or self.engine.optimizer is None:
            return {}
        from rlhf.checkpoint import load_rng
        _, client_state = self.engine.load_checkpoint(directory, tag=self.role, load_module_strict=True)
        rng = os.path.join(directory, self.role, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng):
            load_rng(rng)
        return client_state or {}

    def _write_on_rank0(self, write: Any) -> None:
        """Every rank calls this (ZeRO-3 gathers the weights from all of them); rank 0 runs `write`."""
        if self.engine is not None and self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                if self.rank == 0:
                    write()
        elif self.rank == 0:
            write()
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank must call this: under ZeRO-3 the weights are gathered from all ranks."""
        module = self.module
        if self.engine is not None and self.engine.zero_optimization_stage() == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def weights_digest(self) -> float:
        """A checksum of the full weights, to check that ranks stay identical."""
        state = self._full_state_dict()
        return float(sum(v.double().sum() + v.double().abs().sum() * 1e-3 for v in state.values()))


def _schedule(optim: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "cosine" and total_steps > optim.warmup_steps:
            progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return factor


def _apply_lora(model: torch.nn.Module, lora: LoRAConfig) -> torch.nn.Module:
    from rlhf.modeling import apply_lora
    targets = lora.target_modules
    return apply_lora(model, lora.r, lora.alpha, lora.dropout, "auto" if targets == ["auto"] else list(targets))


class LMWorker(RankWorker):
    """A causal LM rank: SFT training, the policy (generate, log-probs, PPO updates) and the reference."""

    def setup(self, model_path: str, trainable: bool, ds: dict, optim: Optional[dict], lora: Optional[dict],
              micro_batch: int, grad_accum: int, total_steps: int) -> dict:
        from rlhf.config import DeepSpeedConfig, LoRAConfig, OptimConfig
        from rlhf.modeling import load_causal_lm, load_tokenizer
        from omegaconf import OmegaConf
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, cfg.model.trust_remote_code)
        # Load straight into the run's dtype: a 16B model in float32 would need 64 GB of host memory per rank.
        model = load_causal_lm(model_path, str(self.dtype()).removeprefix("torch."), cfg.model.trust_remote_code)
        if cfg.model.gradient_checkpointing and trainable:
            model.gradient_checkpointing_enable()
        self.lora_enabled = bool(lora and lora["enabled"])
        if self.lora_enabled:
            model = _apply_lora(model, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoRAConfig), lora)))
        self.zero_stage = ds["zero_stage"]
        ds_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DeepSpeedConfig), ds))
        self.gather_for_generation = ds_cfg.gather_for_generation
        optim_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), optim)) if trainable else None
        self.make_engine(model, ds_cfg, optim_cfg, micro_batch, grad_accum, total_steps)
        self.eom_id = self.tokenizer.convert_tokens_to_ids("<eom>")
        self.pad_id = self.tokenizer.pad_token_id
        self.tools = None
        if cfg.data.plugin:  # a plugin policy rolls out in two passes, running its commands in this process
            from rlhf.plugins import build_registry
            self.tools = build_registry(cfg.plugins.tools, cfg.plugins.solver, cfg.plugins.timeout)
        n_params = sum(p.numel() for p in self.module.parameters())
        return {"parameters": n_params, "trainable": sum(p.numel() for p in self.module.parameters() if p.requires_grad)}

    def _logits(self, mb: Batch, keep: int = 0) -> torch.Tensor:
        """Float32 logits [b, T, V]; with `keep`, only the last `keep` positions' (the LM head and the float32
        copy then cover the reply alone, not the prompt) where the model's forward supports it."""
        mb = {k: v.to(self.device) for k, v in mb.items()}
        extra = {"logits_to_keep": keep} if keep and self._keeps_logits() else {}
        out = self.forward_module()(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                                    position_ids=position_ids(mb["attention_mask"]), use_cache=False, **extra)
        return out.logits[:, -keep:].float() if keep else out.logits.float()

    def _keeps_logits(self) -> bool:
        """Whether the underlying model's forward takes `logits_to_keep` (transformers' own models do; a
        checkpoint's remote code may not)."""
        if not hasattr(self, "_logits_to_keep"):
            import inspect
            base = self.module.get_base_model() if self.lora_enabled else self.module
            self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        return self._logits_to_keep

    def _lm_loss_sum(self, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        from rlhf.ppo_math import logprobs_from_logits
        logits = self._logits(mb)
        labels = mb["input_ids"][:, 1:].to(self.device)
        mask = mb["loss_mask"][:, 1:].to(self.device).float()
        logp = logprobs_from_logits(logits[:, :-1], labels)
        return -(logp * mask).sum(), mask.sum()

    # --- SFT ---------------------------------------------------------------------------------------------
    @chunked
    def sft_step(self, batch: Batch, num_tokens: int) -> Batch:
        """One optimizer step over this rank's chunk; the loss is the mean over the global batch's tokens."""
        self.engine.train()
        total = torch.zeros(())
        for mb in micro_batches(batch, self.micro_batch_size):
            loss_sum, _ = self._lm_loss_sum(trim_padding(mb))
            self.backward_step(loss_sum / num_tokens)
            total += loss_sum.detach().cpu()
        return {"loss_sum": total.view(1), "grad_norm": torch.tensor([self.grad_norm()]),
                "lr": torch.tensor([self.lr()])}

    @chunked
    def lm_eval(self, batch: Batch) -> Batch:
        """Summed token loss and token count over this rank's chunk (no update)."""
        self.forward_module().eval()
        loss, tokens = torch.zeros(()), torch.zeros(())
        with torch.no_grad():
            for mb in micro_batches(batch, self.micro_batch_size):
                ls, n = self._lm_loss_sum(trim_padding(mb))
                loss += ls.cpu()
                tokens += n.cpu()
        return {"loss_sum": loss.view(1), "tokens": tokens.view(1)}

    # --- generation --------------------------------------------------------------------------------------
    @chunked
    def generate(self, prompts: Batch, gen: dict) -> Batch:
        """Sample replies to left-padded prompts, stopping at <eom>, right-padded to a fixed width; a plugin
        policy writes its turn in two passes around the tools' Results (see rlhf.generation).
        Returns response_ids, action_mask (what the policy wrote), response_mask (what later passes attend to)
        [b, R] and ended [b]."""
        from rlhf.generation import generate_plugin_replies, generate_replies
        gather = self.engine is not None and self.zero_stage == 3 and self.gather_for_generation
        synced = self.zero_stage == 3 and not gather
        with _maybe_gathered(self.module, gather):
            if self.tools is not None:
                out, _ = generate_plugin_replies(self.module, self.tokenizer, prompts, gen, self.tools, self.device,
                                                 synced=synced, micro_batch=len(prompts["input_ids"]),
                                                 max_results_tokens=self.cfg.plugins.max_results_tokens)
                return out
            return generate_replies(self.module, prompts, gen, self.eom_id, self.pad_id, self.device,
                                    synced=synced, micro_batch=len(prompts["input_ids"]))

    # --- PPO ---------------------------------------------------------------------------------------------
    def _response_logprobs(self, mb: Batch, with_entropy: bool = False):
        """Log-probs of the reply tokens: mb has sequences/attention_mask [b, P+R] and prompt width P."""
        from rlhf.ppo_math import entropy_from_logits, logprobs_from_logits
        width = mb["response_ids"].shape[1]
        mb = trim_left_padding(mb)
        logits = self._logits({"input_ids": mb["sequences"], "attention_mask": mb["attention_mask"]}, keep=width + 1)
        logits = logits[:, :-1]
        logp = logprobs_from_logits(logits, mb["response_ids"].to(self.device))
        return (logp, entropy_from_logits(logits)) if with_entropy else (logp, None)

    def _logprobs(self, batch: Batch, adapters_off: bool) -> torch.Tensor:
        self.forward_module().eval()
        out = []
        with torch.no_grad(), self._adapters_off_if(adapters_off):
            for mb in micro_batches(batch, self.micro_batch_size):
                out.append(self._response_logprobs(mb)[0].cpu())
        return torch.cat(out)

    @chunked
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """[b, R] log-probs of the sampled replies (the reference's, or the policy's at rollout time)."""
        return self._logprobs(batch, adapters_off=False)

    @chunked
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """The policy's base with LoRA adapters switched off serves as the reference (no second copy)."""
        return self._logprobs(batch, adapters_off=True)

    def _adapters_off_if(self, flag: bool):
        import contextlib
        if flag and self.lora_enabled:
            return self.module.disable_adapter()
        return contextlib.nullcontext()

    @chunked
    def ppo_step(self, batch: Batch, num_tokens: int, clip_eps: float, entropy_coef: float,
                 ptx: Optional[Batch] = None, ptx_tokens: int = 0, ptx_coef: float = 0.0,
                 kl_coef: float = 0.0) -> Batch:
        """One optimizer step of the clipped surrogate over this rank's chunk of a train batch; with `kl_coef`
        (GRPO, RLOO) the batch carries `ref_logprobs` and the loss adds kl_coef x k3 KL to the reference.
        A batch without `old_logprobs` is on-policy (the weights that sampled it): the ratio's denominator is
        this forward's own detached log-probs, which come back as `logprobs` [b, R]."""
        from rlhf.batching import chunk as take
        from rlhf.ppo_math import kl_loss, masked_sum, policy_loss
        self.engine.train()
        n_micro = max(1, len(batch["response_ids"]) // self.micro_batch_size)
        ptx_parts = None
        if ptx is not None and ptx_coef > 0:  # this rank's share of the SFT batch, one part per micro-batch
            mine = take(ptx, self.rank, self.world_size)
            ptx_parts = [take(mine, i, n_micro) for i in range(n_micro)]
        sums = {"pg_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "entropy": 0.0, "ptx_loss": 0.0}
        if kl_coef:
            sums["kl_loss"] = 0.0
        fresh: list[torch.Tensor] = []
        for i, mb in enumerate(micro_batches(batch, self.micro_batch_size)):
            mask = mb["action_mask"].to(self.device).float()
            logp, entropy = self._response_logprobs(mb, with_entropy=True)
            old = mb["old_logprobs"].to(self.device) if "old_logprobs" in mb else logp.detach()
            if "old_logprobs" not in mb:
                fresh.append(logp.detach().cpu())
            loss, stats = policy_loss(logp, old, mb["advantages"].to(self.device),
                                      mask, clip_eps, num_tokens=num_tokens)
            tokens = mask.sum()
            sums["pg_loss"] += float(loss.detach())
            sums["clipfrac"] += float(stats["clipfrac"]) * float(tokens) / num_tokens
            sums["approx_kl"] += float(stats["approx_kl"]) * float(tokens) / num_tokens
            ent = masked_sum(entropy, mask) / num_tokens
            sums["entropy"] += float(ent.detach())
            if entropy_coef:
                loss = loss - entropy_coef * ent
            if kl_coef:
                kl, _ = kl_loss(logp, mb["ref_logprobs"].to(self.device), mask, num_tokens)
                sums["kl_loss"] += float(kl.detach())
                loss = loss + kl_coef * kl
            if ptx_parts is not None:
                ptx_sum, _ = self._lm_loss_sum(trim_padding(ptx_parts[i]))
                ptx_loss = ptx_sum / max(1, ptx_tokens)
                sums["ptx_loss"] += float(ptx_loss.detach())
                loss = loss + ptx_coef * ptx_loss
            self.backward_step(loss)
        out = {k: torch.tensor([v]) for k, v in sums.items()} | {"grad_norm": torch.tensor([self.grad_norm()]),
                                                                 "nonfinite": torch.tensor([self.take_nonfinite()])}
        return out | ({"logprobs": torch.cat(fresh)} if fresh else {})

    # --- output ------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str, merge_lora: bool = True) -> None:
        """All ranks call this (ZeRO-3 gathers); rank 0 writes an HF directory atomically."""
        from rlhf.modeling import save_pretrained_atomic
        self._write_on_rank0(lambda: save_pretrained_atomic(self.module, self.tokenizer, out_dir, merge_lora=merge_lora))


class _maybe_gathered:
    """Gather ZeRO-3 partitions once for the whole rollout (fast; needs the full model to fit one device)."""

    def __init__(self, module: torch.nn.Module, enabled: bool):
        self.enabled, self.module, self.ctx = enabled, module, None

    def __enter__(self):
        if self.enabled:
            import deepspeed
            self.ctx = deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


class ScalarWorker(RankWorker):
    """A scalar-head rank: the preference model in training, the reward in PPO, and the critic."""

    def setup(self, model_path: str, trainable: bool, ds: dict, optim: Optional[dict], lora: Optional[dict],
              micro_batch: int, grad_accum: int, total_steps: int) -> dict:
        from omegaconf import OmegaConf
        from reward.model import ScalarHeadModel, load_reward_stats
        from rlhf.config import DeepSpeedConfig, LoRAConfig, OptimConfig
        from rlhf.modeling import load_tokenizer
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, cfg.model.trust_remote_code)
        model = ScalarHeadModel.from_pretrained(model_path, self.dtype(), cfg.model.trust_remote_code)
        self.stats = load_reward_stats(model_path)
        self.lora_enabled = bool(lora and lora["enabled"])
        if self.lora_enabled:
            lora_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoRAConfig), lora))
            model.lm = _apply_lora(model.lm, lora_cfg)
            model.head.requires_grad_(True)
        self.zero_stage = ds["zero_stage"]
        ds_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DeepSpeedConfig), ds))
        optim_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), optim)) if trainable else None
        self.make_engine(model, ds_cfg, optim_cfg, micro_batch, grad_accum, total_steps)
        self.sequences_encoded = 0
        return {"parameters": sum(p.numel() for p in self.module.parameters()), "stats": self.stats}

    def _values(self, mb: Batch) -> torch.Tensor:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        self.sequences_encoded += int(mb["input_ids"].shape[0])
        return self.forward_module()(mb["input_ids"], mb["attention_mask"], position_ids(mb["attention_mask"]))

    # --- preference-model training (batches arrive already split per rank: whole prompts stay together) ----
    def rm_step(self, micro: list[Batch], num_prompts: int, label_smoothing: float, lm_coef: float,
                num_best_tokens: int) -> dict:
        from reward.losses import ranking_loss
        self.engine.train()
        encoded_before = self.sequences_encoded
        out = {"loss": 0.0, "correct": 0.0, "pairs": 0.0, "margin_sum": 0.0, "lm_loss": 0.0}
        rewards = []
        for mb in micro:
            seq = {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}
            if lm_coef > 0:
                values, logits = self._values_and_logits(seq)
            else:
                values, logits = self._values(trim_padding(seq)), None
            scores = _last_values(values, mb["attention_mask"].to(self.device))
            res = ranking_loss(scores, mb["pairs"].to(self.device), mb["pair_prompt"].to(self.device),
                               mb["margins"].to(self.device), label_smoothing, num_prompts=num_prompts)
            loss = res["loss"]
            if logits is not None:
                loss = loss + lm_coef * _best_lm_loss(logits, mb, self.device) / max(1, num_best_tokens)
                out["lm_loss"] += float(_best_lm_loss(logits.detach(), mb, self.device)) / max(1, num_best_tokens)
            self.backward_step(loss)
            n_pairs = int(res["num_pairs"])
            out["loss"] += float(res["loss"].detach())
            out["pairs"] += n_pairs
            out["correct"] += float(res["accuracy"]) * n_pairs
            out["margin_sum"] += float(res["mean_margin"]) * n_pairs
            rewards.append(scores.detach().float().cpu())
        out["encoded"] = self.sequences_encoded - encoded_before
        out["grad_norm"] = self.grad_norm()
        out["rewards"] = torch.cat(rewards) if rewards else torch.zeros(0)
        return out

    def _values_and_logits(self, seq: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mb = {k: v.to(self.device) for k, v in seq.items()}
        self.sequences_encoded += int(mb["input_ids"].shape[0])
        module = self.module
        return module.forward_with_logits(mb["input_ids"], mb["attention_mask"], position_ids(mb["attention_mask"]))

    def rm_eval(self, micro: list[Batch]) -> dict:
        """Scores and pairwise agreement on held-out ranked lists (no update)."""
        self.forward_module().eval()
        correct = pairs = 0
        margins, rewards = [], []
        with torch.no_grad():
            for mb in micro:
                scores = _last_values(self._values(trim_padding({"input_ids": mb["input_ids"],
                                                                  "attention_mask": mb["attention_mask"]})),
                                      mb["attention_mask"].to(self.device)).float().cpu()
                diff = scores[mb["pairs"][:, 0]] - scores[mb["pairs"][:, 1]]
                correct += int((diff > 0).sum())
                pairs += len(diff)
                margins.append(diff)
                rewards.append(scores[mb["real"] > 0] if "real" in mb else scores)
        return {"correct": correct, "pairs": pairs, "margins": torch.cat(margins) if margins else torch.zeros(0),
                "rewards": torch.cat(rewards) if rewards else torch.zeros(0)}

    # --- PPO: reward and critic ------------------------------------------------------------------------
    @chunked
    def score(self, batch: Batch) -> torch.Tensor:
        """[b] reward of each full dialogue, read at its last token (the reply's <eom>)."""
        self.forward_module().eval()
        out = []
        with torch.no_grad():
            for mb in micro_batches(batch, self.micro_batch_size):
                mb = trim_left_padding(mb)
                seq = {"input_ids": mb["sequences"], "attention_mask": mb["attention_mask"]}
                out.append(_last_values(self._values(seq), seq["attention_mask"].to(self.device)).float().cpu())
        return torch.cat(out)

    @chunked
    def values(self, batch: Batch) -> torch.Tensor:
        """[b, R] critic values of the states before each reply token."""
        self.forward_module().eval()
        out = []
        with torch.no_grad():
            for mb in micro_batches(batch, self.micro_batch_size):
                out.append(self._response_values(mb).float().cpu())
        return torch.cat(out)

    def _response_values(self, mb: Batch) -> torch.Tensor:
        width = mb["response_ids"].shape[1]
        mb = trim_left_padding(mb)
        values = self._values({"input_ids": mb["sequences"], "attention_mask": mb["attention_mask"]})
        return values[:, -width - 1:-1]

    @chunked
    def value_step(self, batch: Batch, num_tokens: int, clip_eps: float, coef: float) -> Batch:
        from rlhf.ppo_math import value_loss
        self.engine.train()
        sums = {"vf_loss": 0.0, "vf_clipfrac": 0.0}
        for mb in micro_batches(batch, self.micro_batch_size):
            mask = mb["action_mask"].to(self.device).float()
            values = self._response_values(mb).float()
            loss, stats = value_loss(values, mb["old_values"].to(self.device), mb["returns"].to(self.device), mask,
                                     clip_eps or None, num_tokens=num_tokens)
            sums["vf_loss"] += float(loss.detach())
            sums["vf_clipfrac"] += float(stats["vf_clipfrac"]) * float(mask.sum()) / num_tokens
            self.backward_step(coef * loss)
        return {k: torch.tensor([v]) for k, v in sums.items()} | {"vf_grad_norm": torch.tensor([self.grad_norm()]),
                                                                  "nonfinite": torch.tensor([self.take_nonfinite()])}

    def save_pretrained(self, out_dir: str, stats: Optional[dict] = None) -> None:
        """All ranks call this; rank 0 writes the LM (merged when LoRA), the head and the tokenizer."""
        self._write_on_rank0(lambda: _save_scalar(self.module, self.tokenizer, out_dir, stats, self.lora_enabled))


def _save_scalar(module: torch.nn.Module, tokenizer: Any, out_dir: str, stats: Optional[dict], lora: bool) -> None:
    """Write the scalar-head model (LM merged when LoRA, head, stats, tokenizer) to a temp dir, then rename."""
    import copy
    import shutil
    from reward.model import ScalarHeadModel
    model = module
    if lora:
        model = ScalarHeadModel(copy.deepcopy(module.lm).merge_and_unload(), copy.deepcopy(module.head))
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, stats=stats)
    tokenizer.save_pretrained(tmp)
    old = f"{out_dir.rstrip('/')}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _last_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    from reward.model import last_index
    idx = last_index(attention_mask[:, : values.shape[1]])
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def _best_lm_loss(logits: torch.Tensor, mb: Batch, device: torch.device) -> torch.Tensor:
    """Summed LM loss on each prompt's best response (its reply tokens only)."""
    from rlhf.ppo_math import logprobs_from_logits
    rows = mb["best_rows"].to(device)
    ids = mb["input_ids"].to(device)[rows]
    mask = mb["loss_mask"].to(device)[rows][:, 1:].float()
    logp = logprobs_from_logits(logits[rows][:, :-1].float(), ids[:, 1:])
    return -(logp * mask).sum()
