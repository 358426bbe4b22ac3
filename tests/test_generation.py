"""Rollouts from a real tiny model (shapes, the <eom> cut, left padding, seeding), the plugin tool loop with a
scripted policy, and `rlhf generate` end to end."""
from __future__ import annotations

import json

import pytest
import torch

from rlhf.batching import collate_prompts
from rlhf.config import GenerationConfig
from rlhf.data import load_prompts
from rlhf.drivers.generate import run_generate
from rlhf.generation import generate_plugin_replies, generate_replies, results_ids
from rlhf.moss import EOM, tokenize_prompt
from rlhf.tools import NO_RESULT, default_registry


@pytest.fixture(scope="module")
def policy(tiny):
    from rlhf.modeling import load_causal_lm, load_tokenizer
    tokenizer = load_tokenizer(tiny["tokenizer"])
    model = load_causal_lm(tiny["base"])
    prompts = load_prompts(tiny["prompts_train"])
    return {"model": model, "tokenizer": tokenizer, "prompts": prompts,
            "eom": tokenizer.convert_tokens_to_ids(EOM), "pad": tokenizer.pad_token_id}


def _gen(**changes) -> dict:
    return {**GenerationConfig(max_new_tokens=12).__dict__, **changes}


def _batch(policy, dialogues) -> dict:
    ids = [tokenize_prompt(d, policy["tokenizer"], 128) for d in dialogues]
    return collate_prompts(ids, policy["pad"])


def test_replies_have_fixed_width_and_the_mask_ends_at_the_first_eom(policy):
    batch = _batch(policy, policy["prompts"][:6])
    torch.manual_seed(0)
    out = generate_replies(policy["model"], batch, _gen(), policy["eom"], policy["pad"], "cpu", micro_batch=4)
    assert out["response_ids"].shape == out["action_mask"].shape == (6, 12)
    assert out["ended"].shape == (6,)
    for ids, mask, ended in zip(out["response_ids"], out["action_mask"], out["ended"]):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        eoms = (ids[:length] == policy["eom"]).nonzero().flatten().tolist()
        if ended:
            assert eoms == [length - 1]
        else:
            assert eoms == [] and length == 12
        assert (ids[length:] == policy["pad"]).all()


def test_a_forced_eom_ends_the_reply_and_the_mask_there(policy):
    # Make <eom> the only likely token, so every reply is exactly one token long.
    model = policy["model"]
    bias = model.lm_head.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[policy["eom"]] += 1e4
    try:
        out = generate_replies(model, _batch(policy, policy["prompts"][:3]), _gen(do_sample=False),
                               policy["eom"], policy["pad"], "cpu")
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert out["ended"].tolist() == [1.0, 1.0, 1.0]
    assert out["action_mask"].sum(1).tolist() == [1, 1, 1]
    assert (out["response_ids"][:, 0] == policy["eom"]).all()
    assert out["response_ids"].shape == (3, 12)


def test_left_padding_does_not_change_a_greedy_reply(policy):
    short, long = sorted(policy["prompts"][:20], key=lambda d: len(tokenize_prompt(d, policy["tokenizer"], 128)))[::19]
    greedy = _gen(do_sample=False, repetition_penalty=1.0)
    alone = generate_replies(policy["model"], _batch(policy, [short]), greedy, policy["eom"], policy["pad"], "cpu")
    together = generate_replies(policy["model"], _batch(policy, [long, short]), greedy, policy["eom"],
                                policy["pad"], "cpu")
    assert _batch(policy, [long, short])["attention_mask"][1].min() == 0  # the short prompt really is padded
    assert torch.equal(alone["response_ids"][0], together["response_ids"][1])
    assert torch.equal(alone["action_mask"][0], together["action_mask"][1])


def test_sampling_is_reproducible_for_a_seed(policy):
    batch = _batch(policy, policy["prompts"][:4])
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(generate_replies(policy["model"], batch, _gen(temperature=1.0, top_p=1.0), policy["eom"],
                                     policy["pad"], "cpu")["response_ids"])
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# --- the plugin loop, with a scripted policy ----------------------------------------------------------------


