"""The search space and what lives in it: the space itself (`space`), the architecture
encoding (`arch`), the enabled (shrunk) part of a space (`enabled`) and path sampling
for training (`sampler`)."""
from bsnas.space.arch import SKIP, Arch, LayerChoice, kernel_size
from bsnas.space.enabled import EnabledSpace
from bsnas.space.sampler import PathSampler
from bsnas.space.space import (ACTIVATIONS, DEFAULTS, PRESETS_DIR, FirstBlockSpec, HeadSpec, LayerSpec,
                               SearchSpace, StageSpec, StemSpec, WidthGrid, as_rng, load_space,
                               preset_names)

__all__ = ["ACTIVATIONS", "DEFAULTS", "PRESETS_DIR", "SKIP", "Arch", "EnabledSpace", "FirstBlockSpec",
           "HeadSpec", "LayerChoice", "LayerSpec", "PathSampler", "SearchSpace", "StageSpec", "StemSpec",
           "WidthGrid", "as_rng", "kernel_size", "load_space", "preset_names"]
