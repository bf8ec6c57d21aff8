"""A small BEiT-3/VLMo-style vision-language transformer, modality-specific or modality-agnostic.

The **modality-specific** model (`MultiwayVLModel`, Sung et al.'s "all_moe") has, in every
block, its own self-attention (``qkv``, ``q_bias``, ``v_bias``, ``proj``), FFN (``fc1``,
``fc2``) and LayerNorms (``norm1``, ``norm2``) per modality: ``v`` for image tokens, ``l`` for
text tokens. Its top ``vl_layers`` blocks add a third expert ``vl`` that takes every token of
a fused image-text input. The **modality-agnostic** model (`SharedVLModel`) has one set of
those weights per block, used by every token. Both share the embeddings (patch, word,
positions, token types), one relative-position table, the layer-scale vectors ``gamma_1``,
``gamma_2`` of each block and the final norm, so folding the first into the second only
rewrites names: ``blocks.3.mlp.v.fc1.weight`` -> ``blocks.3.mlp.fc1.weight`` (FOLD_GROUPS).

Routing (our reading of their `Block.moe_forward`): a token's query, key and value come from
its own modality's attention expert, attention then runs over the whole sequence, and the
output projection, norms and FFN are again its modality's. An image-only input uses ``v``
everywhere, a text-only input ``l``, a fused input ``v``/``l`` per token below the top blocks
and ``vl`` for all tokens in them. Every expert's nn.Linear therefore sees exactly its own
tokens, so forward hooks on named modules measure per-modality statistics.

Sequence layout: text tokens, then the image's class token and patches.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MULTIWAY_TYPE = "pivotmerge_multiway_vl"
SHARED_TYPE = "pivotmerge_shared_vl"
VISION, LANGUAGE, FUSED = "v", "l", "vl"
IMAGE_TOKEN, TEXT_TOKEN = 0, 1

# Folding table: each modality's tensors map onto the shared model's names by dropping the modality.
FOLD_GROUPS: dict[str, dict[str, object]] = {
    m: {"pattern": rf"\.(attn|norm1|norm2|mlp)\.{m}\.", "replace": r".\1.", "required": m != FUSED}
    for m in (VISION, LANGUAGE, FUSED)
}
# The parts each block splits per modality, for `pivotmerge inspect`.
PARTS = {"attention": ("attn",), "ffn": ("mlp",), "layernorm": ("norm1", "norm2")}


class VLTransformerConfig(PretrainedConfig):
    """Sizes of the tiny vision-language transformer (both variants)."""

    model_type = SHARED_TYPE

    hidden_size: int = 32
    num_layers: int = 4
    num_heads: int = 2
    mlp_ratio: float = 2.0
    image_size: int = 16
    patch_size: int = 4
    num_channels: int = 3
    vocab_size: int = 32
    max_text_len: int = 12
    vl_layers: int = 2  # top blocks with the fused (vl) expert
    layer_scale_init: float = 0.1
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_positions(self) -> int:
        return self.max_text_len + 1 + self.num_patches


class SharedVLConfig(VLTransformerConfig):
    model_type = SHARED_TYPE


class MultiwayVLConfig(VLTransformerConfig):
    model_type = MULTIWAY_TYPE


class Attention(nn.Module):
    """One expert's attention weights: BEiT's bias-free ``qkv`` with separate q and v biases (k has none)."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x) + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def _routed(part: nn.Module, x: torch.Tensor, route: torch.Tensor | None, experts: tuple[str, ...],
            call: str = "forward") -> torch.Tensor:
    """Apply `part` to every token: a shared module at once, a ModuleDict expert by expert on its own tokens."""
    if not isinstance(part, nn.ModuleDict):
        return getattr(part, call)(x)
    assert route is not None
    pieces = {i: getattr(part[m], call)(x[route == i]) for i, m in enumerate(experts) if bool((route == i).any())}
    width = next(iter(pieces.values())).shape[-1]
    out = x.new_zeros(*x.shape[:-1], width)
    for i, y in pieces.items():
        out[route == i] = y
    return out