class ScriptedPolicy:
    """Writes a fixed continuation per call and row: the tool loop around the model is what is tested."""

    def __init__(self, tokenizer, passes: list[list[str]]) -> None:
        self.tokenizer, self.passes, self.inputs, self.training = tokenizer, passes, [], False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, input_ids, attention_mask, pad_token_id, max_new_tokens, **_):
        self.inputs.append([row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)])
        script = self.passes[len(self.inputs) - 1]
        new = [self.tokenizer.encode(text, add_special_tokens=False)[:max_new_tokens] for text in script]
        width = max(len(n) for n in new)
        new = torch.tensor([n + [pad_token_id] * (width - len(n)) for n in new])
        return torch.cat([input_ids, new], dim=1)


PASS_ONE = '<|Inner Thoughts|>: need math<eot>\n<|Commands|>: Calculate("2+3")<eoc>'
PASS_TWO = "<|MOSS|>: It is 5<eom>"
RESULTS = '\n<|Results|>:\nCalculate("2+3") => 5\n<eor>\n'  # as the public MOSS-003 data writes it


def test_plugin_rollout_runs_the_command_and_masks_the_results(policy):
    tok = policy["tokenizer"]
    prompts = _batch(policy, policy["prompts"][:2])
    model = ScriptedPolicy(tok, [[PASS_ONE, "<|Inner Thoughts|>: none<eot>\n<|Commands|>: None<eoc>"],
                                 [PASS_TWO, "<|MOSS|>: Hello<eom>"]])
    gen = _gen(max_new_tokens=40)
    out, infos = generate_plugin_replies(model, tok, prompts, gen, default_registry(), "cpu")

    assert out["response_ids"].shape == out["action_mask"].shape == (2, 2 * 40 + 64)
    assert out["ended"].tolist() == [1.0, 1.0]
    assert infos == [{"commands": 'Calculate("2+3")', "results": 'Calculate("2+3") => 5'},
                     {"commands": "None", "results": "None"}]
    ids, mask = out["response_ids"][0], out["action_mask"][0]
    one, results, two = (tok.encode(t, add_special_tokens=False) for t in (PASS_ONE, RESULTS, PASS_TWO))
    used = len(one) + len(results) + len(two)
    assert tok.decode(ids[:used].tolist(), skip_special_tokens=False) == PASS_ONE + RESULTS + PASS_TWO
    assert mask[:used].tolist() == [1] * len(one) + [0] * len(results) + [1] * len(two)
    assert not mask[used:].any() and (ids[used:] == policy["pad"]).all()
    # Pass 2 continued from the prompt, what the model wrote and the Results, with no padding inside.
    prompt = prompts["input_ids"][0][prompts["attention_mask"][0].bool()].tolist()
    assert model.inputs[1][0] == prompt + one + results
    none_results = tok.decode(out["response_ids"][1][out["action_mask"][1] == 0].tolist(), skip_special_tokens=False)
    assert none_results.startswith("\n<|Results|>: None<eor>\n")


def test_plugin_rollout_malformed_command_and_a_direct_reply(policy):
    tok = policy["tokenizer"]
    prompts = _batch(policy, policy["prompts"][:2])
    model = ScriptedPolicy(tok, [["<|Inner Thoughts|>: hm<eot>\n<|Commands|>: Calculate(2+3<eoc>",
                                  "<|MOSS|>: Hi<eom>"],
                                 ["<|MOSS|>: Sorry<eom>"]])
    out, infos = generate_plugin_replies(model, tok, prompts, _gen(max_new_tokens=40), default_registry(), "cpu")
    assert infos[0]["results"] == NO_RESULT
    assert infos[1] == {"commands": "", "results": ""}
    assert len(model.inputs[1]) == 1  # only the row that called a tool goes on to pass 2
    context = out["response_ids"][0][(out["action_mask"][0] == 0) & (out["response_ids"][0] != policy["pad"])]
    assert context.tolist() == results_ids(tok, NO_RESULT, 64)[0]
    direct = tok.encode("<|MOSS|>: Hi<eom>", add_special_tokens=False)
    assert out["action_mask"][1].tolist() == [1] * len(direct) + [0] * (out["action_mask"].shape[1] - len(direct))


