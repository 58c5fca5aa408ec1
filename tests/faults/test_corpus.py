"""Issue 16: the fault corpus (tests/faults/kinds.py). For every kind of broken checkpoint: the API raises
a LowbitError naming what is wrong and what to do; `inspect` (API, text and --json) reports it with its
documented exit code and agrees with `load`; `lowbit generate` exits 2; no traceback anywhere."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys

import pytest

import lowbit
from conftest import FIXTURES
from kinds import KINDS
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.inspect import report

# every message says what to do about it
FIX = re.compile(r"re-download|re-export|remove|fix |fix the|fix config|fix or|convert|set |pass |use |copy |delete "
                 r"|give |rewrite|lower |drop |supported|cannot be loaded|re-run|re-save|one of|make them agree", re.I)


def make(kind, tmp_path):
    src = FIXTURES / kind.fixture
    if not src.is_dir():
        pytest.skip(f"fixture {kind.fixture} not found under {FIXTURES}")
    path = tmp_path / kind.fixture
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("README.md", "reference_logits.safetensors"))
    for f in path.iterdir():
        f.chmod(0o644)  # the shared fixtures are read-only
    kind.damage(path)
    return path


def cli(capsys, monkeypatch, *argv, stdin=None):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "Traceback" not in out.out
    return rc, out.out, out.err


def names_all(text: str, expect) -> None:
    missing = [e for e in expect if e.lower() not in text.lower()]
    assert not missing, f"{missing} not named in:\n{text}"


@pytest.mark.parametrize("kind", KINDS, ids=[k.id for k in KINDS])
def test_fault(kind, tmp_path, capsys, monkeypatch):
    path = make(kind, tmp_path)
    generate = ["generate", path, "--prompt", "Hello", "--max-new-tokens", "1", "--device", "cpu", *kind.argv]
    if kind.stage == "load":
        with pytest.raises(LowbitError) as e:
            lowbit.load(path, device="cpu")
        msg = str(e.value)
        names_all(msg, kind.expect)
        assert FIX.search(msg), f"no fix given in:\n{msg}"
        try:  # inspect agrees: never "loadable" for what load refuses
            rep = report(path)
            code = 1
            assert not rep["loadable"] and rep["problems"]
        except LowbitError:
            code = 2
        rc, out, err = cli(capsys, monkeypatch, "inspect", path)
        assert rc == code
        names_all(out + err, kind.expect)
        if code == 2:
            assert err.startswith("lowbit inspect: error: ") and out == ""
        rc, out, err = cli(capsys, monkeypatch, "inspect", path, "--json")
        rep = json.loads(out)
        assert rc == code and rep["loadable"] is False
        # JSON lists every problem (ungrouped): a grouped name `layers.{0-1}` appears as `layers.0`
        names_all(json.dumps(rep["problems"] if code == 1 else rep["error"]),
                  [e.replace('"', "").replace("{0-1}", "0") for e in kind.expect])
    else:
        rc, out, err = cli(capsys, monkeypatch, "inspect", path)
        assert rc == 0 and "no problems: loadable" in out
    rc, out, err = cli(capsys, monkeypatch, *generate, stdin=kind.stdin)
    assert rc == 2 and "\nlowbit generate: error: " in "\n" + err, err
    names_all(err, kind.expect)


def test_corpus_size():
    assert len(KINDS) >= 80 and len({k.id for k in KINDS}) == len(KINDS)


def test_subprocess_no_traceback(tmp_path):
    """The real entry point, in a fresh process: one line on stderr, exit 2."""
    kind = next(k for k in KINDS if k.name == "header-offsets-past-end")
    path = make(kind, tmp_path)
    r = subprocess.run([sys.executable, "-m", "lowbit", "generate", str(path), "--prompt", "Hi", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "truncated" in r.stderr and r.stdout == ""
