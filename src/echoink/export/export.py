"""`echoink export`: a trained thinker in the published Qwen2.5-Omni layout, so the tools omni users already run
(transformers' `Qwen2_5OmniForConditionalGeneration`, vLLM, lmms-eval's `qwen2_5_omni`, ms-swift) load it.

    full layout     config.json: the base's, with `thinker_config` replaced by the trained thinker's
                    weights:     `thinker.*` from the trained model, in the published key names (`thinker.model.*`
                                 for the text model, `thinker.audio_tower.*`, `thinker.visual.*`, `thinker.lm_head.*`);
                                 every other tensor (`talker.*`, `token2wav.*`) copied from the base's files as
                                 stored: same dtype, same bytes (never through a loaded model: transformers casts
                                 token2wav to fp32 when it loads). Sharded safetensors + model.safetensors.index.json.
                    files:       the base's other files (spk_dict.pt, generation_config.json, ...) copied byte for
                                 byte; the trained model's processor files (tokenizer, chat template, processors).
    thinker layout  the trained thinker-only directory as `load_thinker` reads it (a merged LoRA run included).

Both get a model card (README.md, :mod:`echoink.export.model_card`). A LoRA adapter directory (adapter_config.json)
is merged into its base first. Before anything is written, the trained thinker and the base are compared: the
same model type, the same thinker architecture (every base `thinker.*` tensor has a trained tensor of the same
name and shape) and the same special-token ids (the thinker config's and the tokenizer's); a difference stops
the export naming it. The output is built in a temporary sibling directory and moved into place whole
(`echoink.io.building_directory`), and an existing output directory is never replaced.
"""

from __future__ import annotations

from contextlib import contextmanager
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from safetensors import safe_open
from safetensors.torch import save_file

from echoink.io import building_directory, read_object_file, write_json_atomic
from echoink.model.families import UnsupportedModelError, family_for_model_type
from echoink.model.prompt_settings import PROMPT_SETTINGS_FILE

__all__ = ["EXPORT_LAYOUTS", "ExportError", "ExportResult", "export_model"]

EXPORT_LAYOUTS = ("full", "thinker")
#: Families whose published full layout the export writes (and tests): the thinker's published key names are
#: the family's `published_thinker_name`. The other parts (the family's `other_parts`) are copied from the base as stored.
EXPORTABLE_FAMILIES = ("qwen2.5-omni",)
#: Files that describe weights or the processor: written by the export, never copied from the base.
_WEIGHT_INDEX = "model.safetensors.index.json"
_THINKER_TOKEN_IDS = ("audio_token_index", "image_token_index", "video_token_index", "audio_start_token_id",
                      "audio_end_token_id", "vision_start_token_id", "vision_end_token_id", "eos_token_id",
                      "pad_token_id")
_ARCHITECTURE_FIELDS = {
    "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads"),
    "audio_config": ("d_model", "encoder_layers", "encoder_attention_heads", "num_mel_bins", "output_dim"),
    "vision_config": ("depth", "hidden_size", "num_heads", "patch_size", "spatial_merge_size", "out_hidden_size"),
}
DEFAULT_SHARD_BYTES = 5 * 1024**3


class ExportError(ValueError):
    """An export that cannot be done; the message is one line naming the file or the mismatch."""


@dataclass
class ExportResult:
    out_dir: Path
    layout: str
    shards: list[str] = field(default_factory=list)
    thinker_tensors: int = 0
    copied_tensors: int = 0
    copied_files: list[str] = field(default_factory=list)
    merged_lora: bool = False


