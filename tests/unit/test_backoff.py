"""Accuracy-aware back-off (compress/backoff.py) on tiny stages: a model that misses its gate is compressed again
with the next milder step, only that model, each attempt its own checkpoint, resumable after SIGKILL."""
import json
import os
import re
import subprocess
import sys

import pytest

from compress.backoff import RECORD_FILE, load_attempts, run_with_backoff
from compress.checkpoint import Manifest
from compress.errors import ConfigError, GateError
from tests.helpers.dummy_stages import CALLS, SECTIONS, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIPELINE = ("t_init", "t_level", "t_level_gate")
# model a starts at level 1.0 (misses max_level 0.3), model b at 0.1 (passes)
SECTIONS_TEXT = """
TLevel: {per_model: {b: {level: 0.1}}}
TLevelGate: {max_level: 0.3}
"""
STEPS = "Backoff: {steps: [{TLevel.level: 0.5}, {TLevel.level: 0.2}, {TLevel.level: 0.05}]}\n"


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


def _config(tmp_path, backoff=STEPS):
    return write_config(str(tmp_path), PIPELINE, extra=SECTIONS_TEXT + backoff)


def test_a_missing_model_is_retried_milder_until_it_passes_and_only_it(tmp_path):
    lines = []
    manifest = run_with_backoff(_config(tmp_path), [], SECTIONS, log=lines.append)
    run_dir = os.path.join(str(tmp_path), "run")
    attempts = load_attempts(run_dir)
    # 1.0 missed, 0.5 missed, 0.2 passed: the third step is never tried
    assert [a["step"] for a in attempts] == [{"TLevel.level": 0.5}, {"TLevel.level": 0.2}]
    assert all(a["models"] == ["a"] for a in attempts) and "level 1.0 > 0.3" in attempts[0]["reason"]
    assert manifest.entry("t_level_gate", "a")["metrics"]["level"] == 0.2
    assert manifest.entry("t_level_gate", "a")["status"] == "done"
    # model b and both baselines ran once: the back-off re-ran a's changed stages only
    assert CALLS.count(("t_init", "a")) == 1 and CALLS.count(("t_level", "b")) == 1
    assert CALLS.count(("t_level", "a")) == 3
    # every attempt is its own checkpoint, none deleted
    assert sorted(os.listdir(os.path.join(run_dir, "stages", "t_level", "a"))) == ["v1", "v2", "v3"]
    assert manifest.entry("t_level", "a")["dir"].endswith("/v3")
    announced = [line for line in lines if line.startswith("back-off attempt")]
    assert [line.split(" (after")[0] for line in announced] == ["back-off attempt 2: a with TLevel.level=0.5",
                                                                "back-off attempt 3: a with TLevel.level=0.2"]


def test_a_step_the_model_does_not_use_is_skipped_not_run(tmp_path):
    # a's TLevel ignores ``level`` (mode fixed): the first step would only repeat the failed attempt
    config = write_config(str(tmp_path), PIPELINE, extra=SECTIONS_TEXT.replace("{b: {level: 0.1}}",
                                                                               "{a: {mode: fixed}, b: {level: 0.1}}")
                          + "Backoff: {steps: [{TLevel.level: 0.5}, {TLevel.mode: level, TLevel.level: 0.2}]}\n")
    lines = []
    manifest = run_with_backoff(config, [], SECTIONS, log=lines.append)
    attempts = load_attempts(os.path.join(str(tmp_path), "run"))
    assert [(a["number"], a["step_index"], a["models"]) for a in attempts] == [(2, 1, ["a"])]
    assert "back-off step 1 (TLevel.level) skipped: it does not change a (the key is not used with a's TLevel.mode " \
           "fixed)" in lines
    assert CALLS.count(("t_level", "a")) == 2 and manifest.entry("t_level_gate", "a")["metrics"]["level"] == 0.2
    # with no step left that changes it, the gate error says so
    (tmp_path / "again").mkdir()
    config = write_config(str(tmp_path / "again"), PIPELINE, extra=SECTIONS_TEXT.replace(
        "{b: {level: 0.1}}", "{a: {mode: fixed}, b: {level: 0.1}}") + "Backoff: {steps: [{TLevel.level: 0.5}]}\n")
    with pytest.raises(GateError, match=r"level 1.0 > 0.3; head stays on 't_level'; no Backoff.steps left that "
                                        r"change a$"):
        run_with_backoff(config, [], SECTIONS, log=lambda line: None)


