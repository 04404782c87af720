"""Run configuration: the model, the dispatcher and the optimisation, with named presets.

A preset is a function returning a fresh :class:`RunConfig`; ``--set key=value`` edits one field
(:mod:`.overrides`), e.g. ``train.lr=1e-3`` or ``model.decoder.layers=4``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from blocklm.model import presets as model_presets
from blocklm.model.config import ModelConfig
from blocklm.pipeline.dispatch_types import DispatchConfig

from .cuda_alloc import check_alloc_settings
from .overrides import apply_override


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    lr: float = 3e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    warmup: int = 50  # optimizer steps of linear warm-up
    schedule_steps: int = 2000  # length of the cosine decay (optimizer steps)
    lr_floor: float = 0.1  # the cosine ends at lr * lr_floor
    grad_clip: float = 1.0
    tokens_per_step: int = 2048  # decoder steps accumulated per optimizer step
    log_every: int = 10  # optimizer steps between metrics records
    # read each step's logged figures (bits, gradient norm) from the GPU a step late, so the
    # host does not wait for the backward pass before the next window (tools/train/step_log.py;
    # None: on CUDA; one process only; the records are the same, written a step later)
    async_log: bool | None = None
    checkpoint_every: int = 100  # optimizer steps between checkpoints (0: only at exit)
    eval_every: int = 0  # optimizer steps between held-out evaluations (0: never)
    eval_samples: int = 64  # held-out samples per evaluation
    seed: int = 0
    shuffle_buffer: int = 1000
    device: str = "auto"  # "auto": cuda when available, else cpu
    # PyTorch's intra-op CPU threads while fitting (set at the fit's start, restored at its end;
    # None: 1 on a CUDA device, torch's default on the CPU, where they compute the model). On
    # CUDA the host's tensor work is small bookkeeping (batch set-up: masks, positions, index
    # writes), and each such op woke a team of all the cores' threads, busy in the trainer's
    # thread: mixed 172-176k -> 198-200k tokens/s on the H200 (GPU_NOTES.md, calls P26-P27)
    host_threads: int | None = None
    # full garbage collections while fitting: one every this many generation-1 collections
    # (loop_util.GCFreeze; Python's default 10). Each traverses the examples read ahead and in
    # flight: 119-291 ms on the H200 (mixed), at 50 one every 14-40 optimizer steps
    # (GPU_NOTES P41-P43); at 500 ten times rarer
    full_gc_every: int = 500
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU: fp32 there)
    # relative width cap of shape buckets (estimate_buckets' max_width; None: quantiles only;
    # a dict: per mode, modes not in it None)
    bucket_max_width: float | None | dict[str, float | None] = 0.06
    # the dispatcher charges and buckets each block by the cost shape its support measures
    # from the prepared content (ModeSupport.cost_shape; text: its exact tokens), not by the
    # estimate from its shape (text: characters / chars_per_token), so a text batch's padded
    # grid is what its blocks' tokens need: text grids 33% -> 18% padding, mixed `small` on the
    # H200 +1.1% and +2.3% real tokens/s and 5.6 GiB less peak memory in same-call A/Bs
    # (GPU_NOTES.md P162-P163). A batching setting: a run resumes only with the value it
    # started with (false: the runs before it)
    cost_from_content: bool = True
    # one dispatcher run over epoch after epoch, the next admitted while this one drains
    # (tools/train/chain.py: no string of small drain batches at each epoch's end); false: one
    # run per epoch, drained, with a partial optimizer step at its end (the batches before)
    chain_epochs: bool = True
    # chained, a batch takes at most this many examples (dispatch.max_batch_samples, lowered
    # to it; a mode's own dispatch.mode_max_samples wins; None: no cap). Chained text batches
    # reached ~3,500 short examples (per-epoch runs 1,968): uncapped ep-1 ran 15k tokens/s on
    # the H200 (and over 2,730 the banked kernels' grid fails); at 1,024 (ep-2) text 198-206k vs
    # 191k per epoch, mixed 103k vs 89k, peak memory 69 / 107 GiB vs 53 / 65
    chain_batch_samples: int | None = 1024
    # an optimizer step's window holds at most this many times tokens_per_step padded tokens: a
    # batch that would overfill it takes fewer requests (Dispatcher.batch_limit; the rest wait
    # for the next window). Every batch of a window keeps its activations until the window's
    # backward, so the window, not the batch, sets the peak memory: uncapped, a window closed
    # on the first batch past tokens_per_step and chained mixed windows reached 130k tokens
    # for 65,536 (`small` with the stack ran out of the H200's 140 GiB after ~30 steps). None:
    # no cap
    window_max: float | None = 1.5
    # per-mode overrides of window_max: a batch of the mode may fill the window up to this many
    # times tokens_per_step (the window still closes once it reaches tokens_per_step). For image
    # batches, whose stack costs the same ~111 ms at 32 or 51 images (one SM an example): on the
    # H200 window_max 2.0 for every mode with a 131,072-token image budget ran +4.5% on mixed
    # data, peak 103 -> 120 GiB (GPU_NOTES P109); this gives the room to image batches alone
    # (`small`: {"image": 2.0}, +6.6% on mixed, P110)
    window_mode_max: dict[str, float] = field(default_factory=dict)
    # the window also closes (its optimizer step runs) once its batches hold this many GiB of
    # recurrent state: each batch's [B, state_size] fp32 states in (when any example continues)
    # and out (unless every example ends), alive with its activations until the backward. The
    # token rooms above do not see them: a text batch of 1,536 short captions is ~40k tokens
    # but 13.9 GiB of states in and out. `small` on gpu_mixed4 had one window in 400 with four
    # such batches (48.7 GiB of states, peak 134.2 of the H200's 139.8 GiB) where it could run
    # out of memory at step ~134 (GPU_NOTES P137); at 32 that window closes after three
    # batches (41.8 GiB, as others) and the other 399 are as before. The close comes after the
    # batch that crosses the cap, so a window may hold up to one batch's states over it (32 +
    # 13.9 GiB at most in `small`). None: no such close
    window_max_state_gib: float | None = None
    # the CUDA caching allocator's settings (PYTORCH_CUDA_ALLOC_CONF's syntax, applied by the
    # trainer on CUDA: tools/train/cuda_alloc.py); None: PyTorch's defaults. `small` sets
    # "max_split_size_mb:6144": its 1,536-example state tensors (6.96 GiB) keep whole blocks,
    # where small tensors placed in freed ones fragmented the cache until a state tensor could
    # not be allocated (GPU_NOTES.md, calls P137-P141). None: PyTorch's defaults (applied, so
    # a run after another in one process does not keep the other's)
    cuda_alloc: str | None = None


@dataclass
class RunConfig:
    """Everything a run needs besides its data."""

    model: ModelConfig
    dispatch: DispatchConfig
    train: TrainConfig = field(default_factory=TrainConfig)


def tiny() -> RunConfig:
    """CPU-sized: the tiny model widened to d_model 128 (2 layers), with coarse image patches
    (8x8: a 480x320 image is 2,401 decoder steps) and audio frames (16 samples), 4,096-token
    batches, 2,048-token optimizer steps and a cosine that ends near the ~700 steps of a
    10-minute CPU run.

    Sizes chosen by 60-step runs on ``data/shards/mixed`` (same data order; CPU seconds with
    OMP_NUM_THREADS=1; training bits/char of text over steps 51-60): d_model 32: 2.632 in 67 s,
    64: 2.590 in 75 s, 128: 2.481 in 84 s, 256: 2.526 in 120 s; 128 with 3 layers: 2.481 in
    111 s. On a CPU the small model is bound by per-call overhead, so width is nearly free up to
    128. Attention chunks of 32 instead of 8 give the same losses in 67 instead of 100 CPU
    seconds (fewer sequential chunk steps). 120 steps of 2,048 tokens instead of 60 of 4,096
    (same tokens): text 2.437 vs 2.481, audio 6.565 vs 6.839 bits, 95 vs 84 CPU seconds.
    Evaluations every 200 steps (each ~9 CPU seconds).

    The processing stack is off here: it is a per-step recurrence that costs about 5x the
    tokens/s on a CPU (measured: 2,650 vs 610 tokens/s), and ``blocktool bench model`` shows what
    it adds; ``--set model.decoder.stack.enabled=true`` turns it on. The GPU preset keeps it on.
    """
    model = model_presets.tiny()
    model.modes["image"].patch = 8
    model.modes["audio"].frame = 16
    dec = model.decoder
    dec.stack.enabled = False
    dec.d_model, dec.d_core, dec.d_ff = 128, 64, 256
    dec.attention.heads, dec.attention.head_dim, dec.attention.chunk = 4, 16, 32
    return RunConfig(model=model,
                     dispatch=DispatchConfig(max_in_flight=256, budget=4096, ttl_steps=64,
                                             prefetch=256),
                     train=TrainConfig(lr=3e-3, tokens_per_step=2048, warmup=40,
                                       schedule_steps=700, eval_every=200, eval_samples=200))


def small() -> RunConfig:
    """GPU-sized: the ~125M-parameter model with large token budgets.

    A batch may fill a whole optimizer step (budget = tokens_per_step): the stack's step loop
    and the per-batch host work cost per batch, not per token, so fewer, fuller batches are
    faster (a 480x320 image is 2,400 sequential steps whatever the batch size); 4,096 examples
    in flight fill 65,536-token batches of ~38-token text blocks. Buckets are the 16 cost-weighted
    quantiles without the 6% width split: text runs in ~5 batches per 65,536 tokens instead of
    ~26 (3,070 -> 754 sequential stack steps; padding 2.7% -> 15%; `bench train --simulate`).
    8,192 examples in flight instead of 4,096: text in 3.3 instead of 4.8 batches per step (the
    per-batch host work is most of a step), 148k instead of 128k tokens/s stack off on the H200
    in the same run, peak memory 71 GiB (device call thru-2). 12,288 instead of 8,192: mixed
    image batches fill (`bench train --simulate`, gpu_mixed4: 2.5 -> 1.92 batches and 1,548 ->
    1,078 sequential stack steps per step; the text set 1.79 -> 1.87 batches, padding 14.5% ->
    16.5%); on the H200 mixed with the stack 137,418 / 135,358 -> 146,331 tokens/s over 40 steps,
    peak memory 94.6 -> 99.9 GiB (the states of examples between blocks), text with the stack
    267,506 -> 265,575 (calls P15, P16); 16,384 peaked at 117 GiB and 24,576 ran out of memory.

    Coalescing (``pipeline/dispatch_coalesce.py``): a small epoch is admitted whole, so nearly
    every batch is a drain of one bucket (a gpu_mixed4 epoch: 52 batches of ~8,500 tokens, audio
    16 of ~5,700). A batch now takes neighbouring buckets of its mode along where the padding they
    add is under the price of a batch: audio 1,000 tokens over narrow (6% width) buckets, text
    500 over its quantile buckets. gpu_mixed4: 7.74 -> 6.26 batches per 65,536 tokens, padding
    9.7% -> 9.5%; the text set's 16 batches unchanged (`bench train --simulate`). Higher prices
    or narrow text buckets cut more batches but pad mixed text more or split the text set into
    more batches (one price cannot fit both: pipeline/DISPATCH.md, "Coalescing").

    Image batches wait for more images: an image batch's stack costs its 2,400 sequential steps
    whatever its size (~133 ms forward + backward for 20 or 40 images on the H200), and at a
    stall the most pending cost ran, so images ran ~20 at a time. With a 98,304-token image
    budget and a stall weight of 0.25 (``mode_stall_weight``) they run ~31 at a time:
    gpu_mixed4 on the H200, 40 s windows, same calls alternating, 20.2 -> 30.6 images a batch,
    real tokens/s 159,996 -> 169,289 (P70) and 180,967 -> 189,005 (P72): +5.8% / +4.4%; peak
    memory 99.6 -> 116.5 GiB (GPU_NOTES.md, calls P70-P72); simulated, 1,159 -> 781
    sequential stack steps per optimizer step (8 epochs).

    16,384 examples in flight (was 12,288), now that the layers run on the real steps only
    (``model/rows.py``: a mixed step's peak 113.5 -> 101.5 GiB): fuller text and audio
    batches, 1.83 -> 1.57 batches per optimizer step (`bench train --simulate`, gpu_mixed4, 8
    epochs). On the H200, same calls, alternating 30 s windows, real tokens/s: 183,939,
    184,078, 175,043 and 181,111 against 170,735, 178,125, 166,811 and 164,852 before both
    changes (+6.4% on the means), peak 113.5 -> 99.4 GiB; text alone unchanged within its
    spread, peak 73.3 -> 59.5 GiB (GPU_NOTES.md, calls P90-P92).

    20,480 in flight (was 16,384): 1.57 -> 1.50 simulated batches per step, 803 -> 780
    sequential stack steps. On the H200 (P94, P96), second runs of the setting against the
    default of the same call: 190,442 against 182,502 / 183,265, and 201,698 against 192,166
    real tokens/s; peak 98.3 -> 103.6 GiB. The first run of the setting on a fresh machine
    compiled the new shapes inside its window both times (54 steps where the others ran 67-76).
    24,576 peaked at 121.5 GiB.

    Image batches get their own window room (``train.window_mode_max={"image": 2.0}``) and a
    131,072-token budget (was 98,304): the window cap (1.5 x 65,536) had cut them to ~32 images,
    and the stack costs an image batch the same ~111 ms at 32 or 51 images (one SM an example).
    Text and audio windows keep the 1.5 cap, so only image windows (~27% of steps on gpu_mixed4)
    hold more than 98,304 tokens. On the H200 (P110), same call, alternating 25 s windows, real
    tokens/s 212,823, 207,278, 224,603 before against 229,733, 230,668, 227,172 (+6.6% on the
    means), 32 -> 47 images a batch, peak 103.2 -> 119.8 GiB.

    Chained batches take up to 1,536 examples (``train.chain_batch_samples``, 1,024 elsewhere):
    text and audio batches are host-bound (the per-batch set-up and backward launch), and a
    gpu_mixed4 epoch's ~12k-token text drains of 1,024 short examples cost ~150 ms each, as much
    as a 65k-token batch. Simulated (8 epochs), 1.47 -> 1.29 batches per optimizer step. On the
    H200 (P112), same call, alternating: real tokens/s 211,791 / 208,857 against 223,313 /
    220,774 (+5.6%), peak 119.8 -> 112.2 GiB. Not 2,048: a batch's recurrent state is 4.6 MiB
    an example (fp32), so 2,048 examples are 9.3 GiB blocks, and mixed runs failed to allocate
    one after ~22 steps with 53 GiB reserved but free (fragmentation, P111); with
    ``expandable_segments`` they ran but 13% slower (P112). Text alone at 2,048: 287,887 ->
    299,620 (P111).

    Memory (P137-P141): a window closes once its batches hold 32 GiB of recurrent state
    (``train.window_max_state_gib``; the token rooms do not count states, and one window in 400
    of gpu_mixed4 held 48.7 GiB, peak 134.2 of the H200's 139.8 GiB -> 116.6), and blocks of 6
    GiB and more are never split (``train.cuda_alloc="max_split_size_mb:6144"``: freed state
    tensors' blocks stay whole; split, they ended the run with 19-50 GiB free in pieces).
    """
    return RunConfig(model=model_presets.small(),
                     dispatch=DispatchConfig(max_in_flight=20480, budget=65536, ttl_steps=256,
                                             prefetch=8192,
                                             mode_coalesce_tokens={"audio": 1000, "text": 500},
                                             mode_budget={"image": 131072},
                                             mode_stall_weight={"image": 0.25}),
                     train=TrainConfig(lr=6e-4, tokens_per_step=65536, warmup=200,
                                       schedule_steps=20000, checkpoint_every=500,
                                       bucket_max_width={"audio": 0.06},
                                       window_mode_max={"image": 2.0},
                                       window_max_state_gib=32.0,
                                       cuda_alloc="max_split_size_mb:6144",
                                       chain_batch_samples=1536))


PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "small": small}


def build_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The preset's config with ``key=value`` overrides applied in order."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {sorted(PRESETS)})")
    cfg = PRESETS[preset]()
    for o in overrides:
        apply_override(cfg, o)
    # the dispatcher's own checks (budgets, TTL, stall weights, ...) on the values as overridden,
    # now rather than when the trainer builds its dispatcher
    cfg.dispatch = dataclasses.replace(cfg.dispatch)
    w = cfg.train.window_max
    if w is not None and not w >= 1:  # under 1 a window could not reach tokens_per_step
        raise ValueError(f"train.window_max must be at least 1 (a window holds at least "
                         f"tokens_per_step padded tokens) or none, got {w!r}")
    for m, f in cfg.train.window_mode_max.items():
        if m not in cfg.model.modes:  # a misspelt mode would silently change nothing
            raise ValueError(f"train.window_mode_max names mode {m!r}, which the model does not "
                             f"have (its modes: {sorted(cfg.model.modes)})")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 1:
            raise ValueError(f"train.window_mode_max[{m!r}] must be a number >= 1 (a batch of "
                             f"{m} may fill the window up to that many times tokens_per_step), "
                             f"got {f!r}")
    g = cfg.train.window_max_state_gib
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0):
        raise ValueError(f"train.window_max_state_gib must be a number of GiB > 0 (the "
                         f"recurrent states a window's batches may hold before its optimizer "
                         f"step) or none, got {g!r}")
    check_alloc_settings(cfg.train.cuda_alloc)
    h = cfg.train.host_threads
    if h is not None and not (isinstance(h, int) and h >= 1):
        raise ValueError(f"train.host_threads must be a whole number >= 1 or none, got {h!r}")
    g = cfg.train.full_gc_every
    if not (isinstance(g, int) and not isinstance(g, bool) and g >= 1):
        raise ValueError(f"train.full_gc_every must be a whole number >= 1, got {g!r}")
    return cfg
