#!/usr/bin/env bash
# Does a change move the story demo's numbers? Train configs/story.yaml for a few steps with
# the code of an older commit and with the working tree, same seed, and compare metrics.jsonl
# (timing fields aside) and the exported weights byte for byte.
#   bash benchmarks/same_numbers.sh OLD_REV [STEPS]      (default 4 steps; ~4 min per side here)
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: same_numbers.sh OLD_REV [STEPS]}; steps=${2:-4}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DYNALM_CACHE=${DYNALM_CACHE:-$PWD/.dynalm_cache}
tmp=$(mktemp -d); git worktree add -f -q "$tmp/old" "$old"
trap 'git worktree remove --force "$tmp/old"' EXIT
for side in old new; do
  src=$PWD/src; [ $side = old ] && src=$tmp/old/src
  PYTHONPATH=$src .venv/bin/python -m dynalm train -c configs/story.yaml --out "$tmp/$side" --force \
    --set train.steps=$steps --set eval.enabled=false --set log.progress=false > "$tmp/$side.log" 2>&1
done
.venv/bin/python - "$tmp" <<'PY'
import json, sys
t = sys.argv[1]
rows = {s: [json.loads(x) for x in open(f"{t}/{s}/metrics.jsonl")] for s in ("old", "new")}
skip = ("time/", "tokens_per_s")
for a, b in zip(rows["old"], rows["new"]):
    ka = {k: v for k, v in a.items() if not k.startswith(skip)}
    kb = {k: v for k, v in b.items() if not k.startswith(skip)}
    diff = {k: (ka.get(k), kb.get(k)) for k in sorted(set(ka) | set(kb)) if ka.get(k) != kb.get(k)}
    print(f"step {a['step']}: " + ("identical" if not diff else json.dumps(diff)))
same = open(f"{t}/old/export/model.safetensors", "rb").read() == open(f"{t}/new/export/model.safetensors", "rb").read()
print("exported weights:", "byte-identical" if same else "differ")
PY
