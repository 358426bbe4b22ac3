"""Bad input never reaches training: each case makes one bad file, config, model or tokenizer, runs the real
`rlhf` command line, and checks what a user sees: a non-zero exit, one line per error, no traceback, and nothing
started (no Ray, no output directory, no checkpoint, no model written).

The command line runs in the test's process (`rlhf.cli.main`, what `python -m rlhf` calls), with `ray.init` made to
raise: an error escaping `main` is the traceback a user would see, and a refused run must never reach Ray. A few
cases, one per kind of command, run `python -m rlhf` in a fresh process as a user does, where a library's chatter on
stderr (which pytest's log capture would swallow here) and the exit status of the interpreter itself are seen too."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.data import MAX_LINE_BYTES

ROOT = Path(__file__).resolve().parents[1]
PROMPT = {"turns": [{"human": "Hi", "moss": "Hello!"}, {"human": "Tell me about apples."}]}
SFT = {"turns": [{"human": "Hi", "moss": "Hello!"}]}


def rlhf(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # a refused run must not even join a cluster
    return subprocess.run([sys.executable, "-m", "rlhf", *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, errors="replace", timeout=120)


class RayStarted(BaseException):
    """Raised by `ray.init` in an in-process case; a BaseException, so no `except Exception` of ours hides it."""


def rlhf_here(argv, capfd, monkeypatch) -> subprocess.CompletedProcess:
    """`python -m rlhf ARGV` run as `rlhf.cli.main(ARGV)` in this process, its output captured at the file descriptors."""
    import ray

    from rlhf.cli import main

    def init(*args, **kwargs):
        raise RayStarted("a refused run called ray.init")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.chdir(ROOT)
    capfd.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as err:  # argparse's refusals
        code = err.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def jsonl(path: Path, *lines) -> Path:
    """Each line a JSON value, a str written as is, or bytes written raw."""
    with open(path, "wb") as f:
        for line in lines:
            raw = line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line))
            f.write(raw if isinstance(raw, bytes) else raw.encode("utf-8"))
            f.write(b"\n")
    return path


def at(path: Path, line: int, field: str) -> str:
    """The start of a data error line: PATH:LINE: FIELD: (a regex)."""
    return re.escape(f"{path}:{line}: {field}: ")


@pytest.fixture(scope="module")
def kit(tiny, tmp_path_factory) -> dict:
    """The good parts (tiny's model, tokenizer and data) plus a tokenizer without the MOSS tokens and a model
    directory whose only weights are a pickle that creates a file if anything ever unpickles it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bad_input_kit")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["Hello MOSS, tell me about apples. <eom> <eoh>"] * 20,
                                trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    no_moss = root / "no_moss_tok"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(str(no_moss))

    class OpensAFile:  # unpickling calls open(sentinel, "w")
        def __reduce__(self):
            return open, (str(root / "UNPICKLED"), "w")

    pickled = root / "pickle_model"
    shutil.copytree(tiny["base"], pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": OpensAFile()}, pickled / "pytorch_model.bin")
    from reward.model import ScalarHeadModel
    reward = root / "reward"  # a reward model's layout (the base with a scalar head), for --reward
    ScalarHeadModel.from_pretrained(tiny["base"]).save_pretrained(str(reward))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny["base"]) / name, reward / name)
    return {**tiny, "no_moss_tok": str(no_moss), "pickle_model": str(pickled), "sentinel": root / "UNPICKLED",
            "reward": str(reward)}


CASES = {}


def case(name: str):
    """Register a bad input: fn(tmp, kit) -> (argv, a regex for each stderr line, in order)."""
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def train(command: str, kit: dict, tmp: Path, *, data: str | Path | None = None, model: str | None = None,
          extra: tuple = ()) -> list:
    """argv of a training command whose every part is good unless given."""
    data_flag, default_data = {"sft": ("--data", kit["sft_train"]), "rm": ("--data", kit["prefs_train"]),
                               "prm": ("--data", kit["steps_train"]), "ppo": ("--prompts", kit["prompts_train"])}[command]
    model_args = ["--policy", model or kit["base"], "--reward", kit["reward"]] if command == "ppo" \
        else ["--model", model or kit["base"]]
    return [command, "--config", f"configs/tiny/{command}.yaml", *model_args, data_flag, data or default_data,
            "--output", tmp / "out", "--set", "logging.progress=false", *extra]


