"""A model card (README.md, Hugging Face convention) for every saved final model and export, written from what
the run actually logged.

    ---                               YAML header (huggingface_hub's ModelCardData): base_model and datasets
    base_model: Qwen/...              as Hub ids (--base-model-id, --dataset-id; a local path is never written
    ---                               there), license (--license, else the base's own card's), library_name,
                                      pipeline_tag, tags, and a model-index with the accuracy of each
                                      predictions file given
    # <model name>                    what it is, the layout, the base
    ## Training                       the settings that shape the result, from RUN_DIR/config.resolved.json
    ## Prompt and media               the prompt template the model was trained with, and the media caps
    ## Reward curves                  per logged metric: first / last step, mean of the first and last tenth
    ## Evaluation                     in-training `eval/accuracy` by step; prediction files' accuracy (95% CI)
    ## How to load                    transformers (full layout) or echoink (thinker layout)
    ## Provenance                     which files the card was written from; lines it ignored

Called after training by `echoink train` and the demo, and by `echoink export` (the trainer itself does not
write cards). Nothing is invented: a section whose source is missing says so.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from echoink.eval.metrics import accuracy_summary, load_predictions
from echoink.eval.run_files import run_file_path
from echoink.model.prompt_settings import (PROMPT_SETTINGS_FILE, PromptSettings, PromptSettingsError,
                                           read_prompt_settings)
from echoink.prompts import PromptTemplate
from echoink.io import JsonlError, read_jsonl_tolerant, write_text_atomic

__all__ = ["CARD_FILE", "card_text", "write_model_card"]

CARD_FILE = "README.md"
TAGS = ["echoink", "grpo", "reinforcement-learning", "qwen2.5-omni", "audio-visual", "multimodal"]
#: The settings the card lists (TRL GRPOConfig names), in this order, when the run's config has them.
CARD_SETTINGS = ("model_path", "train_data", "num_generations", "beta", "epsilon", "loss_type", "scale_rewards",
                 "learning_rate", "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "max_steps", "num_train_epochs", "max_prompt_length", "max_completion_length", "temperature",
                 "reward_funcs", "reward_weights", "use_peft", "lora_r", "freeze_vision", "freeze_audio", "bf16",
                 "seed")
#: Logged metrics summarised under "Reward curves", in this order, when logged.
CURVE_METRICS = ("reward", "rewards/accuracy", "rewards/format", "reward_std", "completion_length", "kl",
                 "skipped_prompts")
#: The media settings the card states (TrainConfig names), in this order.
MEDIA_SETTINGS = ("max_audio_seconds", "min_pixels", "max_pixels", "video_fps", "video_max_frames",
                  "use_audio_in_video")
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)
#: A Hugging Face Hub repository id: "owner/name".
_HUB_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def write_model_card(model_dir: str | Path, *, run_dir: str | Path | None = None, config: dict | None = None,
                     base: str | None = None, layout: str = "thinker", trained_from: str | None = None,
                     predictions: Sequence[str | Path] = (), name: str | None = None,
                     base_model_id: str | None = None, dataset_id: str | None = None,
                     license: str | None = None, prompt_from: str | Path | None = None) -> Path:
    """Write `model_dir`/README.md (atomically) and return its path; see :func:`card_text`. `name`: the card's
    title (default: the directory's name, or RUN/final for a run's final model). The prompt settings saved with
    the model (`echoink_prompt.json` in `prompt_from`, default `model_dir`) are the card's prompt and media
    caps; without them, the run's config gives them."""
    model_dir = Path(model_dir)
    if name is None:  # a run's final/ or adapter/ directory is named after its run
        generic = model_dir.name in ("final", "adapter")
        name = f"{model_dir.resolve().parent.name}/{model_dir.name}" if generic else model_dir.name
    try:
        settings, settings_note = read_prompt_settings(prompt_from or model_dir), None
    except PromptSettingsError as exc:
        settings, settings_note = None, str(exc)
    text = card_text(name, run_dir=run_dir, config=config, base=base, layout=layout,
                     trained_from=trained_from, predictions=predictions, base_model_id=base_model_id,
                     dataset_id=dataset_id, license=license, settings=settings,
                     notes=[settings_note] if settings_note else None)
    return write_text_atomic(model_dir / CARD_FILE, text)


