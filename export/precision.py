"""Reduced-precision policy: which parts of the fused STLM graph must stay fp32, and the fp16 conversion.

fp16 is fine for convolutions, matmuls and elementwise activations, but STLM's map is built from
quantities fp16 handles badly:

* LayerNorm (the fused op and the neck's decomposed ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div):
  means and variances of 256 channels;
* Softmax and every Reduce* op (sums over channels/pixels overflow or lose bits);
* ``l2n(x) = x / (sqrt(sum_c x^2) + 1e-12)`` and the cosine parts that follow it (1 - <a, b> of
  nearly parallel unit vectors is a difference of almost equal numbers; 1e-12 underflows in fp16);
* the log of the cosine distances that the FA head's TLM prior reads (``fa_input`` ``product+tlm`` or ``tlm``);
* Sigmoid, the final Resize, TopK and the top-k mean (the outputs and the score);
* the fused preprocessing ``(x - mean) / std`` (uint8 -> float; fp16 would lose the 1/255 steps of
  bright pixels after the mean shift only slightly, but it is cheap and keeps inputs exact).

The conversion itself is ``onnxconverter_common.float16.convert_float_to_float16`` with
``keep_io_types=True`` (graph inputs/outputs keep their dtypes), ``op_block_list`` (op types) and
``node_block_list`` (nodes found by matching the patterns above on the graph). Nothing is converted
by hand; we only give the converter an unambiguous graph (unique node names, initializers shared
between a blocked and a converted node duplicated) and report what stayed fp32.
"""
from __future__ import annotations

import collections
import copy
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import onnx

__all__ = ["FP32_OP_TYPES", "Fp16Result", "fp32_nodes", "convert_fp16", "name_nodes", "float_nodes"]

# Op types always kept fp32 (added to onnxconverter_common's DEFAULT_OP_BLOCK_LIST).
FP32_OP_TYPES: tuple[str, ...] = (
    "LayerNormalization", "Softmax", "Sigmoid", "TopK", "Resize", "Sqrt", "Pow", "Log",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp",
)
_HEAVY = {"Conv", "ConvTranspose", "MatMul", "Gemm"}  # where the fp16 speed-up lives
_PRE_OPS = {"Transpose", "Cast", "Sub", "Div", "Mul", "Add", "Reshape", "Unsqueeze"}
_COSINE_OPS = {"Mul", "Neg", "Sub", "Add", "Div", "Concat", "ReduceSum"}
_EPS_PATH = {"Add", "Sqrt", "Reciprocal"}


