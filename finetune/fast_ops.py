"""Faster CPU formulations of the ops that dominate a PP-OCRv4 training step in Paddle 2.6 dygraph.

Paddle 2.6's CPU elementwise kernels take a slow generic path when one operand is broadcast over the other: adding a
conv bias (``out + bias.reshape([1, C, 1, 1])``) or a scalar affine (PP-LCNetV3's ``LearnableAffineBlock``,
``scale * x + bias`` with one-element parameters) on a [16, 32, 24, 160] activation took 10-30x the time of an
elementwise add of two equal shapes, and their gradients (a reduction to the parameter's shape) about as long again.
PP-OCRv4 runs one such op after every conv and two per rep layer, which made them about a third of a training step.

Paddle 2.6's CPU ``log_softmax`` is slower still: on rec's CTC output ([16, 40, 6625]) it took 1.8 s forward and
1.8 s backward, ``x - logsumexp(x)`` 0.08 s in all (AMD EPYC, 2 threads; ``benchmarks/bench_log_softmax.py``).
Rec's distillation term (per-frame KL to the teacher) runs it on every step, so it was most of a rec fine-tune
step. :func:`log_softmax` computes the same ``x - logsumexp(x)``.

The same per-channel affine ``y = x * w[c] + b[c]`` is what an inference-mode batch norm with mean 0 and variance
``1 - eps`` computes, and Paddle's batch-norm kernels (forward and gradient) are vectorised: :func:`channel_affine`
uses them. The results equal the plain formulation up to float rounding (about 1e-7 relative).

:func:`fast_cpu_ops` swaps these formulations into a model's ``Conv2D`` (with bias, NCHW, zero padding) and
``LearnableAffineBlock`` layers for the duration of a ``with`` block; parameters and state dict are untouched. It
also routes depth-wise convs (with or without bias) through :mod:`finetune.depthwise`, Numba-compiled kernels that
replace Paddle 2.6's per-channel im2col + GEMM (a 5x5 conv on [8, 240, 12, 80]: 79 -> 11 ms forward, 278 -> 23 ms
backward, 2 threads; ``benchmarks/bench_depthwise.py``).
"""
import contextlib

import paddle
import paddle.nn.functional as F

_EPS = 1e-5


def channel_affine(x, weight, bias):
    """``x * weight[c] + bias[c]`` over the channel axis 1 of an NCHW tensor, via the batch-norm kernels.

    Args:
        x: a 4-D NCHW tensor.
        weight: [C] tensor (may require gradients).
        bias: [C] tensor (may require gradients).
    """
    channels = x.shape[1]
    mean = paddle.zeros([channels], dtype=x.dtype)
    variance = paddle.full([channels], 1.0 - _EPS, dtype=x.dtype)  # 1/sqrt(variance + eps) == 1 in float32
    return F.batch_norm(x, mean, variance, weight=weight, bias=bias, training=True, use_global_stats=True,
                        epsilon=_EPS)


def log_softmax(x, axis=-1):
    """``log(softmax(x))`` along ``axis`` as ``x - logsumexp(x)``: equal to ``F.log_softmax`` up to float rounding,
    about 47x faster forward and backward than Paddle 2.6's CPU kernel on CTC-sized inputs (module docstring)."""
    return x - paddle.logsumexp(x, axis=axis, keepdim=True)


def _small(x):
    """Too small to gain, and Paddle's batch norm gives no parameter gradients on 1x1 maps (SE blocks)."""
    return x.ndim != 4 or x.shape[2] * x.shape[3] <= 1


def _conv2d_forward(layer):
    from finetune import depthwise
    numba_depthwise = depthwise.supported(layer)

    def forward(x):
        if x.ndim != 4:
            return type(layer).forward(layer, x)
        if numba_depthwise and x.dtype == paddle.float32:
            out = depthwise.depthwise_conv2d(x, layer.weight, layer._stride, layer._updated_padding, layer._dilation)
        else:
            out = F.conv._conv_nd(x, layer.weight, bias=None, stride=layer._stride,
                                  padding=layer._updated_padding, padding_algorithm=layer._padding_algorithm,
                                  dilation=layer._dilation, groups=layer._groups, data_format=layer._data_format,
                                  channel_dim=layer._channel_dim, op_type=layer._op_type, use_cudnn=layer._use_cudnn)
        if layer.bias is None:
            return out
        if _small(out):
            return out + layer.bias.reshape([1, -1, 1, 1])
        ones = paddle.ones([layer._out_channels], dtype=out.dtype)
        return channel_affine(out, ones, layer.bias)
    return forward


def _affine_forward(layer):
    def forward(x):
        if _small(x):
            return type(layer).forward(layer, x)
        channels = x.shape[1]
        return channel_affine(x, layer.scale.expand([channels]), layer.bias.expand([channels]))
    return forward


def _patchable(layer):
    if isinstance(layer, paddle.nn.Conv2D):
        from finetune import depthwise
        plain = layer._data_format == "NCHW" and layer._padding_mode == "zeros"
        return plain and (layer.bias is not None or depthwise.supported(layer))
    name = type(layer).__name__
    return name == "LearnableAffineBlock" and list(getattr(layer, "scale", paddle.zeros([2])).shape) == [1] and \
        list(getattr(layer, "bias", paddle.zeros([2])).shape) == [1]


@contextlib.contextmanager
def fast_cpu_ops(model):
    """Use :func:`channel_affine` for the conv biases and scalar affine blocks of ``model`` inside the block.

    Yields:
        The number of layers switched.
    """
    switched = []
    for layer in model.sublayers(include_self=True):
        if "forward" in layer.__dict__ or not _patchable(layer):
            continue  # already wrapped (e.g. by QAT) or not one of the slow patterns
        layer.forward = (_conv2d_forward if isinstance(layer, paddle.nn.Conv2D) else _affine_forward)(layer)
        switched.append(layer)
    try:
        yield len(switched)
    finally:
        for layer in switched:
            del layer.forward
