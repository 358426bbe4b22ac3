#!/usr/bin/env bash
# Submit a run to a running Ray cluster through Ray's own Jobs API (`ray job submit`), from the repository root.
# The working directory "." is uploaded to the cluster (minus the excludes) and the command runs inside it on the
# head node, so the code and configs/ there are exactly the ones you have here.
#
# Reach the cluster's dashboard / Jobs API on 127.0.0.1:8265 first (it listens on the head's loopback):
#   Ray cluster launcher:  ray dashboard cluster/ray-cluster.yaml
#   KubeRay:               kubectl port-forward svc/moss-rlhf-head-svc 8265:8265
#   SLURM or plain SSH:    ssh -N -L 8265:127.0.0.1:8265 <head node>
# then open http://127.0.0.1:8265 (Jobs tab: status and logs; a token-protected cluster asks for its token first,
# see cluster/README.md) and run
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit.sh
#
# Afterwards:
#   ray job list   --address http://127.0.0.1:8265
#   ray job logs   --address http://127.0.0.1:8265 --follow <submission id>
#   ray job stop   --address http://127.0.0.1:8265 <submission id>
#
# What to change: the model/data/output paths (shared storage that every node sees, at the same path), and the
# command itself, e.g. for the 16B model on two nodes:
#   python -m rlhf ppo --config configs/moss-moon-003/ppo.yaml --policy /shared/models/moss-moon-003-sft \
#       --reward /shared/runs/moss-rm/final --prompts /shared/data/prompts_train.jsonl --output /shared/runs/moss-ppo
set -euo pipefail

RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
POLICY=${POLICY:-/shared/runs/llama-7b-sft/final}
REWARD=${REWARD:-/shared/runs/llama-7b-rm/final}
PROMPTS=${PROMPTS:-/shared/data/prompts_train.jsonl}
OUTPUT=${OUTPUT:-/shared/runs/llama-7b-ppo}

cd "$(dirname "$0")/.."

# The job's "User-provided metadata" on the dashboard's Jobs page (and in `ray job list`): which command, config and
# output directory it is, without opening its log (keep it in step with the command below). JSON written by
# Python, so any path is quoted right.
METADATA=$(python3 -c 'import json, sys; print(json.dumps(dict(zip(
    ["command", "config", "output", "policy", "reward", "prompts"], sys.argv[1:]))))' \
    ppo configs/llama-7b/ppo.yaml "$OUTPUT" "$POLICY" "$REWARD" "$PROMPTS")

# - working_dir ".": this checkout, uploaded (Ray limits the package size: hence the excludes).
# - `python -m rlhf` runs the uploaded copy even where an older one is pip-installed on the nodes.
# - ray.address=auto: the driver joins the cluster the job runs on instead of starting a Ray of its own.
# - TOKENIZERS_PARALLELISM / PYTHONUNBUFFERED are set by the run itself; setting different values here would
#   make Ray refuse the two runtime environments as conflicting.
ray job submit --address "$RAY_ADDRESS" \
    --submission-id "llama-7b-ppo-$(date +%Y%m%d-%H%M%S)" \
    --metadata-json "$METADATA" \
    --runtime-env-json '{"working_dir": ".", "excludes": [".venv/", "runs/", ".git/", "**/__pycache__/"], "env_vars": {"HF_HUB_OFFLINE": "1", "NCCL_DEBUG": "WARN"}}' \
    -- python -m rlhf ppo --config configs/llama-7b/ppo.yaml \
        --policy "$POLICY" --reward "$REWARD" --prompts "$PROMPTS" --output "$OUTPUT" \
        --set ray.address=auto
