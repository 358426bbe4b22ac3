"""vLLM as a rollout rank's inference engine (`roles.rollout.engine: vllm`).

The engine runs in the rank's own process (vLLM's in-process engine core, one worker: tensor parallel size 1), so
the weight sync needs nothing of vLLM's: the tensors the rank receives from the policy's rank 0 over the sync group
(`actors.weight_sync`: gloo on CPU, NCCL on GPUs) go straight into vLLM's model through its worker's
`reload_weights`, bucket by bucket, which repacks them as vLLM's kernels want them.

- Sampling: `sample_tokens` is one pass of `rlhf.generation` (`TokenSampler`): the MOSS stop tokens are
  `stop_token_ids` (the model's own EOS is ignored, as HF generate is told the stop tokens), the plugin rollouts are
  two passes around the tools as with the HF engine, rows that share a prompt are one request with `n` samples. The
  log-prob of each sampled token is vLLM's *processed* log-prob (after the temperature), the distribution the
  policy's and the reference's log-probs are taken from (`RankSpec.temperature`).
- CodeGen (moss-moon-003's architecture), which vLLM does not serve, is served as GPT-J: the same blocks, with
  CodeGen's fused `qkv_proj` split into GPT-J's q, k, v (`codegen_to_gptj`). The engine starts from a GPT-J config
  with dummy weights and then loads the CodeGen checkpoint through that mapping, as every later sync does.
- Sleep: on GPUs vLLM's sleep level 2 (weights and KV cache freed); on CPUs vLLM has none, so the weights stay
  and only the version is dropped (the next sync restores it).
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from typing import Any, Iterable, Iterator, Optional

import torch

from actors.inference import EngineAsleep, Sampling, as_dict, manifest_of_module
from actors.weight_sync import Manifest
from rlhf.batching import Batch
from rlhf.generation import Sampled, check_scorable, rollout_replies

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 256)
"""Attention head sizes vLLM's CPU attention backend takes."""

CODEGEN_SPLIT = 4
"""CodeGen's fused qkv_proj is written in this many model-parallel chunks (transformers' `mp_num`), each q, v, k."""


def head_size(config: Any) -> int:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    return getattr(config, "head_dim", None) or hidden // heads


