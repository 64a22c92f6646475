"""LoRA with PEFT's own rules: targets, exact trainable-parameter counts, the LoraConfig."""

from studio.errors import TargetError  # noqa: F401
from studio.lora.count import SWEEP_RANKS, Count, check, count, peft_rewrites_targets, render_sweep, sweep, target_sets  # noqa: F401
from studio.lora.targets import (  # noqa: F401
    ALL_LINEAR,
    SEQ_CLS_MODULES_TO_SAVE,
    TASK_TYPES,
    Resolution,
    build_lora_config,
    compact_targets,
    peft_config,
    resolve_targets,
    suggest,
)
