"""compress.pruning on the real PP-OCRv4 det and rec models (shipped weights): plan, apply, restore, sensitivity."""
import compress  # noqa: F401  (imports zlib before paddle)

import copy
import os
import time

import cv2
import numpy as np
import paddle
import pytest
import yaml

from compress.models import build_model
from compress.pruning import (PrunePlan, analyze_sensitivity, apply_plan, format_plan, make_plan, prunable_layers,
                              pruned_by_zeroing, trace_model)

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INPUT_SHAPES = {"det": (1, 3, 640, 640), "rec": (1, 3, 48, 320)}
RATIO = 0.3


def text_image(shape):
    """A white image with black printed words, normalised as PP-OCR does ((x / 255 - 0.5) / 0.5)."""
    _, _, height, width = shape
    image = np.full((height, width, 3), 255, np.uint8)
    lines = max(1, height // 60)
    for line in range(lines):
        cv2.putText(image, "PP-OCR prune 2026", (8, 36 + line * 60), cv2.FONT_HERSHEY_SIMPLEX,
                    min(1.2, width / 340), (0, 0, 0), 2)
    chw = (image.astype("float32") / 255.0 - 0.5) / 0.5
    return chw.transpose(2, 0, 1)[None]


def load_model(task):
    with open(os.path.join(ROOT, "configs", "models", f"ppocrv4_{task}.yml"), encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    return build_model(config["Architecture"], config["Weights"], os.path.join(ROOT, "configs", "models"))


def traced_model(task):
    """(model, input image, its output, trace, prunable layers) for the shipped PP-OCRv4 ``task`` model."""
    model, x = load_model(task), text_image(INPUT_SHAPES[task])
    trace = trace_model(model, [x])
    return model, x, run(model, x), trace, prunable_layers(model, trace=trace)


def run(model, x):
    output = model(paddle.to_tensor(x))
    return (output["maps"] if isinstance(output, dict) else output).numpy()


@pytest.fixture(autouse=True)
def one_thread():
    paddle.base.core.set_num_threads(1)


@pytest.mark.parametrize("task", ["det", "rec"])
def test_plan_apply_restore_on_ppocrv4(task, tmp_path):
    model, x, reference, trace, layers = traced_model(task)
    assert len(layers) >= 15 and not any(name.startswith("head.") for name in layers)

    started = time.perf_counter()
    plan = make_plan(model, None, {name: RATIO for name in layers}, "l1_norm", trace=trace)
    planning_seconds = time.perf_counter() - started
    print(f"\n{task}: trace {trace.seconds:.2f}s, make_plan {planning_seconds:.3f}s\n{format_plan(plan)}")
    assert plan.flops_reduction >= 0.35
    assert np.array_equal(run(model, x), reference), "make_plan must not change the model"

    started = time.perf_counter()
    apply_plan(model, plan)
    print(f"{task}: apply_plan {time.perf_counter() - started:.3f}s")
    pruned_output = run(model, x)
    assert pruned_output.shape == reference.shape and np.isfinite(pruned_output).all()

    (tmp_path / "plan.json").write_text(plan.to_json())
    paddle.save(model.state_dict(), str(tmp_path / "pruned.pdparams"))
    restored = load_model(task)
    apply_plan(restored, PrunePlan.from_json((tmp_path / "plan.json").read_text()))
    restored.set_state_dict(paddle.load(str(tmp_path / "pruned.pdparams")))
    assert np.array_equal(run(restored, x), pruned_output)


@pytest.mark.parametrize("task", ["det", "rec"])
def test_zeroing_matches_real_pruning_and_sensitivity_resumes(task, tmp_path):
    model, x, reference, trace, layers = traced_model(task)
    probes = [layers[1], layers[len(layers) // 2], layers[-1]]
    for layer in probes:
        plan = make_plan(model, None, {layer: 0.5}, trace=trace)
        with pruned_by_zeroing(model, plan):
            zeroed = run(model, x)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, plan)
        np.testing.assert_allclose(zeroed, run(pruned, x), rtol=1e-4, atol=1e-5, err_msg=layer)
    assert np.array_equal(run(model, x), reference)

    calls = []

    def closeness(candidate):
        calls.append(1)
        return -float(np.abs(run(candidate, x) - reference).mean())

    state = str(tmp_path / "sensitivity.json")
    sens = analyze_sensitivity(model, None, probes[:2], [0.3, 0.6], "l1_norm", closeness, state,
                               show_progress=False, trace=trace)
    assert len(calls) == 1 + 4 and sens[probes[0]][0.0] == 0.0
    assert all(sens[layer][0.6] <= 0.0 for layer in probes[:2])
    analyze_sensitivity(model, None, probes[:2], [0.3, 0.6], "l1_norm", closeness, state,
                        show_progress=False, trace=trace)
    assert len(calls) == 5
