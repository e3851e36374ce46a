"""Hand-written torch versions of each layer: the independent references the layer tests use.

Written from the specification (chatglm2-spec.md §3), not from glm_numpy, in float64 where the
test wants exact values.
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x [T, N, Dh]: interleaved pairs over the first Dh/2 channels, angles in float64."""
    Dh = x.shape[-1]
    R = Dh // 2
    theta = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float64) / R)  # [R/2]
    angle = positions.double()[:, None] * theta  # [T, R/2]
    pairs = torch.view_as_complex(
        x[..., :R].double().reshape(*x.shape[:-1], R // 2, 2).contiguous()
    )
    turned = pairs * torch.polar(torch.ones_like(angle), angle)[:, None, :]  # [T, N, R/2]
    rotated = torch.view_as_real(turned).reshape(*x.shape[:-1], R)
    return torch.cat([rotated, x[..., R:].double()], dim=-1)


def fp16_rotary_table(positions: torch.Tensor, R: int, base: float = 10000.0):
    """The official fp16 recipe (spec §8.1): every step in torch half precision."""
    theta = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float16) / R))
    angle = torch.outer(positions.to(torch.float16), theta).float()
    return torch.cos(angle).half().float(), torch.sin(angle).half().float()


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [T, H, Dh], k/v [S, G, Dh] -> [T, H, Dh] via torch's SDPA, causal over the last T."""
    T, H, Dh = q.shape
    S, G, _ = k.shape
    k = k.repeat_interleave(H // G, dim=1)  # [S, H, Dh]: heads in blocks of H/G per group
    v = v.repeat_interleave(H // G, dim=1)
    allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed
    )
    return out.transpose(0, 1)


def swiglu(x: torch.Tensor, w_h_to_4h: torch.Tensor, w_4h_to_h: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w_h_to_4h).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_4h_to_h)
