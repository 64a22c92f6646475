"""Model references (built-ins, presets, folders, Hub ids), the module tree and weights on disk."""

from studio.errors import ModelRefError  # noqa: F401
from studio.models.registry import (  # noqa: F401
    ASSETS,
    BUILTIN_VERSION,
    BUILTINS,
    CHAT_TEMPLATE,
    PRESETS_DIR,
    SEED,
    TINY_GPT2,
    TINY_LLAMA,
    ModelSource,
    build_meta_model,
    byte_tokenizer,
    cache_dir,
    catalog,
    load_hf_config,
    load_model,
    load_tokenizer,
    model_class,
    model_dir,
    presets,
    resolve,
    resolve_dtype,
    summary,
)
