"""Runner: resume, config-hash invalidation, rollback, atomic checkpoints, crash and SIGKILL recovery."""
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest

from compress.checkpoint import Manifest
from compress.config import load_config
from compress.errors import CheckpointError
from compress.runner import Runner
from tests.helpers import dummy_stages
from tests.helpers.dummy_stages import CALLS, SECTIONS, forward, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_runner(tmp_path, *overrides, pipeline=("t_init", "t_perturb", "t_check")):
    path = write_config(str(tmp_path), pipeline)
    cfg = load_config(path, overrides, stage_sections=SECTIONS)
    lines = []
    return Runner(cfg, log=lines.append), lines


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


def test_rerun_skips_finished_stages(tmp_path):
    runner, _ = make_runner(tmp_path)
    manifest = runner.run()
    assert len(CALLS) == 6 and manifest.head == "t_check"
    CALLS.clear()
    runner, lines = make_runner(tmp_path)
    runner.run()
    assert CALLS == []
    assert all("skipped" in line for line in lines)


def test_changed_section_reruns_that_stage_and_later_only(tmp_path):
    make_runner(tmp_path)[0].run()
    CALLS.clear()
    runner, _ = make_runner(tmp_path, "TPerturb.delta=0.02")
    manifest = runner.run()
    assert ("t_init", "a") not in CALLS
    assert sorted(CALLS) == sorted([("t_perturb", "a"), ("t_perturb", "b"), ("t_check", "a"), ("t_check", "b")])
    # the old checkpoint is kept, the new one is v2
    assert manifest.entry("t_perturb", "a")["dir"].endswith("/v2")
    assert os.path.isdir(os.path.join(runner.run_dir, "stages", "t_perturb", "a", "v1"))


def test_per_model_override_reruns_only_that_model(tmp_path):
    make_runner(tmp_path)[0].run()
    CALLS.clear()
    make_runner(tmp_path, "TPerturb.per_model={b: {delta: 0.5}}")[0].run()
    assert sorted(CALLS) == [("t_check", "b"), ("t_perturb", "b")]


def test_materialize_reproduces_outputs_bit_for_bit(tmp_path):
    runner, _ = make_runner(tmp_path)
    runner.run()
    manifest = Manifest.load(runner.run_dir)
    rebuilt = runner.materialize(manifest, "a", 1)
    expected = manifest.entry("t_perturb", "a")["metrics"]["out_mean"]
    assert float(forward(rebuilt).mean()) == expected
    baseline = runner.materialize(manifest, "a", 0)
    assert not np.array_equal(forward(baseline), forward(rebuilt))


def test_rollback_marks_later_stages_stale_and_keeps_files(tmp_path):
    runner, lines = make_runner(tmp_path)
    runner.run()
    runner.rollback("t_init")
    manifest = Manifest.load(runner.run_dir)
    assert manifest.head == "t_init"
    assert manifest.entry("t_perturb", "a")["status"] == "stale"
    assert manifest.entry("t_init", "a")["status"] == "done"
    CALLS.clear()
    make_runner(tmp_path)[0].run()
    assert ("t_init", "a") not in CALLS and ("t_perturb", "a") in CALLS
    for version in ("v1", "v2"):
        assert os.path.isdir(os.path.join(runner.run_dir, "stages", "t_perturb", "a", version))


def test_rollback_to_unknown_stage_lists_choices(tmp_path):
    runner, _ = make_runner(tmp_path)
    with pytest.raises(Exception, match="not in Pipeline; choose one of: t_init, t_perturb, t_check"):
        runner.rollback("prune")


def test_exception_in_stage_leaves_previous_state_intact(tmp_path, monkeypatch):
    runner, _ = make_runner(tmp_path)
    monkeypatch.setenv("RAISE_IN_STAGE", "t_check")
    with pytest.raises(RuntimeError):
        runner.run()
    manifest = Manifest.load(runner.run_dir)
    assert manifest.head == "t_perturb"
    assert manifest.entry("t_check", "a") is None
    assert not os.path.exists(os.path.join(runner.run_dir, "stages", "t_check", "a"))  or \
        os.listdir(os.path.join(runner.run_dir, "stages", "t_check", "a")) == []
    monkeypatch.delenv("RAISE_IN_STAGE")
    CALLS.clear()
    make_runner(tmp_path)[0].run()
    assert sorted(CALLS) == [("t_check", "a"), ("t_check", "b")]


