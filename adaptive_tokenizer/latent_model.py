"""Latent-distillation encoder and decoder: pre-norm ViT stacks over 2D and 1D tokens.

Shapes use N = images, G2 = 2D tokens (grid_size**2), L = 1D latent tokens, W = width, D = token vector size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import ModelConfig


class KVCache:
    """Keys and values of every layer for the positions encoded so far (cached rollout).

    Storage is allocated once for ``capacity`` positions: ``[N, heads, capacity, head_dim]`` per layer.
    ``length`` positions are valid; a forward pass with a cache writes its new positions after them.
    """

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0

    def extend(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new keys/values after the valid ones; return all of them."""
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length : end] = keys
        self.values[layer][:, :, self.length : end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, rows: Tensor) -> None:
        """Keep only the images ``rows`` (batch compaction)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


class Attention(nn.Module):
    """Multi-head self-attention with a packed q/k/v projection, computed by ``scaled_dot_product_attention``.

    ``attn_mask``: bool, True where a query may attend to a key, broadcastable to ``[N, heads, Lq, Lk]``.
    With a ``cache``, the keys/values of ``x`` are appended to those of earlier positions and the queries of
    ``x`` attend to all of them.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.heads)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
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

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """``[N, L, W]`` -> ``[N, L, W]``. With a cache, ``x`` holds only the new positions (see KVCache)."""
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask, cache, layer)
        if cache is not None:
            cache.length += x.shape[1]
        return x

    def new_cache(self, batch: int, capacity: int, like: Tensor) -> KVCache:
        attn = self.blocks[0].attn
        width = attn.proj.in_features
        return KVCache(len(self.blocks), batch, attn.heads, capacity, width // attn.heads, like.device, like.dtype)


class LatentEncoder(nn.Module):
    """Encoder side: embeds the image, runs the shared transformer, maps latents to token vectors.

    The sequence at rollout iteration t is ``[class, G2 image tokens, (t+1) * T latent tokens]``.

    ``rollout="recurrent"`` (the authors'): every iteration re-encodes the whole sequence, with the previous
    iteration's outputs as inputs (re-normalised by ``norm_recursive``). ``rollout="cached"``: one block-causal
    pass over ``norm_pre([prefix, block 0, ..., block t])``, where the prefix and block 0 attend to each other
    and block t attends to everything before it and to itself; iteration t then costs one block of tokens
    (see :func:`block_causal_mask` and ``rollout.py``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        width, grid_tokens = config.encoder_width, config.num_image_tokens
        self.tokens_per_iteration = config.tokens_per_iteration
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
        self.norm_recursive = nn.LayerNorm(width) if config.rollout == "recurrent" else None
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
        """What a halted 2D token becomes (recurrent rollout): positional embedding plus mask token, ``[G2, W]``."""
        return self.positional_embedding[1:] + self.mask_token

    def to_token_vectors(self, latents: Tensor) -> Tensor:
        """Encoder output latents ``[N, L, W]`` -> token vectors ``[N, L, D]`` (before quantization)."""
        return self.to_token(self.norm_post(latents))

    def forward_block_causal(self, prefix: Tensor, num_iterations: int, halted: Tensor | None = None) -> Tensor:
        """Cached-rollout encoder in one pass (the training-time forward).

        ``prefix``: ``[N, 1+G2, W]`` from :meth:`embed_image`. ``halted``: optional bool ``[N, I, G2]``, the 2D
        tokens masked out of the keys of block t's queries (halting decided after iterations < t; row 0 is
        ignored). Returns the latents of all ``I * T`` tokens, ``[N, I*T, W]``, equal to what iterations
        ``0..I-1`` of the cached rollout produce.
        """
        blocks = torch.cat([self.latent_block(t) for t in range(num_iterations)])
        x = self.norm_pre(torch.cat([prefix, blocks.expand(prefix.shape[0], -1, -1)], dim=1))
        mask = block_causal_mask(prefix.shape[1], self.tokens_per_iteration, num_iterations, halted, x.device)
        return self.transformer(x, mask)[:, prefix.shape[1] :]


def block_causal_mask(num_prefix: int, tokens_per_iteration: int, num_iterations: int,
                      halted: Tensor | None = None, device: torch.device | None = None) -> Tensor:
    """Bool attention mask (True = may attend) of the cached rollout, ``[1 or N, 1, S, S]``.

    Chunk 0 is the prefix (class + 2D tokens) with latent block 0; chunk t >= 1 is latent block t. A query in
    chunk c attends to keys in chunks <= c, except the 2D tokens ``halted[:, c]`` (see forward_block_causal).
    """
    total = num_prefix + tokens_per_iteration * num_iterations
    chunk = torch.zeros(total, dtype=torch.long, device=device)
    chunk[num_prefix:] = torch.arange(num_iterations, device=device).repeat_interleave(tokens_per_iteration)
    mask = (chunk[None, :] <= chunk[:, None])[None, None]
    if halted is not None:
        key_halted = torch.zeros(halted.shape[0], num_iterations, total, dtype=torch.bool, device=device)
        key_halted[:, 1:, 1:num_prefix] = halted[:, 1:num_iterations].to(device)
        mask = mask & ~key_halted[:, chunk][:, None]  # row q uses the halting of its own chunk
    return mask


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

    def normed_queries(self) -> Tensor:
        """``[1+G2, W]``: class token and mask tokens plus positions, after ``norm_pre`` (image-independent)."""
        tokens = torch.cat([self.class_embedding[None], self.mask_token.expand(self.num_image_tokens, -1)])
        return self.norm_pre(tokens + self.positional_embedding)

    def forward(self, token_vectors: Tensor, normed_queries: Tensor | None = None) -> Tensor:
        """``normed_queries``: :meth:`normed_queries`, computed once by callers that decode repeatedly."""
        queries = self.normed_queries() if normed_queries is None else normed_queries
        latents = self.latent_embed(token_vectors)
        latents = self.norm_pre(latents + self.latent_positional_embedding[: latents.shape[1]])
        x = torch.cat([queries.to(latents.dtype).expand(latents.shape[0], -1, -1), latents], dim=1)
        x = self.transformer(x)
        return self.head(self.norm_post(x[:, 1 : 1 + self.num_image_tokens]))
