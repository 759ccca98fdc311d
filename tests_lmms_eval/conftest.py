"""The lmms-eval check runs in its own environment (`make test-lmms-eval` builds .venv-lmms); it shares the
benchmark-layout fixtures of echoink's tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
