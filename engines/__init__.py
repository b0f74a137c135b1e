"""Execution backends: ONNX Runtime sessions, TensorRT builder, runner and plugins."""
