"""The `rlhf` command line (also `python -m rlhf`): DESIGN.md's command table, one subcommand each.

Imports are deferred to the subcommand that needs them so `rlhf validate` and `rlhf --help` start fast, and so
every user error ends as one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _config(args: argparse.Namespace, command: str):
    from rlhf.config import load_config
    return load_config(command, getattr(args, "config", None), getattr(args, "set", None) or [])


def _data_format_arg(p: argparse.ArgumentParser) -> None:
    from rlhf.formats import FORMATS
    p.add_argument("--data-format", choices=FORMATS, default=None,
                   help="format of the data files (default: data.format of the config, auto: detected per file)")


def _train_args(p: argparse.ArgumentParser) -> None:
    _data_format_arg(p)
    p.add_argument("--config", help="YAML config (configs/tiny/*.yaml for this machine)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the output's last complete checkpoint")


def cmd_tokenizer(args) -> int:
    from rlhf.tokenizer import run_tokenizer
    return run_tokenizer(args.data, args.vocab_size, args.out, args.data_format or "auto")


def cmd_init_model(args) -> int:
    from rlhf.modeling import run_init_model
    return run_init_model(args.arch, args.preset, args.tokenizer, args.out, args.seed)


def cmd_sample(args) -> int:
    from rlhf.sample import run_sample
    return run_sample(args.out, args.seed)


def cmd_validate(args) -> int:
    from rlhf.data import validate
    return validate(args.file, args.kind, args.data_format or "auto")


def cmd_convert(args) -> int:
    """Another format's data file, or a moss-moon-003 checkpoint, into this project's."""
    if args.source_format == "moss-checkpoint":
        from rlhf.moss_checkpoint import convert_moss_checkpoint
        print(f"convert: {args.input} -> {convert_moss_checkpoint(args.input, args.out)} (native CodeGen, safetensors)")
        return 0
    from rlhf.formats import convert
    count = convert(args.input, args.out, args.source_format, args.kind)
    print(f"convert: {count} records of {args.input} ({args.source_format}) -> {args.out}")
    return 0


def cmd_render(args) -> int:
    """One JSON line per record: the exact text the model sees and the character spans it trains on (a preference
    gives one such pair per response, best first; a solution in steps its steps joined as the reply, with its
    labels)."""
    from rlhf.data import load_records, write_jsonl
    from rlhf.moss import render, trained_spans

    def rendered(d) -> dict:
        return {"text": render(d, args.plugin), "trained": trained_spans(d, args.plugin)}

    records = load_records(args.file, args.kind, args.data_format or "auto")
    if args.kind == "preferences":
        lines = [{**p.metadata, "responses": [rendered(p.prompt.with_reply(r)) for r in p.responses],
                  "ranks": p.ranks} for p in records]
    elif args.kind == "steps":
        lines = [{**s.metadata, **rendered(s.dialogue()), "labels": s.labels} for s in records]
    else:
        lines = [{**d.metadata, **rendered(d)} for d in records]
    write_jsonl(args.out, lines)
    print(f"render: {len(lines)} records of {args.file} -> {args.out}")
    return 0


def _check_output(output: str, uri_ok: bool = True) -> None:
    """An --output URI that cannot be used (unknown scheme, a store that does not answer, no such bucket) fails here,
    in one line, before a model loads."""
    from rlhf import storage
    if not uri_ok and storage.is_uri(output):
        raise SystemExit(f"--output {storage.display(output)}: this command writes a local directory; give a path "
                         "(sft, rm, dpo, ppo and sweep take object-store URIs)")
    storage.check(output)


def cmd_train(args) -> int:
    """`rlhf sft`, `rlhf rm`, `rlhf dpo`, `rlhf ppo`: the flags fill the config's keys (the command's record in
    rlhf.commands), its inputs are checked, then its driver runs."""
    from rlhf.commands import COMMANDS
    _check_output(args.output)
    command = COMMANDS[args.command]
    cfg = command.fill(_config(args, args.command), vars(args))
    cfg.data.format = args.data_format or cfg.data.format
    command.check_inputs(cfg)
    summary = command.run()(cfg, args.output, args.resume)
    print(_summary_line(args.command, summary))
    return 0


def cmd_rm_eval(args) -> int:
    cfg = _config(args, "rm")
    cfg.data.format = args.data_format or cfg.data.format
    from rlhf.commands import check_model
    check_model(args.model, "--model", "reward")
    from rlhf.drivers.rm import run_rm_eval
    return run_rm_eval(args.model, args.data, cfg)


def cmd_prm_eval(args) -> int:
    cfg = _config(args, "prm")
    cfg.data.format = args.data_format or cfg.data.format
    from rlhf.commands import check_model
    check_model(args.model, "--model", "reward")
    from rlhf.drivers.prm import run_prm_eval
    return run_prm_eval(args.model, args.data, cfg)


def cmd_rm_strength(args) -> int:
    """An ensemble of preference models on Ray; each pair's preference strength into OUTPUT/strength.jsonl."""
    _check_output(args.output, uri_ok=False)
    cfg = _config(args, "rm")
    cfg.data.format = args.data_format or cfg.data.format
    cfg.model.path, cfg.data.train = args.model, args.data
    from rlhf.commands import check_model
    check_model(args.model, "--model")
    from rlhf.drivers.strength import run_strength
    summary = run_strength(cfg, args.output, args.resume)
    print(f"rm-strength: done; {summary['negative']} of {summary['pairs']} pairs ({summary['negative_share']:.1%}) "
          f"have a negative mean strength over {summary['members']} reward models; {args.output}/strength.jsonl, "
          f"{args.output}/strength.png")
    return 0


