"""Installation: setup.py declares every package sm4 imports (torch and triton aside), and the
Makefile's torch is the CPU build wherever it comes from."""

import ast
import http.server
import importlib.util
import json
import pathlib
import subprocess
import sys
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "Pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}


def setup_lists():
    tree = ast.parse((ROOT / "setup.py").read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("RUNTIME_REQUIRES", "EXTRAS"):
                values[node.targets[0].id] = ast.literal_eval(node.value)
    return values["RUNTIME_REQUIRES"], values["EXTRAS"]


def third_party_imports(folder):
    found = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("sm4", "torch", "triton"):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_setup_declares_every_import():
    required, extras = setup_lists()
    declared = {name.split("=")[0].split("[")[0].lower() for name in required}
    optional = {name.split("=")[0].lower() for names in extras.values() for name in names}
    for module, files in third_party_imports(ROOT / "sm4").items():
        name = DISTRIBUTION.get(module, module).lower()
        assert name in declared | optional, f"{module} (imported by {sorted(files)}) is not in setup.py"
    # what `python -m sm4 train` and `demo` import at run time is required, not an extra
    assert {"numpy", "tqdm"} <= declared
    assert "matplotlib" in extras["plots"] and "h5py" in extras["multibench"]
    assert "pandas==3.1.1" in extras["multibench"]  # the pickles' pandas objects (sm4.data.multibench._pickle)


def load_torch_wheel():
    spec = importlib.util.spec_from_file_location("torch_wheel", ROOT / ".ci" / "torch_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_is_pinned_to_the_cpu_build_with_or_without_the_index():
    torch_wheel = load_torch_wheel()

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/whl/cpu"
        arguments, _ = torch_wheel.pip_arguments("2.13.0", url, timeout=5)
        assert arguments == ["torch==2.13.0+cpu", "--index-url", url]
    finally:
        server.shutdown()
    arguments, why = torch_wheel.pip_arguments("2.13.0", f"http://127.0.0.1:{server.server_port}/gone", timeout=1)
    assert arguments == ["torch==2.13.0+cpu"] and "does not answer" in why


def test_what_pip_resolves_here_is_the_cpu_wheel(tmp_path):
    """A dry run of the Makefile's torch install on this machine (its pip configuration, no install)."""
    arguments = subprocess.run([sys.executable, str(ROOT / ".ci" / "torch_wheel.py"), "--timeout", "3"],
                               capture_output=True, text=True, check=True).stdout.split()
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                           "--quiet", "--report", str(report), *arguments], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No matching distribution" in done.stderr:
        pytest.skip(f"no source of torch {arguments[0]} reachable from this machine: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    versions = [item["metadata"]["version"] for item in json.loads(report.read_text())["install"]]
    assert versions == ["2.13.0+cpu"]
