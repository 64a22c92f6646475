"""Every touch of a private (or undocumented) API of transformers, peft and gradio, in one place.

Each is a small named function (one mixin) that says what it reaches and why the public API
does not do: when a release renames one, this is the only file to change, and
tests/test_compat.py names the library and version that broke it. Nothing is imported at module
level, so any layer may import this without paying for (or depending on) the libraries it does
not use; no engine module imports gradio through it either: the gradio helpers only read
attributes of the objects the UI hands them.
"""

from __future__ import annotations

# --- transformers ---------------------------------------------------------------------------


def auto_model_class(auto_cls, config):
    """The model class an Auto class maps this config's type to (`_BaseAutoModelClass._model_mapping`).

    Public API only builds an instance (`from_config`); the studio needs the class itself, to
    build it on the meta device and to name it, without running its constructor. Raises
    KeyError when the config type has no such class.
    """
    return auto_cls._model_mapping[type(config)]


def model_from_config(model_cls, config):
    """A model of a concrete class built from a config, no weights (`PreTrainedModel._from_config`).

    `from_config` exists only on the Auto classes; `_from_config` is what they call underneath
    and honours the config's dtype and attention implementation. Called under
    `torch.device("meta")` it costs no memory.
    """
    return model_cls._from_config(config)


def tied_weight_pairs(model) -> dict[str, str]:
    """{tied name: source name} of a model, e.g. {"lm_head.weight": "model.embed_tokens.weight"}.

    transformers 5 fills `all_tied_weights_keys` in `post_init`, empty when the config unties
    the pair; the class attribute `_tied_weights_keys` declares the pairs a class *can* tie
    (tied or not), so it is read only on a model that never ran `post_init`. Neither is
    documented; {} when the model ties nothing.
    """
    pairs = getattr(model, "all_tied_weights_keys", None)
    if pairs is None:
        pairs = getattr(model, "_tied_weights_keys", None)
    return dict(pairs) if isinstance(pairs, dict) else {}


class DeferCheckpointRotation:
    """Trainer mixin: `Trainer._save_checkpoint` saves with `save_total_limit` off.

    `_save_checkpoint` writes a checkpoint and then deletes old ones; there is no public hook
    between the two. The studio marks a checkpoint complete in its `on_save` callback, which
    runs after `_save_checkpoint` returns, and rotates only then (`rotate_checkpoints`): a kill
    between writing and marking can then never leave no complete checkpoint to resume from.
    Put it before `Trainer` in the bases; override `checkpoint_save_started` to see a save begin.
    """

    def checkpoint_save_started(self) -> None:
        """Called as each checkpoint save begins."""

    def _save_checkpoint(self, model, trial):
        self.checkpoint_save_started()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit


def rotate_checkpoints(output_dir: str, save_total_limit: int, best_model_checkpoint: str | None) -> None:
    """Delete old checkpoints as Trainer does (`transformers.trainer.rotate_checkpoints`).

    Undocumented; looked up where Trainer's `_save_checkpoint` finds it (the trainer module),
    so the rule for which ones survive (the newest, the best) stays transformers' own.
    """
    from transformers import trainer as hf_trainer

    hf_trainer.rotate_checkpoints(output_dir=output_dir, save_total_limit=save_total_limit,
                                  best_model_checkpoint=best_model_checkpoint, use_mtime=True)


# --- peft -----------------------------------------------------------------------------------


def peft_moe_retargets(model_type: str) -> bool:
    """Whether PEFT re-targets this model type's MoE experts (fused parameters in transformers 5).

    Read from `peft.utils.transformers_weight_conversion._MODEL_TO_CONVERSION_PATTERN` and
    `_MOE_TARGET_MODULE_MAPPING`, PEFT's private tables for that rewrite; no public function
    says it. False on a PEFT without the conversion (it counts modules as they are).
    """
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:
        return False
    return bool(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type, "")))


def is_excluded_match(hit) -> bool:
    """Whether `check_target_module_exists` answered "excluded" (`peft...tuners_utils._ExcludedModule`).

    It returns an `_ExcludedModule` marker for a module that matches a target but also
    `exclude_modules`; the marker is falsy in PEFT 0.21, and compared by class (else by class
    name) so that a release which makes it truthy cannot turn an excluded module into a target.
    """
    try:
        from peft.tuners.tuners_utils import _ExcludedModule
    except ImportError:
        return type(hit).__name__ == "_ExcludedModule"
    return isinstance(hit, _ExcludedModule)


# --- gradio ---------------------------------------------------------------------------------


def gradio_queue(demo):
    """The Blocks' event queue (`Blocks._queue`), or None; its idle-poll intervals have no setting."""
    return getattr(demo, "_queue", None)


def gradio_launch_without_self_check() -> dict:
    """`launch` keywords that skip gradio's request to its own page right after it starts serving.

    Gradio 6 sends one HEAD to its local URL and exits ("When localhost is not accessible, a
    shareable link must be created") at the first refused connection or after 3 s; on a loaded
    machine its own server thread is often not listening yet, and the studio never shares a link.
    The switch is the private `_frontend` parameter, used for that check alone; {} when it is gone.
    """
    import inspect

    import gradio as gr

    return {"_frontend": False} if "_frontend" in inspect.signature(gr.Blocks.launch).parameters else {}


def gradio_app(scope):
    """The gradio `App` behind an ASGI scope, or None when the app is not gradio's (or changed).

    Recognised by the attributes `gradio_logged_in` reads (`App.tokens`, `App.cookie_id`).
    """
    app = scope.get("app")
    return app if hasattr(app, "tokens") and hasattr(app, "cookie_id") else None


def gradio_logged_in(app, cookies) -> bool:
    """Whether the request's cookies carry a login gradio issued (`App.tokens`, `App.cookie_id`).

    Gradio keeps its sessions in `App.tokens` (access token -> user) under cookies named after
    `App.cookie_id`; it has no public "is this request logged in" for a middleware to ask.
    """
    token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
    return app.tokens.get(token) is not None
