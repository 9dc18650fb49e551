"""Rank 0's progress lines (dd2dist.launch.progress): the line format, and when a Trainer callback writes one."""

from types import SimpleNamespace

import pytest

from dd2dist.launch.progress import ProgressReporter, format_duration, format_rate, phase_steps, progress_line
from dd2dist.method.schedule import Phase


def test_progress_line_reads_as_documented():
    assert progress_line("stage2 generator", 300, 600, 250.4, eta_s=70) == (
        "stage2 generator  step 300/600  250 samples/s  ETA 1m10s")
    assert progress_line("stage1 student", 4, 4, 12.46, done_s=3.4) == (
        "stage1 student  step 4/4  12.5 samples/s  done in 3s")
    assert progress_line("stage1 head", 0, 2) == "stage1 head  step 0/2"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (44.6, "45s"), (70, "1m10s"), (3599, "59m59s"),
                                           (7500, "2h05m"), (-3, "0s")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("rate, text", [(1234.5, "1234"), (250.4, "250"), (12.46, "12.5"), (3.14159, "3.14"),
                                        (0.0123, "0.012")])
def test_rates(rate, text):
    assert format_rate(rate) == text


def test_csd_phases_count_generator_steps():
    csd = Phase("stage2", "stage2", "alternate", iterations=600 * 3, guidance_per_generator=2)
    assert phase_steps(csd, 0) == (0, 600) and phase_steps(csd, 2) == (0, 600) and phase_steps(csd, 3) == (1, 600)
    assert phase_steps(csd, 1800) == (600, 600)
    assert phase_steps(Phase("stage1", "stage1", "gts", 40), 7) == (7, 40)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _trainer(phases):
    state = SimpleNamespace(phase_index=0, phase_iter=0, samples=0)
    return SimpleNamespace(state=state, schedule=SimpleNamespace(phases=tuple(phases)))


def test_a_line_per_interval_and_one_when_the_phase_is_done():
    """16 samples per iteration, 1 s each: lines every 10 s with the rate and the phase's ETA, then the done line
    of each phase; the next phase's clock starts where the previous one ended."""
    phases = [Phase("stage1", "stage1", "gts", 25), Phase("stage2", "stage2", "alternate", 6, 2)]
    trainer, clock, lines = _trainer(phases), FakeClock(), []
    progress = ProgressReporter(every_s=10, emit=lines.append, clock=clock)
    for index, phase in enumerate(phases):
        trainer.state.phase_index, trainer.state.phase_iter = index, 0
        for _ in range(phase.iterations):
            clock.now += 1.0
            trainer.state.phase_iter += 1
            trainer.state.samples += 16
            progress(trainer, {"step_time_s": 1.0, "samples_per_s": 16.0})
    assert lines == [
        "stage1 student  step 10/25  16.0 samples/s  ETA 15s",
        "stage1 student  step 20/25  16.0 samples/s  ETA 5s",
        "stage1 student  step 25/25  16.0 samples/s  done in 25s",
        "stage2 generator  step 2/2  16.0 samples/s  done in 6s",
    ]


def test_a_resumed_run_counts_from_where_it_resumed():
    phases = [Phase("stage1", "stage1", "gts", 100)]
    trainer, clock, lines = _trainer(phases), FakeClock(), []
    trainer.state.phase_iter, trainer.state.samples = 80, 80 * 8
    progress = ProgressReporter(every_s=5, emit=lines.append, clock=clock)
    for _ in range(20):
        clock.now += 0.5
        trainer.state.phase_iter += 1
        trainer.state.samples += 8
        progress(trainer, {"step_time_s": 0.5, "samples_per_s": 16.0})
    assert lines == ["stage1 student  step 90/100  16.0 samples/s  ETA 5s",
                     "stage1 student  step 100/100  16.0 samples/s  done in 10s"]
