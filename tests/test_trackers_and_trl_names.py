"""Trackers and TRL names (issue 22, item 5): report_to none, a named tracker that is not installed is one error
line, run_name / logging_dir / WANDB_PROJECT, train/ and eval/ tags, TRL's names accepted or explained."""

from __future__ import annotations

import json

import pytest
from accelerate.tracking import GeneralTracker
from typer.testing import CliRunner

from echoink.cli import app
from echoink.config import ConfigError, load_config


def _overrides(model_dir, data_dir, out_dir, *extra):
    return [f"model_path={model_dir}", f"train_data={data_dir}/train/omni_rl_format_train.json",
            f"output_dir={out_dir}", "num_generations=2", "max_completion_length=6", "learning_rate=1e-4",
            "seed=0", *extra]


class RecordingTracker(GeneralTracker):
    """Stands in for an installed tracker: records how it was built and what it was sent."""

    name = "recording"
    requires_logging_directory = False
    main_process_only = True
    built: list["RecordingTracker"] = []

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs, self.logged, self.config = args, kwargs, [], None
        RecordingTracker.built.append(self)

    @property
    def tracker(self):
        return self

    def start(self):
        pass

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))


def test_trl_names_with_the_same_meaning_are_accepted():
    cfg = load_config(None, ["per_device_eval_batch_size=3", "report_to=none", "save_strategy=no", "save_steps=5",
                             "eval_strategy=no", "eval_steps=4", "warmup_steps=7", "logging_first_step=true",
                             "disable_tqdm=true", "run_name=try1", "logging_dir=/tmp/tb"])
    assert cfg.eval_batch_size == 3 and cfg.report_to == [] and cfg.save_steps == 0 and cfg.eval_steps == 0
    assert (cfg.warmup_steps, cfg.logging_first_step, cfg.disable_tqdm) == (7, True, True)
    assert (cfg.run_name, cfg.logging_dir) == ("try1", "/tmp/tb")


def test_yaml_no_is_the_strategy_no(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("save_strategy: no\neval_strategy: no\neval_steps: 3\n")  # YAML 1.1 reads `no` as false
    cfg = load_config(path)
    assert (cfg.save_strategy, cfg.eval_strategy, cfg.eval_steps) == ("no", "no", 0)


@pytest.mark.parametrize("override, message", [
    ("use_vllm=true", "use_vllm has no meaning in echoink: rollouts use echoink's own engine"),
    ("generation_batch_size=64", "per_device_train_batch_size counts prompts here"),
    ("vllm_mode=colocate", "vllm_mode has no meaning in echoink"),
    ("save_strategy=epoch", "save_strategy must be one of ('steps', 'no')"),
    ("lerning_rate=1e-5", "'lerning_rate' (did you mean 'learning_rate'?)"),
])
def test_trl_names_without_meaning_and_typos_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_both_names_of_one_setting_is_an_error():
    with pytest.raises(ConfigError, match="per_device_eval_batch_size and eval_batch_size are the same setting"):
        load_config(None, ["per_device_eval_batch_size=3", "eval_batch_size=2"])


def test_a_tracker_that_is_not_installed_is_one_line_before_the_model_loads(mixed_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr("echoink.grpo.trackers.installed_trackers", lambda: [])
    line = "report_to names tensorboard, which is not installed: pip install tensorboard, or set report_to: none"
    no_model = tmp_path / "no-model-here"   # the error comes before the model would fail to load
    result = CliRunner().invoke(app, ["train", *_overrides(no_model, mixed_dataset, tmp_path / "run"),
                                      "report_to=[tensorboard]"])
    assert result.exit_code == 1 and result.output.strip() == f"error: {line}"
    result = CliRunner().invoke(app, ["train", "--dry-run", "--num-items", "4", "report_to=[tensorboard]"])
    assert result.exit_code == 0 and f"note: {line}" in result.output   # the dry run may be on another machine


def test_trackers_get_names_dirs_and_tags(tiny_model_dir, mixed_dataset, tmp_path, monkeypatch):
    from echoink.eval.run import training_evaluator
    from echoink.grpo.trainer import train

    monkeypatch.setattr("echoink.grpo.trackers.installed_trackers", lambda: ["tensorboard", "wandb"])
    monkeypatch.setattr("accelerate.tracking.TensorBoardTracker", RecordingTracker)
    monkeypatch.setattr("accelerate.tracking.WandBTracker", RecordingTracker)
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    RecordingTracker.built.clear()
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(tiny_model_dir, mixed_dataset, out, "max_steps=2", "logging_steps=2",
                                       "logging_first_step=true", "report_to=[tensorboard,wandb]",
                                       f"logging_dir={tmp_path / 'tb'}", "run_name=first-try", "warmup_steps=2",
                                       "lr_scheduler_type=constant_with_warmup",
                                       f"eval_data={mixed_dataset}/valid/omni_rl_format_valid.json",
                                       "eval_steps=2", "eval_limit=2", "eval_max_new_tokens=4", "save_strategy=no",
                                       "save_steps=1"))
    train(cfg, progress=False, evaluate=training_evaluator(cfg))

    tensorboard, wandb = RecordingTracker.built
    assert tensorboard.args == ("", tmp_path / "tb")                     # event files in logging_dir itself
    assert wandb.args == ("my-project",) and wandb.kwargs == {"name": "first-try"}
    for tracker in (tensorboard, wandb):
        assert [step for step, _ in tracker.logged] == [1, 2]             # logging_first_step with logging_steps=2
        first, second = (values for _, values in tracker.logged)
        assert "train/reward" in first and "train/kl" in first and "reward" not in first
        assert "eval/accuracy" in second and "train/eval/accuracy" not in second
        assert tracker.config["run_name"] == "first-try"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["learning_rate"] == pytest.approx(0.5e-4)             # warmup_steps=2: half way after step 1
    assert rows[1]["learning_rate"] == pytest.approx(1e-4)
    assert not list(out.glob("checkpoint-*"))                               # save_strategy=no