class Block(nn.Module):
    """A pre-norm transformer block; `experts` None for the shared variant, else the modality names."""

    def __init__(self, config: VLTransformerConfig, experts: tuple[str, ...] | None):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        hidden = int(d * config.mlp_ratio)
        self.experts = experts or ()
        self.heads = config.num_heads

        def per_expert(make):
            return nn.ModuleDict({m: make() for m in experts}) if experts else make()

        self.norm1 = per_expert(lambda: nn.LayerNorm(d, eps=eps))
        self.attn = per_expert(lambda: Attention(d))
        self.norm2 = per_expert(lambda: nn.LayerNorm(d, eps=eps))
        self.mlp = per_expert(lambda: Mlp(d, hidden))
        self.gamma_1 = nn.Parameter(torch.full((d,), config.layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((d,), config.layer_scale_init))

    def forward(self, x: torch.Tensor, route: torch.Tensor | None, position_bias: torch.Tensor,
                key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = _routed(self.norm1, x, route, self.experts)
        qkv = _routed(self.attn, h, route, self.experts, "project")
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).unbind(2)
        scores = torch.einsum("bqhc,bkhc->bhqk", q, k) / (d // self.heads) ** 0.5 + position_bias
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        mixed = torch.einsum("bhqk,bkhc->bqhc", scores.softmax(-1), v).reshape(b, n, d)
        x = x + self.gamma_1 * _routed(self.attn, mixed, route, self.experts, "output")
        return x + self.gamma_2 * _routed(self.mlp, _routed(self.norm2, x, route, self.experts), route, self.experts)


class VLPreTrainedModel(PreTrainedModel):
    config_class = VLTransformerConfig
    base_model_prefix = "vl"
    multiway = False

    def __init__(self, config: VLTransformerConfig):
        super().__init__(config)
        d = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, d, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.word_embed = nn.Embedding(config.vocab_size, d)
        self.image_pos = nn.Parameter(torch.zeros(1, 1 + config.num_patches, d))
        self.text_pos = nn.Parameter(torch.zeros(1, config.max_text_len, d))
        self.token_type = nn.Embedding(2, d)
        # One relative-position table for all blocks: a bias per head and offset within the longest sequence.
        self.rel_pos = nn.Parameter(torch.zeros(2 * config.max_positions - 1, config.num_heads))
        top = config.num_layers - config.vl_layers
        self.blocks = nn.ModuleList([
            Block(config, ((VISION, LANGUAGE, FUSED) if i >= top else (VISION, LANGUAGE)) if self.multiway else None)
            for i in range(config.num_layers)])
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, VLPreTrainedModel):
            for p in (module.cls_token, module.image_pos, module.text_pos):
                nn.init.trunc_normal_(p, std=std)
            nn.init.zeros_(module.rel_pos)
        elif isinstance(module, Block):
            nn.init.constant_(module.gamma_1, self.config.layer_scale_init)
            nn.init.constant_(module.gamma_2, self.config.layer_scale_init)
        elif isinstance(module, Attention):
            nn.init.zeros_(module.q_bias)
            nn.init.zeros_(module.v_bias)

    def embed(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None,
              attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token embeddings, each token's type and the key mask of the text-then-image sequence."""
        parts, types, masks = [], [], []
        if input_ids is not None:
            t = input_ids.shape[1]
            parts.append(self.word_embed(input_ids) + self.text_pos[:, :t] + self.token_type.weight[TEXT_TOKEN])
            types.append(torch.full_like(input_ids, TEXT_TOKEN))
            masks.append(attention_mask.bool() if attention_mask is not None
                         else torch.ones_like(input_ids, dtype=torch.bool))
        if pixel_values is not None:
            patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
            image = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], 1)
            parts.append(image + self.image_pos + self.token_type.weight[IMAGE_TOKEN])
            shape = image.shape[:2]
            types.append(torch.full(shape, IMAGE_TOKEN, dtype=torch.long, device=image.device))
            masks.append(torch.ones(shape, dtype=torch.bool, device=image.device))
        if not parts:
            raise ValueError("pass pixel_values, input_ids or both")
        return torch.cat(parts, 1), torch.cat(types, 1), torch.cat(masks, 1)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_: object) -> BaseModelOutputWithPooling:
        x, types, key_mask = self.embed(pixel_values, input_ids, attention_mask)
        n = x.shape[1]
        offsets = torch.arange(n, device=x.device)
        offset_index = (offsets[None, :] - offsets[:, None]) + self.config.max_positions - 1
        position_bias = self.rel_pos[offset_index].permute(2, 0, 1)
        fused = pixel_values is not None and input_ids is not None
        top = self.config.num_layers - self.config.vl_layers
        for i, block in enumerate(self.blocks):
            # Expert index per token, in the block's expert order (v, l[, vl]).
            route = (torch.full_like(types, 2) if fused and i >= top else torch.where(types == IMAGE_TOKEN, 0, 1)) \
                if self.multiway else None
            x = block(x, route, position_bias, key_mask)
        x = self.norm(x)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x[:, 0])


class SharedVLModel(VLPreTrainedModel):
    """The modality-agnostic transformer: one set of block weights for every token."""

    config_class = SharedVLConfig


class MultiwayVLModel(VLPreTrainedModel):
    """The modality-specific transformer: per-modality attention, FFN and norms in every block."""

    config_class = MultiwayVLConfig
    multiway = True


def seed_state(shared: Mapping[str, torch.Tensor], config: VLTransformerConfig) -> dict[str, torch.Tensor]:
    """The modality-specific model's weights with every expert a copy of the shared model's block
    weights (the seed), as their `use_vision_weights_for_other_modalities` does."""
    top = config.num_layers - config.vl_layers
    out = {}
    for name, tensor in shared.items():
        parts = name.split(".")
        if parts[0] == "blocks" and parts[2] in ("attn", "norm1", "norm2", "mlp"):
            experts = (VISION, LANGUAGE, FUSED) if int(parts[1]) >= top else (VISION, LANGUAGE)
            for m in experts:
                out[".".join(parts[:3] + [m] + parts[3:])] = tensor.clone()
        else:
            out[name] = tensor.clone()
    return out


AutoConfig.register(MULTIWAY_TYPE, MultiwayVLConfig)
AutoConfig.register(SHARED_TYPE, SharedVLConfig)
AutoModel.register(MultiwayVLConfig, MultiwayVLModel)
AutoModel.register(SharedVLConfig, SharedVLModel)
