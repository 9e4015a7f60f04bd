"""Model size measurements: parameter count, FLOPs, and file sizes."""
import os


def count_params(model):
    """Number of parameter elements (trainable or not, BN statistics excluded)."""
    return int(sum(int(p.numel()) for p in model.parameters()))


def count_flops(model, input_shape):
    """Multiply-accumulate count of one forward pass at ``input_shape`` (N, C, H, W), via ``paddle.flops``.

    ``paddle.flops`` hooks the standard layers (Conv2D, Linear, BatchNorm, pooling, activations); matrix products
    written as ``paddle.matmul`` inside custom layers (SVTR attention) are not counted, and neither is activation
    memory traffic. The number is comparable between a model and its pruned version, which is what it is for.
    """
    import contextlib
    import io

    import paddle
    was_training = model.training
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        flops = paddle.flops(model, list(input_shape), print_detail=False)
    if was_training:
        model.train()
    return int(flops)


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
