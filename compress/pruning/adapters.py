"""Make PP-OCR layers traceable by PaddleSlim's channel-dependency analysis (the only place that does it).

PaddleSlim 2.6 finds which tensors must shrink together by converting the dygraph model into a static program
(``paddleslim.core.dygraph2program``) and walking it with the operator "workers" of
``paddleslim.prune.prune_worker``. Three things in PP-OCRv4 stop that walk; :func:`traceable` fixes them for the
duration of a ``with`` block and restores everything on exit:

* ``LearnableAffineBlock`` (PPLCNetV3, PPHGNetV2) computes ``self.scale * x + self.bias`` with a 1-element
  ``scale``. With the scalar first, ``prune_worker.elementwise_op`` asserts that ``Y`` (the feature map) has
  fewer dimensions than ``X`` and raises ``AssertionError``. The patched forward computes
  ``x * self.scale + self.bias``: float multiplication is commutative, so outputs are bit-identical.
* ``LearnableRepLayer`` before re-parameterisation sums its branches with ``out = 0; out += branch(x)``; the
  patched forward starts from the first branch instead of the integer ``0`` (``0 + a == a`` exactly).
* ``paddle.concat`` has no worker in PaddleSlim 2.6 (every conv feeding a concat is dropped as "unsupported
  operator"), and ``Tensor.clone`` (``assign``, used by the SVTR neck's ``use_guide``) is not a known
  shape-preserving op. A ``concat`` worker is registered for the block and ``assign`` is added to PaddleSlim's
  list of shape-preserving operators.

What this gives on the PP-OCRv4 deploy structure (``LearnableRepLayer.rep()`` done), as traced by
``compress.pruning.trace`` (det: 48 pruning groups, rec: 23):

Prunable masters (a conv whose output channels can be removed, with every dependent tensor):
  * PPLCNetV3 point-wise convs ``blocks*.pw_conv.reparam_conv``: the next depth-wise conv, its SE convs and the
    next point-wise conv (input axis) follow; det ``layer_list.*``; SE squeeze convs ``se.conv1``.
  * det RSEFPN: ``ins_conv.3.in_conv`` (its group holds all four ``ins_conv.*.in_conv`` through the top-down
    residual sums ``in4 + upsample(in5)`` and the ``x + se(x)`` shortcuts), ``inp_conv.*.in_conv`` (through the
    concat into the DB head, whose first conv loses the matching input slice), ``*.se_block.conv1``.
  * rec SVTR neck ``conv1``, ``conv3`` and ``conv4`` (through the ``concat((h, z))``), ``conv1x1`` (the CTC
    ``head.fc`` Linear loses the matching input rows); the backbone's last point-wise conv reaches ``conv1`` and
    ``conv4`` through the ``use_guide`` clone.

Skipped, and why:
  * Depth-wise convs (``dw_conv``): never a master; they follow the channels of their input.
  * SE expand convs (``se.conv2``, ``se_block.conv2``) and residual partners (``ins_conv.0..2.in_conv``): their
    output is multiplied with / added to another conv's output, so they share that conv's group and mask
    (``prunable_layers`` leaves them out, ``make_plan`` reports them as "coupled").
  * The first conv (``backbone.conv1``): cheap and feeds everything (always left out by ``prunable_layers``).
  * Output heads (``head.*``, default skip pattern): their outputs are the model's outputs (DB probability map,
    CTC classes), which PaddleSlim refuses to prune; the DB head's first conv could be pruned but is kept.
    Heads still lose *input* channels when the layer before them is pruned.
  * ``Conv2DTranspose`` (DB head): PaddleSlim never prunes its output channels, only its input side.
  * SVTR ``conv2`` and everything between it and ``conv3`` (attention and MLP Linear layers, LayerNorm):
    ``layer_norm`` has no PaddleSlim worker, so the tracer reports the group as unsupported and leaves it intact.
  * Re-parameterisation leftovers (``conv_kxk``, ``conv_1x1``, ``identity`` of a repped ``LearnableRepLayer``,
    if still present) are not in the traced forward and are never touched.
  * Grouped (not depth-wise) convs: refused (none in PP-OCRv4).
"""
import contextlib
import importlib
import sys

