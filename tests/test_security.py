"""A locked-down server, tested against the app launched on 127.0.0.1.

One server for the module (the `locked_server` fixture): `studio.ui.app.launch` with --auth, a private runs folder and
gradio cache, and a 1 MB upload limit (STUDIO_MAX_UPLOAD_MB). Probes go over raw HTTP
(http.client sends paths as written: no client-side normalisation of `..`). Plus unit-level
checks of what launch() passes to gradio, of pickles never being loaded, of remote code never
running unless asked, and of the dependency floor.
"""

from __future__ import annotations

import http.client
import inspect
import json
import os
import pickle
import re
import socket
import sys
import urllib.parse
import uuid
from pathlib import Path

import gradio as gr
import psutil
import pytest
import tomllib
import yaml

from studio import cli, runs
from studio.config import ModelConfig, RunConfig, field_help
from studio.ui import app as ui_app
from studio.ui import login_wall
from studio.ui.tabs import data as data_tab
from studio.ui.tabs import model as model_tab
from studio.ui.tabs import train as train_tab

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "alice", "correct horse battery"
SECRET = "TOP-SECRET-7d1f"
PASSWD_LINE = Path("/etc/passwd").read_text().splitlines()[0]


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory, free_port):
    tmp = tmp_path_factory.mktemp("secure")
    root, cache = tmp / "runs", tmp / "gradio-cache"
    root.mkdir()
    cache.mkdir()
    (root / "inside.txt").write_text("inside the runs folder\n")
    (tmp / "secret.jsonl").write_text(json.dumps({"text": SECRET}) + "\n")
    (root / "link-to-passwd").symlink_to("/etc/passwd")
    (root / "link-to-etc").symlink_to("/etc")
    (root / "link-to-secret.jsonl").symlink_to(tmp / "secret.jsonl")
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(cache))
    mp.setenv("STUDIO_MAX_UPLOAD_MB", "1")
    mp.delenv("STUDIO_AUTH", raising=False)
    port = free_port()
    demo = ui_app.launch(port=port, auth=f"{USER}:{PASSWORD}", runs_dir=root, prevent_thread_lock=True, quiet=True)
    try:
        yield {"port": port, "root": root, "cache": cache, "tmp": tmp, "demo": demo,
               "cookie": login(port)}
    finally:
        demo.close()
        mp.undo()


