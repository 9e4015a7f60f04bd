"""Quantization-aware training (QAT) helpers around PaddleSlim's dygraph ``QAT``.

The pieces the ``quant`` stage strings together for ``method: qat`` (the training itself is
:class:`finetune.trainer.Trainer`):

* :func:`fold_conv_affine` merges each batch norm and scalar affine layer (PP-LCNetV3's
  ``LearnableAffineBlock``: ``x * scale + bias``) that directly consumes a ``Conv2D``'s output into that conv.
  This is needed for correct INT8, not only for speed: with ``onnx_format`` the export puts a quantize/dequantize
  pair on every quantised conv's output. Unfolded, that pair sits on the raw conv output before BN, whose channels
  differ in magnitude by up to 1000x in PP-OCRv4 rec; a per-tensor 8-bit grid erases the small channels and BN
  scales the error back up (PP-OCRv4 rec through ONNX Runtime: 0 of 64 text lines equal to float unfolded,
  ~45% folded, before any training). A BN left after a quantised conv also trips paddle2onnx 1.3.1, which merges
  it into the conv across the output pair and keeps the pre-BN scale (PP-OCRv4 det: DBHead's ``BatchNorm`` with
  ``act='relu'`` took ONNX Runtime's hmean to 0 until it was folded too, its ReLU kept as a layer).
* :func:`prepare_qat` copies the float model (which is never changed), folds the copy and wraps the chosen layer
  types with PaddleSlim's fake-quant layers. The output-scale observers PaddleSlim adds are replaced by output
  fake-quant layers, so that training sees the same output rounding the exported model applies.
* :func:`calibrate_observers` starts the activation scales from real data. Paddle initialises each moving-average
  observer with ``state = accum = 1``, which weighs a fictitious abs-max of 1.0 like a real batch: after a
  handful of steps the scales of small activations are still several times too large (PP-OCRv4 rec: 0 of 64
  lines equal to float after two calibration batches without the reset, ~60% with it).
* :func:`export_qat_model` writes the Paddle inference model with QDQ ops (int8 weights, scales inside), which
  Paddle Inference runs with oneDNN INT8, TensorRT reads with ``use_calib_mode=False`` and paddle2onnx converts.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import copy
import dataclasses
import logging
import os

import numpy as np

from compress.errors import CompressError

logger = logging.getLogger(__name__)

ACTIVATION_QUANTIZE_TYPE = "moving_average_abs_max"


@dataclasses.dataclass
class FoldCounts:
    """What :func:`fold_conv_affine` merged into convolutions.

    Attributes:
        batch_norms: batch norm layers folded.
        affines: scalar affine layers folded.
        max_abs_diff: largest output difference between the model before and after folding (example input).
    """

    batch_norms: int
    affines: int
    max_abs_diff: float


def _is_foldable_bn(layer):
    """A channels-first batch norm with no activation, or with the ReLU the older ``paddle.nn.BatchNorm`` can apply
    itself (``act='relu'``, e.g. PP-OCR's DBHead)."""
    import paddle

    if isinstance(layer, paddle.nn.BatchNorm2D):
        return layer._data_format == "NCHW"
    return isinstance(layer, paddle.nn.BatchNorm) and layer._data_layout == "NCHW" and layer._act in (None, "relu")


def _is_scalar_affine(layer):
    """A leaf layer whose only parameters are 1-element ``scale`` and ``bias`` (``x * scale + bias``)."""
    params = dict(layer.named_parameters(include_sublayers=False))
    return (not layer.sublayers() and set(params) == {"scale", "bias"}
            and all(int(np.prod(p.shape)) == 1 for p in params.values()))


def _producers(model, example):
    """Run ``model`` once; return layer name -> name of the Conv2D / BN / affine layer whose output tensor object
    is that layer's input (None when another kind of layer or op produced it)."""
    import paddle

    outputs, inputs, hooks = {}, {}, []
    kept = []  # holds every tensor so that no id() is reused during the pass
    for name, layer in model.named_sublayers():
        if isinstance(layer, paddle.nn.Conv2D) or _is_foldable_bn(layer) or _is_scalar_affine(layer):
            def post(layer_, args, out, name=name):
                outputs[id(out)] = name
                kept.append(out)

            def pre(layer_, args, name=name):
                inputs[name] = id(args[0])
                kept.append(args[0])

            hooks += [layer.register_forward_post_hook(post), layer.register_forward_pre_hook(pre)]
    try:
        with paddle.no_grad():
            model(paddle.to_tensor(example))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: outputs.get(source) for name, source in inputs.items()}


