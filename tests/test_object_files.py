"""io.read_object_file: the one reader of a JSON or YAML object file, with one-line errors naming the file."""

from __future__ import annotations

import pytest

from echoink.io import read_object_file


class Custom(ValueError):
    pass


def test_reads_json_and_yaml_objects_and_a_bom(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}', encoding="utf-8")
    (tmp_path / "b.yaml").write_bytes(b"\xef\xbb\xbfx: 1\ny: [a, b]\n")
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    assert read_object_file(tmp_path / "a.json") == {"x": 1}
    assert read_object_file(tmp_path / "b.yaml", yaml_text=True) == {"x": 1, "y": ["a", "b"]}
    assert read_object_file(tmp_path / "empty.yaml", yaml_text=True) == {}


@pytest.mark.parametrize("name, content, yaml_text, message", [
    ("missing.json", None, False, "missing.json: gone; fix it"),
    ("latin1.json", b'{"x": "\xe9"}', False, "latin1.json: not UTF-8 text (byte 7); save the file as UTF-8; fix it"),
    ("bad.json", b'{"x": }', False, "bad.json: not valid JSON (line 1 column 7: Expecting value); fix it"),
    ("list.json", b"[1]", False, "list.json: expected a JSON object, got list; fix it"),
    ("list.yaml", b"- 1\n", True, "list.yaml: expected a mapping (key: value lines), got list; fix it"),
    ("bad.yaml", b"x: [1\n", True, "bad.yaml: invalid YAML: "),
])
def test_errors_are_one_line_of_the_callers_type(tmp_path, name, content, yaml_text, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(Custom) as info:
        read_object_file(path, Custom, yaml_text=yaml_text, missing="gone", hint="fix it")
    text = str(info.value)
    assert text.startswith(f"{tmp_path}/{message}") and "\n" not in text
