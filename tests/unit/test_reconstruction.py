"""Closed-form reconstruction, the ``obs`` criterion and statistics correction (compress.pruning.reconstruction)
on tiny nets."""
import compress  # noqa: F401  (imports zlib before paddle)

import copy

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from compress.errors import ConfigError
from compress.pruning import apply_plan, make_plan, pruned_by_zeroing, trace_model
from compress.pruning.compensation import measure_activation_stats
from compress.pruning.criteria import FilterScores, bind_criterion
from compress.pruning.reconstruction import (ReconstructionConfig, input_rows, layer_geometry,
                                             local_reconstruction_deltas, measure_input_grams, reconstruct,
                                             reestimate_batchnorm, weight_matrix)

SHAPE = (2, 3, 10, 12)
FIRST = "first.weight"
KEPT = [0, 1, 2, 3]
SCALES = [2.0, 0.5, 3.0, 1.5]  # first's channel 4 + j is SCALES[j] x channel j (through ReLU and the depth-wise)


class Chain(paddle.nn.Layer):
    """first (3 -> 8, 1x1) -> relu -> dw (3x3 depth-wise) -> second (8 -> 6, 3x3, pad 1) -> relu
    -> third (6 -> 4, 1x1, no bias) -> BatchNorm -> fc (Linear 4 -> 5 over the width)."""

    def __init__(self):
        super().__init__()
        self.first = paddle.nn.Conv2D(3, 8, 1)
        self.dw = paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8)
        self.second = paddle.nn.Conv2D(8, 6, 3, padding=1)
        self.third = paddle.nn.Conv2D(6, 4, 1, bias_attr=False)
        self.bn = paddle.nn.BatchNorm2D(4)
        self.fc = paddle.nn.Linear(4, 5)

    def forward(self, x):
        y = self.second(self.dw(F.relu(self.first(x))))
        y = self.bn(self.third(F.relu(y)))
        return self.fc(y.mean(axis=2).transpose([0, 2, 1]))


def build(redundant=True):
    """With ``redundant``, first's channels 4..7 are positive multiples of channels 0..3 all the way to
    ``second``'s input (first's filters and biases scaled, the depth-wise filters copied, its biases scaled)."""
    paddle.seed(0)
    net = Chain()
    rng = np.random.default_rng(0)
    first_w = rng.normal(0, 1, (8, 3, 1, 1)).astype("float32")
    first_b = rng.normal(0, 0.5, 8).astype("float32")
    dw_w = rng.normal(0, 0.5, (8, 1, 3, 3)).astype("float32")
    dw_b = rng.normal(0, 0.5, 8).astype("float32")
    if redundant:
        for j, scale in enumerate(SCALES):
            first_w[4 + j], first_b[4 + j] = scale * first_w[j], scale * first_b[j]
            dw_w[4 + j], dw_b[4 + j] = dw_w[j], scale * dw_b[j]
    net.first.weight.set_value(first_w)
    net.first.bias.set_value(first_b)
    net.dw.weight.set_value(dw_w)
    net.dw.bias.set_value(dw_b)
    net.second.weight.set_value(rng.normal(0, 0.3, (6, 8, 3, 3)).astype("float32"))
    net.bn._mean.set_value(rng.normal(0, 0.1, 4).astype("float32"))
    net.bn._variance.set_value(rng.uniform(0.5, 1.5, 4).astype("float32"))
    net.eval()
    return net


def inputs(seed=0, batch=2):
    return np.random.default_rng(seed).normal(size=(batch,) + SHAPE[1:]).astype("float32")


def run(net, x):
    return net(paddle.to_tensor(x)).numpy()


def keep_first_four(group, weights):
    """A criterion that keeps channels 0..3 of every group."""
    scores = np.zeros(group.channels)
    scores[:4] = 1.0
    return FilterScores(scores, "test")


@pytest.fixture(autouse=True)
def one_thread():
    paddle.base.core.set_num_threads(1)


