"""The README runs as written: its first two commands stay what a newcomer types (CI runs the second),
and its Python snippets run on a fixture, the OpenAI one against a real loopback server whose checkpoint
directory is named as in the README. Only the path, the URL and (for CPU speed) the token counts are
replaced."""
from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest

from conftest import fixture_dir

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
FIRST_COMMANDS = ['pip install -e . && lowbit demo', 'pip install -e ".[test]" && python -m pytest -q']


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def run(code: str) -> str:
    code = code.replace("max_new_tokens=32", "max_new_tokens=4").replace("max_tokens=32", "max_tokens=4")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    return out.getvalue()


def test_first_commands_and_cpu_note_before_them():
    first = blocks("bash")[0].splitlines()
    assert [line.split("  #")[0].strip() for line in first[:2]] == FIRST_COMMANDS
    note = README.index("--index-url https://download.pytorch.org/whl/cpu")
    assert note < README.index(FIRST_COMMANDS[0])


def test_python_snippet_runs(tmp_path):
    code = next(b for b in blocks("python") if "lowbit.load(" in b)
    path = tmp_path / "checkpoint"
    shutil.copytree(fixture_dir("base-llama-bf16"), path)
    out = run(code.replace("path/to/checkpoint", str(path)))
    assert out.strip()  # the next token, a generation and a stream were printed


def test_openai_snippet_against_a_server(tmp_path):
    pytest.importorskip("openai")
    from lowbit.serve import create_app
    from test_serve import serving

    import lowbit

    code = next(b for b in blocks("python") if "OpenAI(" in b)
    serve = next(b for b in blocks("bash") if "lowbit serve " in b)
    ckpt = re.search(r"lowbit serve (\S+)", serve).group(1)  # the README's checkpoint path: its name is the model id
    path = tmp_path / Path(ckpt).name
    shutil.copytree(fixture_dir("base-llama-bf16"), path)
    model = lowbit.load(path, device="cpu", progress=False)
    with serving(create_app(model, max_batch=2, max_len=128)) as url:
        out = run(code.replace("http://localhost:8000", url))
    assert out.strip()
