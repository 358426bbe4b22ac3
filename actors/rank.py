"""One rank of a role group: its process, device, seeded RNGs and rendezvous, and the engine it builds.

A role worker (`actors.lm`, `actors.scalar`) is a `RankWorker` that says how to build its model (`build`) and which
methods the controller may call (each declared with `actors.dispatch.dispatch`). The same class runs as a Ray actor
(`actors.group`) or as a plain object in the driver's process (`actors.local`): so Ray is imported only where a Ray
actor needs it, and DeepSpeed where a rank sets up, never when the drivers import the worker classes.
"""
from __future__ import annotations

import os
import random
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from actors.dispatch import dispatch
from actors.engine import Engine
from reward.batches import collate_ranked, micro_batches_of
from rlhf import storage
from rlhf.batching import fill_bins, micro_batches
from rlhf.config import ModelConfig, PluginsConfig, RoleConfig
from rlhf.modeling import load_tokenizer, quiet_loading


def skip_shm_comm_build() -> None:
    """Tell DeepSpeed its CPU shared-memory all-reduce op is unavailable, so its communication backend does not
    compile it. That op serves only `inference_all_reduce` (DeepSpeed's tensor-parallel inference), which no role
    here calls; every collective of ours goes through gloo. Built just in time, it costs a fresh machine (a new
    virtual environment, CI) about 40 s of both cores at the first rank's start. DeepSpeed keeps its probe of
    compatible ops as one module-level dict so that edits to it hold."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to build itself, the same for every rank of the group."""
    model_path: str
    role: RoleConfig
    model: ModelConfig
    seed: int
    trainable: bool = False
    grad_accum: int = 1
    """Micro-batches per optimizer step on one rank."""
    total_steps: int = 1
    """Optimizer steps of the run (the learning-rate schedule's length)."""
    plugins: Optional[PluginsConfig] = None
    """A plugin policy: its rollouts run these tools between their two passes."""
    train_backbone: bool = True
    """False: a trained scalar role trains its head alone, the LM it starts from kept as it is (a process reward
    model whose score reads the LM's own log-probs, `prm.train_backbone`)."""
    temperature: float = 1.0
    """The rollouts' sampling temperature: the log-probs of sampled replies are of softmax(logits / temperature),
    the distribution they were drawn from (the policy, its reference and the rollout engine of an RL run)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RankWorker:
    def __init__(self, role: str, rank: int, world_size: int, spec: RankSpec, num_threads: Optional[int] = None,
                 label: str = ""):
        self.role, self.rank, self.world_size, self.spec = role, rank, world_size, spec
        self.label = label or f"{role} rank {rank}/{world_size}"
        if num_threads:
            torch.set_num_threads(num_threads)
        quiet_loading()
        # A bundle may declare a GPU that has no CUDA behind it (simulated clusters): run on CPU then.
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            os.environ["DS_ACCELERATOR"] = "cpu"
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        seed_everything(spec.seed)
        self.engine: Optional[Engine] = None
        self.tokenizer: Any = None

    def __repr__(self) -> str:
        # Ray's dashboard and `ray list actors --detail` show an actor's repr: say which run's which rank this is.
        return self.label

    # --- placement and rendezvous ---------------------------------------------------------------------------
    def node_info(self) -> dict:
        import ray
        return {"role": self.role, "rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "hostname": socket.gethostname(), "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda": self.cuda}

    def master_endpoint(self, loopback: bool) -> tuple[str, int]:
        """Address and free port for the group's rendezvous: loopback when every rank shares this node."""
        ip = "127.0.0.1"
        if not loopback:
            import ray
            ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup(self, addr: str, port: int) -> dict:
        """Join the group's torch.distributed group, then build the model and its engine (the only place state
        is made)."""
        import torch.distributed as dist
        if not self.cuda:
            skip_shm_comm_build()
        if not dist.is_initialized():
            os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank),
                              WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
            if addr.startswith("127."):
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's pairs on loopback too
            import deepspeed
            deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", auto_mpi_discovery=False,
                                       verbose=False)
        spec = self.spec
        self.tokenizer = load_tokenizer(spec.model.tokenizer or spec.model_path, spec.model.trust_remote_code)
        module = self.build()
        self.engine = Engine(module, spec.role, spec.trainable, spec.grad_accum, spec.total_steps,
                             self.world_size, self.device, self.dtype())
        return {"parameters": sum(p.numel() for p in self.engine.module.parameters()),
                "trainable": sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad)}

    def build(self) -> torch.nn.Module:  # pragma: no cover - every role worker defines it
        raise NotImplementedError

    def dtype(self) -> torch.dtype:
        name = self.spec.model.dtype
        if name == "auto":
            return torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]

    def pid(self) -> int:
        return os.getpid()

    def each_micro_batch(self, batch: Any, forward: Any) -> torch.Tensor:
        """`forward` over the batch's micro-batches, in eval mode without gradients, concatenated on the CPU."""
        self.engine.eval()
        with torch.no_grad():
            return torch.cat([forward(mb).float().cpu()
                              for mb in micro_batches(batch, self.spec.role.micro_batch_size)])

    def _list_steps(self, lists: list, train: bool = True, by_length: bool = True):
        """Micro-batches of whole ranked lists with their lists, each with whether it is real: `micro_batch_size`
        lists each, or with a token budget (`self.budget`, set by the role's build) whole lists grouped by their
        tokens. The preference model's and DPO's steps and evaluations share it."""
        pad = self.tokenizer.pad_token_id
        if not self.budget:
            return ((item, True) for item in micro_batches_of(lists, self.spec.role.micro_batch_size, pad,
                                                                by_length=by_length, with_lists=True))
        groups = fill_bins([sum(map(len, lst.rows)) for lst in lists], self.budget, in_order=not by_length)
        parts = [[lists[i] for i in group] for group in groups]
        return self.engine.micro_steps([(collate_ranked(part, pad), part) for part in parts], train)

    # --- what every role answers -------------------------------------------------------------------------------
    @dispatch(reduce="first")
    def save_checkpoint(self, directory: str) -> None:
        """Write this rank's part of the checkpoint; to a URI (`rlhf.storage`), through a local directory of its own
        that it uploads, so nodes need no shared filesystem and each rank sends only the files it wrote."""
        if not storage.is_uri(directory):
            self.engine.save_checkpoint(directory, self.role, self.rank)
            return
        with tempfile.TemporaryDirectory(prefix=f"rlhf-save-{self.role}-{self.rank}-") as local:
            self.engine.save_checkpoint(local, self.role, self.rank)
            storage.upload(local, directory)

    @dispatch(reduce="first")
    def load_checkpoint(self, directory: str) -> None:
        """Read this role's part of the checkpoint back; from a URI, after downloading it to a local directory."""
        if not storage.is_uri(directory) or not self.engine.trainable:
            self.engine.load_checkpoint(directory, self.role, self.rank)
            return
        with tempfile.TemporaryDirectory(prefix=f"rlhf-load-{self.role}-{self.rank}-") as local:
            storage.download(storage.join(directory, self.role), os.path.join(local, self.role))
            self.engine.load_checkpoint(local, self.role, self.rank)

    @dispatch(reduce="concat")
    def weights_digest(self) -> list[float]:
        """A checksum of the full weights, one per rank, to check that the ranks stay identical."""
        state = self.engine.full_state_dict()
        return [float(sum(v.double().sum() + v.double().abs().sum() * 1e-3 for v in state.values()))]