def pruned_pair(net, x, criterion=keep_first_four, ratios=None):
    trace = trace_model(net, [x])
    plan = make_plan(net, None, ratios or {FIRST: 0.5}, criterion, round_to=1, trace=trace)
    teacher = copy.deepcopy(net)
    apply_plan(net, plan)
    return teacher, plan, trace


def test_patches_reproduce_conv_and_linear_outputs():
    net, x = build(), inputs()
    for layer in (net.second, net.first):
        captured = {}
        handle = layer.register_forward_post_hook(lambda _, i, o: captured.update(x=i[0].numpy(), y=o.numpy()))
        run(net, x)
        handle.remove()
        geometry = layer_geometry(layer)
        rows = input_rows(geometry, captured["x"], captured["y"].shape, np.array([0, 7, 119, 239]))
        out = rows @ weight_matrix(geometry, layer.weight.numpy()) + layer.bias.numpy()
        expected = captured["y"].transpose(0, 2, 3, 1).reshape(-1, captured["y"].shape[1])[[0, 7, 119, 239]]
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert isinstance(layer_geometry(net.dw), str)


def test_reconstruction_restores_output_when_removed_channels_are_combinations_of_kept_ones():
    net, x = build(), inputs()
    reference = run(net, x)
    teacher, plan, trace = pruned_pair(net, x)
    assert plan.tensors[FIRST].kept[0] == KEPT
    pruned_error = np.abs(run(net, x) - reference).max()
    report = reconstruct(net, teacher, plan, [inputs(1), inputs(2)], ReconstructionConfig(damp=1e-10),
                         trace=trace)
    assert [layer.layer for layer in report.layers] == ["second"]
    assert report.layers[0].error_before > 1e-2 and report.layers[0].error_after < 1e-9
    assert pruned_error > 1e-2
    np.testing.assert_allclose(run(net, x), reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(teacher, x), reference, rtol=0, atol=0)  # the teacher is never changed


def test_reconstruction_touches_only_dense_consumers_and_leaves_depthwise_exact():
    net, x = build(redundant=False), inputs()
    sliced_dw = net.dw.weight.numpy()[KEPT]
    untouched = {name: p.numpy().copy() for name, p in net.named_parameters()}
    teacher, plan, trace = pruned_pair(net, x)
    before = {name: p.numpy().copy() for name, p in net.named_parameters()}
    report = reconstruct(net, teacher, plan, [inputs(1)], ReconstructionConfig(layers="all"), trace=trace)
    after = {name: p.numpy() for name, p in net.named_parameters()}
    assert {layer.layer for layer in report.layers} <= {"second", "third", "fc"}
    assert "second" in {layer.layer for layer in report.layers}
    np.testing.assert_array_equal(after["dw.weight"], sliced_dw)
    for name in ("dw.weight", "dw.bias", "first.weight", "first.bias", "bn.weight", "bn.bias", "bn._variance"):
        np.testing.assert_array_equal(after[name], before[name])
    changed = {name for name in after if not np.array_equal(after[name], before[name])}
    assert changed and changed <= {"second.weight", "second.bias", "third.weight", "bn._mean", "fc.weight",
                                   "fc.bias"}
    assert np.array_equal(untouched["bn._variance"], after["bn._variance"])
    for layer in report.layers:
        assert layer.error_after <= layer.error_before


