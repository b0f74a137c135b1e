"""What each stage trains and with which loss (paper section 3.3, appendix A.3, Tables 10-11).

stage 1 (multimodal warmup): pre-decoder  <- identity on text + L2/cosine to CLIP-ViT on images
                             post-decoder <- identity on text + L2/cosine to CogVideoX on noisy latents
                             (base frozen)
stage 2 step 1: pre-connector, next-token prediction
stage 2 step 2: post-connector (+ the new latent -> pre-width projector), diffusion loss (v-prediction)
stage 2 step 3: pre-connector + post-connector + post-decoder, diffusion loss, end to end
stage 3:        everything, next-token prediction + diffusion loss on mixed batches
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from haplo.model import ops
from haplo.model.sequence import generation_positions, understanding_positions


def _layer_pattern(model, stage: str) -> str:
    layers = model.model.stage_layers(stage)
    return r"model\.layers\.(" + "|".join(str(i) for i in layers) + r")\."


def trainable_patterns(model, stage: int, step: int | None) -> dict[str, list[str]]:
    """Parameter-group name -> regexes of the parameters it trains."""
    pre_decoder = [_layer_pattern(model, "pre"), r"model\.pre_norm\.", r"model\.patch_embed\.", r"model\.pre_pos_embed"]
    post_decoder = [_layer_pattern(model, "post")]
    # `v2t_projector` maps latent tokens into the pre width; it has no prior, so it trains with the
    # post-connector, the other new piece on the generation path.
    post_connector = [r"model\.post_connector\.", r"v2t_projector\."]
    if stage == 1:
        return {"pre": pre_decoder, "post": post_decoder}
    if stage == 2:
        return {
            1: {"pre_connector": [r"model\.pre_connector\."]},
            2: {"post_connector": post_connector},
            3: {"connectors_and_post": [r"model\.pre_connector\."] + post_connector + post_decoder},
        }[step]
    return {"all": [r".*"]}


def select_parameters(model, stage: int, step: int | None) -> dict[str, list[torch.nn.Parameter]]:
    """Freeze everything, then unfreeze and group the stage's parameters."""
    groups = {}
    claimed = set()
    for group, patterns in trainable_patterns(model, stage, step).items():
        regex = re.compile("|".join(f"(?:{p})" for p in patterns))
        groups[group] = []
        for name, param in model.named_parameters():
            if name not in claimed and regex.match(name):
                groups[group].append(param)
                claimed.add(name)
    for name, param in model.named_parameters():
        param.requires_grad_(name in claimed)
    return groups


# -- losses ---------------------------------------------------------------------------------------


def next_token_loss(model, batch: dict) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        attention_start_ids=batch.get("attention_start_ids"),
        pixel_values=batch.get("pixel_values"),
        image_sizes=batch.get("image_sizes"),
        pixel_values_videos=batch.get("pixel_values_videos"),
    )
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def noisy_latents(scheduler, latents: torch.Tensor, generator: torch.Generator):
    """(x_t, t, v target) with t uniform over the training timesteps."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    return scheduler.add_noise(latents, noise, t), t, scheduler.get_velocity(latents, noise, t)


def diffusion_loss(model, scheduler, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """v-prediction MSE (the model predicts v, as CogVideoX does)."""
    x_t, t, target = noisy_latents(scheduler, batch["latents"], generator)
    pred = model.generation_forward(x_t, t, batch["input_ids"], batch["attention_mask"])
    return F.mse_loss(pred.float(), target.float())


def _distill(student: torch.Tensor, teacher: torch.Tensor, l2: float, cos: float) -> torch.Tensor:
    student, teacher = student.float(), teacher.float()
    return l2 * F.mse_loss(student, teacher) + cos * (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def _run_layers(model, stage: str, x, position_ids, key_start):
    """A stage's decoder layers alone (no connector): what the stage-1 losses read."""
    rope = model.model.rope(stage, position_ids)
    for index in model.model.stage_layers(stage):
        x, _ = model.model.layer_forward(index, x, rope, key_start)
    return x


