"""bench train --idle: the GPU's idle intervals charged to the host phase they fell in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from blocklm.tools.bench_train_idle import PhaseMarks, idle_by_phase

M = "at::cuda::(anonymous namespace)::spin_kernel(long)"


def test_idle_is_charged_to_the_phase_of_the_last_marker_before_it():
    ms = 1_000_000  # ns
    kernels = [  # (start, duration, name), out of order on purpose
        (10 * ms, 1 * ms, "gemm"),
        (0, 1, M),                      # run:text starts
        (40 * ms, 1, M),                # target:start (the GPU had nothing from 11 to 40 ms)
        (45 * ms, 5 * ms, "Memcpy HtoD"),
        (50 * ms, 1, M),                # target:end
        (50 * ms, 30 * ms, "gemm"),     # overlaps the marker: no gap
        (80 * ms, 1, M),                # end:run
        (90 * ms, 1, M),                # opt (10 ms of data work between calls)
        (90 * ms, 10 * ms, "adam"),
    ]
    labels = ["run:text:1024", "target:start", "target:end", "end:run", "opt"]
    r = idle_by_phase(kernels, labels)
    assert r["span_ms"] == 100.0
    # idle: 0..10 after run:text's start (~10 ms), 11..40 (29), 40..45 in the set-up (5), 80..90
    assert r["idle_ms"] == {"run:text": 39.0, "end:run": 10.0, "target:start": 5.0}
    assert r["busy_share"] == pytest.approx(0.46, abs=0.001)
    assert r["share_idle_data"] == 0.15  # the set-up and the interval between calls
    assert r["largest_gaps"][0][:2] == [29.0, "run:text:1024"]


def test_marks_must_match_the_trace():
    with pytest.raises(ValueError, match="2 marker kernels in the trace for 1 host marks"):
        idle_by_phase([(0, 1, M), (5, 1, M)], ["opt"])


class Support:
    def target(self, contents, device=None):
        return "batch"


def test_phase_marks_wrap_the_trainer_and_come_off_again():
    sup = Support()  # a method of the class: wrapped on the instance, then deleted there
    decoder = SimpleNamespace(forward=lambda x: x)
    runners = SimpleNamespace(run=lambda mode, batch: decoder.forward(sup.target([1])),
                              finish=lambda contexts: None)
    tr = SimpleNamespace(runners=runners, optimizer_step=lambda: None,
                         model=SimpleNamespace(supports={"text": sup}, decoder=decoder))
    originals = [runners.run, runners.finish, tr.optimizer_step, decoder.forward]
    marks = PhaseMarks(tr)
    marks._sleep = lambda cycles: None  # no CUDA here: the labels are what is checked
    runners.run("text", SimpleNamespace(requests=[1, 2]))  # off: nothing recorded
    marks.on = True
    assert runners.run("text", SimpleNamespace(requests=[1, 2])) == "batch"
    runners.finish([])
    tr.optimizer_step()
    assert marks.labels == ["run:text:2", "target:start", "target:end", "decoder:text",
                            "decoder:end", "end:run", "fin", "end:fin", "opt", "end:opt"]
    marks.close()
    assert [runners.run, runners.finish, tr.optimizer_step, decoder.forward] == originals
    assert "target" not in vars(sup) and sup.target([]) == "batch"
