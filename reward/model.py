"""A scalar head on any Hugging Face causal LM: one value per position.

The preference model (reward = the value at the reply's last token) and the PPO critic (per-token values) share
this class, so both save and load the same way. A saved directory is one HF model that two transformers classes
load: `AutoModelForCausalLM` (the critic's starting point, the LM loss) and, for architectures transformers has a
`*ForSequenceClassification` class for, `AutoModelForSequenceClassification` with the same scores as ours, as a
hub reward model loads. The layout, in one directory and without a second copy of the backbone:
- `model.safetensors` (or shards): the causal LM's weights plus the head under the classifier's own name
  (`score.weight`, [1, H]); each class takes its keys and leaves the other's head (`lm_head` or `score`) unused;
- `config.json`: `architectures` lists both classes (the causal LM first), one label (`id2label`), and
  `pad_token_id` is the tokenizer's pad (the classifier reads the score at the last token that is not the pad);
- `value_head.safetensors`: the head again (weight and bias, [H + 1] floats), as every earlier version wrote it;
  CodeGen (moss-moon-003), which has no sequence classifier in transformers, has only this.
The classifiers' `score` has no bias: the view is written when our head's bias is 0 (always for a preference model:
`actors.scalar.RMWorker` holds it there, since the ranking loss cannot see it) or when the classifier has a bias; a
head with a bias it cannot hold (a trained critic) is saved without the view rather than with shifted scores. The
scores agree when the pad token is not one a scored text ends with (`<pad>` for `rlhf tokenizer`'s tokenizers).

A `*ForSequenceClassification` checkpoint with one label (a hub reward model) loads as this class too: its backbone
as the causal LM (with a new LM head when it has none, used only by the LM loss) and its `score` as the head.

A process reward model (`rlhf prm`) is saved the same way with the token classifier in place of the sequence
classifier (`*ForTokenClassification`, one label, its `score` with a bias, which the step loss trains): a logit at
every token, read at each step's last token. Which view a directory holds is in its config's `architectures`.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlhf.batching import position_ids as default_position_ids
from rlhf.modeling import REWARD_HEAD_FILE, ModelLoadError, merged_state_dict, quiet_loading

HEAD_FILE = REWARD_HEAD_FILE
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


CLASSIFIERS = ("sequence", "token")
"""The transformers classifiers a scalar-head model's directory also loads as: a preference model a sequence
classifier (its score at the last token), a process reward model a token classifier (a score at every token)."""


def seq_cls_layout(config: Any, classifier: str = "sequence") -> tuple[str, list[str], set[str]] | None:
    """transformers' sequence (or token) classifier for `config`'s architecture, read off an empty (meta) instance:
    its class name, its head's weight names and its backbone's; None when transformers has none (CodeGen)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.models.auto.modeling_auto import (MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                                                        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES)

    auto, names = {"sequence": (AutoModelForSequenceClassification, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
                   "token": (AutoModelForTokenClassification, MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES)}[classifier]
    if getattr(config, "model_type", None) not in names:
        return None
    config = copy.deepcopy(config)
    config.num_labels = 1
    with torch.device("meta"):
        model = auto.from_config(config)
    prefix = f"{model.base_model_prefix}."
    keys = list(model.state_dict())
    head = [k for k in keys if not k.startswith(prefix)]
    return type(model).__name__, head, {k for k in keys if k.startswith(prefix)}


def saved_classifier(config: Any) -> str:
    """Which classifier a saved directory's config names beside its causal LM: "token" for a process reward model's
    `*ForTokenClassification`, else "sequence"."""
    return "token" if any(a.endswith("ForTokenClassification") for a in getattr(config, "architectures", None) or ()) \
        else "sequence"


def _read_tensors(path: str, names: list[str]) -> dict[str, Tensor]:
    """Some tensors of an HF directory's safetensors weights (one file or shards), without loading the rest."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            where = json.load(f)["weight_map"]
    else:
        where = dict.fromkeys(names, "model.safetensors")
    out = {}
    for name in names:
        with safe_open(os.path.join(path, where[name]), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _classifier_head(path: str, head_keys: list[str]) -> dict[str, Tensor] | None:
    """{"weight" [1, H], "bias" [1]} of a sequence-classifier checkpoint's head (its weights named `head_keys`, those
    present); None when it has none. A classifier without a bias gets bias 0, which is what it computes."""
    weight = [k for k in head_keys if k.endswith(".weight")]
    if not weight:
        return None
    tensors = _read_tensors(path, head_keys)
    w = tensors[weight[0]]
    if w.dim() != 2 or w.shape[0] != 1:
        raise ModelLoadError(f"{path}: {weight[0]} has shape {list(w.shape)}, a classifier with {w.shape[0]} labels; "
                             f"a reward model has one score (num_labels: 1)")
    bias = [tensors[k] for k in head_keys if k.endswith(".bias")]
    return {"weight": w.float(), "bias": bias[0].float().reshape(1) if bias else torch.zeros(1)}


def _head_file(path: str) -> dict[str, Tensor] | None:
    head_path = os.path.join(path, HEAD_FILE)
    if not os.path.exists(head_path):
        return None
    tensors = load_file(head_path)
    if set(tensors) != {"weight", "bias"} or tensors["weight"].dim() != 2:
        raise ModelLoadError(f"{head_path} is not a value head (expected tensors 'weight' [1, H] and 'bias' [1]); "
                             f"delete it to start a new head")
    return tensors


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' load report while it loads a causal LM, to be shown only when it says more than
    that the sequence classifier's head was left unused (and, for a hub classifier, that the LM head is new)."""

    logger = logging.getLogger("transformers.modeling_utils")

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    def __enter__(self) -> "_HeldLoadReport":
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeFilter(self)

    def show(self) -> None:
        self.logger.removeFilter(self)
        for record in self.records:
            self.logger.handle(record)


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

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
                logits_at: Tensor | bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """[B, T] float32 values, one per position; with `logits_at`, also the LM head's logits from the same pass
        (`forward_with_logits`). A DeepSpeed engine's call goes through here: under ZeRO-3 its forward hooks must see
        every pass, the LM loss's included."""
        if logits_at is None or logits_at is False:
            return self._values(self._hidden(input_ids, attention_mask, position_ids))
        positions = None if logits_at is True else logits_at
        return self.forward_with_logits(input_ids, attention_mask, position_ids, positions)

    def score(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """[B] the value at each row's last attended position: the reward of the whole sequence."""
        values = self.forward(input_ids, attention_mask, position_ids)
        return values.gather(1, last_index(attention_mask).unsqueeze(1)).squeeze(1)

    def lm_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """[B, T, V] logits of the LM head, for an optional LM loss on the best response."""
        return self.forward_with_logits(input_ids, attention_mask, position_ids)[1]

    def forward_with_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
                            positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(values [B, T] float32, logits [B, T, V] in the LM's dtype) from one backbone pass; with `positions`
        (flat indices into [B * T]) the logits of those positions only, [k, V]."""
        hidden = self._hidden(input_ids, attention_mask, position_ids)
        kept = hidden if positions is None else hidden.flatten(0, -2)[positions]
        # Called as a module so ZeRO-3 gathers its weights; models with logit scaling are not special-cased.
        logits = self.lm.get_output_embeddings()(kept)
        return self._values(hidden), logits

    def save_pretrained(self, out_dir: str, stats: dict | None = None, merge_lora: bool = True,
                        pad_token_id: int | None = None, classifier: str = "sequence") -> None:
        """An HF model directory (safetensors; LoRA merged in) that loads as a causal LM and, where transformers has
        one, as a sequence classifier (see the module's docstring), plus `value_head.safetensors` and optional reward
        stats; with LoRA also the adapter in PEFT's format with the head in `adapter/` (and, without merge_lora, only
        that). pad_token_id is the tokenizer's, which the classifier needs to find each row's last token; a process
        reward model's view is the token `classifier`.

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
            state = merged_state_dict(self.lm) or dict(self.lm.state_dict())  # a new dict: saving consumes it
            config = self._classifier_view(state, head, pad_token_id, classifier)
            self.lm.save_pretrained(out_dir, state_dict=state)
            if config is not None:
                config.save_pretrained(out_dir)  # after the LM's own, which names only its class
        save_file(head, os.path.join(out_dir, HEAD_FILE))
        if stats is not None:
            with open(os.path.join(out_dir, STATS_FILE), "w", encoding="utf-8") as f:
                json.dump(stats, f, indent=2)

    def _classifier_view(self, state: dict[str, Tensor], head: dict[str, Tensor], pad_token_id: int | None,
                         classifier: str = "sequence") -> Any | None:
        """Put the head into `state` under the name transformers' sequence (or token) classifier gives it and return
        the config that names both classes; None, with `state` untouched, when there is no such classifier or it
        could not give this head's scores exactly."""
        layout = seq_cls_layout(self.config, classifier)
        if layout is None:
            return None
        name, head_keys, backbone = layout
        weight = [k for k in head_keys if k.endswith(".weight")]
        bias = [k for k in head_keys if k.endswith(".bias")]
        if len(weight) != 1 or len(bias) + 1 != len(head_keys) or not backbone <= set(state):
            return None  # a classifier laid out otherwise than the causal LM cannot share its weights
        if not bias and float(head["bias"]) != 0.0:
            # Folding the bias into the backbone is not exact (the last hidden state has no constant feature).
            print(f"{name}'s score has no bias and this head's is {float(head['bias']):.4g}: saved for "
                  f"AutoModelForCausalLM and {HEAD_FILE} only", file=sys.stderr)
            return None
        state[weight[0]] = head["weight"]
        if bias:
            state[bias[0]] = head["bias"]
        config = copy.deepcopy(self.lm.config)
        config.architectures = [type(self.lm).__name__, name]
        config.num_labels = 1
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        return config

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                        load_lm: Callable[[str], tuple[PreTrainedModel, set, set, Callable[[], None]]] | None = None,
                        ) -> "ScalarHeadModel":
        """Load the LM from safetensors and the head from value_head.safetensors, else from a sequence classifier's
        `score`, else start a new head (e.g. a critic initialised from an SFT model). `load_lm` loads the LM in
        place of transformers (a ZeRO-3 rank's partitions) and gives (LM, checkpoint keys it did not use, its keys
        the checkpoint lacked, what says them)."""
        if not os.path.isdir(path):
            raise ModelLoadError(f"model directory {path!r} does not exist; pass the output of `rlhf sft` or `rlhf rm`")
        quiet_loading()
        if load_lm is not None:
            lm, unused, missing, show = load_lm(path)
            return cls._with_head(lm, _saved_head(path, lm, unused, missing, show))
        with _HeldLoadReport() as report:
            try:
                lm, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype,
                                                                trust_remote_code=trust_remote_code,
                                                                output_loading_info=True)
            except (OSError, ValueError, RuntimeError) as error:
                report.show()
                text = " ".join(str(error).split())[:300]
                raise ModelLoadError(f"could not load a causal LM from {path!r} ({type(error).__name__}: {text}); "
                                     f"it must be an HF directory with safetensors weights") from error
        tensors = _saved_head(path, lm, set(info["unexpected_keys"]), set(info["missing_keys"]), report.show)
        return cls._with_head(lm, tensors)

    @classmethod
    def _with_head(cls, lm: PreTrainedModel, tensors: dict[str, Tensor] | None) -> "ScalarHeadModel":
        if tensors is None:
            return cls(lm)
        head = torch.nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0], dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(tensors["weight"])
            head.bias.copy_(tensors["bias"])
        return cls(lm, head)


