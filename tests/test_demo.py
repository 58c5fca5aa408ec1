"""Issue 7: `lowbit demo` runs end to end (this is the README's first command)."""
from __future__ import annotations

import lowbit.cli
from lowbit.demo import DEMO_SCHEMES


def test_demo_runs_cleanly_and_fidelity_is_ordered(capsys, tmp_path):
    rc = lowbit.cli.main(["demo", "--device", "cpu", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out  # 0: every written checkpoint inspected with no problems
    names = {"bf16"} | {s for s, _, _ in DEMO_SCHEMES}
    rows = {}
    for line in out.splitlines():
        f = line.split()
        if f and f[0] in names and f[3].endswith("MB"):
            rows[(f[0], f[1], f[2])] = dict(mb=float(f[3][:-2]), top1=float(f[4].rstrip("%")), err=float(f[5]),
                                           problems=int(f[7]))
    assert len(rows) == 1 + len(DEMO_SCHEMES), out
    assert all(r["problems"] == 0 for r in rows.values())
    # every checkpoint was written to disk
    assert len(list(tmp_path.iterdir())) == 1 + len(DEMO_SCHEMES)
    bf16 = rows[("bf16", "-", "bf16")]
    w8 = rows[("w8a16", "compressed-tensors", "bf16")]
    w4 = rows[("w4a16-g128", "compressed-tensors", "bf16")]
    assert bf16["top1"] == 100.0 and bf16["err"] == 0.0
    # 8-bit weights agree with bf16 far better than 4-bit ones, and weigh in between
    assert w8["top1"] >= 90 and w8["err"] < w4["err"]
    assert w4["mb"] < w8["mb"] < bf16["mb"]
