"""The file names and key prefix of a PEFT adapter folder: PEFT's own constants, without importing
torch, so the run folder's owner can ask for them while listing runs stays light. Everything else
about the adapter file (keys, factors, settings) is read in file.py."""

CONFIG_NAME = "adapter_config.json"        # PEFT's CONFIG_NAME
WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's SAFETENSORS_WEIGHTS_NAME
PEFT_PREFIX = "base_model.model."          # PeftModel -> LoraModel -> the transformers model
