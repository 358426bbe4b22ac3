"""Rollouts: sampling MOSS replies from a policy, plain (stop at `<eom>`) or plugin-style in two passes (stop at
`<eoc>`, run the command, write `<|Results|>`, generate again to `<eom>`), and the `rlhf generate` command.

Replies come back as fixed-width CPU tensors with an action mask over what the model wrote, so every rank and
every iteration hands the controller batches of the same shape (see DESIGN.md, "One PPO iteration").
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rlhf.batching import collate_prompts, pad
from rlhf.moss import COMMANDS_TAG, EOC, EOM, EOR, EOT, MOSS_TAG, RESULTS_TAG, Dialogue, split_reply, tokenize_prompt

if TYPE_CHECKING:
    from rlhf.config import GenerationConfig
    from rlhf.plugins import ToolRegistry


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


def _sample(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: dict, eos_ids: list[int],
            pad_id: int, device: Any, synced: bool,
            micro_batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate after left-padded prompts in micro-batches.

    Returns the new tokens [b, max_new_tokens] right-padded with pad_id, the written length of each row
    (up to and including the first stop token) [b], and the stop token of each row, -1 when none [b].
    """
    width = int(gen["max_new_tokens"])
    kwargs = _generate_kwargs(gen, eos_ids, pad_id, synced)
    stops = torch.tensor(eos_ids, dtype=torch.long)
    tokens, lengths, stop_tokens = [], [], []
    was_training = getattr(model, "training", False)
    model.eval()  # no dropout while sampling, whatever mode the trainer left the model in
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], micro_batch):
                ids = input_ids[start:start + micro_batch]
                mask = attention_mask[start:start + micro_batch]
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
                lengths.append(length)
                stop_tokens.append(torch.where(stopped, new.gather(1, first.unsqueeze(1)).squeeze(1),
                                               torch.full_like(first, -1)))
    finally:
        model.train(was_training)
    return torch.cat(tokens), torch.cat(lengths), torch.cat(stop_tokens)


def generate_replies(model: Any, prompts: dict, gen: dict, eom_id: int, pad_id: int, device: Any,
                     synced: bool = False, micro_batch: int = 64) -> dict:
    """Sample one reply per left-padded prompt, stopping at `<eom>`.

    prompts: input_ids / attention_mask [b, P]. synced: ZeRO-3 ranks step together (HF synced_gpus).
    Returns CPU tensors response_ids [b, R] (R = max_new_tokens, right-padded), action_mask [b, R] (1 up to
    and including the first <eom>), response_mask [b, R] (what the scoring models attend to; here the same as
    action_mask), ended [b] (1.0 when the reply reached <eom>).
    """
    response, length, stop = _sample(model, prompts["input_ids"], prompts["attention_mask"], gen, [eom_id],
                                      pad_id, device, synced, micro_batch)
    action_mask = (torch.arange(response.shape[1]).unsqueeze(0) < length.unsqueeze(1)).long()
    return {"response_ids": response, "action_mask": action_mask, "response_mask": action_mask.clone(),
            "ended": (stop == eom_id).float()}


# --- plugin rollouts ---------------------------------------------------------------------------------------


def _single_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {token} into {len(ids)} tokens; it needs the MOSS special tokens "
                         f"(retrain it with `rlhf tokenizer`)")
    return ids[0]


def commands_text(pass_one: str) -> str:
    """The Commands segment of what the model wrote before `<eoc>` (the whole text when it wrote no tag,
    which then fails to parse and gets `No result.`)."""
    body = pass_one.split(EOC, 1)[0]
    at = body.rfind(COMMANDS_TAG)
    body = body[at + len(COMMANDS_TAG):] if at >= 0 else body.rsplit(EOT, 1)[-1]
    return body.strip()


def results_ids(tokenizer: Any, results: str, max_tokens: int) -> list[int]:
    """Tokens of `\\n<|Results|>:\\n{results}<eor>\\n`, tokenized as one piece as in SFT, with long results cut
    so the segment fits max_tokens."""
    ids = tokenizer.encode(f"\n{RESULTS_TAG}\n{results}{EOR}\n", add_special_tokens=False)
    if len(ids) <= max_tokens:
        return ids
    tail = tokenizer.encode(f"{EOR}\n", add_special_tokens=False)
    head = tokenizer.encode(f"\n{RESULTS_TAG}\n{results}", add_special_tokens=False)
    return head[:max_tokens - len(tail)] + tail


