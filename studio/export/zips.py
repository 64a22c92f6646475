"""Zips for download: a trained adapter (with a README that loads it) and a merged model.

Both are written to a hidden name next to the destination and renamed when complete, so a
download link never points at half a zip. Weights are stored, not deflated: float weights
barely compress (a few percent) and deflating gigabytes costs minutes. zipfile streams each
file in chunks, so a multi-gigabyte model never passes through memory.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from studio.adapters.file import CONFIG_NAME, WEIGHTS_NAME, AdapterFile
from studio.errors import ExportError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)
_AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
               "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification"}



def export_adapter_zip(adapter_dir, dest_zip, *, base_name: str | None = None) -> Path:
    """The adapter's config and weights (+ tokenizer files) + a README, as one zip.

    Files sit in a folder named after the zip, so unzipping gives a folder PEFT loads as is.
    `base_name` is the base model named in the README (default: the adapter config's
    base_model_name_or_path).
    """
    adapter_dir, dest_zip = Path(adapter_dir), Path(dest_zip)
    for need in (CONFIG_NAME, WEIGHTS_NAME):
        if not (adapter_dir / need).is_file():
            raise ExportError(f"cannot export {adapter_dir}: {need} is missing")
    adapter = AdapterFile(adapter_dir, error=ExportError)
    folder = dest_zip.stem
    files = adapter.files() + [adapter_dir / n for n in TOKENIZER_FILES if (adapter_dir / n).is_file()]
    readme = adapter_readme(adapter.config, folder, base_name)
    return _write_zip(dest_zip, folder, files, {"README.md": readme})


def export_merged_zip(merged_dir, dest_zip) -> Path:
    """Every file of a merged model folder, in a zip (stored, so it streams at disk speed)."""
    merged_dir, dest_zip = Path(merged_dir), Path(dest_zip)
    if not (merged_dir / "config.json").is_file() or not any(merged_dir.glob("*.safetensors")):
        raise ExportError(f"{merged_dir} is not a merged model (config.json and *.safetensors expected)")
    files = sorted(p for p in merged_dir.iterdir() if p.is_file())
    return _write_zip(dest_zip, dest_zip.stem, files, {})


def adapter_readme(cfg: dict, folder: str, base_name: str | None = None) -> str:
    base = base_name or cfg.get("base_model_name_or_path") or "BASE_MODEL"
    auto = _AUTO_CLASS.get(cfg.get("task_type") or "", "AutoModelForCausalLM")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    scaling = "?"
    if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r:
        scaling = f"{alpha / (r ** 0.5 if cfg.get('use_rslora') else r):g}"
    return (
        f"# LoRA adapter for {base}\n\n"
        f"Made with LoRA Studio. r = {r}, lora_alpha = {alpha}, scaling = {scaling}"
        f"{' (rsLoRA: lora_alpha / sqrt(r))' if cfg.get('use_rslora') else ''}, "
        f"target_modules = {cfg.get('target_modules')}, task_type = {cfg.get('task_type')}.\n\n"
        "## Load it with PEFT\n\n"
        "```python\n"
        f"from transformers import {auto}\n"
        "from peft import PeftModel\n"
        f"model = PeftModel.from_pretrained({auto}.from_pretrained({base!r}), {folder!r})\n"
        "```\n\n"
        "`model.merge_and_unload()` folds it into the weights; `studio merge` does the same one tensor "
        "at a time, without loading the model.\n\n"
        f"## {CONFIG_NAME}\n\n"
        f"```json\n{json.dumps(cfg, indent=2, sort_keys=True)}\n```\n"
    )


def _write_zip(dest: Path, folder: str, files: list[Path], extra: dict[str, str]) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as z:
            for p in files:
                packed = p.suffix in (".safetensors", ".bin", ".model")
                z.write(p, f"{folder}/{p.name}", compress_type=zipfile.ZIP_STORED if packed else zipfile.ZIP_DEFLATED)
            for name, text in extra.items():
                z.writestr(f"{folder}/{name}", text, compress_type=zipfile.ZIP_DEFLATED)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
