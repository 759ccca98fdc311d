"""Discoverable configuration (issue 22, item 6): every key documented from the dataclass, help that reads
whole at 80 columns, examples that survive, "did you mean" for a typo."""

from __future__ import annotations

import dataclasses
import re

import pytest
from typer.testing import CliRunner

from echoink.cli import app
from echoink.config import ConfigError, TrainConfig, config_keys, load_config

COMMANDS = [[], ["train"], ["config"], ["demo"], ["eval"], ["metrics"], ["export"], ["report"], ["plot"], ["aha"],
            ["model"], ["model", "tiny"], ["data"], ["data", "validate"], ["data", "synth"],
            ["data", "convert-omniinstruct"]]


def _help(argv: list[str]) -> str:
    result = CliRunner().invoke(app, [*argv, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_field_has_a_one_line_help_and_a_section():
    for item in dataclasses.fields(TrainConfig):
        text = item.metadata.get("help", "")
        assert text.strip() and "\n" not in text, item.name
        assert item.metadata.get("section"), item.name


def test_config_list_shows_every_key_with_type_default_and_help_within_80_columns():
    output = CliRunner().invoke(app, ["config", "--list"]).output
    assert max(len(line) for line in output.splitlines()) <= 80
    flat = " ".join(output.split())
    for key in config_keys():
        assert f"{key.name} ({key.type}, default {key.default})" in flat, key.name
        assert " ".join(key.help.split()) in flat, key.name
    assert 'reward_funcs (list, default ["accuracy", "format"])' in flat
    assert "max_prompt_length (int | None, default 2048)" in flat


def test_config_describes_named_keys_and_suggests_for_a_typo():
    result = CliRunner().invoke(app, ["config", "beta"])
    assert result.exit_code == 0 and result.output.startswith("beta (float, default 0.001): KL coefficient")
    result = CliRunner().invoke(app, ["config", "learning_rat"])
    assert result.exit_code == 1
    assert "'learning_rat' (did you mean 'learning_rate'?)" in result.output


def test_typo_in_config_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"'num_generation' \(did you mean 'num_generations'\?\); every key: "
                                          r"echoink config --list"):
        load_config(None, ["num_generation=4"])


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv) or "echoink")
def test_help_is_never_cut_at_80_columns(argv):
    output = _help(argv)
    assert "…" not in output
    assert max(len(line) for line in output.splitlines()) <= 80


@pytest.mark.parametrize("group", [[], ["data"], ["model"]])
def test_command_lists_show_each_first_paragraph_whole(group):
    flat = " ".join(_help(group).split()).replace("- ", "-")
    commands = [argv for argv in COMMANDS if len(argv) == len(group) + 1 and argv[:len(group)] == group]
    for argv in commands:
        first = _help(argv).split("\n\n")[1]
        assert " ".join(first.split()).replace("- ", "-") in flat, argv


def test_markup_never_swallows_an_example():
    output = " ".join(_help(["train"]).split())
    assert "`reward_funcs=[my_rewards:length]` finds ./my_rewards.py" in output
    assert "echoink config --list" in output
    assert re.search(r"'package\.module:Class'", " ".join(_help(["eval"]).split()))
