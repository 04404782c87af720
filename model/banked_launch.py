"""Cached direct launches of the banked-attention Triton kernels.

At 1K tokens one forward + backward is host-bound (model/GPU_NOTES.md, calls K1-K3: ~0.9 ms of
host time against ~0.62 ms of GPU work), and a plain ``kernel[grid](...)`` costs 12-19 us of host
time: Triton binds the keyword arguments, specialises every argument, builds a cache key, looks up
the compiled kernel and checks globals on each call. :class:`Launcher` does that once per kernel
and call signature, keeps the compiled kernel, and afterwards calls its launcher directly with
the arguments in signature order.

What makes a cached entry valid: Triton compiles a kernel per device, per constexpr value and
launch option, per tensor dtype, per pointer alignment (address divisible by 16) and per integer
specialisation (equal to 1, divisible by 16). The key of an entry holds the kernel, the device, the
caller's ``key`` (the inputs' dtypes, which fix those of every tensor the caller allocates, and
the specialisation of each integer argument), the launch options and the constexpr values; the caller turns the
fast path off (``fast=False``) unless every tensor it passes in is 16-byte aligned (tensors from
``torch.empty`` always are). Launch hooks (Triton's profiler) also take the ordinary path.

Where Triton's launcher allows it (:func:`raw_launch`), the cached entry calls the launcher's C
function itself with the tensors' addresses, not the tensors: no per-pointer driver query.
"""

from __future__ import annotations

import torch

from .banked_kernels import HAS_TRITON, triton

_CACHE: dict = {}  # (id(kernel), (device, key), warps, stages, constexprs) -> launch entry
# The direct C call (raw_launch) passes arguments in the order of Triton 3.6's launcher; another
# Triton may order them differently, so only the version it was checked on takes it (device
# calls M2-M4: GPU tests, bench_gpu_launch). Any other version keeps Triton's own launcher call.
_RAW_OK = HAS_TRITON and triton.__version__.split(".")[:2] == ["3", "6"]


def _hooks_set() -> bool:
    """Whether a launch hook is registered (Triton 3.6 keeps empty HookChains, never None)."""
    rt = triton.knobs.runtime
    return any(h is not None and getattr(h, "calls", True)
               for h in (rt.launch_enter_hook, rt.launch_exit_hook))


class Launcher:
    """Launches kernels for one call of the banked function (one device, one stream)."""

    __slots__ = ("key", "fast", "stream")

    def __init__(self, device: torch.device, key: tuple, fast: bool):
        self.fast = bool(fast and HAS_TRITON and device.type == "cuda" and not _hooks_set())
        self.key = (device.index, key)
        self.stream = torch._C._cuda_getCurrentRawStream(device.index) if self.fast else None

    def extended(self, extra: tuple) -> Launcher:
        """The same launcher with ``extra`` added to its key (the specialisations of integer
        arguments known only at a later launch: a gradient's row stride)."""
        other = Launcher.__new__(Launcher)
        other.key, other.fast, other.stream = self.key + extra, self.fast, self.stream
        return other

    def __call__(self, kern, grid, *args, num_warps: int = 4, num_stages=None, maxnreg=None,
                 **consts):
        """``kern[grid](*args, **consts)``; args are the runtime arguments in order, consts the
        constexprs (which the kernels declare after them); num_stages and maxnreg (a register
        cap per thread) None: Triton's defaults."""
        if self.fast:
            ck_key = (id(kern), self.key, num_warps, num_stages, maxnreg, *consts.values())
            ent = _CACHE.get(ck_key)
            if ent is not None and ent[4] is kern:
                run, fn, meta, tail, _, raw = ent
                g1, g2 = grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
                if raw is None:
                    run(grid[0], g1, g2, self.stream, fn, meta, None, None, None, *args, *tail)
                else:  # the C entry point, tensors as addresses (see raw_launch)
                    run(grid[0], g1, g2, self.stream, fn, *raw, meta, None, None, None,
                        *[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args],
                        *tail)
                return
        opts = {k: v for k, v in (("num_stages", num_stages), ("maxnreg", maxnreg))
                if v is not None}
        ck = kern[grid](*args, num_warps=num_warps, **opts, **consts)
        names = getattr(kern, "arg_names", None)
        if self.fast and ck is not None and names is not None and \
                sorted(names[len(args):]) == sorted(consts):
            if hasattr(ck, "result"):  # asynchronous compilation mode
                ck = ck.result()
            if len(_CACHE) > 4096:  # many shapes seen (the key holds no sizes, few expected)
                _CACHE.clear()
            raw = raw_launch(ck.run)
            _CACHE[ck_key] = (ck.run if raw is None else raw[0], ck.function,
                              ck.packed_metadata, tuple(consts[n] for n in names[len(args):]),
                              kern, None if raw is None else raw[1:])


def raw_launch(run) -> tuple | None:
    """(C launch function, cooperative-grid flag, PDL flag, None, None) of a compiled kernel's
    launcher, or None to call ``run`` itself.

    Triton's launcher object (Triton 3.6, ``CudaLauncher.__call__``) allocates no scratch for
    these kernels and then calls a C function which, for each tensor argument, calls its
    ``data_ptr`` and asks the driver (``cuPointerGetAttribute``) whether the address is a device
    one; given integers it uses them as they are. This launcher passes every tensor's address
    (the kernels' tensors all come from one CUDA device, checked by the caller), which skips that
    per-pointer driver call and the Python wrapper: the banked call has 11 launches of 9-17
    pointers, host-bound at 1K (GPU_NOTES, call M2). Anything else (scratch memory, tensor
    descriptors, another Triton) keeps the ordinary path."""
    launch = getattr(run, "launch", None)
    if (not _RAW_OK or getattr(launch, "__name__", None) != "launch"  # not the tensor-descriptor wrapper
            or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)
            or not hasattr(run, "launch_cooperative_grid") or not hasattr(run, "launch_pdl")):
        return None
    return launch, run.launch_cooperative_grid, run.launch_pdl, None, None


def on_device(dev: torch.device, *xs) -> bool:
    """Whether every given tensor lives on ``dev`` (the direct launches pass bare addresses, so
    nothing downstream would catch a tensor on the CPU or another GPU)."""
    return all(x.device == dev for x in xs if x is not None)


def aligned(*xs) -> bool:
    """Whether every given tensor's address is divisible by 16 (Triton's pointer specialisation)."""
    return all(x.data_ptr() % 16 == 0 for x in xs if x is not None)
