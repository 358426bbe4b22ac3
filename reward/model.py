"""A scalar head on any Hugging Face causal LM: one value per position.

The preference model (reward = the value at the reply's last token) and the PPO critic (per-token values) share
this class, so both save and load the same way: an HF model directory plus `value_head.safetensors`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlhf.batching import position_ids as default_position_ids
from rlhf.modeling import ModelLoadError, merged_state_dict

HEAD_FILE = "value_head.safetensors"
STATS_FILE = "reward_stats.json"


def last_index(attention_mask: Tensor) -> Tensor:
    """[B] index of each row's last attended position; works for right- and left-padded rows (0 for an empty row)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=-1).values.clamp(min=0)


def _unwrap(lm: Any) -> PreTrainedModel:
    """The plain causal LM inside a PeftModel: PEFT's own `base_model` is its tuner, not the backbone."""
    get_base_model = getattr(lm, "get_base_model", None)
    if callable(get_base_model) and not isinstance(lm, PreTrainedModel):
        return get_base_model()
    return lm


def _new_head(hidden_size: int) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
    # A small init keeps early scores near 0, so the first PPO iterations are not driven by noise.
    torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden_size + 1))
    torch.nn.init.zeros_(head.bias)
    return head


class ScalarHeadModel(torch.nn.Module):
    """A causal LM's backbone with a linear head: one scalar per position (critic values; reward = the value at
    the reply's last token)."""

    def __init__(self, lm: PreTrainedModel, head: torch.nn.Linear | None = None) -> None:
        super().__init__()
        # A plain module with params lm.* and head.* is what DeepSpeed ZeRO wraps and partitions; a PEFT wrapper is
        # kept aside (not as a submodule: its weights are lm's) to save the adapter in PEFT's own format.
        object.__setattr__(self, "peft", lm if _unwrap(lm) is not lm else None)
        self.lm = _unwrap(lm)
        self.config = self.lm.config
        hidden_size = int(self.config.hidden_size)  # CodeGen maps hidden_size to n_embd
        if head is not None and (head.in_features != hidden_size or head.out_features != 1):
            raise ValueError(f"value head is Linear({head.in_features}, {head.out_features}) but the model needs "
                             f"Linear({hidden_size}, 1); drop {HEAD_FILE} to start a new head")
        self.head = head.float() if head is not None else _new_head(hidden_size)

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None) -> Tensor:
        # [B, T, H] from the backbone alone: computing the LM head's [B, T, V] logits would be wasted work.
        if position_ids is None:
            # Positions that skip left padding, as generation used, so a row scores the same however it is padded.
            position_ids = default_position_ids(attention_mask)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False)
        return out.last_hidden_state

    def _values(self, hidden: Tensor) -> Tensor:
        # The head runs in its own dtype (float32 unless DeepSpeed cast it), so bf16 backbones give stable scores.
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """[B, T] float32 values, one per position."""
        return self._values(self._hidden(input_ids, attention_mask, position_ids))

    def score(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """[B] the value at each row's last attended position: the reward of the whole sequence."""
        values = self.forward(input_ids, attention_mask, position_ids)
        return values.gather(1, last_index(attention_mask).unsqueeze(1)).squeeze(1)

    def lm_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """[B, T, V] logits of the LM head, for an optional LM loss on the best response."""
        return self.forward_with_logits(input_ids, attention_mask, position_ids)[1]

    def forward_with_logits(self, input_ids: Tensor, attention_mask: Tensor,
                            position_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(values [B, T] float32, logits [B, T, V] in the LM's dtype) from one backbone pass."""
        hidden = self._hidden(input_ids, attention_mask, position_ids)
        # Called as a module so ZeRO-3 gathers its weights; models with logit scaling are not special-cased.
        logits = self.lm.get_output_embeddings()(hidden)
        return self._values(hidden), logits

    def save_pretrained(self, out_dir: str, stats: dict | None = None, merge_lora: bool = True) -> None:
        """An HF model directory (safetensors; LoRA merged in) plus the head and optional reward stats; with LoRA
        also the adapter in PEFT's format with the head in `adapter/` (and, without merge_lora, only that).

        The tokenizer is the caller's to save; out_dir is expected to be a temp dir renamed into place later.
        """
        os.makedirs(out_dir, exist_ok=True)
        head = {"weight": self.head.weight.detach().float().cpu().contiguous(),
                "bias": self.head.bias.detach().float().cpu().contiguous()}
        if self.peft is not None:
            adapter = os.path.join(out_dir, "adapter")
            self.peft.save_pretrained(adapter, safe_serialization=True)
            save_file(head, os.path.join(adapter, HEAD_FILE))
        if self.peft is None or merge_lora:
            self.lm.save_pretrained(out_dir, state_dict=merged_state_dict(self.lm))
        save_file(head, os.path.join(out_dir, HEAD_FILE))
        if stats is not None:
            with open(os.path.join(out_dir, STATS_FILE), "w", encoding="utf-8") as f:
                json.dump(stats, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False) -> "ScalarHeadModel":
        """Load the LM from safetensors and the head from value_head.safetensors, or start a new head (e.g. a
        critic initialised from an SFT model)."""
        if not os.path.isdir(path):
            raise ModelLoadError(f"model directory {path!r} does not exist; pass the output of `rlhf sft` or `rlhf rm`")
        try:
            lm = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype,
                                                      trust_remote_code=trust_remote_code)
        except (OSError, ValueError, RuntimeError) as error:
            text = " ".join(str(error).split())[:300]
            raise ModelLoadError(f"could not load a causal LM from {path!r} ({type(error).__name__}: {text}); it "
                                 f"must be an HF directory with safetensors weights") from error
        head_path = os.path.join(path, HEAD_FILE)
        if not os.path.exists(head_path):
            return cls(lm)
        tensors = load_file(head_path)
        if set(tensors) != {"weight", "bias"} or tensors["weight"].dim() != 2:
            raise ModelLoadError(f"{head_path} is not a value head (expected tensors 'weight' [1, H] and 'bias' [1]); "
                                 f"delete it to start a new head")
        head = torch.nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0], dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(tensors["weight"])
            head.bias.copy_(tensors["bias"])
        return cls(lm, head)


def load_reward_stats(path: str) -> dict | None:
    """The reward statistics ({"mean", "std", ...}) saved with a reward model, or None if it has none."""
    stats_path = os.path.join(path, STATS_FILE)
    if not os.path.exists(stats_path):
        return None
    try:
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{stats_path}: not valid JSON ({error}); delete it or re-run `rlhf rm`") from None
    if not isinstance(stats, dict):
        raise ModelLoadError(f"{stats_path}: expected a JSON object like {{\"mean\": 0.0, \"std\": 1.0}}")
    return stats
