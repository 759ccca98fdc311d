#!/usr/bin/env bash
# One GPU, no internet, <= 8 minutes: rollout throughput, group sharing in bf16, sharing exactness on CUDA.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]            # on a GPU machine (default OUT_DIR: gpu_suite_out)
#   bash benchmarks/gpu_suite.sh --smoke [OUT_DIR]    # CPU, tiny sizes, seconds: `make test` runs this
#
# Writes OUT_DIR/gpu_suite.md (the tables, markdown) and OUT_DIR/gpu_suite.json (every row), and the logs of
# each part beside them:
#   1. rollout throughput, bf16, G = 16, B = 1 2 4 8 16 groups per decode loop, fixed and spread lengths:
#      the bench spec (Qwen2.5-Omni tiny builder, text 512 x 4) and a 7B-shaped model (Qwen2.5-Omni-7B's
#      widths, heads and M-RoPE sections, two layers per stack, random weights, the tiny tokenizer's vocabulary)
#   2. the group-sharing step table (benchmarks/group_sharing.py) in bf16
#   3. the batched decoder's exactness tests (tests/test_batched_decode.py: loop sizes 1, 3, 8 give the same
#      tokens, equal to transformers' generate per prompt) with the model and prompts on CUDA
#      (ECHOINK_TEST_DEVICE=cuda; fp32, as on CPU)
# A part that fails is recorded as failed in the summary and the suite goes on; the exit status is that of the
# first failure (0 when all passed).
set -u -o pipefail

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT=${1:-gpu_suite_out}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PYTHON:-python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STATUS=0
PARTS=()

run_part() {  # name, command...: runs it, logs to OUT/name.log, records pass/fail
    local name=$1; shift
    local started=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        PARTS+=("$name passed $((SECONDS - started))")
    else
        local rc=$?
        PARTS+=("$name failed($rc) $((SECONDS - started))")
        [ "$STATUS" = 0 ] && STATUS=$rc
    fi
}

if [ "$SMOKE" = 1 ]; then
    run_part rollout_tiny "$PY" "$HERE/rollout.py" --smoke --json "$OUT/rollout_tiny.json"
    run_part group_sharing "$PY" "$HERE/group_sharing.py" --spec tiny --generations 2 --completion-lengths 4 \
        --paths none full --json "$OUT/group_sharing.json"
else
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_suite: no CUDA device visible to torch (use --smoke on a CPU machine)" >&2
        exit 2
    fi
    COMMON=(--device cuda --dtype bfloat16 --generations 16 --batch-sizes 1 2 4 8 16 --max-new-tokens 128
            --mean-length 48 --repeats 3)
    run_part rollout_bench "$PY" "$HERE/rollout.py" --family qwen2.5-omni --spec bench "${COMMON[@]}" \
        --json "$OUT/rollout_bench.json"
    run_part rollout_7b_shaped "$PY" "$HERE/rollout.py" --family qwen2.5-omni --spec 7b-shaped "${COMMON[@]}" \
        --json "$OUT/rollout_7b_shaped.json"
    run_part group_sharing "$PY" "$HERE/group_sharing.py" --device cuda --dtype bfloat16 \
        --completion-lengths 128 256 --json "$OUT/group_sharing.json"
    run_part exactness env ECHOINK_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
        "$ROOT/tests/test_batched_decode.py"
fi

"$PY" - "$OUT" "$SMOKE" "${PARTS[@]}" <<'EOF'
import json, sys
from pathlib import Path

out, smoke, parts = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
summary = {"smoke": smoke, "parts": [], "rollout": [], "group_sharing": None}
lines = ["# echoink GPU suite" + (" (CPU smoke mode)" if smoke else ""), "", "| part | result | seconds |", "|---|---|---|"]
for part in parts:
    name, result, seconds = part.split(" ")
    summary["parts"].append({"name": name, "result": result, "seconds": int(seconds)})
    lines.append(f"| {name} | {result} | {seconds} |")
for name in ("rollout_tiny", "rollout_bench", "rollout_7b_shaped"):
    log = out / f"{name}.log"
    if (out / f"{name}.json").exists():
        summary["rollout"] += json.loads((out / f"{name}.json").read_text())
    if log.exists():
        table = [l for l in log.read_text().splitlines() if l.startswith("|") or l.startswith("rollout throughput")]
        lines += ["", f"## {name}", "", *table]
if (out / "group_sharing.json").exists():
    summary["group_sharing"] = json.loads((out / "group_sharing.json").read_text())
    table = [l for l in (out / "group_sharing.log").read_text().splitlines() if l.startswith("|")]
    lines += ["", "## group sharing", "", *table]
exactness = out / "exactness.log"
if exactness.exists():
    lines += ["", "## exactness tests on CUDA", "", "```", *exactness.read_text().splitlines()[-15:], "```"]
(out / "gpu_suite.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
(out / "gpu_suite.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
print("\n".join(lines))
EOF
exit $STATUS
