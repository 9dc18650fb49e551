"""The trainer's one callback protocol: every event reaches the callbacks in order (phases, logged metrics, steps,
checkpoints, exports), and pruning waits until they have seen a checkpoint."""

import pytest
from test_train_trainer import _cfg, _trainer

from dd2dist.config.schema import AlignmentConfig
from dd2dist.train import OnStep, TrainerCallback

TOTAL = 3 + 3 + 9  # head-only, full stage 1, stage 2 (K = 2, 3 generator steps)


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_phase(self, trainer, phase):
        self.events.append(("phase", phase.name))

    def on_log(self, trainer, metrics, step):
        self.events.append(("log", step, "checkpoint/write_s" in metrics))

    def on_step(self, trainer, metrics):
        self.events.append(("step", trainer.state.iteration))

    def on_checkpoint(self, trainer, path, metrics):
        assert (path / "state.json").is_file() and "checkpoint/write_s" in metrics
        self.events.append(("checkpoint", path.name, sorted(p.name for p in path.parent.iterdir())))

    def on_export(self, trainer, name, state):
        assert state and trainer.engine_group == "stage1"  # before the stage-2 engines replace the student
        self.events.append(("export", name))


def _expected(every: int) -> list:
    out, kept = [], []

    def checkpoint(i):
        kept[:] = [*kept[-1:], f"step_{i:08d}"]  # keep_last=1: the older one is still there while callbacks run
        return [("log", i, True), ("checkpoint", f"step_{i:08d}", list(kept))]

    for i in range(1, TOTAL + 1):
        out += {1: [("phase", "stage1_head")], 4: [("phase", "stage1")],
                7: [("export", "stage1_student"), ("phase", "stage2")]}.get(i, [])
        out.append(("log", i, False))
        if i % every == 0:
            out += checkpoint(i)
        out.append(("step", i))
    if TOTAL % every:  # the checkpoint where fit returns
        out += checkpoint(TOTAL)
    return out


def test_a_callback_receives_phases_steps_checkpoints_and_exports_in_order(tmp_path):
    rec, second = Recorder(), Recorder()
    tr = _trainer(_cfg(stages=("stage1", "stage2"), alignment=AlignmentConfig()), callbacks=[rec, second])
    tr.fit(checkpoint_dir=tmp_path, checkpoint_every=4, keep_last=1)
    assert tr.done and tr.state.iteration == TOTAL
    assert rec.events == _expected(4)
    assert second.events == rec.events  # every callback, in the order given
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_{TOTAL:08d}"]


def test_anything_but_a_callback_is_refused_up_front():
    with pytest.raises(TypeError, match="OnStep"):
        _trainer(callbacks=[lambda trainer, metrics: None])
    seen = []
    tr = _trainer(callbacks=[OnStep(lambda trainer, metrics: seen.append(trainer.state.iteration))])
    tr.fit(max_iterations=2)
    assert seen == [1, 2]
