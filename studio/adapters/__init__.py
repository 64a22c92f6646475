"""Adapters: the PEFT LoRA adapter file (`file.py`, the one reader of its names, keys and settings)."""

from studio.adapters.file import (  # noqa: F401
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFile,
    LoraModule,
    has_weights,
    module_path,
    pickled_reason,
    present,
)
