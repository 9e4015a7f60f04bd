"""Bias compensation and the data-driven ``activation`` criterion (compress.pruning.compensation) on tiny nets."""
import compress  # noqa: F401  (imports zlib before paddle)

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from compress.errors import ConfigError
from compress.pruning import analyze_sensitivity, apply_plan, make_plan, pruned_by_zeroing, trace_model
from compress.pruning.compensation import add_deltas, measure_activation_stats, plan_compensation
from compress.pruning.criteria import bind_criterion, needs_stats

SHAPE = (2, 3, 8, 8)
FIRST = "first.weight"
CONSTANT = [0, 2, 5, 7]  # filters of `first` that only read the constant input channel


class TwoConvs(paddle.nn.Layer):
    """first (3 -> 8, 1x1, bias) -> relu -> second (8 -> 4, 1x1): a bias, or BatchNorm when ``bn``."""

    def __init__(self, bn):
        super().__init__()
        self.first = paddle.nn.Conv2D(3, 8, 1)
        self.second = paddle.nn.Conv2D(8, 4, 1, bias_attr=False if bn else None)
        self.bn = paddle.nn.BatchNorm2D(4) if bn else None

    def forward(self, x):
        y = self.second(F.relu(self.first(x)))
        return self.bn(y) if self.bn is not None else y


def build(bn=False):
    """Filters in CONSTANT read only input channel 0 (constant in `inputs`) with LARGE weights: their outputs are
    constant but their L1 norm is the highest. The other filters read the varying channels with small weights."""
    paddle.seed(0)
    net = TwoConvs(bn)
    rng = np.random.default_rng(0)
    weight = np.zeros((8, 3, 1, 1), "float32")
    for out in range(8):
        if out in CONSTANT:
            weight[out, 0] = rng.uniform(2.0, 3.0)
        else:
            weight[out, 1:] = rng.uniform(0.2, 0.5, (2, 1, 1))
    net.first.weight.set_value(weight)
    net.first.bias.set_value(rng.uniform(0.5, 1.0, 8).astype("float32"))
    net.second.weight.set_value(rng.normal(0, 1, (4, 8, 1, 1)).astype("float32"))
    if bn:
        net.bn._mean.set_value(rng.normal(0, 0.1, 4).astype("float32"))
        net.bn._variance.set_value(rng.uniform(0.5, 1.5, 4).astype("float32"))
    net.eval()
    return net


def inputs(seed=0):
    x = np.random.default_rng(seed).normal(size=SHAPE).astype("float32")
    x[:, 0] = 1.0
    return x


def run(net, x):
    return net(paddle.to_tensor(x)).numpy()


@pytest.fixture(autouse=True)
def one_thread():
    paddle.base.core.set_num_threads(1)


@pytest.mark.parametrize("bn", [False, True], ids=["bias", "batchnorm"])
def test_compensation_is_exact_for_constant_channels(bn):
    net, x = build(bn), inputs()
    reference = run(net, x)
    trace = trace_model(net, [x])
    stats = measure_activation_stats(net, [inputs(1), inputs(2)])
    plan = make_plan(net, None, {FIRST: 0.5}, bind_criterion("activation", stats), round_to=1, trace=trace)
    assert plan.tensors[FIRST].kept[0] == [i for i in range(8) if i not in CONSTANT]

    plain = build(bn)
    apply_plan(plain, plan)
    assert np.abs(run(plain, x) - reference).max() > 0.1, "removing constant channels should shift the output"

    compensation = plan_compensation(net, plan, stats, trace)
    assert compensation.layers == ["second"] and not compensation.skipped
    assert list(compensation.deltas) == (["bn._mean"] if bn else ["second.bias"])
    compensated = build(bn)
    add_deltas(compensated, compensation.deltas)
    apply_plan(compensated, plan)
    np.testing.assert_allclose(run(compensated, x), reference, rtol=1e-4, atol=1e-4)


def test_activation_and_l1_norm_remove_different_filters():
    net = build()
    stats = measure_activation_stats(net, [inputs(1)])
    trace = trace_model(net, [inputs()])
    by_l1 = make_plan(net, None, {FIRST: 0.5}, "l1_norm", round_to=1, trace=trace)
    by_activation = make_plan(net, None, {FIRST: 0.5}, bind_criterion("activation", stats), round_to=1, trace=trace)
    assert by_l1.tensors[FIRST].kept[0] == CONSTANT  # the large constant filters look important by weight
    assert by_activation.criterion == "activation"
    assert by_activation.decisions[0].score_source == "activation"


def test_activation_criterion_needs_statistics():
    net, x = build(), inputs()
    assert needs_stats("activation") and not needs_stats("l1_norm")
    with pytest.raises(ConfigError, match="measured activations"):
        make_plan(net, [x], {FIRST: 0.5}, "activation", round_to=1)
    with pytest.raises(ConfigError, match="measured activations"):
        bind_criterion("activation", None)


def test_stats_are_per_input_channel_and_leave_the_model_unchanged():
    net, x = build(), inputs()
    before = run(net, x)
    stats = measure_activation_stats(net, [x])
    assert stats.samples == SHAPE[0]
    assert sorted(stats.means) == ["first", "second"]
    np.testing.assert_allclose(stats.means["first"][0], 1.0, rtol=1e-6)
    assert stats.stds["first"][0] < 1e-6 < stats.stds["first"][1]
    assert np.all(stats.stds["second"][CONSTANT] < 1e-5)
    np.testing.assert_array_equal(run(net, x), before)


def test_zeroing_with_deltas_equals_compensated_pruning_and_is_undone():
    net, x = build(bn=True), inputs()
    reference = run(net, x)
    trace = trace_model(net, [x])
    stats = measure_activation_stats(net, [inputs(1)])
    plan = make_plan(net, None, {FIRST: 0.25}, "l1_norm", round_to=1, trace=trace)
    deltas = plan_compensation(net, plan, stats, trace).deltas
    with pruned_by_zeroing(net, plan, deltas):
        zeroed = run(net, x)
    pruned = build(bn=True)
    add_deltas(pruned, deltas)
    apply_plan(pruned, plan)
    np.testing.assert_allclose(zeroed, run(pruned, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(run(net, x), reference)


def test_sensitivity_with_compensation_loses_less_and_is_a_separate_state(tmp_path):
    net, x = build(), inputs()
    trace = trace_model(net, [x])
    stats = measure_activation_stats(net, [inputs(1)])
    reference = run(net, x)

    def eval_fn(model):  # higher is better: minus the output error vs the unpruned net
        return -float(np.abs(run(model, x) - reference).mean())

    state = str(tmp_path / "state.json")
    plain = analyze_sensitivity(net, None, [FIRST], [0.5], "l1_norm", eval_fn, state, False, trace=trace,
                                round_to=1)
    compensated = analyze_sensitivity(net, None, [FIRST], [0.5], "l1_norm", eval_fn, str(tmp_path / "comp.json"),
                                      False, trace=trace, round_to=1, stats=stats, compensate=True)
    assert compensated[FIRST][0.5] > plain[FIRST][0.5]
    with pytest.raises(Exception, match="compensate"):
        analyze_sensitivity(net, None, [FIRST], [0.5], "l1_norm", eval_fn, state, False, trace=trace, round_to=1,
                            stats=stats, compensate=True)