def login(port: int) -> str:
    body = urllib.parse.urlencode({"username": USER, "password": PASSWORD})
    status, headers, text = request(port, "POST", "/login", body=body,
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, text
    return "; ".join(c.split(";")[0] for k, c in headers if k.lower() == "set-cookie")


def request(port, method, path, body=None, headers=None, cookie=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)  # path sent exactly as written
        hdrs = dict(headers or {})
        if cookie:
            hdrs["Cookie"] = cookie
        data = body.encode() if isinstance(body, str) else body
        if data is not None:
            hdrs.setdefault("Content-Length", str(len(data)))
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders(data)
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def routes(route_list, prefix=""):
    """(path, method) of every route, included routers flattened."""
    for r in route_list:
        if hasattr(r, "path"):
            for m in sorted(getattr(r, "methods", None) or {"GET"}):
                yield prefix + r.path, m
        elif hasattr(r, "original_router"):  # newer FastAPI keeps an included router as one route
            yield from routes(r.original_router.routes, prefix + (r.include_context.prefix or ""))


# --- binding and launch settings --------------------------------------------------------------

@pytest.mark.slow
def test_default_bind_is_loopback_only(locked_server):
    port = locked_server["port"]
    listening = [c.laddr for c in psutil.Process().net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
    # every way of starting the UI defaults to loopback
    assert inspect.signature(ui_app.launch).parameters["host"].default == "127.0.0.1"
    assert cli._parser().parse_args(["serve"]).host == "127.0.0.1"
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for ip in others[:2]:  # a machine's own non-loopback address cannot reach it
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=1).close()


def test_app_py_and_serve_start_on_loopback_by_default(monkeypatch):
    seen = []
    monkeypatch.setattr(ui_app, "launch", lambda *a, **k: seen.append(a))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    import importlib.util

    spec = importlib.util.spec_from_file_location("studio_app_entry", ROOT / "app.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    entry.main()
    assert cli.main(["serve"]) == 0
    assert [a[0] for a in seen] == ["127.0.0.1", "127.0.0.1"]


class FakeDemo:
    def __init__(self):
        self.kw = None

    def queue(self, **kw):
        return self

    def launch(self, **kw):
        self.kw = kw

    def block_thread(self):
        pass


@pytest.fixture
def fake_launch(monkeypatch, tmp_path):
    demo = FakeDemo()
    monkeypatch.setattr(ui_app, "build_app", lambda root, model=None: demo)
    monkeypatch.delenv("STUDIO_AUTH", raising=False)
    monkeypatch.delenv("STUDIO_MAX_UPLOAD_MB", raising=False)

    def go(host, auth=None):
        ui_app.launch(host, 7860, auth, tmp_path / "runs")
        return demo.kw
    return go


def test_public_host_without_auth_warns_and_with_auth_does_not(fake_launch, monkeypatch, capsys, tmp_path):
    kw = fake_launch("0.0.0.0")
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0 without --auth" in err and "--auth USER:PASSWORD" in err
    assert kw["server_name"] == "0.0.0.0" and kw["auth"] is None
    for host, auth in (("0.0.0.0", "u:p"), ("127.0.0.1", None)):
        fake_launch(host, auth)
        assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("STUDIO_AUTH", "u:secret")
    kw = fake_launch("0.0.0.0")
    assert "warning" not in capsys.readouterr().err and kw["auth"] == ("u", "secret")
    # the rest of the lock-down
    assert kw["share"] is False and kw["enable_monitoring"] is False and kw["run_history"] is False
    assert kw["allowed_paths"] == [str((tmp_path / "runs").resolve())]
    assert kw["max_file_size"] == 200 * 2**20
    assert kw["app_kwargs"]["openapi_url"] is None
    assert [m.cls for m in kw["app_kwargs"]["middleware"]] == [login_wall.LoginWall]


def test_upload_limit_is_configurable_and_checked(fake_launch, monkeypatch):
    monkeypatch.setenv("STUDIO_MAX_UPLOAD_MB", "0.5")
    assert fake_launch("127.0.0.1")["max_file_size"] == 2**19
    for bad in ("0", "-3", "lots", "inf"):
        monkeypatch.setenv("STUDIO_MAX_UPLOAD_MB", bad)
        with pytest.raises(ValueError, match="STUDIO_MAX_UPLOAD_MB"):
            fake_launch("127.0.0.1")


# --- authentication --------------------------------------------------------------------------

# What the login page needs before a login: gradio's static files, and /login itself.
OPEN = login_wall.OPEN_PATHS | {"/assets/{path:path}", "/static/{path:path}", "/svelte/{path:path}",
                                "/pwa_icon", "/pwa_icon/{size}"}


def fill(path: str, locked_server) -> str:
    values = {"path_or_url": str(locked_server["root"] / "inside.txt"), "url_path": "http://127.0.0.1/x", "size": "192",
              "component_id": "1", "path": "index.html"}
    return re.sub(r"\{([^}:]+)(:path)?\}", lambda m: values.get(m.group(1), "x"), path)


@pytest.mark.slow
def test_every_route_refuses_without_credentials(locked_server):
    port, app = locked_server["port"], locked_server["demo"].server_app
    found = list(routes(app.routes))
    assert len(found) > 50 and ("/gradio_api/queue/join", "POST") in found  # the walk sees gradio's router
    for path, method in found:
        if path in OPEN:
            continue
        status, _, text = request(port, method, fill(path, locked_server), body="{}" if method == "POST" else None,
                                  headers={"Content-Type": "application/json"})
        assert status == 401, f"{method} {path} answered {status} without a login: {text[:200]}"
    # the ones named in the issue, with real arguments
    inside = locked_server["root"] / "inside.txt"
    for method, path in (("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/queue/join"),
                         ("GET", f"/gradio_api/file={inside}"), ("POST", "/gradio_api/upload"),
                         ("GET", "/gradio_api/queue/data?session_hash=abc"), ("GET", "/gradio_api/heartbeat/abc"),
                         ("POST", "/gradio_api/call/list_runs"), ("GET", "/openapi.json"),
                         ("GET", "/studio/live"), ("GET", "/studio/live?run=x&seen=")):
        status, _, text = request(port, method, path, body="{}" if method == "POST" else None)
        assert status in (401, 404) and "inside the runs folder" not in text, (method, path, status)
    # with the login cookie the same routes work (the probes above reached real handlers)
    cookie = locked_server["cookie"]
    assert request(port, "GET", "/config", cookie=cookie)[0] == 200
    assert request(port, "GET", "/gradio_api/info", cookie=cookie)[0] == 200
    status, _, text = request(port, "GET", f"/gradio_api/file={inside}", cookie=cookie)
    assert status == 200 and text == "inside the runs folder\n"
    assert request(port, "GET", "/", cookie=cookie)[2].count("start_training") >= 1
    status, _, text = request(port, "GET", "/studio/live", cookie=cookie)
    assert status == 200 and "No run yet" in json.loads(text)["status"]


@pytest.mark.slow
def test_login_page_describes_nothing_of_the_app(locked_server):
    status, _, page = request(locked_server["port"], "GET", "/")
    assert status == 200 and '"auth_required":true' in page.replace(" ", "")
    assert "window.gradio_api_info = {};" in page
    for leak in ("start_training", "upload_dataset", "poll", "tiny-llama", "instructions.jsonl", str(ROOT),
                 str(locked_server["root"]), "train-start"):
        assert leak not in page, f"the login page shows {leak!r}"
    status, _, _ = request(locked_server["port"], "POST", "/login", body="username=alice&password=wrong",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400


@pytest.mark.slow
def test_api_client_with_credentials_works_and_without_is_refused(locked_server):
    from gradio_client import Client

    url = f"http://127.0.0.1:{locked_server['port']}"
    with pytest.raises(Exception):  # noqa: B017  (the client raises a version-dependent error type)
        Client(url, verbose=False)
    table, *_ = Client(url, auth=(USER, PASSWORD), verbose=False).predict(None, [], api_name="/list_runs")
    assert table["headers"][:3] == ["id", "state", "steps"] and table["data"] == [], table  # the (empty) runs table


@pytest.mark.browser
def test_browser_login_then_the_studio(locked_server):
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("Chromium is missing: `make test` installs it (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{locked_server['port']}/")
            page.locator("input[type=password]").wait_for()
            assert page.locator("#train-start").count() == 0
            page.locator("input[type=text]").first.fill(USER)
            page.locator("input[type=password]").fill(PASSWORD)
            failed = []
            page.on("response", lambda r: failed.append((r.status, r.url)) if r.status >= 400 else None)
            page.locator("button", has_text=re.compile("login", re.I)).first.click()
            page.locator("#model-load").wait_for()  # the studio, after the login
            page.locator("#module-tree").get_by_text("q_proj").first.wait_for()  # and its data arrived
            assert failed == [], failed  # nothing the logged-in page needs is walled off
        finally:
            browser.close()


# --- files -----------------------------------------------------------------------------------

def traversal_probes(locked_server) -> list[str]:
    root, tmp = locked_server["root"], locked_server["tmp"]
    up = "../" * 8
    return [
        "/gradio_api/file=/etc/passwd", f"/gradio_api/file={up}etc/passwd", f"/gradio_api/file={root}/{up}etc/passwd",
        "/gradio_api/file=..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/gradio_api/file=%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/gradio_api/file=%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/gradio_api/file=%252e%252e%252f%252e%252e%252fetc%252fpasswd",
        f"/gradio_api/file={root}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"/gradio_api/file={root}/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/gradio_api/file=..\\..\\..\\..\\..\\etc\\passwd", f"/gradio_api/file={root}\\..\\..\\..\\..\\etc\\passwd",
        "/gradio_api/file=%2Fetc%2Fpasswd", "/gradio_api/file=//etc/passwd", "/gradio_api/file=file:///etc/passwd",
        "/gradio_api/file=/ETC/PASSWD", "/GRADIO_API/FILE=/etc/passwd", "/gradio_api/File=/etc/passwd",
        "/gradio_api/file=%00/etc/passwd", "/gradio_api/file=/etc/passwd%00.txt",
        "/gradio_api/file/etc/passwd", f"/gradio_api/file/{up}etc/passwd", "/gradio_api/file/%2e%2e/%2e%2e/etc/passwd",
        f"/gradio_api/file={root}/link-to-passwd", f"/gradio_api/file={root}/link-to-etc/passwd",
        f"/gradio_api/file={root}/link-to-secret.jsonl", f"/gradio_api/file={tmp}/secret.jsonl",
        f"/gradio_api/file={root}/../secret.jsonl", f"/gradio_api/file={locked_server['cache']}/../secret.jsonl",
        "/gradio_api/file=/proc/self/environ", "/gradio_api/file=/proc/self/cmdline",
        f"/gradio_api/file={ROOT}/pyproject.toml", "/gradio_api/file=pyproject.toml", "/gradio_api/file=app.py",
        f"/static/{up}etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/assets/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd", "/svelte/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/gradio_api/proxy=file:///etc/passwd", "/gradio_api/proxy=http://127.0.0.1:22/", "/file=/etc/passwd",
        f"/studio/live?run={up}etc", "/studio/live?run=..", "/studio/live?run=%2e%2e%2f%2e%2e%2fetc",
        f"/studio/live?run={tmp}", "/studio/live?run=..%5c..%5cetc", f"/studio/plotly.min.js/{up}etc/passwd",
    ]


@pytest.mark.slow
def test_path_traversal_never_returns_a_file_outside_runs_and_cache(locked_server):
    port, cookie = locked_server["port"], locked_server["cookie"]
    secret_env = os.environ.get("STUDIO_AUTH", "")
    for path in traversal_probes(locked_server):
        status, _, text = request(port, "GET", path, cookie=cookie)
        assert status != 200, f"{path} answered 200: {text[:120]}"
        assert PASSWD_LINE not in text and "root:x:0:0" not in text and SECRET not in text, path
        assert PASSWORD not in text and (not secret_env or secret_env not in text), path
    # positive controls: the runs folder and gradio's cache are served
    status, _, text = request(port, "GET", f"/gradio_api/file={locked_server['root']}/inside.txt", cookie=cookie)
    assert status == 200 and text == "inside the runs folder\n"
    [cached] = upload(locked_server, "cached.txt", b"in the cache\n")
    status, _, text = request(port, "GET", f"/gradio_api/file={cached}", cookie=cookie)
    assert status == 200 and text == "in the cache\n"


def upload(locked_server, name: str, data: bytes) -> list[str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, _, text = request(locked_server["port"], "POST", "/gradio_api/upload", body=body, cookie=locked_server["cookie"],
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, (status, text[:300])
    return json.loads(text)


@pytest.mark.slow
def test_uploads_over_the_limit_are_refused(locked_server):
    boundary = uuid.uuid4().hex
    big = b'{"text": "' + b"x" * int(1.5 * 2**20) + b'"}\n'
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jsonl\"\r\n\r\n"
            ).encode() + big + f"\r\n--{boundary}--\r\n".encode()
    status, _, text = request(locked_server["port"], "POST", "/gradio_api/upload", body=body, cookie=locked_server["cookie"],
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 413 and "1048576" in text, (status, text[:200])
    assert not list(locked_server["cache"].rglob("big.jsonl"))
    assert upload(locked_server, "small.jsonl", b'{"text": "fits"}\n' * 1000)  # 17 kB: under the limit


def call_event(locked_server, api_name: str, data: list) -> dict:
    """Join the queue and read the result the way the page does (SSE), with the login cookie."""
    port, cookie = locked_server["port"], locked_server["cookie"]
    cfg = json.loads(request(port, "GET", "/config", cookie=cookie)[2])
    fn = next(d["id"] for d in cfg["dependencies"] if d.get("api_name") == api_name)
    session = uuid.uuid4().hex[:12]
    status, _, text = request(port, "POST", "/gradio_api/queue/join", cookie=cookie,
                              body=json.dumps({"data": data, "fn_index": fn, "session_hash": session,
                                               "event_data": None, "trigger_id": None}),
                              headers={"Content-Type": "application/json"})
    assert status == 200, text
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/gradio_api/queue/data?session_hash={session}", headers={"Cookie": cookie})
        r = conn.getresponse()
        while True:
            line = r.readline().decode()
            assert line, "the event stream ended without a result"
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    finally:
        conn.close()


def file_data(path: str, name: str) -> dict:
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.slow
def test_upload_names_cannot_escape_the_upload_folder(locked_server):
    cache, root, tmp = locked_server["cache"].resolve(), locked_server["root"], locked_server["tmp"]
    good = b'{"text": "hello"}\n{"text": "world"}\n'
    hostile = ["../../escape.jsonl", "..\\..\\escape2.jsonl", "/etc/cron.d/escape3.jsonl",
               "%2e%2e%2fescape4.jsonl", "....//....//escape5.jsonl", ".hidden.jsonl"]
    stored = {}
    for name in hostile:
        [path] = upload(locked_server, name, good)
        p = Path(path).resolve()
        assert p.is_relative_to(cache) and p.is_file(), (name, path)
        stored[name] = path
    assert not [p for p in tmp.rglob("escape*") if not p.resolve().is_relative_to(cache)]
    assert not Path("/etc/cron.d/escape3.jsonl").exists()
    # through the Data tab's upload event: kept under runs/uploads with a plain name
    for name, path in stored.items():
        msg = call_event(locked_server, "upload_dataset", [file_data(path, name)])
        assert msg["success"], msg
    kept = sorted(p.name for p in (root / "uploads").iterdir())
    assert all("/" not in n and "\\" not in n and not n.startswith(".") for n in kept), kept
    assert all(p.resolve().parent == (root / "uploads").resolve() for p in (root / "uploads").iterdir())
    # a path the user did not upload is never taken in (no arbitrary file read through the event)
    for path in (str(tmp / "secret.jsonl"), "/etc/passwd", str(root / "link-to-secret.jsonl")):
        msg = call_event(locked_server, "upload_dataset", [file_data(path, "x.jsonl")])
        assert not msg["success"], msg
    assert not any(SECRET in p.read_text() for p in (root / "uploads").iterdir())


@pytest.mark.parametrize("name", ["../../etc/passwd.jsonl", "/abs/path/x.csv", "..\\..\\x.jsonl", "C:\\x\\y.json",
                                  ".bashrc.txt", "a/../../b.parquet", "\x00evil.jsonl", "x" * 300 + ".jsonl",
                                  "..", "", "名前.jsonl", "con.jsonl"])
def test_safe_upload_name_is_a_plain_file_name(name, tmp_path):
    out = data_tab.safe_upload_name(name)
    assert out and "/" not in out and "\\" not in out and "\x00" not in out and not out.startswith(".")
    assert len(out) <= 90 and (tmp_path / out).resolve().parent == tmp_path.resolve()


# --- pickles and remote code -----------------------------------------------------------------

class Payload:
    """Unpickling this creates the marker file: proof that something loaded the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def no_unpickling(monkeypatch):
    import torch

    calls = []

    def refuse(*a, **k):
        calls.append(a[0] if a else k.get("f"))
        raise AssertionError(f"torch.load called on {calls[-1]}")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    return calls


def test_pickled_models_and_adapters_are_refused_never_loaded(no_unpickling, tmp_path, capsys):
    from studio import models
    from studio.analysis import Adapter, AnalysisError
    from studio.export.merge import MergeError, merge
    from studio.ui.tabs import playground as playground_tab

    marker = tmp_path / "UNPICKLED"
    blob = pickle.dumps(Payload(marker))
    model = tmp_path / "pickled-model"
    model.mkdir()
    (model / "config.json").write_text((ROOT / "tests/data/bad/model_config_only/config.json").read_text())
    (model / "pytorch_model.bin").write_bytes(blob)
    with pytest.raises(models.ModelRefError, match="explore-only"):
        models.load_model(str(model))
    cfg = RunConfig.from_dict({"model": {"name_or_path": str(model)}, "data": {"path": "assets/datasets/instructions.jsonl"}})
    cfg.save(tmp_path / "run.yaml")
    assert cli.main(["train", str(tmp_path / "run.yaml"), "--runs-dir", str(tmp_path / "runs"), "--detach"]) == 2
    assert "only pickled weights (pytorch_model.bin)" in capsys.readouterr().err
    base = models.model_dir("tiny-llama")
    adapter = tmp_path / "pickled-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4,
                                                            "lora_alpha": 8, "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.bin").write_bytes(blob)
    with pytest.raises(MergeError, match="pickled"):
        merge(model, adapter, tmp_path / "m1")
    with pytest.raises(MergeError, match="pickled"):
        merge(base, adapter, tmp_path / "m2")
    # a run whose adapter/ is pickle-only: the playground (PEFT would torch.load it), CLI and analysis refuse
    root = tmp_path / "runs"
    run = root / "pickled-run"
    run.mkdir(parents=True)
    RunConfig().save(run / runs.CONFIG)
    (run / runs.ADAPTER).mkdir()
    for f in adapter.iterdir():
        (run / runs.ADAPTER / f.name).write_bytes(f.read_bytes())
    values = {"playground.run": "pickled-run", "playground.adapters": [], "playground.prompt": "hi",
              "playground.template": "auto", "playground.max_new_tokens": 8, "playground.temperature": 0.0,
              "playground.top_p": 0.9, "playground.seed": 0}
    shown = [u["playground.message"] for u in playground_tab.generate(root, values) if u.get("playground.message")]
    assert len(shown) == 1 and "pickled" in shown[0]
    assert cli.main(["generate", str(run), "--prompt", "hi"]) == 2
    assert "pickled" in capsys.readouterr().err
    with pytest.raises(AnalysisError, match="pickled"):
        Adapter(run / runs.ADAPTER)
    assert not marker.exists() and no_unpickling == []


def test_trust_remote_code_is_off_unless_asked(tmp_path, capsys):
    assert ModelConfig().trust_remote_code is False and RunConfig().model.trust_remote_code is False
    assert "Only turn on for repositories you trust" in field_help(ModelConfig)["trust_remote_code"]
    assert yaml.safe_load(RunConfig().to_yaml())["model"]["trust_remote_code"] is False
    cfg = train_tab.build_config(train_tab.form_for("tiny-llama", module_tree=["model.layers.0-3.self_attn.q_proj"],
                                                    dataset_select="assets/datasets/instructions.jsonl"))
    assert cfg.model.trust_remote_code is False
    for a in (["tree", "--model", "x"], ["count", "--model", "x", "--targets", "q_proj"]):
        assert cli._parser().parse_args(a).trust_remote_code is False
    # no code path of the studio turns it on by itself
    for py in (ROOT / "studio").rglob("*.py"):
        assert not re.search(r"trust_remote_code\s*=\s*True", py.read_text()), py

    # a model folder shipping code: nothing of it runs
    marker = tmp_path / "REMOTE-CODE-RAN"
    model = tmp_path / "remote-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil-arch", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    for mod in ("configuration_evil", "modeling_evil"):
        (model / f"{mod}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(model / "model.safetensors"))
    capsys.readouterr()
    assert cli.main(["tree", "--model", str(model)]) == 2
    assert "trust_remote_code" in capsys.readouterr().err  # the refusal says what would turn it on
    cfg = RunConfig.from_dict({"model": {"name_or_path": str(model)}, "data": {"path": "assets/datasets/instructions.jsonl"}})
    cfg.save(tmp_path / "run.yaml")
    assert cli.main(["train", str(tmp_path / "run.yaml"), "--runs-dir", str(tmp_path / "runs"), "--detach"]) == 2
    assert "trust_remote_code" in capsys.readouterr().err
    with pytest.raises(gr.Error, match="trust_remote_code"):
        model_tab.load(str(model))
    assert not marker.exists() and not (tmp_path / "runs").exists()


CUSTOM_CONFIG = """from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny-custom"

    def __init__(self, hidden_size=16, vocab_size=32, **kwargs):
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        super().__init__(**kwargs)
"""
CUSTOM_MODEL = """import torch
from transformers import PreTrainedModel

from .configuration_tinycustom import TinyCustomConfig


class TinyCustomForCausalLM(PreTrainedModel):
    config_class = TinyCustomConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.mixer = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
"""


def test_trust_remote_code_switch_in_the_ui_says_what_it_means_and_is_passed_on(tmp_path):
    """A model with code of its own: refused with the box named while it is off; explained when
    ticked; with it on, the model's own class builds the tree and the run's config carries it."""
    import torch
    from safetensors.torch import save_file

    from studio.ui.tabs import train as train_tab

    model = tmp_path / "custom-model"
    model.mkdir()
    (model / "configuration_tinycustom.py").write_text(CUSTOM_CONFIG)
    (model / "modeling_tinycustom.py").write_text(CUSTOM_MODEL)
    (model / "config.json").write_text(json.dumps({
        "model_type": "tiny-custom", "architectures": ["TinyCustomForCausalLM"], "hidden_size": 16, "vocab_size": 32,
        "auto_map": {"AutoConfig": "configuration_tinycustom.TinyCustomConfig",
                     "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM"}}))
    save_file({"mixer.weight": torch.zeros(16, 16)}, str(model / "model.safetensors"))

    with pytest.raises(gr.Error, match=r"Python code of its own \(auto_map: AutoConfig, AutoModelForCausalLM\).*"
                                       r"Here: the trust_remote_code box under Load"):
        model_tab.load(str(model))
    assert model_tab.trust_note(False) == ""
    note = model_tab.trust_note(True)
    assert "imported and run on this machine, with your permissions" in note and "trainer" in note

    tree_upd, types_upd, summary, state = model_tab.load(str(model), None, True)
    assert state["trust_remote_code"] is True and "TinyCustomForCausalLM" in summary
    assert types_upd["choices"][:3] == ["embed", "mixer", "lm_head"]
    assert "mixer" in tree_upd["tree_html"]
    form = train_tab.form_for(str(model), None, True, module_tree=["mixer"],
                              dataset_select="assets/datasets/instructions.jsonl")
    assert form["model.state"] == state
    cfg = train_tab.build_config(form)
    assert cfg.model.trust_remote_code is True and cfg.lora.target_modules == ["mixer"]
    assert yaml.safe_load(cfg.to_yaml())["model"]["trust_remote_code"] is True


def test_gradio_floor_excludes_releases_with_known_cves():
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(Requirement(d) for d in deps if Requirement(d).name == "gradio").specifier
    assert not spec.contains("6.15.2") and not spec.contains("5.49.0") and spec.contains("6.16.0")
    assert spec.contains(gr.__version__) and Version(gr.__version__) >= Version("6.16")


@pytest.mark.slow
def test_launch_calms_gradios_idle_queue_loop(locked_server):
    """launch() slows the queue's idle polling (1 ms -> 20 ms); if gradio renames the knobs, this says so."""
    q = locked_server["demo"]._queue
    assert (q.sleep_when_free, q.progress_update_sleep_when_free) == (ui_app.QUEUE_IDLE_POLL_S,
                                                                     ui_app.QUEUE_PROGRESS_POLL_S)
