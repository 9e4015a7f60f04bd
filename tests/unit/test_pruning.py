"""compress.pruning on a tiny hand-made net (residual add, depth-wise conv, SE, concat, BN, Linear) and ppocr blocks."""
import compress  # noqa: F401  (imports zlib before paddle)

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from compress.errors import CheckpointError, ConfigError
from compress.pruning import (PrunePlan, analyze_sensitivity, apply_plan, format_plan, get_criterion,
                              kept_channel_count, make_plan, plot_sensitivity, prunable_layers, pruned_by_zeroing,
                              rank_layers, ratios_for_flops_target, ratios_from_loss_budget, trace_model)
from compress.pruning.adapters import traceable
from compress.pruning.trace import forget_traced_parameters

INPUT_SHAPE = (1, 3, 32, 32)
EXPAND = "expand.conv.weight"
PROJECT = "project.conv.weight"
LEFT = "left.weight"
RIGHT = "right.conv.weight"
FUSE = "fuse.conv.weight"
SE_REDUCE = "se_reduce.weight"
ALL_RATIOS = {EXPAND: 0.3, SE_REDUCE: 0.5, LEFT: 0.5, RIGHT: 0.5, FUSE: 0.5}


class ConvBN(paddle.nn.Layer):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = paddle.nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                                     padding=kernel_size // 2, groups=groups, bias_attr=False)
        self.bn = paddle.nn.BatchNorm2D(out_channels)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.act else x


