"""Built-in example models, written with onnx.helper (random weights, no downloads)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """A small helper to write CNN-style ONNX graphs by hand."""

    def __init__(self, seed: int = 0, opset: int = 17):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, array: np.ndarray, prefix: str = "w") -> str:
        n = self.name(prefix)
        array = np.asarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.inits.append(numpy_helper.from_array(array, n))
        return n

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self.name(op_type.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = False) -> str:
        fan_in = cin // group * k * k
        w = self.const(self.rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) * np.sqrt(2 / fan_in))
        ins = [x, w] + ([self.const(self.rng.standard_normal(cout).astype(np.float32) * 0.1, "b")] if bias else [])
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            (r.uniform(0.5, 1.5, c)).astype(np.float32),
            (r.standard_normal(c) * 0.1).astype(np.float32),
            (r.standard_normal(c) * 0.1).astype(np.float32),
            (r.uniform(0.5, 1.5, c)).astype(np.float32),
        ]
        return self.op("BatchNormalization", [x] + [self.const(p, "bn") for p in params], epsilon=1e-5)

    def conv_bn(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, relu: bool = True) -> str:
        y = self.bn(self.conv(x, cin, cout, k, stride, group), cout)
        return self.op("Relu", [y]) if relu else y

    def gemm(self, x: str, cin: int, cout: int) -> str:
        w = self.const(self.rng.standard_normal((cout, cin)).astype(np.float32) / np.sqrt(cin))
        b = self.const(np.zeros(cout, np.float32), "b")
        return self.op("Gemm", [x, w, b], transB=1)

    def model(self, inputs: list[tuple[str, list]], outputs: list[tuple[str, list]], name: str = "model") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="spa.zoo")
        m.ir_version = 8
        return m


def _bottleneck(b: GraphBuilder, x: str, cin: int, width: int, stride: int) -> str:
    cout = width * 4
    y = b.conv_bn(x, cin, width, 1)
    y = b.conv_bn(y, width, width, 3, stride)
    y = b.conv_bn(y, width, cout, 1, relu=False)
    if stride != 1 or cin != cout:
        x = b.conv_bn(x, cin, cout, 1, stride, relu=False)
    return b.op("Relu", [b.op("Add", [y, x])])


def _basic(b: GraphBuilder, x: str, cin: int, cout: int, stride: int) -> str:
    y = b.conv_bn(x, cin, cout, 3, stride)
    y = b.conv_bn(y, cout, cout, 3, 1, relu=False)
    if stride != 1 or cin != cout:
        x = b.conv_bn(x, cin, cout, 1, stride, relu=False)
    return b.op("Relu", [b.op("Add", [y, x])])


def resnet(depths=(2, 2, 2, 2), widths=(64, 128, 256, 512), bottleneck: bool = False, image: int = 224,
           classes: int = 1000, batch: int | str = "batch", seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A ResNet-style classifier (ResNet-18 by default; ResNet-50 with bottleneck=True, depths 3,4,6,3);
    every op it uses exists from opset 9 on."""
    b = GraphBuilder(seed, opset)
    x = b.conv_bn("input", 3, 64, 7, 2)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (depth, width) in enumerate(zip(depths, widths)):
        for i in range(depth):
            stride = 2 if (i == 0 and stage > 0) else 1
            if bottleneck:
                x = _bottleneck(b, x, cin, width, stride)
                cin = width * 4
            else:
                x = _basic(b, x, cin, width, stride)
                cin = width
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    b.gemm(x, cin, classes)
    b.nodes[-1].output[0] = "logits"
    return b.model([("input", [batch, 3, image, image])], [("logits", [batch, classes])], "resnet")


def resnet50(image: int = 224, batch: int | str = 1, seed: int = 0) -> onnx.ModelProto:
    return resnet((3, 4, 6, 3), (64, 128, 256, 512), bottleneck=True, image=image, batch=batch, seed=seed)


def small_resnet(seed: int = 0) -> onnx.ModelProto:
    """The built-in demo model: a ResNet-style CNN for 64x64 images, 10 classes."""
    return resnet((1, 1, 1), (32, 64, 128), image=64, classes=10, seed=seed)


def mlp(sizes=(64, 128, 64, 10), seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder(seed)
    x = "input"
    for i, (a, c) in enumerate(zip(sizes, sizes[1:])):
        x = b.gemm(x, a, c)
        if i < len(sizes) - 2:
            x = b.op("Relu", [x])
    b.nodes[-1].output[0] = "logits"
    return b.model([("input", ["batch", sizes[0]])], [("logits", ["batch", sizes[-1]])], "mlp")
