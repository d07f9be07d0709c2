"""The DDPM U-Net of Ho et al. (2020), as the reference implementation of Song et al. (2021) builds it.

It is the NCSN++ skeleton with DDPM's fixed choices: sinusoidal embedding, DDPM residual blocks and
plain (conv) resampling, 32 normalization groups, no skip rescaling, zero-initialized output layers.
"""
from __future__ import annotations

from models.ncsnpp import NCSNpp

DDPM_GROUPS = 32  # DDPM normalizes with 32 groups everywhere

# What makes the DDPM network; the remaining keys (nf, ch_mult, num_res_blocks, attn_resolutions,
# dropout, resamp_with_conv, scale_by_sigma, nonlinearity) are read from the config.
DDPM_FIXED = {
    "embedding_type": "positional",
    "conditional": True,
    "resblock_type": "ddpm",
    "progressive": "none",
    "progressive_input": "none",
    "skip_rescale": False,
    "init_scale": 0.0,
    "fir": False,
}


class DDPM(NCSNpp):
    """DDPM U-Net; `forward(x, labels)` with labels a step index / 999 t (VP) or sigma (VE)."""

    def __init__(self, config):
        config = config.copy_and_resolve_references()
        with config.unlocked():
            for key, value in DDPM_FIXED.items():
                config.model[key] = value
        super().__init__(config, norm_groups=DDPM_GROUPS)
