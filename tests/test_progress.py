"""The progress display's estimate of a long phase's cost, said once before most of the phase's work."""

from __future__ import annotations

import mergekit_lite.cli as cli


def _clock(times):
    ticks = iter(times)
    return lambda: next(ticks)


def _run_steps(capsys, times, steps, label="tuning toward the combined outputs (Adam steps)"):
    progress = cli.RichProgress(True, clock=_clock(times))
    progress.start(steps, 0, label)
    for _ in range(min(steps, len(times) - 1)):
        progress.advance(0)
    progress.stop()
    return capsys.readouterr().err


def test_phase_estimate_counts_the_warm_up_once():
    assert cli.phase_estimate(3.0, 0.5, 300) == 3.0 + 0.5 * 299
    assert cli.phase_estimate(1.0, 1.0, 1) == 1.0


def test_long_step_phase_says_its_cost_after_two_steps(capsys):
    # start at 0, first step ends at 3 s (warm-up), second at 3.5 s: 300 steps take about 3 + 0.5 * 299 s
    out = _run_steps(capsys, [0.0, 3.0, 3.5, 4.0, 4.5], 300)
    assert "tuning toward the combined outputs (Adam steps): about 3 min for 300 steps" in " ".join(out.split())
    assert out.count("about") == 1


def test_short_phase_says_nothing(capsys):
    assert "about" not in _run_steps(capsys, [0.0, 0.1, 0.2, 0.3], 20)
    assert "about" not in _run_steps(capsys, [0.0, 30.0, 60.0], 2)


def test_byte_phase_estimates_from_the_bytes_done(capsys):
    progress = cli.RichProgress(True, clock=_clock([0.0, 20.0]))
    progress.start(10, 1000, "merging")
    progress.advance(10)   # 1 %: too little to judge
    progress.advance(90)   # 10 % in 20 s: about 200 s in all
    progress.advance(100)
    progress.stop()
    out = " ".join(capsys.readouterr().err.split())
    assert "merging: about 3 min for 10 tensors (from the first 10%)" in out
    assert out.count("about") == 1


def test_disabled_progress_prints_nothing(capsys):
    progress = cli.RichProgress(False, clock=_clock([]))
    progress.start(300, 0, "tuning")
    progress.advance(0)
    progress.stop()
    assert capsys.readouterr().err == ""
