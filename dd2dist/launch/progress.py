"""Training progress from rank 0: per phase, a line at an interval and one when the phase is done, e.g.

    stage2 generator  step 300/600  250 samples/s  ETA 1m10s
    stage2 generator  step 600/600  248 samples/s  done in 2m21s

(a tqdm bar instead where the output is a terminal). Steps are counted in the unit the recipe gives them in: the
CSD phases count generator steps (``stage2.generator_steps``), the others their optimizer steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from dd2dist.train.callbacks import TrainerCallback

# phase name (dd2dist.method.schedule) -> what the line calls it
LABELS = {
    "stage1_head": "stage1 head",
    "stage1": "stage1 student",
    "stage2_ode_init": "stage2 regression",
    "stage2": "stage2 generator",
    "align": "alignment guidance",
    "stage2_after": "alignment generator",
}


def format_duration(seconds: float) -> str:
    """``45s``, ``1m10s``, ``2h05m``."""
    s = max(0, int(round(seconds)))
    hours, rest = divmod(s, 3600)
    minutes, s = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def format_rate(rate: float) -> str:
    """Three significant figures at most, no exponent: ``250``, ``12.5``, ``0.31``."""
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.2g}" if rate < 0.1 else f"{rate:.2f}"


def progress_line(label: str, step: int, total: int, samples_per_s: float | None = None,
                  eta_s: float | None = None, done_s: float | None = None) -> str:
    """One progress line; ``done_s`` (the phase's time) replaces the ETA once the phase is done."""
    parts = [label, f"step {step}/{total}"]
    if samples_per_s is not None and samples_per_s > 0:
        parts.append(f"{format_rate(samples_per_s)} samples/s")
    if done_s is not None:
        parts.append(f"done in {format_duration(done_s)}")
    elif eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


def phase_steps(phase, phase_iter: int) -> tuple[int, int]:
    """(done, total) of a phase after ``phase_iter`` of its iterations, in the recipe's unit (see module doc)."""
    if phase.kind == "alternate":
        per = phase.guidance_per_generator + 1  # K guidance iterations, then the generator's
        return phase_iter // per, phase.iterations // per
    return phase_iter, phase.iterations


class ProgressReporter(TrainerCallback):
    """A :class:`dd2dist.train.Trainer` callback (rank 0 only) writing the progress of the current phase.

    ``emit`` receives each line (default: printed to stdout); with ``bar`` (default: whether stdout is a
    terminal, and no ``emit`` given) a tqdm bar per phase replaces the lines. The rate is measured between two
    lines, the ETA from the phase's mean iteration time so far (checkpoints included).
    """

    def __init__(self, every_s: float = 30.0, emit: Callable[[str], None] | None = None, bar: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.emit = emit or (lambda line: print(line, flush=True))
        self.bar = (emit is None and sys.stdout.isatty()) if bar is None else bar
        self.clock = clock
        self._index: int | None = None
        self._prev: tuple[float, int] | None = None  # (time, samples) at the previous call
        self._tqdm = None

    def on_step(self, trainer, metrics: dict) -> None:
        self(trainer, metrics)

    def __call__(self, trainer, metrics: dict) -> None:
        now, state = self.clock(), trainer.state
        phase = trainer.schedule.phases[state.phase_index]
        if state.phase_index != self._index:
            self._start_phase(state, metrics, now)
        done, total = phase_steps(phase, state.phase_iter)
        label = LABELS.get(phase.name, phase.name)
        finished = state.phase_iter >= phase.iterations
        if self.bar:
            self._update_bar(label, done, total, state, now, finished)
        elif finished:
            rate = (state.samples - self._phase_start[1]) / max(now - self._phase_start[0], 1e-9)
            self.emit(progress_line(label, done, total, rate, done_s=now - self._phase_start[0]))
        elif now - self._window[0] >= self.every_s:
            rate = (state.samples - self._window[1]) / max(now - self._window[0], 1e-9)
            t0, _, iter0 = self._phase_start
            per_iter = (now - t0) / max(state.phase_iter - iter0, 1)
            self.emit(progress_line(label, done, total, rate, eta_s=per_iter * (phase.iterations - state.phase_iter)))
            self._window = (now, state.samples)
        self._prev = (now, state.samples)

    def _start_phase(self, state, metrics: dict, now: float) -> None:
        if self._prev is None:  # the run's first iteration: it started one step time ago
            dt = float(metrics.get("step_time_s", 0.0))
            self._prev = (now - dt, state.samples - int(round(float(metrics.get("samples_per_s", 0.0)) * dt)))
        t0, samples0 = self._prev
        self._index = state.phase_index
        self._phase_start = (t0, samples0, state.phase_iter - 1)
        self._window = (t0, samples0)
        self.close()

    def _update_bar(self, label: str, done: int, total: int, state, now: float, finished: bool) -> None:
        if self._tqdm is None:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, desc=label, unit="step", dynamic_ncols=True, file=sys.stdout)
        self._tqdm.update(done - self._tqdm.n)
        t0, samples0, _ = self._phase_start
        self._tqdm.set_postfix_str(f"{format_rate((state.samples - samples0) / max(now - t0, 1e-9))} samples/s",
                                   refresh=False)
        if finished:
            self.close()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
