"""The embedded Ray's worker setup: every process, detached actors included (Ray Train's controller starts its
placement-group cleaner as one), gets dd2dist.launch.quiet's logger levels, warnings filters and worker env."""

import logging

from dd2dist.launch.quiet import EMBEDDED_WORKER_ENV, QUIET_EMBEDDED_LOGGERS, QUIET_LOGGERS


def test_embedded_ray_workers_and_their_detached_actors_are_quiet(ray_session):
    ray = ray_session

    def setup():  # defined in the test so that Ray ships it by value: the test module is not importable there
        import logging
        import os
        import warnings

        from dd2dist.launch.quiet import EMBEDDED_WORKER_ENV, QUIET_EMBEDDED_LOGGERS, QUIET_LOGGERS

        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning, stacklevel=1)
            warnings.warn("a warning nobody listed", FutureWarning, stacklevel=1)
        return ({name: logging.getLogger(name).getEffectiveLevel()
                 for name in {**QUIET_LOGGERS, **QUIET_EMBEDDED_LOGGERS}},
                {key: os.environ.get(key) for key in EMBEDDED_WORKER_ENV}, [str(w.message) for w in caught])

    @ray.remote(num_cpus=0)
    class Leaf:
        def setup(self):
            return setup()

    @ray.remote(num_cpus=0)
    class Parent:  # Ray Train's controller starts the cleaner as a detached actor like this
        def child_setup(self):
            import ray as worker_ray

            leaf = Leaf.options(lifetime="detached").remote()
            try:
                return worker_ray.get(leaf.setup.remote())
            finally:
                worker_ray.kill(leaf)

    quiet = ({**QUIET_LOGGERS, **QUIET_EMBEDDED_LOGGERS}, EMBEDDED_WORKER_ENV, ["a warning nobody listed"])
    assert ray.get(ray.remote(num_cpus=0)(setup).remote()) == quiet
    assert ray.get(Parent.remote().child_setup.remote()) == quiet
    assert logging.getLogger("torch.utils.cpp_extension").getEffectiveLevel() == logging.ERROR  # the driver's