def card_text(name: str, *, run_dir: str | Path | None = None, config: dict | None = None, base: str | None = None,
              layout: str = "thinker", trained_from: str | None = None,
              predictions: Sequence[str | Path] = (), base_model_id: str | None = None,
              dataset_id: str | None = None, license: str | None = None, settings: PromptSettings | None = None,
              notes: list[str] | None = None) -> str:
    """The card's Markdown. `config`: the run's TrainConfig as a dict (default: RUN_DIR/config.resolved.json);
    `base`: the base checkpoint (default: the config's model_path); `predictions`: prediction files whose
    accuracy the card reports (and its model-index holds). `base_model_id`, `dataset_id`: Hub ids for the
    header (default: `base` / the config's train_data when they are Hub ids, else left out: the Hub takes no
    local path); `license`: a Hub license id (default: the base's own card's, else "other"); `settings`: the
    prompt settings saved with the model (default: the config's prompt_template and media caps); `notes`:
    lines for the Provenance section."""
    run_dir = Path(run_dir) if run_dir is not None else None
    notes = list(notes or [])
    sources: list[str] = []
    if config is None and run_dir is not None and (run_dir / "config.resolved.json").is_file():
        config_path = run_dir / "config.resolved.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            sources.append(str(config_path))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            notes.append(f"{config_path} could not be read ({type(exc).__name__}); the settings are not listed")
    config = config or {}
    base = base or config.get("model_path") or None
    rows: list[dict] = []
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        metrics_path = run_dir / "metrics.jsonl"
        try:
            rows, note = read_jsonl_tolerant(metrics_path)
            sources.append(str(metrics_path))
            if note:
                notes.append(note)
        except JsonlError as exc:
            notes.append(f"{exc}; the curves are not summarised")
    base_model_id = base_model_id or _hub_id(base)
    dataset_id = dataset_id or _hub_id(config.get("train_data"))
    for what, value, flag in (("base_model", base_model_id, "--base-model-id"), ("datasets", dataset_id, "--dataset-id")):
        if value is None:
            notes.append(f"the header has no {what}: the Hub takes a repository id, not a local path (pass {flag})")
    card_data = ModelCardData(
        model_name=name, base_model=base_model_id, datasets=[dataset_id] if dataset_id else None,
        library_name="transformers", pipeline_tag="any-to-any", tags=list(TAGS),
        eval_results=_eval_results(predictions, dataset_id) or None, **_license_fields(license, base))
    parts = ["---", card_data.to_yaml().rstrip(), "---", "",
             f"# {name}", "", _summary(base_model_id or base, layout, config, rows), "",
             "## Training", "", _settings_section(config, rows), "",
             "## Prompt and media", "", _prompt_section(config, settings), "",
             "## Reward curves", "", _curves_section(rows, config), "",
             "## Evaluation", "", _evaluation_section(rows, predictions, notes), "",
             "## How to load", "", _loading_section(layout), "",
             "## Provenance", "", _provenance(sources, trained_from, notes), ""]
    return "\n".join(parts)


# ---- sections ------------------------------------------------------------------------------------------


def _hub_id(value: Any) -> str | None:
    """`value` when it is a Hub repository id ("owner/name") and not a local path, else None."""
    if not isinstance(value, str) or not _HUB_ID.match(value) or Path(value).exists():
        return None
    return value


def _license_fields(license: str | None, base: str | None) -> dict[str, str]:
    """`license` (and, for "other", `license_name` / `license_link`): the one given, else the base's own card's
    header, else "other"."""
    if license:
        return {"license": license}
    header = _base_header(base)
    if header.get("license"):
        return {key: str(header[key]) for key in ("license", "license_name", "license_link") if header.get(key)}
    return {"license": "other"}


