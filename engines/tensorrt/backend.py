"""The runtime backend over a bundle's TensorRT engines (rebuilt when stale, unless told not to)."""

from __future__ import annotations

from pathlib import Path

import torch

from haplo.bundle import STAGE_GRAPHS, Bundle, BundleError
from haplo.engines.graph_backend import GraphBackend
from haplo.engines.tensorrt.builder import EngineOptions, build_engine, graph_source_sha256, load_metadata
from haplo.engines.tensorrt.profiles import choose_profile
from haplo.engines.tensorrt.runner import EngineRunner
from haplo.engines.tensorrt.status import EngineError, require_tensorrt
from haplo.model.ops import MASKED_START

DISCARDED = 2  # the output slot of decoder calls whose present nobody reads


def cache_element_size(bundle: Bundle) -> int:
    """Bytes of one cached key or value element: the decoders' activation dtype (bf16 / fp16 when
    the build lowered them for TensorRT)."""
    return max(getattr(torch, bundle.graphs[graph].activations).itemsize for graph in STAGE_GRAPHS.values())


class TensorRTBackend(GraphBackend):
    """The runtime over a bundle's engines: device-resident KV cache, CUDA graphs for repeated shapes.

    TensorRT profiles need past length >= 1, so every decoder call carries one dead cache slot in
    front (zeros, key start MASKED_START: never visible); the runtime's block starts are shifted
    by one to match, so masks and RoPE positions are unchanged.

    Everything stays on the GPU: stage outputs go to the next stage as they are (in the engine's
    dtype), and only the runtime's token ids and a finished video come back to the host. A decoder
    call whose present is thrown away (`use_cache=False`: every DDIM step) writes it to a slot of its
    own, so those calls keep one set of output arenas and one CUDA graph per shape.
    """

    name = "tensorrt"

    @classmethod
    def from_bundle(cls, bundle: Bundle | str, **kwargs) -> TensorRTBackend:
        return cls(bundle, **kwargs)

    def __init__(self, bundle: Bundle | str, cuda_graphs: bool = True, rebuild: bool = True):
        require_tensorrt()
        super().__init__(bundle, device="cuda")
        if not self.bundle.manifest.engines:
            raise BundleError(
                f"{self.bundle.root}: the bundle has no TensorRT engines; build it with "
                "`haplo-export build --target tensorrt` on a machine with an NVIDIA GPU"
            )
        self.cuda_graphs, self.rebuild = cuda_graphs, rebuild
        self.cache_element_size = cache_element_size(self.bundle)
        self.runners: dict[str, EngineRunner] = {}
        self.profiles: dict[str, dict] = {}  # graph -> its engine's profiles, as the sidecar records them
        self.slots = {stage: 0 for stage in STAGE_GRAPHS}

    def _check_engine(self, graph: str, plan: Path, source: Path) -> None:
        """Rebuild a stale engine from its sidecar's profiles, or say why it cannot run (rebuild=False)."""
        meta = load_metadata(plan)
        reason = meta.mismatch(graph_source_sha256(source))
        if reason is None:
            return
        if not self.rebuild:
            raise EngineError(f"{plan}: {reason}; rebuild the bundle's engines")
        profiles = {
            p: {n: tuple(tuple(s) for s in v) for n, v in shapes.items()} for p, shapes in meta.profiles.items()
        }
        new = build_engine(graph, source, plan, profiles, meta.precision, EngineOptions(refit=meta.refittable))
        self._resign(graph, new)

    def _resign(self, graph: str, meta) -> None:
        """The rebuilt plan and sidecar get their new checksums (and the engine entry its new
        TensorRT version and SM), so the bundle still opens after the rebuild."""
        entry = self.bundle.manifest.engines[graph]
        entry.update(tensorrt_version=meta.tensorrt_version, compute_capability=meta.compute_capability)
        entry["plugins"] = meta.plugins
        self.bundle.resign(entry["file"], entry["metadata"])

    def runner(self, graph: str) -> EngineRunner:
        if graph not in self.runners:
            entry = self.bundle.manifest.engines[graph]
            plan, source = self.bundle.path(entry["file"]), self.bundle.graph_path(graph)
            self._check_engine(graph, plan, source)
            self.profiles[graph] = load_metadata(plan).profiles
            self.runners[graph] = EngineRunner(plan, cuda_graphs=self.cuda_graphs)
        return self.runners[graph]

    def run(self, graph: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        runner = self.runner(graph)
        out = runner(inputs)
        # copied out of the runner's arenas (the next call of this graph reuses them), as float32
        return [out[name].to(torch.float32, copy=True) for name in runner.outputs]

    def _stage_feeds(self, stage: str, hidden, position_ids, key_start, past) -> dict[str, torch.Tensor]:
        """The engine's inputs: the dead slot in front of the cache and the key starts, on the GPU."""
        layers = self.bundle.graphs[STAGE_GRAPHS[stage]].layers
        batch = hidden.shape[0]
        key_start = key_start.to(self.device, torch.long)
        key_start = torch.where(key_start < MASKED_START, key_start + 1, key_start)
        masked = torch.full((batch, 1), MASKED_START, dtype=torch.long, device=self.device)
        feeds = {"hidden_states": hidden, "position_ids": position_ids, "key_start": torch.cat([masked, key_start], 1)}
        if past is None:
            dtype = self.runner(STAGE_GRAPHS[stage]).dtypes[f"past_key_values.{layers[0]}.key"]
            past = [torch.zeros(self.config.stages[stage].kv_shape(batch, 1), dtype=dtype, device=self.device)] * (
                2 * len(layers)
            )
        for i, n in enumerate(layers):
            feeds[f"past_key_values.{n}.key"], feeds[f"past_key_values.{n}.value"] = past[2 * i], past[2 * i + 1]
        return feeds

    def run_stage(
        self,
        stage: str,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        key_start: torch.Tensor,
        past=None,
        use_cache: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        graph = STAGE_GRAPHS[stage]
        feeds = self._stage_feeds(stage, hidden, position_ids, key_start, past)
        if use_cache:  # alternate two slots: this call's present must not overwrite the past it reads
            self.slots[stage] ^= 1
        slot = self.slots[stage] if use_cache else DISCARDED
        runner = self.runner(graph)
        profile = choose_profile(self.profiles[graph], {n: tuple(t.shape) for n, t in feeds.items()})
        out = runner(feeds, profile=profile, slot=slot)
        hidden = out["hidden_states_out"].clone()  # the arena is this slot's: the next call reuses it
        if not use_cache:
            return hidden, None
        layers = self.bundle.graphs[graph].layers
        return hidden, [out[f"present.{n}.{kind}"] for n in layers for kind in ("key", "value")]

    def cache_tensors(self, past: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t[:, :, 1:] for t in past]  # without the dead slot every call puts first

    def cache_from_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat([torch.zeros_like(t[:, :, :1]), t], dim=2).contiguous() for t in tensors]

    def keep_cache(self, past: list[torch.Tensor]) -> list[torch.Tensor]:
        # A cache reused by many later calls (the text prefix) must leave the runner's output arenas.
        return [t.clone() for t in past]
