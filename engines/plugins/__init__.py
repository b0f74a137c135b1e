"""TensorRT plugins for the two HaploOmni operators: Triton kernels, their PTX AOT step, registration.

kernels.py           Triton kernels + launchers with `haplo.model.ops` signatures (GPU, or CPU interpreter)
aot.py               kernels -> PTX for a named SM, without a GPU
tensorrt_plugins.py  tensorrt.plugin registrations (register / autotune / aot_impl / impl)
"""