def test_teacher_outputs_measured_once_per_batch_solve_exactly_as_when_measured_per_layer(monkeypatch):
    """The unpruned model's sampled outputs are cached from one pass per batch while they fit ``cache_bytes``;
    layers past the budget re-run the teacher. All three ways give bit-identical weights and errors."""
    from compress.pruning import reconstruction

    net, x = build(redundant=False), inputs()
    teacher, plan, trace = pruned_pair(net, x)
    config = ReconstructionConfig(layers="all", max_rows=50)  # 240 positions per batch: rows are sampled
    batches = [inputs(1), inputs(2), inputs(3)]
    captured_from_teacher = []
    capture = reconstruction._capture
    monkeypatch.setattr(reconstruction, "_capture", lambda model, layer, batch: (
        captured_from_teacher.append(model is teacher), capture(model, layer, batch))[1])
    results = {}
    for cache_bytes in (0, 4 * 50 * 6 * len(batches), 2 << 30):  # nothing, "second" only, every layer
        pruned = copy.deepcopy(net)
        captured_from_teacher.clear()
        report = reconstruct(pruned, teacher, plan, batches, config, trace=trace, cache_bytes=cache_bytes)
        results[cache_bytes] = ({name: p.numpy() for name, p in pruned.state_dict().items()},
                                [(layer.layer, layer.error_before, layer.error_after) for layer in report.layers],
                                sum(captured_from_teacher))
    assert [teacher_runs for *_, teacher_runs in results.values()] == [3 * 3, 2 * 3, 0]  # layers x batches
    (weights, layers, _), *others = results.values()
    assert len(layers) == 3
    for other_weights, other_layers, _ in others:
        assert other_layers == layers
        for name, value in weights.items():
            np.testing.assert_array_equal(other_weights[name], value, err_msg=name)


def test_bias_free_conv_before_batchnorm_folds_its_bias_into_the_running_mean():
    net, x = build(), inputs()
    reference = run(net, x)
    teacher, plan, trace = pruned_pair(net, x, ratios={"second.weight": 0.5})
    assert 1 in plan.tensors["third.weight"].kept
    report = reconstruct(net, teacher, plan, [inputs(1), inputs(2)], ReconstructionConfig(damp=1e-10),
                         trace=trace)
    (solved,) = report.layers
    assert solved.layer == "third" and solved.bias == "batchnorm mean"
    assert solved.error_after < solved.error_before
    assert not np.array_equal(net.bn._mean.numpy(), teacher.bn._mean.numpy())
    # the pruned output gets closer to the reference than without reconstruction
    plain = build()
    apply_plan(plain, plan)
    assert np.abs(run(net, x) - reference).mean() < np.abs(run(plain, x) - reference).mean()