def _base_header(base: str | None) -> dict:
    """The YAML header of the base checkpoint's own model card ({} when there is none)."""
    if not base or not (Path(base) / CARD_FILE).is_file():
        return {}
    try:
        match = _FRONT_MATTER.match((Path(base) / CARD_FILE).read_text(encoding="utf-8"))
        header = yaml.safe_load(match.group(1)) if match else None
    except (UnicodeDecodeError, yaml.YAMLError):
        return {}
    return header if isinstance(header, dict) else {}


def _eval_results(predictions: Sequence[str | Path], dataset_id: str | None) -> list[EvalResult]:
    """One model-index result per readable predictions file: its accuracy in %, on the dataset it answered
    (`dataset_id`, else the data file's name from the predictions' run signature)."""
    results = []
    for path in predictions:
        try:
            summary = accuracy_summary(load_predictions(path))
        except (FileNotFoundError, ValueError):
            continue  # the Evaluation section names the file and why
        data = _signature_data(Path(path))
        dataset = dataset_id or (Path(data).stem if data else Path(path).stem)
        results.append(EvalResult(
            task_type="multiple-choice", task_name="audio-visual multiple-choice question answering",
            dataset_type=dataset, dataset_name=dataset, metric_type="accuracy",
            metric_name=f"accuracy (%, {Path(path).name})", metric_value=round(100 * summary["accuracy"], 2)))
    return results


def _signature_data(path: Path) -> str | None:
    try:
        data = json.loads(run_file_path(path).read_text(encoding="utf-8")).get("data")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return data if isinstance(data, str) else None


def _prompt_section(config: dict, settings: PromptSettings | None) -> str:
    """The prompt template and the media caps: those saved with the model, else the run config's."""
    if settings is not None:
        template, media = settings.template, asdict(settings.media)
        source = f"saved with the model (`{PROMPT_SETTINGS_FILE}`, which `echoink eval` reads)"
    elif config:
        try:
            template = PromptTemplate.from_dict(config.get("prompt_template") or {})
        except (TypeError, ValueError) as exc:
            return f"The run's prompt_template could not be read ({exc})."
        media = {key: config[key] for key in MEDIA_SETTINGS if config.get(key) is not None}
        source = "from the run's config"
    else:
        return "The run's settings were not found: the prompt template and media caps are unknown."
    lines = [f"Prompt the model as it was trained ({source}): template version `{template.version}`, whose "
             "parts are", ""]
    for key, value in template.text_fields().items():
        lines += [f"`{key}`:", "", _fenced("(none: the chat template's default)" if value is None else value), ""]
    lines += ["| media setting | value |", "| --- | --- |"]
    lines += [f"| `{key}` | `{_cell(value)}` |" for key, value in media.items()]
    return "\n".join(lines)


