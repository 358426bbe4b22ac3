"""Rollouts: sampling MOSS replies from a policy, plain (stop at `<eom>`) or plugin-style in two passes (stop at
`<eoc>`, run the command, write `<|Results|>`, generate again to `<eom>`), and the `rlhf generate` command.

Replies come back as fixed-width CPU tensors with an action mask over what the model wrote, so every rank and
every iteration hands the controller batches of the same shape (see DESIGN.md, "One PPO iteration").
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from rlhf import key_reads
from rlhf.batching import collate_prompts, pad
from rlhf.config import UNTRANSFORMED, GenerationConfig
from rlhf.data import load_parsed, parse_dialogue, parse_preference
from rlhf.formats import load, texts_of
from rlhf.moss import EOC, EOM, EOR, MOSS_TAG, RESULTS_TAG, plugin_segments, results_text, split_reply

if TYPE_CHECKING:
    from rlhf.tools import ToolRegistry  # imports sympy


def _generate_kwargs(gen: dict, eos_ids: list[int], pad_id: int, synced: bool) -> dict:
    """HF generate arguments from a GenerationConfig dict; sampling knobs only when sampling, so greedy
    decoding does not warn about unused temperatures."""
    kwargs: dict[str, Any] = dict(max_new_tokens=int(gen["max_new_tokens"]), eos_token_id=eos_ids,
                                  pad_token_id=pad_id, use_cache=True, synced_gpus=synced,
                                  do_sample=bool(gen.get("do_sample", True)),
                                  repetition_penalty=float(gen.get("repetition_penalty", 1.0)))
    if kwargs["do_sample"]:
        # top_k 0 is HF's "off"; passing it explicitly overrides a checkpoint's own default (often 50).
        kwargs.update(temperature=float(gen.get("temperature", 1.0)), top_p=float(gen.get("top_p", 1.0)),
                      top_k=int(gen.get("top_k", 0)))
    return kwargs


class SampledLogprobs:
    """The log-prob of every token `generate` samples, read off the forward passes that sampled it (no second pass).

    While the context is open a forward hook keeps the last step's log-softmax over the logits divided by the
    sampling temperature (the distribution the token is drawn from when nothing else transforms the logits, and the
    one the trainer scores, `actors.lm`'s log-probs) until the next step's input, the token sampled from it, picks
    one entry; `finish` picks the last token's. Only one step's [b, V] is held.
    """

    def __init__(self, model: Any, temperature: float = 1.0):
        self.model, self.temperature = model, temperature
        self.steps: list[torch.Tensor] = []
        self.last: torch.Tensor | None = None

    def __enter__(self) -> SampledLogprobs:
        self.handle = self.model.register_forward_hook(self._step, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()

    def _step(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self.last is not None:  # every pass after the prompt's is fed the token sampled from the last one
            fed = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
            self.steps.append(self.last.gather(1, fed[:, -1:].to(self.last.device)).squeeze(1))
        self.last = torch.log_softmax(output.logits[:, -1].float() / self.temperature, dim=-1)

    def finish(self, new: torch.Tensor) -> torch.Tensor:
        """[b, n] log-probs of the n tokens `new` [b, n] that generate wrote (on the CPU)."""
        if self.last is not None and new.shape[1]:
            self.steps.append(self.last.gather(1, new[:, -1:].to(self.last.device)).squeeze(1))
        if len(self.steps) != new.shape[1]:
            raise RuntimeError(f"generate ran {len(self.steps)} sampling passes for {new.shape[1]} new tokens; the "
                               "log-probs of sampled tokens assume one forward pass per token after the prompt's")
        return torch.stack(self.steps, 1).cpu() if self.steps else torch.zeros(new.shape)


def check_scorable(gen: dict) -> None:
    """Refuses sampling whose tokens' log-probs would not be of the distribution they were drawn from: only a
    temperature may transform the logits (RL's sampling settings, `rlhf.config.RLGenerationConfig`)."""
    changed = [f"{k}={gen.get(k, plain)}" for k, plain in UNTRANSFORMED.items() if gen.get(k, plain) != plain]
    if changed or not gen.get("do_sample", True):
        raise ValueError(f"log-probs of sampled tokens need plain sampling at a temperature; got "
                         f"{', '.join(changed) or 'greedy decoding'}")


Sampled = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]
"""What one sampling pass returns: the new tokens [b, max_new_tokens] right-padded with pad_id, the written length
of each row (up to and including the first stop token) [b], the stop token of each row, -1 when none [b], and with
log-probs asked for, the log-prob of each written token under the model that sampled it [b, max_new_tokens] (0 after
the written length; else None)."""


@runtime_checkable
class TokenSampler(Protocol):
    """An inference engine that samples token ids itself (`actors.vllm_engine`): the replies and plugin rollouts
    below drive it as they drive a transformers model's `generate`."""

    def sample_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: dict, stop_ids: list[int],
                      pad_id: int, with_logprobs: bool) -> Sampled: ...


