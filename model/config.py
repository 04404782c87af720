"""Configuration dataclasses, one per component (presets live in :mod:`blocklm.model.presets`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AttentionConfig:
    """Banked causal linear attention (one per decoder layer)."""

    heads: int = 4
    head_dim: int = 16
    banks: int = 4  # N memory banks per layer
    chunk: int = 64  # parallel within a chunk, recurrent across chunks
    decay_init: float = 5.0  # bias of the retention logit: sigmoid(5) ~ 0.993 -> long memories
    eps: float = 1e-3  # normaliser guard: out = num / (den + eps)
    # on CUDA, q, k, v and the gates reach the kernels' layout through one Triton kernel each
    # way (model/attention_io_triton.py, attention_gates_triton.py) instead of PyTorch's chains
    # of copies (the CPU path)
    fused_io: bool = True


@dataclass
class StackConfig:
    """The differentiable processing stack (see :mod:`blocklm.model.stack`)."""

    enabled: bool = True
    depth: int = 16  # K cells kept in the state; pushes past the bottom fall off
    width: int = 16  # width of a stack cell
    hidden: int = 64  # controller width
    max_steps: int = 2  # ponder iterations per decoder step
    epsilon: float = 0.01  # stop once 1 - epsilon of a unit of mass has left the stack
    # on CUDA, run the step loop through torch.compile (stack_block.py). Off: on the H200 it was
    # 2.4x slower than eager (2,555 vs 6,046 tokens/s, GPU_NOTES.md call T2): per-call overhead
    compile: bool = False
    # on CUDA, replay the step loop as CUDA graphs of `graph_unroll` steps, checkpointed per
    # chunk (stack_graph.py; takes precedence over `compile`). With `fused`: 0.45-0.79 ms per
    # sequential step against 3.4-4.0 eager, text 44.8k vs 15.3k tokens/s (GPU_NOTES.md, S3)
    graphs: bool = True
    # steps per graph chunk (and checkpoint). 8 -> 16: text 169k -> 194k tokens/s (GPU_NOTES.md,
    # call N2, WCH=32 kernels), 0.115 -> 0.103 ms per step at B=40 x T=3080
    graph_unroll: int = 16
    # on CUDA, the ponder loop's read and pop/accumulate/push as fused Triton kernels
    # (stack_fused.py)
    fused: bool = True
    # on CUDA with `graphs` (fp32, or under bf16 autocast), each ponder iteration (read,
    # controller, pop/push) as one Triton kernel forward and one backward, weight gradients by
    # one matmul per chunk (stack_ctrl.py, stack_ctrl_loop.py; replaces `fused` there): 0.15 /
    # 0.17 / 0.38 ms per step at B = 11 / 64 / 300 against 0.44 / 0.55 / 0.80 with `fused`, text
    # 112k vs 59k tokens/s, mixed 56k vs 28k (GPU_NOTES.md, S6)
    fused_ctrl: bool = True
    # with `fused_ctrl`, the cells inside a graph chunk as a ring with a head per example: a push
    # writes one row instead of shifting V [B,K,W] (stack_ctrl.py; state layout unchanged).
    # 0.378 -> 0.327 ms per step at B = 300, 0.164 -> 0.159 at 64, 0.146 -> 0.145 at 11; mixed
    # 52.5k -> 57.7k tokens/s, text 110k -> 107k (within its epoch-turnover noise); GPU tests
    # pass (GPU_NOTES.md, "Lead, 2026-11-23 15:50", calls L2-L4)
    ring: bool = True
    # with `ring`, under grad: the forward keeps what each chunk's backward reads (the ring, the
    # iterations' inputs and Linear inputs; ~190 KB per padded example per chunk at `small`)
    # when a block's buffers fit this many bytes, so the backward runs no recompute (a third of
    # the stack's kernels; GPU_NOTES.md, "2026-11-24 (second)"); 0: always recompute
    save_bytes: int = 2 << 30
    # with `ring` and the saved buffers: a chunk's iterations in one launch forward and one
    # backward, one program per example looping over them (stack_chunk.py), for batches of at
    # most one example per SM: H200, 20 x 2,401 steps 0.067 -> 0.061 ms per step, 64 x 128
    # 0.084 -> 0.075; 300 x 96 would be 0.205 -> 0.218, so stays per iteration (GPU_NOTES P37)
    persistent: bool = True


@dataclass
class DecoderConfig:
    """The shared recurrent decoder: bottleneck layers of banked attention + feed-forward."""

    d_model: int = 64  # large embedding width
    d_core: int = 32  # bottleneck width seen by the attention
    d_ff: int = 128
    layers: int = 2
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    # on CUDA, the layers' parts around the attention torch.compile'd (model/layer_fused.py);
    # off: measured slower on the H200 (text 154k vs 172k tokens/s, GPU_NOTES thru-A)
    compile_layers: bool = False
    # on CUDA, the layers run on the real steps only, not the padded [B, T] grid (model/rows.py)
    packed_rows: bool = True
    # on CUDA, the layers' RMS norms (the end's with the feed-forward bias, the residual add
    # and the next layer's bf16 copy) as one Triton kernel each way (model/add_norm_triton.py).
    # Off: 4% fewer launches a mixed step but the same GPU time, and end to end inside the
    # spread (GPU_NOTES, calls P99-P102)
    fused_add_norm: bool = False


@dataclass
class TextConfig:
    """Text support: sentencepiece tokens, loss reported per character."""

    tokenizer_path: str | None = "data/shards/tokenizer.model"
    vocab_size: int | None = None  # None: read from the tokenizer
    chars_per_token: float = 4.0  # cost-model estimate for steps(shape)
    max_chars: int = 1 << 16  # length bins of the shape head cover 1..max_chars


@dataclass
class ImageConfig:
    """Image support: 8-bit sub-pixels, one decoder step per patch of patch x patch x 4."""

    patch: int = 4
    head_width: int = 64  # width of the within-patch autoregressive head
    loss_chunk: int = 256  # steps per checkpointed slice of the loss (bounds logit memory)
    # on CUDA, the element head and its loss torch.compile'd per slice (model/patch_fused.py;
    # H200: an image batch's head 281 -> 118 ms, mixed training +14%, GPU_NOTES P31-P32)
    compile_head: bool = True
    # on CUDA with Triton and TMA (compute capability 9.0+), the head and its loss as two
    # Triton kernels instead (model/patch_triton.py: no [rows, E, 256] logits in memory, so ~30%
    # fewer device mallocs a mixed step; compile_head then unused): mixed training +4.6% / +6.1%
    # on the same steps in alternating runs (GPU_NOTES P153); elsewhere the compiled head
    fused_head: bool = True
    max_side: int = 4096  # height/width bins of the shape head cover 1..max_side


@dataclass
class AudioConfig:
    """Audio support: 8-bit mu-law, one decoder step per frame of `frame` samples x channels."""

    frame: int = 16
    max_channels: int = 2
    head_width: int = 64
    loss_chunk: int = 256  # steps per checkpointed slice of the loss (bounds logit memory)
    # on CUDA, the element head and its loss torch.compile'd per slice (model/patch_fused.py;
    # H200: an audio batch's head (64 x 1,000 frames) 117 -> 51 ms, GPU_NOTES P35)
    compile_head: bool = True
    # on CUDA with Triton and TMA, the head and its loss as two Triton kernels (model/
    # patch_triton.py; an audio batch 46 vs 52 ms, P64; mixed training: ImageConfig's note)
    fused_head: bool = True
    mu: int = 255
    sample_rate: int = 16000  # rate given to generated audio when none is known
    max_frames: int = 1 << 22


@dataclass
class HeadsConfig:
    """Next-mode and shape heads, read from the block summary held in the state."""

    hidden: int = 64
    bins: int = 48  # log-spaced bins per size dimension


@dataclass
class SampleConfig:
    """How to draw from a distribution. top_k=0 and top_p=1 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    adaptive: bool = False  # adaptive temperature of "softmax is not enough"


@dataclass
class ModelConfig:
    """The whole model: a decoder, the mode supports (name -> config) and the heads."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    modes: dict[str, object] = field(default_factory=lambda: {
        "text": TextConfig(), "image": ImageConfig(), "audio": AudioConfig()})
    heads: HeadsConfig = field(default_factory=HeadsConfig)
