"""The build's end-to-end check: greedy decoding and guided DDIM, PyTorch against the staged bundle.

What is compared, and on which inputs, is settled here; the measures themselves (token agreement,
latent error, video PSNR) are `haplo.export.validate`. `failures` turns the record and the
tolerances into the reasons a build is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from haplo.export.validate import Tolerances, ddim_parity, token_agreement
from haplo.runtime.backend import Backend

PROMPT = "a red square moves from left to right"


@dataclass
class CheckShapes:
    check: tuple[int, int, int, int]  # latents (frames, C, h, w) of the DDIM check
    deployed: tuple[int, int, int, int]  # latents the VAE graph is built for
    has_vae: bool


def end_to_end(
    reference: Backend, candidate: Backend, processor, shapes: CheckShapes, low_precision: bool, steps: tuple[int, int]
) -> tuple[dict, dict]:
    """(understanding record, generation record); `steps`: (greedy decode steps, DDIM steps)."""
    understanding = token_agreement(reference, candidate, understanding_sample(processor), steps[0])
    prompt = processor.process_prompt_for_generation([PROMPT], "")
    noise = torch.randn((1, *shapes.check), generator=torch.Generator().manual_seed(0))
    decode = low_precision and shapes.has_vae and shapes.check == shapes.deployed
    generation = ddim_parity(
        reference, candidate, prompt["input_ids"], prompt["attention_mask"], noise, steps[1], decode=decode
    )
    generation["latent_shape"] = list(shapes.check)
    if low_precision and not decode:
        generation["video_psnr_note"] = (
            "not measured: no VAE graph"
            if not shapes.has_vae
            else f"not measured: the VAE graph is built for latents {list(shapes.deployed)}"
        )
    return understanding, generation


def understanding_sample(processor) -> dict:
    """A prompt with one image, through the real processor."""
    pixels = np.zeros((48, 80, 3), dtype=np.uint8)
    pixels[10:30, 20:50] = (220, 40, 40)
    conversation = [{"role": "user", "content": "<image>\nWhat moves, and where?"}]
    return processor(conversations=[conversation], images=[Image.fromarray(pixels)])


def failures(parity: dict, accuracy: dict, low_precision: bool, tol: Tolerances) -> list[str]:
    understanding, generation = parity["understanding"], parity["generation"]
    found = [f"{n} (export): {'; '.join(r['problems'])}" for n, r in parity["graphs"].items() if not r["ok"]]
    found += [
        f"{n} ({r['precision']}): cosine {r['cosine']:.5f} < {tol.quant_min_cosine}"
        for n, r in accuracy.items()
        if r["cosine"] < tol.quant_min_cosine
    ]
    min_agreement = tol.quant_min_token_agreement if low_precision else tol.min_token_agreement
    if understanding["agreement"] < min_agreement:
        found.append(f"greedy token agreement {understanding['agreement']:.1%} < {min_agreement:.1%}")
    if low_precision and generation["cosine"] < tol.quant_min_latent_cosine:
        found.append(f"DDIM latent cosine {generation['cosine']:.5f} < {tol.quant_min_latent_cosine}")
    if not low_precision and generation["max_abs_error"] > tol.ddim_atol:
        found.append(f"DDIM latents max abs error {generation['max_abs_error']:.3g} > {tol.ddim_atol:g}")
    return found


def summary(parity: dict, accuracy: dict, failed: list[str]) -> dict:
    """The manifest's `parity` entry (parity.json keeps the full record)."""
    graphs_, und, gen = parity["graphs"], parity["understanding"], parity["generation"]
    return {
        "ok": not failed,
        "failures": failed,
        "max_abs_error": {n: r["max_abs_error"] for n, r in graphs_.items()},
        "cosine": {n: r["cosine"] for n, r in graphs_.items()},
        "token_agreement": und["agreement"],
        "ddim_max_abs_error": gen["max_abs_error"],
        "ddim_cosine": gen["cosine"],
        "ddim_latent_shape": gen["latent_shape"],
        "video_psnr_db": gen.get("video_psnr_db"),
        "quantized_cosine": {n: r["cosine"] for n, r in accuracy.items()},
    }