def codegen_to_gptj(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A CodeGen tensor as the GPT-J tensors vLLM loads: `attn.qkv_proj.weight` [3E, E] becomes q_proj, k_proj and
    v_proj [E, E] (CodeGen's rows are (4 chunks, q v k, E/4)); every other name is GPT-J's already."""
    if not name.endswith("attn.qkv_proj.weight"):
        return [(name, tensor)]
    width = tensor.shape[1]
    parts = tensor.reshape(CODEGEN_SPLIT, 3, width // CODEGEN_SPLIT, width)
    stem = name.removesuffix("qkv_proj.weight")
    return [(f"{stem}q_proj.weight", parts[:, 0].reshape(width, width)),
            (f"{stem}v_proj.weight", parts[:, 1].reshape(width, width)),
            (f"{stem}k_proj.weight", parts[:, 2].reshape(width, width))]


def gptj_config(codegen: Any) -> dict:
    """The GPT-J config.json that serves a CodeGen model (same sizes, rotary and activation)."""
    return {"architectures": ["GPTJForCausalLM"], "model_type": "gptj", "vocab_size": codegen.vocab_size,
            "n_positions": codegen.n_positions, "n_embd": codegen.n_embd, "n_layer": codegen.n_layer,
            "n_head": codegen.n_head, "rotary_dim": codegen.rotary_dim, "n_inner": codegen.n_inner,
            "activation_function": codegen.activation_function, "layer_norm_epsilon": codegen.layer_norm_epsilon,
            "tie_word_embeddings": False, "bos_token_id": codegen.bos_token_id, "eos_token_id": codegen.eos_token_id,
            "torch_dtype": "float32"}


def checkpoint_tensors(path: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a local checkpoint directory (model.safetensors, or the shards its index names), file by file,
    in `dtype`."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors (or index); the vLLM engine reads CodeGen checkpoints "
                                "in safetensors (rlhf convert writes them)")
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key).to(dtype)


class VLLMInferenceEngine:
    """A vLLM `LLM` in this process that samples MOSS rollouts and takes the policy's weights."""

    def __init__(self, model_path: str, sampling: Sampling, settings: Any, dtype: torch.dtype, seed: int,
                 cuda: bool, threads: int, trust_remote_code: bool = False):
        from transformers import AutoConfig
        self.sampling, self.seed, self.cuda, self.dtype = sampling, seed, cuda, dtype
        self.config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.codegen = self.config.model_type == "codegen"
        if not cuda and head_size(self.config) not in CPU_HEAD_SIZES:
            raise ValueError(f"{model_path}: attention heads of size {head_size(self.config)}; vLLM's CPU backend "
                             f"takes {', '.join(map(str, CPU_HEAD_SIZES))} (use roles.rollout.engine=hf for it)")
        self.model_path = model_path
        self.tensors = self._checkpoint_manifest()
        self.names = {name for name, _, _ in self.tensors}
        self.calls = 0
        self.version: Optional[int] = None
        self.served_dir: Optional[tempfile.TemporaryDirectory] = None
        self.llm = self._start(settings, threads, trust_remote_code)
        if self.codegen:  # started with dummy weights: the checkpoint's, mapped, go in as a sync's would
            self.update_weights(0, checkpoint_tensors(model_path, dtype))
        self.version = 0

    def _start(self, settings: Any, threads: int, trust_remote_code: bool) -> Any:
        # One process: the rank's (the engine core in it, no second process to spawn and feed), with the CPU
        # threads Ray gave the rank rather than vLLM's own binding to every core of the node.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(settings.cpu_kv_cache_gb))))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        # Its start-up chatter (and a traceback it logs as a warning when it looks for a chat template in a tokenizer
        # it was told not to load) would bury the run's own lines; errors still show.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        torch.set_num_threads(threads)
        if settings.enforce_eager:
            # Eager all the way: vLLM still compiles parts of its sampling with torch.compile, which costs the first
            # generation after every start 1 s alone and 10 s or more on a busy node.
            from torch import _dynamo
            _dynamo.config.disable = True
        from vllm import LLM
        served, extra = self.model_path, {}
        if self.codegen:
            self.served_dir = tempfile.TemporaryDirectory(prefix="rlhf-vllm-gptj-")
            served = self.served_dir.name
            with open(os.path.join(served, "config.json"), "w", encoding="utf-8") as f:
                json.dump(gptj_config(self.config), f)
            extra["load_format"] = "dummy"
        if self.cuda:  # sleep mode: weights and KV cache can leave the GPU while a colocated trainer trains
            extra |= {"gpu_memory_utilization": settings.gpu_memory_utilization, "enable_sleep_mode": True}
        else:
            extra["kv_cache_memory_bytes"] = int(settings.cpu_kv_cache_gb * 2**30)
        if settings.max_model_len:
            extra["max_model_len"] = settings.max_model_len
        return LLM(model=served, dtype=str(self.dtype).removeprefix("torch."), seed=self.seed,
                   enforce_eager=settings.enforce_eager, logprobs_mode="processed_logprobs",
                   skip_tokenizer_init=True, enable_prefix_caching=settings.enable_prefix_caching,
                   tensor_parallel_size=1, trust_remote_code=trust_remote_code and not self.codegen, **extra)

    # --- the inference-engine calls (actors.inference.InferenceEngine) -----------------------------------------
    def generate(self, prompts: Batch, sampling: Any) -> Batch:
        if self.version is None:
            raise EngineAsleep("the rollout engine holds no weights (asleep, or woken and not synced yet)")
        s = self.sampling
        return rollout_replies(self, s.tokenizer, prompts, as_dict(sampling), s.tools, s.device,
                               max_results_tokens=s.max_results_tokens, with_logprobs=True)

    def manifest(self) -> Manifest:
        """What the policy sends: the checkpoint's own (transformers') tensors, names, shapes and dtype."""
        return self.tensors

    def _checkpoint_manifest(self) -> Manifest:
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            return manifest_of_module(AutoModelForCausalLM.from_config(self.config, dtype=self.dtype))

    def update_weights(self, version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        seen: set[str] = set()

        def mapped() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named:
                seen.add(name)
                yield from (codegen_to_gptj(name, tensor) if self.codegen else [(name, tensor)])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": mapped()})
        self.llm.reset_prefix_cache()
        if missing := self.names - seen:
            raise RuntimeError(f"the weight sync left {len(missing)} tensors unset, e.g. {sorted(missing)[0]}")
        self.version = version

    def sleep(self) -> None:
        if self.cuda:
            self.llm.sleep(level=2)
        self.version = None

    def wake(self) -> None:
        if self.cuda:
            self.llm.wake_up()

    # --- one sampling pass (rlhf.generation.TokenSampler) ------------------------------------------------------
    def sample_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: dict, stop_ids: list[int],
                      pad_id: int, with_logprobs: bool) -> Sampled:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        if with_logprobs:
            check_scorable(gen)
        width = int(gen["max_new_tokens"])
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        groups: dict[tuple, list[int]] = {}  # rows that share a prompt: one request, n samples
        for i, ids in enumerate(rows):
            groups.setdefault(tuple(ids), []).append(i)
        sample = bool(gen.get("do_sample", True))
        self.calls += 1
        draw = random.Random(f"{self.seed}/{self.calls}")  # a request's n samples take seeds seed, seed + 1, ...
        params = [SamplingParams(
            n=len(members), temperature=float(gen.get("temperature", 1.0)) if sample else 0.0,
            top_p=float(gen.get("top_p", 1.0)), top_k=int(gen.get("top_k", 0)) or -1,
            repetition_penalty=float(gen.get("repetition_penalty", 1.0)), max_tokens=width,
            stop_token_ids=list(stop_ids), ignore_eos=True, logprobs=0 if with_logprobs else None, detokenize=False,
            seed=draw.getrandbits(31)) for members in groups.values()]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in groups], params, use_tqdm=False)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        logprobs = torch.zeros(len(rows), width)
        lengths = torch.zeros(len(rows), dtype=torch.long)
        stops = torch.full((len(rows),), -1, dtype=torch.long)
        for members, out in zip(groups.values(), outputs):
            for i, done in zip(members, out.outputs):
                ids = list(done.token_ids)[:width]
                tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                lengths[i] = len(ids)
                if ids and ids[-1] in stop_ids:
                    stops[i] = ids[-1]
                if with_logprobs:
                    logprobs[i, :len(ids)] = torch.tensor([step[t].logprob for step, t in zip(done.logprobs, ids)])
        return tokens, lengths, stops, logprobs if with_logprobs else None
