"""The mmdlm transformer: one network over text and VQ image tokens.

A pre-norm decoder-style stack in the LLaMA recipe (RMSNorm, rotary positions, SwiGLU MLP, optional
QK-norm), written in the spirit of nanoGPT (Karpathy) and litgpt. With `causal=False` it is the
bidirectional denoiser of masked diffusion (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025; MaskGIT,
Chang et al. 2022 for images); with `causal=True` the same parameters make the autoregressive baseline,
which decodes with a KV cache.

What the founding measurements (BENCHMARKS.md, last section) asked for, on top of the plain recipe:
- a learned 2D position embedding (row + column) added at image positions (`image_index >= 0`), so a
  token knows where it sits in the image grid and not only in the 1D sequence (RoPE);
- a modality embedding (text vs image position);
- codebook-projected image embeddings (`set_codebook`): the embedding of image id `i` is
  `tok_emb[i] + code_proj(codebook[i - image_offset])`, so a code's colour is visible from step 1
  instead of learned from hundreds of sightings. With a tied head the same table scores the output,
  so codes that look alike also get alike logits.

The model is not conditioned on the diffusion time t (MDLM/LLaDA show it is not needed).

The fields that let a transformers causal LM be loaded exactly (`mmdlm.hf_import`: Llama, Qwen2, Qwen3) default
to the plain recipe: grouped-query attention (`n_kv_head`, Ainslie et al. 2023), an explicit head size and MLP
width, biases on q/k/v (Qwen2) and scaled RoPE frequencies (`rope_scaling`: linear, Llama 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    """Transformer hyper-parameters. Defaults are the tiny CPU model of the shapes world.

    The architecture fields are a recipe's choice; the run-time ones (`vocab_size`, `max_seq_len`, `mask_id`,
    `image_tokens`, `image_grid`, `codebook_size`, `image_offset`, `codebook_dim`) come from the data's
    tokenizers (`LitMDM.configure_model` fills them). `vocab_size` 0 marks a config not filled yet: the checks
    that need the run-time fields wait for them.
    """

    vocab_size: int = 0  # Vocab.size: text ids + image codes + specials (0: not filled from the data yet)
    n_layer: int = 4  # a small model runs more steps in a CPU budget (BENCHMARKS.md, "Founding measurements")
    n_head: int = 4  # head dim 32 at d=128: enough for RoPE, cheap on CPU
    n_embd: int = 128  # d=128 runs 3-4x more steps than d=256 in the same CPU time (BENCHMARKS.md)
    max_seq_len: int = 256  # longest template (VQA with 3 QA pairs at 64 image tokens) is ~142
    causal: bool = False  # False: masked-diffusion denoiser; True: the AR baseline with the same parameters
    qk_norm: bool = True  # RMS-normalised q/k keep attention logits bounded: tolerates higher learning rates
    tie_head: bool = False  # True: output = embedding table (fewer parameters, codebook structure in all
    #   logits). Untied by default, the head every recipe trains: tying the text rows slowed a tiny model's
    #   text answers (tests/test_learning.py) and kept prompt binding at chance; `head_codebook` gives the
    #   image rows the codebook structure instead (BENCHMARKS.md, "Output heads"). LitMDM takes this default.
    head_codebook: bool = False  # untied head whose image rows also get the codebook projection: code
    #   structure in the image logits (a code's colour shared by all codes of that colour) while text keeps
    #   its own free rows (tying text rows slowed a tiny model's text answers: tests/test_learning.py)
    dropout: float = 0.0  # tiny models on synthetic data underfit: no regulariser needed
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * d: the parameter count of a 4x GELU MLP
    rope_base: float = 10000.0  # the usual RoPE base; sequences are short
    mask_positions: bool = False  # a masked text token's embedding also gets a learned absolute position:
    #   a fully masked text region is a run of identical <mask> tokens, and RoPE alone (relative) gives
    #   a bidirectional model no cheap way to tell its slots apart ("am I the colour word?"); a causal
    #   model reads that off its prefix. Templates fix every region's place, so the index names the
    #   slot. Only masks get it: clean text (prompts, questions) embeds as before, and adding positions
    #   to all text slowed text-to-image colour to chance (BENCHMARKS.md, "mask positions").
    mask_id: int = -1  # the <mask> id (Vocab.mask); mask_positions needs it
    shift_logits: bool = False  # bidirectional calls read position i's logits from the hidden state at
    #   i - 1, as a causal LM's next-token head does (Dream / DiffuLLaMA's AR-to-diffusion adaptation):
    #   the same weights then serve an AR objective (causal calls, unshifted) and the masked-diffusion one,
    #   and an AR checkpoint's head is reused as is. Position 0 (a task token, never a target) reads itself.
    prefix_attention: bool = False  # LaViDa's Prefix-DLM mask: the prompt (positions before a row's `prefix`,
    #   the image + question, the caption) attends only to itself, never to the generated region. Its keys and
    #   values then do not change while the target is decoded, so a sampler computes them once per request and
    #   reuses them exactly at every step. Must match training: a model trained without it reads
    #   its prompt through the targets' masks. Causal calls ignore it (causal already hides the future). With
    #   shift_logits the prompt's last position, which predicts the first target, is not hidden from the rest.
    block_diffusion: bool = False  # trained as block diffusion (BD3-LM): targets cut into blocks (`mmdlm.blocks`),
    #   bidirectional inside a block, causal across blocks; each block learned given the clean ones before it
    block_size: int = 0  # tokens per text block (0: a text region is one block)
    image_block_rows: int = 0  # grid rows per image block (0: an image is one block)
    image_tokens: int = 0  # N = h*w image tokens; > 0 turns on the learned 2D image-position embedding
    image_grid: tuple[int, int] = (0, 0)  # (h, w) of the VQ grid; (0, 0) = square; either field is enough
    codebook_size: int = 0  # K: number of VQ codes (Vocab.codebook_size); used by the codebook projection
    image_offset: int = 0  # token id of image code 0 (Vocab.image_offset)
    codebook_dim: int = 0  # e: VQ code vector size; 0 turns the codebook projection off
    norm_eps: float = 1e-5  # RMSNorm epsilon (LLaMA)
    init_std: float = 0.02  # nanoGPT / GPT-2 initialisation
    # what an imported transformers causal LM needs (`mmdlm.hf_import`); the defaults are the plain recipe
    n_kv_head: int = 0  # key/value heads, shared by groups of query heads (GQA); 0 = n_head (one per query head)
    head_size: int = 0  # dimension of one head; 0 = n_embd // n_head (Qwen3 sets it apart from the width)
    attn_bias: bool = False  # biases on q, k and v (Qwen2); the output projection has none
    mlp_hidden_size: int = 0  # SwiGLU hidden width; 0 = from mlp_ratio (`mlp_hidden`)
    rope_scaling: dict[str, Any] | None = None  # transformers' RoPE scaling, e.g. {"rope_type": "llama3",
    #   "factor": 8.0, ...}; None = plain RoPE. Types: those of ROPE_SCALING

    def __post_init__(self) -> None:
        if self.head_size < 0 or self.n_kv_head < 0 or self.mlp_hidden_size < 0:
            raise ValueError(f"head_size, n_kv_head and mlp_hidden_size must be >= 0, got {self.head_size}, "
                             f"{self.n_kv_head}, {self.mlp_hidden_size}")
        if self.head_size == 0 and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError("RoPE needs an even head dimension")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        rope_type(self.rope_scaling)  # ValueError for a type not in ROPE_SCALING
        self.image_grid = tuple(self.image_grid)  # YAML / json give lists
        if self.image_tokens == 0 and self.image_grid != (0, 0):
            self.image_tokens = self.image_grid[0] * self.image_grid[1]
        if self.image_tokens > 0:
            h, w = self.image_grid
            if h == 0 and w == 0:
                side = math.isqrt(self.image_tokens)
                if side * side != self.image_tokens:
                    raise ValueError(f"image_tokens={self.image_tokens} is not a square: give image_grid")
                self.image_grid = (side, side)
            elif h * w != self.image_tokens:
                raise ValueError(f"image_grid {self.image_grid} does not hold "
                                 f"image_tokens={self.image_tokens}")
        if self.block_size < 0 or self.image_block_rows < 0:
            raise ValueError(f"block_size and image_block_rows must be >= 0, got {self.block_size}, "
                             f"{self.image_block_rows}")
        if self.block_diffusion and self.causal:
            raise ValueError("block_diffusion is a masked-diffusion model's attention: it needs causal=False")
        if self.head_codebook and self.tie_head:
            raise ValueError("head_codebook needs an untied head (tie_head=False) and the codebook projection "
                             "(codebook_dim > 0); a tied head already has it")
        if self.vocab_size > 0:
            self.check_run_time_fields()

    def check_run_time_fields(self) -> None:
        """ValueError when the fields that come from the data do not fit the architecture."""
        if self.codebook_dim > 0:
            if self.codebook_size <= 0 or self.image_offset <= 0:
                raise ValueError("codebook_dim > 0 needs codebook_size and image_offset (from the Vocab)")
            if self.image_offset + self.codebook_size > self.vocab_size:
                raise ValueError("image ids [image_offset, image_offset + codebook_size) exceed vocab_size")
        if self.mask_positions and not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_positions needs mask_id (Vocab.mask) in [0, {self.vocab_size}), "
                             f"got {self.mask_id}")
        if self.head_codebook and self.codebook_dim <= 0:
            raise ValueError("head_codebook needs an untied head (tie_head=False) and the codebook projection "
                             "(codebook_dim > 0); a tied head already has it")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads (`n_kv_head`, or one per query head)."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_size:
            return self.mlp_hidden_size
        hidden = int(2 * self.mlp_ratio * self.n_embd / 3)
        return 32 * math.ceil(hidden / 32)  # a multiple of 32 for matmul efficiency


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, for AR decoding.

    `k[i]`, `v[i]`: Float[B, KV, max_len, D] of layer i (KV: the key/value heads, `ModelConfig.kv_heads`);
    `pad`: Bool[B, max_len] (True = that cached position is not attended to); `length`: how many positions are
    filled.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pad: torch.Tensor
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.pad.shape[1]

    def reset(self) -> None:
        self.length = 0
        self.pad.zero_()

    def keep_rows(self, rows: torch.Tensor | slice, copies: int = 1) -> None:
        """Keep only these rows (Long[R] indices or a slice): the rows a sampler still decodes. With `copies` > 1 the
        cache holds that many equal blocks of rows (guidance's copies) and Long `rows` index each of them."""
        if copies > 1:
            held = len(self.pad) // copies  # rows per copy
            rows = torch.cat([rows + j * held for j in range(copies)])  # (copies * R,)
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        self.pad = self.pad[rows]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight in x's dtype: under bf16 autocast a bf16 x with the fp32 weight misses the fused kernel
        # (and returns fp32); measured on an H100, the d=768 training step is ~20% faster with the cast
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def _linear_rope(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """Position interpolation (Chen et al. 2023): every frequency divided by `factor`."""
    return inv_freq / p["factor"]


def _llama3_rope(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths longer than original_max_position_embeddings / low_freq_factor divided
    by `factor`, shorter than ... / high_freq_factor kept, the ones between interpolated (transformers'
    `_compute_llama3_parameters`, the same arithmetic)."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq  # (D/2,)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # (D/2,)
    smooth = (old_len / wavelen - low) / (high - low)  # (D/2,)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # (D/2,)
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)  # (D/2,)
    return torch.where(medium, smoothed, scaled)


# RoPE frequency scalings by transformers' `rope_type` name: inverse frequencies, parameters -> scaled ones
ROPE_SCALING: dict[str, Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]] = {
    "default": lambda inv_freq, p: inv_freq,
    "linear": _linear_rope,
    "llama3": _llama3_rope,
}


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The RoPE type a `rope_scaling` dict names ("default" for None; transformers 4 spelled the key "type");
    ValueError for one ROPE_SCALING does not hold."""
    name = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if name not in ROPE_SCALING:
        raise ValueError(f"RoPE type {name!r} is not supported (supported: {', '.join(ROPE_SCALING)})")
    return name


def rope_tables(max_len: int, head_dim: int, base: float,
                scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: Float[max_len, head_dim / 2] for rotary embeddings (Su et al. 2021), frequencies scaled as
    `scaling` says (`ROPE_SCALING`)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (D/2,)
    inv_freq = ROPE_SCALING[rope_type(scaling)](inv_freq, scaling or {})  # (D/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (L, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate x: (B, H, T, D) by rot: (cos, sin) pairs Float[B|1, 1, T, D/2, 2], pairing dims (2i, 2i+1) as
    Meta's LLaMA reference. Eager: one complex multiply (measured ~8x faster on CPU than rotate-half with
    real cos/sin); compiled: the same rotation in real arithmetic, which inductor fuses (it cannot
    generate code for complex operators and would fall back to eager for them)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, H, T, D/2, 2)
    if torch.compiler.is_compiling():
        x0, x1 = pairs.unbind(-1)  # (B, H, T, D/2) each
        cos, sin = rot.unbind(-1)  # (B|1, 1, T, D/2) each
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)
    xc = torch.view_as_complex(pairs)  # (B, H, T, D/2) complex
    return torch.view_as_real(xc * torch.view_as_complex(rot)).flatten(-2).type_as(x)  # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (H + 2 * KV) * D, bias=cfg.attn_bias)  # q, k, v in one matmul
        self.proj = nn.Linear(H * D, cfg.n_embd, bias=False)
        self.proj.residual = True  # scaled init (GPT-2): see Transformer._init_weights
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rot: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)  # (B, T, H*D), (B, T, KV*D) x 2
        q = self.q_norm(q.view(B, T, H, D)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(k.view(B, T, KV, D)).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        if kv is not None:  # append to the cache, attend to everything cached so far
            k_cache, v_cache = kv  # (B, KV, max_len, D)
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]  # (B, KV, S, D)
        if KV != H:  # grouped-query attention: query head h reads key/value head h // (H / KV)
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.proj(y)  # (B, T, C)


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020), as in LLaMA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)  # gate and up in one matmul
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.proj(F.silu(gate) * up)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rot: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rot, mask, is_causal, kv, start))
        return x + self.drop(self.mlp(self.norm2(x)))


def attention_blocks(block: torch.Tensor, shift: bool) -> torch.Tensor:
    """Long[B, S] attention blocks from token blocks: the same, or, for a model whose position i predicts token
    i + 1 (`shift_logits`), moved one position left, so the position that predicts a block's first token sits in
    that block (the row's last position keeps its own)."""
    if not shift:
        return block
    return torch.cat([block[:, 1:], block[:, -1:]], dim=1)  # (B, S)


def clean_positions(att: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of a row's clean copy in the two-stream forward: those of every block but the prompt (block 0,
    never noised: the noisy stream's copy serves) and the row's last block (no later block reads it). Returns
    (Long[B, C] positions in order, Bool[B, C] filler slots of rows with fewer than C) from Long[B, T] attention
    blocks and Bool[B, T] pads."""
    last = att.masked_fill(pad, 0).amax(1, keepdim=True)  # (B, 1)
    copy = (att > 0) & (att < last) & ~pad  # (B, T)
    C = int(copy.sum(1).max()) if copy.numel() else 0
    at = torch.argsort((~copy).to(torch.int8), dim=1, stable=True)[:, :C]  # (B, C): copied positions first
    filler = torch.arange(C, device=att.device)[None] >= copy.sum(1, keepdim=True)  # (B, C)
    return at, filler


def two_stream_mask(noisy: torch.Tensor, clean: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Bool[B, 1, T+C, T+C] attention of the two-stream training forward over [noisy | clean copy] (BD3-LM's block
    diffusion mask), from the Long[B, T] attention blocks of the noisy stream, the Long[B, C] ones of the clean
    copy (`clean_positions`) and Bool[B, T+C] pads, True = may attend:

        query, key:      noisy key                     clean key
        noisy query      same block, or the prompt     earlier blocks
        clean query      the prompt                    same or earlier blocks

    The prompt (block 0) is never noised, so its noisy copy is its clean one. Pad keys are hidden; every query
    sees itself."""
    T = noisy.shape[1]
    b2 = torch.cat([noisy, clean], 1)  # (B, T+C)
    stream = torch.arange(b2.shape[1], device=b2.device) >= T  # (T+C,) False = noisy, True = clean
    q, k = b2[:, :, None], b2[:, None, :]  # (B, T+C, 1), (B, 1, T+C)
    qs, ks = stream[None, :, None], stream[None, None, :]  # (1, T+C, 1), (1, 1, T+C)
    prompt = ~ks & (k == 0)  # (B, 1, T+C): the prompt's keys, in the noisy stream
    allowed = ((~qs & ~ks & (k == q)) | (~qs & ks & (k < q)) | (qs & ks & (k <= q)) | prompt) & ~pad[:, None, :]
    allowed = allowed | torch.eye(b2.shape[1], dtype=torch.bool, device=b2.device)  # every query sees itself
    return allowed.unsqueeze(1)  # (B, 1, T+C, T+C)


class Transformer(nn.Module):
    """Bidirectional (masked diffusion) or causal (AR baseline) transformer over the joint vocabulary."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = self.config = config
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size is 0: fill the run-time fields from the data's vocabulary first")
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.modality_emb = nn.Embedding(2, cfg.n_embd)  # 0: text position, 1: image position
        if cfg.image_tokens > 0:  # the last row of each is a zero "not an image position" entry
            h, w = cfg.image_grid
            self.row_emb = nn.Embedding(h + 1, cfg.n_embd, padding_idx=h)
            self.col_emb = nn.Embedding(w + 1, cfg.n_embd, padding_idx=w)
        else:
            self.row_emb = self.col_emb = None
        if cfg.codebook_dim > 0:
            self.code_proj = nn.Linear(cfg.codebook_dim, cfg.n_embd, bias=False)
            # zeros until set_codebook: the projection then adds nothing. Saved with the weights.
            self.register_buffer("codebook", torch.zeros(cfg.codebook_size, cfg.codebook_dim))
        else:
            self.code_proj = None
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.mask_positions else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = None if cfg.tie_head else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = self.rope_buffers()
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (L, D/2)
        self._compiled_blocks: tuple[nn.Module, ...] = ()  # `compile_for_training`; a tuple: not submodules
        self._tables: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # `tables` without autograd
        # recompute each block's activations in the backward pass instead of keeping them (training forwards
        # with autograd only): memory for time, for models too large to train otherwise; same gradients
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    def rope_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables `rope_cos`, `rope_sin` (Float[max_seq_len, head_dim / 2]) from the config: non-persistent
        buffers, never saved, so a model built on the meta device and then loaded (transformers) recomputes them."""
        cfg = self.config
        return rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_base, cfg.rope_scaling)

    def _init_weights(self, module: nn.Module) -> None:
        """nanoGPT: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    # ---- codebook-projected image embeddings ---------------------------------------------------
    @torch.no_grad()
    def set_codebook(self, vectors: torch.Tensor) -> None:
        """Store the VQ codebook (Float[K, e]) that image-token embeddings are projected from.

        The vectors are standardised per dimension (zero mean, unit variance) so the projection's
        initial scale does not depend on the VQ latent scale: with N(0, 0.02) weights its output has
        std 0.02 * sqrt(e), a little above the random token embedding it is added to.
        """
        if self.code_proj is None:
            raise ValueError("set_codebook needs ModelConfig.codebook_dim > 0")
        expected = (self.config.codebook_size, self.config.codebook_dim)
        if tuple(vectors.shape) != expected:
            raise ValueError(f"codebook must be {expected} (codebook_size, codebook_dim), "
                             f"got {tuple(vectors.shape)}")
        vectors = vectors.float()
        std = vectors.std(dim=0, keepdim=True).clamp_min(1e-6) if vectors.shape[0] > 1 else 1.0
        self.codebook.copy_((vectors - vectors.mean(dim=0, keepdim=True)) / std)

    def _with_codes(self, table: torch.Tensor) -> torch.Tensor:
        """Float[V, C]: `table` with the codebook projection added to its image rows."""
        if self.code_proj is None:
            return table
        lo, hi = self.config.image_offset, self.config.image_offset + self.config.codebook_size
        codes = self.code_proj(self.codebook.to(table.dtype))  # (K, C)
        return torch.cat([table[:lo], table[lo:hi] + codes, table[hi:]], dim=0)  # (V, C)

    def embedding_table(self) -> torch.Tensor:
        """Float[V, C]: the input embedding of every id (and the output head when tied)."""
        return self._with_codes(self.tok_emb.weight)

    def head_table(self, embedding: torch.Tensor) -> torch.Tensor:
        """Float[V, C]: the output head's rows (`embedding`, the input table, when tied)."""
        if self.lm_head is None:
            return embedding
        return self._with_codes(self.lm_head.weight) if self.config.head_codebook else self.lm_head.weight

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding Float[V, C], head Float[V, C]). Without autograd (sampling, evaluation) both are kept
        between calls until a tensor they are built from changes (its identity, dtype or in-place version:
        an optimizer step, an EMA swap, `load_state_dict`, `.to()`), so a decoding step does not rebuild the
        codebook projection every call (a large share of a batch-1 step)."""
        if torch.is_grad_enabled():
            embedding = self.embedding_table()
            return embedding, self.head_table(embedding)
        sources = [self.tok_emb.weight, *(m.weight for m in (self.lm_head, self.code_proj) if m is not None)]
        if self.code_proj is not None:
            sources.append(self.codebook)
        key = tuple((id(t), t._version, t.dtype, t.device) for t in sources)
        if self._tables is None or self._tables[0] != key:
            embedding = self.embedding_table()
            self._tables = (key, embedding, self.head_table(embedding))
        return self._tables[1], self._tables[2]

    # ---- compilation ---------------------------------------------------------------------------------
    def compile_for_training(self) -> None:
        """`torch.compile` the blocks for the training forward only (grad enabled, train mode).

        One compiled graph serves every block (torchtitan compiles per block too): a fraction of the
        whole-model compile time, and no graph break at `logits_at`'s data-dependent shape. Sampling,
        validation and KV-cache decoding stay eager: their shapes change every call, and each new shape
        would cost a recompile. Parameters and state_dict keys are unchanged (the compiled wrappers are
        not registered as submodules).
        """
        self._compiled_blocks = tuple(torch.compile(block) for block in self.blocks)

    # ---- KV cache ----------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for AR decoding of up to `max_len` positions (default: max_seq_len)."""
        cfg = self.config
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds max_seq_len={cfg.max_seq_len}")
        ref = self.tok_emb.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        return KVCache(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
            pad=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
        )

    # ---- forward -------------------------------------------------------------------------------------
    def _attention_mask(self, key_pad: torch.Tensor | None, start: int, T: int, device: torch.device,
                        causal: bool, prefix: torch.Tensor | None = None,
                        block: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
        """(mask Bool[B|1, 1, T, S] with True = may attend, or None; is_causal) for SDPA.

        Queries are positions start..start+T-1, keys 0..S-1 with S = start + T. Pad keys are hidden;
        causal hides the future; `prefix` (Long[B], prefix attention) hides keys at or after a row's prefix
        from the queries before it; `block` (Long[B, S], attention blocks) lets a query see the keys of its
        own block and of the blocks before it (block diffusion). A query always sees itself, so no row is
        all-masked (which would make SDPA return NaN): this only matters for pad queries, whose outputs
        nobody reads.
        """
        if key_pad is None and start == 0 and prefix is None and block is None:
            return None, causal  # the fast paths: full or plain causal attention
        S = start + T
        q_pos = torch.arange(start, S, device=device)  # (T,)
        k_pos = torch.arange(S, device=device)  # (S,)
        allowed = torch.ones(1, T, S, dtype=torch.bool, device=device)  # (1, T, S)
        if key_pad is not None:
            allowed = allowed & ~key_pad[:, None, :]  # (B, T, S)
        if causal:
            allowed = allowed & (k_pos[None, :] <= q_pos[:, None])  # (B, T, S)
        elif prefix is not None:  # Prefix-DLM: a prompt query sees the prompt only
            p = prefix[:, None, None]  # (B, 1, 1)
            allowed = allowed & ~((q_pos[None, :, None] < p) & (k_pos[None, None, :] >= p))  # (B, T, S)
        elif block is not None:  # block-causal: bidirectional inside a block, causal across blocks
            allowed = allowed & (block[:, None, :S] <= block[:, start:S, None])  # (B, T, S)
        allowed = allowed | (k_pos[None, :] == q_pos[:, None])  # every query sees itself
        return allowed.unsqueeze(1), False  # (B, 1, T, S)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None, cache: KVCache | None = None, *,
                pos: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                causal: bool | None = None, prefix: torch.Tensor | None = None,
                block: torch.Tensor | None = None, clean: torch.Tensor | None = None) -> torch.Tensor:
        """Logits Float[B, T, V] for ids Long[B, T] (Float[M, V] with `logits_at`).

        Args:
            ids: token ids (masked positions hold `vocab.mask`).
            pad: Bool[B, T], True = this position is not attended to by any query (pads may sit
                anywhere). None = no pads.
            image_index: Long[B, T], -1 at text positions, else the raster index in the image grid.
            cache: a `KVCache` from `new_cache`: the T new positions continue at `cache.length`
                (RoPE positions included), are appended, and attend to everything cached (causal
                model: to the past only). Equals the no-cache forward.
            pos: Long[B, T] RoPE positions; default `arange(T)` (+ `cache.length`). Keyword only.
            logits_at: Bool[B, T]: score only these positions and return Float[M, V], M = logits_at.sum(),
                in row-major order (= `logits[logits_at]` of the full output). Training needs logits only
                at masked targets: the head is ~20% of a tiny model's per-token FLOPs. Keyword only.
            causal: attend causally in this call (default: `config.causal`): a bidirectional model trained
                on the AR objective too (`shift_logits`). Causal calls are never shifted. Keyword only.
            prefix: Long[B], each row's prompt length (`Batch.prefix`); read only by a model built with
                `prefix_attention` (then positions before it see only each other), ignored otherwise, so
                callers pass it whatever the model. Absolute positions: with a cache too. Keyword only.
            block: Long[B, S] token blocks (`mmdlm.blocks.token_blocks`) over the whole row (absolute positions,
                S >= cache.length + T): block-causal attention, each query seeing its own block and the ones
                before it; it replaces `prefix` (one target block is prefix attention). With `shift_logits`
                each block's first token is predicted from the position before it, so attention blocks are the
                token blocks moved one position left (`attention_blocks`). Ignored by causal calls. Keyword only.
            clean: Long[B, T] the clean sequence beside the noisy `ids`, with `block` (training, BD3-LM's
                vectorised form): the forward runs both copies, the noisy one's blocks each seeing themselves
                and the clean blocks before them, the clean copy block-causal; the logits are the noisy copy's,
                each block's as if it were decoded after the clean blocks before it. No cache. Keyword only.
        """
        cfg = self.config
        B, T = ids.shape
        start = cache.length if cache is not None else 0
        if start + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds max_seq_len={cfg.max_seq_len}")
        if pos is None:
            pos = torch.arange(start, start + T, device=ids.device)[None]  # (1, T): same for every row
        causal = cfg.causal if causal is None else causal
        att = attention_blocks(block, cfg.shift_logits) if block is not None and not causal else None  # (B, S)
        two_streams = clean is not None
        if two_streams:  # [noisy | clean copy of the blocks a later block reads]: their positions, pads, image slots
            if att is None or cache is not None:
                raise ValueError("clean= (the two-stream training forward) needs block= and no cache or causal")
            pad = torch.zeros_like(ids, dtype=torch.bool) if pad is None else pad  # (B, T)
            at, filler = clean_positions(att, pad)  # (B, C) each
            att_clean = torch.where(filler, 0, att.gather(1, at))  # (B, C)
            pos = pos.expand(B, T)
            ids, pos = torch.cat([ids, clean.gather(1, at)], 1), torch.cat([pos, pos.gather(1, at)], 1)  # (B, T+C)
            pad = torch.cat([pad, pad.gather(1, at) | filler], 1)  # (B, T+C)
            if image_index is not None:
                image_index = torch.cat([image_index, image_index.gather(1, at)], 1)  # (B, T+C)
        table, head = self.tables()  # (V, C) each
        x = F.embedding(ids, table)  # (B, T, C)
        if image_index is not None:
            is_image = image_index >= 0  # (B, T)
            x = x + self.modality_emb(is_image.long())  # (B, T, C)
            if self.row_emb is not None:
                h, w = cfg.image_grid
                row = torch.where(is_image, image_index // w, h)  # (B, T), h = the zero entry
                col = torch.where(is_image, image_index % w, w)  # (B, T)
                x = x + self.row_emb(row) + self.col_emb(col)  # (B, T, C)
        else:
            x = x + self.modality_emb.weight[0]  # all text
        if self.pos_emb is not None:
            at = ids == cfg.mask_id  # (B, T): masked text slots (image slots have the 2D embedding)
            if image_index is not None:
                at = at & (image_index < 0)
            x = x + self.pos_emb(pos) * at.unsqueeze(-1).to(x.dtype)  # (B, T, C)
        x = self.drop(x)
        # real buffers (a complex one would lose its imaginary part under model.to(bfloat16))
        rot = torch.stack([self.rope_cos.float(), self.rope_sin.float()], -1)[pos].unsqueeze(1)  # (B|1, 1, T, D/2, 2)

        if cache is not None:
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions, needs {start + T}")
            cache.pad[:, start : start + T] = pad if pad is not None else False
            key_pad = cache.pad[:, : start + T]  # (B, S)
        else:
            key_pad = pad
        if att is None and cfg.prefix_attention and not causal and prefix is not None:
            # a model reading position i's logits at i - 1 predicts the first target from the position before
            # it: that one must see the generated region too, or the first token is chosen blind to the rest
            # (measured: captions began "there large ...", "a is a ...": F1 0.95 -> 0.72 on cell)
            prefix = prefix - int(cfg.shift_logits)  # (B,)
        else:
            prefix = None
        if two_streams:
            mask, is_causal = two_stream_mask(att, att_clean, key_pad), False  # (B, 1, T+C, T+C)
        else:
            mask, is_causal = self._attention_mask(key_pad, start, T, ids.device, causal, prefix, att)
        training = self.training and torch.is_grad_enabled() and cache is None
        recompute = training and self.activation_checkpointing
        for i, layer in enumerate(self._compiled_blocks if training and self._compiled_blocks else self.blocks):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            if recompute:
                x = checkpoint(layer, x, rot, mask, is_causal, kv, start, use_reentrant=False)
            else:
                x = layer(x, rot, mask, is_causal, kv, start)
        if two_streams:
            x = x[:, :T]  # (B, T, C): the noisy copy is the one scored
        if cfg.shift_logits and not causal:  # position i reads the hidden state of i - 1
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # (B, T, C)
        if logits_at is not None:
            x = x[logits_at]  # (M, C): only the positions that are scored
        x = self.norm(x)  # (B, T, C) or (M, C)
        logits = F.linear(x, head)  # (B, T, V) or (M, V)
        if cache is not None:
            cache.length = start + T
        return logits

    # ---- accounting ----------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Trainable parameters; `non_embedding` leaves out the lookup tables (token, modality, 1D and 2D
        position embeddings and the codebook projection), but keeps an untied head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            lookups = [self.tok_emb, self.modality_emb, self.row_emb, self.col_emb, self.pos_emb, self.code_proj]
            n -= sum(p.numel() for m in lookups if m is not None for p in m.parameters())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), for MFU, as in PaLM (Chowdhery et al. 2022,
        appendix B) and nanoGPT: 6 * N + 12 * n_layer * d * T, d the attention width (n_head * head_dim: n_embd
        unless `head_size` sets it apart).

        N counts the parameters that do a matmul per token: the blocks and the output head (V x d,
        tied or not); embedding lookups do no FLOPs. The second term is attention scores and
        weighted values (2 matmuls of T x d per layer, x3 for backward, x2 for multiply-add) over
        all T keys; the bidirectional model attends to all of them, and we count the causal model the
        same way (PaLM's convention), so the two compare.
        """
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        n = sum(p.numel() for p in self.blocks.parameters()) + cfg.vocab_size * cfg.n_embd
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
