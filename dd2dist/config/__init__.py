"""Typed, frozen experiment configuration: YAML + ``--set`` overrides -> validated dataclasses -> resolved dump.

Every job does::

    parser = add_config_args(argparse.ArgumentParser())
    args, cfg = parse_config_args(parser)               # all validation happens here; bad config -> exit 2
    dump_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))

See :mod:`dd2dist.config.loader` for the merge rules and :mod:`dd2dist.config.typed` for the checks.
"""

from dd2dist.config.loader import (
    add_config_args,
    apply_overrides,
    config_from_args,
    dump_yaml,
    load_config,
    parse_config_args,
    parse_override,
    parse_yaml,
    read_yaml_tree,
    to_yaml,
)
from dd2dist.config.schema import (
    AlignmentConfig,
    CompactHeadConfig,
    DataConfig,
    EngineConfig,
    EvalConfig,
    ExperimentConfig,
    LaunchConfig,
    Stage1Config,
    Stage2Config,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
)
from dd2dist.config.typed import (
    ConfigError,
    deep_merge,
    field_type,
    fingerprint,
    flatten,
    from_dict,
    to_dict,
    validate,
)

__all__ = [
    "AlignmentConfig", "CompactHeadConfig", "ConfigError", "DataConfig", "EngineConfig", "EvalConfig",
    "ExperimentConfig", "LaunchConfig", "Stage1Config", "Stage2Config", "StudentConfig", "TeacherConfig",
    "TrackingConfig",
    "add_config_args", "apply_overrides", "config_from_args", "deep_merge", "dump_yaml", "field_type",
    "fingerprint", "flatten", "from_dict", "load_config", "parse_config_args", "parse_override", "parse_yaml",
    "read_yaml_tree", "to_dict", "to_yaml", "validate",
]