class TinyNet(paddle.nn.Layer):
    """Every structure the dependency analysis must handle, in a few thousand parameters."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 16, 3, stride=2)
        self.expand = ConvBN(16, 24, 1)
        self.dw = ConvBN(24, 24, 3, groups=24)
        self.project = ConvBN(24, 24, 1, act=False)
        self.se_reduce = paddle.nn.Conv2D(24, 8, 1)
        self.se_expand = paddle.nn.Conv2D(8, 24, 1)
        self.left = paddle.nn.Conv2D(24, 16, 3, padding=1)
        self.right = ConvBN(24, 16, 1)
        self.fuse = ConvBN(32, 32, 1)
        self.fc = paddle.nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        a = self.expand(x)
        y = a + self.project(self.dw(a))
        squeeze = F.relu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))
        y = y * F.hardsigmoid(self.se_expand(squeeze))
        y = paddle.concat([F.relu(self.left(y)), self.right(y)], axis=1)
        y = self.fuse(y)
        return self.fc(paddle.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def build_tiny_net(seed):
    """TinyNet in eval mode with random weights and BatchNorm statistics drawn from ``seed``."""
    paddle.seed(seed)
    net = TinyNet()
    rng = np.random.default_rng(seed)
    for name, param in net.named_parameters():
        if name.endswith("bn.weight"):
            param.set_value(rng.uniform(0.2, 1.5, param.shape).astype("float32"))
        elif name.endswith(("bn.bias", "bn._mean")):
            param.set_value(rng.normal(0, 0.1, param.shape).astype("float32"))
        elif name.endswith("bn._variance"):
            param.set_value(rng.uniform(0.5, 1.5, param.shape).astype("float32"))
    net.eval()
    return net


def example_input(seed=0):
    return np.random.default_rng(seed).normal(size=INPUT_SHAPE).astype("float32")


def forward(model, x):
    return model(paddle.to_tensor(x)).numpy()


def state_values(model):
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


@pytest.fixture(autouse=True)
def one_thread():
    paddle.base.core.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    net = build_tiny_net(0)
    x = example_input()
    return net, x, trace_model(net, [x])


# ---------------------------------------------------------------- adapters


def _lcnet_net(rep):
    from compress.ppocr_compat import ensure_ppocr
    ensure_ppocr()
    from ppocr.modeling.backbones.rec_lcnetv3 import LCNetV3Block

    paddle.seed(1)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 16, 3, padding=1),
                               LCNetV3Block(16, 32, 1, 3, use_se=True, conv_kxk_num=2),
                               LCNetV3Block(32, 32, 1, 3, conv_kxk_num=2), paddle.nn.Conv2D(32, 4, 1))
    for layer in net.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer._variance.set_value(np.full(layer._variance.shape, 0.7, "float32"))
    net.eval()
    if rep:
        from compress.models import reparameterize
        reparameterize(net)
    return net


@pytest.mark.parametrize("rep", [False, True], ids=["training-structure", "deploy-structure"])
def test_adapters_keep_ppocr_outputs_bit_identical_and_are_undone(rep):
    net = _lcnet_net(rep)
    from ppocr.modeling.backbones.rec_lcnetv3 import LearnableAffineBlock, LearnableRepLayer

    x = example_input(1)[:, :, :16, :16]
    originals = (LearnableAffineBlock.forward, LearnableRepLayer.forward)
    expected = forward(net, x)
    with traceable():
        assert LearnableAffineBlock.forward is not originals[0]
        patched = forward(net, x)
    assert np.array_equal(patched, expected)
    assert (LearnableAffineBlock.forward, LearnableRepLayer.forward) == originals


def test_ppocr_blocks_need_the_adapters_and_trace_with_them():
    from paddleslim.dygraph.prune.var_group import DygraphPruningCollections

    net = _lcnet_net(rep=True)
    x = example_input(1)[:, :, :16, :16]
    with pytest.raises(AssertionError), forget_traced_parameters():  # `scale * x` in PaddleSlim's elementwise worker
        DygraphPruningCollections(net, [x])
    trace = trace_model(net, [x])
    pw_conv = "1.pw_conv.reparam_conv.weight"
    assert pw_conv in trace.groups
    members = {(m.name, m.axis) for m in trace.groups[pw_conv].members}
    assert ("2.dw_conv.reparam_conv.weight", 0) in members  # the next block's depth-wise conv follows
    assert ("2.pw_conv.reparam_conv.weight", 1) in members


# ---------------------------------------------------------------- trace and plan


def test_trace_finds_residual_concat_depthwise_and_linear_dependencies(tiny):
    _, _, trace = tiny
    expand = {(m.name, m.axis): m for m in trace.groups[EXPAND].members}
    assert (PROJECT, 0) in expand, "residual partner must share the mask"
    assert ("dw.conv.weight", 0) in expand, "depth-wise conv follows its input"
    assert (SE_REDUCE, 1) in expand and ("se_expand.weight", 0) in expand and ("se_expand.bias", 0) in expand
    assert (LEFT, 1) in expand and (RIGHT, 1) in expand
    assert ("expand.bn.weight", 0) in expand and ("expand.bn._variance", 0) in expand
    right = {(m.name, m.axis): m for m in trace.groups[RIGHT].members}
    concat_slice = right[(FUSE, 1)].transforms[-1]
    assert (concat_slice["target_start"], concat_slice["target_end"], concat_slice["target_len"]) == (16, 32, 32)
    assert ("fc.weight", 0) in {(m.name, m.axis) for m in trace.groups[FUSE].members}
    assert "dw.conv.weight" in trace.skipped
    assert trace.groups[EXPAND].bn_scale == "expand.bn.weight" and trace.groups[LEFT].bn_scale is None


def test_make_plan_and_trace_leave_the_model_unchanged(tiny):
    net, x, trace = tiny
    before, output = state_values(net), forward(net, x)
    net.train()
    trace_model(net, [x])
    make_plan(net, [x], ALL_RATIOS, "bn_scale", trace=trace)
    assert net.training, "training flag restored after tracing"
    net.eval()
    after = state_values(net)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    assert np.array_equal(forward(net, x), output)


def test_tracing_leaves_no_parameter_records_for_a_later_jit_save(tiny, tmp_path):
    """PaddleSlim's trace records the parameters it reads under ``id(program)``; a record left behind is handed to
    the next ``paddle.jit.save`` whose program lands at that address (a random ``KeyError`` in jit/api.py)."""
    from paddle.jit.dy2static.program_translator import ProgramTranslator

    class Failing(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 4, 3)

        def forward(self, x):
            self.conv(x)
            raise ValueError("stops half way")

    records = ProgramTranslator.get_instance()._params_recorder.params_dict
    before = {key: len(params) for key, params in records.items()}
    net, x, _ = tiny
    trace_model(net, [x])
    with pytest.raises(ValueError, match="half way"):
        trace_model(Failing(), [x])
    assert paddle.in_dynamic_mode()
    assert {key: len(params) for key, params in records.items()} == before
    paddle.jit.save(net, str(tmp_path / "inference"), input_spec=[paddle.static.InputSpec(list(x.shape))])
    assert (tmp_path / "inference.pdiparams").stat().st_size > 0


def test_applied_plan_has_the_planned_shapes_and_runs():
    net, x = build_tiny_net(0), example_input()
    plan = make_plan(net, [x], ALL_RATIOS, "l1_norm", round_to=8)
    apply_plan(net, plan)
    params = dict(net.named_parameters())
    for name, change in plan.tensors.items():
        assert list(params[name].shape) == change.shape_after
    assert list(params[EXPAND].shape) == [16, 16, 1, 1] and list(params[PROJECT].shape) == [16, 16, 1, 1]
    assert list(params["dw.conv.weight"].shape) == [16, 1, 3, 3] and net.dw.conv._groups == 16
    assert net.dw.conv._in_channels == 16 and net.dw.conv._out_channels == 16
    assert net.expand.bn._num_features == 16 and net.fuse.conv._out_channels == 16
    assert list(params["fc.weight"].shape) == [16, 10]
    assert list(params[FUSE].shape) == [16, 16, 1, 1]  # concat of two 8-channel halves
    assert forward(net, x).shape == (1, 10)
    assert plan.flops_after < plan.flops_before and plan.params_after < plan.params_before


@pytest.mark.parametrize("criterion", ["l1_norm", "bn_scale", "fpgm"])
def test_restore_from_json_gives_bit_identical_outputs(tmp_path, criterion):
    pruned, x = build_tiny_net(0), example_input()
    plan = make_plan(pruned, [x], ALL_RATIOS, criterion)
    apply_plan(pruned, plan)
    fresh = build_tiny_net(7)
    apply_plan(fresh, PrunePlan.from_json(plan.to_json()))
    fresh.set_state_dict(pruned.state_dict())
    assert np.array_equal(forward(fresh, x), forward(pruned, x))


def test_restore_in_a_fresh_process_is_bit_identical(tmp_path):
    pruned, x = build_tiny_net(0), example_input()
    plan = make_plan(pruned, [x], ALL_RATIOS, "l1_norm")
    apply_plan(pruned, plan)
    (tmp_path / "plan.json").write_text(plan.to_json())
    paddle.save(pruned.state_dict(), str(tmp_path / "model.pdparams"))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", forward(pruned, x))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import compress, numpy as np, paddle
        from compress.pruning import PrunePlan, apply_plan
        from test_pruning import build_tiny_net
        paddle.base.core.set_num_threads(1)
        folder = {str(tmp_path)!r}
        model = build_tiny_net(123)
        apply_plan(model, PrunePlan.from_json(open(folder + "/plan.json").read()))
        model.set_state_dict(paddle.load(folder + "/model.pdparams"))
        got = model(paddle.to_tensor(np.load(folder + "/x.npy"))).numpy()
        print("IDENTICAL" if np.array_equal(got, np.load(folder + "/expected.npy")) else "DIFFERENT")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "IDENTICAL"


def test_l1_norm_and_bn_scale_give_different_valid_plans(tiny):
    net, x, trace = tiny
    ratios = {EXPAND: 0.3, LEFT: 0.5, RIGHT: 0.5}
    by_l1 = make_plan(net, None, ratios, "l1_norm", trace=trace)
    by_bn = make_plan(net, None, ratios, "bn_scale", trace=trace)
    assert by_l1.tensors[EXPAND].kept[0] != by_bn.tensors[EXPAND].kept[0]
    assert by_l1.tensors[LEFT].kept[0] == by_bn.tensors[LEFT].kept[0]  # no BatchNorm after `left`: L1 fallback
    sources = {d.master: d.score_source for d in by_bn.decisions}
    assert sources[EXPAND] == "bn_scale" and sources[LEFT].startswith("l1_norm (no BatchNorm")
    gammas = np.abs(net.expand.bn.weight.numpy())
    assert set(by_bn.tensors[EXPAND].kept[0]) == set(np.argsort(-gammas)[:16].tolist())
    for plan in (by_l1, by_bn):
        model = build_tiny_net(0)
        apply_plan(model, plan)
        assert forward(model, x).shape == (1, 10)


def test_unknown_criterion_lists_the_valid_names(tiny):
    net, _, trace = tiny
    with pytest.raises(ConfigError, match="bn_scale.*fpgm.*l1_norm"):
        make_plan(net, None, {EXPAND: 0.3}, "l2_norm", trace=trace)
    with pytest.raises(ConfigError, match="l1_norm"):
        get_criterion("L1")


def test_kept_channel_count_rounds_to_multiples_never_below():
    assert kept_channel_count(24, 0.3, 8) == 16
    assert kept_channel_count(384, 0.3, 8) == 272
    assert kept_channel_count(24, 0.95, 8) == 8
    assert kept_channel_count(6, 0.5, 8) == 6
    assert kept_channel_count(96, 0.0, 8) == 96


def test_bad_ratios_and_unprunable_layers_are_config_errors(tiny):
    net, _, trace = tiny
    with pytest.raises(ConfigError, match="in \\[0, 1\\)"):
        make_plan(net, None, {EXPAND: 1.0}, trace=trace)
    with pytest.raises(ConfigError, match="depth-wise"):
        make_plan(net, None, {"dw.conv.weight": 0.3}, trace=trace)
    with pytest.raises(ConfigError, match="not a conv weight"):
        make_plan(net, None, {"no.such.weight": 0.3}, trace=trace)


def test_apply_plan_refuses_a_model_that_does_not_match():
    net, x = build_tiny_net(0), example_input()
    plan = make_plan(net, [x], {EXPAND: 0.5})
    apply_plan(net, plan)
    with pytest.raises(CheckpointError, match="already pruned"):
        apply_plan(net, plan)
    with pytest.raises(CheckpointError, match="not a valid pruning plan"):
        PrunePlan.from_json('{"version": 1}')
    with pytest.raises(CheckpointError, match="version"):
        PrunePlan.from_json('{"version": 99}')


def test_coupled_residual_partner_uses_the_first_mask(tiny):
    net, _, trace = tiny
    plan = make_plan(net, None, {EXPAND: 0.7, PROJECT: 0.25}, trace=trace)
    decisions = {d.master: d for d in plan.decisions}
    assert decisions[PROJECT].status == f"coupled to {EXPAND}"
    assert plan.tensors[PROJECT].kept[0] == plan.tensors[EXPAND].kept[0]
    assert len(plan.tensors[EXPAND].kept[0]) == 8


def test_flops_agree_with_paddleslim(tiny):
    from paddleslim.analysis import dygraph_flops

    net, x, trace = tiny
    plan = make_plan(net, None, {}, trace=trace)
    with forget_traced_parameters():
        theirs = dygraph_flops(net, [x], only_conv=True)
    assert plan.flops_before == plan.flops_after == theirs
    assert plan.params_before == sum(p.size for p in net.parameters() if p.trainable)


def test_plan_json_round_trip_and_table(tiny):
    net, _, trace = tiny
    plan = make_plan(net, None, ALL_RATIOS, "bn_scale", trace=trace)
    again = PrunePlan.from_json(plan.to_json())
    assert again == plan
    table = format_plan(plan)
    assert "expand.conv" in table and "24 -> 16" in table and f"-{100 * plan.flops_reduction:.1f}%" in table
    assert "FLOPs counted" in table


def test_prunable_layers_skip_first_conv_heads_depthwise_and_followers(tiny):
    net, _, trace = tiny
    assert prunable_layers(net, []) == [EXPAND, PROJECT, SE_REDUCE, "se_expand.weight", LEFT, RIGHT, FUSE]
    traced = prunable_layers(net, ["fuse*"], trace, round_to=8)
    # project and se_expand follow expand's mask; se_reduce has only round_to channels; fuse matches the pattern
    assert traced == [EXPAND, LEFT, RIGHT]


# ---------------------------------------------------------------- sensitivity


def test_zeroing_is_equivalent_to_pruning(tiny):
    net, x, trace = tiny
    reference = forward(net, x)
    for layer in prunable_layers(net, [], trace, round_to=4):
        plan = make_plan(net, None, {layer: 0.5}, trace=trace, round_to=4)
        with pruned_by_zeroing(net, plan):
            zeroed = forward(net, x)
        pruned = build_tiny_net(0)
        apply_plan(pruned, plan)
        np.testing.assert_allclose(zeroed, forward(pruned, x), rtol=1e-5, atol=1e-6, err_msg=layer)
        assert not np.allclose(zeroed, reference), f"pruning {layer} should change the output"
    assert np.array_equal(forward(net, x), reference)


class CountingEval:
    """eval_fn that counts calls, returns a deterministic metric, and can fail after some calls."""

    def __init__(self, x, fail_after=None):
        self.x, self.fail_after, self.calls = x, fail_after, 0

    def __call__(self, model):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return float(-np.abs(forward(model, self.x)).sum())


def test_sensitivity_resumes_and_reevaluates_nothing(tiny, tmp_path):
    net, x, trace = tiny
    state = tmp_path / "sens.json"
    layers, grid = [EXPAND, LEFT, RIGHT], [0.25, 0.5, 0.75]
    args = dict(model=net, example_inputs=None, layers=layers, ratios_grid=grid, criterion="l1_norm",
                 state_path=str(state), show_progress=False, trace=trace, round_to=4)
    interrupted = CountingEval(x, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        analyze_sensitivity(eval_fn=interrupted, **args)
    saved = json.loads(state.read_text())
    assert saved["baseline"] is not None and sum(len(v) for v in saved["results"].values()) == 3
    resumed = CountingEval(x)
    sens = analyze_sensitivity(eval_fn=resumed, **args)
    assert resumed.calls == len(layers) * len(grid) - 3
    again = CountingEval(x)
    assert analyze_sensitivity(eval_fn=again, **args) == sens and again.calls == 0
    fresh = CountingEval(x)
    uninterrupted = analyze_sensitivity(eval_fn=fresh, **{**args, "state_path": str(tmp_path / "other.json")})
    assert uninterrupted == sens
    assert all(sens[layer][0.0] == sens[EXPAND][0.0] for layer in layers)
    extended = CountingEval(x)
    analyze_sensitivity(eval_fn=extended, **{**args, "layers": layers + [FUSE]})
    assert extended.calls == len(grid), "adding a layer evaluates only that layer"


def test_sensitivity_refuses_a_state_made_with_other_settings(tiny, tmp_path):
    net, x, trace = tiny
    state = str(tmp_path / "sens.json")
    analyze_sensitivity(net, None, [LEFT], [0.5], "l1_norm", CountingEval(x), state, False, trace=trace)
    with pytest.raises(CheckpointError, match="criterion"):
        analyze_sensitivity(net, None, [LEFT], [0.5], "fpgm", CountingEval(x), state, False, trace=trace)


SENS = {
    "a": {0.0: 0.80, 0.2: 0.79, 0.4: 0.76, 0.6: 0.60},
    "b": {0.0: 0.80, 0.2: 0.70, 0.4: 0.50, 0.6: 0.30},
    "c": {0.0: 0.80, 0.2: 0.80, 0.4: 0.80, 0.6: 0.80},
}


def test_ratios_from_loss_budget_interpolates_between_grid_points():
    ratios = ratios_from_loss_budget(SENS, 0.80, max_loss=0.02)
    assert ratios["a"] == pytest.approx(0.2 + 0.2 * (0.02 - 0.01) / (0.04 - 0.01))
    assert ratios["b"] == pytest.approx(0.2 * 0.02 / 0.10)
    assert ratios["c"] == pytest.approx(0.6)
    assert ratios_from_loss_budget(SENS, None, 0.02, grid=[0.2, 0.4])["c"] == pytest.approx(0.4)
    assert rank_layers(SENS) == ["b", "a", "c"]


def test_ratios_for_flops_target_reaches_the_target(tiny):
    net, _, trace = tiny
    sens = {EXPAND: SENS["b"], LEFT: SENS["a"], RIGHT: SENS["a"], FUSE: SENS["c"]}
    ratios, plan, max_loss = ratios_for_flops_target(sens, 0.80, 0.3, [0.2, 0.4, 0.6], net, trace)
    assert plan.flops_reduction >= 0.3
    smaller = {k: v for k, v in ratios_from_loss_budget(sens, 0.80, max_loss * 0.9).items() if v > 0}
    assert make_plan(net, None, smaller, trace=trace).flops_reduction <= plan.flops_reduction
    with pytest.raises(ConfigError, match="out of reach"):
        ratios_for_flops_target(sens, 0.80, 0.95, [0.2, 0.4, 0.6], net, trace)


def test_flops_target_scales_down_layers_that_overshoot_at_zero_loss(tiny):
    net, _, trace = tiny
    lossless = {EXPAND: SENS["c"], LEFT: SENS["c"], RIGHT: SENS["c"], FUSE: SENS["c"]}
    at_zero_budget = {k: v for k, v in ratios_from_loss_budget(lossless, 0.80, 0.0).items() if v > 0}
    overshoot = make_plan(net, None, at_zero_budget, trace=trace).flops_reduction
    target = overshoot / 2
    ratios, plan, _ = ratios_for_flops_target(lossless, 0.80, target, [0.2, 0.4, 0.6], net, trace)
    assert target <= plan.flops_reduction < overshoot
    assert all(r < 0.6 for r in ratios.values())


def test_plot_sensitivity_writes_a_png(tmp_path):
    path = tmp_path / "sens.png"
    plot_sensitivity(SENS, str(path), top_k=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_l1_norm_plan_matches_paddleslim_l1_pruner():
    from paddleslim.dygraph.prune.l1norm_pruner import L1NormFilterPruner

    ours, theirs, x = build_tiny_net(0), build_tiny_net(0), example_input()
    apply_plan(ours, make_plan(ours, [x], {EXPAND: 1 / 3}, "l1_norm"))
    with forget_traced_parameters():
        L1NormFilterPruner(theirs, [x]).prune_var(theirs.expand.conv.weight.name, 0, 1 / 3)
    theirs_params = dict(theirs.named_parameters())
    for name, value in ours.named_parameters():
        assert np.array_equal(value.numpy(), theirs_params[name].numpy()), name