def _sample(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: dict, eos_ids: list[int],
            pad_id: int, device: Any, synced: bool, micro_batch: int, with_logprobs: bool = False) -> Sampled:
    """Generate after left-padded prompts, with a transformers model in micro-batches or with a `TokenSampler`,
    stopping at any of `eos_ids` (see `Sampled`)."""
    if isinstance(model, TokenSampler):
        return model.sample_tokens(input_ids, attention_mask, gen, eos_ids, pad_id, with_logprobs)
    width = int(gen["max_new_tokens"])
    kwargs = _generate_kwargs(gen, eos_ids, pad_id, synced)
    if with_logprobs:
        check_scorable(gen)
    stops = torch.tensor(eos_ids, dtype=torch.long)
    tokens, lengths, stop_tokens, logprobs = [], [], [], []
    was_training = getattr(model, "training", False)
    model.eval()  # no dropout while sampling, whatever mode the trainer left the model in
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], micro_batch):
                ids = input_ids[start:start + micro_batch]
                mask = attention_mask[start:start + micro_batch]
                recorder = SampledLogprobs(model, kwargs.get("temperature", 1.0)) if with_logprobs else None
                with recorder or contextlib.nullcontext():
                    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
                new = out[:, ids.shape[1]:].cpu()  # [mb, <= max_new_tokens]
                is_stop = torch.isin(new, stops)
                stopped = is_stop.any(dim=1)
                first = is_stop.int().argmax(dim=1)
                length = torch.where(stopped, first + 1, torch.full_like(first, new.shape[1]))
                written = torch.arange(new.shape[1]).unsqueeze(0) < length.unsqueeze(1)
                # After a stop token HF pads, but with synced ranks it may keep writing; only the reply counts.
                new = torch.where(written, new, torch.full_like(new, pad_id))
                tokens.append(pad(new.tolist(), pad_id, length=width) if new.shape[1] < width else new)
                if recorder is not None:
                    logp = torch.zeros(new.shape[0], width)
                    logp[:, :new.shape[1]] = torch.where(written, recorder.finish(out[:, ids.shape[1]:]), 0.0)
                    logprobs.append(logp)
                lengths.append(length)
                stop_tokens.append(torch.where(stopped, new.gather(1, first.unsqueeze(1)).squeeze(1),
                                               torch.full_like(first, -1)))
    finally:
        model.train(was_training)
    return torch.cat(tokens), torch.cat(lengths), torch.cat(stop_tokens), torch.cat(logprobs) if logprobs else None


def generate_replies(model: Any, prompts: dict, gen: dict, eom_id: int, pad_id: int, device: Any,
                     synced: bool = False, micro_batch: int = 64, with_logprobs: bool = False) -> dict:
    """Sample one reply per left-padded prompt, stopping at `<eom>`.

    prompts: input_ids / attention_mask [b, P]. synced: ZeRO-3 ranks step together (HF synced_gpus).
    Returns CPU tensors response_ids [b, R] (R = max_new_tokens, right-padded), action_mask [b, R] (1 up to
    and including the first <eom>), response_mask [b, R] (what the scoring models attend to; here the same as
    action_mask), ended [b] (1.0 when the reply reached <eom>), and with `with_logprobs` logprobs [b, R] (each
    written token's log-prob under the model that sampled it, 0 elsewhere).
    """
    response, length, stop, logprobs = _sample(model, prompts["input_ids"], prompts["attention_mask"], gen, [eom_id],
                                                pad_id, device, synced, micro_batch, with_logprobs)
    action_mask = (torch.arange(response.shape[1]).unsqueeze(0) < length.unsqueeze(1)).long()
    out = {"response_ids": response, "action_mask": action_mask, "response_mask": action_mask.clone(),
           "ended": (stop == eom_id).float()}
    return out | ({"logprobs": logprobs} if with_logprobs else {})