def pre_warmup_loss(model, clip_teacher, batch: dict, weights=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """[caption tokens, one image tile] through pre_norm + the pre layers.

    Text rows: identity (L2 to their own input embeddings). Image rows: L2 + cosine to the CLIP-ViT
    teacher's last hidden state without its class token."""
    text = model.model.embed_tokens(batch["input_ids"])  # [B, Lt, pre]
    tile = batch["tile"].to(text.dtype)  # [B, 3, S, S], CLIP-normalised
    image = model.model.patch_embed(tile) + model.model.pre_pos_embed  # [B, P, pre]
    batch_size, lt, p = text.shape[0], text.shape[1], image.shape[1]
    # text causal, the tile one bidirectional block starting after the text
    key_start = torch.cat([torch.arange(lt), torch.full((p,), lt)]).expand(batch_size, -1)
    positions = torch.arange(lt + p).expand(batch_size, -1)
    out = _run_layers(model, "pre", model.model.pre_norm(torch.cat([text, image], 1)), positions, key_start)
    with torch.no_grad():
        target = clip_teacher(pixel_values=tile).last_hidden_state[:, 1:]
    return weights[0] * F.mse_loss(out[:, :lt].float(), text.detach().float()) + _distill(
        out[:, lt:], target, weights[1], weights[2]
    )


class CogVideoXTeacher:
    """CogVideoX's last hidden state of the video tokens (before its output AdaLN), via a hook."""

    def __init__(self, transformer):
        self.transformer = transformer.eval().requires_grad_(False)
        self.captured = None
        transformer.norm_final.register_forward_hook(lambda module, args, out: setattr(self, "captured", out))

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        # Without the T5 encoder the teacher runs on an empty (zero) caption: its unconditional branch.
        cfg = self.transformer.config  # its position table expects exactly max_text_seq_length text rows
        text = torch.zeros(latents.shape[0], cfg.max_text_seq_length, cfg.text_embed_dim, dtype=latents.dtype)
        self.transformer(hidden_states=latents, encoder_hidden_states=text, timestep=timestep)
        return self.captured[:, -self._tokens(latents) :]

    def _tokens(self, latents):
        p = self.transformer.config.patch_size
        return latents.shape[1] * (latents.shape[3] // p) * (latents.shape[4] // p)


def post_warmup_loss(
    model, cog_teacher: CogVideoXTeacher, scheduler, batch: dict, generator: torch.Generator, weights=(1.0, 1.0, 1.0)
) -> torch.Tensor:
    """[caption states, timestep token, noisy latent tokens] through the post layers, CogVideoX-style.

    The caption reaches the post-decoder as it will in the full model (embeddings -> pre -> base ->
    post-connector, all frozen here). Text rows: identity; latent rows (after norm_final): L2 +
    cosine to the CogVideoX teacher on the same noisy latents and timestep."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    x_t, t, _ = noisy_latents(scheduler, batch["latents"], generator)
    with torch.no_grad():
        causal, positions = ops.causal_key_start(mask), understanding_positions(mask)
        text, _ = model.model.stage_forward("pre", model.model.embed_tokens(ids), positions, causal)
        text, _ = model.model.stage_forward("base", text, positions, causal)
    temb = model.time_embed(t, x_t.shape[0])
    time_token = model.temb_token(F.silu(temb))[:, None]
    latent_tokens = model.patch_embed_cogvideo(x_t.to(text.dtype))
    key_start, position_ids = generation_positions(mask, latent_tokens.shape[1])
    out = _run_layers(model, "post", torch.cat([text, time_token, latent_tokens], 1), position_ids, key_start)
    target = cog_teacher(x_t, t)
    latent_out = model.norm_final(out[:, -latent_tokens.shape[1] :])
    return weights[0] * F.mse_loss(out[:, : ids.shape[1]].float(), text.float()) + _distill(
        latent_out, target, weights[1], weights[2]
    )
