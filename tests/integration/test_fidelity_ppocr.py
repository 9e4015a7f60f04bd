"""Fidelity on the real PP-OCRv4 models: the baseline against itself is exactly 1.0 (through a rebuilt model),
and perturbing one layer lowers it; a folder of unlabelled images is enough."""
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "ppocr_prune_quant.yml")


def _model_and_task(name, overrides):
    from compress.config import load_config
    from compress.models import build_model
    from compress.stages import stage_sections
    from compress.tasks import make_task

    cfg = load_config(CONFIG, overrides, stage_sections=stage_sections())
    model_cfg = cfg.models[name]
    weights = {k: v for k, v in vars(model_cfg.Weights).items() if v not in (None, False)}
    return (lambda: build_model(dict(model_cfg.Architecture), weights, model_cfg.base_dir)), \
        make_task(model_cfg, show_progress=False)


@pytest.mark.parametrize("name, folder, limit, noise_scale", [
    ("rec", "rec/eval", 48, 0.5),
    ("det", "det/eval", 3, 2.0),  # DB's maps shrug off smaller noise in one layer: their boxes stay put
])
def test_baseline_agrees_with_itself_and_a_perturbed_layer_lowers_it(demo_data, name, folder, limit, noise_scale):
    from compress.fidelity import compute_reference, measure_fidelity
    from compress.tasks import dygraph_predictor

    # the labelled eval images stand in for a folder of unlabelled production images: only the images are read
    overrides = [f"Models.{name}.Fidelity.data_dir={os.path.join(demo_data, folder)}",
                 f"Models.{name}.Fidelity.label_file=null", f"Models.{name}.Fidelity.limit={limit}"]
    build, task = _model_and_task(name, overrides)
    reference = compute_reference(task, dygraph_predictor(build()))
    assert len(reference.images) == limit and all(img.endswith(".jpg") for img in reference.images)
    if name == "rec":
        assert sum(1 for text in reference.outputs if text) >= 0.9 * limit  # the baseline reads these lines
    else:
        assert sum(len(page) for page in reference.outputs) >= 10

    same = measure_fidelity(task, dygraph_predictor(build()), reference)  # a second, independently built model
    assert same["fidelity"] == 1.0
    if name == "rec":
        assert same["fidelity_ned"] == 1.0
        spread = measure_fidelity(task, dygraph_predictor(build()), reference, limit=16)  # a stage_limit subset
        assert spread["fidelity"] == 1.0 and spread["fidelity_lines_all"] == 16

    perturbed = build()
    weights = dict(perturbed.named_parameters())["backbone.blocks4.0.pw_conv.reparam_conv.weight"]
    noise = np.random.default_rng(0).standard_normal(weights.shape).astype("float32")
    weights.set_value(weights.numpy() + noise_scale * noise * float(np.abs(weights.numpy()).mean()))
    lowered = measure_fidelity(task, dygraph_predictor(perturbed), reference)
    assert lowered["fidelity"] < 0.9, lowered


def test_measuring_through_paddle_inference_leaves_the_model_traceable(demo_data):
    """paddle.jit.save of a model object changes what PaddleSlim's dependency trace finds in it afterwards (PP-OCRv4
    rec: 6 prunable convs instead of 20): the fast fidelity path must export a copy."""
    import types

    from compress.pruning.selection import prunable_layers
    from compress.pruning.trace import trace_model
    from compress.stages.evaluation import inference_predict
    from compress.tasks import dygraph_predictor

    build, task = _model_and_task("rec", ["Models.rec.Eval.limit=8"])
    model = build()
    before = prunable_layers(model, ("head.*",), trace=trace_model(model, [task.example_input()]), round_to=8)
    ctx = types.SimpleNamespace(model_cfg=task.cfg, global_cfg=types.SimpleNamespace(threads=1))
    with inference_predict(model, ctx) as run:
        fast = task.evaluate(run)
    after = prunable_layers(model, ("head.*",), trace=trace_model(model, [task.example_input()]), round_to=8)
    assert len(before) >= 20 and after == before
    assert fast["acc"] == task.evaluate(dygraph_predictor(model))["acc"]  # the same readings, 6x faster