def test_the_same_command_after_success_runs_nothing(tmp_path):
    config = _config(tmp_path)
    run_with_backoff(config, [], SECTIONS, log=lambda line: None)
    CALLS.clear()
    run_with_backoff(config, [], SECTIONS, log=lambda line: None)
    assert CALLS == []


def test_no_step_passes_gives_the_gate_error_with_every_attempt(tmp_path):
    config = _config(tmp_path, "Backoff: {steps: [{TLevel.level: 0.9}, {TLevel.level: 0.8}]}\n")
    with pytest.raises(GateError, match=r"back-off tried: attempt 2: a with TLevel.level=0.9 .*attempt 3: a with "
                                        r"TLevel.level=0.8 .*no Backoff.steps left") as info:
        run_with_backoff(config, [], SECTIONS, log=lambda line: None)
    assert info.value.models == ("a",) and info.value.exit_code == 3


def test_time_budget_stops_the_back_off(tmp_path):
    config = _config(tmp_path, STEPS.replace("]}", "], time_budget_min: 1}"))
    ticks = iter([0.0, 120.0, 240.0])  # the first attempt already took two minutes
    with pytest.raises(GateError, match=r"Backoff.time_budget_min \(1\) spent \(2.0 min\)"):
        run_with_backoff(config, [], SECTIONS, log=lambda line: None, clock=lambda: next(ticks))
    assert load_attempts(os.path.join(str(tmp_path), "run")) == []


def test_without_steps_the_gate_error_is_unchanged(tmp_path):
    with pytest.raises(GateError, match="stage 't_level_gate' failed its gate for model 'a': level 1.0 > 0.3"):
        run_with_backoff(_config(tmp_path, ""), [], SECTIONS, log=lambda line: None)


@pytest.mark.parametrize("backoff, message", [
    ("Backoff: {steps: [{Prune.flops_target: 0.2}]}", r"Backoff.steps\[0\]: 'Prune.flops_target' is not "
                                                       r"Section.key of a stage section in this config"),
    ("Backoff: {steps: [{TLevel.levle: 0.2}]}", "levle"),
    ("Backoff: {stpes: []}", "stpes"),
    ("Backoff: {steps: [{TLevel.level: 0.2}], time_budget_min: 0}", "time_budget_min: must be > 0"),
])
def test_bad_backoff_sections_are_one_line_config_errors(tmp_path, backoff, message):
    with pytest.raises(ConfigError, match=message):
        run_with_backoff(_config(tmp_path, backoff + "\n"), [], SECTIONS, log=lambda line: None)


def test_another_command_does_not_inherit_the_record(tmp_path):
    config = _config(tmp_path)
    run_with_backoff(config, [], SECTIONS, log=lambda line: None)
    run_dir = os.path.join(str(tmp_path), "run")
    assert len(load_attempts(run_dir)) == 2
    CALLS.clear()
    # a different command (b's start level changed): a starts over from 1.0 and backs off again
    manifest = run_with_backoff(config, ["TLevel.per_model.b.level=0.2"], SECTIONS, log=lambda line: None)
    assert manifest.entry("t_level_gate", "b")["metrics"]["level"] == 0.2
    assert [a["step"]["TLevel.level"] for a in load_attempts(run_dir)] == [0.5, 0.2]


def test_sigkill_inside_a_back_off_attempt_resumes_inside_it(tmp_path):
    config = _config(tmp_path)
    run_dir = os.path.join(str(tmp_path), "run")
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "tests.helpers.dummy_stages", "-c", config]
    # 1.0 and 0.5 miss; killed in the gate of the third attempt (level 0.2), after its t_level checkpoint
    killed = subprocess.run(cmd, cwd=ROOT, env=dict(env, DIE_AT_LEVEL="0.2"), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert [a["number"] for a in json.load(open(os.path.join(run_dir, RECORD_FILE)))["attempts"]] == [2, 3]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("back-off attempt 3: a with TLevel.level=0.2")
    # resumed inside attempt 3: everything but the killed gate was reused
    stage_lines = [line for line in lines if re.match(r"\[\d/\d\] ", line)]
    assert [line.split()[1:3] for line in stage_lines if "skipped" not in line] == [["t_level_gate", "a"]]
    assert Manifest.load(run_dir).entry("t_level_gate", "a")["metrics"]["level"] == 0.2
    listing = subprocess.run(cmd + ["--list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "back-off attempt 2: a with TLevel.level=0.5" in listing.stdout
    assert "back-off attempt 3: a with TLevel.level=0.2" in listing.stdout
