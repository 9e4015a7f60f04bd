"""baseline -> sensitivity -> prune on the real PP-OCRv4 weights with a tiny budget; restore in a fresh process;
--dry-run writes nothing."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "ppocr_prune_quant.yml")

RESTORE = """
import json, sys, hashlib
sys.path.insert(0, {root!r})
import compress
from compress.config import load_config
from compress.runner import Runner, output_digest
from compress.checkpoint import Manifest
from compress.stages import stage_sections
cfg = load_config({config!r}, {overrides!r}, stage_sections=stage_sections())
runner = Runner(cfg)
manifest = Manifest.load(runner.run_dir)
index = [s.name for s in runner.stages].index("prune")
out = {{}}
for name in cfg.models:
    model = runner.materialize(manifest, name, index)
    out[name] = output_digest(model, runner.task(name))
print(json.dumps(out))
"""


def tool(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def pruned_run(demo_data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("prune") / "run")
    overrides = [f"Global.run_dir={run_dir}", "Global.show_progress=false",
                 "Pipeline=[baseline, sensitivity, prune]",
                 "Models.det.Eval.limit=3", "Models.rec.Eval.limit=32",
                 "Models.det.Fidelity.limit=2", "Models.rec.Fidelity.limit=32",
                 "Sensitivity.ratios=[0.5]", "Sensitivity.limit=1", "Sensitivity.per_model={rec: {limit: 8}}",
                 "Prune.flops_target=0.35", "Prune.per_model.rec.mode=flops_target",
                 "Prune.reconstruct=true", "Prune.reconstruct_limit=2"]
    proc = tool("-c", CONFIG, "-o", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, overrides, proc


def test_prune_reaches_flops_target_and_records_plan(pruned_run):
    run_dir, _, proc = pruned_run
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    for name in ("det", "rec"):
        base = manifest["entries"]["baseline"][name]["metrics"]
        pruned = manifest["entries"]["prune"][name]
        assert pruned["metrics"]["flops_reduction"] >= 0.35
        assert pruned["metrics"]["flops"] < 0.66 * base["flops"]
        assert pruned["metrics"]["params"] < base["params"]
        kept = [c["kept"] for c in pruned["metadata"]["plan"]["tensors"].values()]
        assert kept and all(len(axes) >= 1 for axes in kept)
        solved = pruned["metadata"]["reconstruction"]["layers"]
        assert len(solved) >= 10 and all(layer["error_after"] < layer["error_before"] for layer in solved)
        assert pruned["metrics"]["reconstruct_seconds"] > 0
        stage_dir = os.path.join(run_dir, pruned["dir"])
        assert os.path.isfile(os.path.join(stage_dir, "plan.txt"))
        sens_dir = os.path.join(run_dir, manifest["entries"]["sensitivity"][name]["dir"])
        assert os.path.getsize(os.path.join(sens_dir, "sensitivity.png")) > 10_000
    assert "[3/3] prune       det" in proc.stdout
    assert "reconstructed:" in proc.stdout


def test_pruned_checkpoint_restores_bit_identical_in_fresh_process(pruned_run):
    run_dir, overrides, _ = pruned_run
    code = RESTORE.format(root=ROOT, config=CONFIG, overrides=overrides)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    for name, digest in digests.items():
        assert digest == manifest["entries"]["prune"][name]["metadata"]["output_sha256"]


def test_dry_run_prints_plan_and_writes_nothing(pruned_run):
    run_dir, overrides, _ = pruned_run

    def snapshot():
        return sorted((os.path.relpath(os.path.join(r, f), run_dir), os.path.getmtime(os.path.join(r, f)))
                      for r, _, files in os.walk(run_dir) for f in files)

    before = snapshot()
    changed = [o for o in overrides if not o.startswith("Prune.")] + ["Prune.flops_target=0.45"]
    proc = tool("-c", CONFIG, "--dry-run", "-o", *changed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "would run; plan:" in proc.stdout
    assert "->" in proc.stdout  # channels before -> after
    assert snapshot() == before
