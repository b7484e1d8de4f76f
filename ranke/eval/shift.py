"""Latent Covariate Shift measures: how far policy tokens drift from ground-truth tokens.

The decoder was trained on codes of real images only (METHOD.md section 2). We compare the
policy's codebook usage with that of ground-truth codes `Q(E(x))` by a KL divergence in nats,
KL(policy || real), over the marginal histogram of all token positions (`token_kl`) and
position by position (`per_position_kl`); `token_entropy_bits` tells how much of the codebook
a model actually uses.

Smoothing: both histograms get the same additive pseudo-count `smoothing` in every code
(Lidstone; 1.0 is Laplace's add-one) before normalising, p_k = (c_k + a) / (N + a K). The KL is
then finite even where the real histogram leaves codes unused, and a code unused by both sides
contributes exactly 0. With K = 16384 codes and millions of tokens the default adds little
mass; for small samples it pulls both distributions toward uniform and shrinks the KL, so only
compare values computed with the same smoothing and similar token counts.

Round-trip token agreement is the per-image face of the shift (`roundtrip_agreement`): decode an
image's tokens with the decoder under test, re-encode the picture with the frozen encoder and
quantizer (those of the base tokenizer, which post-training never changes), and count the share
of tokens that come back. A decoder renders the codes it was trained on (ground-truth codes of
real images) so that most come back; tokens it cannot render consistently come back as others.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_array(values: ArrayLike, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(dtype, copy=False)


def code_histogram(codes: ArrayLike, codebook_size: int) -> np.ndarray:
    """Counts [K] of each code index over all entries of `codes` (any shape)."""
    flat = _as_array(codes, np.int64).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"code indices must lie in [0, {codebook_size}), got [{flat.min()}, {flat.max()}]")
    return np.bincount(flat, minlength=codebook_size)


def _smoothed(counts: np.ndarray, smoothing: float) -> np.ndarray:
    """Additively smoothed probabilities along the last axis."""
    if smoothing <= 0:
        raise ValueError("smoothing must be > 0 so that the KL is finite")
    counts = counts + smoothing
    return counts / counts.sum(axis=-1, keepdims=True)


def _kl_nats(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sum_k p log(p / q) along the last axis; terms with p = 0 are 0."""
    used = p > 0
    ratio = np.where(used, p, 1.0) / np.where(used, q, 1.0)
    return np.sum(np.where(used, p * np.log(ratio), 0.0), axis=-1)


def token_kl(p_counts: ArrayLike, q_counts: ArrayLike, smoothing: float = 1.0) -> float:
    """KL(p || q) in nats between two code histograms [K] after additive smoothing.

    Call it as `token_kl(policy_counts, real_counts)` for the Latent Covariate Shift.
    """
    p_counts, q_counts = _as_array(p_counts, np.float64), _as_array(q_counts, np.float64)
    if p_counts.shape != q_counts.shape or p_counts.ndim != 1:
        raise ValueError(f"histograms must be 1-D and equal in size, got {p_counts.shape} and {q_counts.shape}")
    return float(_kl_nats(_smoothed(p_counts, smoothing), _smoothed(q_counts, smoothing)))


def per_position_kl(codes_p: ArrayLike, codes_q: ArrayLike, codebook_size: int, smoothing: float = 1.0) -> float:
    """Mean over token positions l of KL(p_l || q_l), from codes [N, L] and [M, L].

    Each position gets its own smoothed histogram (as in `token_kl`), so a policy that puts the
    right codes in the wrong places is caught even when the marginal histogram matches.
    """
    codes_p, codes_q = _as_array(codes_p, np.int64), _as_array(codes_q, np.int64)
    if codes_p.ndim != 2 or codes_q.ndim != 2 or codes_p.shape[1] != codes_q.shape[1]:
        raise ValueError(f"codes must be [N, L] and [M, L], got {codes_p.shape} and {codes_q.shape}")
    p_hist = np.stack([code_histogram(column, codebook_size) for column in codes_p.T]).astype(np.float64)
    q_hist = np.stack([code_histogram(column, codebook_size) for column in codes_q.T]).astype(np.float64)
    return float(_kl_nats(_smoothed(p_hist, smoothing), _smoothed(q_hist, smoothing)).mean())


def token_entropy_bits(counts: ArrayLike) -> float:
    """Plug-in entropy in bits of a code histogram (unused codes contribute 0, no smoothing)."""
    counts = _as_array(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("entropy of an empty histogram")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def token_agreement(codes: torch.Tensor, recoded: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of positions where `recoded` equals `codes` (float64 [N], on the CPU).

    Both hold N rows of the same number of tokens, in any layout ([N, L], [N, h, w]): rows are
    compared position by position in row-major order."""
    if len(codes) == 0 or len(codes) != len(recoded) or codes.numel() != recoded.numel():
        raise ValueError(f"token agreement needs the same rows (at least one) and tokens per row, got shapes "
                         f"{tuple(codes.shape)} and {tuple(recoded.shape)}")  # fmt: skip
    return (codes.reshape(len(codes), -1).cpu() == recoded.reshape(len(recoded), -1).cpu()).double().mean(dim=1)


def roundtrip_agreement(
    codes: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Round-trip token agreement of each image: `token_agreement(codes, encode(decode(codes)))`.

    `decode` maps codes [N, L] to images (the decoder under test, with whatever happens to an
    image before it is judged, e.g. rounding to 8 bits), `encode` images to codes (the frozen
    encoder and quantizer)."""
    return token_agreement(codes, encode(decode(codes)))
