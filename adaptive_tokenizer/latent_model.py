"""Latent-distillation encoder and decoder: pre-norm ViT stacks over 2D and 1D tokens.

Shapes use N = images, G2 = 2D tokens (grid_size**2), L = 1D latent tokens, W = width, D = token vector size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import ModelConfig


class Attention(nn.Module):
    """Multi-head self-attention with a packed q/k/v projection, computed by ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(out, "n h l d -> n l (h d)"))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, attn_mask)
        return x


class LatentEncoder(nn.Module):
    """Encoder side: embeds the image, runs the shared transformer, maps latents to token vectors.

    The sequence at rollout iteration t is ``[class, G2 image tokens, (t+1) * T latent tokens]``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        width, grid_tokens = config.encoder_width, config.num_image_tokens
        self.patch_embed = nn.Conv2d(3, width - config.base.z_channels, config.patch_size, config.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + grid_tokens, width))
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.latent_tokens = nn.Parameter(torch.zeros(config.tokens_per_iteration, width))
        self.latent_positional_embedding = nn.Parameter(torch.zeros(config.tokens_per_iteration, width))
        self.iteration_embedding = nn.Parameter(
            torch.zeros(config.max_iterations, config.tokens_per_iteration, width))
        self.norm_pre = nn.LayerNorm(width)
        self.norm_post = nn.LayerNorm(width)
        self.norm_recursive = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.encoder_layers, config.encoder_heads, config.mlp_ratio)
        self.to_token = nn.Linear(width, config.token_dim) if config.factorize_latent else nn.Identity()

    def embed_image(self, pixels: Tensor, base_features: Tensor) -> Tensor:
        """``[N,3,R,R]`` pixels + ``[N,C,g,g]`` base features -> ``[N, 1+G2, W]`` (class token first)."""
        tokens = torch.cat([base_features, self.patch_embed(pixels)], dim=1).flatten(2).transpose(1, 2)
        tokens = F.normalize(tokens, dim=-1)
        class_token = self.class_embedding.expand(tokens.shape[0], 1, -1)
        return torch.cat([class_token, tokens], dim=1) + self.positional_embedding

    def latent_block(self, iteration: int) -> Tensor:
        """The T learned latent tokens appended at ``iteration``: ``[T, W]``."""
        return (self.latent_tokens + self.latent_positional_embedding) + self.iteration_embedding[iteration]

    def halted_image_tokens(self) -> Tensor:
        """What a halted 2D token becomes: its positional embedding plus the mask token, ``[G2, W]``."""
        return self.positional_embedding[1:] + self.mask_token

    def to_token_vectors(self, latents: Tensor) -> Tensor:
        """Encoder output latents ``[N, L, W]`` -> token vectors ``[N, L, D]`` (before quantization)."""
        return self.to_token(self.norm_post(latents))


class LatentDecoder(nn.Module):
    """Decoder side: ``[N, L, D]`` token vectors -> ``[N, G2, base codebook size]`` logits.

    The 2D queries (class token + one mask token per grid cell + positions) carry no image information;
    they are the same for every image.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        width, grid_tokens = config.decoder_width, config.num_image_tokens
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + grid_tokens, width))
        self.latent_embed = nn.Linear(config.token_dim, width) if config.factorize_latent else nn.Identity()
        self.latent_positional_embedding = nn.Parameter(torch.zeros(config.decoder_max_latent_tokens, width))
        self.norm_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.decoder_layers, config.decoder_heads, config.mlp_ratio)
        self.norm_post = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, config.base.codebook_size))
        self.num_image_tokens = grid_tokens

    def queries(self) -> Tensor:
        """``[1+G2, W]``: class token and mask tokens plus positions."""
        tokens = torch.cat([self.class_embedding[None], self.mask_token.expand(self.num_image_tokens, -1)])
        return tokens + self.positional_embedding

    def forward(self, token_vectors: Tensor) -> Tensor:
        latents = self.latent_embed(token_vectors)
        latents = latents + self.latent_positional_embedding[: latents.shape[1]]
        queries = self.queries().to(latents.dtype).expand(latents.shape[0], -1, -1)
        x = self.transformer(self.norm_pre(torch.cat([queries, latents], dim=1)))
        return self.head(self.norm_post(x[:, 1 : 1 + self.num_image_tokens]))
