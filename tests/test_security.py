"""Security properties of model loading and the worker (issue 11, part 5), each checked for real:

* no unpickling: no ``torch.load`` without ``weights_only=True`` and no pickle-family import in the
  backend or the plugin, except the training run's own resume files (allow-listed below, by file);
* a checkpoint cannot name files outside its own directory;
* ``rscaption serve`` talks over stdin/stdout only: it opens no listening (or any network) socket.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from rscaption.errors import ModelError
from rscaption.protocol import encode_request, parse_message

SOURCES = [ROOT / "backend" / "rscaption", ROOT / "rscaption_plugin"]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}

# Every torch.load passes weights_only=True, even for the files a training run wrote into its own
# run directory (resume state, cached embeddings and text features): a run dir can be copied from
# someone else, and loading a checkpoint goes through models/checkpoint.py (safetensors + JSON).
# An entry here (file -> number of calls) would allow unrestricted loads; there are none.
RUN_DIR_LOADS: dict[str, int] = {}


def python_files():
    for root in SOURCES:
        yield from sorted(root.rglob("*.py"))


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(tree) -> list[int]:
    """Line numbers of torch.load(...) without weights_only=True and np.load(..., allow_pickle=True)."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        kw = {k.arg: k.value for k in node.keywords}
        if owner == "torch" and node.func.attr == "load" and not _is_true(kw.get("weights_only")):
            lines.append(node.lineno)
        if owner in ("np", "numpy") and node.func.attr == "load" and _is_true(kw.get("allow_pickle")):
            lines.append(node.lineno)
    return lines


def pickle_imports(tree) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(node.module)
    return found


def test_no_unpickling_outside_the_run_dir_allow_list():
    unexpected, counts = [], {}
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        lines = unsafe_loads(tree)
        counts[rel] = len(lines)
        if len(lines) > RUN_DIR_LOADS.get(rel, 0):
            unexpected.append(f"{rel}: lines {lines}")
        for module in pickle_imports(tree):
            unexpected.append(f"{rel}: imports {module}")
    assert not unexpected, "unpickling code paths: " + "; ".join(unexpected)
    stale = {f for f, n in RUN_DIR_LOADS.items() if counts.get(f, 0) < n}
    assert not stale, f"allow-list entries no longer needed (lower them): {sorted(stale)}"


def test_the_scanner_catches_what_it_must():
    tree = ast.parse("import torch, numpy as np\nimport joblib\nfrom pickle import loads\n"
                     "torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\n"
                     "np.load(p, allow_pickle=True)\nnp.load(p)\n")
    assert unsafe_loads(tree) == [4, 5, 7]
    assert pickle_imports(tree) == ["joblib", "pickle"]


# -- checkpoint files stay inside the checkpoint -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from rscaption.models.tiny import build_tiny_captioner

    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    build_tiny_captioner().save(str(d))
    return d


def edited_copy(tiny_ckpt, tmp_path, edit):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg, dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name, edit, said", [
    ("relative escape", lambda c, d: c["mapping"].__setitem__("weights", "../evil.safetensors"),
     "config 'mapping.weights' points outside the checkpoint: ../evil.safetensors"),
    ("absolute path", lambda c, d: c["mapping"].__setitem__("weights", str(d / "mapping.safetensors")),
     "config 'mapping.weights' points outside the checkpoint: /"),
    ("lm folder outside", lambda c, d: c["lm"].__setitem__("path", "../../lm"),
     "config 'lm.path' points outside the checkpoint: ../../lm"),
    ("hub name that is a path", lambda c, d: c["lm"].update({"path": None, "name": "/tmp/some-model"}),
     "config 'lm.name' must be a public model name, not a path: /tmp/some-model"),
])
def test_checkpoint_cannot_name_files_outside_its_directory(tiny_ckpt, tmp_path, name, edit, said):
    from rscaption.models.checkpoint import load_checkpoint

    (tmp_path / "evil.safetensors").write_bytes(b"not even safetensors")
    bad = edited_copy(tiny_ckpt, tmp_path, edit)
    with pytest.raises(ModelError) as info:
        load_checkpoint(bad, device="cpu")
    assert said in str(info.value) and str(bad.resolve()) in str(info.value)


def test_decoder_files_are_checked_relative_to_their_own_folder(tiny_ckpt):
    from rscaption.models.checkpoint import check_file_refs

    ok = {"decoders": {"zh": {"path": "decoders/zh", "mapping": {"weights": "mapping.safetensors"},
                              "lm": {"path": "lm"}}}}
    check_file_refs(ok, tiny_ckpt)
    ok["decoders"]["zh"]["mapping"]["weights"] = "../../../x.safetensors"
    with pytest.raises(ModelError, match=r"'decoders.zh.mapping.weights' points outside"):
        check_file_refs(ok, tiny_ckpt)


def test_the_untouched_checkpoint_still_loads(tiny_ckpt):
    from rscaption.models.checkpoint import load_checkpoint

    assert load_checkpoint(tiny_ckpt, device="cpu").embed_dim == 32


# -- the worker opens no port ------------------------------------------------------------------------
def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[len("socket:["):-1])
    return out


def _network_sockets(pid: int) -> list[str]:
    """The process's TCP/UDP sockets (any state) and listening unix sockets, from /proc."""
    inodes, found = _socket_inodes(pid), []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            fields = line.split()
            if fields[9] in inodes:
                found.append(f"{table} {fields[1]} state {fields[3]}")
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 7 and fields[6] in inodes and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
            found.append(f"unix listening {fields[-1] if len(fields) > 7 else ''}")
    return found


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")
def test_serve_opens_no_listening_socket(tiny_ckpt):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "backend"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "rscaption.cli", "serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)
    try:
        proc.stdin.write(encode_request("info", model=str(tiny_ckpt)))
        proc.stdin.flush()
        seen = []
        for line in proc.stdout:  # the model is loaded and torch's threads run once the result is out
            seen.append(parse_message(line)["type"])
            if seen[-1] in ("done", "error"):
                break
        assert seen[-1] == "done" and "result" in seen, seen
        assert _network_sockets(proc.pid) == []
        assert _socket_inodes(proc.pid) == set(), "the worker holds sockets of some kind"
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
