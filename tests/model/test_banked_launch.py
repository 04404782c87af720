"""The banked kernels' cached launcher (model/banked_launch.py): after the first launch of a
kernel under a key it calls the compiled kernel's launcher directly, with the runtime arguments
then the constexprs in the kernel's signature order; anything that changes the compiled variant
misses the cache. Checked with a stand-in kernel (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from blocklm.model import banked_launch as BL


class FakeCompiled:
    def __init__(self, log, tag):
        self.log, self.tag = log, tag
        self.function, self.packed_metadata = f"fn-{tag}", f"meta-{tag}"

    def run(self, *a):
        self.log.append(("direct", self.tag, a))


class FakeKernel:
    """Stands for a JITFunction with signature (x, y, n, A: constexpr, B: constexpr)."""
    arg_names = ["x", "y", "n", "A", "B"]

    def __init__(self):
        self.log, self.compiled = [], 0

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=None, maxnreg=None, **consts):
            self.compiled += 1
            self.log.append(("jit", grid, args, num_warps, consts))
            return FakeCompiled(self.log, self.compiled)
        return launch


@pytest.fixture
def cuda_like(monkeypatch):
    monkeypatch.setattr(BL, "HAS_TRITON", True)
    monkeypatch.setattr(BL, "_hooks_set", lambda: False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda idx: 1234, raising=False)
    monkeypatch.setattr(BL, "_CACHE", {})
    monkeypatch.setattr(BL, "_RAW_OK", True)
    return torch.device("cuda", 0)


def test_second_launch_is_direct_with_arguments_in_signature_order(cuda_like):
    kern = FakeKernel()
    L = BL.Launcher(cuda_like, ("bf16",), fast=True)
    L(kern, (3, 2), "X", "Y", 7, B=2, A=1, num_warps=8)
    L(kern, (5,), "X2", "Y2", 9, B=2, A=1, num_warps=8)
    assert kern.log[0][0] == "jit" and kern.compiled == 1
    kind, tag, a = kern.log[1]
    assert kind == "direct" and tag == 1
    # grid padded to 3 dims, stream, function, metadata, no hooks, args, constexprs A then B
    assert a == (5, 1, 1, 1234, "fn-1", "meta-1", None, None, None, "X2", "Y2", 9, 1, 2)


@pytest.mark.parametrize("change", ["constexpr", "warps", "stages", "maxnreg", "key", "device"])
def test_anything_that_changes_the_variant_compiles_again(cuda_like, change):
    kern = FakeKernel()
    BL.Launcher(cuda_like, ("bf16",), fast=True)(kern, (1,), "X", "Y", 7, A=1, B=2)
    args = dict(key=("bf16",), dev=cuda_like, A=1, warps=4, stages=None, maxnreg=None)
    args.update({"constexpr": {"A": 3}, "warps": {"warps": 8}, "stages": {"stages": 2},
                 "maxnreg": {"maxnreg": 128}, "key": {"key": ("fp32",)},
                 "device": {"dev": torch.device("cuda", 1)}}[change])
    BL.Launcher(args["dev"], args["key"], fast=True)(
        kern, (1,), "X", "Y", 7, A=args["A"], B=2, num_warps=args["warps"],
        num_stages=args["stages"], maxnreg=args["maxnreg"])
    assert [e[0] for e in kern.log] == ["jit", "jit"]


def test_slow_path_when_not_fast_or_hooks_or_cpu(cuda_like, monkeypatch):
    kern = FakeKernel()
    for _ in range(2):
        BL.Launcher(cuda_like, (), fast=False)(kern, (1,), "X", "Y", 7, A=1, B=2)
        BL.Launcher(torch.device("cpu"), (), fast=True)(kern, (1,), "X", "Y", 7, A=1, B=2)
    monkeypatch.setattr(BL, "_hooks_set", lambda: True)
    for _ in range(2):
        BL.Launcher(cuda_like, (), fast=True)(kern, (1,), "X", "Y", 7, A=1, B=2)
    assert [e[0] for e in kern.log] == ["jit"] * 6


def test_arguments_by_keyword_are_keyed_and_replayed_in_order(cuda_like):
    """A keyword argument is part of the key (its value is replayed, not the caller's next one),
    so a new value compiles again; the replay keeps the signature order."""
    kern = FakeKernel()
    L = BL.Launcher(cuda_like, (), fast=True)
    L(kern, (1,), "X", "Y", B=2, n=7, A=1)
    L(kern, (1,), "X", "Y", B=2, n=7, A=1)
    L(kern, (1,), "X", "Y", B=2, n=8, A=1)
    assert [e[0] for e in kern.log] == ["jit", "direct", "jit"]
    assert kern.log[1][2][-5:] == ("X", "Y", 7, 1, 2)


class FakeRun:
    """Stands for Triton 3.6's launcher object: a C entry point ``launch`` behind a Python
    ``__call__`` that allocates scratch memory when the kernel needs it."""

    def __init__(self, log, scratch=0):
        self.log = log
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True

        def launch(*a):
            self.log.append(("raw", a))
        self.launch = launch

    def __call__(self, *a):
        self.log.append(("wrapper", a))


class FakeKernelWithLauncher(FakeKernel):
    """FakeKernel whose compiled variants carry a FakeRun launcher."""

    def __init__(self, scratch):
        super().__init__()
        self.scratch = scratch

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def compile_and_launch(*args, **kw):
            ck = launch(*args, **kw)
            ck.run = FakeRun(self.log, self.scratch)
            return ck
        return compile_and_launch


@pytest.mark.parametrize("scratch", [0, 64])
def test_direct_launch_passes_addresses_to_the_c_entry_point(cuda_like, scratch):
    """Cached launches call the launcher's C function with the tensors' addresses (no per-pointer
    driver query), unless the kernel needs scratch memory (then the launcher object's own path)."""
    kern = FakeKernelWithLauncher(scratch)
    x, y = torch.zeros(8), torch.zeros(4, dtype=torch.int32)
    L = BL.Launcher(cuda_like, ("bf16",), fast=True)
    L(kern, (3, 2), x, y, 7, A=1, B=2)
    L(kern, (5,), x, y, 9, A=1, B=2)
    assert [e[0] for e in kern.log] == ["jit", "raw" if not scratch else "wrapper"]
    a = kern.log[-1][1]
    if scratch:
        assert a[5:9] == ("meta-1", None, None, None) and a[9] is x
    else:
        # grid, stream, function, cooperative, pdl, no scratch, metadata, no hooks, addresses
        assert a == (5, 1, 1, 1234, "fn-1", False, True, None, None, "meta-1", None, None, None,
                     x.data_ptr(), y.data_ptr(), 9, 1, 2)


def test_on_device():
    x = torch.zeros(2)
    assert BL.on_device(torch.device("cpu"), x, None, x)
    assert not BL.on_device(torch.device("cuda", 0), x)


def test_aligned():
    x = torch.zeros(64, dtype=torch.float32)
    assert BL.aligned(x, None, x[4:])
    assert not BL.aligned(x, x[1:])


def test_hooks_set_reads_triton_hook_chains():
    """Triton 3.6 keeps the launch hooks as (empty) HookChains, never None: a None check took
    the ordinary path on every launch (device call K5: no launch was ever direct)."""
    triton = pytest.importorskip("triton")
    chain = triton.knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this triton has no hook chains")
    assert not BL._hooks_set()

    def hook(*a):
        pass
    chain.add(hook)
    try:
        assert BL._hooks_set()
    finally:
        chain.remove(hook)
    assert not BL._hooks_set()


def test_direct_launch_only_on_the_checked_triton(cuda_like, monkeypatch):
    """Another Triton version keeps its own launcher call (the C function's argument order is
    Triton 3.6's)."""
    monkeypatch.setattr(BL, "_RAW_OK", False)
    kern = FakeKernelWithLauncher(0)
    x = torch.zeros(8)
    L = BL.Launcher(cuda_like, ("bf16",), fast=True)
    for n in (7, 9):
        L(kern, (1,), x, x, n, A=1, B=2)
    assert [e[0] for e in kern.log] == ["jit", "wrapper"]


def test_backward_launches_the_output_split_before_its_other_allocations(monkeypatch):
    """The backward's first kernel (``bwd_prep``, T > 2048 tokens) is launched right after the
    two tensors it writes are allocated: everything else the backward sets up happens while it
    runs (the GPU waits for that launch when the host is behind, GPU_NOTES call L5). Before,
    seven allocations came first."""
    pytest.importorskip("triton")
    from blocklm.model import banked_backward as BB
    from blocklm.model import banked_triton as bt

    events = []
    for name in ("empty", "empty_like", "zeros", "zeros_like"):
        fn = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _fn=fn, _n=name, **k: (
            events.append(_n), _fn(*a, **k))[1])

    def launch(kern, grid, *args, **kw):
        events.append("launch " + kern.__name__)

    B, H, T, D, N, C = 1, 1, 32, 16, 2, 16
    q, k, v = (torch.rand(B, H, T, D) for _ in range(3))
    r, w, c = (torch.rand(B, H, T, N) for _ in range(3))
    g, den = torch.rand(B, H, T), torch.rand(B, H, T)
    hs, zs = torch.rand(B * H * 2 * N * D * D), torch.rand(B * H * 2 * N * D)
    saved = (q, k, v, r, w, g, c, hs, zs, torch.rand(B, H, T, D), den)
    opt = {**bt.KERNEL_OPTS, "prep_in_intra": False}
    BB.backward(launch, opt, saved, (False, C, 1), torch.rand(B, H, T, D), None, None)
    first = events.index("launch bwd_prep")
    assert events[:first] == ["empty_like", "empty_like"], events[:first]
    # then what bwd_intra writes (dr, dw, the three partials), dq, dk, dv after its launch
    intra = next(i for i, e in enumerate(events) if e.startswith("launch bwd_intra"))
    assert len(events[first + 1:intra]) == 5, events[first + 1:intra]
    assert sum(e.startswith("launch") for e in events) >= 5


def test_forward_kernels_are_launched_before_autograd_records_the_call(monkeypatch):
    """With ``launch_first`` the forward's kernels are launched before BankedAttentionFn.apply
    (its bookkeeping then overlaps the GPU's work); without it, inside; a stand-in for the class
    (as the CPU step bench and some tests use) is applied as before, with the usual 11
    arguments."""
    pytest.importorskip("triton")
    from blocklm.model import banked_triton as bt

    events = []
    real = bt.launch_forward
    Fn = bt.BankedAttentionFn

    def fake_launch(*args):
        events.append("launch")
        f = bt.Launched()
        q, v = args[0], args[2]
        f.o, f.ST, f.zT = torch.zeros_like(v), q.new_zeros(1), q.new_zeros(1)
        f.saved, f.key, f.fast, f.meta = (), None, False, None
        return f

    class Spy(Fn):
        @staticmethod
        def forward(ctx, *args):
            events.append(("apply", len(args)))
            return Fn.forward(ctx, *args)

    monkeypatch.setattr(bt, "launch_forward", fake_launch)
    monkeypatch.setattr(bt, "BankedAttentionFn", Spy)
    args = (torch.rand(1, 1, 8, 16), torch.rand(1, 1, 8, 16), torch.rand(1, 1, 8, 16),
            torch.rand(1, 1, 8, 2), torch.rand(1, 1, 8, 2), torch.rand(1, 1, 8), None, None,
            1e-3, 8, 1)
    bt._apply(args)
    assert events == ["launch", ("apply", 12)]
    events.clear()
    monkeypatch.setitem(bt.KERNEL_OPTS, "launch_first", False)
    bt._apply(args)
    assert events == [("apply", 11), "launch"]

    class StandIn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, r, w, g, S0, z0, eps, C, R):
            events.append("stand-in")
            return v * 1, q.new_zeros(1), q.new_zeros(1)

    monkeypatch.setitem(bt.KERNEL_OPTS, "launch_first", True)
    monkeypatch.setattr(bt, "BankedAttentionFn", StandIn)
    events.clear()
    bt._apply(args)
    assert events == ["stand-in"]
    assert real is not fake_launch
