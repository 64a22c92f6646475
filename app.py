"""Start the LoRA Studio web UI (same as `studio serve`)."""

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    ap = argparse.ArgumentParser(description="LoRA Studio web UI")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--auth", default=None, help="USER:PASSWORD required to open the page (or STUDIO_AUTH)")
    ap.add_argument("--runs-dir", default=None, help="where runs are kept (default ./runs or STUDIO_RUNS_DIR)")
    a = ap.parse_args()
    from studio.ui.app import launch

    launch(a.host, a.port, a.auth, a.runs_dir)


if __name__ == "__main__":
    main()