def fold_conv_affine(model, example):
    """Fold batch norm and scalar affine layers into the Conv2D whose output they consume, in place.

    Pairs are found from the data flow of one forward pass on ``example`` (a layer's input tensor is the conv's
    output tensor), not from layer order, so convs without BN, transposed convs and branches are left alone. A
    folded layer is replaced by an identity (a ``BatchNorm(act='relu')`` by a ReLU). The model is put in eval
    mode: BN folds with its running statistics.

    Args:
        model: dygraph ``paddle.nn.Layer`` (changed in place; pass a copy to keep the original).
        example: a numpy input batch.

    Returns:
        FoldCounts.

    Raises:
        CompressError: when the folded model's output differs from the original's (a fold the data flow did not
            justify).
    """
    import paddle

    model.eval()
    reference = _first_output(model, example)
    layers = dict(model.named_sublayers())
    source = _producers(model, example)
    owner = {}  # BN name -> the conv it is folded into (an affine after a BN goes into the same conv)
    batch_norms = affines = 0
    with paddle.no_grad():
        # batch norms first, so that an affine after a folded BN finds the conv it went into
        for name, layer in sorted(layers.items(), key=lambda item: not _is_foldable_bn(item[1])):
            producer = source.get(name)
            if producer is None:
                continue
            if _is_foldable_bn(layer) and isinstance(layers[producer], paddle.nn.Conv2D):
                channels = layer._mean.shape[0]
                weight = layer.weight.numpy() if layer.weight is not None else np.ones([channels], "float32")
                bias = layer.bias.numpy() if layer.bias is not None else np.zeros([channels], "float32")
                gamma = weight / np.sqrt(layer._variance.numpy() + layer._epsilon)
                shift = bias - layer._mean.numpy() * gamma
                _scale_conv(layers[producer], gamma, shift)
                if getattr(layer, "_act", None) == "relu":
                    _replace(model, name, paddle.nn.ReLU())
                else:
                    owner[name] = producer  # an affine right after it still acts on the conv's output
                    _replace(model, name, paddle.nn.Identity())
                batch_norms += 1
            elif _is_scalar_affine(layer) and (producer in owner or isinstance(layers[producer], paddle.nn.Conv2D)):
                conv = layers[owner.get(producer, producer)]
                scale, bias = float(layer.scale.numpy().reshape(-1)[0]), float(layer.bias.numpy().reshape(-1)[0])
                channels = conv.weight.shape[0]
                _scale_conv(conv, np.full([channels], scale, "float32"), np.full([channels], bias, "float32"))
                _replace(model, name, paddle.nn.Identity())
                affines += 1
    diff = float(np.abs(_first_output(model, example) - reference).max())
    tolerance = 1e-3 * max(float(np.abs(reference).max()), 1.0)
    if diff > tolerance:
        raise CompressError(f"folding BN/affine layers into convs changed the model output by {diff:.3g}; "
                            f"set Quant.qat.fold: false")
    logger.info("QAT: folded %d batch norm and %d affine layers into convs (max |diff| %.2g)", batch_norms,
                affines, diff)
    return FoldCounts(batch_norms, affines, diff)


def _scale_conv(conv, scale, shift):
    """``conv(x) * scale + shift`` per output channel, written into the conv's weight and bias."""
    import paddle

    weight = conv.weight.numpy()
    conv.weight.set_value((weight * scale.reshape([-1] + [1] * (weight.ndim - 1))).astype(weight.dtype))
    if conv.bias is None:
        conv.bias = conv.create_parameter([weight.shape[0]], is_bias=True,
                                          default_initializer=paddle.nn.initializer.Constant(0.0))
    conv.bias.set_value((conv.bias.numpy() * scale + shift).astype(weight.dtype))


def _replace(model, name, new_layer):
    parent = model
    *path, last = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, new_layer)


def _first_output(model, example):
    from compress.tasks import dygraph_predictor
    return dygraph_predictor(model)(example)


