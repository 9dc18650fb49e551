"""What a Ray Train rank prints (dd2dist.launch.quiet): progress and warnings on the console, everything in its log
file; the listed dependency warnings nowhere, any other warning as before."""

import logging
import warnings

import pytest

from dd2dist.launch.quiet import PROGRESS_LOGGER, prints_to_log, quiet_warnings, rank_logs


@pytest.fixture
def ray_like_logging():
    """A function adding console handlers to the root and the (not propagating) ray.train logger, as Ray Train
    configures a worker; afterwards the loggers are as they were."""
    loggers = [logging.getLogger(), logging.getLogger("ray.train")]
    # levels an earlier test in this process may have left on Ray's loggers (a driver's Ray Train run sets them)
    reporter = logging.getLogger("ray.train.v2._internal.execution.context")
    saved = [(lg.level, lg.propagate) for lg in loggers]
    saved_reporter = reporter.level
    added = []

    def configure():
        for logger in loggers:
            added.append(logging.StreamHandler())  # the current sys.stderr: the test's capture
            logger.addHandler(added[-1])
        loggers[0].setLevel(logging.INFO)
        loggers[1].setLevel(logging.INFO)
        loggers[1].propagate = False
        reporter.setLevel(logging.NOTSET)

    yield configure
    for logger, (level, propagate) in zip(loggers, saved):
        for handler in logger.handlers[:]:
            if handler in added or getattr(handler, "dd2dist_rank_log", False):
                logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    reporter.setLevel(saved_reporter)
    logging.captureWarnings(False)


def test_listed_dependency_warnings_are_dropped_and_others_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning, stacklevel=1)
        warnings.warn("`torch.distributed.something_else` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("our own warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`torch.distributed.something_else` is deprecated",
                                                "our own warning"]


def test_rank_console_shows_progress_and_warnings_and_the_file_holds_everything(tmp_path, capsys,
                                                                               ray_like_logging):
    ray_like_logging()
    ray_train = logging.getLogger("ray.train")
    path = rank_logs(tmp_path / "run", rank=1)
    logging.getLogger("ray.train.v2._internal.execution.context").info(
        "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'loss': 1.0}) from rank 1")
    ray_train.info("Checkpoint successfully created at: Checkpoint(...)")
    logging.getLogger("dd2dist.train").info("student: inputs through the soft rule")
    logging.getLogger(PROGRESS_LOGGER).info("stage1 student  step 4/4  12.5 samples/s  done in 3s")
    logging.getLogger("dd2dist.train").warning("rank 1: stopping after iteration 7")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something a dependency says", UserWarning, stacklevel=1)

    out, err = capsys.readouterr()
    assert out == "stage1 student  step 4/4  12.5 samples/s  done in 3s\n"
    console = [line for line in err.splitlines() if not line.startswith(" ")]  # a warning's source line is indented
    assert console[0] == "[rank 1] WARNING dd2dist.train: rank 1: stopping after iteration 7"
    assert console[1].startswith("[rank 1] WARNING py.warnings: ") and "something a dependency says" in console[1]
    assert len(console) == 2
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = path.read_text()
    assert path == tmp_path / "run" / "logs" / "rank1.log"
    for line in ("TrainingReport(checkpoint=None", "Checkpoint successfully created", "soft rule", "step 4/4",
                 "stopping after iteration 7", "something a dependency says"):
        assert line in text, line

    rank_logs(tmp_path / "run", rank=1)  # a second call (a restarted worker) replaces its handlers
    logging.getLogger("dd2dist.train").warning("once")
    assert capsys.readouterr().err.count("once") == 1


def test_prints_of_a_block_go_to_the_log(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="deepspeed"), prints_to_log("deepspeed"):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("two", "parts", end="")
    assert capsys.readouterr().out == ""
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("deepspeed", "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"),
        ("deepspeed", "two parts")]
