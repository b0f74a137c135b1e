"""ONNX export of HaploOmni, split by stage."""
