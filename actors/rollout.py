"""The rollout role: generation-only ranks (no optimizer) that follow the policy's weights.

A `RolloutWorker` is a thin shell around a rollout engine, the interface an inference engine fits behind:

    engine.generate(prompts, sampling)      -> response ids, masks, ended, per-token log-probs of what it sampled
    engine.update_weights(version, named)   -> the weights of policy version `version`, tensor by tensor
    engine.sleep() / engine.wake()          -> give the device memory back while a colocated trainer trains

The engine here is transformers' `generate` on the policy's own architecture (`HFRolloutEngine`): the MOSS stop
tokens and the two-pass plugin rollouts are the policy's own code (`actors.lm.CausalLMWorker._sample`). docs/rollout.md
shows how vLLM maps onto the same three calls. The worker adds what is Ray's and the run's: the weight-sync group with
the policy's rank 0 (`actors.weight_sync`), and the version and wall-clock span of every batch it generates.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Protocol

import torch

from actors.dispatch import dispatch, padded_rows
from actors.lm import CausalLMWorker
from rlhf.batching import Batch


class RolloutEngine(Protocol):
    version: Optional[int]
    """The policy version whose weights the engine holds; None while it holds none (asleep, or woken unsynced)."""

    def generate(self, prompts: Batch, sampling: Any) -> Batch: ...
    def update_weights(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None: ...
    def sleep(self) -> None: ...
    def wake(self) -> None: ...


class EngineAsleep(RuntimeError):
    """generate() on an engine that holds no weights (asleep, or woken and not yet synced)."""


class HFRolloutEngine:
    """A transformers model that samples (`sample`) and returns, with what it sampled, each token's log-prob as the
    passes that sampled it computed it (`rlhf.generation.SampledLogprobs`): the behaviour log-probs the policy's
    importance weights are taken against, with no second pass over the replies."""

    def __init__(self, model: torch.nn.Module, sample: Callable[[Batch, Any], Batch]):
        self.model, self.sample = model, sample
        self.version: Optional[int] = 0  # built from the policy's starting checkpoint
        self.shapes: dict[str, torch.Size] = {}

    def generate(self, prompts: Batch, sampling: Any) -> Batch:
        if self.version is None:
            raise EngineAsleep("the rollout engine holds no weights (asleep, or woken and not synced yet)")
        return self.sample(prompts, sampling)

    def update_weights(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        seen = set()
        with torch.no_grad():
            for name, tensor in named:
                params[name].data.copy_(tensor)
                seen.add(name)
        if missing := set(params) - seen:
            raise RuntimeError(f"the weight sync left {len(missing)} tensors unset, e.g. {sorted(missing)[0]}")
        self.version = version

    def sleep(self) -> None:
        """Drop the weights (their memory goes back to the device or the host); a wake and a sync restore them."""
        for name, param in self.model.named_parameters():
            self.shapes[name] = param.shape
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.version = None

    def wake(self) -> None:
        """Room for the weights again; they hold nothing until the next `update_weights`."""
        for name, param in self.model.named_parameters():
            if name in self.shapes:
                param.data = torch.empty(self.shapes[name], dtype=param.dtype, device=param.device)
        self.shapes.clear()


class RolloutWorker(CausalLMWorker):
    """A rollout rank: a whole copy of the policy's weights (as of the last sync) that samples the rollouts."""

    def build(self) -> torch.nn.Module:
        model = super().build()
        self.sync: Any = None
        self.rollout = HFRolloutEngine(model, lambda prompts, sampling: self._sample(prompts, sampling,
                                                                                    with_logprobs=True))
        return model

    @dispatch(split={"prompts": padded_rows}, reduce="concat")
    def generate(self, prompts: Batch, generation: Any) -> Batch:
        """The engine's replies (as the policy's `generate`) with `logprobs` [b, R] of what it sampled, and per row
        the policy `version` whose weights sampled it and the `span` [2] (wall-clock start, end) of the batch."""
        began = time.time()
        out = self.rollout.generate(prompts, generation)
        rows = len(prompts["input_ids"])
        return out | {"version": torch.full((rows,), self.rollout.version, dtype=torch.long),
                      "span": torch.tensor([[began, time.time()]], dtype=torch.float64).repeat(rows, 1)}

    @dispatch(reduce="first")
    def weight_manifest(self) -> list:
        return [(n, tuple(p.shape), str(p.dtype).removeprefix("torch."))
                for n, p in self.engine.module.named_parameters()]

    @dispatch(reduce="first")
    def weights(self) -> dict[str, torch.Tensor]:
        """The weights the engine holds (rank 0's; every rank holds the same), on the CPU."""
        return {n: p.detach().cpu().clone() for n, p in self.engine.module.named_parameters()}

    @dispatch(reduce="first")
    def join_weight_sync(self, addr: str, port: int, world: int) -> None:
        import ray
        from actors.weight_sync import sync_group
        self.sync = sync_group(addr, port, 1 + self.rank, world, self.cuda, ray.util.get_node_ip_address())

    @dispatch(reduce="first")
    def receive_weights(self, version: int, manifest: list, bucket_mb: float) -> int:
        """Take the policy's weights of `version` from the sync group; returns the version now held."""
        from actors.weight_sync import receive
        self.rollout.update_weights(version, receive(self.sync, manifest, bucket_mb, self.device))
        return version

    @dispatch(reduce="first")
    def sleep(self) -> None:
        self.rollout.sleep()

    @dispatch(reduce="first")
    def wake(self) -> None:
        self.rollout.wake()

    @dispatch(reduce="first")
    def version(self) -> Optional[int]:
        return self.rollout.version