def export_model(model_dir: str | Path, out_dir: str | Path, *, base_dir: str | Path | None = None,
                 layout: str = "full", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 run_dir: str | Path | None = None, predictions: Sequence[str | Path] = (),
                 card_ids: dict[str, str | None] | None = None) -> ExportResult:
    """Export the trained model in `model_dir` to `out_dir` (see the module docstring); returns what was written.

    `base_dir`: the base checkpoint in the published full layout (required for layout "full"; for "thinker" it
    is only compared against when given). `run_dir`: the training run whose logs the model card summarises
    (default: the directory above `model_dir` when it holds metrics.jsonl). `predictions`: `echoink eval` outputs
    whose accuracy the card reports. `card_ids`: the card's `base_model_id`, `dataset_id` and `license` (Hub
    ids; see `write_model_card`).
    Raises ExportError (one line) before writing anything when the inputs do not fit together.
    """
    from echoink.export.model_card import write_model_card

    if layout not in EXPORT_LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(EXPORT_LAYOUTS)}, got {layout!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    source_dir = model_dir  # holds the prompt settings the model was trained with (a LoRA adapter's too)
    if out_dir.exists():
        raise ExportError(f"{out_dir}: already exists; export never replaces a directory — choose a new --out "
                          "or delete it")
    if layout == "full" and base_dir is None:
        raise ExportError("the full layout needs --base: the published base checkpoint whose talker and "
                          "token2wav go with the trained thinker")
    base = _read_base(Path(base_dir)) if base_dir is not None else None
    if run_dir is None and (model_dir.parent / "metrics.jsonl").is_file():
        run_dir = model_dir.parent
    with tempfile.TemporaryDirectory(prefix=".echoink-export-", dir=out_dir.parent if out_dir.parent.exists()
                                     else None) as scratch:
        merged_lora = (model_dir / "adapter_config.json").is_file()
        if merged_lora:
            model_dir = _merge_lora(model_dir, base_dir, Path(scratch) / "merged")
        trained = _read_trained(model_dir)
        if base is not None:
            _check_compatible(trained, base)  # first: a model of another family "does not fit", whatever the layout
        if layout == "full" and base.family.name not in EXPORTABLE_FAMILIES:
            raise ExportError(f"{base.path / 'config.json'}: export to the {base.family.display_name} full layout is "
                              f"not implemented (exportable: {', '.join(EXPORTABLE_FAMILIES)}); use --layout thinker")
        result = ExportResult(out_dir=out_dir, layout=layout, merged_lora=merged_lora)
        with building_directory(out_dir) as tmp:
            if layout == "thinker":
                for file in sorted(model_dir.iterdir()):
                    if file.is_file() and file.name != "README.md":
                        shutil.copyfile(file, tmp / file.name)
                        result.copied_files.append(file.name)
            else:
                _write_full(trained, base, tmp, max_shard_bytes, result)
            settings = source_dir / PROMPT_SETTINGS_FILE  # the full layout and a merged adapter start without it
            if settings.is_file() and not (tmp / PROMPT_SETTINGS_FILE).exists():
                shutil.copyfile(settings, tmp / PROMPT_SETTINGS_FILE)
                result.copied_files.append(PROMPT_SETTINGS_FILE)
            write_model_card(tmp, run_dir=run_dir, base=str(base_dir) if base_dir is not None else None,
                             layout=layout, trained_from=str(model_dir) if not merged_lora else None,
                             predictions=predictions, name=out_dir.name, prompt_from=source_dir,
                             **(card_ids or {}))
    return result


# ---- reading and checking ----------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    path: Path
    config: dict
    thinker_config: dict
    tensors: dict[str, tuple[Path, str]]   # published tensor name -> (safetensors file, name stored there)
    special_tokens: dict[str, int]    # tokenizer.json's added tokens -> id
    family: Any = None                # echoink.model.families.OmniFamily


def _load_json(path: Path) -> dict:
    return read_object_file(path, ExportError, missing="missing")


def _tensor_files(path: Path) -> dict[str, Path]:
    """Stored tensor name -> the safetensors file holding it (from the index, or each file's header)."""
    index = path / _WEIGHT_INDEX
    if index.is_file():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ExportError(f"{index}: no weight_map")
        files = {name: path / file for name, file in weight_map.items()}
    else:
        files = {}
        for file in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(str(file), "pt") as handle:
                    files.update({name: file for name in handle.keys()})
            except Exception as exc:  # safetensors raises its own error types for a damaged header
                raise ExportError(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = f" ({', '.join(pickles)} is a pickle: only safetensors weights are read)" if pickles else ""
        raise ExportError(f"{path}: no safetensors weights{hint}")
    missing = sorted({str(f) for f in files.values() if not f.is_file()})
    if missing:
        raise ExportError(f"{path}: weight files listed in {_WEIGHT_INDEX} are missing: {', '.join(missing)}")
    return files


def _special_tokens(path: Path) -> dict[str, int]:
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        return {}
    added = _load_json(tokenizer).get("added_tokens") or []
    return {token["content"]: token["id"] for token in added if isinstance(token, dict) and token.get("special")}


def _read_base(path: Path) -> _Checkpoint:
    config = _load_json(path / "config.json") if path.is_dir() else None
    if config is None:
        raise ExportError(f"{path}: not a model directory")
    family, full = _family(config, path)
    if not full:
        raise ExportError(f"{path / 'config.json'}: model_type {config.get('model_type')!r} is a thinker-only "
                          f"checkpoint; the base must be the published full layout ({family.full_model_type!r})")
    if not isinstance(config.get("thinker_config"), dict):
        raise ExportError(f"{path / 'config.json'}: model_type {config.get('model_type')} but no thinker_config")
    tensors = {name: (file, name) for name, file in _tensor_files(path).items()}
    return _Checkpoint(path, config, config["thinker_config"], tensors, _special_tokens(path), family)


def _read_trained(path: Path) -> _Checkpoint:
    if not path.is_dir():
        raise ExportError(f"{path}: not a model directory")
    config = _load_json(path / "config.json")
    family, full = _family(config, path)
    if not full:
        thinker, tensors = config, {family.published_thinker_name(k): (f, k) for k, f in _tensor_files(path).items()}
    elif isinstance(config.get("thinker_config"), dict):
        thinker = config["thinker_config"]
        tensors = {k: (f, k) for k, f in _tensor_files(path).items() if k.startswith("thinker.")}
    else:
        raise ExportError(f"{path / 'config.json'}: model_type {config.get('model_type')} but no thinker_config")
    return _Checkpoint(path, config, thinker, tensors, _special_tokens(path), family)


def _family(config: dict, path: Path):
    try:
        return family_for_model_type(config.get("model_type"), str(path / "config.json"))
    except UnsupportedModelError as exc:
        raise ExportError(str(exc)) from None


def _check_compatible(trained: _Checkpoint, base: _Checkpoint) -> None:
    """Stop, naming the first differences, when the trained thinker does not fit the base's other parts."""
    if trained.family is not base.family:
        raise ExportError(f"{trained.path} does not fit base {base.path}: architecture: the trained model is "
                          f"{trained.family.display_name}, the base {base.family.display_name}; nothing was written")
    problems = []
    for sub, names in _ARCHITECTURE_FIELDS.items():
        ours, theirs = trained.thinker_config.get(sub) or {}, base.thinker_config.get(sub) or {}
        for name in names:
            if ours.get(name) != theirs.get(name):
                problems.append(f"architecture: thinker {sub}.{name} is {ours.get(name)!r} in the trained model, "
                                f"{theirs.get(name)!r} in the base")
    for name in _THINKER_TOKEN_IDS:
        ours, theirs = trained.thinker_config.get(name), base.thinker_config.get(name)
        if ours != theirs:
            problems.append(f"special-token id: thinker {name} is {ours!r} in the trained model, {theirs!r} in the base")
    for token in sorted(set(trained.special_tokens) | set(base.special_tokens)):
        ours, theirs = trained.special_tokens.get(token), base.special_tokens.get(token)
        if ours != theirs:
            problems.append(f"special-token id: {token} is {ours!r} in the trained tokenizer, {theirs!r} in the base's")
    if not problems:
        base_thinker = {k for k in base.tensors if k.startswith("thinker.")}
        missing, extra = sorted(base_thinker - set(trained.tensors)), sorted(set(trained.tensors) - base_thinker)
        if missing or extra:
            problems.append(f"architecture: thinker tensors differ ({len(missing)} only in the base, e.g. "
                            f"{(missing or ['-'])[0]}; {len(extra)} only in the trained model, e.g. {(extra or ['-'])[0]})")
        else:
            ours_shapes, theirs_shapes = _shapes(trained, base_thinker), _shapes(base, base_thinker)
            for name in sorted(base_thinker):
                ours, theirs = ours_shapes[name], theirs_shapes[name]
                if ours != theirs:
                    problems.append(f"architecture: {name} has shape {ours} in the trained model, {theirs} in the base")
                    break
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ExportError(f"{trained.path} does not fit base {base.path}: {'; '.join(problems[:3])}{more}; "
                          "nothing was written")


@contextmanager
def _reading(file: Path) -> Iterator[object]:
    """`safe_open` whose failures (a truncated or damaged file: safetensors' own error types) name the file."""
    try:
        with safe_open(str(file), "pt") as handle:
            yield handle
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ExportError(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0]}); truncated or "
                          "damaged: copy it again") from None


