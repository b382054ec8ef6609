#!/usr/bin/env python3
"""Build the KB-sized ONNX models in tests/fixtures/ with the onnx helper API (no torch).

Run: python3 scripts/make_fixtures.py [OUT_DIR]   (needs `onnx` and `numpy`; see scripts/setup.sh)
The generated files are committed, so the tests need no Python. Weights come from a fixed seed,
so rerunning gives the same graphs.
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]
rng = np.random.default_rng(20261127)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def save(model, out, name):
    onnx.checker.check_model(model, full_check=True)
    path = os.path.join(out, name)
    onnx.save(model, path)
    print(f"{path}: {os.path.getsize(path)} bytes")


def mlp(out):
    """input float32[batch,4] -> Gemm(4x16) -> Relu -> Gemm(16x3) -> logits float32[batch,3]."""
    w1 = rng.normal(0, 0.5, (4, 16)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (16,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (16, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (3,)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TP.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TP.FLOAT, ["batch", 3])],
        [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)],
    )
    save(helper.make_model(g, opset_imports=OPSET), out, "mlp.onnx")


def cnn(out):
    """input float32[batch,3,64,64] -> Conv 3x3 s2 (8) -> Relu -> Conv 3x3 s2 (16) -> Relu
    -> GlobalAveragePool -> Flatten -> Gemm(16x10) -> logits float32[batch,10]."""
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (8,)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (16,)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (16, 10)).astype(np.float32)
    b3 = rng.normal(0, 0.1, (10,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("input", TP.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TP.FLOAT, ["batch", 10])],
        [init(n, a) for n, a in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3)]],
    )
    save(helper.make_model(g, opset_imports=OPSET), out, "cnn.onnx")


def cnn_wide(out):
    """input float32[batch,3,64,64] -> four Conv 3x3 + Relu layers (16 ch; 32 ch s2; 32 ch;
    64 ch s2) -> GlobalAveragePool -> Flatten -> Gemm(64x10) -> logits float32[batch,10].

    The same input as `cnn` with about 20 M multiply-adds per row instead of 0.4 M: a model whose
    run costs far more than moving its 48 KiB input over HTTP, for the compute-bound benchmark
    lines (`ortserve-bench`). No test uses it."""
    layers = [(3, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2)]
    nodes, inits, prev = [], [], "input"
    for k, (cin, cout, stride) in enumerate(layers):
        w = rng.normal(0, (2.0 / (cin * 9)) ** 0.5, (cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.05, (cout,)).astype(np.float32)
        inits += [init(f"w{k}", w), init(f"b{k}", b)]
        nodes.append(helper.make_node("Conv", [prev, f"w{k}", f"b{k}"], [f"c{k}"],
                                      strides=[stride, stride], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [f"r{k}"]))
        prev = f"r{k}"
    wf = rng.normal(0, 0.2, (64, 10)).astype(np.float32)
    bf = rng.normal(0, 0.1, (10,)).astype(np.float32)
    inits += [init("wf", wf), init("bf", bf)]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes, "cnn_wide",
        [helper.make_tensor_value_info("input", TP.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TP.FLOAT, ["batch", 10])],
        inits,
    )
    save(helper.make_model(g, opset_imports=OPSET), out, "cnn_wide.onnx")


def two_input(out):
    """a float32[batch,4], b float32[batch,4] -> sum = a + b, prod = a * b (both float32[batch,4])."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Mul", ["a", "b"], ["prod"]),
    ]
    g = helper.make_graph(
        nodes, "two_input",
        [helper.make_tensor_value_info("a", TP.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("b", TP.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("sum", TP.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("prod", TP.FLOAT, ["batch", 4])],
    )
    save(helper.make_model(g, opset_imports=OPSET), out, "two_input.onnx")


def int64_gather(out):
    """idx int64[batch,2] -> values = table[idx] float32[batch,2], next = idx + 1 int64[batch,2].

    table has 16 entries: an index outside [-16, 16) makes ONNX Runtime fail the run, which gives
    the tests a real model failure (HTTP 500) driven by input values."""
    table = (np.arange(16, dtype=np.float32) * 0.5 - 3.0)
    nodes = [
        helper.make_node("Gather", ["table", "idx"], ["values"], axis=0),
        helper.make_node("Add", ["idx", "one"], ["next"]),
    ]
    g = helper.make_graph(
        nodes, "int64_gather",
        [helper.make_tensor_value_info("idx", TP.INT64, ["batch", 2])],
        [helper.make_tensor_value_info("values", TP.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("next", TP.INT64, ["batch", 2])],
        [init("table", table), init("one", np.array(1, dtype=np.int64))],
    )
    save(helper.make_model(g, opset_imports=OPSET), out, "int64_gather.onnx")


def fixed_batch(out):
    """input float32[2,4] (batch dim fixed at 2) -> output = input * 3 float32[2,4]."""
    nodes = [helper.make_node("Mul", ["input", "three"], ["output"])]
    g = helper.make_graph(
        nodes, "fixed_batch",
        [helper.make_tensor_value_info("input", TP.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("output", TP.FLOAT, [2, 4])],
        [init("three", np.array(3.0, dtype=np.float32))],
    )
    save(helper.make_model(g, opset_imports=OPSET), out, "fixed_batch.onnx")


def matmul_chain(out):
    """x float32[batch,128,128] -> y float32[batch,128,128]; no weights (a few hundred bytes).

    y = chain(x) + chain(mean of x over the batch), where chain(a) = tanh(...tanh(a @ a) @ a...)
    with 8 products. The first term costs the same per row, the second the same per run, so a
    run of b rows takes about (b + 1) units: batching gains throughput (2 rows: +33%), and
    batch 2 takes 1.5 times as long as batch 1. The tuning tests rely on both."""
    nodes = [helper.make_node("ReduceMean", ["x", "axis0"], ["mean"], keepdims=1)]
    for src in ("x", "mean"):
        prev = src
        for k in range(8):
            nodes.append(helper.make_node("MatMul", [prev, src], [f"{src}_m{k}"]))
            nodes.append(helper.make_node("Tanh", [f"{src}_m{k}"], [f"{src}_t{k}"]))
            prev = f"{src}_t{k}"
    nodes.append(helper.make_node("Add", ["x_t7", "mean_t7"], ["y"]))
    g = helper.make_graph(
        nodes, "matmul_chain",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", 128, 128])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["batch", 128, 128])],
        [init("axis0", np.array([0], dtype=np.int64))],
    )
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), out, "matmul_chain.onnx")


DTYPES = [
    ("fp32", TP.FLOAT), ("fp64", TP.DOUBLE), ("fp16", TP.FLOAT16),
    ("int8", TP.INT8), ("int16", TP.INT16), ("int32", TP.INT32), ("int64", TP.INT64),
    ("uint8", TP.UINT8), ("uint16", TP.UINT16), ("uint32", TP.UINT32), ("uint64", TP.UINT64),
    ("bool", TP.BOOL),
]


def dtypes(out):
    """One input per V2 datatype, x_<t> [batch,3] -> y_<t> = Identity(x_<t>), same type and shape.

    Exercises the encode/decode path of every datatype through a real session."""
    nodes, inputs, outputs = [], [], []
    for name, t in DTYPES:
        nodes.append(helper.make_node("Identity", [f"x_{name}"], [f"y_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"x_{name}", t, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", t, ["batch", 3]))
    g = helper.make_graph(nodes, "dtypes", inputs, outputs)
    save(helper.make_model(g, opset_imports=OPSET), out, "dtypes.onnx")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    os.makedirs(out, exist_ok=True)
    for build in (mlp, cnn, two_input, int64_gather, fixed_batch, dtypes, matmul_chain, cnn_wide):
        build(out)


if __name__ == "__main__":
    main()
