"""Write an lmms-eval task for any dataset file in echoink's JSON format (`echoink lmms-eval-task DATA.json --out DIR`).

lmms-eval reads tasks from YAML files found with ``--include_path DIR``. For ``DATA.json`` this writes, in DIR:

    <name>.yaml                   the task: local JSON documents, echoink's grading, generation settings
    <name>.jsonl                  one document per record (see `lmms_task_functions` for the fields)
    echoink_task_functions.py     a copy of `echoink/eval/lmms_task_functions.py` (the YAML's ``!function``s)

The dataset is validated with echoink's own loader first (one located line per problem). The task sets what
would otherwise change the numbers against `echoink eval`:

* ``reasoning_tags: none`` — lmms-eval's CLI strips ``<think>…</think>`` from replies before scoring by default;
  echoink's strict rule reads the whole reply (the format reward depends on the think block);
* ``until: []`` — lmms-eval's default stop sequence is ``"\\n\\n"``, which cuts a reasoning reply at its first
  blank line; replies end at the model's end-of-turn token instead, as in `echoink eval`;
* greedy decoding and ``max_new_tokens`` (default 256, `echoink eval`'s default).

Two metrics — ``strict_accuracy`` (echoink's rule) and ``echoink_r1_accuracy`` (EchoInk-R1's) — each also per
``data_type`` present in the file. Every document carries the data file and the record's index, so the
``echoink`` lmms-eval model answers with the exact record `echoink eval` would build.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from echoink.data.records import Record, load_dataset
from echoink.io import write_text_atomic
from echoink.prompts import MEDIA_KINDS, build_prompt_text

__all__ = ["FUNCTIONS_MODULE", "LmmsTask", "default_task_name", "task_documents", "write_lmms_task"]

FUNCTIONS_MODULE = "echoink_task_functions"
DEFAULT_MAX_NEW_TOKENS = 256
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LmmsTask:
    """What `write_lmms_task` wrote: the YAML, the documents, the task's name, how many documents, the data types."""

    yaml_path: Path
    docs_path: Path
    name: str
    count: int
    data_types: tuple[str, ...]


def default_task_name(data_path: str | Path) -> str:
    """``echoink_<file stem>``, with every character other than a letter, digit or underscore made ``_``."""
    return "echoink_" + re.sub(r"[^A-Za-z0-9_]", "_", Path(data_path).stem)


def task_documents(records: list[Record], data_path: Path) -> list[dict]:
    """One lmms-eval document per record: Arrow-friendly (every field has one type in every document)."""
    documents = []
    for record in records:
        documents.append({
            "echoink_data": str(data_path),
            "echoink_index": record.index,
            "problem_id": str(record.problem_id),
            "data_type": record.data_type,
            "problem_type": record.problem_type,
            "prompt": build_prompt_text(record),
            "media": [str(record.media[kind]) for kind in MEDIA_KINDS if kind in record.media],
            "answer": record.answer,
            "solution": record.solution,
            "extra": json.dumps(record.extra, sort_keys=True, default=str),
        })
    return documents


def write_lmms_task(data_path: str | Path, out_dir: str | Path, *, name: str | None = None,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> LmmsTask:
    """Validate ``data_path`` and write the task's YAML, documents and functions module into ``out_dir``.

    Raises DatasetError (the dataset's problems) or ValueError (a bad name or setting), before writing anything.
    """
    data_path = Path(data_path).resolve()
    name = name or default_task_name(data_path)
    if not _NAME.match(name):
        raise ValueError(f"task name {name!r}: use a letter, then letters, digits or underscores")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    records = load_dataset(data_path)
    if not records:
        raise ValueError(f"{data_path}: no records: an lmms-eval task needs at least one")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = task_documents(records, data_path)
    docs_path = out_dir / f"{name}.jsonl"
    write_text_atomic(docs_path, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in documents))
    functions = resources.files("echoink.eval").joinpath("lmms_task_functions.py").read_text(encoding="utf-8")
    write_text_atomic(out_dir / f"{FUNCTIONS_MODULE}.py", functions)
    data_types = tuple(sorted({record.data_type for record in records}))
    has_choice = any(record.is_multiple_choice for record in records)
    yaml_path = out_dir / f"{name}.yaml"
    write_text_atomic(yaml_path, task_yaml(name, docs_path, data_path, data_types, has_choice, max_new_tokens))
    return LmmsTask(yaml_path, docs_path, name, len(documents), data_types)


def task_yaml(name: str, docs_path: Path, data_path: Path, data_types: tuple[str, ...], has_choice: bool,
              max_new_tokens: int) -> str:
    """The task's YAML text. JSON strings are valid YAML scalars, so every path and name is written with
    `json.dumps` (quoted and escaped whatever it holds)."""
    metrics = ["strict_accuracy"] + (["echoink_r1_accuracy"] if has_choice else [])
    metric_names = metrics + [f"{metric}_{data_type}" for metric in metrics for data_type in data_types]
    metric_lines = "".join(f"  - metric: {metric}\n    aggregation: mean\n    higher_is_better: true\n"
                           for metric in metric_names)
    function = f"!function {FUNCTIONS_MODULE}"
    return (
        f"# Written by `echoink lmms-eval-task` for {json.dumps(str(data_path))}; use with --include_path.\n"
        f"task: {json.dumps(name)}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n"
        f"  data_files:\n"
        f"    test: {json.dumps(str(docs_path))}\n"
        f"test_split: test\n"
        f"output_type: generate_until\n"
        f"doc_to_visual: {function}.doc_to_visual\n"
        f"doc_to_text: {function}.doc_to_text\n"
        f"doc_to_target: {function}.doc_to_target\n"
        f"process_results: {function}.process_results\n"
        f"# replies are graded whole: lmms-eval would strip <think>...</think> first, and stop at a blank line\n"
        f"reasoning_tags: none\n"
        f"generation_kwargs:\n"
        f"  max_new_tokens: {max_new_tokens}\n"
        f"  do_sample: false\n"
        f"  temperature: 0\n"
        f"  until: []\n"
        f"metric_list:\n{metric_lines}"
        f"lmms_eval_specific_kwargs:\n"
        f"  default:\n"
        f"    pre_prompt: \"\"\n"
        f"    post_prompt: \"\"\n"
        f"metadata:\n"
        f"  version: 1\n"
    )
