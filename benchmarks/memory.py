"""Peak resident memory of each rank of a two-rank SFT group, at load and after one training step, for a random
~300M-parameter CodeGen model (moss-moon-003's architecture) under ZeRO-0, ZeRO-2 and ZeRO-3 side by side.

Each stage starts `rlhf sft`'s role group (`actors.lm.SFTWorker`, two DeepSpeed ranks on Ray, one CPU each, float32)
and reads every rank's peak resident set three times: once its model is built (the rank's own reading at the end of
`build`, before its DeepSpeed engine: `load_report`), once its engine is built (VmHWM in /proc/PID/status), and after
one optimizer step. Under ZeRO-3 each rank builds the model partitioned (`deepspeed.zero.Init`) and copies only its
half of every weight in from the safetensors file; under ZeRO-0 and ZeRO-2 each rank loads the whole model, which
transformers maps from the file and the rank faults in when its engine broadcasts the weights: their model shows in
"engine built". There ZeRO-0 allocates nothing else (torch's AdamW makes its state at the first step), while ZeRO-2
and ZeRO-3 also make DeepSpeed's flat float32 copies, optimizer states and gradient buffers. So the load peak the
target compares is ZeRO-3's "model built" against ZeRO-0's "engine built": each rank's weights resident, no optimizer
state yet. The "process" row is the same rank with the tests' tiny model: what a rank holds before any weight (Python,
torch, transformers, DeepSpeed, Ray's worker), which the "above the process" figures leave out. GB are 2^30 bytes.

    python benchmarks/memory.py [--reps 1] [--layers 24] [--width 1024] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (ROOT, Stopwatch, Workspace, alternate, local_ray, parser, table,  # noqa: E402
                               target, workspace, write_record)

GOAL = 0.6  # ZeRO-3's load peak per rank over ZeRO-0's
STAGES = (0, 2, 3)
GB = 1 << 30


def big_codegen(ws: Workspace, args: argparse.Namespace) -> tuple[str, int]:
    """A random CodeGen of `args.layers` x `args.width` with the workspace's tokenizer, saved in float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from rlhf.modeling import load_tokenizer, save_pretrained_atomic
    tokenizer = load_tokenizer(ws.tokenizer)
    config = AutoConfig.for_model("codegen", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  n_embd=args.width, n_layer=args.layers, n_head=args.width // 64, rotary_dim=32,
                                  n_inner=4 * args.width, n_positions=1024, n_ctx=1024)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    path = save_pretrained_atomic(model, tokenizer, f"{ws.root}/codegen-{params // 10**6}m")
    del model
    return path, params


def resident(pid: int) -> dict:
    """GB the process holds now (VmRSS) and at most so far (VmHWM)."""
    fields = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / GB
    return {"now": fields["VmRSS"], "peak": fields["VmHWM"]}