from paddleslim.prune import prune_worker

_LAB_MODULES = ("ppocr.modeling.backbones.rec_lcnetv3", "ppocr.modeling.backbones.rec_pphgnetv2")
_REP_MODULE = "ppocr.modeling.backbones.rec_lcnetv3"
_SHAPE_PRESERVING_OPS = ("assign",)


def _affine_forward_scalar_last(self, x):
    return x * self.scale + self.bias


def _rep_layer_forward_without_int_zero(self, x):
    if self.is_repped:
        out = self.lab(self.reparam_conv(x))
        if self.stride != 2:
            out = self.act(out)
        return out
    branches = []
    if self.identity is not None:
        branches.append(self.identity(x))
    if self.conv_1x1 is not None:
        branches.append(self.conv_1x1(x))
    branches.extend(conv(x) for conv in self.conv_kxk)
    out = branches[0]
    for branch in branches[1:]:
        out = out + branch
    out = self.lab(out)
    if self.stride != 2:
        out = self.act(out)
    return out


class concat(prune_worker.PruneWorker):  # noqa: N801 (PaddleSlim looks workers up by op type == class name)
    """PaddleSlim worker for ``concat``: maps a mask on one input into its slice of the output and back."""

    def _prune(self, var, pruned_axis, transforms):
        inputs = self.op.inputs("X")
        out_var = self.op.outputs("Out")[0]
        concat_axis = self.op.attr("axis")
        if concat_axis is None or self.op.inputs("AxisTensor"):
            raise prune_worker.UnsupportOpError("concat with a tensor axis is not supported")
        if concat_axis < 0:
            concat_axis += len(out_var.shape())
        if pruned_axis != concat_axis:
            for other in inputs + [out_var]:
                if other != var:
                    self._visit_and_search(other, pruned_axis, transforms)
            return
        total = out_var.shape()[concat_axis]
        start = 0
        for in_var in inputs:
            length = in_var.shape()[concat_axis]
            if var == in_var:
                into_output = {"src_start": 0, "src_end": length, "target_start": start,
                               "target_end": start + length, "target_len": total}
                self._visit_and_search(out_var, pruned_axis, transforms + [into_output])
                return
            if var == out_var:
                into_input = {"src_start": start, "src_end": start + length, "target_start": 0,
                              "target_end": length, "target_len": length}
                self._visit_and_search(in_var, pruned_axis, transforms + [into_input])
            start += length


def _loaded_module(name):
    """Return ``name`` if it is importable (PP-OCR on ``sys.path``), else None; never fails for non-PP-OCR models."""
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _forward_patches():
    patches = []
    for module_name in _LAB_MODULES:
        module = _loaded_module(module_name)
        if module is not None and hasattr(module, "LearnableAffineBlock"):
            patches.append((module.LearnableAffineBlock, _affine_forward_scalar_last))
    module = _loaded_module(_REP_MODULE)
    if module is not None and hasattr(module, "LearnableRepLayer"):
        patches.append((module.LearnableRepLayer, _rep_layer_forward_without_int_zero))
    return patches


@contextlib.contextmanager
def traceable():
    """Context in which PP-OCR models can be traced by PaddleSlim's pruning dependency analysis.

    Patches are applied to the classes (not to one model) and are all undone on exit, also on error.
    Outputs computed inside the block are bit-identical to those computed outside it.
    """
    originals = [(cls, cls.forward) for cls, _ in _forward_patches()]
    registry = prune_worker.PRUNE_WORKER.module_dict
    added_worker = "concat" not in registry
    added_ops = [op for op in _SHAPE_PRESERVING_OPS if op not in prune_worker.OPS_UNCHANGE_SHAPE]
    try:
        for cls, forward in _forward_patches():
            cls.forward = forward
        if added_worker:
            registry["concat"] = concat
        prune_worker.OPS_UNCHANGE_SHAPE.extend(added_ops)
        yield
    finally:
        for cls, forward in originals:
            cls.forward = forward
        if added_worker:
            registry.pop("concat", None)
        for op in added_ops:
            prune_worker.OPS_UNCHANGE_SHAPE.remove(op)
