"""Nothing lost, nothing silent, round 3 (issue 23): bounded dynamic sampling, short runs whose prompts are all
skipped, unwritable places, user code that fails, non-finite weights."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from echoink.cli import app
from echoink.config import MAX_SAMPLING_ROUNDS, ConfigError, load_config
from echoink.grpo.sampling import GroupSelection, informative


def constant_reward(completions, **columns):
    """A reward that never tells completions apart: no group is ever informative."""
    return [0.5] * len(completions)


def _one_line_error(result, *needles: str) -> str:
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output, output
    flat = output.replace("\n", " ")
    for needle in needles:
        assert needle in flat, output
    return flat


def _train_args(tiny_model_dir, mixed_dataset, out, *extra) -> list[str]:
    return ["train", f"model_path={tiny_model_dir}", f"train_data={mixed_dataset}/train/omni_rl_format_train.json",
            f"output_dir={out}", "num_generations=2", "max_completion_length=4", "seed=0",
            "per_device_train_batch_size=1", "save_steps=0", "eval_steps=0", *extra]


# ---- item 3: dynamic sampling in bounded memory ------------------------------------------------------------

def _group(total: float, informative_group: bool) -> tuple:
    rewards = torch.tensor([[total], [total + (1.0 if informative_group else 0.0)]])  # [G=2, R=1]
    return (f"record-{random.random()}", None, rewards)


def _unbounded_choice(items, wanted, weights):
    """The rule dynamic sampling had when it kept every round: first `wanted` informative, newest fillers."""
    useful = [item for item in items if informative(item[2], weights)][:wanted]
    fillers = [item for item in items if not informative(item[2], weights)][::-1][: wanted - len(useful)]
    return useful + fillers, len(items) - len(useful) - len(fillers)


@pytest.mark.parametrize("seed", range(20))
def test_group_selection_chooses_what_keeping_every_round_chose(seed):
    rng = random.Random(seed)
    weights = torch.ones(1)
    wanted = rng.randint(1, 4)
    selection = GroupSelection(wanted, weights)
    items = []
    for _ in range(rng.randint(1, 12)):  # rounds of `wanted` prompts
        batch = [_group(rng.random(), rng.random() < 0.3) for _ in range(rng.randint(0, wanted))]
        selection.add(batch)
        items += batch
    chosen, surplus = _unbounded_choice(items, wanted, weights)
    assert [id(item) for item in selection.chosen()] == [id(item) for item in chosen]
    assert selection.surplus == surplus and selection.seen == len(items)


def test_group_selection_holds_at_most_twice_the_batch_however_many_rounds():
    selection = GroupSelection(4, torch.ones(1))
    for _ in range(20_000):
        selection.add([_group(0.5, False)])
        assert len(selection.useful) + len(selection.fillers) <= 8
    assert selection.seen == 20_000 and selection.informative_seen == 0 and len(selection.chosen()) == 4


def test_max_sampling_rounds_has_a_ceiling():
    with pytest.raises(ConfigError, match=f"max_sampling_rounds must be between 1 and {MAX_SAMPLING_ROUNDS}, "
                                          "got 1000000000"):
        load_config(None, ["max_sampling_rounds=1000000000"])
    assert load_config(None, [f"max_sampling_rounds={MAX_SAMPLING_ROUNDS}"]).max_sampling_rounds == MAX_SAMPLING_ROUNDS


def test_dynamic_sampling_says_how_it_is_going(tiny_model_dir, mixed_dataset, tmp_path):
    result = CliRunner().invoke(app, _train_args(tiny_model_dir, mixed_dataset, tmp_path / "run", "max_steps=1",
                                                 "dynamic_sampling=true", "max_sampling_rounds=9", "--quiet",
                                                 "reward_funcs=[test_reliability:constant_reward]"))
    assert result.exit_code == 0, result.output
    assert ("dynamic sampling, step 1, micro-batch 1: 8 rounds so far (max_sampling_rounds=9), 0 of 8 groups "
            "informative (0.0%)") in result.output
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["sampling_rounds"] == 9 and row["surplus_groups"] == 8 and row["informative_groups"] == 0


# ---- item 4: a short run whose prompts are all skipped fails -----------------------------------------------

@pytest.mark.parametrize("steps", [1, 2])
def test_a_short_run_with_every_prompt_skipped_fails(tiny_model_dir, mixed_dataset, tmp_path, steps):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _train_args(tiny_model_dir, mixed_dataset, out, f"max_steps={steps}",
                                                 "max_prompt_length=8", "--quiet"))
    _one_line_error(result, f"of the first {steps} step(s) are longer than max_prompt_length=8")
    assert not (out / "final").exists()


# ---- item 5: unwritable places get their own message, before work is done ------------------------------------

@pytest.fixture
def read_only(monkeypatch):
    """Make a directory behave like a read-only mount (as root, permission bits do not stop writes)."""
    import builtins
    import errno
    import os
    import tempfile

    roots: list[str] = []

    def blocked(path) -> bool:
        try:
            resolved = os.path.realpath(os.fspath(path))
        except TypeError:
            return False
        return any(resolved == root or resolved.startswith(root + os.sep) for root in roots)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_mkstemp, real_mkdtemp, real_replace = tempfile.mkstemp, tempfile.mkdtemp, os.replace

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and blocked(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if blocked(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def fake_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and blocked(dir):
            refuse(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def fake_mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and blocked(dir):
            refuse(dir)
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", fake_mkstemp)
    monkeypatch.setattr(tempfile, "mkdtemp", fake_mkdtemp)

    def make(path):
        path.mkdir(parents=True, exist_ok=True)
        roots.append(os.path.realpath(path))
        return path

    return make


def test_a_read_only_place_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import errno
    import shutil

    from echoink.io import NoSpaceLeftError, UnwritableError, disk_is_full, reporting_full_disk

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1024))  # almost full, too
    assert not disk_is_full(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    assert not disk_is_full(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert disk_is_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert disk_is_full(RuntimeError("write failed"), tmp_path)  # no errno: the free space decides
    with pytest.raises(UnwritableError, match=f"cannot write {tmp_path}/x: read-only file system; choose a "
                                              "location on a writable file system"):
        with reporting_full_disk(tmp_path / "x"):
            raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(UnwritableError, match="permission denied; choose a directory you can write to"):
        with reporting_full_disk(tmp_path / "x"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(NoSpaceLeftError):
        with reporting_full_disk(tmp_path / "x"):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_the_installed_command_is_the_one_with_the_catch_all():
    import tomllib
    from pathlib import Path

    import echoink.cli

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module, attribute = pyproject["project"]["scripts"]["echoink"].split(":")
    assert module == "echoink.cli" and getattr(echoink.cli, attribute) is echoink.cli.main


def test_every_command_names_a_read_only_output_place(tiny_model_dir, mixed_dataset, tmp_path, read_only):
    runner = CliRunner()
    run_dir = tmp_path / "run"   # a finished run to report, plot and mine, then made read-only
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    (run_dir / "completions.jsonl").write_text(json.dumps({"step": 1, "problem_id": 1, "sample_idx": 0,
                                                           "completion": "<think>wait</think><answer>A</answer>",
                                                           "rewards": {"accuracy": 1.0}}) + "\n")
    read_only(run_dir)
    ro = read_only(tmp_path / "ro")
    cause = "read-only file system; choose a location on a writable file system"
    train = runner.invoke(app, _train_args(tiny_model_dir, mixed_dataset, ro / "out", "max_steps=1"))
    _one_line_error(train, f"cannot write {ro}", cause)
    resume = runner.invoke(app, _train_args(tiny_model_dir, mixed_dataset, run_dir, "resume=true"))
    _one_line_error(resume, f"cannot write {run_dir}", cause)
    evaluation = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                     f"{mixed_dataset}/valid/omni_rl_format_valid.json", "--out", str(ro / "p.jsonl")])
    _one_line_error(evaluation, f"cannot write {ro}", cause)
    for command in (["report", str(run_dir)], ["plot", str(run_dir)], ["aha", str(run_dir)],
                    ["data", "synth", "--out", str(ro / "data"), "--train", "1", "--valid", "1"],
                    ["export", "--model", str(tiny_model_dir), "--out", str(ro / "export"), "--layout", "thinker"]):
        _one_line_error(runner.invoke(app, command), "cannot write", cause)


def test_report_out_an_existing_directory_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(tmp_path)])
    _one_line_error(result, f"--out {tmp_path}: is a directory; give the HTML file to write")


# ---- item 6: eval on a full disk ends in one line -------------------------------------------------------------

def test_eval_on_a_full_disk_is_one_line(tiny_model_dir, mixed_dataset, tmp_path, monkeypatch):
    import errno
    import os

    out = tmp_path / "p.jsonl"
    real_write = os.write

    def full_disk_write(descriptor, data):
        if os.path.realpath(f"/proc/self/fd/{descriptor}") == str(out.resolve()):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", full_disk_write)
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                      f"{mixed_dataset}/valid/omni_rl_format_valid.json", "--out", str(out),
                                      "--limit", "2", "--max-new-tokens", "4", "--no-progress"])
    flat = _one_line_error(result, f"no space left on {out}: free space, then run the command again")
    assert flat.count("error:") == 1


# ---- item 6b: preemption is a checkpoint, not a loss ------------------------------------------------------------

def _train_process(tiny_model_dir, mixed_dataset, out, *extra, log=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           str(Path(__file__).resolve().parent)]))
    args = [sys.executable, "-m", "echoink.cli", *_train_args(tiny_model_dir, mixed_dataset, out, "--quiet",
                                                              "max_steps=4", "learning_rate=1e-3", "seed=3",
                                                              "torch_num_threads=1",
                                                              "reward_funcs=[_train_worker:spread_reward,format]",
                                                              *extra)]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


@pytest.mark.parametrize("signal_name", ["SIGUSR1", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_a_preemption_signal_checkpoints_and_the_resume_is_exact(tiny_model_dir, mixed_dataset, tmp_path,
                                                                 signal_name):
    import os
    import signal
    import time

    from safetensors.torch import load_file

    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    reference = _train_process(tiny_model_dir, mixed_dataset, straight, log=tmp_path / "a.err")
    victim = _train_process(tiny_model_dir, mixed_dataset, preempted, log=tmp_path / "b.err")
    deadline = time.monotonic() + 300
    while not (preempted / "metrics.jsonl").is_file() or not (preempted / "metrics.jsonl").read_text():
        assert victim.poll() is None, (tmp_path / "b.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "no step logged in time"
        time.sleep(0.02)
    os.kill(victim.pid, getattr(signal, signal_name))  # mid-run: during step 2 (or its logging)
    assert victim.wait(timeout=300) == 75, (tmp_path / "b.err").read_text()[-3000:]
    err = (tmp_path / "b.err").read_text()
    checkpoints = sorted(p.name for p in preempted.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (preempted / "final").exists(), (checkpoints, err)
    step = int(checkpoints[0].split("-")[1])
    assert f"preempted by {signal_name} after step {step} of 4: wrote {preempted / checkpoints[0]}; resume with: " \
           f"echoink train" in err and err.rstrip().endswith("resume=true"), err
    resumed = _train_process(tiny_model_dir, mixed_dataset, preempted, "resume=true", log=tmp_path / "c.err")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "c.err").read_text()[-3000:]
    assert f"resumed from {preempted / checkpoints[0]} at step {step}" in (tmp_path / "c.err").read_text()
    assert reference.wait(timeout=300) == 0, (tmp_path / "a.err").read_text()[-3000:]
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(preempted / "final" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # training did move the weights
    assert [json.loads(line)["step"] for line in (preempted / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ---- item 7: user code fails politely everywhere ----------------------------------------------------------------

USER_TYPE = '''
from echoink.problem_types import ProblemType, Score

class Graded(ProblemType):
    name = "{name}"
    binary = False

    def parse_solution(self, answer, record):
        {parse}
        return answer

    def score(self, answer, solution):
        {score}
'''


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """Write user modules into an importable directory; the registry and sys.modules are restored after."""
    import sys

    from echoink import problem_types

    monkeypatch.syspath_prepend(str(tmp_path / "user"))
    (tmp_path / "user").mkdir()
    monkeypatch.setattr(problem_types, "PROBLEM_TYPES", dict(problem_types.PROBLEM_TYPES))
    import echoink.data.records as records_module

    monkeypatch.setattr(records_module, "PROBLEM_TYPES", problem_types.PROBLEM_TYPES)
    written = []

    def write(name: str, text: str) -> str:
        (tmp_path / "user" / f"{name}.py").write_text(text)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def _user_type(write, module, *, parse="pass", score="return Score(1.0, True)", name=None):
    write(module, USER_TYPE.format(name=name or module, parse=parse, score=score))
    return f"{module}:Graded"


def _graded_data(tmp_path, mixed_dataset, problem_type: str) -> str:
    items = [item for item in json.loads((mixed_dataset / "valid" / "omni_rl_format_valid.json").read_text())
             if item["data_type"] == "text"][:2]
    for item in items:
        item.update(problem_type=problem_type, solution="<answer>3</answer>")
        item.pop("options", None)
    path = tmp_path / f"{problem_type}.json"
    path.write_text(json.dumps(items))
    return str(path)


@pytest.mark.parametrize("body, expected", [
    ("raise RuntimeError('boom at import')", "importing module '{m}' failed: RuntimeError: boom at import"),
    ("def broken(:\n    pass", "importing module '{m}' failed: SyntaxError: "),
    ("import no_such_dependency_xyz", "cannot import module '{m}': No module named 'no_such_dependency_xyz'"),
])
def test_user_code_that_fails_at_import_is_one_line(user_modules, tmp_path, mixed_dataset, body, expected):
    module = user_modules(f"broken_{abs(hash(body)) % 10**6}", body)
    data = f"{mixed_dataset}/valid/omni_rl_format_valid.json"
    result = CliRunner().invoke(app, ["data", "validate", data, "--problem-types", f"{module}:Graded"])
    _one_line_error(result, f"problem type '{module}:Graded': " + expected.format(m=module))
    reward = CliRunner().invoke(app, ["train", "--dry-run", f"train_data={data}", f"output_dir={tmp_path / 'r'}",
                                      f"model_path={tmp_path}", f"reward_funcs=[{module}:f]"])
    _one_line_error(reward, f"reward '{module}:f': ", expected.format(m=module).split(":")[0])


def test_a_user_type_whose_constructor_or_attributes_are_wrong_is_refused_at_registration(user_modules):
    from echoink.problem_types import register_problem_types

    user_modules("ctor_fails", USER_TYPE.format(name="ctor", parse="pass", score="pass")
                 + "\n    def __init__(self):\n        raise KeyError('no config')\n")
    with pytest.raises(ValueError, match=r"problem type ctor_fails:Graded: its constructor raised KeyError: 'no config'"):
        register_problem_types(["ctor_fails:Graded"])
    user_modules("int_suffix", USER_TYPE.format(name="intsuffix", parse="pass", score="pass")
                 + "\nGraded.suffix = 3\n")
    with pytest.raises(ValueError, match=r"problem type 'intsuffix' \(int_suffix:Graded\): 'suffix' must be a string "
                                         r"or None, got int 3"):
        register_problem_types(["int_suffix:Graded"])


def test_a_user_parse_solution_that_raises_names_the_record(user_modules, tmp_path, mixed_dataset):
    spec = _user_type(user_modules, "parse_fails", parse="return 1 / 0")
    data = _graded_data(tmp_path, mixed_dataset, "parse_fails")
    result = CliRunner().invoke(app, ["data", "validate", data, "--problem-types", spec])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (f"{data}:0:solution: problem type 'parse_fails' (parse_fails:Graded): parse_solution() raised "
            "ZeroDivisionError: division by zero") in result.output.replace("\n", "")


@pytest.mark.parametrize("score, shown", [
    ("return Score(5.0, True)", "Score(value=5.0, parsed=True)"),
    pytest.param("return Score(float('nan'), True)", "Score(value=nan, parsed=True)", marks=pytest.mark.slow),
    pytest.param("return Score('high', True)", "Score(value='high', parsed=True)", marks=pytest.mark.slow),
    pytest.param("return 0.5", "0.5", marks=pytest.mark.slow),
    ("raise LookupError('no table')", None),
])
def test_user_scores_are_numbers_in_0_1_in_training_and_evaluation(user_modules, tmp_path, mixed_dataset,
                                                                   tiny_model_dir, score, shown):
    module = f"score_{abs(hash(score)) % 10**6}"
    spec = _user_type(user_modules, module, score=score)
    data = _graded_data(tmp_path, mixed_dataset, module)
    what = ("score() raised LookupError: no table" if shown is None else
            f"score() returned {shown}; it must return Score(value, parsed) with value a number in [0, 1]")
    evaluation = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", data, "--out",
                                          str(tmp_path / "p.jsonl"), "--problem-types", spec, "--max-new-tokens", "2",
                                          "--no-progress"])
    _one_line_error(evaluation, f"{data}:0 (problem_id", f"problem type '{module}' ({spec}): {what}")
    training = CliRunner().invoke(app, _train_args(tiny_model_dir, mixed_dataset, tmp_path / "run", "max_steps=1",
                                                   f"train_data={data}", f"problem_types=[{spec}]", "--quiet"))
    _one_line_error(training, f"record {data}:", f"problem type '{module}' ({spec}): {what}")


# ---- item 8: nothing non-finite reaches a rollout -----------------------------------------------------------------

def test_learning_rates_above_one_need_a_named_setting():
    with pytest.raises(ConfigError, match=r"learning_rate=1e\+30 is above 1, .* set allow_large_learning_rate=true"):
        load_config(None, ["learning_rate=1e30"])
    assert load_config(None, ["learning_rate=1e30", "allow_large_learning_rate=true"]).learning_rate == 1e30


def test_weights_that_an_update_ruins_stop_the_run_before_the_next_rollout(tiny_model_dir, mixed_dataset, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _train_args(tiny_model_dir, mixed_dataset, out, "max_steps=3", "save_steps=1",
                                                 "learning_rate=1e30", "allow_large_learning_rate=true",
                                                 "max_grad_norm=0", "--quiet",
                                                 "reward_funcs=[_train_worker:spread_reward,format]"))
    flat = _one_line_error(result, "step 1: the weights after this step's update are not finite (or overflow); "
                                   "the run stopped before the next rollout. Likely setting: learning_rate=1e+30",
                           "no checkpoint was written before it")
    assert "probability tensor" not in flat and not (out / "final").exists()


def test_non_finite_logits_are_caught_before_sampling(tiny_model_dir, mixed_dataset):
    from echoink.data import load_dataset
    from echoink.grpo.nonfinite import LogitsGuard, NonFiniteModelError, weights_finite
    from echoink.model.engine import rollout_engine
    from echoink.model import load_thinker
    from echoink.model.generation import SamplingSettings
    from echoink.model.inputs import encode_prompt

    thinker, processor = load_thinker(tiny_model_dir)
    record = [r for r in load_dataset(mixed_dataset / "train" / "omni_rl_format_train.json")
              if r.data_type == "text"][0]
    prompt = encode_prompt(record, processor)
    assert weights_finite(list(thinker.parameters()))
    with torch.no_grad():
        thinker.get_output_embeddings().weight[0, 0] = float("nan")
    assert not weights_finite(list(thinker.parameters()))
    for sharing in ("none", "full"):
        with pytest.raises(NonFiniteModelError, match="logits before sampling are not finite"):
            with LogitsGuard(thinker):
                rollout_engine(thinker, processor.tokenizer, sharing).generate([prompt], SamplingSettings(2, 4))
    with torch.no_grad():  # finite but huge weights overflow the norm: unusable too
        thinker.get_output_embeddings().weight[0, 0] = 3e38
    assert not weights_finite(list(thinker.parameters()))


# ---- item 9: eval --samples in bounded memory -------------------------------------------------------------------

def test_eval_samples_have_a_ceiling_checked_before_the_model_loads(mixed_dataset, tmp_path):
    data = f"{mixed_dataset}/valid/omni_rl_format_valid.json"
    common = ["eval", "--model", str(tmp_path / "no-model"), "--data", data, "--out", str(tmp_path / "p.jsonl")]
    huge = CliRunner().invoke(app, [*common, "--samples", "100000000"])
    _one_line_error(huge, "--samples 100000000 is more than 1024 answers per problem")
    wide = CliRunner().invoke(app, [*common, "--samples", "1024", "--batch-size", "32"])
    _one_line_error(wide, "--batch-size 32 x 256 samples = 8192 replies generated at once, more than 4096; "
                          "lower --batch-size to at most 16")


def test_many_samples_of_one_problem_are_generated_in_pieces(tiny_model_dir, mixed_dataset, tmp_path, monkeypatch):
    import echoink.eval.generation as generation_module
    from echoink.eval.run import evaluate
    from echoink.model.engine import TransformersGenerateEngine

    calls = []
    real_generate = TransformersGenerateEngine.generate

    def counting(self, prompts, sampling, generators=None):
        calls.append(len(prompts) * sampling.num_generations)
        return real_generate(self, prompts, sampling, generators)

    monkeypatch.setattr(TransformersGenerateEngine, "generate", counting)
    data = f"{mixed_dataset}/valid/omni_rl_format_valid.json"
    whole = evaluate(tiny_model_dir, data, tmp_path / "whole.jsonl", greedy=False, samples=3, limit=1,
                     max_new_tokens=2, batch_size=1, progress=False)
    assert calls == [3] and whole["n"] == 3
    calls.clear()
    monkeypatch.setattr(generation_module, "SAMPLES_PER_CALL", 2)
    pieces = evaluate(tiny_model_dir, data, tmp_path / "pieces.jsonl", greedy=False, samples=5, limit=1,
                      max_new_tokens=2, batch_size=1, progress=False)
    assert calls == [2, 2, 1] and pieces["n"] == 5
    rows = [json.loads(line) for line in (tmp_path / "pieces.jsonl").read_text().splitlines()]
    assert sorted(row["sample_idx"] for row in rows) == [0, 1, 2, 3, 4]


# ---- item 10: the smaller ones --------------------------------------------------------------------------------

def test_export_onto_a_truncated_base_names_the_file(tiny_model_dir, tiny_full_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_full_dir, base)
    from safetensors import safe_open

    weights = sorted(base.glob("*.safetensors"))
    cut = weights[-1]
    if not (base / "model.safetensors.index.json").is_file():  # sharded layout: files are opened only to copy
        with safe_open(str(cut), "pt") as handle:
            weight_map = {name: cut.name for name in handle.keys()}
        (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"),
                                      "--base", str(base)])
    _one_line_error(result, f"{cut}: not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_user_text_keeps_its_square_brackets(tmp_path, mixed_dataset):
    items = [item for item in json.loads((mixed_dataset / "valid" / "omni_rl_format_valid.json").read_text())
             if item["data_type"] == "text"][:1]
    items[0].update(problem_type="temporal retrieval", solution="<answer>[nan, 3]</answer>", duration=10)
    items[0].pop("options", None)
    path = tmp_path / "[bold]data.json"
    path.write_text(json.dumps(items))
    result = CliRunner().invoke(app, ["data", "validate", str(path)], terminal_width=400)
    assert result.exit_code == 1
    assert "[nan, 3]" in result.output and f"{path}:0:solution" in result.output


def test_a_run_named_with_dollar_signs_is_plotted_and_reported(tmp_path):
    run_dir = tmp_path / "run $x_1$ cost $5"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.1 * s}) + "\n" for s in (1, 2)))
    assert CliRunner().invoke(app, ["plot", str(run_dir)]).exit_code == 0
    result = CliRunner().invoke(app, ["report", str(run_dir), "--no-media"])
    assert result.exit_code == 0, result.output
    assert "run $x_1$ cost $5" in (run_dir / "report.html").read_text()


def test_num_completions_to_print_negative_says_so_once():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["num_completions_to_print=-1"])
    assert str(caught.value).count("num_completions_to_print must be >= 0") == 1


def test_dry_run_makes_the_family_checks_of_the_real_run(tiny_model_dir, qwen3_model_dir, mixed_dataset, tmp_path):
    runner = CliRunner()
    data = f"train_data={mixed_dataset}/train/omni_rl_format_train.json"
    dense = runner.invoke(app, ["train", "--dry-run", f"model_path={tiny_model_dir}", data,
                                "router_aux_loss_coef=0.01", "group_sharing=none"])
    _one_line_error(dense, "router_aux_loss_coef=0.01: Qwen2.5-Omni has no mixture-of-experts router")
    experts = ["train", "--dry-run", f"model_path={qwen3_model_dir}", data, "use_peft=true",
               "lora_target_modules=[language_model,experts]", "group_sharing=none"]
    _one_line_error(runner.invoke(app, [*experts, "lora_dropout=0.05"]),
                    "lora_target_modules with 'experts': PEFT's LoRA on the fused expert parameters has no dropout; "
                    "set lora_dropout: 0 (got 0.05)")
    assert runner.invoke(app, [*experts, "lora_dropout=0"]).exit_code == 0
    missing = runner.invoke(app, ["train", "--dry-run", f"model_path={tmp_path / 'not-downloaded'}", data])
    assert missing.exit_code == 0 and "its family checks are skipped" in missing.output


def test_peft_refusals_are_one_line(tiny_model_dir):
    from echoink.config import TrainConfig
    from echoink.model import load_thinker
    from echoink.model.families import UnsupportedModelError
    from echoink.model.trainable import wrap_lora

    thinker, _ = load_thinker(tiny_model_dir)
    with pytest.raises(UnsupportedModelError) as caught:
        wrap_lora(thinker, TrainConfig(use_peft=True, lora_r=2, lora_target_modules=["no_such_projection"]))
    message = str(caught.value)
    assert "\n" not in message and "PEFT refused it" in message and len(message) < 500


def test_eval_checks_its_arguments_before_loading_the_model(mixed_dataset, tmp_path):
    from echoink.eval.run import evaluate

    data = f"{mixed_dataset}/valid/omni_rl_format_valid.json"
    for settings, message in (({"batch_size": 0}, "batch_size must be >= 1, got 0"),
                              ({"max_prompt_length": 0}, "max_prompt_length must be >= 1"),
                              ({"limit": -1}, "limit")):
        with pytest.raises(ValueError, match=message) as caught:
            evaluate(tmp_path / "no-model", data, tmp_path / "p.jsonl", **settings)
        assert "model directory does not exist" not in str(caught.value)


@pytest.mark.parametrize("value", [5.0, -0.1, float("nan"), float("inf"), "high", None, True, 0.5])
def test_checked_score_refuses_anything_but_a_score_in_0_1(value):
    from echoink.problem_types import PROBLEM_TYPES, Score, checked_score

    kind = PROBLEM_TYPES["multiple choice"]
    score = 0.5 if value == 0.5 and not isinstance(value, bool) else Score(value, True)
    with pytest.raises(ValueError, match=r"score\(\) returned .*; it must return Score\(value, parsed\) with value "
                                         r"a number in \[0, 1\]"):
        checked_score(kind, score)
    assert checked_score(kind, Score(1, True)) == Score(1.0, True)
