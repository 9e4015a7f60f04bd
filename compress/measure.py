"""Model size measurements: parameter count, FLOPs, and file sizes."""
import os


def count_params(model):
    """Number of parameter elements (trainable or not, BN statistics excluded)."""
    return int(sum(int(p.numel()) for p in model.parameters()))


def count_flops(model, input_shape):
    """Multiply-accumulates of one forward pass at ``input_shape`` (N, C, H, W).

    Counted from the traced program, as pruning plans count them (``compress.pruning.plan.FLOPS_COUNTED``):
    conv2d / depthwise_conv2d and Linear matmuls; bias adds, activations, BatchNorm, pooling, upsampling and
    attention matmuls are not counted, and neither is activation memory traffic. ``paddle.flops`` is not used:
    it leaves ``total_ops`` buffers in the model's state dict.
    """
    import numpy as np

    from compress.pruning.plan import make_plan
    from compress.pruning.trace import trace_model
    example = np.zeros(list(input_shape), dtype="float32")
    return int(make_plan(model, None, {}, trace=trace_model(model, [example])).flops_before)


def dir_size(path):
    """Total bytes of the files under ``path`` (or of one file)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def human_count(value):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)
