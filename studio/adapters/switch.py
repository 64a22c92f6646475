"""Switching a PeftModel between its loaded adapters without walking the whole model each time.

PEFT's `PeftModel.set_adapter` walks every module of the model twice per call (once for the
modules_to_save wrappers, once for the LoRA layers): on SmolLM2 with three adapters loaded that
is 3,759 modules and 42 ms a switch, paid before every generation the Playground streams. Here
the LoRA layers and the wrappers are found once, and a switch calls PEFT's own per-layer
`set_adapter` on them, in inference mode (no adapter becomes trainable, as the default would
make it): the same state PEFT's call leaves, in half the time (bench/adapter_switch.py). The
layers are found again after an adapter is loaded or deleted (`refresh`), since loading one
with other targets adds layers.
"""

from __future__ import annotations


class AdapterSwitch:
    def __init__(self, model) -> None:
        self.model = model  # a PeftModel
        self.refresh()

    def refresh(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        modules = list(self.model.modules())
        self.layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        self.wrappers = [m for m in modules if isinstance(m, AuxiliaryTrainingWrapper)]

    def use(self, name: str) -> None:
        """Make the loaded adapter `name` the active one, as `PeftModel.set_adapter(name, inference_mode=True)`."""
        if name not in self.model.peft_config:
            raise ValueError(f"Adapter {name} not found.")
        for m in self.wrappers:  # peft.utils.other._set_adapter, over the wrappers found once
            found = m.check_set_adapter(name)
            m.set_adapter(found if found in m._adapters else [], inference_mode=True)
        for layer in self.layers:
            layer.set_adapter(name, inference_mode=True)
        self.model.active_adapter = name
        self.model.base_model.active_adapter = name
