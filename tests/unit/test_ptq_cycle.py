"""Paddle 2.6 PTQ's "Generated graph shouldn't contain cycle" on programs that write a variable twice.

The tiny model below ends like our folded PP-OCRv4 exports, with an in-place ``scale(X=out) -> Out=out`` before the
fetch, and also rewrites two variables written earlier. ``AddQuantDequantForInferencePass`` keys its work by
variable name and follows the (address-dependent) order of ``IrGraph.all_op_nodes()``; the tests force that order
instead of waiting for an unlucky one (see ``ptq.make_single_assignment``).
"""
import os

import numpy as np
import pytest

from compress.quant import ptq
from export.predictor import DeployConfig, create_predictor, find_model_files


def _write_program(path, program):
    with open(path, "wb") as handle:
        handle.write(program.desc.serialize_to_string())


def _read_program(path):
    import paddle

    with ptq.static_mode(), open(path, "rb") as handle:
        return paddle.static.Program.parse_from_string(handle.read())


@pytest.fixture(scope="module")
def rewriting_model_dir(tmp_path_factory):
    """conv -> relu -> scale -> o, then scale(o) -> c (rewrites c), scale(c) -> o and scale(o) -> o (in place)."""
    import paddle

    folder = tmp_path_factory.mktemp("rewriting")
    paddle.seed(0)
    with ptq.static_mode():
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            x = paddle.static.data("x", [-1, 3, 8, 8], "float32")
            conv = paddle.static.nn.conv2d(x, 4, 3, padding=1)
            out = paddle.scale(paddle.nn.functional.relu(conv), 2.0, bias=0.5)
        exe = paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(paddle.static.Scope()):
            exe.run(startup)
            paddle.static.save_inference_model(str(folder / "inference"), [x], [out], exe, program=main)
        program = _read_program(str(folder / "inference.pdmodel"))
        block = program.global_block()
        fetch = next(index for index, op in enumerate(block.ops) if op.type == "fetch")
        fetched = block.ops[fetch].input("X")[0]
        conv_out = next(op for op in block.ops if op.type == "conv2d").output("Output")[0]
        for offset, (src, dst, scale) in enumerate([(fetched, conv_out, 1.5), (conv_out, fetched, -0.5),
                                                    (fetched, fetched, 3.0)]):
            block._insert_op(fetch + offset, type="scale", inputs={"X": [src]}, outputs={"Out": [dst]},
                             attrs={"scale": scale, "bias": 0.25, "bias_after_scale": True})
        _write_program(str(folder / "inference.pdmodel"), program)
    return str(folder)


def _writers(program):
    persistable = {var.name for var in program.list_vars() if var.persistable}
    counts = {}
    for op in program.global_block().ops:
        if op.type != "fetch":
            for name in op.output_arg_names:
                if name not in persistable:
                    counts[name] = counts.get(name, 0) + 1
    return counts


def _fetch_names(program):
    return [op.input("X")[0] for op in program.global_block().ops if op.type == "fetch"]


def _run(model_dir, x):
    return create_predictor(model_dir, DeployConfig(mkldnn=False)).run({"x": x})[0]


@pytest.fixture
def reverse_op_order(monkeypatch):
    """Make ``IrGraph.all_op_nodes()`` list ops last-created first: the order in which PTQ's pass builds a cycle."""
    from paddle.base.framework import IrGraph

    original = IrGraph.all_op_nodes
    monkeypatch.setattr(IrGraph, "all_op_nodes", lambda graph: sorted(original(graph), key=lambda n: -n.id()))


def test_model_writes_variables_more_than_once(rewriting_model_dir):
    writers = _writers(_read_program(os.path.join(rewriting_model_dir, "inference.pdmodel")))
    assert sorted(count for count in writers.values() if count > 1) == [2, 3]


def test_single_assignment_gives_unique_writers_and_identical_outputs(rewriting_model_dir, tmp_path):
    files = find_model_files(rewriting_model_dir)
    original = _read_program(files.model_file)
    folder, model_name, params_name = ptq._single_assignment_model(files, str(tmp_path / "ssa"))
    assert folder == str(tmp_path / "ssa") and (model_name, params_name) == ("inference.pdmodel", "inference.pdiparams")
    rewritten = _read_program(os.path.join(folder, model_name))
    assert set(_writers(rewritten).values()) == {1}
    assert _fetch_names(rewritten) == _fetch_names(original)  # the model's output keeps its name
    assert len(rewritten.global_block().ops) == len(original.global_block().ops)
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(folder, x), _run(rewriting_model_dir, x))
    with ptq.static_mode():
        assert ptq.make_single_assignment(rewritten) == []  # idempotent


def test_single_assignment_leaves_a_clean_model_where_it_is(rewriting_model_dir, tmp_path):
    files = find_model_files(rewriting_model_dir)
    folder, _, _ = ptq._single_assignment_model(files, str(tmp_path / "ssa"))
    again = ptq._single_assignment_model(find_model_files(folder), str(tmp_path / "ssa2"))
    assert again == (folder, "inference.pdmodel", "inference.pdiparams")
    assert not os.path.exists(tmp_path / "ssa2")


def _batches(count=2):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def test_paddle_ptq_without_the_rewrite_builds_a_cycle(rewriting_model_dir, tmp_path, reverse_op_order):
    """The cause, shown deterministically: Paddle's own PTQ on the original program, with the unlucky op order."""
    import paddle
    from paddleslim.quant import quant_post_static

    batches = _batches()
    with ptq.static_mode(), paddle.static.scope_guard(paddle.static.Scope()):
        with pytest.raises(ValueError, match="Generated graph shouldn't contain cycle"):
            quant_post_static(paddle.static.Executor(paddle.CPUPlace()), rewriting_model_dir, str(tmp_path / "q"),
                              data_loader=ptq.calibration_loader(batches, ["x"]),
                              model_filename="inference.pdmodel", params_filename="inference.pdiparams",
                              batch_nums=len(batches), algo="abs_max", quantizable_op_type=["conv2d"],
                              onnx_format=True)


@pytest.mark.parametrize("order", ["reverse", "address"])
def test_ptq_succeeds_whatever_the_op_order(rewriting_model_dir, tmp_path, request, order):
    if order == "reverse":
        request.getfixturevalue("reverse_op_order")
    result = ptq.quantize_post_static(rewriting_model_dir, str(tmp_path / "int8"), _batches(), isolated=False,
                                      algo="abs_max", quantizable_op_type=("conv2d",))
    program = _read_program(os.path.join(result.model_dir, "inference.pdmodel"))
    assert "quantize_linear" in {op.type for op in program.global_block().ops}
    x = _batches(1)[0]["x"]
    reference, quantized = _run(rewriting_model_dir, x), _run(result.model_dir, x)
    assert np.abs(quantized - reference).mean() < 0.05 * np.abs(reference).mean()