def cmd_generate(args) -> int:
    from rlhf.commands import check_model
    check_model(args.model, "--model", "causal_lm")
    from rlhf.drivers.generate import run_generate
    overrides = (args.set or []) + ([f"data.format={args.data_format}"] if args.data_format else [])
    return run_generate(args.model, args.prompts, args.out, args.config, overrides, args.best_of, args.scorer or "")


def cmd_chat(args) -> int:
    from rlhf.commands import check_model
    check_model(args.model, "--model", "causal_lm")
    from rlhf.drivers.chat import run_chat
    meta = args.meta_instruction.replace("\\n", "\n") if args.meta_instruction is not None else None
    return run_chat(args.model, args.config, args.set or [], args.plugin, meta)


def cmd_config(args) -> int:
    from rlhf.config_docs import run_config
    return run_config(args.name, args.config, args.set or [])


def cmd_sweep(args) -> int:
    _check_output(args.output)
    from rlhf.drivers.sweep import run_sweep
    return run_sweep(args.config, args.set or [], args.resume, args.output)


def cmd_pipeline(args) -> int:
    _check_output(args.output, uri_ok=False)
    from rlhf.drivers.pipeline import run_pipeline
    return run_pipeline(args.config, args.output, args.set or [], args.resume)


def _summary_line(name: str, summary: dict) -> str:
    parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()]
    return f"{name}: done; " + ", ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF for MOSS-style chat models on Ray: "
                                     "SFT, a preference model from ranked responses, and PPO.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    p = add("tokenizer", cmd_tokenizer, "train a byte-level BPE with the MOSS special tokens")
    p.add_argument("--data", nargs="+", required=True, help="data files (dialogues, prompts or preferences)")
    p.add_argument("--vocab-size", type=int, default=2000, help="tokens in the vocabulary, the MOSS tokens included "
                   "(default 2000; the demo uses 800)")
    p.add_argument("--out", required=True, help="directory the tokenizer is saved to (loads with AutoTokenizer)")
    _data_format_arg(p)

    p = add("init-model", cmd_init_model, "write a randomly initialised model in HF format")
    from rlhf.modeling import PRESETS
    p.add_argument("--arch", choices=sorted(PRESETS), default="codegen", help="codegen is moss-moon-003's")
    p.add_argument("--preset", choices=["tiny", "tiny32", "small", "medium"], default="tiny",
                   help="tiny: a minute of SFT on 2 cores; tiny32: tiny with attention heads of 32 (what vLLM's CPU "
                        "build serves); small; medium: ~30M parameters")
    p.add_argument("--tokenizer", required=True, help="the tokenizer directory (rlhf tokenizer's --out); its "
                   "vocabulary sizes the embeddings and it is saved beside the model")
    p.add_argument("--out", required=True, help="directory the model is written to (config.json, model.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")

    p = add("sample", cmd_sample, "write the bundled synthetic MOSS task (SFT, prompts, ranked preferences, "
            "labelled steps)")
    p.add_argument("--out", required=True, help="directory for sft_train/sft_eval, prompts_train/prompts_eval, "
                   "prefs_train/prefs_eval and the plugin and step-by-step tasks' .jsonl files")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated task (default 0)")

    from rlhf.records import KINDS
    what = "sft dialogues, PPO prompts, ranked preferences or solutions in labelled steps"
    p = add("validate", cmd_validate, "check a data file; every bad line reported as PATH:LINE: FIELD: problem")
    p.add_argument("file", help="the data file (JSONL, JSON, Parquet) or a save_to_disk directory")
    p.add_argument("--kind", choices=KINDS, required=True, help=f"what the file holds: {what}")
    _data_format_arg(p)

    from rlhf.formats import FORMATS
    p = add("convert", cmd_convert, "another format's data file (or a moss-moon-003 checkpoint) into this project's")
    p.add_argument("--from", dest="source_format", required=True, choices=[*FORMATS, "moss-checkpoint"],
                   help="the input's format; moss-checkpoint: a MossForCausalLM directory (.bin shards or safetensors) "
                        "to native CodeGen safetensors")
    p.add_argument("input", help="data file (JSONL, JSON, Parquet) or save_to_disk directory; or a checkpoint")
    p.add_argument("--out", required=True, help="JSONL in this project's schema; or the model directory")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="what to read the records as (default: what they are)")

    p = add("render", cmd_render, "write the exact text the model sees per record, with the spans it trains on")
    p.add_argument("file", help="the data file (JSONL, JSON, Parquet) or a save_to_disk directory")
    p.add_argument("--kind", choices=KINDS, required=True, help=f"what the file holds: {what}")
    p.add_argument("--plugin", action="store_true", help="the MOSS-003-plugin style (as data.plugin: true)")
    _data_format_arg(p)
    p.add_argument("--out", required=True, help="JSONL: {\"text\", \"trained\": [[start, end], ...]} per record")

    from rlhf.commands import COMMANDS
    for command in COMMANDS.values():
        p = add(command.name, cmd_train, command.help)
        for flag in command.flags:
            p.add_argument(flag.name, required=flag.required, default="", help=flag.help)
        p.add_argument("--output", required=True, help="the run's directory, or an object-store URI (s3://, gs://): "
                       "checkpoints/, final/, metrics.jsonl, config.yaml")
        _train_args(p)

    p = add("rm-eval", cmd_rm_eval, "print pairwise_accuracy, pairs and mean_margin of a preference model as JSON")
    p.add_argument("--model", required=True, help="the preference model (rlhf rm's final/, or a sequence classifier)")
    p.add_argument("--data", required=True, help="held-out ranked preferences, as `rlhf rm` reads them")
    p.add_argument("--config", help="an rm config whose data and model sections apply (default: the defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    _data_format_arg(p)

    p = add("prm-eval", cmd_prm_eval, "print step_accuracy, first_error_accuracy and steps of a process reward "
            "model as JSON")
    p.add_argument("--model", required=True, help="the process reward model (rlhf prm's final/)")
    p.add_argument("--data", required=True, help="held-out solutions in labelled steps, as `rlhf prm` reads them")
    p.add_argument("--config", help="a prm config whose data, model and prm sections apply (default: the defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    _data_format_arg(p)

    p = add("rm-strength", cmd_rm_strength, "train rm.ensemble.members preference models side by side on Ray and "
            "write each pair's preference strength (mean, std of r_better - r_worse)")
    p.add_argument("--model", required=True, help="the model each member starts from (as for rlhf rm)")
    p.add_argument("--data", required=True, help="ranked preferences, as `rlhf rm` reads them")
    p.add_argument("--output", required=True, help="member-K/ runs, strength.jsonl, strength.json, strength.png")
    _train_args(p)

    p = add("generate", cmd_generate, "write one reply per prompt (MOSS sampling defaults; --best-of N --scorer DIR: "
            "the best of N by a preference model)")
    p.add_argument("--model", required=True, help="the chat model: a directory (a run's final/) or a hub id")
    p.add_argument("--prompts", required=True, help="MOSS prompts (dialogues ending in a human turn)")
    p.add_argument("--out", required=True, help="JSONL: each prompt's record with its reply (`response`); with "
                   "--best-of also its `score` and `candidates`, each sample's {response, score} in the order drawn")
    p.add_argument("--best-of", type=int, metavar="N", help="sample N replies per prompt and keep the one --scorer "
                   "ranks highest; the first k samples are the same for any N >= k, and --best-of 1 is the plain reply")
    p.add_argument("--scorer", metavar="DIR", help="what ranks best-of-N's replies: a preference model (rlhf rm's "
                   "final/, or a *ForSequenceClassification with one label), reading each whole dialogue with its own "
                   "tokenizer at the reply's <eom>, as rlhf rm-eval does")
    p.add_argument("--config", help="a config whose generation, data, model and plugins sections apply (e.g. "
                   "configs/tiny/generate.yaml); other sections are ignored with a line")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. "
                   "generation.temperature=1.0 (repeatable)")
    _data_format_arg(p)

    p = add("chat", cmd_chat, "talk to a model in the terminal, in the MOSS format (MOSS sampling defaults)")
    p.add_argument("--model", required=True, help="the chat model: a directory (a run's final/) or a hub id")
    p.add_argument("--plugin", action=argparse.BooleanOptionalAction, default=None,
                   help="a plugin model, which thinks and calls tools (default: as the run's config.yaml beside the "
                        "model says)")
    p.add_argument("--meta-instruction", default=None, help="the system text before the turns (\\n for newlines; "
                   "default: MOSS-003's, with the offered tools for a plugin model)")
    p.add_argument("--config", help="a config whose generation, model and plugins sections apply (as rlhf generate)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. "
                   "generation.temperature=1.0 (repeatable)")

    from rlhf.config import CONFIGS
    p = add("config", cmd_config, "print a command's resolved config as YAML, each key under its documentation")
    p.add_argument("name", choices=list(CONFIGS), metavar="COMMAND", help=f"whose config: {', '.join(CONFIGS)}")
    p.add_argument("--config", help="a YAML config to resolve over the defaults")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")

    p = add("sweep", cmd_sweep, "a Ray Tune sweep over any training command's config")
    p.add_argument("--config", required=True, help="the sweep file: command, args, search, metric, scheduler "
                   "(docs/sweeps.md, configs/sweeps/)")
    p.add_argument("--output", default="runs/sweep", help="directory (or object-store URI) for Tune's experiment "
                   "tune/, summary.tsv and best_config.yaml (default runs/sweep)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a key of the sweep file (num_samples=8), "
                   "or else an override of the base config (ppo.iterations=20); repeatable")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --output (unfinished and failed "
                   "trials go on from their last checkpoints)")

    p = add("pipeline", cmd_pipeline, "sample data -> tokenizer -> model -> SFT -> RM -> PPO -> report")
    p.add_argument("--config", required=True, help="the pipeline file: data, model, stages and their configs, "
                   "overrides (configs/tiny/pipeline.yaml)")
    p.add_argument("--output", required=True, help="directory for each stage's run, the generations and report.md")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the pipeline file, e.g. "
                   "overrides.ppo=[ppo.iterations=5] (repeatable)")
    p.add_argument("--resume", action="store_true", help="skip finished stages and resume an interrupted one from "
                   "its last checkpoint")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from rlhf.config import ConfigError
    from rlhf.data import DataFileError
    from rlhf.preemption import Preempted
    try:
        return int(args.fn(args) or 0)
    except Preempted as err:  # a clean stop: the scheduler asked, the checkpoint is written
        print(str(err), flush=True)
        return 0
    except DataFileError as err:
        for line in err.lines():
            print(line, file=sys.stderr)
        return 1
    except SystemExit as err:  # a trainer refusing its input says why in one line
        if isinstance(err.code, str):
            print(f"rlhf {args.command}: {err.code}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted; rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, ConfigError) or isinstance(err, _user_errors()):
            print(f"rlhf {args.command}: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        if type(err).__module__.startswith("ray."):  # a rank or task died past what the command recovers from
            cause = getattr(err, "cause", None) or err  # a task's own error says more than Ray's wrapper
            reason = " ".join(str(cause).split())[:200]
            print(f"rlhf {args.command}: {type(cause).__name__}: {reason}; see the Ray logs, then rerun with --resume "
                  "to continue from the last complete checkpoint", file=sys.stderr)
            return 3
        raise


def _user_errors() -> tuple[type, ...]:
    """Error classes of modules already imported: one that raised had to be, and importing rlhf.modeling
    (torch, transformers) just to name its error would cost `rlhf validate` seconds."""
    found = []
    for module, name in (("rlhf.modeling", "ModelLoadError"), ("rlhf.checkpoint", "CheckpointError"),
                         ("rlhf.storage", "StorageError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


if __name__ == "__main__":
    sys.exit(main())
