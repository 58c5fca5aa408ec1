"""Issue 16, the command line as a newcomer meets it: fast --help with defaults and exit codes, `--prompt -`,
progress lines when piped, bench's defaults fitted to the model, one line (exit 3) for internal errors,
problem lists grouped by cause."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import fixture_dir
from lowbit.cli import main
from lowbit.errors import CheckpointError, LowbitError, group_lines


def test_help_imports_no_torch():
    code = ("import sys; from lowbit.cli import build_parser; p = build_parser(); "
            "[a.choices[c].format_help() for a in p._subparsers._group_actions for c in a.choices]; "
            "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


@pytest.mark.parametrize("command, wants", [
    ("generate", ["(default: 64)", "'-' reads the prompt from standard input", "(default: 1)"]),
    ("bench", ["(default: 1,8,32)", "(default: 256)", "max_position_embeddings"]),
    ("inspect", ["exit status: 0 loadable; 1 problems found", "2 the checkpoint cannot be read"]),
    ("quantize", ["(default 64)", "(default 5GB)"]),
])
def test_help_shows_defaults_and_exit_codes(capsys, command, wants):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for w in wants:
        assert w in out, (w, out)


def test_prompt_from_stdin_and_progress_lines(capsys, monkeypatch):
    import io

    path = fixture_dir("base-llama-bf16")
    monkeypatch.setattr(sys, "stdin", io.StringIO("The capital of France is\n"))
    rc = main(["generate", str(path), "--prompt", "-", "--max-new-tokens", "2", "--device", "cpu", "--json"])
    out = capsys.readouterr()
    assert rc == 0
    r = json.loads(out.out)
    from transformers import AutoTokenizer

    assert r["prompt_ids"] == AutoTokenizer.from_pretrained(str(path))("The capital of France is")["input_ids"]
    lines = out.err.splitlines()  # stderr is not a terminal here: plain lines, one per step
    assert lines[0].startswith("lowbit: loaded ") and "tensors" in lines[0]


def test_internal_error_is_one_line_exit_3(capsys, monkeypatch):
    import lowbit.inspect

    monkeypatch.setattr(lowbit.inspect, "report", lambda *a, **k: 1 / 0)
    rc = main(["inspect", str(fixture_dir("base-llama-bf16"))])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error: ZeroDivisionError" in err and "please report it" in err


def test_bench_lengths_fit_the_model_or_name_the_flags():
    from lowbit.bench import _lengths

    cfg = SimpleNamespace(max_position_embeddings=512)
    opts = dict(prompt_lens=None, decode_prompt=128, new_tokens=256)
    assert _lengths(opts, cfg) == [256]  # the defaults 512,2048 do not fit 512 positions
    assert _lengths(opts, SimpleNamespace(max_position_embeddings=4096)) == [512, 2048]
    with pytest.raises(LowbitError, match="--prompt-lens 2048 does not fit the model's 512 positions"):
        _lengths(opts | dict(prompt_lens="128,2048"), cfg)
    with pytest.raises(LowbitError, match="lower --decode-prompt or --new-tokens"):
        _lengths(opts | dict(new_tokens=500), cfg)


def test_bench_warns_before_minutes_on_cpu():
    from lowbit import synthetic
    from lowbit.bench import _warn_if_slow
    from lowbit.config import parse_model_config

    said = []
    big = parse_model_config(synthetic.model_config("llama-3-8b"))
    _warn_if_slow(dict(device="cpu"), big, said.append)
    assert len(said) == 1 and "8.0B parameters on the CPU" in said[0] and "many minutes" in said[0]
    _warn_if_slow(dict(device="cpu"), parse_model_config(synthetic.model_config("tiny")), said.append)
    assert len(said) == 1


def test_quantize_progress_when_piped(tmp_path, capsys):
    from tiny_models import make_tiny

    make_tiny(tmp_path / "src", "llama", dtype=__import__("torch").bfloat16)
    rc = main(["quantize", str(tmp_path / "src"), str(tmp_path / "out"), "--scheme", "fp8-dynamic",
               "--format", "compressed-tensors", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "lowbit: quantize: 0/3 layers" in err and "lowbit: quantize: 3/3 layers (embedding, norm, lm_head)" in err


def test_problem_lists_grouped_by_cause():
    lines = [f"model.layers.{i}.mlp.down_proj: weight_scale_2 model.layers.{i}.mlp.down_proj.weight_scale_2 is nan"
             for i in (0, 1, 2, 5)] + ["lm_head: missing", "model.layers.3.self_attn.k_scale: missing for layer 3",
                                        "model.layers.4.self_attn.k_scale: missing for layer 4"]
    assert group_lines(lines) == [
        "model.layers.{0-2,5}.mlp.down_proj: weight_scale_2 model.layers.{0-2,5}.mlp.down_proj.weight_scale_2 is nan",
        "lm_head: missing", "model.layers.{3-4}.self_attn.k_scale: missing for layers 3-4"]
    e = CheckpointError(lines)
    assert e.problems == lines and str(e).count("\n") == 3 and "7 problem(s)" in str(e)
