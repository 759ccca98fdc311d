"""The files of an evaluation run: the predictions file, its run-signature sidecar, and a fingerprint of the
weights (part of the signature).

Resume. The run's settings are written atomically to a sidecar `PRED.jsonl.run.json` before the
first row (the predictions file holds rows only, so every JSONL reader can read it). Rows are
appended batch by batch (flush + fsync). On start, an existing non-empty PRED.jsonl is resumed only
if its sidecar's settings equal the current ones (else `RunSignatureError`: never mix two runs);
anything after the last newline (a line cut by a kill) is truncated away, and (problem_id,
sample_idx) pairs already present are skipped. A chunk that was cut midway is generated again and
only its missing rows are written. `batch_size` and `limit` may change between resumptions (they
are recorded, not compared): lowering the batch size after running out of memory, or extending a
`limit`ed run to the whole set, continues the same file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from echoink.io import repair_cut_last_line, split_jsonl_lines, write_json_atomic

if TYPE_CHECKING:  # names for the annotations only: analysis reads this module without loading model code
    from echoink.model.generation import SamplingSettings
    from echoink.model.inputs import MediaOptions
    from echoink.prompts import PromptTemplate

RUN_FORMAT = "echoink-predictions-v1"
#: Sidecar keys that are recorded but may differ when a run is resumed.
UNCOMPARED_KEYS = ("batch_size", "limit")
_FINGERPRINT_BLOCKS, _FINGERPRINT_BLOCK_BYTES = 16, 65536

Row = dict[str, Any]


class RunSignatureError(ValueError):
    """An existing predictions file was written with other settings (or without a run signature)."""


def run_signature(*, model_name: str, model_dtype: str, data: str, decoding: SamplingSettings, ablate: str,
                  lenient: bool, template: PromptTemplate, media_options: MediaOptions, max_prompt_length: int | None,
                  protocol: str, base_model: bool, batch_size: int, limit: int | None) -> dict[str, Any]:
    """The settings a predictions file is written with (the sidecar's content; `UNCOMPARED_KEYS` aside, a resumed
    run must match them)."""
    return {
        "format": RUN_FORMAT, "model": model_name, "model_dtype": model_dtype, "data": data,
        "decoding": decoding.as_dict(), "ablate": ablate, "lenient": lenient, "prompt_version": template.version,
        "prompt_sha256": template_digest(template), "media_options": asdict(media_options),
        "weights": weights_fingerprint(model_name), "max_prompt_length": max_prompt_length,
        "protocol": protocol, "base_model": base_model, "batch_size": batch_size, "limit": limit,
    }


def run_file_path(out_path: str | Path) -> Path:
    """The sidecar holding a predictions file's run settings: `PRED.jsonl.run.json`."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".run.json")


def open_run(out_path: Path, signature: dict[str, Any]) -> list[Row]:
    """Check or create the run signature; repair a cut last line; return the rows already written."""
    sidecar = run_file_path(out_path)
    if out_path.is_dir():
        raise ValueError(f"{out_path}: is a directory (expected a .jsonl file path)")
    has_rows = out_path.is_file() and out_path.stat().st_size > 0
    if not has_rows:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(sidecar, signature)
        out_path.write_bytes(b"")
        return []
    if not sidecar.is_file():
        raise RunSignatureError(f"{out_path}: exists but has no run signature ({sidecar.name}); it was not written "
                                "by `echoink eval` — delete it or choose another output path")
    try:
        stored = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunSignatureError(f"{sidecar}: unreadable run signature ({exc.msg}); delete both files to start over") \
            from None
    differences = [
        f"{key}: {_short(stored.get(key))} in the file, {_short(signature.get(key))} now"
        for key in sorted(set(stored) | set(signature))
        if key not in UNCOMPARED_KEYS and stored.get(key) != signature.get(key)
    ]
    if differences:
        raise RunSignatureError(f"{out_path}: was written with other settings ({'; '.join(differences)}); "
                                "refusing to mix runs — use another output path or delete it and its .run.json")
    return read_complete_rows(out_path)


def read_complete_rows(path: Path) -> list[Row]:
    """Rows of every complete line; bytes after the last newline (a write cut by a kill) are truncated away."""
    data = repair_cut_last_line(path)
    end = len(data)
    rows: list[Row] = []
    seen: set[tuple[str, int]] = set()
    for number, line in enumerate(split_jsonl_lines(data[:end].decode("utf-8")), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg}); the file is damaged before its last line")\
                from None
        if not isinstance(row, dict) or "problem_id" not in row or "correct" not in row:
            raise ValueError(f"{path}:{number}: not a prediction row")
        key = (str(row["problem_id"]), int(row.get("sample_idx", 0)))
        if key in seen:
            raise ValueError(f"{path}:{number}: duplicate row for problem_id {row['problem_id']!r} "
                             f"sample_idx {key[1]}")
        seen.add(key)
        rows.append(row)
    return rows


def weights_fingerprint(model_dir: str | Path) -> str | None:
    """A content fingerprint of a model directory's weights, for the run signature (None: not a directory).

    sha256 over each weight file's name and size, its safetensors header, and 16 evenly spaced 64-KiB blocks of
    its data: replacing the model in place (even with the same shapes and file sizes) changes it, while
    copying or touching the files does not. Reads about 1 MiB per file.
    """
    path = Path(model_dir)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for index in sorted(path.glob("*.safetensors.index.json")):
        digest.update(index.name.encode() + b"\n" + index.read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}\n".encode())
        with file.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little") if size >= 8 else 0
            start = min(size, 8 + header_length)
            handle.seek(0)
            digest.update(handle.read(start))
            step = max(1, (size - start) // _FINGERPRINT_BLOCKS)
            for offset in range(start, size, step):
                handle.seek(offset)
                digest.update(handle.read(_FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()[:32]


def template_digest(template: PromptTemplate) -> str:
    return hashlib.sha256(json.dumps(template.text_fields(), sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."
