"""A deliberately broken candidate for the rollback drill (``benchmarks/bench_serve.py --drill``) and the tests:
a copy of an exported model folder with one convolution's weights perturbed by Gaussian noise.

Only the Paddle program (``inference.pdmodel`` / ``.pdiparams``) is changed; ONNX or OpenVINO IR files in the copy
keep the original weights, so :func:`perturbed_copy` refuses a backend that would read one of them.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import os
import shutil

import numpy as np

from compress.errors import InputError

CONV_TYPES = ("conv2d", "depthwise_conv2d")


def perturbed_copy(model_dir, out_dir, noise_scale=1.0, conv_index=None, seed=0, backend=None):
    """Copy exported folder ``model_dir`` to ``out_dir`` with one conv's weights perturbed.

    Args:
        model_dir: an exported folder (``deploy.yml`` + a Paddle program).
        out_dir: where the copy goes (must not exist).
        noise_scale: noise standard deviation, in units of the conv's mean absolute weight.
        conv_index: which conv, in program order (None: the middle one, inside the backbone).
        seed: noise seed.
        backend: the deploy config the copy will run with (None: the folder's default); it must read the program.

    Returns:
        the name of the perturbed weight tensor.

    Raises:
        InputError: no Paddle program in the folder, a backend that reads another file, or a bad ``conv_index``.
    """
    import paddle

    from compress.quant.ptq import static_mode
    from export.deploy import read_deploy_bundle
    from export.predictor import find_model_files

    bundle = read_deploy_bundle(model_dir)
    files = find_model_files(model_dir)
    deploy = bundle.deploy(backend)
    read = bundle.model_path(deploy.backend)
    if files.format != "pdmodel" or os.path.abspath(read) not in (os.path.abspath(model_dir),
                                                                   os.path.abspath(files.model_file)):
        raise InputError(f"{model_dir}: backend {deploy.backend} reads {read}, not a Paddle program this drill can "
                         f"perturb; pass a folder and backend that run inference.pdmodel (paddle_cpu, openvino)")
    shutil.copytree(model_dir, out_dir)
    prefix = os.path.join(out_dir, os.path.splitext(os.path.basename(files.model_file))[0])
    scope = paddle.static.Scope()
    exe = paddle.static.Executor(paddle.CPUPlace())
    with static_mode(), paddle.static.scope_guard(scope):
        program, feed_names, fetch_vars = paddle.static.load_inference_model(prefix, exe)
        convs = [op.input("Filter")[0] for op in program.global_block().ops if op.type in CONV_TYPES]
        index = len(convs) // 2 if conv_index is None else conv_index
        if not 0 <= index < len(convs):
            raise InputError(f"conv_index {index}: the program has {len(convs)} convs (0 ... {len(convs) - 1})")
        tensor = scope.find_var(convs[index]).get_tensor()
        weights = np.array(tensor)
        noise = np.random.default_rng(seed).standard_normal(weights.shape).astype("float32")
        tensor.set(weights + noise_scale * float(np.abs(weights).mean()) * noise, paddle.CPUPlace())
        feed_vars = [program.global_block().var(name) for name in feed_names]
        paddle.static.save_inference_model(prefix, feed_vars, fetch_vars, exe, program=program)
    return convs[index]
