"""Config loading: overrides, strict parsing and one-line errors."""
import os
import subprocess
import sys
import textwrap

import pytest

from compress.config import load_config, parse_override, parse_section
from compress.errors import ConfigError
from compress.stages import stage_sections

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = stage_sections()

MODEL = textwrap.dedent("""
    Global: {task: rec, character_dict_path: dict.txt}
    Architecture: {model_type: rec, algorithm: CRNN, Backbone: {name: MobileNetV1Enhance, scale: 0.5},
                   Head: {name: CTCHead}}
    Weights: {random: true}
    PostProcess: {name: CTCLabelDecode}
    Metric: {name: RecMetric}
    Eval: {data_dir: data, label_file: data/eval.txt, batch_size: 4}
""")


def write(tmp_path, pipeline_text, model_text=MODEL):
    (tmp_path / "m.yml").write_text(model_text)
    cfg = tmp_path / "p.yml"
    cfg.write_text(textwrap.dedent(pipeline_text))
    return str(cfg)


BASE = textwrap.dedent("""
    Global: {run_dir: out}
    Models: {rec: m.yml}
    Pipeline: [baseline]
""")


def load(path, *overrides):
    return load_config(path, overrides, stage_sections=SECTIONS)


def test_model_file_is_included_and_overrides_reach_it(tmp_path):
    cfg = load(write(tmp_path, BASE), "Models.rec.Eval.limit=7", "Global.seed=3")
    assert cfg.models["rec"].Eval.limit == 7
    assert cfg.models["rec"].Eval.batch_size == 4
    assert cfg.Global.seed == 3
    assert cfg.merged["Models"]["rec"]["Eval"]["limit"] == 7


def test_override_value_may_contain_equals_and_is_yaml_typed():
    assert parse_override("Global.run_dir=out/a=b") == (["Global", "run_dir"], "out/a=b")
    assert parse_override("Prune.ratios=[0.1, 0.2]") == (["Prune", "ratios"], [0.1, 0.2])
    assert parse_override("Global.show_progress=false") == (["Global", "show_progress"], False)


@pytest.mark.parametrize("override, fragment", [
    ("Global.sed=1", "Global.sed: unknown key; did you mean 'seed'?"),
    ("Global.seed=abc", "Global.seed: expected an integer"),
    ("Global.show_progress=1", "Global.show_progress: expected true or false"),
    ("Models.rec.Global.task=ocr", "Models.rec.Global.task: 'ocr' is not allowed; use one of: det, rec"),
    ("Models.rec.Eval.batch_size=0", "Models.rec.Eval.batch_size: must be >= 1"),
    ("Models.rec.Eval.lable_file=x", "did you mean 'label_file'?"),
    ("Models.rec.Weights.checkpoint=a.pdparams", "set exactly one of rapidocr, inference_dir, checkpoint, random"),
    ("Pipeline=[baseline, baseline]", "stage 'baseline' is listed twice"),
    ("Globl.seed=1", "Globl: unknown key; did you mean 'Global'?"),
    ("Global.seed", "expected Section.key=value"),
    ("Global.seed.x=1", "Global.seed is 0, not a section"),
])
def test_bad_values_give_one_line_errors(tmp_path, override, fragment):
    path = write(tmp_path, BASE.replace("run_dir: out", "run_dir: out, seed: 0"))
    with pytest.raises(ConfigError) as info:
        load(path, override)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_model_file_names_it(tmp_path):
    path = write(tmp_path, BASE.replace("m.yml", "nope.yml"))
    with pytest.raises(ConfigError, match=r"nope.yml: model config \(Models.rec\) file not found"):
        load(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "Global: {run_dir: out\nPipeline: [baseline]\n")
    with pytest.raises(ConfigError, match=r"p.yml:\d+:\d+: YAML syntax error"):
        load(path)


