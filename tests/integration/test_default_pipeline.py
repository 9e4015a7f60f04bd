"""The default config on the real PP-OCRv4 weights, on a small slice of the demo eval data."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "ppocr_prune_quant.yml")


def run_tool(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_baseline_stage_on_real_weights(demo_data, tmp_path):
    run_dir = str(tmp_path / "run")
    overrides = ["-o", f"Global.run_dir={run_dir}", "Global.show_progress=false", "Pipeline=[baseline]",
                 "Models.det.Eval.limit=4", "Models.rec.Eval.limit=48",
                 "Models.det.Fidelity.limit=2", "Models.rec.Fidelity.data_dir=data/demo/rec/eval",
                 "Models.rec.Fidelity.limit=32"]
    proc = run_tool("-c", CONFIG, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    det = manifest["entries"]["baseline"]["det"]["metrics"]
    rec = manifest["entries"]["baseline"]["rec"]["metrics"]
    # the real weights detect and read the generated text; a broken weight mapping scores ~0
    assert 0.3 < det["hmean"] <= 1.0
    assert 0.3 < rec["acc"] <= 1.0
    assert det["params"] > 1_000_000 and det["flops"] > 1e9
    assert rec["flops"] > det["flops"] / 10
    # the baseline stage decodes the Fidelity split once; it agrees with itself by construction
    assert det["fidelity"] == rec["fidelity"] == 1.0 and rec["fidelity_lines_all"] == 32 and det["fidelity_pages"] == 2
    assert "[1/1] baseline    det  hmean=" in proc.stdout
    # a second run resumes: nothing re-evaluated
    again = run_tool("-c", CONFIG, *overrides)
    assert again.returncode == 0
    assert again.stdout.count("finished earlier, skipped") == 2
