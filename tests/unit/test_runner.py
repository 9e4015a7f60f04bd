"""Runner: resume, config-hash invalidation, rollback, atomic checkpoints, crash and SIGKILL recovery."""
import dataclasses
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest

from compress.checkpoint import Manifest
from compress.config import load_config
from compress.errors import CheckpointError, GateError
from compress.runner import Runner
from compress.stages import stage_sections
from compress.stages.base import RUN_KEY, STAGES, Stage, StageResult
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


# ---------------------------------------------------------------------------------------------- run-level stages

@dataclasses.dataclass(frozen=True)
class SummaryConfig:
    min_sum: float = -1e9  # gate on every model's t_check out_sum
    on_gate_fail: str = "stop"


class TSummary(Stage):
    """A run-level stage defined here, in test code alone: once per run, over every model's t_check result."""

    name, section, config_cls, allowed_after, scope = "t_summary", "TSummary", SummaryConfig, ("t_check",), "run"

    def run_all(self, cfgs, ctx):
        CALLS.append((self.name, tuple(ctx.models)))
        sums = {m: ctx.manifest.entry("t_check", m)["metrics"]["out_sum"] for m in ctx.models}
        with open(os.path.join(ctx.out_dir, "summary.json"), "w") as handle:
            json.dump(sums, handle)
        low = [m for m in ctx.models if sums[m] < cfgs[m].min_sum]
        return StageResult(model=None, metrics={"models": len(sums)}, passed=not low,
                           message=f"out_sum of {', '.join(low)} below min_sum" if low else "")


if TSummary.name not in STAGES:
    STAGES.register(TSummary.name, TSummary)


def make_summary_runner(tmp_path, *overrides):
    path = write_config(str(tmp_path), ("t_init", "t_perturb", "t_check", "t_summary"))
    lines = []
    return Runner(load_config(path, overrides, stage_sections=stage_sections()), log=lines.append), lines


def test_a_run_level_stage_runs_once_per_run_with_its_own_checkpoint(tmp_path):
    runner, lines = make_summary_runner(tmp_path)
    manifest = runner.run()
    assert CALLS[-1] == ("t_summary", ("a", "b")) and [c for c in CALLS if c[0] == "t_summary"] == [CALLS[-1]]
    entry = manifest.entry("t_summary", RUN_KEY)
    assert entry["status"] == "done" and entry["dir"] == "stages/t_summary/_run/v1" and manifest.head == "t_summary"
    assert set(json.load(open(os.path.join(runner.run_dir, entry["dir"], "summary.json")))) == {"a", "b"}
    assert lines[-1].startswith("[4/4] t_summary   run  models=2")
    CALLS.clear()
    make_summary_runner(tmp_path)[0].run()
    assert CALLS == []  # nothing changed: skipped
    make_summary_runner(tmp_path, "TPerturb.per_model={b: {delta: 0.5}}")[0].run()
    assert sorted(CALLS, key=str) == sorted([("t_perturb", "b"), ("t_check", "b"), ("t_summary", ("a", "b"))],
                                            key=str)  # one model's chain changed: the run-level stage re-runs
    CALLS.clear()
    runner, _ = make_summary_runner(tmp_path, "TPerturb.per_model={b: {delta: 0.5}}", "TSummary.min_sum=-1e8")
    assert runner.run().entry("t_summary", RUN_KEY)["dir"] == "stages/t_summary/_run/v3" and \
        CALLS == [("t_summary", ("a", "b"))]  # its own section changed: only it re-runs


def test_a_run_level_stage_rolls_back_lists_and_gates(tmp_path, capsys):
    runner, _ = make_summary_runner(tmp_path)
    runner.run()
    head, rows = runner.listing()
    assert ("t_summary", RUN_KEY, "done") == rows[-1][:3] and len(rows) == 7
    manifest = runner.rollback("t_check")
    assert manifest.entry("t_summary", RUN_KEY)["status"] == "stale"
    with pytest.raises(GateError, match=r"stage 't_summary' failed its gate: out_sum of a, b below min_sum; head "
                                        r"stays on 't_check'"):
        make_summary_runner(tmp_path, "TSummary.min_sum=1e9")[0].run()