# --- rlhf validate: every error class, one line per bad line --------------------------------------------


@case("validate sft: every bad line reported")
def _(tmp, kit):
    path = jsonl(tmp / "sft.jsonl",
                 SFT,                                                           # 1 good, yet nothing is used
                 [1, 2],                                                        # 2 not an object
                 '{"turns": [{"human": "Hi", "moss": "Hel',                     # 3 truncated JSON
                 '{"turns": [{"human": "café", "moss": "x"}]}'.encode("latin-1"),  # 4 wrong encoding
                 {"turns": []},                                                 # 5 empty turns
                 {"turns": [{"moss": "Hello!"}]},                               # 6 turn without human
                 {"meta_instruction": 3, **SFT},                                # 7 wrong type
                 {"turns": [{"human": 5, "moss": "x"}]},                        # 8 wrong type in a turn
                 {"turns": [{"human": "Hi"}]},                                  # 9 SFT turn without a reply
                 "",                                                            # 10 blank: skipped
                 "x" * (MAX_LINE_BYTES + 1),                                    # 11 line too long
                 '{"turns": [{"human": "Hi", "moss": "x", "mood": "ok"}]}',     # 12 unknown turn key
                 '{"turns": "Hi"}')                                             # 13 wrong type
    return ["validate", path, "--kind", "sft"], [
        at(path, 2, "record") + "expected a JSON object, got list",
        at(path, 3, "line") + "invalid JSON.*truncated",
        at(path, 4, "line") + "not valid UTF-8",
        at(path, 5, "turns") + "empty",
        at(path, 6, r"turns[0].human") + "missing",
        at(path, 7, "meta_instruction") + "expected a string, got",
        at(path, 8, r"turns[0].human") + "expected a string, got",
        at(path, 9, r"turns[0].moss") + "missing",
        at(path, 11, "line") + f"longer than {MAX_LINE_BYTES} bytes",
        at(path, 12, r"turns[0].mood") + "unknown key",
        at(path, 13, "turns") + "expected a list",
    ]


@case("validate prompts: every bad line reported")
def _(tmp, kit):
    path = jsonl(tmp / "prompts.jsonl",
                 PROMPT,
                 SFT,                                                           # 2 last turn has moss
                 "just text",                                                   # 3 not JSON
                 '"a string"',                                                  # 4 not an object
                 {"turns": [{"human": "a"}, {"human": "b"}]},                   # 5 a middle turn without reply
                 {"chat": {}})                                                  # 6 raw MOSS-003 with no turns
    return ["validate", path, "--kind", "prompts"], [
        at(path, 2, r"turns[0].moss") + "the last turn of a prompt must not have a reply",
        at(path, 3, "line") + "invalid JSON",
        at(path, 4, "record") + "expected a JSON object, got string",
        at(path, 5, r"turns[0].moss") + "missing",
        at(path, 6, "chat") + "empty",
    ]


@case("validate preferences: every bad line reported")
def _(tmp, kit):
    path = jsonl(tmp / "prefs.jsonl",
                 {**PROMPT, "responses": ["a", "b"], "ranks": [0, 1]},
                 {**PROMPT, "responses": ["only one"]},                         # 2 fewer than two responses
                 {**PROMPT, "responses": ["a", "b", "c"], "ranks": [0, 1]},     # 3 ranks of the wrong length
                 {**PROMPT, "responses": ["a", "b", "c"], "ranks": [0, 2, 1]},  # 4 ranks contradict best-first
                 {**PROMPT, "responses": ["a", "b"], "ranks": [1, 1]},          # 5 all tied: no pair
                 {**PROMPT, "responses": ["a", "b"], "chosen": "a", "rejected": "b"},  # 6 both forms
                 {**PROMPT, "responses": "a"},                                  # 7 wrong type
                 {**PROMPT, "responses": ["a", "b"], "ranks": [0, "1"]},       # 8 wrong type
                 {**PROMPT, "chosen": "a"},                                     # 9 chosen without rejected
                 {**SFT, "responses": ["a", "b"]},                              # 10 prompt already answered
                 PROMPT,                                                        # 11 no responses at all
                 {**PROMPT, "chosen": "a", "rejected": "b", "margin": "big"})   # 12 wrong type
    return ["validate", path, "--kind", "preferences"], [
        at(path, 2, "responses") + "needs at least two responses",
        at(path, 3, "ranks") + "has 2 entries but there are 3 responses",
        at(path, 4, "ranks") + r"ranks\[2\]=1 is better than ranks\[1\]=2",
        at(path, 5, "ranks") + "all responses are tied",
        at(path, 6, "responses") + "give either responses or chosen/rejected",
        at(path, 7, "responses") + "expected a list of strings",
        at(path, 8, "ranks[1]") + "expected an int",
        at(path, 9, "rejected") + "missing",
        at(path, 10, r"turns[0].moss") + "the last turn of a prompt must not have a reply",
        at(path, 11, "responses") + "missing",
        at(path, 12, "margin") + "expected a number",
    ]