# --- rlhf generate -----------------------------------------------------------------------------------------


def test_run_generate_writes_one_line_per_prompt_in_order(tiny, tmp_path):
    with open(tiny["prompts_eval"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:5]
    records[2]["note"] = "kept"
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out" / "replies.jsonl"
    assert run_generate(tiny["base"], str(source), str(out), None, ["generation.max_new_tokens=8"]) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 5
    for record, line in zip(records, lines):
        assert {k: v for k, v in line.items() if k != "response"} == {**{"meta_instruction": ""}, **record}
        assert isinstance(line["response"], str) and "<|" not in line["response"] and EOM not in line["response"]
    assert lines[2]["note"] == "kept"
    again = tmp_path / "again.jsonl"
    run_generate(tiny["base"], str(source), str(again), None, ["generation.max_new_tokens=8"])
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")  # seeded


def test_run_generate_reports_bad_prompt_lines(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": [{"human": "hi"}]}\n{"turns": "hello"}\n', encoding="utf-8")
    out = tmp_path / "never.jsonl"
    assert run_generate(tiny["base"], str(bad), str(out)) == 1
    assert f"{bad}:2: turns: " in capsys.readouterr().err
    assert not out.exists()


# --- best-of-N: N samples per prompt, the one a scorer ranks highest kept -------------------------------------


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8").read().splitlines()]


@pytest.fixture(scope="module")
def other_scorer(tiny, tmp_path_factory) -> str:
    """A preference model that shares nothing with tiny's policy: another architecture (Llama) and another tokenizer
    (500 tokens, trained on the SFT data alone), with its random head."""
    import shutil
    from reward.model import ScalarHeadModel
    from rlhf.modeling import init_model, load_tokenizer
    from rlhf.tokenizer import texts_from_files, train_tokenizer
    root = tmp_path_factory.mktemp("other_scorer")
    train_tokenizer(texts_from_files([tiny["sft_train"]]), 500, str(root / "tok"))
    init_model("llama", "tiny", str(root / "tok"), str(root / "base"), seed=1)
    ScalarHeadModel.from_pretrained(str(root / "base")).save_pretrained(
        str(root / "rm"), pad_token_id=load_tokenizer(str(root / "tok")).pad_token_id)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "base" / name, root / "rm" / name)
    return str(root / "rm")


def test_best_of_n_keeps_the_reply_its_scorer_ranks_highest_scored_as_rm_eval_scores_it(tiny, other_scorer, tmp_path):
    """Each line keeps its record and has the kept reply, its score and every candidate's; the kept one is the
    candidates' argmax, and each candidate's score is what rm-eval's scoring reads for that dialogue in the scorer's
    own tokens (the policy's ids mean nothing to it)."""
    from reward.batches import collate_ranked, encode_preference
    from reward.model import ScalarHeadModel
    from rlhf.batching import position_ids
    from rlhf.modeling import load_tokenizer
    from rlhf.records import Preference
    records = [json.loads(line) for line in open(tiny["prompts_eval"], encoding="utf-8").read().splitlines()[:4]]
    records[1]["note"] = "kept"
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "best.jsonl"
    assert run_generate(tiny["base"], str(source), str(out), None, ["generation.max_new_tokens=8"], best_of=3,
                        scorer=other_scorer) == 0
    lines = _lines(out)
    assert [{k: v for k, v in line.items() if k not in ("response", "score", "candidates")} for line in lines] == \
        [{"meta_instruction": "", **r} for r in records]
    replies = [[c["response"] for c in line["candidates"]] for line in lines]
    scores = [[c["score"] for c in line["candidates"]] for line in lines]
    for line, texts, mine in zip(lines, replies, scores):
        assert len(texts) == 3 and len(set(texts)) > 1
        assert (line["response"], line["score"]) == (texts[mine.index(max(mine))], max(mine))

    tokenizer = load_tokenizer(other_scorer)
    assert len(tokenizer) != len(load_tokenizer(tiny["tokenizer"]))
    lists = [encode_preference(Preference(prompt, texts), tokenizer, 512, False, 0.0, False)
             for prompt, texts in zip(load_prompts(str(source)), replies)]
    batch = collate_ranked(lists, tokenizer.pad_token_id)
    with torch.no_grad():
        expected = ScalarHeadModel.from_pretrained(other_scorer).eval().score(
            batch["input_ids"], batch["attention_mask"], position_ids(batch["attention_mask"]))
    torch.testing.assert_close(torch.tensor(scores).flatten(), expected, atol=1e-5, rtol=1e-5)


def test_best_of_n_with_the_trained_preference_model_never_scores_below_one_sample(tiny, sft_run, rm_run, tmp_path):
    """The SFT policy on held-out prompts, ranked by the preference model trained from it. Best-of-1 is the plain
    reply, and best-of-4's candidates begin with it (one seed, the random state going on from round to round): so,
    with no luck involved, the kept score of 4 samples is never below that of 1, and the scorer's choice shows."""
    from conftest import run_cli
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(open(tiny["prompts_eval"], encoding="utf-8").readlines()[:4]), encoding="utf-8")
    policy, scorer, cap = f"{sft_run}/final", f"{rm_run}/final", ["generation.max_new_tokens=16"]
    assert run_generate(policy, str(prompts), str(tmp_path / "plain.jsonl"), None, cap) == 0
    assert run_generate(policy, str(prompts), str(tmp_path / "one.jsonl"), None, cap, best_of=1, scorer=scorer) == 0
    assert run_cli("generate", "--model", policy, "--prompts", prompts, "--out", tmp_path / "four.jsonl", "--set",
                   cap[0], "--best-of", "4", "--scorer", scorer) == 0
    plain, one, four = (_lines(tmp_path / f"{name}.jsonl") for name in ("plain", "one", "four"))
    assert [p["response"] for p in plain] == [o["response"] for o in one] == [f["candidates"][0]["response"]
                                                                              for f in four]
    for o, f in zip(one, four):
        assert o["candidates"] == [{"response": o["response"], "score": o["score"]}]
        assert f["candidates"][0]["score"] == pytest.approx(o["score"], abs=1e-5)  # the same dialogue, another batch
        assert f["score"] == max(c["score"] for c in f["candidates"]) >= f["candidates"][0]["score"]
    assert sum(f["score"] > f["candidates"][0]["score"] + 0.1 for f in four) >= 2  # the scorer chose (fixed seeds)


