"""Task configurations (YAML and BERT JSON files) and the functions that load, check and save them."""

from configs.loader import (
    apply_overrides,
    dump_config,
    load_config,
    parse_value,
    resolve_config_path,
    save_config,
)
from configs.schema import (
    COMMON_OPTIONAL,
    SECTION_SCHEMAS,
    TASK_SCHEMAS,
    ConfigError,
    ConfigWarning,
    FilledConfig,
    SectionSchema,
    TaskSchema,
    as_written,
    canonical_task,
    extend_schema,
    validate_config,
    with_defaults,
)

__all__ = [
    "COMMON_OPTIONAL",
    "SECTION_SCHEMAS",
    "TASK_SCHEMAS",
    "ConfigError",
    "ConfigWarning",
    "FilledConfig",
    "SectionSchema",
    "TaskSchema",
    "apply_overrides",
    "as_written",
    "canonical_task",
    "dump_config",
    "extend_schema",
    "load_config",
    "parse_value",
    "resolve_config_path",
    "save_config",
    "validate_config",
    "with_defaults",
]
