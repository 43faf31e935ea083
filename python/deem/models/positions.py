"""Fixed sin-cos position tables (spec/model.md §2.4, §8.2, §9.1): the 1-D code, the 2-D table of a square
grid, and its bicubic resize to another grid (`get_abs_pos`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1-D sin-cos code: ``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = 10000^(−k/(dim/2))``, k < dim/2.

    positions [M] -> [M, dim] (float64 math, rounded once to `dtype`).
    """
    if dim % 2 != 0:
        raise ValueError(f"sincos_pos_embed_1d: dim={dim} must be even")
    k = torch.arange(dim // 2, dtype=torch.float64, device=positions.device)
    omega = 1.0 / 10000.0 ** (k / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos table for a ``grid``×``grid`` grid, flattened row-major.

    For cell (row r, col c) the first ``dim/2`` channels are the 1-D code of r and the last ``dim/2``
    the code of c (row code first, unlike the MAE reference). With ``cls_token`` a zero row is
    prepended. Returns ``[grid² (+1), dim]`` float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"sincos_pos_embed_2d: dim={dim} must be divisible by 4")
    if grid < 1:
        raise ValueError(f"sincos_pos_embed_2d: grid={grid} must be >= 1")
    idx = torch.arange(grid, dtype=torch.float64)
    rows = idx.repeat_interleave(grid)  # r for cell r*grid + c
    cols = idx.repeat(grid)  # c
    table = torch.cat([sincos_pos_embed_1d(dim // 2, rows), sincos_pos_embed_1d(dim // 2, cols)], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, dim), table], dim=0)
    return table


def _table_grid(rows: int) -> tuple[int, bool]:
    """(grid side, has CLS row) of a table with ``rows`` rows: a square, or a square plus one."""
    side = math.isqrt(rows)
    if side * side == rows and rows > 0:
        return side, False
    side = math.isqrt(rows - 1) if rows > 1 else 0
    if side > 0 and side * side == rows - 1:
        return side, True
    raise ValueError(f"get_abs_pos: table has {rows} rows, neither a square nor a square plus a CLS row")


def get_abs_pos(table: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Resize a square position table to ``n_tokens`` rows.

    ``table`` is ``[g², D]`` or ``[1 + g², D]`` (CLS row first, kept as is). If the target grid side
    differs from ``g``, the grid part is interpolated bicubically (align_corners=False, in float32) and
    cast back; the sin-cos code is not recomputed. Returns ``[n_tokens, D]``.
    """
    if table.dim() != 2:
        raise ValueError(f"get_abs_pos: table must be [rows, dim], got shape {tuple(table.shape)}")
    side, has_cls = _table_grid(table.shape[0])
    n_grid = n_tokens - 1 if has_cls else n_tokens
    tgt = math.isqrt(max(n_grid, 0))
    if n_grid < 1 or tgt * tgt != n_grid:
        what = "1 + a square" if has_cls else "a square"
        raise ValueError(f"get_abs_pos: n_tokens={n_tokens} must be {what} for a table of {table.shape[0]} rows")
    if tgt == side:
        return table
    dim = table.shape[1]
    grid = table[1:] if has_cls else table
    grid = grid.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(tgt * tgt, dim).to(table.dtype)
    return torch.cat([table[:1], grid], dim=0) if has_cls else grid
