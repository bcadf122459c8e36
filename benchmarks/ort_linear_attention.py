"""Time ONNX Runtime's com.microsoft.LinearAttention (gated, per-key decay, d_v 1) against our BiSelectiveScan kernel at Vim-Ti
shapes (batch 8, L 197, E 384, N 16), ONNX Runtime, 2 threads. Also check it computes the scan."""
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from visionmamba.deploy import runtime_kernels

b, L, E, N = 8, 197, 384, 16
S = 2 * b  # sequences: both directions as batch rows
def la_model():
    node = helper.make_node("LinearAttention", ["q", "k", "v", "", "g"], ["o", "s"], domain="com.microsoft",
                            q_num_heads=E, kv_num_heads=E, update_rule="gated", scale=1.0)
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "T", d]) for n, d in (("q", E * N), ("k", E * N), ("v", E), ("g", E * N))]
    outs = [helper.make_tensor_value_info("o", TensorProto.FLOAT, None), helper.make_tensor_value_info("s", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph([node], "la", ins, outs), opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()
rng = np.random.default_rng(0)
delta = np.log1p(np.exp(rng.standard_normal((S, L, E)).astype(np.float32) - 2))
A = -np.tile(np.arange(1, N + 1, dtype=np.float32), (E, 1))  # (E, N)
Bt = rng.standard_normal((S, L, N)).astype(np.float32); Ct = rng.standard_normal((S, L, N)).astype(np.float32)
u = rng.standard_normal((S, L, E)).astype(np.float32)
g = (delta[..., None] * A).reshape(S, L, E * N)
k = np.broadcast_to(Bt[:, :, None, :], (S, L, E, N)).reshape(S, L, E * N).copy()
q = np.broadcast_to(Ct[:, :, None, :], (S, L, E, N)).reshape(S, L, E * N).copy()
v = delta * u
o = ort.SessionOptions(); o.intra_op_num_threads = 2
s = ort.InferenceSession(la_model(), o, providers=["CPUExecutionProvider"])
feed = {"q": q, "k": k, "v": v, "g": g}
out = s.run(["o"], feed)[0]
# reference for a few sequences
h = np.zeros((E, N), np.float32); ref = []
for t in range(L):
    h = np.exp(delta[0, t][:, None] * A) * h + (delta[0, t] * u[0, t])[:, None] * Bt[0, t][None]
    ref.append(h @ Ct[0, t])
print("LinearAttention max abs diff vs the recurrence (sequence 0):", np.abs(out[0] - np.stack(ref)).max())
def bench(f, n=5):
    f(); t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e3
print("LinearAttention ms (op alone, inputs prebuilt):", bench(lambda: s.run(["o"], feed)))
# ours: the one-node BiSelectiveScan model
from visionmamba.deploy import onnx_graph

R = 12
names = onnx_graph.INPUTS
node = helper.make_node("BiSelectiveScan", list(names), ["y"], domain="visionmamba")
ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
m = helper.make_model(helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
                      opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("visionmamba", 1)])
o2 = ort.SessionOptions(); o2.intra_op_num_threads = 2; runtime_kernels.register_onnxruntime(o2)
s2 = ort.InferenceSession(m.SerializeToString(), o2, providers=["CPUExecutionProvider"])
f2 = {"u": rng.standard_normal((2, b, L, E)).astype(np.float32), "x_proj_out": rng.standard_normal((2, b, L, R + 2 * N)).astype(np.float32),
      "dt_weight": rng.standard_normal((2, E, R)).astype(np.float32) * 0.1, "A": np.stack([A, A]), "D": np.ones((2, E), np.float32),
      "z": rng.standard_normal((b, L, E)).astype(np.float32), "bias": np.zeros((2, E), np.float32)}
print("BiSelectiveScan (ours) ms, both directions with dt_proj, softplus, D, gate:", bench(lambda: s2.run(None, f2)))
