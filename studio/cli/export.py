"""`studio export gguf`: a run (or a base + adapter) as one GGUF file for llama.cpp, Ollama, LM Studio.

Exit status: 0 written and verified; 2 bad input (the message names it); 1 a file that was written
but failed verification by the independent reader (it is removed), or another real failure.
"""

from __future__ import annotations

import json
import sys

from studio.errors import UsageError


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="export a run to another format (gguf)")
    fmt = e.add_subparsers(dest="format", required=True, metavar="FORMAT")
    g = fmt.add_parser("gguf", help="merge and write one GGUF file (llama.cpp, Ollama, LM Studio), verified by "
                                    "transformers' GGUF reader; or the adapter alone as a llama.cpp LoRA file")
    g.add_argument("run_dir", nargs="?", help="a run folder with a final adapter")
    g.add_argument("--base", help="base model folder (with --adapter, instead of a run)")
    g.add_argument("--adapter", help="PEFT adapter folder (with --base)")
    g.add_argument("--out", help="output .gguf file (default RUN_DIR/exports/<run>-<quant>.gguf; required with --base)")
    g.add_argument("--quant", default="f16", metavar="TYPE",
                   help="f16 (default), bf16, q8_0, q5_1, q5_0, q4_1, q4_0 or f32; 1-D tensors stay f32")
    g.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the GGUF")
    g.add_argument("--adapter-only", action="store_true",
                   help="write the adapter as a llama.cpp LoRA GGUF (llama-cli --lora FILE) instead of merging")
    g.add_argument("--json", action="store_true")


def cmd_export(a) -> int:
    from studio.export import gguf
    from studio.export.gguf_verify import VerificationFailed

    def progress(done: int, total: int, what: str) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\rexporting {done}/{total} {what[:60]}\033[K")
            sys.stderr.flush()

    if a.run_dir and (a.base or a.adapter):
        raise UsageError("give either RUN_DIR or --base and --adapter, not both")
    try:
        if a.run_dir:
            rep = gguf.export_run(a.run_dir, a.out, quant=a.quant, ollama=a.ollama, adapter_only=a.adapter_only,
                                  progress=progress)
        elif a.base and a.adapter and a.out:
            rep = gguf.export_gguf(a.base, a.adapter, a.out, quant=a.quant, ollama=a.ollama,
                                   adapter_only=a.adapter_only, progress=progress)
        else:
            raise UsageError("studio export gguf needs RUN_DIR, or --base MODEL_DIR --adapter ADAPTER_DIR --out FILE")
    except VerificationFailed as e:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        print(f"studio export: verification failed, nothing was written: {e}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    d = rep.to_dict()
    if a.json:
        json.dump(d, sys.stdout, default=str)
        sys.stdout.write("\n")
        return 0
    v = d["verify"]
    print(f"wrote {d['out']} ({d['bytes'] / 2**20:.1f} MB, {d['quant']}, {d['tensors']} tensors) in "
          f"{d['seconds']:.1f} s, peak RSS {d['peak_rss_mb']:.0f} MB")
    if d["adapter_only"]:
        print(f"verify (gguf-py): {v['updates']} LoRA updates read back, lora_alpha {v['lora_alpha']:g}, "
              f"max relative update difference {v['max_rel_update_diff']:.2g}")
    else:
        print(f"verify (transformers' GGUF reader): tokenizer round trip {'ok' if v['tokenizer_ok'] else 'FAILED'}, "
              f"next-token agreement {v['agreement']:.1%} over {v['positions']} positions, "
              f"max |logit diff| {v['max_abs_logit_diff']:.3g}")
    if d.get("modelfile"):
        print(f"Ollama Modelfile: {d['modelfile']}; run it with:")
        for c in d["commands"]:
            print(f"  {c}")
    return 0


COMMANDS = {"export": cmd_export}
