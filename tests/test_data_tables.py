"""Data people already have (issue 22, item 7): a `datasets` save_to_disk directory and parquet files with the
AVQA-R1 columns, media as paths or bytes (decoded by echoink's own loaders), validated like the JSON format;
a Hub id or an unreadable directory gets one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echoink.cli import app
from echoink.data import DatasetError, load_dataset
from echoink.data.records import validate_dataset
from echoink.data.report import build_report


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOINK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "media"


def _rows(mixed_dataset):
    json_path = mixed_dataset / "train" / "omni_rl_format_train.json"
    return json_path, json.loads(json_path.read_text())


def _with_bytes(rows, root: Path) -> list[dict]:
    """The rows as a datasets user holds them: image/audio as {"bytes", "path"} columns, no path object."""
    out = []
    for row in rows:
        row = dict(row)
        paths = row.pop("path", None) or {}
        for kind in ("image", "audio"):
            row[kind] = ({"bytes": (root / paths[kind]).read_bytes(), "path": Path(paths[kind]).name}
                         if kind in paths else None)
        row["video"] = paths.get("video")
        out.append(row)
    return out


def test_save_to_disk_with_media_bytes_reads_like_the_json(mixed_dataset, tmp_path, cache):
    from datasets import Audio, Dataset, Image

    json_path, rows = _rows(mixed_dataset)
    rows = [row for row in rows if "video" not in (row.get("path") or {})]
    subset = json_path.parent / f"subset-{tmp_path.name}.json"   # the JSON subset beside its media
    subset.write_text(json.dumps(rows))
    table = _with_bytes(rows, json_path.parent)
    Dataset.from_list([{k: v for k, v in row.items() if k != "video"} for row in table]) \
        .cast_column("image", Image()).cast_column("audio", Audio()).save_to_disk(str(tmp_path / "disk"))
    try:
        from_json, from_disk = load_dataset(subset), load_dataset(tmp_path / "disk")
    finally:
        subset.unlink()
    assert [(r.problem_id, r.answer, r.data_type, sorted(r.media)) for r in from_disk] == \
           [(r.problem_id, r.answer, r.data_type, sorted(r.media)) for r in from_json]
    for a, b in zip(from_disk, from_json):
        for kind in a.media:
            assert a.media[kind].parent == cache and a.media[kind].read_bytes() == b.media[kind].read_bytes()
    report = build_report(tmp_path / "disk", check_media=True)  # echoink's own decoders read the cached files
    assert report.ok and report.media_checked, report.problems
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "disk")])
    assert result.exit_code == 0 and "ok" in result.output


def test_parquet_with_relative_paths_and_null_path_entries(mixed_dataset, tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    json_path, rows = _rows(mixed_dataset)
    for row in rows:  # a struct column: every row has every key, null where unused
        row["path"] = {kind: (row.get("path") or {}).get(kind) for kind in ("image", "audio", "video")}
    parquet = json_path.parent / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    try:
        records = load_dataset(parquet)
        assert [r.problem_id for r in records] == [r.problem_id for r in load_dataset(json_path)]
        assert not any(cache.glob("*"))                     # paths, not bytes: nothing cached
    finally:
        parquet.unlink()


def test_table_rows_are_validated_like_json(mixed_dataset, tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, rows = _rows(mixed_dataset)
    row = {key: value for key, value in rows[0].items() if key != "path"}
    row.update(data_type="text", solution="<answer>Z</answer>")
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "bad.parquet")
    (tmp_path / "bad.json").write_text(json.dumps([row]))
    _, from_table = validate_dataset(tmp_path / "bad.parquet")
    _, from_json = validate_dataset(tmp_path / "bad.json")
    assert from_table and [p.split(":", 1)[1] for p in from_table] == [p.split(":", 1)[1] for p in from_json]


def test_bytes_without_a_file_name_name_the_row(mixed_dataset, tmp_path, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    json_path, rows = _rows(mixed_dataset)
    row = next(r for r in rows if r["data_type"] == "image")
    table_row = _with_bytes([row], json_path.parent)[0]
    table_row["image"]["path"] = None
    pq.write_table(pa.Table.from_pylist([table_row]), tmp_path / "nameless.parquet")
    _, problems = validate_dataset(tmp_path / "nameless.parquet")
    assert any(p.startswith(f"{tmp_path / 'nameless.parquet'}:0:path.image: image bytes without a file name")
               for p in problems)


@pytest.mark.parametrize("given, line", [
    ("OpenGVLab/OmniInstruct", "looks like a Hugging Face Hub dataset id, but echoink reads local files only"),
    ("{tmp}", "a directory, but not one written by datasets' save_to_disk (no dataset_info.json); give an AVQA-R1 "
              "JSON array or JSON Lines file, a parquet file with the AVQA-R1 columns, or a directory written by "
              "datasets' save_to_disk"),
    ("{tmp}/missing.parquet", "file not found"),
])
def test_what_is_not_a_local_dataset_is_one_line(given, line, tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset(given.format(tmp=tmp_path))
    assert len(info.value.problems) == 1 and line in info.value.problems[0]


def test_a_split_dataset_dict_names_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"a": 1}]), "valid": Dataset.from_list([{"a": 2}])}) \
        .save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match=r"holds the splits train, valid; give one of them"):
        load_dataset(tmp_path / "dd")


def test_a_model_hub_id_gets_a_download_hint():
    from echoink.model import ModelLoadError, load_thinker

    with pytest.raises(ModelLoadError, match=r"Qwen/Qwen2.5-Omni-7B looks like a Hugging Face Hub model id.*"
                                             r"huggingface-cli download Qwen/Qwen2.5-Omni-7B --local-dir DIR"):
        load_thinker("Qwen/Qwen2.5-Omni-7B")