# --- how long replies run ----------------------------------------------------------------------------------

REPLY_COVER = 0.99
"""The share of a data file's replies a generation cap should let reach `<eom>`."""


def reply_lengths(path: str, tokenizer: Any, data_format: str = "auto") -> list[int]:
    """Tokens of every reply of an SFT or preference file as the policy writes them (` {reply}<eom>`)."""
    def replies(obj: Any) -> list[str]:
        if isinstance(obj, dict) and ("responses" in obj or "chosen" in obj):
            return list(parse_preference(obj).responses)
        return [turn.moss for turn in parse_dialogue(obj).turns if turn.moss is not None]
    if data_format in ("auto", "moss"):  # this project's JSONL, record by record
        texts = [r for rs in load_parsed(path, replies) for r in rs]
    else:
        texts = [t.moss for record in load(path, None, data_format) for d in texts_of(record) for t in d.turns
                 if t.moss is not None]
    return [len(tokenizer.encode(f" {r}{EOM}", add_special_tokens=False)) for r in texts]


def covering_length(lengths: Sequence[int], cover: float = REPLY_COVER) -> int:
    """The smallest cap under which `cover` of the replies fit."""
    ordered = sorted(lengths)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(cover * len(ordered)) - 1))]


LENGTHS_FILE = "reply_lengths.json"
"""What a model's training data said about reply lengths, written into final/ by `rlhf sft`, `rm` and `dpo`, so a
later run's `max_new_tokens: auto` finds it with the model."""


def lengths_file(path: str, tokenizer: Any, data_format: str = "auto") -> dict[str, str]:
    """{LENGTHS_FILE: its text} for a model trained on `path`: its replies' covering length (in the model's tokens)."""
    return lengths_of(reply_lengths(path, tokenizer, data_format), path)


def lengths_of(lengths: Sequence[int], path: str) -> dict[str, str]:
    """{LENGTHS_FILE: its text} for a model trained on `path`, whose replies have these lengths."""
    record = {"covering_length": covering_length(lengths) if lengths else 0, "cover": REPLY_COVER,
              "longest": max(lengths, default=0), "replies": len(lengths), "data": path}
    return {LENGTHS_FILE: json.dumps(record, indent=1) + "\n"}


