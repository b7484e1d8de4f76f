"""VQ image tokenizer in LlamaGen's parameter layout.

The model maps an image to a grid of discrete codes and back:

    x [B,3,H,W] -> Encoder -> quant_conv -> VectorQuantizer -> codes [B,h,w]
    codes -> codebook entries [B,d,h,w] -> post_quant_conv -> Decoder -> x_hat [B,3,H,W]

with h = H / 2**(len(ch_mult) - 1). Module names, nesting and buffer names follow LlamaGen's
`tokenizer/tokenizer_image/vq_model.py`, so its official checkpoints (e.g. `vq_ds16_t2i.pt`)
load key for key into `VQModel(VQ_PRESETS["VQ-16"])`.

Image range: the model works on images in [-1, 1] (LlamaGen's convention); use
`to_model_range` / `to_unit_range` at the boundaries with [0, 1] images.

RankE trains only the decoder side (`decoder_parameters()`); `freeze_token_space()` pins the
encoder, `quant_conv` and codebook so the policy's token space does not move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ranke.runtime import UserError

# Length of LlamaGen's `codebook_used` buffer: a rolling window of recently assigned codes.
USAGE_WINDOW = 65536


@dataclass
class VQArgs:
    """Hyperparameters of a VQ tokenizer (LlamaGen `ModelArgs` plus the sizes it hard-codes)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True  # nearest code by cosine similarity on unit vectors
    commit_loss_beta: float = 0.25
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    base_channels: int = 128
    num_res_blocks: int = 2  # per encoder level; the decoder uses one more per level
    norm_groups: int = 32
    dropout_p: float = 0.0
    in_channels: int = 3

    def __post_init__(self) -> None:
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise UserError(
                f"vq: encoder_ch_mult {list(self.encoder_ch_mult)} and decoder_ch_mult "
                f"{list(self.decoder_ch_mult)} must have the same length (same downsampling factor)"
            )
        widths = [self.base_channels * m for m in (*self.encoder_ch_mult, *self.decoder_ch_mult)]
        if any(width % self.norm_groups for width in widths):
            raise UserError(
                f"vq: every channel width {sorted(set(widths))} must be divisible by norm_groups={self.norm_groups}"
            )

    @property
    def downsample_factor(self) -> int:
        """Image pixels per token side (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)


VQ_PRESETS: dict[str, VQArgs] = {
    # LlamaGen VQ-16 (`vq_ds16_t2i.pt`): 256 px -> 16x16 tokens, 16384 codes of dim 8.
    "VQ-16": VQArgs(),
    # Toy world: 64 px -> 8x8 tokens, 256 codes of dim 8, sized for 2 CPU cores.
    # Narrow high-resolution levels keep the cost low; the 8x8 level carries the width.
    # 256 codes rather than 1024: the reconstructions still pass the verifier as often, while
    # the policy no longer spends its capacity telling apart near-identical background codes.
    "toy": VQArgs(
        codebook_size=256,
        encoder_ch_mult=(1, 2, 2, 4),
        decoder_ch_mult=(1, 2, 2, 4),
        z_channels=64,
        base_channels=16,
        num_res_blocks=1,
        norm_groups=8,
    ),
}


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the model's [-1, 1]."""
    return images * 2.0 - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model output -> [0, 1] images, clamped (decoders overshoot slightly)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q/k/v/proj_out are 1x1 convs (LlamaGen layout)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, HW, C]
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with right/bottom zero padding (so H -> H/2 exactly, as in LlamaGen)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, attention after each (lowest level only), then a resampler."""

    def __init__(
        self, in_channels: int, out_channels: int, n_blocks: int, groups: int, dropout: float,
        with_attn: bool = False, downsample: bool = False, upsample: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * n_blocks
        self.res = nn.ModuleList(ResnetBlock(widths[i], widths[i + 1], groups, dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels, groups) for _ in range(n_blocks if with_attn else 0))
        self.downsample = Downsample(out_channels) if downsample else None
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


def _middle(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    """res - attention - res at the lowest resolution."""
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, groups, dropout),
            AttnBlock(channels, groups),
            ResnetBlock(channels, channels, groups, dropout),
        ]
    )


class Encoder(nn.Module):
    """Images [B, 3, H, W] -> features [B, z_channels, h, w]: levels that halve the resolution, then the middle."""

    def __init__(self, args: VQArgs) -> None:
        super().__init__()
        ch, mult, groups = args.base_channels, args.encoder_ch_mult, args.norm_groups
        n_levels = len(mult)
        self.conv_in = nn.Conv2d(args.in_channels, ch, 3, padding=1)
        widths = [ch] + [ch * m for m in mult]
        self.conv_blocks = nn.ModuleList(
            Level(
                widths[i], widths[i + 1], args.num_res_blocks, groups, args.dropout_p,
                with_attn=i == n_levels - 1, downsample=i < n_levels - 1,
            )
            for i in range(n_levels)
        )
        self.mid = _middle(widths[-1], groups, args.dropout_p)
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], args.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features [B, z_channels, h, w] -> images [B, 3, H, W]: the middle, then levels that double the resolution."""

    def __init__(self, args: VQArgs, out_channels: int = 3) -> None:
        super().__init__()
        ch, groups = args.base_channels, args.norm_groups
        # Levels run from the lowest resolution (widest) up to full resolution.
        mult = list(reversed(args.decoder_ch_mult))
        n_levels = len(mult)
        widths = [ch * mult[0]] + [ch * m for m in mult]
        self.conv_in = nn.Conv2d(args.z_channels, widths[0], 3, padding=1)
        self.mid = _middle(widths[0], groups, args.dropout_p)
        self.conv_blocks = nn.ModuleList(
            Level(
                widths[i], widths[i + 1], args.num_res_blocks + 1, groups, args.dropout_p,
                with_attn=i == 0, upsample=i < n_levels - 1,
            )
            for i in range(n_levels)
        )
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        # Training forwards recompute each middle block and level in backward instead of keeping
        # their activations (the decoder stage holds several decodes at once).
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images in float32 also under bf16 autocast: pixels feed losses and rewards."""
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        h = self.conv_in(z)
        for block in [*self.mid, *self.conv_blocks]:
            h = checkpoint(block, h, use_reentrant=False) if recompute else block(h)
        return self.conv_out(F.silu(self.norm_out(h))).float()


@dataclass
class QuantizerLosses:
    """The two VQ-VAE codebook terms (both mean squared errors over all positions and dims)."""

    codebook: torch.Tensor  # ||sg[z] - e||^2: pulls the chosen codes toward the encoder outputs
    commitment: torch.Tensor  # beta * ||z - sg[e]||^2: keeps the encoder close to its codes

    @property
    def total(self) -> torch.Tensor:
        return self.codebook + self.commitment


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    With `l2_norm`, encoder vectors and codes are projected to the unit sphere before the
    lookup, so the nearest code is the one of highest cosine similarity, and the quantized
    output is the unit-norm code.

    `codebook_used` (LlamaGen's buffer, same name and length) is a rolling window of the
    code indices assigned in the most recent training forwards (stored as float, -1 marks an
    empty slot); `codebook_usage()` reports the fraction of the codebook it contains.
    """

    def __init__(self, codebook_size: int, embed_dim: int, beta: float, l2_norm: bool) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.full((USAGE_WINDOW,), -1.0))
        # Set by a recipe running several processes to an all-gather of the codes, so the usage
        # window (and the dead-code restarts that read it) covers the global batch everywhere.
        self.gather_codes = None

    def codebook(self) -> torch.Tensor:
        """The code vectors actually used for lookup and decoding, [K, d]."""
        return F.normalize(self.embedding.weight, dim=-1) if self.l2_norm else self.embedding.weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, QuantizerLosses, torch.Tensor]:
        """z [B, d, h, w] -> (straight-through quantized [B, d, h, w], losses, codes [B, h, w])."""
        b, d, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codebook = self.codebook()
        # nearest codes in float32 even under bf16 autocast, so images get the same codes either way
        with torch.autocast(z.device.type, enabled=False):
            sq_distance = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()
        codes = sq_distance.argmin(dim=1)
        z_q = codebook[codes]

        losses = QuantizerLosses(
            codebook=F.mse_loss(z_q, z.detach()),
            commitment=self.beta * F.mse_loss(z, z_q.detach()),
        )
        if self.training:
            self._record_usage(codes)
        # Straight-through: the forward value is z_q, the gradient passes to z unchanged.
        z_q = z + (z_q - z).detach()
        z_q = z_q.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return z_q, losses, codes.reshape(b, h, w)

    @torch.no_grad()
    def _record_usage(self, codes: torch.Tensor) -> None:
        if self.gather_codes is not None:
            codes = self.gather_codes(codes)
        recent = codes[-USAGE_WINDOW:].to(self.codebook_used.dtype)
        self.codebook_used.copy_(torch.cat([self.codebook_used[len(recent):], recent]))

    def codebook_usage(self) -> float:
        """Fraction of the codebook assigned within the usage window (0 before any training step)."""
        seen = self.codebook_used[self.codebook_used >= 0]
        return seen.unique().numel() / self.codebook_size

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Re-seed every code absent from the usage window with a random vector of `z`.

        z: encoder outputs as given to `forward` ([B, d, h, w]). Codes that lose the
        nearest-neighbour competition early never receive a gradient again; moving them onto
        current encoder outputs puts them back in play. Returns the number of codes re-seeded.
        Meant for tokenizer training from scratch, called every few dozen steps.
        """
        used = torch.zeros(self.codebook_size, dtype=torch.bool, device=z.device)
        used[self.codebook_used[self.codebook_used >= 0].long()] = True
        dead = (~used).nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        vectors = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        picks = torch.randint(len(vectors), (len(dead),), generator=generator, device=z.device)
        new_codes = vectors[picks]
        self.embedding.weight[dead] = F.normalize(new_codes, dim=-1) if self.l2_norm else new_codes
        return len(dead)

    def entries(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> code vectors [B, d, h, w]."""
        return self.codebook()[codes].permute(0, 3, 1, 2)


