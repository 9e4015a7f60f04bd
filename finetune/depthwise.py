"""Depth-wise 2-D convolution for CPU training: forward and gradients as Numba-compiled loops.

Paddle 2.6's CPU ``depthwise_conv2d`` kernels are an im2col and one tiny GEMM per channel, forward and backward.
PP-OCRv4's PP-LCNetV3 backbones run one depth-wise conv per block, and in a distilled rec training step those 14
convs took 62.3% of the step (their gradient 47.3%; ``benchmarks/bench_train_step.py --profile``): a 5x5 one on
[8, 240, 12, 80], 46M multiply-adds, takes 79 ms forward and 278 ms backward on 2 Xeon cores, these kernels 11 and
23 ms (``benchmarks/bench_depthwise.py``; a distilled rec step 10.67 -> 1.87 s with the other fast ops).

A depth-wise conv has no cross-channel sums: every (sample, channel) plane is an independent 2-D correlation. The
kernels below take one plane per parallel task and, for every output row and filter tap, run one contiguous
multiply-add over the row (the filter weight a scalar), which LLVM vectorises. The gradient kernel computes the
input gradient and the per-plane weight gradient in the same pass over the output gradient; the weight gradient is
then summed over the batch, in a fixed order, so the result does not depend on the thread count. Float sums are
reassociated (``fastmath`` without the no-NaN / no-Inf assumptions, so a NaN still reaches the trainer's guard):
results equal Paddle's to float rounding (relative 1e-6, ``tests/unit/test_depthwise.py``).

:func:`depthwise_conv2d` is the autograd op (a ``PyLayer``); :func:`supported` says which convs it covers (NCHW,
float32, one filter per input channel, explicit symmetric zero padding). ``finetune.fast_ops.fast_cpu_ops`` routes
those convs through it during training.
"""
import numba
import numpy as np
import paddle
from numba import prange
from paddle.autograd import PyLayer

from compress import threads

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # not "nnan" / "ninf": NaNs must propagate


@numba.njit(cache=True)
def _column_ranges(out_w, width, stride, pad, dilation, taps):
    """Per filter column j: the output columns [lo, hi) whose input column ``ow * stride - pad + j * dilation``
    lies inside the image."""
    ranges = np.zeros((taps, 2), np.int64)
    for j in range(taps):
        offset = j * dilation - pad
        lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
        hi = min(out_w, (width - 1 - offset) // stride + 1)
        ranges[j, 0], ranges[j, 1] = lo, max(lo, hi)
    return ranges


@numba.njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def _forward(x, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_h, out_w):
    batch, channels, height, width = x.shape
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    cols = _column_ranges(out_w, width, stride_w, pad_w, dil_w, kernel_w)
    out = np.empty((batch, channels, out_h, out_w), np.float32)
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        x_plane, out_plane, w_plane = x[n, c], out[n, c], weight[c, 0]
        for oh in range(out_h):
            out_row = out_plane[oh]
            out_row[:] = 0
            for i in range(kernel_h):
                ih = oh * stride_h - pad_h + i * dil_h
                if ih < 0 or ih >= height:
                    continue
                x_row = x_plane[ih]
                for j in range(kernel_w):
                    lo, hi = cols[j, 0], cols[j, 1]
                    start = lo * stride_w + j * dil_w - pad_w
                    w = w_plane[i, j]
                    o = out_row[lo:hi]
                    if stride_w == 1:  # contiguous: vectorised
                        xs = x_row[start:start + hi - lo]
                        for t in range(hi - lo):
                            o[t] += w * xs[t]
                    else:
                        for t in range(hi - lo):
                            o[t] += w * x_row[start + t * stride_w]
    return out


@numba.njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def _backward(x, weight, grad_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w):
    batch, channels, height, width = x.shape
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    cols = _column_ranges(out_w, width, stride_w, pad_w, dil_w, kernel_w)
    grad_x = np.zeros_like(x)
    grad_w_planes = np.zeros((batch, channels, kernel_h, kernel_w), np.float32)
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        x_plane, g_plane, gx_plane = x[n, c], grad_out[n, c], grad_x[n, c]
        w_plane, gw_plane = weight[c, 0], grad_w_planes[n, c]
        for oh in range(out_h):
            g_row = g_plane[oh]
            for i in range(kernel_h):
                ih = oh * stride_h - pad_h + i * dil_h
                if ih < 0 or ih >= height:
                    continue
                x_row, gx_row = x_plane[ih], gx_plane[ih]
                for j in range(kernel_w):
                    lo, hi = cols[j, 0], cols[j, 1]
                    start = lo * stride_w + j * dil_w - pad_w
                    w = w_plane[i, j]
                    g = g_row[lo:hi]
                    acc = np.float32(0.0)
                    if stride_w == 1:
                        xs, gxs = x_row[start:start + hi - lo], gx_row[start:start + hi - lo]
                        for t in range(hi - lo):
                            gxs[t] += g[t] * w
                            acc += g[t] * xs[t]
                    else:
                        for t in range(hi - lo):
                            k = start + t * stride_w
                            gx_row[k] += g[t] * w
                            acc += g[t] * x_row[k]
                    gw_plane[i, j] += acc
    grad_w = np.zeros((channels, 1, kernel_h, kernel_w), np.float32)
    for n in range(batch):
        grad_w[:, 0] += grad_w_planes[n]
    return grad_x, grad_w


def _out_size(size, kernel, stride, pad, dilation):
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _tensor(array):
    """A Paddle CPU tensor on ``array``'s memory (no copy; the tensor keeps the array alive)."""
    return paddle.base.core.eager.Tensor(value=array, place=paddle.CPUPlace(), zero_copy=True)


def _set_threads():
    """Numba's threads follow the dygraph math threads (``Global.threads``)."""
    count = threads.current()
    if count is not None:
        numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))


