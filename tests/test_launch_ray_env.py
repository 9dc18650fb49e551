"""The embedded Ray's worker setup hook: Ray Train's placement-group cleaner must not flood the driver's output."""

import logging

from dd2dist.launch.ray_env import QUIET_RAY_LOGGERS


def test_embedded_ray_workers_and_their_detached_actors_are_quiet(ray_session):
    ray = ray_session

    def levels():  # defined in the test so that Ray ships it by value: the test module is not importable there
        import logging

        from dd2dist.launch.ray_env import QUIET_RAY_LOGGERS

        return [logging.getLogger(name).getEffectiveLevel() for name in QUIET_RAY_LOGGERS]

    @ray.remote(num_cpus=0)
    class Leaf:
        def levels(self):
            return levels()

    @ray.remote(num_cpus=0)
    class Parent:  # Ray Train's controller starts the cleaner as a detached actor like this
        def child_levels(self):
            import ray as worker_ray

            leaf = Leaf.options(lifetime="detached").remote()
            try:
                return worker_ray.get(leaf.levels.remote())
            finally:
                worker_ray.kill(leaf)

    quiet = [logging.ERROR] * len(QUIET_RAY_LOGGERS)
    assert ray.get(ray.remote(num_cpus=0)(levels).remote()) == quiet
    assert ray.get(Parent.remote().child_levels.remote()) == quiet