def _fenced(text: str) -> str:
    """`text` in a code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _summary(base: str | None, layout: str, config: dict, rows: list[dict]) -> str:
    what = ("the full Qwen2.5-Omni layout (thinker trained here; talker, token2wav and speakers copied unchanged "
            "from the base)" if layout == "full" else "a thinker-only checkpoint (text output; no talker)")
    steps = _last_step(rows)
    trained = f"{steps} GRPO step(s)" if steps is not None else "GRPO (no logged steps found)"
    return (f"A GRPO fine-tune of `{base or 'an unknown base'}` for audio-visual multiple-choice reasoning, trained "
            f"with echoink for {trained}. This directory holds {what}.")


def _settings_section(config: dict, rows: list[dict]) -> str:
    if not config:
        return "The run's settings were not found (no config.resolved.json in the run directory)."
    lines = ["| setting | value |", "| --- | --- |"]
    for key in CARD_SETTINGS:
        if key == "lora_r" and not config.get("use_peft"):
            continue
        if key in config and config[key] is not None:
            lines.append(f"| `{key}` | `{_cell(config[key])}` |")
    steps = _last_step(rows)
    lines.append(f"| logged steps | {len(rows)} (last step {steps if steps is not None else '-'}) |")
    return "\n".join(lines)


def _curves_section(rows: list[dict], config: dict) -> str:
    if not rows:
        return "No training metrics were logged (metrics.jsonl missing or empty)."
    lines = ["| metric | first step | last step | mean, first 10% | mean, last 10% | min | max |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    no_kl_term = config.get("beta") == 0
    for key in CURVE_METRICS:
        if key == "kl" and no_kl_term:
            lines.append("| `kl` | β = 0: no KL term | | | | | |")
            continue
        values = [float(row[key]) for row in rows if _finite(row.get(key))]
        if not values:
            continue
        tenth = max(1, len(values) // 10)
        lines.append(f"| `{key}` | {values[0]:.4g} | {values[-1]:.4g} | {sum(values[:tenth]) / tenth:.4g} | "
                     f"{sum(values[-tenth:]) / tenth:.4g} | {min(values):.4g} | {max(values):.4g} |")
    if len(lines) == 2:
        return "metrics.jsonl holds none of: " + ", ".join(f"`{k}`" for k in CURVE_METRICS) + "."
    return "\n".join(lines)


def _evaluation_section(rows: list[dict], predictions: Sequence[str | Path], notes: list[str]) -> str:
    blocks = []
    evals = [row for row in rows if _finite(row.get("eval/accuracy"))]
    if evals:
        lines = ["In-training evaluation (greedy, the training prompt):", "",
                 "| step | accuracy | 95% CI | answers |", "| --- | --- | --- | --- |"]
        for row in evals:
            ci = (f"[{100 * row['eval/ci_low']:.1f}, {100 * row['eval/ci_high']:.1f}]"
                  if _finite(row.get("eval/ci_low")) and _finite(row.get("eval/ci_high")) else "-")
            lines.append(f"| {row['step']} | {100 * row['eval/accuracy']:.1f} | {ci} | {row.get('eval/n', '-')} |")
        blocks.append("\n".join(lines))
    if predictions:
        lines = ["| predictions | answers | accuracy | 95% Wilson CI | protocol |", "| --- | --- | --- | --- | --- |"]
        for path in predictions:
            try:
                summary = accuracy_summary(load_predictions(path))
                protocols = sorted({str(row.get("protocol", "ours")) for row in load_predictions(path)})
            except (FileNotFoundError, ValueError) as exc:
                notes.append(f"{path}: not summarised ({exc})")
                continue
            lines.append(f"| `{Path(path).name}` | {summary['n']} | {100 * summary['accuracy']:.1f} | "
                         f"[{100 * summary['ci_low']:.1f}, {100 * summary['ci_high']:.1f}] | {', '.join(protocols)} |")
        blocks.append("\n".join(lines))
    if not blocks:
        return "No evaluation was run for this model (no `eval/accuracy` in metrics.jsonl, no predictions given)."
    return "\n\n".join(blocks)


def _loading_section(layout: str) -> str:
    if layout == "full":
        return "\n".join([
            "```python",
            "from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor",
            "",
            'model = Qwen2_5OmniForConditionalGeneration.from_pretrained("PATH", dtype="auto")',
            'processor = Qwen2_5OmniProcessor.from_pretrained("PATH")',
            "```",
            "",
            "echoink reads it too: `echoink eval --model PATH ...` (only the thinker is built).",
        ])
    return "\n".join([
        "```python",
        "from echoink.model import load_thinker",
        "",
        'thinker, processor = load_thinker("PATH")   # Qwen2_5OmniThinkerForConditionalGeneration',
        "```",
        "",
        "or `echoink eval --model PATH ...`. For the published full layout (speech output, vLLM, lmms-eval):",
        "`echoink export --model PATH --base BASE --out OUT`.",
    ])


def _provenance(sources: list[str], trained_from: str | None, notes: list[str]) -> str:
    lines = [f"Written by echoink from: {', '.join(f'`{s}`' for s in sources) if sources else 'no run files'}."]
    if trained_from:
        lines.append(f"Trained weights taken from `{trained_from}`.")
    lines += [f"Note: {note}." if not note.endswith(".") else f"Note: {note}" for note in notes]
    return "\n".join(lines)


# ---- helpers -------------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _last_step(rows: list[dict]) -> Any:
    steps = [row["step"] for row in rows if _finite(row.get("step"))]
    return max(steps) if steps else None


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|")