@case("validate steps: every bad line reported")
def _(tmp, kit):
    def steps(*steps, labels=None, **turn) -> dict:
        return {"turns": [{"human": "What is 2 + 3?", "steps": list(steps),
                           "step_labels": [True] * len(steps) if labels is None else labels, **turn}]}

    path = jsonl(tmp / "steps.jsonl",
                 steps("2 + 3 = 5", "The answer is 5."),
                 SFT,                                                           # 2 a reply, no steps
                 steps("2 + 3 = 5", "The answer is 5.", labels=[True]),        # 3 a label short
                 steps("2 + 3\n= 5", "The answer is 5."),                      # 4 a step holding the separator
                 steps("2 + 3 = 6", labels=["bad"]),                            # 5 wrong type
                 steps("2 + 3 = 5", moss="2 + 3 = 5"),                          # 6 a reply beside the steps
                 steps())                                                       # 7 no step
    return ["validate", path, "--kind", "steps"], [
        at(path, 2, r"turns[0].steps") + "missing",
        at(path, 3, r"turns[0].step_labels") + "has 1 labels but there are 2 steps",
        at(path, 4, r"turns[0].steps[0]") + "contains the step separator",
        at(path, 5, r"turns[0].step_labels[0]") + "expected true or false, got string",
        at(path, 6, r"turns[0].moss") + "not allowed beside steps",
        at(path, 7, r"turns[0].steps") + "empty",
    ]