def test_trimming_all_pad_left_columns_and_keeping_only_reply_logits_change_nothing(policy):
    """What the PPO passes do to save work: drop prompt columns that are padding in every row, and ask the model
    for the reply positions' logits only. The reply's log-probs must not move."""
    from rlhf.batching import position_ids, trim_left_padding
    from rlhf.ppo_math import logprobs_from_logits
    batch = _batch(policy, policy["prompts"][:4])
    torch.manual_seed(0)
    out = generate_replies(policy["model"], batch, _gen(), policy["eom"], policy["pad"], "cpu", micro_batch=4)
    extra = torch.full((4, 9), policy["pad"])  # nine more columns of padding on the left of every prompt
    seq = torch.cat([extra, batch["input_ids"], out["response_ids"]], 1)
    mask = torch.cat([torch.zeros_like(extra), batch["attention_mask"], out["response_mask"]], 1)
    width = out["response_ids"].shape[1]

    def reply_logprobs(ids, attention, keep=0):
        with torch.no_grad():
            logits = policy["model"](input_ids=ids, attention_mask=attention, position_ids=position_ids(attention),
                                     logits_to_keep=keep).logits
        return logprobs_from_logits(logits[:, -width - 1:-1], out["response_ids"])

    trimmed = trim_left_padding({"sequences": seq, "attention_mask": mask, "response_ids": out["response_ids"]})
    assert trimmed["sequences"].shape[1] == seq.shape[1] - 9 - int((batch["attention_mask"] == 0).all(0).sum())
    assert trimmed["response_ids"] is out["response_ids"]
    full = reply_logprobs(seq, mask)
    fast = reply_logprobs(trimmed["sequences"], trimmed["attention_mask"], keep=width + 1)
    seen = out["action_mask"].bool()
    torch.testing.assert_close(fast[seen], full[seen], atol=1e-5, rtol=1e-5)


