"""Precision in the graph: explicit Q/DQ (FP8 E4M3, INT8) and casts (FP16, BF16), per graph.

    policy.py       which graph gets which precision; the INT8 weight range by CPU
    calibration.py  activation ranges and held-out feeds from the PyTorch pipeline
    rewrite.py      the Q/DQ and cast rewrite of an exported graph

Their accuracy checks (a rewritten graph against the fp32 module) are in `haplo.export.validate`.

TensorRT 11 is strongly typed, so the precision of every matmul is what the ONNX graph says. We
calibrate on the PyTorch model running the real pipeline (processor-made prompts with an image,
greedy decoding, guided DDIM over several timesteps), recording the input range of every
`nn.Linear`, then rewrite each exported graph: for a weight MatMul of a quantized module,

    x -> QuantizeLinear(s_x) -> DequantizeLinear(s_x) -> MatMul <- DequantizeLinear(s_w, axis=1) <- W_q

with per-tensor activation scales and per-output-channel weight scales, the placement TensorRT
fuses into quantized GEMMs. Norms, softmax and the switch logits live inside the `haplo` nodes
(or are excluded by module name in decomposed graphs) and stay in fp32, as do the heads and the
VAE by default (`default_policy`).

INT8 comes in two flavours. `tensorrt`: symmetric signed activations (zero point 0), what
TensorRT requires. `onnxruntime`: asymmetric uint8 activations with int8 weights, the U8S8 pattern
ONNX Runtime's x86 kernels fuse into integer matmuls, which is what makes INT8 faster on CPU.

The weight range of the `onnxruntime` flavour follows the CPU (`int8_weight_plan`): x86 CPUs
without VNNI add u8 x s8 product pairs in saturating int16 (`haplo.cpuinfo`), so weights are kept
within +-64 there ("reduced"); CPUs with VNNI / AMX, and TensorRT, get the full +-127. The manifest
records the choice and the build CPU; `haplo.engines.onnxruntime` refuses a full-range bundle on a
CPU that would saturate it, with the command that rebuilds it.
"""