class _DepthwiseConv2D(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        _set_threads()
        xs = np.ascontiguousarray(x.numpy())
        ws = np.ascontiguousarray(weight.numpy())
        out_h = _out_size(xs.shape[2], ws.shape[2], stride[0], padding[0], dilation[0])
        out_w = _out_size(xs.shape[3], ws.shape[3], stride[1], padding[1], dilation[1])
        out = _forward(xs, ws, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], out_h, out_w)
        ctx.save_for_backward(x, weight)
        ctx.conf = stride, padding, dilation
        return _tensor(out)

    @staticmethod
    def backward(ctx, grad_out):
        _set_threads()
        x, weight = ctx.saved_tensor()
        (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = ctx.conf
        grad_x, grad_w = _backward(np.ascontiguousarray(x.numpy()), np.ascontiguousarray(weight.numpy()),
                                   np.ascontiguousarray(grad_out.numpy()),
                                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        return _tensor(grad_x), _tensor(grad_w)


def _pair(value):
    values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return values * 2 if len(values) == 1 else values


def supported(layer):
    """True when ``layer`` (a ``paddle.nn.Conv2D``) is a depth-wise conv these kernels compute: one filter per input
    channel, NCHW, zero padding given explicitly and equal on both sides."""
    padding = layer._updated_padding
    pads = _pair(padding) if isinstance(padding, (int, list, tuple)) else []
    return (layer._groups == layer._in_channels == layer._out_channels and layer._groups > 1
            and layer._data_format == "NCHW" and layer._padding_algorithm == "EXPLICIT"
            and getattr(layer, "_padding_mode", "zeros") == "zeros" and len(pads) == 2
            and len(_pair(layer._stride)) == 2 and len(_pair(layer._dilation)) == 2
            and layer.weight.dtype == paddle.float32)


def depthwise_conv2d(x, weight, stride=1, padding=0, dilation=1):
    """``F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation, groups=C)`` for NCHW float32
    ``x`` [N, C, H, W] and ``weight`` [C, 1, kh, kw], differentiable in both; ``padding`` symmetric (int or
    [pad_h, pad_w])."""
    if x.ndim != 4 or weight.ndim != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"depthwise_conv2d: input {x.shape} and weight {weight.shape} are not a depth-wise conv")
    return _DepthwiseConv2D.apply(x, weight, _pair(stride), _pair(padding), _pair(dilation))