@dataclass
class Fp16Result:
    """The fp16 graph and what the policy kept fp32 (node names grouped by op type, with reasons)."""

    model: onnx.ModelProto
    kept_fp32: dict[str, list[str]]  # op type -> node names (nodes of the fp32 graph)
    reasons: dict[str, str] = field(default_factory=dict)  # node name -> why
    op_block_list: list[str] = field(default_factory=list)
    node_block_list: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.kept_fp32.values())

    def histogram(self) -> dict[str, int]:
        return {k: len(v) for k, v in sorted(self.kept_fp32.items(), key=lambda kv: (-len(kv[1]), kv[0]))}

    def summary(self) -> dict:
        return {"kept_fp32_count": self.count, "kept_fp32_by_op": self.histogram(),
                "kept_fp32_nodes": {k: list(v) for k, v in sorted(self.kept_fp32.items())}}


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique, non-empty name (the block list addresses nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def float_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of nodes with at least one fp32 output (real compute, not int64 shape arithmetic)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    fp32 = onnx.TensorProto.FLOAT
    return {n.name for n in model.graph.node if any(types.get(o) == fp32 for o in n.output)}


class _Graph:
    """Producer/consumer indexes of one graph (top level; STLM has no subgraphs)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.inputs = [i.name for i in model.graph.input]

    def next(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [c for o in node.output for c in self.consumers.get(o, [])]

    def descendants(self, seeds: Iterable[onnx.NodeProto]) -> set[str]:
        out: set[str] = set()
        stack = list(seeds)
        while stack:
            n = stack.pop()
            for c in self.next(n):
                if c.name not in out:
                    out.add(c.name)
                    stack.append(c)
        return out

    def closure(self, seeds: Iterable[onnx.NodeProto], ops: set[str]) -> set[str]:
        """Seeds plus every node reachable from them through ops in ``ops`` only."""
        out = {s.name for s in seeds}
        stack = list(seeds)
        while stack:
            n = stack.pop()
            for c in self.next(n):
                if c.op_type in ops and c.name not in out:
                    out.add(c.name)
                    stack.append(c)
        return out

    def reaches(self, ops: set[str]) -> set[str]:
        """Names of nodes from which a node of one of ``ops`` is reachable (excluding those nodes)."""
        memo: dict[str, bool] = {}
        order = self.nodes  # the graph is topologically sorted: walk it backwards
        for n in reversed(order):
            memo[n.name] = any(c.op_type in ops or memo.get(c.name, False) for c in self.next(n))
        return {k for k, v in memo.items() if v}


def _is_square(g: _Graph, name: str) -> str | None:
    """If tensor ``name`` is x*x or x**2, return x."""
    p = g.producer.get(name)
    if p is None:
        return None
    if p.op_type == "Mul" and len(p.input) == 2 and p.input[0] == p.input[1]:
        return p.input[0]
    if p.op_type == "Pow" and len(p.input) == 2:
        return p.input[0]
    return None


def fp32_nodes(model: onnx.ModelProto, op_types: Iterable[str] = FP32_OP_TYPES) -> dict[str, str]:
    """Node name -> reason for every node the policy keeps fp32 (op types and matched patterns).

    ``model`` must have unique node names (see :func:`name_nodes`).
    """
    g = _Graph(model)
    op_types = set(op_types)
    keep: dict[str, str] = {}

    def add(names: Iterable[str], reason: str) -> None:
        for n in names:
            keep.setdefault(n, reason)

    by_name = {n.name: n for n in g.nodes}
    add((n.name for n in g.nodes if n.op_type in op_types), "op type")
    # Casts to float must keep their declared output type (the converter does not rewrite 'to').
    add((n.name for n in g.nodes if n.op_type == "Cast"
         and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)), "cast to fp32")
    # Fused preprocessing: graph input -> Transpose/Cast/Sub/Div ... up to the first heavy op.
    for inp in g.inputs:
        first = [c for c in g.consumers.get(inp, []) if c.op_type in _PRE_OPS]
        add(g.closure(first, _PRE_OPS), "preprocessing")
    # Decomposed LayerNorm: mean = ReduceMean(x); d = x - mean; var = ReduceMean(d^2); d / sqrt(var + eps).
    for r in g.nodes:
        if r.op_type != "ReduceMean" or not r.input:
            continue
        x = r.input[0]
        for sub in g.consumers.get(r.output[0], []):
            if sub.op_type != "Sub" or list(sub.input) != [x, r.output[0]]:
                continue
            add([sub.name], "layernorm (decomposed)")
            for sq in g.consumers.get(sub.output[0], []):
                if _is_square(g, sq.output[0]) != sub.output[0]:
                    continue
                add([sq.name], "layernorm (decomposed)")
                for var in g.consumers.get(sq.output[0], []):
                    if var.op_type != "ReduceMean":
                        continue
                    path = g.closure([var], _EPS_PATH)
                    add(path, "layernorm (decomposed)")
                    for name in path:
                        for c in g.next(by_name[name]):
                            if c.op_type in ("Div", "Mul") and sub.output[0] in c.input:
                                add([c.name], "layernorm (decomposed)")
    # l2n: x / (sqrt(sum_c x*x) + eps), then the cosine parts that combine two normalised features.
    l2n_out: list[onnx.NodeProto] = []
    for rs in g.nodes:
        if rs.op_type not in ("ReduceSum", "ReduceSumSquare") or not rs.input:
            continue
        x = rs.input[0] if rs.op_type == "ReduceSumSquare" else _is_square(g, rs.input[0])
        if x is None:
            continue
        if rs.op_type == "ReduceSum":
            add([g.producer[rs.input[0]].name], "l2 norm")
        for name in g.closure([rs], _EPS_PATH):
            add([name], "l2 norm")
            for c in g.next(by_name[name]):
                if c.op_type == "Div" and c.input[0] == x:
                    add([c.name], "l2 norm")
                    l2n_out.append(c)
    cosine = g.closure(l2n_out, _COSINE_OPS)
    add(cosine, "cosine / feature product")
    # Postprocessing: everything after the last heavy op on the way to the outputs (final Resize, TopK, mean).
    feeds_heavy = g.reaches(_HEAVY)
    seeds = [n for n in g.nodes if n.op_type == "Sigmoid" or n.name in cosine]
    add((n for n in g.descendants(seeds) if n not in feeds_heavy and by_name[n].op_type not in _HEAVY),
        "postprocessing")
    return keep


def _split_shared_initializers(model: onnx.ModelProto, blocked: set[str]) -> None:
    """Give blocked nodes their own copy of initializers they share with converted nodes.

    The converter keeps an initializer fp32 if ANY blocked node reads it, which would leave the
    converted readers with an fp32 input; a private copy removes the ambiguity.
    """
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            if i in inits:
                readers[i].append(n)
    for name, nodes in readers.items():
        kinds = {n.name in blocked for n in nodes}
        if kinds != {True, False} or inits[name].data_type != onnx.TensorProto.FLOAT:
            continue
        copy_name = f"{name}__fp32"
        dup = copy.deepcopy(inits[name])
        dup.name = copy_name
        model.graph.initializer.append(dup)
        for n in nodes:
            if n.name in blocked:
                for k, i in enumerate(n.input):
                    if i == name:
                        n.input[k] = copy_name


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for n in model.graph.node:
        if n.op_type == "Cast":
            types[n.output[0]] = next(a.i for a in n.attribute if a.name == "to")
    return types


def _collapse_cast_round_trips(model: onnx.ModelProto, fp32_outputs: set[str]) -> None:
    """Undo the converter's lossy fp32 -> fp16 -> fp32 hops between two fp32-kept nodes.

    ``convert_float_to_float16`` treats every blocked node as its own fp32 island: it casts each
    blocked node's output to fp16 and back to fp32 for the next blocked node, and only removes such
    pairs when the tensor has a single consumer. Inside the policy's fp32 regions (LayerNorm, l2n,
    cosine, postprocessing) that would round the very values the policy protects, and for graph
    outputs produced by a blocked node it even leaves an fp16 output despite ``keep_io_types``.
    This pass only removes/rewires Cast nodes; no compute node changes precision here.
    """
    g = model.graph
    types = _tensor_types(model)
    graph_outputs = {o.name for o in g.output}

    def is_cast(n: onnx.NodeProto, to: int) -> bool:
        return n.op_type == "Cast" and any(a.name == "to" and a.i == to for a in n.attribute)

    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    changed = True
    while changed:
        changed = False
        consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for n in g.node:
            for i in n.input:
                consumers[i].append(n)
        for a in list(g.node):
            if not is_cast(a, fp16) or types.get(a.input[0]) != fp32:
                continue
            t, y = a.input[0], a.output[0]
            for b in [c for c in consumers.get(y, []) if is_cast(c, fp32) and c.output[0] not in graph_outputs]:
                for n in g.node:  # readers of the fp32 copy read the original fp32 tensor instead
                    for k, i in enumerate(n.input):
                        if i == b.output[0]:
                            n.input[k] = t
                g.node.remove(b)
                changed = True
            if y in fp32_outputs:  # keep_io_types: the output must stay the fp32 value itself
                idx = list(g.node).index(a)
                g.node.remove(a)
                g.node.insert(idx, onnx.helper.make_node("Identity", [t], [y], name=a.name + "_fp32_output"))
                changed = True
            elif not any(y in n.input for n in g.node) and y not in graph_outputs:
                g.node.remove(a)
                changed = True
            if changed:
                break
    for o in g.output:
        if o.name in fp32_outputs:
            o.type.tensor_type.elem_type = fp32
    del g.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model)
    g.value_info.extend(inferred.graph.value_info)


def convert_fp16(model: onnx.ModelProto, extra_fp32_ops: Iterable[str] = ()) -> Fp16Result:
    """fp32 graph -> fp16 graph with the policy above (inputs/outputs keep their dtypes)."""
    from onnxconverter_common import float16

    src = copy.deepcopy(model)
    del src.graph.value_info[:]  # stale entries would be duplicated by the converter's shape inference
    name_nodes(src)
    op_types = tuple(dict.fromkeys((*FP32_OP_TYPES, *extra_fp32_ops)))
    reasons = fp32_nodes(src, op_types)
    node_list = sorted(n for n, why in reasons.items() if why != "op type")
    op_list = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(op_types))
    blocked = {n.name for n in src.graph.node if n.op_type in op_list or n.name in reasons}
    _split_shared_initializers(src, blocked)
    floats = float_nodes(src)
    kept: dict[str, list[str]] = collections.defaultdict(list)
    for n in src.graph.node:
        if n.name in blocked:
            reasons.setdefault(n.name, "op type (onnxconverter_common default block list)")
            if n.name in floats:  # shape arithmetic (int64) is listed in reasons but not reported as kept
                kept[n.op_type].append(n.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "float32 number ... truncated to 1e-07": tiny weights, expected
        fp16 = float16.convert_float_to_float16(src, keep_io_types=True, op_block_list=op_list,
                                                node_block_list=node_list)
    _collapse_cast_round_trips(fp16, {o.name for o in model.graph.output
                                      if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT})
    return Fp16Result(model=fp16, kept_fp32=dict(kept), reasons={k: reasons[k] for k in blocked},
                      op_block_list=op_list, node_block_list=node_list)
