"""`studio train / runs / stop / merge / analyze / serve`: the engine commands of the CLI.

Parsers are added to the main parser by `add_parsers`; each command is a plain function of
the parsed arguments returning an exit status. Errors that are the user's input raise
ConfigError (exit 2 with one line); the caller in cli.py turns them into messages.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from studio.config import load_config
from studio.errors import ConfigError, UsageError


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="start a training run from a YAML config (or resume one) and follow it")
    t.add_argument("config", nargs="?", help="run config YAML (see README)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or failed run from its last checkpoint")
    t.add_argument("--continue", dest="continue_from", metavar="RUN_DIR",
                   help="train a completed run for --steps more steps, as a new run that records its parent")
    t.add_argument("--steps", type=int, default=None, metavar="N", help="with --continue: how many more steps")
    t.add_argument("--runs-dir", default=None,
                   help="where runs are kept (default ./runs or STUDIO_RUNS_DIR; with --continue, the parent's)")
    t.add_argument("--nproc", type=int, default=1, help="processes (DDP under accelerate launch)")
    t.add_argument("--accelerate-config", default=None, help="an accelerate config file (multi-GPU, FSDP, DeepSpeed)")
    t.add_argument("--detach", action="store_true", help="start the run and return; follow it with `studio runs`")
    t.add_argument("--queue", action="store_true",
                   help="if a run is training, queue this one behind it (it starts when the slot is free) and return")
    t.add_argument("--ignore-memory", action="store_true",
                   help="start even when the memory estimate says the run will not fit this device")

    r = sub.add_parser("runs", help="list runs with state, step and last loss")
    r.add_argument("--runs-dir", default=None)
    r.add_argument("--json", action="store_true")

    s = sub.add_parser("stop", help="stop a run: it ends the step in progress, saves a checkpoint and the adapter")
    s.add_argument("run_dir")
    s.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="give the run this many seconds to stop, then kill it (0: only ask, do not wait); by default "
                        "it waits as long as the run's own step and save times say, and never kills")
    s.add_argument("--kill", action="store_true",
                   help="end the trainer now (SIGKILL), without saving the step in progress; the run is marked "
                        "failed and resumes from its last complete checkpoint")

    m = sub.add_parser("merge", help="merge an adapter into its base model (streaming, shard by shard)")
    m.add_argument("run_dir", nargs="?", help="a run folder with a final adapter")
    m.add_argument("--base", help="base model folder (with --adapter, instead of a run)")
    m.add_argument("--adapter", help="PEFT adapter folder (with --base)")
    m.add_argument("--out", help="output folder (default RUN_DIR/merged)")
    m.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="auto: the base's own dtype")
    m.add_argument("--verify", action="store_true", help="compare logits of the merged model and base + adapter")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--json", action="store_true")

    a = sub.add_parser("analyze", help="what an adapter learned (LoRA paper, section 7)")
    asub = a.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    ss = asub.add_parser("subspace", help="subspace similarity phi(i, j) between two adapters")
    ss.add_argument("run_a")
    ss.add_argument("run_b")
    ss.add_argument("--module", default=None, help="module path or suffix (default: the first common one)")
    ss.add_argument("--which", choices=["dW", "B", "A"], default="dW",
                    help="dW: left singular vectors of delta W (default); B: of lora_B; A: right ones of lora_A "
                         "(close to its random initialisation after a short run)")
    ss.add_argument("--json", action="store_true")
    am = asub.add_parser("amplification", help="how much delta W amplifies directions of W")
    am.add_argument("run")
    am.add_argument("--json", action="store_true")
    sp = asub.add_parser("spectrum", help="singular values of delta W per module")
    sp.add_argument("run")
    sp.add_argument("--json", action="store_true")

    g = sub.add_parser("generate", help="generate with a run's adapter (or the base) from a prompt")
    g.add_argument("run_dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--base", action="store_true", help="generate with the base model (adapter off)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--template", choices=["auto", "alpaca", "chat", "none"], default="auto",
                   help="prompt format; auto uses the run's training template")
    g.add_argument("--json", action="store_true")

    v = sub.add_parser("serve", help="start the web UI (same as python app.py)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=7860)
    v.add_argument("--auth", default=None, help="USER:PASSWORD (or STUDIO_AUTH)")
    v.add_argument("--runs-dir", default=None)


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, default=str)
    sys.stdout.write("\n")


# --- train / runs / stop -------------------------------------------------------------------

def cmd_train(a) -> int:
    from studio import runs
    from studio.runs.preflight import check_runs_folder, preflight  # torch and peft: only where a run starts

    if sum(bool(x) for x in (a.config, a.resume, a.continue_from)) > 1:
        raise UsageError("give one of CONFIG.yaml, --resume RUN_DIR or --continue RUN_DIR")
    if (a.steps is not None) != bool(a.continue_from):
        raise UsageError("--continue RUN_DIR needs --steps N (how many more steps)" if a.continue_from
                         else "--steps goes with --continue RUN_DIR (a config sets train.max_steps)")
    if a.resume:
        run_dir = runs.resume_run(a.resume)
    elif a.config or a.continue_from:
        extra = None
        if a.continue_from:
            cfg, extra = runs.continuation(a.continue_from, a.steps)
        else:
            cfg = load_config(a.config)
        preflight(cfg, check_memory=not a.ignore_memory)
        root = runs.runs_dir(a.runs_dir or (Path(a.continue_from).resolve().parent if a.continue_from else None))
        check_runs_folder(root)
        try:
            if a.queue:
                from studio.runs import queue

                if a.nproc != 1 or a.accelerate_config:
                    raise ConfigError("--queue runs one process per slot; drop --nproc / --accelerate-config, "
                                      "or start the run without --queue")
                run_dir, pos = queue.submit(cfg, root, extra)
                if pos is not None:
                    print(f"queued at position {pos}: {run_dir} (studio queue list)", file=sys.stderr)
                    print(str(run_dir))
                    return 0
            else:
                run_dir = runs.start_run(cfg, root, nproc=a.nproc, accelerate_config=a.accelerate_config,
                                         extra_status=extra)
        except OSError as e:  # a full disk or a read-only folder; cli.main prints it on one line
            raise OSError(e.errno, f"cannot write the runs folder {root}: {e.strerror or e}") from None
    else:
        raise ConfigError("studio train needs CONFIG.yaml, --resume RUN_DIR or --continue RUN_DIR --steps N")
    print(f"run: {run_dir}", file=sys.stderr)
    if a.detach:
        print(str(run_dir))
        return 0
    return follow(run_dir)


def follow(run_dir: Path) -> int:
    """Follow a run with a progress bar; Ctrl-C asks the run to stop and waits for it."""
    from studio import runs

    bar = ProgressLine(sys.stderr)
    try:
        st = runs.follow(run_dir, bar.update)
    except KeyboardInterrupt:
        expected = runs.stop_estimate(runs.read_status(run_dir))["expected_s"]
        bar.note(f"stopping: the trainer finishes this step and saves the adapter, about {expected:.0f} s "
                 "(Ctrl-C again to leave it)")
        try:
            runs.stop_run(run_dir)
            st = runs.follow(run_dir, bar.update)
        except KeyboardInterrupt:
            bar.note(f"left running in the background: studio stop {run_dir}")
            return 130
    bar.done(st)
    print(str(run_dir))
    return 0 if st["state"] in ("completed", "stopped") else 1


class ProgressLine:
    """A one-line progress bar with ETA on a terminal; plain lines every few seconds otherwise."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self.last_print = 0.0
        self.loss = None

    def update(self, st: dict, rows: list[dict]) -> None:
        for r in rows:
            if r.get("loss") is not None:
                self.loss = r["loss"]
        step, total = st.get("step") or 0, st.get("max_steps") or 0
        frac = step / total if total else 0.0
        eta = st.get("eta_s")
        text = (f"{st.get('state', '?'):>9} {step:>6}/{total:<6} "
                + (f"loss {self.loss:.4f} " if self.loss is not None else "")
                + (f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s" if eta is not None and st.get("state") == "running" else ""))
        if self.tty:
            width = 30
            filled = int(width * frac)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K")
            self.stream.flush()
        elif time.monotonic() - self.last_print > 5 or st.get("state") in ("completed", "stopped", "failed", "diverged"):
            self.stream.write(text.strip() + "\n")
            self.last_print = time.monotonic()

    def note(self, msg: str) -> None:
        self.stream.write(("\n" if self.tty else "") + msg + "\n")

    def done(self, st: dict) -> None:
        if self.tty:
            self.stream.write("\n")
        if st.get("state") in ("failed", "diverged") and st.get("error"):
            self.stream.write(f"run {st['state']}: {st['error']}\n")
        else:
            self.stream.write(f"run {st.get('state')} at step {st.get('step')}\n")


def cmd_runs(a) -> int:
    from studio import runs

    listed = runs.list_runs(a.runs_dir)
    if a.json:
        from studio.evaluate import list_evals

        keys = ("id", "dir", "state", "step", "max_steps", "last_loss", "eval_loss", "error")
        _print_json({"runs": [{**{k: r.get(k) for k in keys}, "evals": list_evals(r["dir"])} for r in listed]})
        return 0
    if not listed:
        print(f"no runs in {runs.runs_dir(a.runs_dir)}")
        return 0
    print(f"{'id':<40} {'state':<10} {'step':>11}  {'last loss':>9}  {'eval loss':>9}")
    for r in listed:
        steps = f"{r['step'] or 0}/{r['max_steps'] or '?'}"
        ll = f"{r['last_loss']:.4f}" if isinstance(r.get("last_loss"), (int, float)) else "-"
        el = f"{r['eval_loss']:.4f}" if isinstance(r.get("eval_loss"), (int, float)) else "-"
        print(f"{r['id']:<40} {r['state']:<10} {steps:>11}  {ll:>9}  {el:>9}")
        if r["state"] in ("failed", "diverged") and r.get("error"):
            print(f"    {str(r['error']).splitlines()[0]}")  # why, on the line below (out of memory, a bad loss, ...)
    return 0


def cmd_stop(a) -> int:
    """Graceful by default: waits for the step in progress and the save, as long as the run's own
    measured times say, and kills only when asked (--kill, or --wait SECONDS)."""
    from studio import runs

    d = Path(a.run_dir)
    if not runs.RunDir(d).config.is_file():
        raise ConfigError(f"{d} is not a run folder (no {runs.CONFIG})")
    if a.wait is not None and not a.wait >= 0:
        raise UsageError(f"--wait must be a number of seconds >= 0, got {a.wait:g}")
    st = runs.read_status(d)
    if st["state"] == "queued" and not st["alive"]:
        from studio.runs import queue

        if queue.cancel(d.parent, d.name):
            print(f"{d.name}: removed from the queue before it started")
            return 0
    if st["state"] not in runs.ACTIVE_STATES or not st["alive"]:
        print(f"{d.name}: {st['state']} at step {st.get('step')} (not running; nothing to stop)")
        return 0
    if a.kill and not a.wait:
        st = runs.stop_run(d, kill=True)
        print(f"{d.name}: killed at step {st.get('step')}; {st.get('error')}")
        return 0
    if a.wait == 0:
        st = runs.stop_run(d)
        est = runs.stop_estimate(st)
        print(f"{d.name}: stop asked at step {st.get('step')}; it ends after the step in progress and its save, "
              f"about {est['expected_s']:.0f} s ({_stop_parts(est)}); follow it with `studio runs`")
        return 0

    def say(est: dict) -> None:
        then = (f"it is killed if it has not stopped after {a.wait:g} s" if a.wait else
                "it is never killed: Ctrl-C stops waiting, `studio stop RUN --kill` ends it at once")
        print(f"stopping {d.name} at step {st.get('step')}: waiting for the step in progress and the save, "
              f"about {est['expected_s']:.0f} s ({_stop_parts(est)}); {then}", file=sys.stderr, flush=True)

    try:
        st = runs.stop_run(d, timeout=a.wait, wait=True, on_wait=say)
    except KeyboardInterrupt:
        print(f"{d.name}: stopped waiting; the run still stops by itself after its step and save", file=sys.stderr)
        return 130
    if st["state"] in runs.ACTIVE_STATES and st["alive"]:
        waited = runs.stop_budget(runs.stop_estimate(st)["expected_s"])
        print(f"{d.name}: still {st['state']} after about {waited:.0f} s, longer than its own step and save times "
              f"say; it ends by itself. Wait again with `studio stop {d}`, or end it now with "
              f"`studio stop {d} --kill` (loses the step in progress)", file=sys.stderr)
        return 1
    print(f"{d.name}: {st['state']} at step {st.get('step')}")
    return 0


def _stop_parts(est: dict) -> str:
    """What a stop waits for, in words: the measured (or guessed) parts of stop_estimate."""
    parts = [f"a step ~{est['step_s']:.1f} s" if est["measured"] else "no step measured yet"]
    if est.get("eval_s"):
        parts.append(f"an evaluation ~{est['eval_s']:.1f} s")
    parts.append(f"checkpoint save ~{est['save_s']:.1f} s")
    parts.append(f"adapter save ~{est['adapter_save_s']:.1f} s")
    return ", ".join(parts)


# --- merge ---------------------------------------------------------------------------------

def cmd_merge(a) -> int:
    from studio.export import merge

    def progress(done: int, total: int, what: str) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\rmerging {done}/{total} {what[:60]}\033[K")
            sys.stderr.flush()

    if a.run_dir and (a.base or a.adapter):
        raise ConfigError("give either RUN_DIR or --base and --adapter, not both")
    if a.run_dir:
        rep = merge.merge_run(a.run_dir, a.out, dtype=a.dtype, verify=a.verify, overwrite=a.overwrite,
                              progress=progress)
    elif a.base and a.adapter and a.out:
        rep = merge.merge(a.base, a.adapter, a.out, dtype=a.dtype, verify=a.verify, overwrite=a.overwrite,
                          progress=progress)
    else:
        raise ConfigError("studio merge needs RUN_DIR, or --base MODEL_DIR --adapter ADAPTER_DIR --out DIR")
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    d = rep.to_dict()
    if a.json:
        _print_json(d)
        return 0
    print(f"merged {d['tensors_merged']} tensors ({d['tensors_copied']} copied, {d.get('tensors_replaced', 0)} "
          f"replaced) into {d['out']} in {d['seconds']:.2f} s, peak RSS {d['peak_rss_mb']:.0f} MB")
    if d.get("max_abs_logit_diff") is not None:
        mark = "ok" if d.get("ok") else "FAILED"
        print(f"verify {mark}: max |logits merged - reference at {d['dtype']}| = {d['max_abs_logit_diff']:.3g} "
              f"(allowed {d['tolerance']:.3g}; rounding to the saved dtype alone moves them {d['rounding_effect']:.3g}); "
              f"differs from base: {d['differs_from_base']}")
        if not d.get("ok"):
            return 1
    return 0


# --- analyze -------------------------------------------------------------------------------

def cmd_analyze(a) -> int:
    from studio import analysis

    if a.analysis == "subspace":
        out = analysis.subspace_similarity(a.run_a, a.run_b, module=a.module, which=a.which)
        if a.json:
            _print_json(out)
            return 0
        print(f"subspace similarity of {a.which} for {out['module']} (r1={out['r1']}, r2={out['r2']}, "
              f"dim {out['dim']}); random subspaces give max(i, j)/{out['dim']} on average")
        grid = out["phi"]
        show = [i for i in (1, 2, 4, 8, 16, 32, 64) if i <= out["r1"]]
        cols = [j for j in (1, 2, 4, 8, 16, 32, 64) if j <= out["r2"]]
        print("  i\\j " + "".join(f"{j:>7}" for j in cols))
        for i in show:
            print(f"{i:>5} " + "".join(f"{grid[i - 1][j - 1]:>7.3f}" for j in cols))
        s = out["summary"]
        print(f"over {s['modules']} modules: mean phi(1,1) {s['phi_1_1_mean']:.3f} (random {s['baseline_1_1_mean']:.4f}), "
              f"mean phi {s['phi_mean']:.3f} (random {s['baseline_mean']:.4f})")
        return 0
    if a.analysis == "amplification":
        rows = analysis.amplification(a.run)
        if a.json:
            _print_json({"modules": rows})
            return 0
        print(f"{'module':<48} {'r':>3} {'|dW|F':>9} {'|U^T W V|F':>11} {'|W|F':>9} {'amplif.':>8} {'random':>8}")
        for r in rows:
            print(f"{r['module'][-48:]:<48} {r['r']:>3} {r['delta_w_norm']:>9.4g} {r['projected_w_norm']:>11.4g} "
                  f"{r['w_norm']:>9.4g} {r['amplification']:>8.3g} {r['random_amplification']:>8.3g}")
        return 0
    rows = analysis.spectrum(a.run)
    if a.json:
        _print_json({"modules": rows})
        return 0
    print(f"{'module':<48} {'r':>3} {'sigma_1':>9} {'90% energy':>10} {'eff. rank':>9}  top singular values")
    for r in rows:
        top = ", ".join(f"{s:.3g}" for s in r["singular_values"][:4])
        print(f"{r['module'][-48:]:<48} {r['r']:>3} {r['spectral_norm']:>9.4g} {r['energy_rank_90']:>10} "
              f"{r['entropy_rank']:>9.2f}  {top}")
    return 0


def cmd_generate(a) -> int:
    from studio.playground import Playground

    pg = Playground.for_run(a.run_dir)  # refuses a pickle-only adapter (PEFT would torch.load it)
    if pg.info()["task"] == "seq_cls":
        out = pg.classify([a.prompt], adapter=not a.base)[0]
        if a.json:
            _print_json(out)
        else:
            print(f"{out['label']}  " + ", ".join(f"{k}: {v:.3f}" for k, v in out["probs"].items()))
        return 0
    text = pg.generate(a.prompt, adapter=not a.base, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                       top_p=a.top_p, seed=a.seed, template=a.template)
    if a.json:
        _print_json({"text": text, "adapter": not a.base, **pg.last_stats.get("base" if a.base else "tuned", {})})
    else:
        print(text)
    return 0


def cmd_serve(a) -> int:
    from studio.ui.app import launch, parse_auth

    try:
        parse_auth(a.auth)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    launch(a.host, a.port, a.auth, a.runs_dir)
    return 0


COMMANDS = {"train": cmd_train, "runs": cmd_runs, "stop": cmd_stop, "merge": cmd_merge, "analyze": cmd_analyze,
            "generate": cmd_generate, "serve": cmd_serve}