def test_crash_while_writing_manifest_keeps_old_manifest(tmp_path, monkeypatch):
    runner, _ = make_runner(tmp_path, pipeline=("t_init", "t_perturb"))
    runner.run()
    before = open(os.path.join(runner.run_dir, "manifest.json")).read()
    real_replace = os.replace

    def failing_replace(src, dst):
        if dst.endswith("manifest.json"):
            raise OSError("simulated power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    runner2, _ = make_runner(tmp_path, "TPerturb.delta=0.5", pipeline=("t_init", "t_perturb"))
    with pytest.raises(OSError):
        runner2.run()
    assert open(os.path.join(runner.run_dir, "manifest.json")).read() == before
    assert not [f for f in os.listdir(runner.run_dir) if f.endswith(".tmp")]


def test_corrupt_checkpoint_is_named(tmp_path):
    runner, _ = make_runner(tmp_path)
    manifest = runner.run()
    weights = os.path.join(manifest.abs_dir(manifest.entry("t_perturb", "a")), "model.pdparams")
    with open(weights, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CheckpointError, match=r"stage 't_perturb', model 'a': checkpoint file corrupt .*model.pdparams"):
        runner.materialize(Manifest.load(runner.run_dir), "a", 2)


def test_sigkill_mid_stage_then_rerun_completes_without_redoing(tmp_path):
    config = write_config(str(tmp_path))
    env = dict(os.environ, PYTHONPATH=ROOT, DIE_IN_STAGE="t_check")
    cmd = [sys.executable, "-m", "tests.helpers.dummy_stages", "-c", config]
    killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    run_dir = os.path.join(str(tmp_path), "run")
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert manifest["head"] == "t_perturb"
    assert "t_check" not in manifest["entries"]
    env.pop("DIE_IN_STAGE")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert sum("skipped" in line for line in lines) == 4  # t_init and t_perturb for both models
    assert json.load(open(os.path.join(run_dir, "manifest.json")))["head"] == "t_check"
    # the killed attempt left only an unreferenced temporary directory, never a v<N> checkpoint
    leftovers = os.listdir(os.path.join(run_dir, "stages", "t_check", "a"))
    assert "v1" not in leftovers or json.load(open(os.path.join(run_dir, "manifest.json")))["entries"][
        "t_check"]["a"]["dir"].endswith("v1")


def test_list_shows_status(tmp_path, capsys):
    from compress.runner import print_listing
    runner, _ = make_runner(tmp_path)
    runner.run()
    runner.rollback("t_perturb")
    print_listing(runner)
    out = capsys.readouterr().out
    assert re.search(r"^t_check +a +stale ", out, re.M)
    assert "head: t_perturb" in out


def test_gate_failure_stops_after_every_model_ran_the_stage(tmp_path):
    from compress.errors import GateError
    runner, lines = make_runner(tmp_path, "TGate.fail_for=a", pipeline=("t_init", "t_perturb", "t_gate", "t_check"))
    with pytest.raises(GateError, match="stage 't_gate' failed its gate for model 'a': out_sum too low; head stays "
                                        "on 't_perturb'"):
        runner.run()
    manifest = Manifest.load(runner.run_dir)
    assert manifest.entry("t_gate", "a")["status"] == "failed"
    assert manifest.entry("t_gate", "b")["status"] == "done"
    assert ("t_check", "a") not in CALLS and ("t_check", "b") not in CALLS


def test_gate_failure_with_continue_goes_on_from_the_input_model(tmp_path):
    runner, _ = make_runner(tmp_path, "TGate.fail_for=a", "TGate.on_gate_fail=continue",
                            pipeline=("t_init", "t_perturb", "t_gate", "t_check"))
    manifest = runner.run()
    assert manifest.head == "t_check"
    assert manifest.entry("t_gate", "a")["status"] == "failed"
    assert manifest.entry("t_check", "a")["status"] == "done"
