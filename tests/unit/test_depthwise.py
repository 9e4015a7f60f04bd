"""finetune.depthwise: the Numba depth-wise conv gives Paddle's outputs and gradients, and fast_cpu_ops uses it."""
import numba
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from finetune import depthwise
from finetune.fast_ops import fast_cpu_ops

CASES = [  # (shape, kernel, stride, padding, dilation): PP-LCNetV3's convs and the edge cases of the index ranges
    ((2, 6, 12, 20), 3, (1, 1), 1, 1),
    ((2, 6, 12, 20), 5, (2, 1), 2, 1),
    ((1, 4, 11, 13), 3, (2, 2), 1, 1),
    ((2, 3, 7, 9), 3, (2, 3), 0, 2),
    ((1, 5, 4, 6), 5, (1, 1), 3, 1),   # padding wider than the kernel's reach at the borders
    ((1, 2, 3, 3), 5, (1, 2), 2, 1),   # image smaller than the filter
]


def _run(conv, x, weight, grad):
    xt, wt = paddle.to_tensor(x, stop_gradient=False), paddle.to_tensor(weight, stop_gradient=False)
    out = conv(xt, wt)
    out.backward(paddle.to_tensor(grad))
    return out.numpy(), xt.grad.numpy(), wt.grad.numpy()


@pytest.mark.parametrize("shape,kernel,stride,padding,dilation", CASES)
def test_depthwise_conv_gives_paddles_outputs_and_gradients(shape, kernel, stride, padding, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    weight = rng.standard_normal((shape[1], 1, kernel, kernel)).astype("float32")
    reference = F.conv2d(paddle.to_tensor(x), paddle.to_tensor(weight), stride=stride, padding=padding,
                         dilation=dilation, groups=shape[1])
    grad = rng.standard_normal(reference.shape).astype("float32")
    expected = _run(lambda a, b: F.conv2d(a, b, stride=stride, padding=padding, dilation=dilation, groups=shape[1]),
                    x, weight, grad)
    got = _run(lambda a, b: depthwise.depthwise_conv2d(a, b, stride, padding, dilation), x, weight, grad)
    for name, value, ref in zip(("output", "input gradient", "weight gradient"), got, expected):
        assert value.shape == ref.shape, name
        np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()), err_msg=name)


def test_depthwise_results_do_not_depend_on_the_thread_count_and_nans_propagate():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8, 10, 16)).astype("float32")
    weight = rng.standard_normal((8, 1, 3, 3)).astype("float32")
    grad = rng.standard_normal((3, 8, 10, 16)).astype("float32")
    conv = lambda a, b: depthwise.depthwise_conv2d(a, b, 1, 1)  # noqa: E731
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            runs.append(depthwise._backward(x, weight, grad, 1, 1, 1, 1, 1, 1))
    finally:
        numba.set_num_threads(before)
    for one, other in zip(*runs):
        np.testing.assert_array_equal(one, other)
    x[1, 2, 4, 4] = np.nan
    out, grad_x, grad_w = _run(conv, x, weight, grad)
    assert np.isnan(out[1, 2, 3:6, 3:6]).all() and np.isfinite(np.delete(out, 1, axis=0)).all()
    assert np.isnan(grad_w[2]).all() and np.isfinite(np.delete(grad_w, 2, axis=0)).all()


def test_supported_depthwise_convs_only():
    assert depthwise.supported(paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8))
    assert depthwise.supported(paddle.nn.Conv2D(8, 8, 5, stride=(2, 1), padding=2, groups=8, bias_attr=False))
    assert not depthwise.supported(paddle.nn.Conv2D(8, 8, 3, padding=1))                  # dense
    assert not depthwise.supported(paddle.nn.Conv2D(8, 16, 3, padding=1, groups=8))       # two filters per channel
    assert not depthwise.supported(paddle.nn.Conv2D(8, 8, 3, padding="SAME", groups=8))
    assert not depthwise.supported(paddle.nn.Conv2D(8, 8, 3, padding=[0, 1, 1, 0], groups=8))
    assert not depthwise.supported(paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8, data_format="NHWC"))
    with pytest.raises(ValueError, match="not a depth-wise conv"):
        depthwise.depthwise_conv2d(paddle.zeros([1, 4, 5, 5]), paddle.zeros([4, 2, 3, 3]))


def test_fast_cpu_ops_route_depthwise_convs_with_and_without_bias(monkeypatch):
    calls = []
    original = depthwise.depthwise_conv2d
    monkeypatch.setattr(depthwise, "depthwise_conv2d", lambda *args: calls.append(1) or original(*args))
    rng = np.random.default_rng(2)
    x = paddle.to_tensor(rng.standard_normal((2, 6, 9, 11)).astype("float32"))
    for bias in (None, False):
        paddle.seed(0)
        conv = paddle.nn.Conv2D(6, 6, 5, stride=(2, 1), padding=2, groups=6, bias_attr=bias)
        reference = conv(x).numpy()
        with fast_cpu_ops(conv) as switched:
            assert switched == 1
            np.testing.assert_allclose(conv(x).numpy(), reference, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
