"""A real client: llama.cpp (through llama-cpp-python) runs the studio's GGUF export of a SmolLM2 run.

There is no binary wheel of llama-cpp-python on this registry, so the first run builds it from
its source distribution into ~/.cache/lora-studio/llamacpp-venv (several minutes on 2 cores; never part of
`make test`). Then it exports a SmolLM2-135M-Instruct base + adapter with
`studio export gguf --quant f16 --ollama`, and compares llama.cpp's greedy answers with
transformers' greedy answers from the merged model (PEFT merge_and_unload) on a few chat
prompts, token by token. Results go to stdout and to the "GGUF in llama.cpp" section of
docs/benchmarks.md.

    python bench/gguf_llamacpp.py [--run RUN_DIR | --adapter ADAPTER_DIR] [--quant f16] [--tokens 24] [--no-docs]

Without --run or --adapter, a random all-linear r = 8 adapter on the built-in
smollm2-135m-instruct is made (its answers differ from the base's, which is the point).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from report import DOCS, machine, write_section  # bench/report.py

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-studio" / "llamacpp-venv"  # outside the checkout
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers.", "Explain LoRA in one sentence."]


def llama_python() -> Path:
    """A Python with llama_cpp importable: this one, or a venv where it is built from source once."""
    try:
        import llama_cpp  # noqa: F401

        return Path(sys.executable)
    except ImportError:
        pass
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode != 0:
        print("building llama-cpp-python from its source distribution (several minutes)...", flush=True)
        env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF", CMAKE_BUILD_PARALLEL_LEVEL="2")
        subprocess.run([str(py), "-m", "pip", "install", "--no-binary", "llama-cpp-python", "llama-cpp-python"],
                       check=True, env=env)
    return py


LLAMA_CHILD = r"""
import json, sys
from llama_cpp import Llama
path, n, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
llm = Llama(model_path=path, n_ctx=512, verbose=False, seed=0)
out = []
for p in prompts:
    r = llm.create_chat_completion(messages=[{"role": "user", "content": p}], max_tokens=n, temperature=0.0,
                                   top_k=1)
    out.append(r["choices"][0]["message"]["content"])
print(json.dumps({"answers": out, "version": __import__("llama_cpp").__version__}))
"""


def transformers_answers(base: Path, adapter: Path, n: int) -> list[str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      adapter).merge_and_unload().eval()
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=n, do_sample=False)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a run folder (its config names the base)")
    ap.add_argument("--adapter", type=Path, help="a PEFT adapter for smollm2-135m-instruct")
    ap.add_argument("--quant", default="f16")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from studio.export.gguf import export_gguf, export_run
    from studio.models.registry import model_dir

    py = llama_python()
    with tempfile.TemporaryDirectory(prefix="gguf-llamacpp-") as tmp:
        tmp = Path(tmp)
        out = tmp / f"smollm2-{args.quant}.gguf"
        if args.run:
            from studio.config import load_config

            base = model_dir(load_config(args.run / "config.yaml").model.name_or_path)
            adapter = args.run / "adapter"
            rep = export_run(args.run, out, quant=args.quant, ollama=True)
        else:
            base = model_dir("smollm2-135m-instruct")
            adapter = args.adapter or _random_adapter(base, tmp / "adapter")
            rep = export_gguf(base, adapter, out, quant=args.quant, ollama=True, name="smollm2-lora")
        child = subprocess.run([str(py), "-c", LLAMA_CHILD, str(out), str(args.tokens), json.dumps(PROMPTS)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"llama.cpp failed to load or run the export:\n{child.stderr[-3000:]}")
        llama = json.loads(child.stdout.strip().splitlines()[-1])
        modelfile = Path(rep.modelfile).read_text()
        want = transformers_answers(base, adapter, args.tokens)  # inside: a random adapter lives in tmp
    rows = ["| prompt | transformers (merged) | llama.cpp (GGUF) | same |", "| --- | --- | --- | :---: |"]
    same = 0
    for p, a, b in zip(PROMPTS, want, llama["answers"]):
        ok = a.strip() == b.strip()
        same += ok
        cell = lambda s: s.strip().replace("|", "\\|").replace("\n", " ")[:80]
        rows.append(f"| {p} | {cell(a)} | {cell(b)} | {'yes' if ok else 'no'} |")
    v = rep.verify
    summary = (f"{same} of {len(PROMPTS)} greedy answers identical ({args.tokens} new tokens each); "
               f"export verify: tokenizer {'ok' if v['tokenizer_ok'] else 'FAILED'}, agreement {v['agreement']:.1%}, "
               f"max |logit diff| {v['max_abs_logit_diff']:.3g}; file {rep.bytes / 2**20:.0f} MiB; "
               f"Modelfile stops: {', '.join(line.split(' ', 2)[2] for line in modelfile.splitlines() if line.startswith('PARAMETER stop'))}")
    print("\n".join(rows))
    print(summary)
    section = "\n".join(["## GGUF in llama.cpp", "",
                         f"`bench/gguf_llamacpp.py`: `studio export gguf --quant {args.quant}` of smollm2-135m-instruct "
                         f"+ a LoRA adapter, run by llama.cpp (llama-cpp-python {llama['version']}, built from source) "
                         "with the GGUF's own chat template, against transformers' greedy decoding of the merged model.",
                         "", *rows, "", summary, "",
                         f"Measured {dt.date.today().isoformat()} on {machine()}.", ""])
    if not args.no_docs:
        write_section("GGUF in llama.cpp", section)
        print(f"wrote the GGUF in llama.cpp section of {DOCS}")


def _random_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                        LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear",
                                   init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    pm.save_pretrained(out)
    return out


if __name__ == "__main__":
    main()