def test_local_reconstruction_from_unpruned_grams_matches_sequential_for_a_direct_consumer():
    net, x = build(), inputs()
    reference = run(net, x)
    calibration = [inputs(1), inputs(2)]
    grams = measure_input_grams(net, calibration, max_rows=10_000)
    assert grams["second"].gram.shape == (8 * 9 + 1, 8 * 9 + 1) and grams["second"].rows == 2 * 2 * 10 * 12
    trace = trace_model(net, [x])
    plan = make_plan(net, None, {FIRST: 0.5}, keep_first_four, round_to=1, trace=trace)
    deltas, solved = local_reconstruction_deltas(net, plan, grams, damp=1e-10, trace=trace)
    assert solved == ["second"]
    with pruned_by_zeroing(net, plan, deltas):
        np.testing.assert_allclose(run(net, x), reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(run(net, x), reference)  # values restored


def test_obs_and_activation_pick_different_valid_channels():
    """Channels 4..7 duplicate 0..3 (scaled): obs sees that the consumer can absorb either copy; activation
    keeps the high-variance copies. Channels 0..3 are large-variance but fully redundant with 4..7."""
    net, x = build(), inputs()
    calibration = [inputs(1), inputs(2)]
    stats = measure_activation_stats(net, calibration, grams=True)
    trace = trace_model(net, [x])
    plans = {name: make_plan(net, None, {FIRST: 0.5}, bind_criterion(name, stats), round_to=1, trace=trace)
             for name in ("obs", "activation")}
    kept = {name: plan.tensors[FIRST].kept[0] for name, plan in plans.items()}
    assert kept["obs"] != kept["activation"]
    assert all(len(k) == 4 and len(set(k)) == 4 for k in kept.values())
    # obs keeps one copy of each redundant pair, which reconstruction turns into an exact output
    assert sorted(c % 4 for c in kept["obs"]) == [0, 1, 2, 3]
    assert plans["obs"].decisions[0].score_source == "obs"
    reference = run(net, x)
    results = {}
    for name, plan in plans.items():
        model = build()
        teacher = copy.deepcopy(model)
        apply_plan(model, plan)
        reconstruct(model, teacher, plan, calibration, ReconstructionConfig(damp=1e-10), trace=trace)
        results[name] = np.abs(run(model, x) - reference).max()
    assert results["obs"] < 1e-3 < results["activation"]


def test_obs_needs_gram_statistics():
    net, x = build(), inputs()
    stats = measure_activation_stats(net, [inputs(1)])
    with pytest.raises(ConfigError, match="Gram"):
        make_plan(net, [x], {FIRST: 0.5}, bind_criterion("obs", stats), round_to=1)


def test_statistics_correction_reproduces_reference_means_and_stds():
    net, x = build(redundant=False), inputs()
    teacher, plan, trace = pruned_pair(net, x)
    calibration = [inputs(1), inputs(2)]
    reconstruct(net, teacher, plan, calibration,
                ReconstructionConfig(solve=False, stats_correction=True, max_rows=10_000), trace=trace)

    def second_output(model):
        outs = []
        handle = model.second.register_forward_post_hook(lambda _, i, o: outs.append(o.numpy()))
        for batch in calibration:
            run(model, batch)
        handle.remove()
        return np.concatenate(outs)

    pruned, reference = second_output(net), second_output(teacher)
    np.testing.assert_allclose(pruned.mean(axis=(0, 2, 3)), reference.mean(axis=(0, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(pruned.std(axis=(0, 2, 3)), reference.std(axis=(0, 2, 3)), rtol=1e-3)


def test_batchnorm_reestimation_sets_running_statistics_to_the_inputs():
    net = build()
    calibration = [inputs(1), inputs(2)]
    seen = []
    handle = net.bn.register_forward_pre_hook(lambda _, i: seen.append(i[0].numpy()))
    for batch in calibration:
        run(net, batch)
    handle.remove()
    updated = reestimate_batchnorm(net, calibration)
    assert updated == ["bn"] and not net.training
    values = np.concatenate(seen)
    np.testing.assert_allclose(net.bn._mean.numpy(), values.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.bn._variance.numpy(), values.var(axis=(0, 2, 3)), rtol=1e-3)


def test_config_rejects_unknown_layer_mode():
    with pytest.raises(ConfigError, match="pruned_inputs, all"):
        ReconstructionConfig(layers="every").validate()


def test_sensitivity_measures_the_loss_left_after_local_reconstruction(tmp_path):
    from compress.pruning import analyze_sensitivity
    net, x = build(), inputs()
    reference = run(net, x)
    stats = measure_activation_stats(net, [inputs(1), inputs(2)], grams=True, gram_rows=10_000)
    trace = trace_model(net, [x])

    def eval_fn(model):
        return -float(np.abs(run(model, x) - reference).max())

    common = dict(show_progress=False, trace=trace, round_to=1, stats=stats, compensate=True)
    plain = analyze_sensitivity(net, None, [FIRST], [0.5], keep_first_four, eval_fn, str(tmp_path / "a.json"),
                                **common)
    rebuilt = analyze_sensitivity(net, None, [FIRST], [0.5], keep_first_four, eval_fn, str(tmp_path / "b.json"),
                                  reconstruct_damp=1e-10, **common)
    assert plain[FIRST][0.5] < -1e-2
    assert rebuilt[FIRST][0.5] > -1e-3
    np.testing.assert_array_equal(run(net, x), reference)
    with pytest.raises(Exception, match="another reconstruct_damp"):
        analyze_sensitivity(net, None, [FIRST], [0.5], keep_first_four, eval_fn, str(tmp_path / "b.json"),
                            reconstruct_damp=0.1, **common)