@dataclasses.dataclass
class QatModel:
    """A fake-quant copy of a float model and the PaddleSlim object that exports it.

    Attributes:
        model: the fake-quant dygraph model (train it, then export it).
        quanter: the ``paddleslim.QAT`` instance that wrapped it.
        folded: FoldCounts, or None when folding was off.
        quantized_layers: number of layers wrapped with fake-quant.
    """

    model: object
    quanter: object
    folded: "FoldCounts | None"
    quantized_layers: int


def prepare_qat(model, example, *, layer_types=("Conv2D",), weight_quantize_type="channel_wise_abs_max",
                moving_rate=0.9, pact=False, fold=True):
    """A fake-quant copy of ``model`` ready for training; ``model`` itself is not changed.

    Args:
        model: the float dygraph model.
        example: a numpy input batch (finds conv -> BN / affine pairs, checks the fold).
        layer_types: layer classes to quantise (``Conv2D``, ``Linear``).
        weight_quantize_type: ``channel_wise_abs_max`` or ``abs_max``.
        moving_rate: decay of the activation scales' moving average.
        pact: learn a clipping threshold for each quantised layer's input (PACT).
        fold: fold BN and scalar affine layers into convs first (see :func:`fold_conv_affine`).

    Returns:
        QatModel.
    """
    from paddle.nn.quant import quant_layers
    from paddleslim import QAT

    student = copy.deepcopy(model)
    folded = fold_conv_affine(student, example) if fold else None
    quanter = QAT({"weight_quantize_type": weight_quantize_type,
                   "activation_quantize_type": ACTIVATION_QUANTIZE_TYPE, "moving_rate": float(moving_rate),
                   "quantizable_layer_type": list(layer_types), "onnx_format": True,
                   "activation_preprocess_type": "PACT" if pact else None})
    student = quanter.quantize(student)
    count = 0
    for name, layer in list(student.named_sublayers()):
        if isinstance(layer, quant_layers.MAOutputScaleLayer):
            _replace(student, name, quant_layers.FakeQuantMAOutputScaleLayer(layer._layer, moving_rate=moving_rate))
            count += 1
    student.eval()
    return QatModel(student, quanter, folded, count)


def _observers(model):
    from paddle.nn.quant import quant_layers
    return [layer for layer in model.sublayers()
            if isinstance(layer, (quant_layers.FakeQuantMovingAverageAbsMax, quant_layers.MovingAverageAbsMaxScale))]


def calibrate_observers(model, batches):
    """Reset the activation-scale observers and fill them from ``batches`` (numpy inputs).

    Only the observers run in training mode; BN statistics, dropout and the weights are untouched.

    Returns:
        the number of batches used.
    """
    import paddle

    observers = _observers(model)
    model.eval()
    for observer in observers:
        observer._state.set_value(np.zeros([1], "float32"))
        observer._accum.set_value(np.zeros([1], "float32"))
        observer.train()
    used = 0
    try:
        with paddle.no_grad():
            for batch in batches:
                model(paddle.to_tensor(batch))
                used += 1
    finally:
        model.eval()
    if not used:
        raise CompressError("QAT: no calibration batches to start the activation scales from; add samples to "
                            "the Calibration split")
    return used


def export_qat_model(qat, out_dir, input_spec):
    """Write the trained fake-quant model as a Paddle inference model with QDQ ops into ``out_dir``.

    PACT clipping layers are dropped first: the activation observers run after them, so every exported scale is
    already within the learned clip and quantizing clips exactly as PACT did. (PaddleSlim's own removal re-wraps
    a copy of the float model and reloads the state dict, which loses the output fake-quant layers
    :func:`prepare_qat` put in, and leaves Paddle in static mode.)

    Args:
        qat: QatModel; its model loses its PACT layers and is converted to static (``paddle.jit.to_static``):
            run it before exporting, not after.
        out_dir: folder for ``inference.pdmodel`` / ``inference.pdiparams``.
        input_spec: list of ``paddle.static.InputSpec``.

    Returns:
        ModelFiles of the written model.
    """
    from export.predictor import find_model_files

    os.makedirs(out_dir, exist_ok=True)
    for layer in qat.model.sublayers():
        if getattr(layer, "_act_preprocess", None) is not None:
            layer._act_preprocess = None
    qat.model.eval()
    qat.quanter.imperative_qat.save_quantized_model(qat.model, os.path.join(out_dir, "inference"),
                                                    input_spec=input_spec)
    return find_model_files(out_dir)
