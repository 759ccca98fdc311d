"""The prompt a model was trained with, saved beside its weights so it is evaluated the same way.

A model trained with a non-default `prompt_template` or media caps answers a different prompt from the default
one; evaluating it with the defaults measures something else (a run trained with the demo's template scored
format 1.00 in training and 0.00 from `echoink eval`). Training writes `PROMPT_SETTINGS_FILE` into every
checkpoint, the final model and a LoRA `adapter/`: the whole prompt template (every field, not only the
overrides), the media caps and the user problem types. `echoink eval` reads it by default; a run's
`config.resolved.json` (`--config`) overrides it. The export's model card reads it with `read_prompt_settings`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from echoink.config import ConfigError, TrainConfig, load_config
from echoink.io import write_json_atomic
from echoink.model.inputs import MediaOptions
from echoink.prompts import DEFAULT_TEMPLATE, PromptTemplate

PROMPT_SETTINGS_FILE = "echoink_prompt.json"


class PromptSettingsError(ValueError):
    """A settings file or config that cannot be read; the message names it."""


@dataclass(frozen=True)
class PromptSettings:
    """What decides a model's prompt: the template, the media caps, the user problem types."""

    template: PromptTemplate = DEFAULT_TEMPLATE
    media: MediaOptions = MediaOptions()
    problem_types: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_config(cls, config: TrainConfig) -> "PromptSettings":
        return cls(PromptTemplate.from_dict(config.prompt_template), MediaOptions.from_config(config),
                   tuple(config.problem_types))

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_template": asdict(self.template), "media": asdict(self.media),
                "problem_types": list(self.problem_types)}

    @property
    def is_default(self) -> bool:
        return self.template == DEFAULT_TEMPLATE and self.media == MediaOptions() and not self.problem_types

    def describe(self) -> str:
        """One line: `prompt <version>, media caps max_audio_seconds=10.0, ...` (+ problem types)."""
        media = ", ".join(f"{name}={value}" for name, value in asdict(self.media).items())
        types = f"; user problem types {', '.join(self.problem_types)}" if self.problem_types else ""
        return f"prompt {self.template.version}, media {media}{types}"


def write_prompt_settings(directory: str | Path, settings: PromptSettings) -> Path:
    """Write `directory/echoink_prompt.json` (atomically)."""
    path = Path(directory) / PROMPT_SETTINGS_FILE
    write_json_atomic(path, settings.to_dict())
    return path


def read_prompt_settings(model_dir: str | Path) -> PromptSettings | None:
    """The settings saved with a model (a checkpoint, final/, adapter/); None when it has none (a base model,
    a model trained before they were saved). A damaged file raises PromptSettingsError naming it."""
    path = Path(model_dir) / PROMPT_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        known_media = {f.name for f in fields(MediaOptions)}
        return PromptSettings(PromptTemplate(**data["prompt_template"]),
                              MediaOptions(**{k: v for k, v in data["media"].items() if k in known_media}),
                              tuple(str(spec) for spec in data.get("problem_types", [])))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PromptSettingsError(f"{path}: cannot read the model's prompt settings ({type(exc).__name__}: {exc}); "
                                  "pass the run's settings with --config RUN/config.resolved.json") from None


def prompt_settings_from_config_file(path: str | Path) -> PromptSettings:
    """The settings of a run's config: `config.resolved.json` or a training YAML (YAML reads JSON)."""
    try:
        return PromptSettings.from_config(load_config(path))
    except (ConfigError, TypeError, ValueError) as exc:
        raise PromptSettingsError(str(exc)) from None


def settings_for_eval(model_dir: str | Path, config_path: str | Path | None = None) -> tuple[PromptSettings, str]:
    """The prompt settings `echoink eval` uses for a model, and where they came from: the run's config when
    given (`--config`), else the file saved with the model, else the defaults (a base model)."""
    if config_path is not None:
        return prompt_settings_from_config_file(config_path), f"from {config_path} (--config)"
    saved = read_prompt_settings(model_dir)
    if saved is not None:
        return saved, f"saved with the model: {Path(model_dir) / PROMPT_SETTINGS_FILE}"
    return PromptSettings(), f"the defaults: {model_dir} has no {PROMPT_SETTINGS_FILE} (a base model?)"
