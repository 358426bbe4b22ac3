"""`rlhf prm` and `rlhf prm-eval`: a process reward model (PRM) from solutions whose steps are labelled.

A solution is encoded once as the MOSS dialogue whose reply is its steps joined by `prm.step_separator`; the model's
score of a step is its scalar head at the step's last token, a logit of "the solution can still reach the right
answer". The loss is binary cross-entropy over every labelled step of the global batch (Math-Shepherd's and
"Let's Verify Step by Step"'s per-step classification, with one logit in place of two classes).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

import torch

from reward.steps import EncodedSteps, calibrated, encode_steps_file, fit_calibration, prm_file, step_metrics
from rlhf import key_reads
from rlhf.config import PRMConfig
from rlhf.drivers.runs import Supervised, backend_for, one_group_plan, open_run, train_supervised
from rlhf.generation import lengths_of
from rlhf.modeling import check_model_dir, load_tokenizer
from rlhf.roles import PRMStep, Trainer


def encode(cfg: PRMConfig, path: str, tokenizer: Any, separator: str) -> list[EncodedSteps]:
    """A stepwise file's solutions, encoded; those left out are counted in one line."""
    kept, left_out = encode_steps_file(path, tokenizer, cfg.data.max_length, cfg.data.plugin, cfg.data.format,
                                       separator)
    if left_out:
        print(f"prm: {path}: {left_out} of {left_out + len(kept)} solutions left out: longer than data.max_length "
              f"({cfg.data.max_length} tokens), or the tokenizer joins a step's end to the next step", flush=True)
    return kept


def run_prm(cfg: PRMConfig, output: str, resume: bool = False, backend: Optional[Any] = None) -> dict:
    """Train a process reward model from `cfg.model.path` on `cfg.data.train`; returns the command's summary."""
    from actors.scalar import PRMWorker  # its reward.model imports transformers

    check_model_dir(cfg.model.path, "--model")
    backend = backend_for(cfg, backend)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code)
    separator = cfg.prm.step_separator
    train = encode(cfg, cfg.data.train, tokenizer, separator)
    held_out = encode(cfg, cfg.data.eval, tokenizer, separator) if cfg.data.eval else []
    plan, spec = one_group_plan(cfg, len(train), "solutions")
    spec = dataclasses.replace(spec, train_backbone=cfg.prm.train_backbone)
    # PPO's max_new_tokens: auto reads the replies' lengths from the models it is given; a reply ends at <eom>.
    lengths = lengths_of([len(e.ids) - e.reply_start for e in train], cfg.data.train)
    seen: dict = {"steps": 0, "began": 0.0, "calibration": None}

    def step(trainer: Trainer, items: list[EncodedSteps], epoch: int) -> dict:
        seen["began"] = seen["began"] or time.time()
        num_steps = sum(len(e.ends) for e in items)
        out = trainer.train_step(items, PRMStep(num_steps)).result()
        seen["steps"] += num_steps
        return {"train/loss": out["loss"], "train/step_accuracy": out["correct"] / max(1.0, out["steps"]),
                "train/steps": num_steps, "train/grad_norm": out["grad_norm"],
                "train/solutions_encoded": out["encoded"]}

    calibration_set = train[:cfg.prm.calibration_solutions]

    def calibrate(trainer: Trainer) -> Optional[dict]:
        """The step scores' calibration for the model as it is now, fitted on the first training solutions."""
        if not calibration_set:
            return None
        found = trainer.evaluate(calibration_set).result()["features"]
        return fit_calibration(found, [e.labels for e in calibration_set])

    def evaluate(trainer: Trainer) -> dict:
        seen["calibration"] = calibrate(trainer)
        found = trainer.evaluate(held_out).result()["features"]
        probabilities = [torch.sigmoid(calibrated(f, seen["calibration"])).tolist() for f in found]
        metrics = step_metrics(probabilities, [e.labels for e in held_out])
        return {f"eval/{k}": v for k, v in metrics.items()}

    def finish(trainer: Trainer, before: dict, after: dict) -> dict:
        seconds = time.time() - seen["began"] if seen["began"] else 0.0
        calibration = seen["calibration"] if held_out else calibrate(trainer)  # the evaluation after the last step's
        files = lengths | prm_file(separator, calibration)
        trainer.save_pretrained(run.final, None, cfg.lora.merge_on_save, files).result()
        return {k.removeprefix("eval/"): v for k, v in after.items()} | {
            "train_steps_labelled": seen["steps"], "train_seconds": seconds, "final": run.final}

    run = open_run(output, cfg, resume)
    job = Supervised("prm", PRMWorker, train, step, evaluate if held_out else None, finish,
                     lambda m: {"loss": f"{m['train/loss']:.3f}", "acc": f"{m['train/step_accuracy']:.2f}"})
    return train_supervised("prm", cfg, plan, run, backend, spec, job)


def evaluate_steps(model_dir: str, data: str, cfg: PRMConfig) -> dict:
    """`rlhf prm-eval`'s numbers, in one process (no Ray): the model's step probabilities on a stepwise file, split
    as the model was trained to split (its prm.json, else `prm.step_separator`), read as best-of-N reads them."""
    from reward.scorer import ProcessScorer  # imports transformers

    check_model_dir(model_dir, "--model")
    model = key_reads.replaced(cfg.model, path=model_dir)
    scorer = ProcessScorer.load(model, cfg.data, cfg.prm.step_separator)
    solutions = encode(cfg, data, scorer.tokenizer, scorer.separator)
    return step_metrics(scorer.probabilities_of(solutions), [e.labels for e in solutions])


def run_prm_eval(model_dir: str, data: str, cfg: PRMConfig) -> int:
    """`rlhf prm-eval`: print one JSON line."""
    print(json.dumps(evaluate_steps(model_dir, data, cfg)))
    return 0
