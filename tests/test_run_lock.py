"""One run per output directory, one writer per predictions file (issue 23, item 2)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echoink.cli import app
from echoink.data.synth import write_synthetic_dataset
from echoink.grpo.run_dir import locked_output_dir
from echoink.run_lock import STALE_AFTER_SECONDS, LockedError, directory_lock, file_lock, hold_lock

SRC = Path(__file__).resolve().parents[1] / "src"


def _holder(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_held_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    lock = directory_lock(tmp_path / "run")
    with hold_lock(lock, "output_dir run"):
        holder = _holder(lock)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(LockedError) as caught:
            with hold_lock(lock, "output_dir run"):
                pass
        message = str(caught.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and holder["started"] in message
        assert "output_dir run is in use" in message and "\n" not in message
    assert not lock.exists()  # removed by its holder at the end
    with hold_lock(lock, "output_dir run"):  # released: free again
        pass


def test_a_killed_holder_never_blocks_the_next_run(tmp_path):
    lock = directory_lock(tmp_path / "run")
    code = ("import sys, time; from echoink.run_lock import hold_lock\n"
            f"with hold_lock({str(lock)!r}, 'x'):\n    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {child.pid} on host"):
            with hold_lock(lock, "x"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert _holder(lock)["pid"] == child.pid  # the dead holder's record is still there ...
    with hold_lock(lock, "x"):                 # ... and recognised as stale at once on the same host
        assert _holder(lock)["pid"] == os.getpid()


def test_a_holder_on_another_host_counts_while_its_heartbeat_is_fresh(tmp_path):
    lock = directory_lock(tmp_path)
    record = {"host": "node-17", "pid": 4242, "started": "2026-01-01 00:00:00 UTC", "command": "echoink train"}
    lock.write_text(json.dumps({**record, "heartbeat": time.time() - 5}))
    with pytest.raises(LockedError, match="pid 4242 on host node-17, started 2026-01-01 00:00:00 UTC"):
        with hold_lock(lock, "x"):
            pass
    lock.write_text(json.dumps({**record, "heartbeat": time.time() - STALE_AFTER_SECONDS - 1}))
    with hold_lock(lock, "x"):
        assert _holder(lock)["host"] == socket.gethostname()


def test_a_dead_pid_on_this_host_is_stale_even_without_flock(tmp_path, monkeypatch):
    import echoink.run_lock as run_lock

    def no_flock(*_):  # a file system without locks (NFS mounted nolock): the record alone decides
        raise OSError(37, "No locks available")

    lock = directory_lock(tmp_path)
    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat": time.time()}))
    with hold_lock(lock, "x"):
        pass
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "heartbeat": time.time()}))
        with pytest.raises(LockedError, match=f"pid {live.pid}"):
            with hold_lock(lock, "x"):
                pass
    finally:
        live.kill()
        live.wait()


def test_only_the_main_process_of_a_launch_takes_the_lock(tmp_path, monkeypatch):
    with hold_lock(directory_lock(tmp_path), "x"):
        monkeypatch.setenv("RANK", "1")
        with locked_output_dir(tmp_path):  # a worker of the same run: no second lock
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(LockedError):
            with locked_output_dir(tmp_path):
                pass


def test_train_eval_and_demo_refuse_a_locked_place_in_one_line(tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    with hold_lock(directory_lock(run_dir), "output_dir"):
        result = runner.invoke(app, ["train", f"output_dir={run_dir}", f"model_path={tmp_path / 'm'}",
                                     f"train_data={tmp_path / 'd.json'}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"output_dir {run_dir} is in use by pid {os.getpid()}" in result.output.replace("\n", " ")

    info = write_synthetic_dataset(tmp_path / "data", n_train=1, n_valid=2, seed=0)
    predictions = tmp_path / "pred.jsonl"
    with hold_lock(file_lock(predictions), "predictions"):
        result = runner.invoke(app, ["eval", "--model", str(tmp_path / "no-model"), "--data",
                                     info["splits"]["valid"]["json"], "--out", str(predictions)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"predictions file {predictions} is in use by pid" in result.output.replace("\n", " ")

    demo_dir = tmp_path / "demo"
    with hold_lock(directory_lock(demo_dir), "demo"):
        result = runner.invoke(app, ["demo", "--out", str(demo_dir)])
    assert result.exit_code == 1 and f"demo directory {demo_dir} is in use" in result.output.replace("\n", " ")