def carried_lengths(model: str) -> dict[str, str]:
    """{LENGTHS_FILE: its text} of a model directory that has one (a policy passes it on to the model it trains)."""
    path = os.path.join(model, LENGTHS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {LENGTHS_FILE: f.read()}


def recorded_length(models: Sequence[str]) -> tuple[int, str] | None:
    """The covering reply length the first of `models` (local directories; hub ids have none) recorded, and where."""
    for model in models:
        path = os.path.join(model, LENGTHS_FILE) if model else ""
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                length = int(json.load(f)["covering_length"])
            if length > 0:
                return length, path
    return None


def fit_generation_cap(generation: GenerationConfig, tokenizer: Any, source: str, command: str,
                       data_format: str = "auto", models: Sequence[str] = (), fallback: str = "") -> GenerationConfig:
    """`generation` with its cap resolved: `auto` becomes the length that covers 99% of the replies of, in this
    order, the file `source` (generation.lengths_from), the training data of the first of `models` that recorded
    it (LENGTHS_FILE), or the file `fallback`; and a number below that length is named in one line (the cap, the
    length, the key to change): a run whose best replies cannot finish learns to prefer the ones that can."""
    cap = generation.max_new_tokens
    recorded = None if source else recorded_length(models)
    if recorded:
        needed, where = recorded[0], f"the replies in the training data of {os.path.dirname(recorded[1])}"
    elif source or fallback:
        needed, where = covering_length(reply_lengths(source or fallback, tokenizer, data_format)), \
            f"the replies in {source or fallback}"
    elif cap == "auto":
        raise SystemExit("generation.max_new_tokens: auto needs a model trained by rlhf sft, rm or dpo (its final/ "
                         f"records its replies' lengths in {LENGTHS_FILE}) or generation.lengths_from (an SFT or "
                         "preference file whose replies show how long they run)")
    else:
        return generation
    if cap == "auto":
        print(f"{command}: generation.max_new_tokens=auto: {needed} tokens, enough for {REPLY_COVER:.0%} of {where}",
              flush=True)
        return key_reads.replaced(generation, max_new_tokens=needed)
    if cap < needed:
        print(f"{command}: generation.max_new_tokens={cap} is below {needed}, the length of {REPLY_COVER:.0%} of "
              f"{where}; replies cut there never reach <eom> (set generation.max_new_tokens={needed} or auto)",
              flush=True)
    return generation


# --- plugin rollouts ---------------------------------------------------------------------------------------


def _single_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {token} into {len(ids)} tokens; it needs the MOSS special tokens "
                         f"(retrain it with `rlhf tokenizer`)")
    return ids[0]


def results_ids(tokenizer: Any, results: str, max_tokens: int) -> tuple[list[int], str]:
    """Tokens of the newline after `<eoc>` and the Results segment (`moss.results_text`), tokenized as one piece as
    in SFT, with long results cut so the segment fits max_tokens; and the results text as the model will see it
    (cut too)."""
    ids = tokenizer.encode(f"\n{results_text(results)}", add_special_tokens=False)
    if len(ids) <= max_tokens:
        return ids, results
    tail = tokenizer.encode(f"\n{EOR}\n", add_special_tokens=False)
    head = tokenizer.encode(f"\n{RESULTS_TAG}\n{results}", add_special_tokens=False)[:max_tokens - len(tail)]
    seen = tokenizer.decode(head, skip_special_tokens=False)
    return head + tail, seen[seen.find(RESULTS_TAG) + len(RESULTS_TAG):].strip()


