"""docs/custom_tasks.md is run, command by command, on the tiny model: the guide cannot drift from the code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "custom_tasks.md"
SRC = Path(__file__).resolve().parents[1] / "src"


def guide_commands() -> list[str]:
    """The ```bash blocks of the guide, in order (```text blocks are output, not commands)."""
    return re.findall(r"^```bash\n(.*?)^```$", GUIDE.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_guide_has_every_step():
    script = "\n".join(guide_commands())
    for step in ("python - <<'EOF'", "cat > my_tasks.py", "echoink data validate", "echoink model tiny",
                 "--dry-run", "echoink train --config", "echoink eval", "echoink metrics"):
        assert step in script, step


@pytest.mark.slow
def test_every_command_of_the_guide_runs(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(SRC),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONHOME", None)
    transcript = []
    for number, block in enumerate(guide_commands()):
        # one shell for all blocks would hide which one failed; the exports of a block carry over by prefixing them
        exports = "\n".join(line for b in guide_commands()[:number] for line in b.splitlines() if line.startswith("export "))
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", f"{exports}\n{block}"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)
        transcript.append(result.stdout + result.stderr)
        assert result.returncode == 0, f"block {number} failed:\n{block}\n--- output ---\n{transcript[-1][-3000:]}"
        assert "Traceback" not in transcript[-1], transcript[-1]

    validate_output = transcript[[i for i, b in enumerate(guide_commands()) if "data validate" in b][0]]
    assert "counting: 4" in validate_output and "note: 4" in validate_output
    metrics = [json.loads(line) for line in (tmp_path / "runs/mytask/metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and {"reward_by_type/note", "reward_by_type/counting"} <= set(metrics[0])
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert sorted({row["problem_type"] for row in rows}) == ["counting", "note"] and len(rows) == 8
    assert "by problem type" in transcript[-1]
    # the bad-solution line the guide quotes is what the loader says
    data = json.loads((tmp_path / "mytask/train.json").read_text())
    data[0]["solution"] = "<answer>A</answer>"
    (tmp_path / "bad.json").write_text(json.dumps([dict(r, path={"audio": "mytask/" + r["path"]["audio"]})
                                                    for r in data]))
    bad = subprocess.run(["echoink", "data", "validate", "bad.json", "--problem-types", "my_tasks:NoteName"],
                         cwd=tmp_path, env={**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{SRC}"},
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "bad.json:0:solution: 'A' is not a note such as A4 or C#5 (problem_type 'note')" in bad.stdout