def test_per_model_section_merges_and_checks_model_names(tmp_path):
    cfg = load(write(tmp_path, BASE + "Prune: {ratio: 0.3, per_model: {rec: {ratio: 0.5}}}\n"))
    assert cfg.stage_section("Prune", "rec") == {"ratio": 0.5}
    cfg = load(write(tmp_path, BASE + "Prune: {per_model: {det: {ratio: 0.5}}}\n"))
    with pytest.raises(ConfigError, match="per_model.det: unknown key"):
        cfg.stage_section("Prune", "rec")


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("pipeline_text, overrides, fragment", [
    (BASE.replace("[baseline]", "[baseline, sharpen]"), [], "unknown stage 'sharpen'"),
    (BASE.replace("[baseline]", "[eval, baseline]"), [], "stage 'eval' cannot be first"),
    (BASE.replace("[baseline]", "[baseline, bogus_stage]"), [], "valid: baseline, compare, eval, export"),
    (BASE, ["Global.threads=two"], "Global.threads: expected an integer"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, pipeline_text, overrides, fragment):
    path = write(tmp_path, pipeline_text)
    args = ["-c", path] + (["-o", *overrides] if overrides else [])
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_missing_config_file(tmp_path):
    proc = run_cli("-c", "missing.yml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: missing.yml: config file not found; check the path (relative paths "
                                   "start at the current directory for -c, at the including file for Models "
                                   "entries)")


def test_planned_but_unbuilt_stage_is_rejected_not_skipped(tmp_path, monkeypatch):
    from compress.runner import check_pipeline
    from compress.stages.base import PLANNED_STAGES
    monkeypatch.setitem(PLANNED_STAGES, "nas", "architecture search")
    cfg = load(write(tmp_path, BASE.replace("[baseline]", "[baseline, nas]")))
    with pytest.raises(ConfigError, match="stage 'nas' is not available yet \\(architecture search\\); remove it"):
        check_pipeline(cfg)


def test_float_keys_accept_yaml11_exponents_without_a_dot():
    from compress.config import parse_section
    from compress.stages.quant import QuantConfig

    # yaml.safe_load("5e-5") is the string '5e-5' (YAML 1.1 wants 5.0e-5); -o Quant.qat.lr=5e-5 must still work
    _, value = parse_override("Quant.qat.lr=5e-5")
    assert parse_section(QuantConfig, {"qat": {"lr": value}}, "Quant").qat.lr == 5e-5
    with pytest.raises(ConfigError, match=r"Quant\.qat\.lr: expected a number, got '5e-5x'"):
        parse_section(QuantConfig, {"qat": {"lr": "5e-5x"}}, "Quant")


@pytest.mark.parametrize("section, old", [("Quant", "max_drop"), ("Finetune", "max_drop"), ("Prune", "max_loss")])
def test_old_drop_keys_name_their_new_key_in_points(section, old):
    from compress.stages.base import STAGES

    cls = next(STAGES.get(n).config_cls for n in STAGES.names() if STAGES.get(n).section == section)
    with pytest.raises(ConfigError, match=rf"^{section}.{old} was renamed: use {section}.max_metric_drop \(in points"):
        parse_section(cls, {old: 0.01}, section)
    assert parse_section(cls, {"max_metric_drop": 2.5}, section).max_metric_drop == 2.5


def test_weight_rounding_names_its_choices_and_needs_a_positive_damping():
    from compress.config import parse_section
    from compress.stages.quant import QuantConfig

    assert parse_section(QuantConfig, {}, "Quant").weight_rounding == "nearest"
    with pytest.raises(ConfigError, match=r"Quant\.weight_rounding.*'adaround'.*nearest.*gptq"):
        parse_section(QuantConfig, {"weight_rounding": "adaround"}, "Quant")
    with pytest.raises(ConfigError, match=r"^Quant\.weight_rounding_damp: must be > 0, got 0\.0$"):
        parse_section(QuantConfig, {"weight_rounding": "gptq", "weight_rounding_damp": 0.0}, "Quant").validate("Quant")


def test_openvino_float_op_types_must_be_op_type_names():
    from compress.config import parse_section
    from compress.stages.quant import QuantConfig

    cfg = parse_section(QuantConfig, {"openvino_float_op_types": ["GroupConvolution"]}, "Quant")
    cfg.validate("Quant")
    assert list(cfg.openvino_float_op_types) == ["GroupConvolution"]
    with pytest.raises(ConfigError, match=r"^Quant\.openvino_float_op_types: 'matmul' is not an OpenVINO op type; "
                                          r"use names such as GroupConvolution, MatMul$"):
        parse_section(QuantConfig, {"openvino_float_op_types": ["matmul"]}, "Quant").validate("Quant")
