"""The playground engine: base vs base + adapter, on one loaded model.

`PeftModel.from_pretrained` wraps the base layers in place, so "base" and "tuned" are the same
weights with the LoRA branch (and modules_to_save copies) off or on: never two copies of the
base. The switch is PEFT's own `disable_adapter_layers` / `enable_adapter_layers`, the calls
`PeftModel.disable_adapter()` makes; the context manager also walks the model for a status
report on every entry (10 ms on tiny-llama, more than a token costs), so the mode is tracked
and switched only when it changes.

Generation is a manual loop over a KV cache, one token per step, each step under the
playground's lock: streams (UI requests, the two columns of `side_by_side`) interleave step by
step, each with its own cache and mode, and no lock is held across a `yield`. Sampling draws
from a `torch.Generator` seeded per call: the same seed gives the same text. Prompts are the
training text (`alpaca_prompt`, `chat_prompt`, the trainer's BOS rule); `chat` renders each
column's own conversation (they differ once the replies do) with the chat template, a system
prompt first. Other adapters of the same base are PEFT's named adapters on the one model
(`add_adapter`, `load_adapters`), switched per step like the base (PEFT's per-layer set_adapter over
layers found once: studio.adapters.switch), never re-read. Classification runs get
`classify` and `eval_sample` (the eval split of `build_datasets`). Nothing here prints.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch

from studio import runs
from studio.adapters.file import AdapterFile, present
from studio.adapters.switch import AdapterSwitch
from studio.config import RunConfig, load_config
from studio.data.prepare import PadCollator, alpaca_prompt, build_datasets, chat_prompt, load_records
from studio.errors import PlaygroundError, StudioError
from studio.models.registry import load_model, load_tokenizer, resolve
from studio.runs.rundir import RunDir

TEMPLATES = ("auto", "alpaca", "chat", "none")
# The trained data format -> the prompt template that reproduces its text.
FORMAT_TEMPLATES = {"alpaca": "alpaca", "messages": "chat", "completion": "none", "text": "none",
                    "classification": "none"}
# One loaded model at a time: a second entry would hold a second base (a 7B model twice).
# Switching runs reloads; a dropped entry is freed once no stream still uses it.
CACHE_SIZE = 1
SIDE_BY_SIDE_CHUNK = 4  # tokens per turn: each turn may switch the adapter (a walk over the model)
CLASSIFY_BATCH = 32
MAX_ADAPTERS = 3  # loaded beside the run's own: each is a few MB, switching costs a walk over the layers
_MAX_LOOKUP_ROWS = 50_000  # beyond this, example texts are decoded from tokens instead of looked up



class Playground:
    """One base model, optionally with a run's adapter on it; thread-safe."""

    def __init__(self, model, tokenizer, *, task: str = "causal_lm", ref: str = "", has_adapter: bool = False,
                 run_dir: Path | None = None, cfg: RunConfig | None = None, id2label: dict | None = None,
                 template: str = "none", adapter_source: str | None = None, load_s: float = 0.0,
                 adapter_source_path: str | Path | None = None):
        self.model, self.tokenizer, self.task, self.ref = model, tokenizer, task, ref
        self.has_adapter, self.run_dir, self.cfg = has_adapter, run_dir, cfg
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.template, self.adapter_source, self.load_s = template, adapter_source, load_s
        self.device = next(model.parameters()).device
        self.last_stats: dict[str, dict] = {}  # "base" / "tuned" -> figures of the last finished generation
        self._lock = threading.Lock()
        self._adapter_on = has_adapter  # PeftModel.from_pretrained leaves the adapter enabled
        # Named adapters loaded on the one base: "default" is the run's own; add_adapter loads more.
        self.adapters: dict[str, str] = {"default": str(adapter_source_path)} if has_adapter else {}
        self._active = "default" if has_adapter else None
        self._switch: AdapterSwitch | None = None  # found on the first switch, again after a load or delete
        self._eval = None
        bos = tokenizer.bos_token_id
        # The trainer's rule (data._CausalEncoder): BOS only when the tokenizer itself adds one.
        self._bos = bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self._eos = {int(e) for e in eos | {tokenizer.eos_token_id} if e is not None}
        conf = model.config
        self.max_positions = (getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None)
                              or getattr(tokenizer, "model_max_length", None) or 2048)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def for_run(cls, run_dir, *, cache: bool = True) -> Playground:
        """The playground of a run: its base model with adapter/ (or its last complete checkpoint)."""
        run_dir = Path(run_dir).resolve()
        if not (run_dir / runs.CONFIG).is_file():
            raise PlaygroundError(f"{run_dir} is not a run folder (no {runs.CONFIG})")
        adapter, source = _adapter_dir(run_dir)
        # Opening refuses a pickle-only adapter by name before PEFT could torch.load it.
        weights = AdapterFile(adapter, error=PlaygroundError).weights_path
        key = ("run", str(run_dir), str(adapter), weights.stat().st_mtime_ns)
        make = lambda: cls._load_run(run_dir, adapter, source)
        return _cached(key, make) if cache else make()

    @classmethod
    def for_base(cls, ref: str, task: str = "causal_lm", *, id2label: dict | None = None, dtype: str = "auto",
                 cache: bool = True) -> Playground:
        """A playground of the base model alone (no adapter: only adapter=False calls work)."""
        if task not in ("causal_lm", "seq_cls"):
            raise PlaygroundError(f"task {task!r} is not one of: causal_lm, seq_cls")
        labels = tuple(sorted((int(k), str(v)) for k, v in (id2label or {}).items()))
        key = ("base", ref, task, labels, dtype)
        make = lambda: cls._load_base(ref, task, id2label, dtype)
        return _cached(key, make) if cache else make()

    @classmethod
    def _load_base(cls, ref, task, id2label, dtype) -> Playground:
        t0 = time.perf_counter()
        model, tok = _base_model(ref, task, id2label, dtype, seed=0)
        if task == "seq_cls" and not id2label:
            id2label = dict(model.config.id2label)
        return cls(model, tok, task=task, ref=ref, id2label=id2label, load_s=time.perf_counter() - t0)

    @classmethod
    def _load_run(cls, run_dir: Path, adapter: Path, source: str) -> Playground:
        from peft import PeftModel

        try:
            cfg = load_config(run_dir / runs.CONFIG)
        except StudioError as e:
            raise PlaygroundError(str(e).splitlines()[0]) from None
        m = cfg.model
        t0 = time.perf_counter()
        id2label = _run_labels(run_dir, adapter) if m.task == "seq_cls" else None
        # The trainer seeds before loading, so a new head starts from the same draw: "base" is then
        # the run's model at step 0 (for causal LMs nothing is drawn and the seed changes nothing).
        base, tok = _base_model(m.name_or_path, m.task, id2label, m.dtype, seed=cfg.train.seed,
                                trust_remote_code=m.trust_remote_code)
        try:
            model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            raise PlaygroundError(f"cannot load the adapter {adapter} on {m.name_or_path}: "
                                  f"{_first_line(e)}") from None
        model.eval()
        return cls(model, tok, task=m.task, ref=m.name_or_path, has_adapter=True, run_dir=run_dir, cfg=cfg,
                   id2label=id2label, template=_run_template(run_dir, cfg), adapter_source=source,
                   load_s=time.perf_counter() - t0, adapter_source_path=adapter)

    def info(self) -> dict:
        """Plain facts for the UI header."""
        base = self.model.get_base_model() if self.has_adapter else self.model
        return {"ref": self.ref, "task": self.task, "run_dir": str(self.run_dir) if self.run_dir else None,
                "has_adapter": self.has_adapter, "adapter_source": self.adapter_source, "template": self.template,
                "labels": [self.id2label[i] for i in sorted(self.id2label)] or None, "device": str(self.device),
                "dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
                "load_s": round(self.load_s, 3), "max_positions": self.max_positions}

    # --- prompts ------------------------------------------------------------------------------

    def format_prompt(self, text: str, template: str = "auto") -> str:
        """The text the model reads: the run's training template around `text` (or `text` as is)."""
        if template not in TEMPLATES:
            raise PlaygroundError(f"template {template!r} is not one of: {', '.join(TEMPLATES)}")
        template = self.template if template == "auto" else template
        if template == "alpaca":
            return alpaca_prompt(text)
        if template == "chat":
            return chat_prompt(self.tokenizer, [{"role": "user", "content": text}])
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of a formatted prompt, with BOS exactly when the trainer adds one."""
        ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        if self._bos is not None and not text.startswith(self.tokenizer.bos_token or "\0"):
            ids.insert(0, self._bos)
        return ids

    # --- generation ---------------------------------------------------------------------------

    def stream(self, prompt: str, *, adapter: bool = True, max_new_tokens: int = 64, temperature: float = 0.7,
               top_p: float = 0.9, seed: int = 0, template: str = "auto") -> Iterator[str]:
        """The generated text so far (cumulative), after each token; the last item is the whole answer."""
        steps = self._steps(prompt, adapter, max_new_tokens, temperature, top_p, seed, template)
        return self._texts(steps)

    def generate(self, prompt: str, *, adapter: bool = True, max_new_tokens: int = 64, temperature: float = 0.7,
                 top_p: float = 0.9, seed: int = 0, template: str = "auto") -> str:
        """The generated text (what the last item of `stream` is), without decoding at every token."""
        ids = list(self._steps(prompt, adapter, max_new_tokens, temperature, top_p, seed, template))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def side_by_side(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.9,
                     seed: int = 0, template: str = "auto") -> Iterator[tuple[str, str]]:
        """(base_so_far, tuned_so_far) as both fill up, a few tokens of each in turn; same seed for both."""
        if not self.has_adapter:
            raise PlaygroundError(self._no_adapter())
        args = (max_new_tokens, temperature, top_p, seed, template)
        # Both built now, so bad arguments raise here rather than at the first next().
        texts = [self._texts(self._steps(prompt, False, *args)), self._texts(self._steps(prompt, True, *args))]
        return self._interleave(texts)

    def add_adapter(self, ref: str, name: str | None = None) -> str:
        """Load another adapter of the same base onto the loaded model (PEFT's named adapters): once,
        then switched per generation with `adapter=NAME`, never re-read. Returns its name."""
        from studio.adapters import library

        if not self.has_adapter:
            raise PlaygroundError(self._no_adapter())
        return self._add_entry(library.resolve(ref, self.run_dir.parent if self.run_dir else None), name)

    def _add_entry(self, entry, name: str | None = None) -> str:
        from studio.adapters import library

        name = name or entry.name
        if self.adapters.get(name) == entry.path:
            return name
        if name in self.adapters or not name.replace("-", "_").replace(".", "_").isidentifier():
            raise PlaygroundError(f"adapter name {name!r} is taken or not a plain name; pass another name")
        if len(self.adapters) > MAX_ADAPTERS:
            raise PlaygroundError(f"at most {MAX_ADAPTERS} adapters beside the run's own are loaded at once")
        mine = library.Entry("run", "", self.ref, self.task, "run", None, None, [], 0)
        if not library.same_base(mine, entry):
            raise PlaygroundError(f"{entry.name} was trained on {entry.base}, not on {self.ref}; "
                                  "adapters of another base cannot be loaded onto this one")
        with self._lock:
            try:
                self.model.load_adapter(entry.path, adapter_name=_peft_name(name), is_trainable=False)
                self._switch = None
            except (ValueError, OSError, RuntimeError, KeyError) as e:
                raise PlaygroundError(f"cannot load the adapter {entry.path} on {self.ref}: {_first_line(e)}") from None
            self._set_adapter(self._active)  # load_adapter may leave another adapter active
        self.adapters[name] = entry.path
        return name

    def load_adapters(self, refs: list[str]) -> list[str]:
        """Make the adapters `refs` (run folders, adapter folders, library names) loaded, each once;
        returns their names here, in order. The run's own adapter is "default"; others loaded
        before stay until room is needed for new ones, then those not asked for now are dropped."""
        from studio.adapters import library

        if not self.has_adapter:
            raise PlaygroundError(self._no_adapter())
        root = self.run_dir.parent if self.run_dir else None
        found = [library.resolve(r, root) for r in refs]
        paths = [str(Path(e.path).resolve()) for e in found]
        by_path = {str(Path(p).resolve()): n for n, p in self.adapters.items()}
        beside = {p for p in paths if by_path.get(p) != "default"}  # the run's own is loaded already
        if len(beside) > MAX_ADAPTERS:
            raise PlaygroundError(f"{len(beside)} adapters picked beside the run's own; at most {MAX_ADAPTERS} "
                                  "are loaded at once")
        missing = {p: e for p, e in zip(paths, found) if p not in by_path}
        spare = [n for n, p in self.adapters.items() if n != "default" and str(Path(p).resolve()) not in paths]
        while spare and len(self.adapters) - 1 + len(missing) > MAX_ADAPTERS:
            self.remove_adapter(spare.pop(0))
        for p, e in missing.items():
            k = 1
            while f"extra-{k}" in self.adapters:
                k += 1
            by_path[p] = self._add_entry(e, name=f"extra-{k}")
        return [by_path[p] for p in paths]

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter added with add_adapter (PEFT's delete_adapter); the run's own stays."""
        if name == "default" or name not in self.adapters:
            raise PlaygroundError(f"adapter {name!r} cannot be removed; loaded beside the run's own: "
                                  f"{', '.join(n for n in self.adapters if n != 'default') or 'none'}")
        with self._lock:
            if self._active == name:
                self._set_adapter("default")
            self.model.delete_adapter(_peft_name(name))
            self._switch = None
        del self.adapters[name]

    def select(self, adapter) -> None:
        """Switch the model to the base (False), the run's own adapter (True) or a loaded one by name,
        for callers that run `self.model` themselves (batched evaluation); streams switch on their own."""
        with self._lock:
            self._set_adapter(self._mode(adapter))

    def format_chat(self, messages: list[dict], system: str = "") -> str:
        """A conversation as the model reads it before its next reply: the chat template (the one runs
        on messages train with), the system prompt first when there is one."""
        msgs = ([{"role": "system", "content": system}] if system and system.strip() else []) + list(messages)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise PlaygroundError(f"message {i} must be {{'role': system|user|assistant, 'content': text}}, "
                                      f"got {m!r}"[:300])
        return chat_prompt(self.tokenizer, msgs, add_generation_prompt=True)

    def chat(self, conversations: dict[str, list[dict]], *, system: str = "", max_new_tokens: int = 64,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> Iterator[dict[str, str]]:
        """Each column's next reply so far, as all fill up in turns. `conversations` maps "base" or a
        loaded adapter's name ("default": the run's own) to that column's own messages, which end
        with the user's turn: each column keeps its own history, since their replies differ."""
        columns = list(conversations)
        for c in columns:
            if c != "base" and c not in self.adapters:
                raise PlaygroundError(f"adapter {c!r} is not loaded; loaded: {', '.join(self.adapters) or 'none'}")
        args = (max_new_tokens, temperature, top_p, seed, "none")
        texts = [self._texts(self._steps(self.format_chat(conversations[c], system), False if c == "base" else c,
                                         *args)) for c in columns]
        for row in self._interleave(texts):
            yield dict(zip(columns, row))

    def compare(self, prompt: str, adapters: list[str] | None = None, *, max_new_tokens: int = 64,
                temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                template: str = "auto") -> Iterator[dict[str, str]]:
        """{"base": text, name: text, ...} as all fill up in turns: the base and each loaded adapter."""
        names = list(adapters or self.adapters)
        for n in names:
            if n not in self.adapters:
                raise PlaygroundError(f"adapter {n!r} is not loaded; loaded: {', '.join(self.adapters) or 'none'}")
        args = (max_new_tokens, temperature, top_p, seed, template)
        columns = ["base", *names]
        texts = [self._texts(self._steps(prompt, False if c == "base" else c, *args)) for c in columns]
        for row in self._interleave(texts):
            yield dict(zip(columns, row))

    @staticmethod
    def _interleave(texts: list[Iterator[str]]) -> Iterator[tuple[str, ...]]:
        """The texts so far, as a tuple, a few tokens of each in turn (one per column)."""
        cur, live, shown = [""] * len(texts), [True] * len(texts), None
        while any(live):
            for i in range(len(texts)):
                for _ in range(SIDE_BY_SIDE_CHUNK if live[i] else 0):
                    nxt = next(texts[i], None)
                    if nxt is None:
                        live[i] = False
                        break
                    cur[i] = nxt
                if tuple(cur) != shown:
                    shown = tuple(cur)
                    yield shown
        if shown is None:
            yield tuple(cur)

    def empty_answer_note(self, mode: str = "tuned", template: str = "auto") -> str | None:
        """Why the last generation of `mode` ("base", "tuned" or an adapter name) shows no text, for a
        caller whose decoded answer came out empty: it ended at once on an end-of-text token, or wrote
        only special tokens (which are not shown); with the template to choose when the one used is
        not the run's. None when it was never run."""
        st = self.last_stats.get(mode)
        if not st:
            return None
        new = st.get("new_tokens") or 0
        note = ("The model ended its answer at once: its first token was end-of-text." if not new else
                f"The model wrote {new} tokens that are all special or blank, and those are not shown.")
        used = self.template if template == "auto" else template
        if used != self.template:
            how = ("the text as typed, without a template" if used == "none" else f"the {used} template")
            note += (f" The prompt went in as {how}, but this run was trained on the {self.template} template; "
                     f"choose auto (or {self.template}).")
        return note

    def logits(self, text: str, *, adapter: bool = True, template: str = "none") -> torch.Tensor:
        """Logits at every position of the (formatted) text, shape [tokens, vocab or labels], on the CPU."""
        if adapter and not self.has_adapter:
            raise PlaygroundError(self._no_adapter())
        ids = torch.tensor([self.encode(self.format_prompt(text, template))], device=self.device)
        with self._lock, torch.inference_mode():
            self._set_adapter(self._mode(adapter))
            return self.model(input_ids=ids).logits[0].float().cpu()

    def _steps(self, prompt, adapter, max_new_tokens, temperature, top_p, seed, template) -> Iterator[int]:
        """New token ids one at a time; stops at EOS or after max_new_tokens."""
        self._need("causal_lm", "generation")
        _check_sampling(max_new_tokens, temperature, top_p, seed)
        if adapter and not self.has_adapter:
            raise PlaygroundError(self._no_adapter())
        if not isinstance(prompt, str):
            raise PlaygroundError(f"prompt must be text, got {type(prompt).__name__}")
        if max_new_tokens >= self.max_positions:
            raise PlaygroundError(f"max_new_tokens = {max_new_tokens} leaves no room for the prompt in the "
                                  f"model's {self.max_positions} positions")
        ids = self.encode(self.format_prompt(prompt, template)) or [self.tokenizer.bos_token_id]
        if ids[0] is None:
            raise PlaygroundError("the prompt is empty and the tokenizer has no BOS token to start from")
        ids = ids[-(self.max_positions - max_new_tokens):]  # keep the end of a prompt too long to fit
        return self._loop(ids, self._mode(adapter), max_new_tokens, float(temperature), float(top_p), int(seed))

    def _loop(self, ids, adapter, max_new_tokens, temperature, top_p, seed) -> Iterator[int]:
        gen = torch.Generator().manual_seed(seed)
        mode = "base" if adapter is None else ("tuned" if adapter == "default" else adapter)
        seq, cache, new, why = list(ids), None, 0, "max_new_tokens"
        inp = torch.tensor([seq], device=self.device)
        t0 = time.perf_counter()
        for _ in range(max_new_tokens):
            with self._lock, torch.inference_mode():
                self._set_adapter(adapter)
                out = self.model(input_ids=inp, past_key_values=cache, use_cache=True)
            cache = getattr(out, "past_key_values", None)
            tok = _pick(out.logits[0, -1], temperature, top_p, gen)
            if tok in self._eos:
                why = "eos"
                break
            new += 1
            seq.append(tok)
            yield tok
            # A model that returns no cache is fed the whole sequence again.
            inp = torch.tensor([[tok]] if cache is not None else [seq], device=self.device)
        dt = time.perf_counter() - t0
        self.last_stats[mode] = {"prompt_tokens": len(ids), "new_tokens": new, "seconds": round(dt, 4),
                                 "tokens_per_s": round(new / dt, 1) if dt > 0 else None, "stopped": why}

    def _texts(self, steps: Iterator[int]) -> Iterator[str]:
        ids, last = [], None
        for tok in steps:
            ids.append(tok)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            # A byte-level token may end mid-character; wait for the rest instead of showing "\ufffd".
            if text != last and not text.endswith("\ufffd"):
                last = text
                yield text
        final = self.tokenizer.decode(ids, skip_special_tokens=True)
        if final != last:
            yield final

    def _mode(self, adapter) -> str | None:
        """adapter=False -> None (the base), True -> "default" (the run's own), a name -> that adapter."""
        if adapter is False or adapter is None:
            return None
        if adapter is True:
            adapter = "default"
        if adapter not in self.adapters:
            raise PlaygroundError(self._no_adapter() if not self.adapters else
                                  f"adapter {adapter!r} is not loaded; loaded: {', '.join(self.adapters)}")
        return adapter

    def _set_adapter(self, mode) -> None:
        """Switch the LoRA branch (and modules_to_save copies) off (None, False) or to one named adapter
        (True: the run's own); call with the lock held. Nothing is read from disk: a switch flips
        flags on the loaded layers."""
        if not self.has_adapter:
            return
        mode = "default" if mode is True else (None if mode is False else mode)
        base = self.model.base_model
        if mode is None:
            if self._adapter_on:
                base.disable_adapter_layers()
                self._adapter_on = False
            return
        if mode != self._active:
            if self._switch is None:
                self._switch = AdapterSwitch(self.model)
            self._switch.use(_peft_name(mode))
            self._active = mode
        if not self._adapter_on:
            base.enable_adapter_layers()
            self._adapter_on = True

    # --- classification -----------------------------------------------------------------------

    def classify(self, texts: list[str], adapter: bool | str = True) -> list[dict]:
        """Per text: {"label": predicted, "probs": {label: p}} (the probabilities sum to 1); adapter:
        False the base, True the run's own, or a loaded adapter's name."""
        self._need("seq_cls", "classify")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise PlaygroundError("classify takes a list of texts")
        if adapter and not self.has_adapter:
            raise PlaygroundError(self._no_adapter())
        if not texts:
            return []
        max_length = self.cfg.data.max_length if self.cfg else min(self.max_positions, self.tokenizer.model_max_length)
        enc = self.tokenizer(texts, truncation=True, max_length=max_length)
        feats = [{"input_ids": i, "attention_mask": a} for i, a in zip(enc["input_ids"], enc["attention_mask"])]
        return [self._row(p) for p in self._probs(feats, self._mode(adapter))]

    def eval_sample(self, n: int = 64, seed: int = 0, examples: int = 8) -> dict:
        """Accuracy of base and tuned on `n` rows of the eval split training held out ("split": "train"
        when the run had none); examples where base and tuned disagree come first."""
        self._need("seq_cls", "eval_sample")
        if not self.has_adapter or self.cfg is None:
            raise PlaygroundError("eval_sample needs a run (its eval split and its adapter); this playground has none")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PlaygroundError(f"n must be an integer >= 1, got {n!r}")
        ds, split, lookup = self._eval_split()
        idx = sorted(random.Random(seed).sample(range(len(ds)), min(n, len(ds))))
        rows = ds.select(idx)
        feats = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows]
        gold = [self.id2label.get(int(y), str(y)) for y in rows["labels"]]
        base = [self._row(p) for p in self._probs(feats, False)]
        tuned = [self._row(p) for p in self._probs(feats, True)]
        acc = {k: sum(p["label"] == g for p, g in zip(preds, gold)) / len(gold)
               for k, preds in (("base", base), ("tuned", tuned))}
        order = sorted(range(len(gold)), key=lambda i: base[i]["label"] == tuned[i]["label"])
        shown = [{"text": lookup.get(tuple(feats[i]["input_ids"])) or self.tokenizer.decode(
                      feats[i]["input_ids"], skip_special_tokens=True),
                  "gold": gold[i], "base": base[i]["label"], "tuned": tuned[i]["label"],
                  "base_p": base[i]["probs"][base[i]["label"]], "tuned_p": tuned[i]["probs"][tuned[i]["label"]]}
                 for i in order[:examples]]
        return {"split": split, "n": len(gold), "split_size": len(ds), "labels": [self.id2label[i] for i in
                sorted(self.id2label)], "accuracy": acc, "examples": shown}

    def _eval_split(self):
        if self._eval is None:
            try:
                prep = build_datasets(self.cfg, self.tokenizer)
                d = load_records(self.cfg.data.path, self.cfg.data.format)
            except StudioError as e:
                raise PlaygroundError(_first_line(e)) from None
            ds, split = (prep.eval, "eval") if prep.eval is not None and len(prep.eval) else (prep.train, "train")
            lookup = {}
            if d.num_rows <= _MAX_LOOKUP_ROWS:  # show the original sentences, not a detokenized guess
                texts = list(d.dataset[d.text_column])
                enc = self.tokenizer(texts, truncation=True, max_length=self.cfg.data.max_length)["input_ids"]
                lookup = {tuple(ids): t for ids, t in zip(enc, texts)}
            self._eval = (ds, split, lookup)
        return self._eval

    def _probs(self, feats: list[dict], adapter: bool) -> list[torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        collate, out = PadCollator(pad), []
        for i in range(0, len(feats), CLASSIFY_BATCH):
            batch = {k: v.to(self.device) for k, v in collate(feats[i:i + CLASSIFY_BATCH]).items()}
            with self._lock, torch.inference_mode():
                self._set_adapter(adapter)
                logits = self.model(**batch).logits
            out.extend(torch.softmax(logits.float(), dim=-1).cpu())
        return out

    def _row(self, p: torch.Tensor) -> dict:
        names = [self.id2label.get(i, f"LABEL_{i}") for i in range(p.shape[-1])]
        return {"label": names[int(p.argmax())], "probs": {n: float(x) for n, x in zip(names, p)}}

    # --- errors -------------------------------------------------------------------------------

    def _need(self, task: str, what: str) -> None:
        if self.task != task:
            name = f"run {self.run_dir.name}" if self.run_dir else f"model {self.ref}"
            raise PlaygroundError(f"{name} is {_TASK_WORDS[self.task]}, and {_ASKED[what]}; {_INSTEAD[self.task]}")

    def _no_adapter(self) -> str:
        return f"no adapter is loaded ({self.ref} base model only); pass adapter=False or open a run"


# What a person reads when a request does not fit the model's task (Playground._need).
_TASK_WORDS = {"causal_lm": "a text model (causal_lm): it writes text",
               "seq_cls": "a classifier (seq_cls): it picks one of its labels for a text"}
_ASKED = {"generation": "writing text needs a text model",
          "classify": "classifying needs a classifier",
          "eval_sample": "accuracy on held-out examples is measured for classifiers"}
_INSTEAD = {"causal_lm": "compare its answers with Generate (studio generate), or score them on held-out "
                         "examples in the Evaluate tab (studio eval)",
            "seq_cls": "type a text and press Generate to see the label it picks and its probabilities"}


# --- loading helpers ----------------------------------------------------------------------

def _base_model(ref: str, task: str, id2label: dict | None, dtype: str, seed: int, trust_remote_code: bool = False):
    try:
        src = resolve(ref)
        if src.explore_only:
            raise PlaygroundError(f"{ref} is explore-only (a config without weights): it cannot generate; "
                                  "pick a built-in or a folder with weights")
        tok = load_tokenizer(ref, trust_remote_code=trust_remote_code)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = load_model(ref, task, num_labels=len(id2label) if id2label else None, id2label=id2label,
                               dtype=dtype, trust_remote_code=trust_remote_code)
    except StudioError as e:
        raise e if isinstance(e, PlaygroundError) else PlaygroundError(_first_line(e)) from None
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id  # sequence classifiers find the last token by it
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return model, tok


def _adapter_dir(run_dir: Path) -> tuple[Path, str]:
    """adapter/, else the last complete checkpoint (a run still training can be tried out)."""
    final = run_dir / runs.ADAPTER
    if present(final):
        return final, runs.ADAPTER
    ckpt = runs.last_complete_checkpoint(run_dir)
    if ckpt is not None:
        return ckpt, ckpt.name
    st = runs.read_status(run_dir)
    raise PlaygroundError(f"run {run_dir.name} has no adapter yet (state {st.get('state')}, step "
                          f"{st.get('step', 0)} of {st.get('max_steps')}); wait for its first checkpoint or its end")


def _run_labels(run_dir: Path, adapter: Path) -> dict[int, str]:
    """id2label as the trainer recorded it (status.json, RunDir.id2label); a run without it
    (a folder made by hand) gets LABEL_i names, one per class of its head."""
    labels = RunDir(run_dir).id2label()
    if labels:
        return labels
    n = AdapterFile(adapter, error=PlaygroundError).head_size()
    if n is None:
        raise PlaygroundError(f"cannot tell the labels of run {run_dir.name}: its status.json records no "
                              "id2label and the adapter holds no classification head")
    return {i: f"LABEL_{i}" for i in range(n)}


def _run_template(run_dir: Path, cfg: RunConfig) -> str:
    fmt = (RunDir(run_dir).read_status_file() or {}).get("format")
    if fmt is None and cfg.data.format != "auto":
        fmt = cfg.data.format
    if fmt is None:
        try:
            fmt = load_records(cfg.data.path, "auto").format
        except StudioError:
            fmt = "text"
    return FORMAT_TEMPLATES.get(fmt, "none")


# --- sampling -----------------------------------------------------------------------------

def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy at temperature 0; else nucleus sampling, drawn on the CPU so a seed means the same everywhere."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(descending=True, stable=True)
        keep = (sp.cumsum(0) - sp) < top_p  # the smallest prefix whose mass reaches top_p; never empty
        return int(si[torch.multinomial(sp * keep, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def _check_sampling(max_new_tokens, temperature, top_p, seed) -> None:
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= 1 << 16:
        raise PlaygroundError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not num(temperature) or temperature < 0:
        raise PlaygroundError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not num(top_p) or not 0 < top_p <= 1:
        raise PlaygroundError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PlaygroundError(f"seed must be an integer >= 0, got {seed!r}")


def _peft_name(name: str) -> str:
    # PEFT keeps adapters in ModuleDicts: their keys may not hold dots.
    return name.replace(".", "_")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


# --- the cache ----------------------------------------------------------------------------

_CACHE: OrderedDict[tuple, Playground] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _cached(key: tuple, make) -> Playground:
    # Loading happens under the lock: two requests for the same run load it once.
    with _CACHE_LOCK:
        pg = _CACHE.get(key)
        if pg is not None:
            _CACHE.move_to_end(key)
            return pg
        while len(_CACHE) >= CACHE_SIZE:
            _CACHE.popitem(last=False)  # before loading, so two bases are never held by the cache
        pg = make()
        _CACHE[key] = pg
        return pg


def clear_cache() -> None:
    """Forget every loaded playground (streams still running keep theirs until they end)."""
    with _CACHE_LOCK:
        _CACHE.clear()
