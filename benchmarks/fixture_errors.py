"""Print, for every fixture, how far lowbit's logits are from the producer's reference.

    python benchmarks/fixture_errors.py [--device cuda] [--json out.json]

ModelOpt folders compare with `logits_dequant_export` (the model rebuilt from the exported bytes),
llm-compressor folders with `logits` (transformers' reload), as spec section 8 says. W4A4 NVFP4
checkpoints are shown in both modes: weight-only (lowbit's default on Hopper) and emulate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowbit  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.environ.get("LOWBIT_FIXTURES", "../shared/fixtures"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.fixtures)
    rows = []
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name_dev = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"device: {name_dev}, torch {torch.__version__}")
    print(f"{'fixture':34s} {'mode':9s} {'reference':22s} {'max abs':>8s} {'rel L2':>8s}")
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        ref = load_file(d / "reference_logits.safetensors")
        key = "logits_dequant_export" if "logits_dequant_export" in ref else "logits"
        modes = ["auto"]
        if "nvfp4" in d.name and "a16" not in d.name or "mixed" in d.name:
            modes.append("emulate")
        for mode in modes:
            model = lowbit.load(d, device=dev, activation_quant=mode, progress=False)
            out = model.logits(ref["input_ids"].to(dev)).cpu()
            r = ref[key]
            row = dict(fixture=d.name, mode=mode, reference=key, max_abs=(out - r).abs().max().item(),
                       rel_l2=((out - r).norm() / r.norm()).item())
            rows.append(row)
            print(f"{d.name:34s} {mode:9s} {key:22s} {row['max_abs']:8.4f} {row['rel_l2']:8.4f}")
            del model
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name_dev, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
