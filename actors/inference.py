"""Inference engines: what a rollout rank samples with (not to be confused with `actors.engine.Engine`, the
DeepSpeed training engine a trained role's rank wraps its model in).

An inference engine answers four calls (`InferenceEngine`); the rollout worker (`actors.rollout`) is a thin shell
around one. Two stand behind it, chosen by `roles.rollout.engine`:

- `hf`: transformers' `generate` on the policy's own code (`HFInferenceEngine`, here);
- `vllm`: vLLM, in the rank's own process (`actors.vllm_engine.VLLMInferenceEngine`).

Both sample through `rlhf.generation.rollout_replies`, so the MOSS stop tokens and the two-pass plugin rollouts are
one piece of code whichever engine draws the tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Protocol

import torch

from actors.weight_sync import Manifest
from rlhf.batching import Batch
from rlhf.generation import rollout_replies


class InferenceEngine(Protocol):
    version: Optional[int]
    """The policy version whose weights the engine holds; None while it holds none (asleep, or woken unsynced)."""

    def generate(self, prompts: Batch, sampling: Any) -> Batch: ...
    def update_weights(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None: ...
    def manifest(self) -> Manifest: ...
    def sleep(self) -> None: ...
    def wake(self) -> None: ...


class EngineAsleep(RuntimeError):
    """generate() on an engine that holds no weights (asleep, or woken and not yet synced)."""


def as_dict(sampling: Any) -> dict:
    return dataclasses.asdict(sampling) if dataclasses.is_dataclass(sampling) else dict(sampling)


def manifest_of_module(module: torch.nn.Module) -> Manifest:
    return [(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in module.named_parameters()]


@dataclasses.dataclass
class Sampling:
    """What a rollout rank's engine needs besides the weights to sample a MOSS rollout."""
    tokenizer: Any
    tools: Any = None
    """The plugin policy's tool registry (its rollouts are two passes around the tools' Results), or None."""
    max_results_tokens: int = 64
    device: Any = "cpu"


class HFInferenceEngine:
    """A transformers model that samples (`rlhf.generation.rollout_replies`) and returns, with what it sampled, each
    token's log-prob as the passes that sampled it computed it (`rlhf.generation.SampledLogprobs`): the behaviour
    log-probs the policy's importance weights are taken against, with no second pass over the replies."""

    def __init__(self, model: torch.nn.Module, sampling: Sampling):
        self.model, self.sampling = model, sampling
        self.version: Optional[int] = 0  # built from the policy's starting checkpoint
        self.shapes: dict[str, torch.Size] = {}

    def generate(self, prompts: Batch, sampling: Any) -> Batch:
        if self.version is None:
            raise EngineAsleep("the rollout engine holds no weights (asleep, or woken and not synced yet)")
        s = self.sampling
        return rollout_replies(self.model, s.tokenizer, prompts, as_dict(sampling), s.tools, s.device,
                               micro_batch=len(prompts["input_ids"]), max_results_tokens=s.max_results_tokens,
                               with_logprobs=True)

    def manifest(self) -> Manifest:
        return manifest_of_module(self.model)

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

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
