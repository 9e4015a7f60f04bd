"""compress.pruning.latency: the per-layer latency table measured on OpenVINO, the plan estimate, the ratios chosen
for a latency target; and the label-free output measure of the sensitivity analysis. Tiny nets; seconds."""
import compress  # noqa: F401  (imports zlib before paddle)

import types

import numpy as np
import pytest

from compress.errors import ConfigError
from compress.pruning.latency import LatencyTable, latency_reduction, measure_latency_table, ratios_for_latency_target
from compress.pruning.plan import make_plan
from compress.pruning.trace import trace_model
from compress.stages.pruning import PruneConfig, output_fidelity_fn
from tests.unit.test_pruning import LEFT, RIGHT, build_tiny_net, example_input

WEIGHTS = ("stem.conv.weight", "expand.conv.weight", "dw.conv.weight", "project.conv.weight", "se_reduce.weight",
           "se_expand.weight", "left.weight", "right.conv.weight", "fuse.conv.weight", "fc.weight")


@pytest.fixture(scope="module")
def tiny():
    net = build_tiny_net(0)
    x = example_input()
    return net, x, trace_model(net, [x])


def _model_cfg(task="det"):
    return types.SimpleNamespace(task=task, Input=types.SimpleNamespace(name="x", example_shape=[3, 32, 32]))


def test_measured_table_charges_every_weighted_layer_and_adds_up(tiny):
    net, _, _ = tiny
    table = measure_latency_table(net, _model_cfg(), repeats=5)
    assert (table.backend, table.precision, table.input_shape) == ("openvino", "fp32", [1, 3, 32, 32])
    assert sorted(table.weight_ms) == sorted(WEIGHTS)
    assert all(ms >= 0 for ms in list(table.weight_ms.values()) + list(table.output_ms.values()))
    assert table.out_axis["fc.weight"] == 1 and table.out_axis["stem.conv.weight"] == 0
    charged = sum(table.weight_ms.values()) + sum(table.output_ms.values())
    assert charged + table.other_ms == pytest.approx(table.total_ms, rel=1e-6)
    assert charged >= 0.8 * table.total_ms  # every node but the input conversion finds its weight
    assert table.estimate({}) == pytest.approx(table.total_ms, rel=1e-6)
    assert table.shapes["expand.conv.weight"] == [24, 16, 1, 1]
    assert table.to_json()["weight_ms"] == table.weight_ms


def test_cached_table_is_measured_once_per_weights(tiny, tmp_path, monkeypatch):
    from compress.pruning import latency

    net, _, _ = tiny
    calls = []
    measure = latency.measure_latency_table
    monkeypatch.setattr(latency, "measure_latency_table", lambda *a, **k: calls.append(1) or measure(*a, **k))
    first = latency.cached_latency_table(str(tmp_path), net, _model_cfg(), repeats=2)
    again = latency.cached_latency_table(str(tmp_path), net, _model_cfg(), repeats=2)
    assert again == first and len(calls) == 1  # read back, not re-timed: the same plan on resume / back-off
    other = build_tiny_net(1)  # other weights: measured anew
    latency.cached_latency_table(str(tmp_path), other, _model_cfg(), repeats=2)
    latency.cached_latency_table(str(tmp_path), net, _model_cfg(), repeats=3)  # other settings
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 3
    latency.cached_latency_table(str(tmp_path / "dry"), net, _model_cfg(), write=False, repeats=2)
    assert len(calls) == 4 and not (tmp_path / "dry").exists()  # --dry-run writes nothing


def test_estimate_scales_own_time_by_elements_and_output_time_by_channels():
    table = LatencyTable(backend="openvino", precision="fp32", threads=1, input_shape=[1, 3, 8, 8], total_ms=10.0,
                         weight_ms={"a": 4.0, "b": 2.0}, output_ms={"a": 2.0}, out_axis={"a": 0, "b": 0},
                         other_ms=2.0, shapes={"a": [8, 4, 3, 3], "b": [4, 8, 1, 1]})
    assert table.estimate({}) == pytest.approx(10.0)
    # a loses half its filters: its own time and the time of what reads its output halve; b loses half its inputs
    halved = {"a": [4, 4, 3, 3], "b": [4, 4, 1, 1]}
    assert table.estimate(halved) == pytest.approx(2.0 + 4.0 / 2 + 2.0 / 2 + 2.0 / 2)