def run_stage(args: argparse.Namespace, ws: Workspace, model: str, zero: int) -> dict:
    """One SFT group of two ranks: each rank's peak at load and after one step, and how it loaded."""
    from actors.group import RayBackend
    from actors.lm import SFTWorker
    from actors.rank import RankSpec
    from rlhf.batching import collate_sft
    from rlhf.config import load_config
    from rlhf.data import encode_dialogues
    from rlhf.modeling import load_tokenizer
    cfg = load_config("sft", str(ROOT / "configs/tiny/sft.yaml"), [
        f"seed={args.seed}", "layout.gpus_per_node=2", "layout.cpus_per_rank=1", f"deepspeed.zero_stage={zero}",
        "train.micro_batch_size=2", "train.global_batch_size=4", f"data.max_length={args.max_length}",
        "optim.lr=1e-5", "optim.warmup_steps=0"])
    tokenizer = load_tokenizer(model)
    batch = collate_sft(encode_dialogues(ws.data["sft_train"], tokenizer, cfg.data)[:4], tokenizer.pad_token_id)
    spec = RankSpec(model, cfg.role(), cfg.model, cfg.seed, trainable=True, grad_accum=1, total_steps=10)
    with Stopwatch() as load:
        groups = RayBackend(cfg.ray).start({"sft": (SFTWorker, spec)})
    try:
        group = groups.groups["sft"]
        pids = [info["pid"] for info in group.node_info()]
        at_load = [resident(pid) for pid in pids]
        with Stopwatch() as step:
            group.call("train_step", batch, int(batch["loss_mask"][:, 1:].sum())).result()
        after_step = [resident(pid) for pid in pids]
        loaded = group.call("load_report").result()
    finally:
        groups.stop()
    return {"load_peak_gb": max(r["peak_rss_gb"] for r in loaded), "engine_peak_gb": max(r["peak"] for r in at_load),
            "step_peak_gb": max(r["peak"] for r in after_step),
            "step_now_gb": max(r["now"] for r in after_step), "load_s": load.seconds, "step_s": step.seconds,
            "ranks_at_load": at_load, "ranks_after_step": after_step, "loaded": loaded}


def report(args: argparse.Namespace, runs: dict[str, list[dict]], params: int) -> None:
    def med(name: str, key: str) -> float:
        values = sorted(r[key] for r in runs[name])
        return values[len(values) // 2]
    base = med("process", "load_peak_gb")
    rows = []
    for name, label in [(f"zero{z}", f"ZeRO-{z}") for z in STAGES] + [("process", "process (tiny model)")]:
        load, engine, step = (med(name, k) for k in ("load_peak_gb", "engine_peak_gb", "step_peak_gb"))
        read = runs[name][0]["loaded"][0].get("elements_read")
        share = "-" if name == "process" else f"{read / params:.2f}" if read else "1 (whole model)"
        rows.append([label, f"{load:.2f} ({load - base:+.2f})", f"{engine:.2f} ({engine - base:+.2f})",
                     f"{step:.2f} ({step - base:+.2f})", med(name, "load_s"), share])
    text = table([f"2 ranks, {params // 10**6}M-parameter CodeGen, float32: peak GB per rank (above the process)",
                  "model built", "engine built", "after 1 step", "start s", "share of the weights a rank read"],
                 rows)
    zero3, zero0 = med("zero3", "load_peak_gb"), med("zero0", "engine_peak_gb")  # weights in, no optimizer state
    ratio, above = zero3 / zero0, (zero3 - base) / (zero0 - base)
    met = ratio <= GOAL
    text += (f"\n\ntarget: ZeRO-3's load peak per rank <= {GOAL}x ZeRO-0's: {'met' if met else 'NOT met'} "
             f"({zero3:.2f} / {zero0:.2f} GB = {ratio:.2f}x; above the process, the weights alone, {above:.2f}x)")
    write_record("memory", args, {"parameters": params, "runs": runs, "ratio": ratio, "ratio_above_process": above,
                                  "target": target("ZeRO-3 / ZeRO-0 load peak per rank", ratio, f"<= {GOAL}", met)},
                 text)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], reps=1)
    p.add_argument("--layers", type=int, default=24, help="CodeGen layers (24 x 1024 wide: ~300M parameters)")
    p.add_argument("--width", type=int, default=1024, help="CodeGen n_embd (heads of 64)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per SFT dialogue of the training step")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.layers, args.width = 1, 4, 256
    with workspace(args, ["codegen"], seed=args.seed) as ws, local_ray(num_cpus=2):
        model, params = big_codegen(ws, args)
        print(f"model: {params:,} parameters -> {model}", flush=True)
        sides = {"process": lambda rep: run_stage(args, ws, ws.models["codegen"], 0)}
        sides |= {f"zero{z}": (lambda rep, z=z: run_stage(args, ws, model, z)) for z in STAGES}
        runs = alternate(sides, args.reps)
    report(args, runs, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
