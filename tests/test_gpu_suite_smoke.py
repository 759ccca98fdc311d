"""benchmarks/gpu_suite.sh in its CPU smoke mode (so the GPU script cannot rot): it runs every CPU part, writes
the markdown and JSON summaries, and the rollout rows show the same tokens at every loop size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke_mode_writes_its_tables(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert summary["smoke"] and [p["result"] for p in summary["parts"]] == ["passed", "passed"]
    rows = summary["rollout"]
    assert {r["family"] for r in rows} == {"qwen2.5-omni", "qwen3-omni"} and {r["B"] for r in rows} == {1, 2}
    for r in rows:  # the same prompts and seeds at every B: the same tokens, fewer decode steps when batched
        same = [o for o in rows if (o["family"], o["lengths"]) == (r["family"], r["lengths"])]
        assert len({o["completion_tokens"] for o in same}) == 1
        if r["B"] == 2:
            single = next(o for o in same if o["B"] == 1)
            assert r["loops"] == 1 and single["loops"] == 2 and r["decode_steps"] < single["decode_steps"]
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "| rollout_tiny | passed |" in markdown and "## group sharing" in markdown and "tokens/s" in markdown
