"""`studio` command line: the same operations as the UI, for scripts and bigger machines.

Exit status: 0 ok, 2 bad input (one line on stderr naming the problem), 1 a real failure.
`--json` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from studio.config import LoraSettings, parse_layers
from studio.errors import StudioError, UsageError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studio", description="LoRA Studio: LoRA fine-tuning of Hugging Face models.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("tree", help="print a model's module tree (folded like PyTorch's print)")
    t.add_argument("--model", required=True, help="built-in name, preset, local folder or Hub id")
    t.add_argument("--task", choices=["causal_lm", "seq_cls"], default=None)
    t.add_argument("--depth", type=int, default=12, help="levels to print (text output)")
    t.add_argument("--json", action="store_true")
    t.add_argument("--trust-remote-code", action="store_true")

    c = sub.add_parser("count", help="trainable LoRA parameters for targets and ranks, without loading weights")
    c.add_argument("--model", required=True)
    c.add_argument("--targets", required=True, help="comma-separated names, all-linear, or re:PATTERN")
    c.add_argument("--r", type=int, default=8)
    c.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*r)")
    c.add_argument("--layers", default=None, help="layers_to_transform, e.g. 0-3,8")
    c.add_argument("--exclude", default=None, help="exclude_modules, comma-separated or re:PATTERN")
    c.add_argument("--bias", choices=["none", "all", "lora_only"], default="none")
    c.add_argument("--dora", action="store_true", help="use_dora")
    c.add_argument("--rslora", action="store_true", help="use_rslora")
    c.add_argument("--modules-to-save", default=None, help="comma-separated module names trained in full")
    c.add_argument("--rank-pattern", default=None, help="per-module ranks, e.g. q_proj=16,v_proj=4")
    c.add_argument("--alpha-pattern", default=None, help="per-module alphas, e.g. q_proj=32")
    c.add_argument("--task", choices=["causal_lm", "seq_cls"], default=None)
    c.add_argument("--sweep", action="store_true", help="table over r in 1..128 and common target sets")
    c.add_argument("--json", action="store_true")
    c.add_argument("--trust-remote-code", action="store_true")
    m = c.add_argument_group("training memory estimate (with --batch and --seq)")
    m.add_argument("--batch", type=int, default=None, help="micro-batch size (per device)")
    m.add_argument("--seq", type=int, default=None, help="sequence length in tokens")
    m.add_argument("--quant", default="none", help="base weights: none, 8bit or 4bit (bitsandbytes NF4)")
    m.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16")
    m.add_argument("--gradient-checkpointing", action="store_true")
    m.add_argument("--optimizer", default="adamw", help="adamw or adamw_8bit")

    from studio.cli.evaluate import add_parser as add_eval_parser
    from studio.cli.export import add_parser as add_export_parser
    from studio.cli.runs import add_parsers
    from studio.cli.adapters import add_parser as add_adapters_parser
    from studio.cli.sweep import add_parser as add_sweep_parser

    add_parsers(sub)
    add_sweep_parser(sub)
    add_adapters_parser(sub)
    add_eval_parser(sub)
    add_export_parser(sub)
    return p


def _targets(value: str):
    value = value.strip()
    if value.startswith("re:") or value.lower() == "all-linear":
        return value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise UsageError(f"--targets {value!r} names no module; give names like q_proj,v_proj, all-linear or re:PATTERN")
    return names


def _pattern(value: str | None, name: str, cast) -> dict:
    if not value:
        return {}
    out = {}
    for part in value.split(","):
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{name}: {part!r} is not NAME=VALUE (e.g. q_proj=16)")
        try:
            out[key.strip()] = cast(val)
        except ValueError:
            raise UsageError(f"{name}: {val!r} for {key.strip()} is not a number") from None
    return out


def lora_settings_from_args(a) -> LoraSettings:
    exclude = a.exclude
    if exclude and not exclude.startswith("re:"):
        exclude = [e.strip() for e in exclude.split(",") if e.strip()]
    elif exclude:
        exclude = exclude[3:]
    s = LoraSettings(
        r=a.r, lora_alpha=a.alpha if a.alpha is not None else 2 * a.r, target_modules=_targets(a.targets),
        layers_to_transform=parse_layers(a.layers, "--layers"), exclude_modules=exclude, bias=a.bias,
        use_dora=a.dora, use_rslora=a.rslora,
        modules_to_save=[m.strip() for m in a.modules_to_save.split(",")] if a.modules_to_save else None,
        rank_pattern=_pattern(a.rank_pattern, "--rank-pattern", int),
        alpha_pattern=_pattern(a.alpha_pattern, "--alpha-pattern", float),
    )
    s.validate()
    return s


def cmd_tree(a) -> int:
    from studio.models.tree import model_tree, render

    tree = model_tree(a.model, a.task, a.trust_remote_code)
    if a.json:
        _print_json(tree.to_dict())
    else:
        print(render(tree, a.depth))
    return 0


def cmd_count(a) -> int:
    from studio import lora
    from studio.models.tree import human, model_tree

    settings = lora_settings_from_args(a)
    tree = model_tree(a.model, a.task, a.trust_remote_code)
    if a.sweep:
        table = lora.sweep(tree, settings)
        if a.json:
            _print_json({"model": a.model, "total": tree.total_params, "sweep": table})
        else:
            print(lora.render_sweep(table))
        return 0
    c = lora.check(tree, settings)
    mem = _memory(a, tree, c, settings)
    if a.json:
        _print_json({"model": a.model, **c.to_dict(), **({"memory": mem.to_dict()} if mem else {})})
        return 0
    print(f"{a.model}: {c.trainable:,} trainable of {c.total:,} parameters ({c.trainable_percent:.4f}%)")
    print(f"adapter size: {c.adapter_mb['float32']:.2f} MB float32, {c.adapter_mb['bfloat16']:.2f} MB bfloat16;"
          f" scaling alpha/r = {c.scaling:g}")
    print(f"{len(c.matched_modules)} modules adapted; by type: "
          + ", ".join(f"{k} {human(v)}" for k, v in c.by_type.items()))
    if mem:
        print(f"memory for micro-batch {a.batch} x {a.seq} ({a.precision}, quant {a.quant}"
              f"{', gradient checkpointing' if a.gradient_checkpointing else ''}, {a.optimizer}):"
              f" total {_gb(mem.total_bytes)}")
        print(f"  weights {_gb(mem.weights_bytes)}, adapter {_gb(mem.trainable_bytes)} + gradients"
              f" {_gb(mem.gradients_bytes)} + optimizer {_gb(mem.optimizer_bytes)}, activations {_gb(mem.activations_bytes)}")
    return 0


def _memory(a, tree, c, settings):
    """The training-memory estimate when --batch and --seq ask for it, else None."""
    if a.batch is None and a.seq is None:
        if a.quant != "none" or a.precision != "fp32" or a.gradient_checkpointing or a.optimizer != "adamw":
            raise UsageError("--quant, --precision, --gradient-checkpointing and --optimizer need --batch N --seq N")
        return None
    if a.batch is None or a.seq is None:
        raise UsageError(f"the memory estimate needs both --batch and --seq (got --{'seq' if a.batch is None else 'batch'} only)")
    from studio.models import memory

    return memory.estimate(tree, c, settings, batch=a.batch, seq=a.seq, quant=a.quant, precision=a.precision,
                           gradient_checkpointing=a.gradient_checkpointing, optimizer=a.optimizer)


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, default=str)
    sys.stdout.write("\n")


def _commands() -> dict:
    from studio.cli.evaluate import COMMANDS as EVAL
    from studio.cli.export import COMMANDS as EXPORT
    from studio.cli.runs import COMMANDS as ENGINE
    from studio.cli.adapters import COMMANDS as ADAPTERS
    from studio.cli.sweep import COMMANDS as SWEEP

    return {"tree": cmd_tree, "count": cmd_count, **ENGINE, **EVAL, **SWEEP, **ADAPTERS, **EXPORT}


def _conversion_progress():
    """A .gguf model's one-time conversion takes tens of seconds: say so on stderr, when a person watches."""
    from studio.models import gguf

    if not sys.stderr.isatty():
        return gguf.reporting(None)
    shown = set()

    def line(fraction: float, message: str) -> None:
        # Whole lines (an error after one starts on its own): each stage, then at most one a tenth.
        key = (message.split(" ", 1)[0], int(fraction * 10))
        if key not in shown:
            shown.add(key)
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    return gguf.reporting(line)


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # "Generating train split" bars would turn the one-line error of a bad CSV into three lines.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # imported already (in-process callers): the variable is read at import
        sys.modules["datasets"].disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    # bitsandbytes (when installed) warns on import that it cannot download an optional CPU kernel:
    # noise that would turn a one-line error into two.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = _parser().parse_args(argv)
    try:
        with _conversion_progress():
            return _commands()[args.cmd](args)
    except StudioError as e:
        print(f"studio {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"studio {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only folder: the file and the system's reason, on one line
        if os.environ.get("STUDIO_DEBUG"):
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"studio {args.cmd}: failed: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except Exception as e:  # a real failure: say what broke; the traceback with STUDIO_DEBUG=1
        if os.environ.get("STUDIO_DEBUG"):
            raise
        print(f"studio {args.cmd}: failed: {type(e).__name__}: {e} (set STUDIO_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
