"""blocklm.model: the model core (mode supports, banked linear-attention decoder, processing
stack, next-mode and shape heads).

Entry points for the dispatcher (``blocklm.pipeline``) and the trainer::

    from blocklm.model import BlockLM, presets, SampleConfig

    model = BlockLM(presets.tiny(tokenizer_path="data/shards/tokenizer.model"))  # or small()

    model.steps(mode, shape) -> int
        Decoder steps a block costs (its elements' steps + 1 summary step); the cost model.
        For text this is an estimate from the character count; with the content at hand,
        model.content_steps(mode, content) -> int is exact (the number of rows run_block uses).
    model.initial_state(batch, device=None) -> Tensor[B, model.state_size]  (fp32)
        The context before an example's first block. States are plain per-example rows:
        stack them (torch.cat / index) along dim 0 to batch block i of one example with block
        j of another; a row never depends on the other rows.
    model.run_block(mode, contents: list, state: Tensor[B, S] | None, targets=True) -> BlockResult
        contents: decoded block contents of one mode (text ``str`` [n_chars]; image
        ``numpy uint8 [H, W, C]``, C in 1..4; audio ``numpy int16/float32 [frames, ch]`` or
        ``(array, sample_rate)``), or ``model.supports[mode].prepare(content)`` of them (work
        done ahead, e.g. in a loader thread: text is tokenized there, ``Tokenized``). Returns
          .state        Tensor[B, S]  the context after the block (hand to the next block)
          .loss         BlockLoss with per-example Tensors[B]:
                          bits        content bits summed over the block
                          elements    characters / sub-pixels / samples they are reported per
                          mode_bits   bits of this block's mode, predicted from the incoming state
                          shape_bits  bits of this block's shape given its mode (exact)
                        (None when targets=False). Train on
                        sum(bits + mode_bits + shape_bits) / sum(elements), report
                        bits / elements per mode.
          .outputs      Tensor[B, T, d_model]  decoder outputs
          .mode_logits  Tensor[B, len(model.modes)] next-mode logits (last class = "end")
    model.end_bits(state) -> Tensor[B]
        Bits of predicting end-of-example after an example's last block (add to its loss).
    model.predict_next(state, sampling=None, generator=None) -> [(mode, shape) | ("end", None)]
        The next block's mode and shape, sampled (SampleConfig) or most likely (None).
    model.generate_block(mode, shapes, state=None, sampling=None, generator=None)
        -> (contents: list, new_state: Tensor[B, S])
        Sample one block per example with exactly the requested shapes.

Sampling (``SampleConfig``): temperature, top_k, top_p and the adaptive temperature of
"softmax is not enough". New modes: subclass :class:`ModeSupport`, ``register`` it in a
:class:`Registry` (``default_registry()`` holds text, image, audio), add its config to
``ModelConfig.modes`` and pass ``registry=`` to :class:`BlockLM`.

Modules: ``config`` (dataclasses), ``presets`` (tiny, small), ``support`` (interface,
registry), ``text`` / ``image`` / ``audio`` (one file per mode), ``patch`` (shared 8-bit
within-step head), ``attention`` (banked linear attention, chunked + step forms), ``stack``
(processing stack), ``decoder`` (bottleneck layers + stack, state layout), ``heads`` (next mode,
shape), ``sampling``, ``blocklm`` (the model), ``bench_tasks`` / ``bench_heads`` (the
``blocktool bench model`` experiments). Results: ``model/README.md``.
"""

from . import presets
from .batch import BlockBatch
from .blocklm import BlockLM, BlockLoss, BlockResult
from .config import (
    AttentionConfig,
    AudioConfig,
    DecoderConfig,
    HeadsConfig,
    ImageConfig,
    ModelConfig,
    SampleConfig,
    StackConfig,
    TextConfig,
)
from .support import ModeSupport, Registry, default_registry

__all__ = [
    "BlockLM", "BlockLoss", "BlockResult", "BlockBatch", "ModeSupport", "Registry",
    "default_registry", "presets", "AttentionConfig", "AudioConfig", "DecoderConfig",
    "HeadsConfig", "ImageConfig", "ModelConfig", "SampleConfig", "StackConfig", "TextConfig",
]
