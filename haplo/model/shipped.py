"""The model the project trains and ships: `haplo-mini`, the default of every command.

It lives inside the package (`haplo/checkpoints/haplo-mini`: config, safetensors, tokenizer, `vae/`,
`training.json`), so an installed `haplo-export` finds it without a download. It is made by
`haplo-train recipe --config configs/haplo-mini.yaml`.
"""

from __future__ import annotations

from pathlib import Path

from haplo.errors import HaploError

SHIPPED_NAME = "haplo-mini"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / SHIPPED_NAME


class ShippedModelError(HaploError, FileNotFoundError):
    pass


def shipped_checkpoint() -> Path:
    """The shipped checkpoint directory; an install without it is refused with how to make it."""
    if not (SHIPPED_DIR / "config.json").is_file() or not (SHIPPED_DIR / "model.safetensors").is_file():
        raise ShippedModelError(
            f"the shipped model is missing from {SHIPPED_DIR}; reinstall the package, pass --checkpoint "
            "DIR or --preset NAME, or train it with `haplo-train recipe --config configs/haplo-mini.yaml`"
        )
    return SHIPPED_DIR
