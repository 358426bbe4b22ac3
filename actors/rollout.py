"""The rollout role: generation-only ranks (no optimizer, no DeepSpeed) that follow the policy's weights.

A `RolloutWorker` is a thin shell around an inference engine (`actors.inference`), picked by
`roles.rollout.engine`: transformers' `generate` on the policy's own code (`hf`) or vLLM (`vllm`,
`actors.vllm_engine`). Either answers

    engine.generate(prompts, sampling)      -> response ids, masks, ended, per-token log-probs of what it sampled
    engine.update_weights(version, named)   -> the weights of policy version `version`, tensor by tensor
    engine.sleep() / engine.wake()          -> give the device memory back while a colocated trainer trains

The worker adds what is Ray's and the run's: the weight-sync group with the policy's rank 0
(`actors.weight_sync`), and the version and wall-clock span of every batch it generates. docs/rollout.md has the
whole picture.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch

from actors.dispatch import dispatch, padded_rows
from actors.inference import HFInferenceEngine, InferenceEngine, Sampling
from actors.rank import RankWorker
from actors.weight_sync import receive, sync_group
from rlhf.batching import Batch
from rlhf.modeling import load_causal_lm, load_tokenizer


class RolloutWorker(RankWorker):
    """A rollout rank: an inference engine holding a whole copy of the policy's weights (as of the last sync) that
    samples the rollouts. Its ranks share no process group: each serves its share of the prompts alone."""

    def setup(self, addr: str, port: int) -> dict:
        from rlhf.tools import build_registry  # imports sympy
        spec = self.spec
        self.sync: Any = None
        self.tokenizer = load_tokenizer(spec.model.tokenizer or spec.model_path, spec.model.trust_remote_code)
        tools = build_registry(spec.plugins.tools, spec.plugins.solver, spec.plugins.timeout) if spec.plugins else None
        sampling = Sampling(self.tokenizer, tools, spec.plugins.max_results_tokens if spec.plugins else 64, self.device)
        self.inference: InferenceEngine = self._engine(sampling)
        return {"parameters": sum(math.prod(shape) for _, shape, _ in self.inference.manifest()), "trainable": 0}

    def _engine(self, sampling: Sampling) -> InferenceEngine:
        spec = self.spec
        if spec.role.engine == "vllm":
            from actors.vllm_engine import VLLMInferenceEngine  # the vLLM side only when it is asked for
            return VLLMInferenceEngine(spec.model_path, sampling, spec.role.vllm, self.dtype(), spec.seed, self.cuda,
                                       max(1, int(spec.role.layout.cpus_per_rank)), spec.model.trust_remote_code)
        model = load_causal_lm(spec.model_path, str(self.dtype()).removeprefix("torch."), spec.model.trust_remote_code)
        return HFInferenceEngine(model.to(self.device).eval(), sampling)

    @dispatch(split={"prompts": padded_rows}, reduce="concat")
    def generate(self, prompts: Batch, generation: Any) -> Batch:
        """The engine's replies (as the policy's `generate`) with `logprobs` [b, R] of what it sampled, and per row
        the policy `version` whose weights sampled it and the `span` [2] (wall-clock start, end) of the batch."""
        began = time.time()
        out = self.inference.generate(prompts, generation)
        rows = len(prompts["input_ids"])
        return out | {"version": torch.full((rows,), self.inference.version, dtype=torch.long),
                      "span": torch.tensor([[began, time.time()]], dtype=torch.float64).repeat(rows, 1)}

    @dispatch(reduce="first")
    def weight_manifest(self) -> list:
        return self.inference.manifest()

    @dispatch(reduce="first")
    def weights(self) -> dict[str, torch.Tensor]:
        """The weights an HF engine holds (rank 0's; every rank holds the same), on the CPU."""
        if not isinstance(self.inference, HFInferenceEngine):
            raise NotImplementedError("weights() reads an HF engine's model; a vLLM engine keeps its own layout")
        return self.inference.weights()

    @dispatch(reduce="first")
    def join_weight_sync(self, addr: str, port: int, world: int) -> None:
        import ray
        self.sync = sync_group(addr, port, 1 + self.rank, world, self.cuda, ray.util.get_node_ip_address())

    @dispatch(reduce="first")
    def receive_weights(self, version: int, manifest: list, bucket_mb: float) -> int:
        """Take the policy's weights of `version` from the sync group; returns the version now held."""
        self.inference.update_weights(version, receive(self.sync, manifest, bucket_mb, self.device))
        return version

    @dispatch(reduce="first")
    def sleep(self) -> None:
        self.inference.sleep()

    @dispatch(reduce="first")
    def wake(self) -> None:
        self.inference.wake()

    @dispatch(reduce="first")
    def version(self) -> Optional[int]:
        return self.inference.version