def generate_plugin_replies(model: Any, tokenizer: Any, prompts: dict, gen: dict, tools: ToolRegistry,
                            device: Any, synced: bool = False, micro_batch: int = 64,
                            max_results_tokens: int = 64, with_logprobs: bool = False) -> tuple[dict, list[dict]]:
    """MOSS-003 plugin rollout in two passes.

    Pass 1 writes Inner Thoughts and Commands up to `<eoc>` (or a reply up to `<eom>`); the program runs the
    commands and appends the Results segment as context; pass 2 continues every such row to `<eom>`.
    Returns ({response_ids, action_mask, response_mask [b, W], ended [b]} with W = 2 * max_new_tokens +
    max_results_tokens; action_mask is 0 on Results and padding, response_mask 0 on padding only, since every
    later forward pass must see the Results the second pass was written after; with `with_logprobs` also logprobs
    [b, W], the model's log-prob of each token it wrote, 0 on Results and padding) and one {"commands", "results"}
    dict per row ("" without a call).
    """
    eoc_id, eom_id, pad_id = _single_id(tokenizer, EOC), _single_id(tokenizer, EOM), tokenizer.pad_token_id
    floor = len(results_ids(tokenizer, "None", 10 ** 6)[0])
    if max_results_tokens < floor:
        raise ValueError(f"max_results_tokens {max_results_tokens} cannot hold even an empty Results segment "
                         f"({floor} tokens); raise it")
    first, length, stop, logp1 = _sample(model, prompts["input_ids"], prompts["attention_mask"], gen,
                                         [eoc_id, eom_id], pad_id, device, synced, micro_batch, with_logprobs)
    rows = prompts["input_ids"].shape[0]
    responses: list[list[int]] = []
    masks: list[list[int]] = []
    logps: list[list[float]] = []
    infos: list[dict] = []
    ended = (stop == eom_id).float()
    for i in range(rows):
        written = first[i, :length[i]].tolist()
        responses.append(written)
        masks.append([1] * len(written))
        logps.append(logp1[i, :length[i]].tolist() if with_logprobs else [])
        if stop[i] != eoc_id:
            infos.append({"commands": "", "results": ""})
            continue
        commands = plugin_segments(tokenizer.decode(written, skip_special_tokens=False))[0]
        context, seen = results_ids(tokenizer, tools.run_commands(commands), max_results_tokens)
        responses[i] += context
        masks[i] += [0] * len(context)
        logps[i] += [0.0] * len(context) if with_logprobs else []
        infos.append({"commands": commands, "results": seen})

    going_on = [i for i in range(rows) if stop[i] == eoc_id]
    # Synced (ZeRO-3) ranks must call generate the same number of times, and each rank only knows its own
    # rows, so there every row takes part in pass 2 and the rows that had finished are thrown away.
    second_rows = list(range(rows)) if synced else going_on
    if second_rows:
        prompt_ids = [prompts["input_ids"][i][prompts["attention_mask"][i].bool()].tolist() for i in second_rows]
        batch = collate_prompts([p + responses[i] for p, i in zip(prompt_ids, second_rows)], pad_id)
        second, length2, stop2, logp2 = _sample(model, batch["input_ids"], batch["attention_mask"], gen, [eom_id],
                                                pad_id, device, synced, micro_batch, with_logprobs)
        continuing = set(going_on)
        for j, i in enumerate(second_rows):
            if i in continuing:
                written = second[j, :length2[j]].tolist()
                responses[i] += written
                masks[i] += [1] * len(written)
                logps[i] += logp2[j, :length2[j]].tolist() if with_logprobs else []
                ended[i] = float(stop2[j] == eom_id)

    width = 2 * int(gen["max_new_tokens"]) + max_results_tokens
    batch_out = {"response_ids": pad(responses, pad_id, length=width), "action_mask": pad(masks, 0, length=width),
                 "response_mask": pad([[1] * len(r) for r in responses], 0, length=width), "ended": ended}
    if with_logprobs:
        batch_out["logprobs"] = torch.tensor([row + [0.0] * (width - len(row)) for row in logps])
    return batch_out, infos


def rollout_replies(model: Any, tokenizer: Any, prompts: dict, gen: dict, tools: ToolRegistry | None, device: Any,
                    synced: bool = False, micro_batch: int = 64, max_results_tokens: int = 64,
                    with_logprobs: bool = False) -> dict:
    """Replies to left-padded prompts from a transformers model or a `TokenSampler`: plain (`generate_replies`), or
    with `tools` the two-pass plugin rollouts (`generate_plugin_replies`), each row's commands and results then
    returned with it, as the rules judge them (no parse of decoded text)."""
    if tools is not None:
        out, infos = generate_plugin_replies(model, tokenizer, prompts, gen, tools, device, synced=synced,
                                             micro_batch=micro_batch, max_results_tokens=max_results_tokens,
                                             with_logprobs=with_logprobs)
        return out | {"commands": [i["commands"] for i in infos], "results": [i["results"] for i in infos]}
    return generate_replies(model, prompts, gen, _single_id(tokenizer, EOM), tokenizer.pad_token_id, device,
                            synced=synced, micro_batch=micro_batch, with_logprobs=with_logprobs)


def reply_text(tokenizer: Any, response_ids: torch.Tensor, action_mask: torch.Tensor, eom_id: int,
               plugin: bool = False) -> str:
    """The reply without tags from one rollout row: the model-written tokens, cut at the first `<eom>`, other
    special tokens skipped; for the plugin model the part after its last `<|MOSS|>:` (empty when it wrote none)."""
    written = response_ids[action_mask.bool()].tolist()
    ended = eom_id in written
    if ended:
        written = written[:written.index(eom_id)]
    text = tokenizer.decode(written, skip_special_tokens=True)
    if plugin:
        at = text.rfind(MOSS_TAG)
        if at < 0:
            return ""
        text = text[at:]
    return split_reply(text + EOM if ended else text)
