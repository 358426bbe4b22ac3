#!/usr/bin/env bash
# Does a change keep the numbers? Runs a short SFT, RM, DPO and PPO (in one process, same seeds, same inputs) on the
# working tree and on REV (default: HEAD~1), and compares every line of their metrics.jsonl, wall-clock fields aside.
#   benchmarks/same_metrics.sh [REV]
# A refactor must print "differences 0" for every command; a deliberate change of a metric shows as exactly that.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REV=${1:-HEAD~1}
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d /tmp/same-metrics-XXXXXX)
trap 'git -C "$ROOT" worktree remove --force "$WORK/before" >/dev/null 2>&1 || true' EXIT
git -C "$ROOT" worktree add --detach "$WORK/before" "$REV" >/dev/null
PYTHONPATH=$ROOT $PY -m rlhf sample --out "$WORK/data" >/dev/null
PYTHONPATH=$ROOT $PY -m rlhf tokenizer --data "$WORK/data/sft_train.jsonl" "$WORK/data/prefs_train.jsonl" \
  --vocab-size 800 --out "$WORK/tok" >/dev/null
PYTHONPATH=$ROOT $PY -m rlhf init-model --tokenizer "$WORK/tok" --out "$WORK/base" >/dev/null 2>&1
for tree in before now; do
  src=$ROOT; [ $tree = before ] && src=$WORK/before
  out=$WORK/$tree
  mkdir -p "$out"
  run() { (cd "$src" && PYTHONPATH=$src $PY -m rlhf "$@" --set ray.in_process=true --set logging.progress=false) \
            > "$out/$1.log" 2>&1 || { echo "$tree: rlhf $1 failed, see $out/$1.log"; exit 1; }; }
  D=$WORK/data
  run sft --config configs/tiny/sft.yaml --model "$WORK/base" --data $D/sft_train.jsonl --set data.eval=$D/sft_eval.jsonl \
    --set train.max_steps=6 --set train.eval_every=3 --set train.log_every=1 --output "$out/sft"
  run rm --config configs/tiny/rm.yaml --model "$out/sft/final" --data $D/prefs_train.jsonl \
    --set data.eval=$D/prefs_eval.jsonl --set train.max_steps=6 --set train.eval_every=3 --set train.log_every=1 \
    --output "$out/rm"
  run dpo --config configs/tiny/dpo.yaml --model "$out/sft/final" --data $D/prefs_train.jsonl \
    --set data.eval=$D/prefs_eval.jsonl --set train.max_steps=4 --set train.eval_every=2 --set train.log_every=1 \
    --set dpo.kl_prompts=8 --output "$out/dpo"
  run ppo --config configs/tiny/ppo.yaml --policy "$out/sft/final" --reward "$out/rm/final" \
    --prompts $D/prompts_train.jsonl --set data.eval=$D/prompts_eval.jsonl --set ppo.iterations=3 \
    --set ppo.eval_prompts=16 --output "$out/ppo"
done
$PY - "$WORK" "$REV" <<'PY'
import json
import sys

work, rev = sys.argv[1:]


def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time" and not k.startswith("time/") and "per_s" not in k}
            for line in open(path)]


for command in ("sft", "rm", "dpo", "ppo"):
    before, now = rows(f"{work}/before/{command}/metrics.jsonl"), rows(f"{work}/now/{command}/metrics.jsonl")
    diffs = [(i, k, a.get(k), b.get(k)) for i, (a, b) in enumerate(zip(before, now)) for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    print(f"{command}: {len(before)} lines at {rev}, {len(now)} now; differences {len(diffs)} {diffs[:6]}")
PY
