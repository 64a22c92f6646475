"""Datasets: loading and checking files (load), tokenizing, masking and packing them (prepare)."""

from studio.data.load import (  # noqa: F401
    BUILTIN_DIR,
    FILE_KINDS,
    FORMATS,
    LABEL_COLUMNS,
    MAX_EXAMPLE_MB,
    ROLES,
    TEXT_COLUMNS,
    LoadedData,
    load_records,
)
from studio.data.prepare import (  # noqa: F401
    ALPACA_TEMPLATE,
    BUILTINS,
    IGNORE,
    PackedCollator,
    PadCollator,
    Prepared,
    alpaca_prompt,
    build_datasets,
    chat_prompt,
    list_builtin,
    pack,
    preview,
)
from studio.errors import DataError  # noqa: F401
