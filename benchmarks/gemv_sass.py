"""Offline sm_90 compile of the GEMV kernel (lowbit/kernels/gemv.py): SASS instructions per weight.

No GPU needed: Triton compiles for GPUTarget("cuda", 90, 32) on the CPU machine and the wheel's
nvdisasm disassembles the cubin. For each variant it prints registers, spills, shared memory, and
the main loop's instruction count per weight element per thread (the loop is the innermost backward
branch; weights per iteration per thread = BN * CH * 128 / threads), with the counts of the main
instruction classes, as docs/kernel-notes.md tables them.

    python benchmarks/gemv_sass.py                 # the default variants
    python benchmarks/gemv_sass.py --dump nvfp4    # also write the SASS of the matching variants to /tmp
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowbit.kernels import gemv  # noqa: E402

ARGS = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "rs_ptr", "b_ptr", "ids_ptr", "rw_ptr", "out_ptr",
        "M", "N", "K", "KW", "G", "stride_xm", "stride_we", "stride_wn", "stride_se", "stride_sn", "stride_ze",
        "stride_zn", "stride_rse", "stride_rsn", "stride_om", "stride_os", "chunks_per_split"]

# name -> (x dtype, nvfp4, planar, group, zp, mode, gated, bm, bn, ch, warps)
VARIANTS = {
    "nvfp4-planar-m1": ("bf16", True, True, 16, False, 0, False, 1, 32, 4, 4),
    "int4-planar-g128-m1": ("bf16", False, True, 128, False, 0, False, 1, 32, 4, 4),
    "int4-planar-g128-zp-m1": ("bf16", False, True, 128, True, 0, False, 1, 32, 4, 4),
    "int4-planar-g32-m1": ("bf16", False, True, 32, False, 0, False, 1, 32, 4, 4),
    "nvfp4-planar-m4": ("bf16", True, True, 16, False, 0, False, 4, 32, 4, 4),
    "int4-planar-g128-m4": ("bf16", False, True, 128, False, 0, False, 4, 32, 4, 4),
    "nvfp4-planar-m1-fp16": ("fp16", True, True, 16, False, 0, False, 1, 32, 4, 4),
    "nvfp4-natural-pairs-gated": ("bf16", True, False, 16, False, 1, True, 1, 32, 4, 4),
    "int4-natural-pairs-g128": ("bf16", False, False, 128, False, 1, False, 1, 32, 4, 4),
    "nvfp4-natural-tokens": ("bf16", True, False, 16, False, 2, False, 1, 32, 4, 4),
}


def compile_variant(x_dt, nvfp4, planar, group, zp, mode, gated, bm, bn, ch, warps, stages=int(os.environ.get("STAGES", 2))):
    ptr = {"bf16": "*bf16", "fp16": "*fp16"}[x_dt]
    sig = {"x_ptr": ptr, "w_ptr": "*i32", "s_ptr": "*u8" if nvfp4 else ptr, "z_ptr": "*i8", "rs_ptr": "*fp32",
           "b_ptr": ptr, "ids_ptr": "*i32", "rw_ptr": "*fp32", "out_ptr": ptr if mode else "*fp32"}
    sig.update({a: "i32" for a in ARGS[9:]})
    const = dict(MODE=mode, TOP_K=8, NVFP4=nvfp4, PLANAR=planar, GROUP=group, HAS_ZP=zp, HAS_ROW_SCALE=True,
                 HAS_BIAS=False, GATED=gated, ACT=0, HAS_RW=mode == 2, EVEN_K=True, BM=bm, BN=bn, CH=ch)
    for k, v in const.items():
        sig[k] = "constexpr"
    # what the launcher's specialization gives: 16-divisible pointers, strides and sizes
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(ARGS)
             if a.endswith("_ptr") or a in ("K", "KW", "stride_xm", "stride_we", "stride_wn", "stride_se",
                                             "stride_sn", "stride_om", "stride_os")}
    src = ASTSource(gemv._gemv_kernel, sig, {(ARGS.index(k) if k in ARGS else k,): v for k, v in const.items()}
                    if False else const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))


def _tool(name: str, kernel, *args) -> str:
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([exe, *args, f.name], capture_output=True, text=True, check=True).stdout


def sass(kernel) -> str:
    return _tool("nvdisasm", kernel, "-c")


def resources(kernel) -> tuple[int, int, int]:
    """(registers, spill stores, shared bytes) from cuobjdump's resource usage line."""
    text = _tool("cuobjdump", kernel, "-res-usage")
    get = lambda key: int(re.search(key + r":(\d+)", text).group(1)) if re.search(key + r":(\d+)", text) else 0  # noqa
    return get("REG"), get("STACK"), get("SHARED")


def main_loop(text: str) -> list[str]:
    """Instructions of the innermost loop: the shortest [label, backward branch to it] range."""
    lines = [ln for ln in text.splitlines()]
    labels, instrs = {}, []
    for ln in lines:
        m = re.match(r"^\s*(\.L_x_\d+):", ln)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(.*?);", ln)
        if m:
            instrs.append(m.group(1))
    best = None
    for i, ins in enumerate(instrs):
        m = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", ins)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            body = instrs[labels[m.group(1)]:i + 1]
            if best is None or len(body) > len(best):  # the loop with the most work
                best = body
    return best or []


def opcode(ins: str) -> str:
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return ins.split()[0].split(".")[0]


def report(name, spec, dump=False):
    x_dt, nvfp4, planar, group, zp, mode, gated, bm, bn, ch, warps = spec
    k = compile_variant(*spec)
    text = sass(k)
    loop = main_loop(text)
    per_iter = bn * ch * 128 / (warps * 32)  # one loop handles one row set (gated: gate, then up)
    ops = collections.Counter(opcode(i) for i in loop)
    regs, stack, smem = resources(k)
    top = " ".join(f"{o}:{c}" for o, c in ops.most_common(10))
    print(f"{name:38} regs {regs:3} stack {stack:3} smem {smem:6} loop {len(loop):5} instr "
          f"{len(loop) / per_iter:5.2f}/weight  [{top}]")
    if dump:
        path = "/tmp/gemv_" + re.sub(r"[^\w.-]+", "_", name) + ".sass"
        with open(path, "w") as f:
            f.write(text)
        print("   ->", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default="")
    ap.add_argument("--only", default="")
    ap.add_argument("--tiles", default="", help="bn,ch,warps[;...]: override each variant's tiling")
    a = ap.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in a.tiles.split(";") if t]
    for name, spec in VARIANTS.items():
        if a.only and a.only not in name:
            continue
        for t in tiles or [spec[-3:]]:
            s = spec[:-3] + t
            report(f"{name} {t[0]}x{t[1]}/{t[2]}w", s, dump=bool(a.dump) and a.dump in name)


if __name__ == "__main__":
    main()