def _shapes(checkpoint: _Checkpoint, names: set[str]) -> dict[str, list[int]]:
    """Published name -> shape, read from the safetensors headers (no tensor data is read)."""
    shapes = {}
    for file, members in _by_file(checkpoint, sorted(names)).items():
        with _reading(file) as handle:
            for name in members:
                shapes[name] = list(handle.get_slice(checkpoint.tensors[name][1]).get_shape())
    return shapes


def _by_file(checkpoint: _Checkpoint, names: list[str]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(checkpoint.tensors[name][0], []).append(name)
    return by_file


# ---- writing -----------------------------------------------------------------------------------------


def _merge_lora(adapter_dir: Path, base_dir: str | Path | None, out: Path) -> Path:
    """A LoRA adapter -> the merged thinker-only model (its base: the adapter's own record, else --base)."""
    from echoink.model.trainable import merge_adapter

    adapter_config = _load_json(adapter_dir / "adapter_config.json")
    base = adapter_config.get("base_model_name_or_path") or base_dir
    if not base or not Path(base).is_dir():
        raise ExportError(f"{adapter_dir / 'adapter_config.json'}: its base model {base!r} is not a local "
                          "directory; pass the trained run's model_path as --base")
    return Path(merge_adapter(base, adapter_dir, out))


def _tensors_in_order(checkpoint: _Checkpoint, names: list[str]) -> Iterator[tuple[str, object]]:
    """(published name, tensor exactly as stored: dtype and bytes) for `names`, opening each file once."""
    for file, members in _by_file(checkpoint, names).items():
        with _reading(file) as handle:
            for name in members:
                yield name, handle.get_tensor(checkpoint.tensors[name][1])


def _write_full(trained: _Checkpoint, base: _Checkpoint, out: Path, max_shard_bytes: int,
                result: ExportResult) -> None:
    parts = base.family.other_parts
    thinker_names = sorted(trained.tensors)
    other_names = sorted(k for k in base.tensors if k.split(".", 1)[0] in parts)
    streams = [_tensors_in_order(trained, thinker_names), _tensors_in_order(base, other_names)]
    result.thinker_tensors, result.copied_tensors = len(thinker_names), len(other_names)

    shards: list[dict] = [{}]
    sizes = [0]
    for stream in streams:
        for name, tensor in stream:
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
                _flush_shard(shards, out, result)
                shards.append({})
                sizes.append(0)
            shards[-1][name] = tensor.contiguous()
            sizes[-1] += nbytes
    _flush_shard(shards, out, result)
    total = len(result.shards)
    weight_map = {}
    for number, temp_name in enumerate(result.shards, start=1):
        final_name = f"model-{number:05d}-of-{total:05d}.safetensors"
        (out / temp_name).rename(out / final_name)
        with safe_open(str(out / final_name), "pt") as handle:
            weight_map.update({name: final_name for name in handle.keys()})
        result.shards[number - 1] = final_name
    write_json_atomic(out / _WEIGHT_INDEX, {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})

    config = dict(base.config)
    config["thinker_config"] = {**trained.thinker_config, "model_type": trained.family.thinker_model_type}
    config["thinker_config"].pop("architectures", None)
    write_json_atomic(out / "config.json", config)
    produced = {"config.json", _WEIGHT_INDEX, "README.md"}
    for file in sorted(base.path.iterdir()):           # spk_dict.pt, generation_config.json, ... as stored
        if file.is_file() and file.name not in produced and not file.name.endswith(".safetensors") \
                and file.name not in _PROCESSOR_FILES and file.name != "model.safetensors.index.json":
            shutil.copyfile(file, out / file.name)
            result.copied_files.append(file.name)
    for name in sorted(_PROCESSOR_FILES):               # the trained model's processor: what it was trained with
        if (trained.path / name).is_file():
            shutil.copyfile(trained.path / name, out / name)
            result.copied_files.append(name)


#: Processor and tokenizer files (taken from the trained model, not the base).
_PROCESSOR_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json",
})


def _flush_shard(shards: list[dict], out: Path, result: ExportResult) -> None:
    if not shards[-1]:
        return
    name = f".shard-{len(result.shards) + 1}.safetensors"
    save_file(shards[-1], str(out / name), metadata={"format": "pt"})
    result.shards.append(name)
    shards[-1] = {}
