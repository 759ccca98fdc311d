"""echoink reads local files only (no command downloads): a path that does not exist but looks like a Hugging
Face Hub id ("owner/name") gets a line saying how to download it to a local directory first."""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_hub_id(path: str | Path) -> bool:
    """`owner/name`, not present on disk, without a file extension a local dataset would have."""
    text = str(path)
    return (bool(_HUB_ID.fullmatch(text)) and not Path(text).exists()
            and Path(text).suffix.lower() not in {".json", ".jsonl", ".ndjson", ".parquet", ".arrow"})


def hub_id_hint(path: str | Path, repo_type: str) -> str:
    """What to do with a Hub id given where a local path belongs (repo_type: "model" or "dataset")."""
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    return (f"{path!s} looks like a Hugging Face Hub {repo_type} id, but echoink reads local files only (no command "
            f"downloads): download it to a local directory first, e.g. `huggingface-cli download {path!s}{flag} "
            "--local-dir DIR`, and give DIR")