class VQModel(nn.Module):
    """Encoder + vector quantizer + decoder, images in [-1, 1]."""

    def __init__(self, args: VQArgs) -> None:
        super().__init__()
        self.args = args
        self.encoder = Encoder(args)
        self.decoder = Decoder(args, out_channels=args.in_channels)
        self.quantize = VectorQuantizer(
            args.codebook_size, args.codebook_embed_dim, args.commit_loss_beta, args.codebook_l2_norm
        )
        self.quant_conv = nn.Conv2d(args.z_channels, args.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(args.codebook_embed_dim, args.z_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerLosses, torch.Tensor]:
        """Images [B,3,H,W] -> (quantized [B,d,h,w], codebook losses, codes [B,h,w])."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] -> codes [B,h,w] (int64)."""
        return self.encode(x)[2]

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Code vectors [B,d,h,w] (hard or soft mixtures of codes) -> images [B,3,H,W]."""
        return self.decoder(self.post_quant_conv(quant))

    def codebook_entries(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B,h,w], or a square token sequence [B,h*w], -> code vectors [B,d,h,w]."""
        if codes.dim() == 2:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"token sequence of length {codes.shape[1]} is not a square grid")
            codes = codes.reshape(codes.shape[0], side, side)
        return self.quantize.entries(codes)

    def codebook_vectors(self) -> torch.Tensor:
        """The code vectors used for decoding, [codebook_size, embed_dim]."""
        return self.quantize.codebook()

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B,h,w] (or [B,h*w]) -> images [B,3,H,W] in [-1, 1] (unclamped)."""
        return self.decode(self.codebook_entries(codes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerLosses, torch.Tensor]:
        """Reconstruct: images -> (reconstruction, codebook losses, codes)."""
        quant, losses, codes = self.encode(x)
        return self.decode(quant), losses, codes

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def enable_gradient_checkpointing(self) -> None:
        self.decoder.gradient_checkpointing = True

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of `post_quant_conv` and the decoder: all that RankE's decoder stage trains."""
        return [*self.post_quant_conv.parameters(), *self.decoder.parameters()]

    def freeze_token_space(self) -> None:
        """Stop gradients into the encoder, `quant_conv` and codebook, so codes keep their meaning."""
        for module in (self.encoder, self.quant_conv, self.quantize):
            module.requires_grad_(False)