@case("validate steps: TRL's stepwise records")
def _(tmp, kit):
    trl = jsonl(tmp / "trl.jsonl",
                {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5"], "labels": [True]},
                {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5", "5\n"], "labels": [True, True]},
                {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5"], "labels": [1]})
    return ["validate", trl, "--kind", "steps", "--data-format", "trl"], [
        at(trl, 2, r"completions[1]") + "contains the step separator",
        at(trl, 3, r"labels[0]") + "expected true or false, got int",
    ]


@case("validate steps: Math-Shepherd records")
def _(tmp, kit):
    path = jsonl(tmp / "shepherd.jsonl",
                 {"input": "2 + 3? Step 1: 2 + 3 = 5 ки", "label": "2 + 3? Step 1: 2 + 3 = 5 +", "task": "GSM8K"},
                 {"input": "2 + 3? Step 1: 2 + 3 = 5 ки", "label": "2 + 3? Step 1: 2 + 3 = 5 ки"},  # 2 tag kept
                 {"input": "2 + 3: 2 + 3 = 5 ки", "label": "2 + 3: 2 + 3 = 5 -"})  # 3 no question to tell
    return ["validate", path, "--kind", "steps", "--data-format", "math-shepherd"], [
        at(path, 2, "label") + r"\d+ characters, but input with each of its 1 step tags as one \+ or - would be",
        at(path, 3, "input") + "cannot tell the question from the first step",
    ]


@case("validate: empty file")
def _(tmp, kit):
    path = tmp / "empty.jsonl"
    path.write_bytes(b"")
    return ["validate", path, "--kind", "sft"], [at(path, 0, "file") + "no records; the file is empty"]


@case("validate: only blank lines")
def _(tmp, kit):
    path = jsonl(tmp / "blank.jsonl", "", "   ", "\t")
    return ["validate", path, "--kind", "prompts"], [at(path, 0, "file") + "no records"]


@case("validate: truncated file (cut mid-record, no final newline)")
def _(tmp, kit):
    path = tmp / "cut.jsonl"
    path.write_text(json.dumps(SFT) + "\n" + json.dumps(SFT)[:20], encoding="utf-8")
    return ["validate", path, "--kind", "sft"], [at(path, 2, "line") + "invalid JSON.*truncated"]


@case("validate: UTF-16 file")
def _(tmp, kit):
    path = tmp / "utf16.jsonl"
    path.write_text((json.dumps(SFT) + "\n") * 3, encoding="utf-16")
    return ["validate", path, "--kind", "sft"], [at(path, 0, "file") + "UTF-16.*save it as UTF-8"]


@case("validate: gzip file")
def _(tmp, kit):
    import gzip
    path = tmp / "sft.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(SFT) + "\n").encode() * 50))
    return ["validate", path, "--kind", "sft"], [at(path, 0, "file") + "gzip-compressed"]


@case("validate: a binary file (model weights given as data)")
def _(tmp, kit):
    path = Path(kit["base"]) / "model.safetensors"
    return ["validate", path, "--kind", "sft"], [at(path, 0, "file") + "binary"]


@case("validate: missing file")
def _(tmp, kit):
    path = tmp / "nope.jsonl"
    return ["validate", path, "--kind", "sft"], [at(path, 0, "file") + "cannot open: No such file"]


@case("validate: a directory where a file is expected")
def _(tmp, kit):
    return ["validate", tmp, "--kind", "sft"], [at(tmp, 0, "file") + "cannot open: Is a directory"]


# --- configs: refused before any model or data is touched -----------------------------------------------


def _yaml(tmp: Path, text: str) -> Path:
    path = tmp / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@case("config: wrong type")
def _(tmp, kit):
    config = _yaml(tmp, "train:\n  epochs: many\n")
    argv = train("sft", kit, tmp)
    argv[2] = config
    return argv, [re.escape(f"rlhf sft: {config}: train.epochs: ") + ".*'many'"]


@case("config: unknown key")
def _(tmp, kit):
    config = _yaml(tmp, "train:\n  epoch: 3\n")
    argv = train("rm", kit, tmp)
    argv[2] = config
    return argv, [re.escape(f"rlhf rm: {config}: train.epoch: ") + ".*not in 'TrainConfig'"]


@case("config: a section that is not a mapping")
def _(tmp, kit):
    config = _yaml(tmp, "train: 5\n")
    argv = train("sft", kit, tmp)
    argv[2] = config
    return argv, [re.escape(f"rlhf sft: {config}: ")]


@case("config: --set of an unknown key")
def _(tmp, kit):
    return train("ppo", kit, tmp, extra=("--set", "ppo.iteratons=3")), [
        re.escape("rlhf ppo: --set ppo.iteratons: unknown config key; did you mean ppo.iterations?")]


@case("config: --set with a wrong type")
def _(tmp, kit):
    return train("sft", kit, tmp, extra=("--set", "train.global_batch_size=lots")), [
        r"rlhf sft: .*train\.global_batch_size: Value 'lots'"]


@case("config: --set without =")
def _(tmp, kit):
    return train("sft", kit, tmp, extra=("--set", "train.epochs")), [
        re.escape("rlhf sft: --set train.epochs: expected key.path=value")]


@case("config: an impossible value (batch not a multiple of the ranks)")
def _(tmp, kit):
    return train("sft", kit, tmp, extra=("--set", "train.global_batch_size=7")), [
        re.escape("rlhf sft: train.global_batch_size: 7 is not a multiple")]


@case("config: missing file")
def _(tmp, kit):
    argv = train("sft", kit, tmp)
    argv[2] = tmp / "nope.yaml"
    return argv, [re.escape(f"rlhf sft: {tmp / 'nope.yaml'}: config file does not exist")]



@case("config: YAML that does not parse")
def _(tmp, kit):
    config = _yaml(tmp, "train: [epochs: 1\n")
    argv = train("sft", kit, tmp)
    argv[2] = config
    return argv, [re.escape(f"rlhf sft: {config}: ")]


@case("config: a list, not a mapping")
def _(tmp, kit):
    config = _yaml(tmp, "- 1\n- 2\n")
    argv = train("sft", kit, tmp)
    argv[2] = config
    return argv, [re.escape(f"rlhf sft: {config}: ")]


@case("config: a directory where a file is expected")
def _(tmp, kit):
    argv = train("sft", kit, tmp)
    argv[2] = tmp
    return argv, [re.escape(f"rlhf sft: {tmp}: ")]




# --- models and tokenizers: checked before Ray starts ---------------------------------------------------


@case("sft: model path does not exist (tokenizer given apart)")
def _(tmp, kit):
    # With model.tokenizer set, only a check of the model itself can catch the typo before Ray starts.
    return train("sft", kit, tmp, model=str(tmp / "no-model"), extra=("--set", f"model.tokenizer={kit['tokenizer']}")), [
        re.escape(f"rlhf sft: --model path '{tmp / 'no-model'}' does not exist")]


@case("sft: a mistyped relative path shaped like a hub id (org/name) is named, not sent to the hub")
def _(tmp, kit):
    # `tests` is a local directory, so `tests/no-such-model` is a path: no hub lookup, no retries.
    return train("sft", kit, tmp, model="tests/no-such-model"), [
        re.escape("rlhf sft: --model path 'tests/no-such-model' does not exist (tests/ has ")]


@case("rm: model path does not exist")
def _(tmp, kit):
    return train("rm", kit, tmp, model=str(tmp / "no-model")), [
        re.escape(f"rlhf rm: --model path '{tmp / 'no-model'}' does not exist")]


@case("ppo: policy path does not exist")
def _(tmp, kit):
    return train("ppo", kit, tmp, model=str(tmp / "no-policy")), [
        re.escape(f"rlhf ppo: --policy path '{tmp / 'no-policy'}' does not exist")]


@case("ppo: a causal LM without a reward head as --reward")
def _(tmp, kit):
    argv = train("ppo", kit, tmp)
    argv[argv.index("--reward") + 1] = kit["base"]
    return argv, [re.escape(f"rlhf ppo: --reward '{kit['base']}' is not a reward model: config.json names "
                            "CodeGenForCausalLM and there is no value_head.safetensors")]


@case("ppo: a model without prm.json as --process-reward")
def _(tmp, kit):
    return train("ppo", kit, tmp, extra=("--process-reward", kit["base"])), [
        re.escape(f"rlhf ppo: --process-reward '{kit['base']}' is not a process reward model: it has no prm.json; "
                  "pass `rlhf prm`'s final/")]


@case("ppo: a process reward weight below 0")
def _(tmp, kit):
    return train("ppo", kit, tmp, extra=("--set", "ppo.process_reward_weight=-1")), [
        re.escape("rlhf ppo: ppo.process_reward_weight: must be >= 0, got -1")]


@case("rm-eval: a causal LM without a reward head")
def _(tmp, kit):
    return ["rm-eval", "--model", kit["base"], "--data", kit["prefs_eval"]], [
        re.escape(f"rlhf rm-eval: --model '{kit['base']}' is not a reward model")]


@case("ppo: reward path does not exist")
def _(tmp, kit):
    argv = train("ppo", kit, tmp)
    argv[argv.index("--reward") + 1] = tmp / "no-reward"
    return argv, [re.escape(f"rlhf ppo: --reward path '{tmp / 'no-reward'}' does not exist")]


@case("generate: model path does not exist")
def _(tmp, kit):
    return ["generate", "--model", tmp / "no-model", "--prompts", kit["prompts_eval"], "--out", tmp / "out"], [
        re.escape(f"rlhf generate: --model path '{tmp / 'no-model'}' does not exist")]


def best_of(tmp: Path, kit: dict, *flags) -> list:
    """argv of `rlhf generate` whose model and prompts are good, with these best-of flags."""
    return ["generate", "--model", kit["base"], "--prompts", kit["prompts_eval"], "--out", tmp / "out", *flags]


@case("generate: --scorer path does not exist")
def _(tmp, kit):
    return best_of(tmp, kit, "--best-of", "2", "--scorer", tmp / "no-scorer"), [
        re.escape(f"rlhf generate: --scorer path '{tmp / 'no-scorer'}' does not exist")]


@case("generate: a causal LM without a reward head as --scorer")
def _(tmp, kit):
    return best_of(tmp, kit, "--best-of", "2", "--scorer", kit["base"]), [
        re.escape(f"rlhf generate: --scorer '{kit['base']}' is not a reward model: config.json names "
                  "CodeGenForCausalLM and there is no value_head.safetensors")]


@case("generate: --best-of 0")
def _(tmp, kit):
    return best_of(tmp, kit, "--best-of", "0", "--scorer", kit["reward"]), [
        re.escape("rlhf generate: --best-of 0: give the number of replies to sample per prompt, 1 or more")]


@case("generate: --scorer without --best-of")
def _(tmp, kit):
    return best_of(tmp, kit, "--scorer", kit["reward"]), [re.escape("rlhf generate: --scorer ranks sampled replies; "
                                                                    "give --best-of N too")]


@case("generate: --best-of 4 without --scorer")
def _(tmp, kit):
    return best_of(tmp, kit, "--best-of", "4"), [re.escape("rlhf generate: --best-of 4 needs --scorer DIR")]


@case("rm-eval: model path does not exist")
def _(tmp, kit):
    return ["rm-eval", "--model", tmp / "no-model", "--data", kit["prefs_eval"]], [
        re.escape(f"rlhf rm-eval: --model path '{tmp / 'no-model'}' does not exist")]


@case("sft: a file where the model directory is expected")
def _(tmp, kit):
    weights = f"{kit['base']}/model.safetensors"
    return train("sft", kit, tmp, model=weights), [re.escape(f"rlhf sft: --model '{weights}' is a file")]


@case("sft: a directory that is not a model")
def _(tmp, kit):
    return train("sft", kit, tmp, model=str(Path(kit["sft_train"]).parent)), [
        re.escape("rlhf sft: --model ") + ".* has no config.json"]


@case("generate: model with only pickled weights")
def _(tmp, kit):
    return ["generate", "--model", kit["pickle_model"], "--prompts", kit["prompts_eval"], "--out", tmp / "out"], [
        re.escape("rlhf generate: --model ") + ".*only pickled weights \\(pytorch_model.bin\\).*safetensors"]


@case("sft: model with only pickled weights")
def _(tmp, kit):
    return train("sft", kit, tmp, model=kit["pickle_model"]), [
        re.escape("rlhf sft: --model ") + ".*only pickled weights \\(pytorch_model.bin\\)"]


@case("rm-eval: model with only pickled weights")
def _(tmp, kit):
    return ["rm-eval", "--model", kit["pickle_model"], "--data", kit["prefs_eval"]], [
        re.escape("rlhf rm-eval: --model ") + ".*only pickled weights"]


@case("sft: tokenizer without the MOSS special tokens")
def _(tmp, kit):
    return train("sft", kit, tmp, extra=("--set", f"model.tokenizer={kit['no_moss_tok']}")), [
        re.escape(f"rlhf sft: tokenizer '{kit['no_moss_tok']}' lacks the MOSS special tokens <eoh> <eom>")]


@case("init-model: tokenizer without the MOSS special tokens")
def _(tmp, kit):
    return ["init-model", "--tokenizer", kit["no_moss_tok"], "--out", tmp / "out"], [
        re.escape(f"rlhf init-model: tokenizer '{kit['no_moss_tok']}' lacks the MOSS special tokens")]


# --- bad data given to the commands that would train on it ----------------------------------------------


@case("sft: bad lines in the training file")
def _(tmp, kit):
    path = jsonl(tmp / "sft.jsonl", SFT, {"turns": []}, {"turns": [{"human": "Hi"}]})
    return train("sft", kit, tmp, data=path), [at(path, 2, "turns") + "empty", at(path, 3, "turns[0].moss")]


@case("prm: a step that holds the step separator, and a missing label")
def _(tmp, kit):
    good = {"turns": [{"human": "What is 2 + 3?", "steps": ["2 + 3 = 5", "The answer is 5."],
                       "step_labels": [True, True]}]}
    short = {"turns": [{"human": "What is 1 + 1?", "steps": ["1 + 1 = 2", "So 2."], "step_labels": [True]}]}
    path = jsonl(tmp / "steps.jsonl", good, short)
    sep = jsonl(tmp / "eval.jsonl", good)
    return train("prm", kit, tmp, data=path, extra=("--set", f"data.eval={sep}", "--set", "prm.step_separator=+")), [
        at(path, 1, "turns[0].steps[0]") + "contains the step separator '\\+'",
        at(path, 2, "turns[0].step_labels") + "has 1 labels but there are 2 steps"]


@case("prm-eval: a preference file given as steps")
def _(tmp, kit):
    path = jsonl(tmp / "prefs.jsonl", {**PROMPT, "responses": ["a", "b"]})
    return ["prm-eval", "--model", kit["reward"], "--data", path], [at(path, 1, "turns[1].steps") + "missing"]


@case("sft: bad held-out file")
def _(tmp, kit):
    path = jsonl(tmp / "eval.jsonl", PROMPT)
    return train("sft", kit, tmp, extra=("--set", f"data.eval={path}")), [at(path, 1, "turns[1].moss") + "missing"]


@case("sft: a directory given as data")
def _(tmp, kit):
    return train("sft", kit, tmp, data=tmp), [at(tmp, 0, "file") + "cannot open: Is a directory"]


@case("ppo: a causal LM as the critic's start")
def _(tmp, kit):
    return train("ppo", kit, tmp, extra=("--set", f"roles.critic.model={kit['base']}")), [
        re.escape(f"rlhf ppo: roles.critic.model '{kit['base']}' is not a reward model")]


@case("ppo: a prompts file that does not exist")
def _(tmp, kit):
    path = tmp / "prompts.jsonl"
    return train("ppo", kit, tmp, data=path), [at(path, 0, "file") + re.escape("does not exist (--prompts)")]


def sweep(tmp: Path, command: str = "rm", **args) -> list:
    """argv of `rlhf sweep` over a grid of two learning rates, its sweep file written with these args."""
    spec = tmp / "sweep.yaml"
    spec.write_text(json.dumps({"command": command, "base_config": f"configs/tiny/{command}.yaml",
                                "args": {k: str(v) for k, v in args.items()},
                                "search": {"optim.lr": {"type": "grid", "values": [1e-4, 1e-3]}},
                                "metric": "eval/loss", "mode": "min"}))
    return ["sweep", "--config", spec, "--output", tmp / "out"]


@case("sweep: a data file that does not exist (checked before Tune starts)")
def _(tmp, kit):
    path = tmp / "prefs.jsonl"
    return sweep(tmp, model=kit["base"], data=path), [at(path, 0, "file") + re.escape("does not exist (--data)")]


@case("sweep: a model that is not a reward model given as ppo's reward")
def _(tmp, kit):
    return sweep(tmp, "ppo", policy=kit["base"], reward=kit["base"], prompts=kit["prompts_train"]), [
        re.escape(f"rlhf sweep: --reward '{kit['base']}' is not a reward model")]


@case("sweep: an argument the command does not take")
def _(tmp, kit):
    return sweep(tmp, model=kit["base"], data=kit["prefs_train"], prompts=kit["prompts_train"]), [
        re.escape(f"rlhf sweep: {tmp / 'sweep.yaml'}: args.prompts: not a flag of rlhf rm (it takes model, data)")]


@case("sweep: a searched value the config refuses")
def _(tmp, kit):
    argv = sweep(tmp, model=kit["base"], data=kit["prefs_train"])
    spec = json.loads(Path(argv[2]).read_text())
    spec["search"] = {"optim.schedule": {"type": "grid", "values": ["cosine", "linear"]}}
    Path(argv[2]).write_text(json.dumps(spec))
    return argv, [re.escape(f"rlhf sweep: {argv[2]}: search.optim.schedule: 'linear' is not one of constant, "
                            "cosine (value 'linear')")]


@case("rm: ranks that contradict the best-first order")
def _(tmp, kit):
    good = json.loads(Path(kit["prefs_train"]).read_text(encoding="utf-8").splitlines()[0])
    listed = {k: v for k, v in good.items() if k not in ("chosen", "rejected", "rule_scores")}
    path = jsonl(tmp / "prefs.jsonl", good, {**listed, "responses": ["a", "b", "c"], "ranks": [1, 0, 2]})
    return train("rm", kit, tmp, data=path), [at(path, 2, "ranks") + r"ranks\[1\]=0 is better than ranks\[0\]=1"]


@case("ppo: prompts whose last turn already has a reply")
def _(tmp, kit):
    path = jsonl(tmp / "prompts.jsonl", PROMPT, SFT)
    return train("ppo", kit, tmp, data=path), [at(path, 2, "turns[0].moss") + "the last turn of a prompt"]


@case("ppo: too few prompts for one iteration")
def _(tmp, kit):
    path = jsonl(tmp / "prompts.jsonl", PROMPT)
    return train("ppo", kit, tmp, data=path), [re.escape(f"rlhf ppo: {path}: 1 prompts is fewer than")]


@case("generate: bad prompt lines")
def _(tmp, kit):
    path = jsonl(tmp / "prompts.jsonl", PROMPT, {"turns": [{"human": 1}]})
    return ["generate", "--model", kit["base"], "--prompts", path, "--out", tmp / "out"], [
        at(path, 2, "turns[0].human") + "expected a string"]


@case("rm-eval: bad preference file")
def _(tmp, kit):
    path = jsonl(tmp / "prefs.jsonl", {**PROMPT, "responses": ["a", "b"], "ranks": [0, 0]})
    return ["rm-eval", "--model", kit["reward"], "--data", path], [at(path, 1, "ranks") + "all responses are tied"]


@case("tokenizer: bad training data")
def _(tmp, kit):
    path = jsonl(tmp / "data.jsonl", SFT, "{not json")
    return ["tokenizer", "--data", path, "--vocab-size", "600", "--out", tmp / "out"], [
        at(path, 2, "line") + "invalid JSON"]


IN_A_FRESH_PROCESS = ("validate sft: every bad line reported", "sft: bad lines in the training file",
                      "ppo: a causal LM as the critic's start", "sweep: a data file that does not exist (checked "
                      "before Tune starts)")
"""One case of each kind of command, run as `python -m rlhf` in a process of its own."""


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_per_error_and_nothing_starts(name, kit, tmp_path, capfd, monkeypatch):
    argv, expected = CASES[name](tmp_path, kit)
    result = rlhf(*argv) if name in IN_A_FRESH_PROCESS else rlhf_here(argv, capfd, monkeypatch)
    both = result.stdout + result.stderr
    assert result.returncode not in (0, None), both
    assert "Traceback" not in both, both
    for started in ("Started a local Ray instance", "Connecting to existing Ray cluster", "pid="):
        assert started not in both, both
    # Nothing but our errors: no library chatter either (DeepSpeed is only imported in workers, after the checks).
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == len(expected), both
    for line, pattern in zip(lines, expected):
        assert re.match(pattern, line), f"{line!r} does not match {pattern!r}"
    assert result.stdout.strip() == "", both
    assert not (tmp_path / "out").exists(), "a refused command must write nothing"
    assert not kit["sentinel"].exists(), "a pickle was unpickled"


def test_trust_remote_code_is_off_unless_a_config_turns_it_on():
    from rlhf.config import CONFIGS, load_config
    for command, schema in CONFIGS.items():
        assert schema().model.trust_remote_code is False
        assert load_config(command, str(ROOT / "configs" / "tiny" / f"{command}.yaml")).model.trust_remote_code is False


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every call of `name` in text (parentheses matched)."""
    found = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, end = 1, match.end()
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        found.append(text[match.end():end - 1])
    return found


def test_no_code_loads_a_pickle_or_remote_code_on_its_own():
    # Models load from safetensors only; torch files (RNG state) are read with weights_only=True.
    for path in [*ROOT.glob("rlhf/*.py"), *ROOT.glob("reward/*.py"), *ROOT.glob("actors/*.py")]:
        text = path.read_text(encoding="utf-8")
        for args in _calls(text, "torch.load"):
            assert "weights_only=True" in args, f"{path.name}: torch.load({args})"
        for args in _calls(text, "AutoModelForCausalLM.from_pretrained"):
            assert "use_safetensors=True" in args, f"{path.name}: from_pretrained({args})"
        assert not re.search(r"\bpickle\.loads?\(", text), path.name
        assert "trust_remote_code=True" not in text, path.name


def test_the_fresh_process_cases_exist():
    assert set(IN_A_FRESH_PROCESS) <= set(CASES)
