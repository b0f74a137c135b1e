"""HaploOmni: reference model, processor, runtime and the `haplo-export` tool."""

__version__ = "0.1.0"