def generate_plugin_replies(model: Any, tokenizer: Any, prompts: dict, gen: dict, tools: ToolRegistry,
                            device: Any, synced: bool = False, micro_batch: int = 64,
                            max_results_tokens: int = 64) -> tuple[dict, list[dict]]:
    """MOSS-003 plugin rollout in two passes.

    Pass 1 writes Inner Thoughts and Commands up to `<eoc>` (or a reply up to `<eom>`); the program runs the
    commands and appends the Results segment as context; pass 2 continues every such row to `<eom>`.
    Returns ({response_ids, action_mask, response_mask [b, W], ended [b]} with W = 2 * max_new_tokens +
    max_results_tokens; action_mask is 0 on Results and padding, response_mask 0 on padding only, since every
    later forward pass must see the Results the second pass was written after) and one {"commands", "results"}
    dict per row ("" without a call).
    """
    eoc_id, eom_id, pad_id = _single_id(tokenizer, EOC), _single_id(tokenizer, EOM), tokenizer.pad_token_id
    floor = len(results_ids(tokenizer, "None", 10 ** 6))
    if max_results_tokens < floor:
        raise ValueError(f"max_results_tokens {max_results_tokens} cannot hold even an empty Results segment "
                         f"({floor} tokens); raise it")
    first, length, stop = _sample(model, prompts["input_ids"], prompts["attention_mask"], gen, [eoc_id, eom_id],
                                  pad_id, device, synced, micro_batch)
    rows = prompts["input_ids"].shape[0]
    responses: list[list[int]] = []
    masks: list[list[int]] = []
    infos: list[dict] = []
    ended = (stop == eom_id).float()
    for i in range(rows):
        written = first[i, :length[i]].tolist()
        responses.append(written)
        masks.append([1] * len(written))
        if stop[i] != eoc_id:
            infos.append({"commands": "", "results": ""})
            continue
        commands = commands_text(tokenizer.decode(written, skip_special_tokens=False))
        results = tools.run_commands(commands)
        context = results_ids(tokenizer, results, max_results_tokens)
        responses[i] += context
        masks[i] += [0] * len(context)
        infos.append({"commands": commands, "results": results})

    going_on = [i for i in range(rows) if stop[i] == eoc_id]
    # Synced (ZeRO-3) ranks must call generate the same number of times, and each rank only knows its own
    # rows, so there every row takes part in pass 2 and the rows that had finished are thrown away.
    second_rows = list(range(rows)) if synced else going_on
    if second_rows:
        prompt_ids = [prompts["input_ids"][i][prompts["attention_mask"][i].bool()].tolist() for i in second_rows]
        batch = collate_prompts([p + responses[i] for p, i in zip(prompt_ids, second_rows)], pad_id)
        second, length2, stop2 = _sample(model, batch["input_ids"], batch["attention_mask"], gen, [eom_id],
                                         pad_id, device, synced, micro_batch)
        continuing = set(going_on)
        for j, i in enumerate(second_rows):
            if i in continuing:
                written = second[j, :length2[j]].tolist()
                responses[i] += written
                masks[i] += [1] * len(written)
                ended[i] = float(stop2[j] == eom_id)

    width = 2 * int(gen["max_new_tokens"]) + max_results_tokens
    batch_out = {"response_ids": pad(responses, pad_id, length=width), "action_mask": pad(masks, 0, length=width),
                 "response_mask": pad([[1] * len(r) for r in responses], 0, length=width), "ended": ended}
    return batch_out, infos


# --- in-process generation and `rlhf generate` -------------------------------------------------------------


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


def generate_texts(model_path: str, dialogues: Sequence[Dialogue], gen: GenerationConfig, max_prompt_length: int,
                   plugin: bool, batch_size: int = 16, seed: int = 0, tokenizer_path: str = "",
                   trust_remote_code: bool = False) -> list[str]:
    """Reply texts of the model at model_path to dialogues (prompts, or dialogues whose last reply is
    dropped), in order; seeded without disturbing the caller's random state."""
    from rlhf.modeling import check_model_dir, load_causal_lm, load_tokenizer
    from rlhf.plugins import default_registry

    check_model_dir(model_path, "model")  # before the tokenizer, so a wrong path is named as the model's
    tokenizer = load_tokenizer(tokenizer_path or model_path, trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_path, trust_remote_code=trust_remote_code).to(device)
    gen_dict = dataclasses.asdict(gen)
    eom_id = _single_id(tokenizer, EOM)
    tools = default_registry() if plugin else None
    prompts = [d if d.is_prompt else d.as_prompt(plugin) for d in dialogues]
    texts: list[str] = []
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            ids = [tokenize_prompt(d, tokenizer, max_prompt_length, plugin) for d in prompts[start:start + batch_size]]
            batch = collate_prompts(ids, tokenizer.pad_token_id)
            if plugin:
                out, _ = generate_plugin_replies(model, tokenizer, batch, gen_dict, tools, device,
                                                 micro_batch=batch_size)
            else:
                out = generate_replies(model, batch, gen_dict, eom_id, tokenizer.pad_token_id, device,
                                       micro_batch=batch_size)
            texts += [reply_text(tokenizer, r, m, eom_id, plugin)
                      for r, m in zip(out["response_ids"], out["action_mask"])]
    return texts


def run_generate(model: str, prompts: str, out: str, config: str | None = None,
                 overrides: list[str] | None = None) -> int:
    """`rlhf generate`: one JSON line per prompt, in input order, with its fields kept plus `response`.

    Bad prompt lines are printed as `PATH:LINE: FIELD: ...` and give 1; config and model errors are raised
    for the command line to print in one line.
    """
    from rlhf.config import load_config
    from rlhf.data import DataFileError, load_prompts, write_jsonl

    try:
        dialogues = load_prompts(prompts)
    except DataFileError as error:
        for line in error.errors:
            print(str(line), file=sys.stderr)
        return 1
    cfg = load_config(config, overrides or [])
    texts = generate_texts(model, dialogues, cfg.generation, cfg.data.max_prompt_length, cfg.data.plugin,
                           seed=cfg.seed, tokenizer_path=cfg.model.tokenizer,
                           trust_remote_code=cfg.model.trust_remote_code)
    write_jsonl(out, [{**d.to_json(), "response": text} for d, text in zip(dialogues, texts)])
    print(f"generate: {len(texts)} replies (seed {cfg.seed}) -> {out}")
    return 0