def test_a_cap_below_the_datas_replies_is_named_and_auto_covers_them(tiny, capsys):
    from rlhf.config import load_config
    from rlhf.generation import REPLY_COVER, fit_generation_cap, reply_lengths
    from rlhf.modeling import load_tokenizer
    tok = load_tokenizer(tiny["tokenizer"])
    lengths = reply_lengths(tiny["sft_train"], tok)
    assert len(lengths) > 600 and max(lengths) > 12
    low = load_config("ppo", "configs/tiny/ppo.yaml", ["generation.max_new_tokens=8"]).generation
    assert fit_generation_cap(low, tok, tiny["sft_train"], "ppo").max_new_tokens == 8  # said, not changed
    line = capsys.readouterr().out.strip()
    assert line.startswith("ppo: generation.max_new_tokens=8 is below ") and "generation.max_new_tokens=" in line
    auto = load_config("ppo", "configs/tiny/ppo.yaml", ["generation.max_new_tokens=auto"]).generation
    cap = fit_generation_cap(auto, tok, tiny["prefs_train"], "ppo").max_new_tokens
    covered = sum(n <= cap for n in reply_lengths(tiny["prefs_train"], tok)) / len(reply_lengths(tiny["prefs_train"], tok))
    assert covered >= REPLY_COVER and cap <= max(reply_lengths(tiny["prefs_train"], tok))
    from rlhf.generation import covering_length
    fits = load_config("ppo", "configs/tiny/ppo.yaml", [f"generation.max_new_tokens={covering_length(lengths)}"]
                       ).generation  # a cap the replies fit under is not named
    capsys.readouterr()
    fit_generation_cap(fits, tok, tiny["sft_train"], "ppo")
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit, match="auto needs a model trained by rlhf sft, rm or dpo"):
        fit_generation_cap(auto, tok, "", "generate", models=(tiny["base"],))  # a random model records nothing


def test_the_reply_lengths_travel_with_the_trained_models_and_auto_reads_them(tiny, sft_run, rm_run, capsys):
    """SFT and the preference model write what their data says about reply lengths into final/; `auto` takes it from
    the policy (else the reward model) it is given; an explicit generation.lengths_from still wins."""
    import json
    from rlhf.config import load_config
    from rlhf.generation import LENGTHS_FILE, covering_length, fit_generation_cap, reply_lengths
    from rlhf.modeling import load_tokenizer
    tok = load_tokenizer(tiny["tokenizer"])
    for model, data in ((f"{sft_run}/final", tiny["sft_train"]), (f"{rm_run}/final", tiny["prefs_train"])):
        record = json.loads(open(f"{model}/{LENGTHS_FILE}", encoding="utf-8").read())
        assert record["covering_length"] == covering_length(reply_lengths(data, tok)) > 8
    auto = load_config("ppo", "configs/tiny/ppo.yaml").generation
    assert auto.max_new_tokens == "auto"  # the shipped tiny configs take it from the models
    sft_cap = json.loads(open(f"{sft_run}/final/{LENGTHS_FILE}").read())["covering_length"]
    rm_cap = json.loads(open(f"{rm_run}/final/{LENGTHS_FILE}").read())["covering_length"]
    capsys.readouterr()
    assert fit_generation_cap(auto, tok, "", "ppo", models=(f"{sft_run}/final", f"{rm_run}/final")).max_new_tokens \
        == sft_cap
    assert f"training data of {sft_run}/final" in capsys.readouterr().out
    assert fit_generation_cap(auto, tok, "", "ppo", models=(tiny["base"], f"{rm_run}/final")).max_new_tokens == rm_cap
    short = tiny["sft_eval"]
    assert fit_generation_cap(auto, tok, short, "ppo", models=(f"{sft_run}/final",)).max_new_tokens == \
        covering_length(reply_lengths(short, tok))
    low = load_config("ppo", "configs/tiny/ppo.yaml", ["generation.max_new_tokens=4"]).generation
    capsys.readouterr()
    assert fit_generation_cap(low, tok, "", "ppo", models=(f"{sft_run}/final",)).max_new_tokens == 4  # said, kept
    assert f"max_new_tokens=4 is below {sft_cap}" in capsys.readouterr().out