def _saved_head(path: str, lm: PreTrainedModel, unused: set[str], missing: set[str],
                show: Callable[[], None]) -> dict[str, Tensor] | None:
    """The head saved with the causal LM just loaded from `path` ({"weight", "bias"}), from value_head.safetensors or
    the classifier's weights that the LM left `unused`; None when there is none. Shows transformers' load report
    when it says more than that one class's head is not the other's."""
    layout = seq_cls_layout(lm.config, saved_classifier(lm.config))
    classifier_keys = [k for k in layout[1] if k in unused] if layout else []
    classifier = _classifier_head(path, classifier_keys)
    tensors = _head_file(path)
    if tensors is not None and classifier is not None and not torch.allclose(
            tensors["weight"].float(), classifier["weight"], rtol=1e-2, atol=1e-4):
        raise ModelLoadError(f"{path}: the head in {HEAD_FILE} and the classifier's score in the weights differ; "
                             f"delete {HEAD_FILE} if the weights were trained since, else re-save with `rlhf rm`")
    output = next((n for n, m in lm.named_modules() if m is lm.get_output_embeddings()), None)
    new_lm_head = {k for k in missing if output is not None and k.startswith(f"{output}.")}
    if unused - set(classifier_keys) or missing - (new_lm_head if classifier is not None else set()):
        show()
    elif new_lm_head:
        print(f"{path}: a sequence classifier without an LM head; a new one is initialised (only the reward "
              f"model's LM loss, rm.lm_loss_coef, uses it)", file=sys.stderr)
    return tensors if tensors is not None else classifier


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