def _table_on(trace, expensive, cheap):
    """A latency table where ``expensive`` costs 10 ms and ``cheap`` 1 ms (5 ms elsewhere)."""
    return LatencyTable(backend="openvino", precision="fp32", threads=1, input_shape=[1, 3, 32, 32], total_ms=16.0,
                        weight_ms={expensive: 10.0, cheap: 1.0}, output_ms={}, out_axis={expensive: 0, cheap: 0},
                        other_ms=5.0, shapes={w: list(trace.shapes[w]) for w in (expensive, cheap)})


def test_latency_target_spends_its_loss_where_the_time_is(tiny):
    net, _, trace = tiny
    # the cheap layer loses less per ratio, the expensive one buys ten times the time per channel
    sens = {LEFT: {0.0: 0.80, 0.25: 0.795, 0.5: 0.79}, RIGHT: {0.0: 0.80, 0.25: 0.79, 0.5: 0.78}}
    table = _table_on(trace, RIGHT, LEFT)
    ratios, plan, lam = ratios_for_latency_target(sens, 0.2, table, net, trace, round_to=1)
    assert 0.2 <= latency_reduction(table, plan) < 0.25 and lam > 0
    # the target (3.2 ms of 16) from the expensive layer alone: 6 of its 16 filters (10 ms x 6 / 16 = 3.75 ms),
    # not its next grid ratio (0.5)
    assert ratios[LEFT] == 0.0 and 0.3 <= ratios[RIGHT] < 0.4
    # a single loss threshold (what flops_target does) prunes both to the same loss, the cheap one further
    threshold = make_plan(net, None, {LEFT: 0.5, RIGHT: 0.25}, trace=trace, round_to=1)
    assert latency_reduction(table, threshold) < 0.2
    with pytest.raises(ConfigError, match=r"latency reduction target 90.0% is out of reach"):
        ratios_for_latency_target(sens, 0.9, table, net, trace, round_to=1)


def test_latency_target_scales_lossless_layers_down_to_the_target(tiny):
    net, _, trace = tiny
    lossless = {LEFT: {0.0: 0.8, 0.5: 0.8}, RIGHT: {0.0: 0.8, 0.5: 0.8}}
    table = _table_on(trace, RIGHT, LEFT)
    ratios, plan, lam = ratios_for_latency_target(lossless, 0.1, table, net, trace, round_to=1)
    assert lam == 0.0 and 0.1 <= latency_reduction(table, plan) < 0.2
    assert all(0 < r < 0.5 for r in ratios.values())


def test_prune_config_checks_the_latency_keys():
    PruneConfig(mode="latency_target", latency_target=0.3).validate("Prune")
    with pytest.raises(ConfigError, match=r"^Prune.latency_backend: 'onnxruntime' has no per-layer profiling here; "
                                          r"use openvino$"):
        PruneConfig(mode="latency_target", latency_backend="onnxruntime").validate("Prune")
    with pytest.raises(ConfigError, match=r"^Prune.latency_target: must be in \(0, 1\), got 1.5$"):
        PruneConfig(mode="latency_target", latency_target=1.5).validate("Prune")


def test_output_fidelity_is_one_for_the_model_itself_and_falls_with_a_perturbed_layer(tiny):
    net, x, _ = tiny
    fidelity = output_fidelity_fn(net, [x, example_input(1)])
    assert fidelity(net) == pytest.approx(1.0, abs=1e-6)
    other = build_tiny_net(0)
    weight = other.fuse.conv.weight
    weight.set_value(weight.numpy() * np.float32(1.2))
    assert 0.5 < fidelity(other) < 0.999


def test_prune_modes_name_the_keys_they_ignore():
    # what the back-off reads to skip a step that changes nothing (Prune.flops_target of a model pruned uniformly)
    assert "flops_target" in PruneConfig(mode="uniform").inert_keys()
    assert "ratio" not in PruneConfig(mode="uniform").inert_keys()
    assert "flops_target" in PruneConfig(mode="latency_target").inert_keys()
    assert "latency_target" not in PruneConfig(mode="latency_target").inert_keys()
    assert PruneConfig(mode="flops_target").inert_keys() == {"ratio", "max_metric_drop", "latency_target",
                                                             "latency_backend", "latency_precision", "latency_repeats"}