# --- the log-probs of what was sampled, from the passes that sampled it ---------------------------------------


def _forward_logprobs(policy, prompts, out, temperature=1.0):
    """The trainer's log-probs of each reply token: one forward pass over prompt + reply."""
    from rlhf.batching import position_ids
    from rlhf.ppo_math import logprobs_from_logits
    seq = torch.cat([prompts["input_ids"], out["response_ids"]], 1)
    mask = torch.cat([prompts["attention_mask"], out["response_mask"]], 1)
    with torch.no_grad():
        logits = policy["model"](input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits
    width = out["response_ids"].shape[1]
    return logprobs_from_logits(logits[:, -width - 1:-1] / temperature, out["response_ids"])


def test_the_log_probs_recorded_while_sampling_are_the_forward_passes_at_the_temperature(policy):
    """With left-padded prompts in two micro-batches at temperature 0.7: each written token's recorded log-prob is
    the one a forward pass over prompt + reply gives with its logits over 0.7 (the distribution it was drawn from,
    not the raw one), 0 after the reply; and recording changes no token."""
    batch = _batch(policy, policy["prompts"][:6])
    gen = _gen(temperature=0.7, top_p=1.0, repetition_penalty=1.0)
    torch.manual_seed(3)
    out = generate_replies(policy["model"], batch, gen, policy["eom"], policy["pad"], "cpu", micro_batch=4,
                           with_logprobs=True)
    torch.manual_seed(3)
    plain = generate_replies(policy["model"], batch, gen, policy["eom"], policy["pad"], "cpu", micro_batch=4)
    assert torch.equal(out["response_ids"], plain["response_ids"]) and "logprobs" not in plain
    seen = out["action_mask"].bool()
    assert seen.sum() > 12 and (out["logprobs"][~seen] == 0).all()
    tempered = _forward_logprobs(policy, batch, out, temperature=0.7)
    torch.testing.assert_close(out["logprobs"][seen], tempered[seen], atol=1e-4, rtol=1e-4)
    assert (out["logprobs"][seen] - _forward_logprobs(policy, batch, out)[seen]).abs().max() > 1e-2


@pytest.mark.parametrize("change", [{"top_p": 0.8}, {"top_k": 5}, {"repetition_penalty": 1.02}, {"do_sample": False}])
def test_log_probs_are_refused_where_the_sampling_distribution_is_not_the_scored_one(policy, change):
    batch = _batch(policy, policy["prompts"][:2])
    gen = _gen(**{"top_p": 1.0, "repetition_penalty": 1.0, **change})
    with pytest.raises(ValueError, match="plain sampling at a temperature"):
        generate_replies(policy["model"], batch, gen, policy["eom"], policy["pad"], "cpu", with_logprobs=True)


def test_plugin_rollout_log_probs_skip_the_results_and_match_the_forward_pass(policy):
    """<eoc> made likely, so rows stop for a command and are continued after their Results: the recorded log-probs
    of both passes are the forward pass's over the whole turn, Results included as context, and 0 on the Results."""
    from rlhf.moss import EOC
    tok, model = policy["tokenizer"], policy["model"]
    batch = _batch(policy, policy["prompts"][:4])
    bias = model.lm_head.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[tok.convert_tokens_to_ids(EOC)] += 4.0
    try:
        torch.manual_seed(0)
        gen = _gen(max_new_tokens=6, top_p=1.0, repetition_penalty=1.0)
        out, _ = generate_plugin_replies(model, tok, batch, gen, default_registry(), "cpu",
                                         max_results_tokens=16, with_logprobs=True)
        expected = _forward_logprobs(policy, batch, out, temperature=0.7)  # _gen samples at 0.7
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    written, context = out["action_mask"].bool(), out["response_mask"].bool() & ~out["action_mask"].bool()
    assert context.any() and written[:, 6:].any()  # some row was continued after its Results
    assert (out["logprobs"][~written] == 0).all()
    torch.testing.assert_close(out["logprobs"][written], expected[written], atol=1e-4, rtol=1e-4)
