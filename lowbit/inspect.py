"""`lowbit inspect`: what a checkpoint holds, layer by layer, and every problem resolve() found.

Reads JSON and safetensors headers only (resolve does); no tensor data is touched.
"""
from __future__ import annotations

import re
from collections import defaultdict

from .checkpoint import Checkpoint
from .errors import group_lines, index_ranges
from .quant.resolve import LayerPlan, QuantPlan, resolve

MAIN_ROLES = ("weight", "weight_packed", "bias")  # everything else of a projection is a scale/metadata tensor


def _slots(plan: QuantPlan) -> dict:
    return {s.fused_name: s for s in plan.slots}


def _layout(plan: QuantPlan, lp: LayerPlan) -> str | None:
    """fused (one tensor on disk) | split (shards on disk, run as one) | unfused (shards run separately)."""
    slot = _slots(plan)[lp.slot]
    if len(slot.shards) == 1:
        return None
    if lp.shard is None:
        return "fused"
    return "split" if len(plan.slot_parts(slot)) == 1 else "unfused"


def _layer(ckpt: Checkpoint, plan: QuantPlan, lp: LayerPlan) -> dict:
    s = lp.scheme
    return {
        "name": lp.name,
        "weight": s.weight,
        "weight_detail": s.weight_label(),
        "granularity": s.granularity,
        "group_size": s.group_size,
        "activation": s.activation,
        "activation_detail": s.activation_label(),
        "scheme": s.label(),
        "format": s.fmt,
        "fused": _layout(plan, lp),
        "tensors": {role: {"name": t, "dtype": ckpt.tensors[t].dtype, "shape": list(ckpt.tensors[t].shape)}
                    for role, t in sorted(lp.tensors.items())},
        "reason": lp.reason,
        "notes": lp.notes,
    }


def _compact_experts(ckpt: Checkpoint, plan: QuantPlan, plans: list[LayerPlan]) -> list[dict]:
    """One entry per projection of a stack of experts (`...experts.*.gate_proj`, with the expert count
    and the tensor names of expert 0 as `{e}` patterns) instead of one per expert: a 128-expert layer
    is one line, not 384. Experts of one stack share their scheme (resolve refuses anything else)."""
    out, seen = [], {}
    for lp in plans:
        if lp.expert is None:
            out.append(_layer(ckpt, plan, lp))
            continue
        prefix, _, rest = lp.name.rpartition(f".{lp.expert}.")
        key = (prefix, rest)
        if key in seen:
            seen[key]["experts"] += 1
            continue
        entry = _layer(ckpt, plan, lp)
        entry["name"] = f"{prefix}.*.{rest}"
        entry["experts"] = 1
        for t in entry["tensors"].values():
            t["name"] = t["name"].replace(f".{lp.expert}.{rest}.", f".{{e}}.{rest}.")
        seen[key] = entry
        out.append(entry)
    for e in seen.values():
        e["notes"] = [f"{e['experts']} experts"] + e["notes"]
    return out


def report(path, trust_tensors: bool = False, speculative: str | None = None) -> dict:
    """Everything `lowbit inspect` shows, as plain data (also the --json output); speculative='mtp':
    as loaded for MTP drafting (the `mtp.*` tensors resolved and used, not skipped)."""
    ckpt = Checkpoint(path)
    plan = resolve(ckpt, trust_tensors=trust_tensors, speculative=speculative)
    cfg = plan.model
    slots = _slots(plan)
    order = {name: i for i, name in enumerate(slots)}
    plans = sorted(plan.layers.values(), key=lambda lp: (order[lp.slot], lp.shard or 0, lp.expert or 0))
    layers = _compact_experts(ckpt, plan, plans)

    by_scheme: dict[str, int] = defaultdict(int)
    elems_q = elems_all = 0
    for lp in plans:
        by_scheme[lp.scheme.label()] += sum(ckpt.tensors[t].nbytes for t in lp.tensors.values())
        slot = slots[lp.slot]
        rows = slot.out_features if lp.shard is None else slot.shard_sizes[lp.shard]
        elems_all += rows * slot.in_features
        elems_q += rows * slot.in_features if lp.scheme.quantized else 0

    head = plan.layers.get("lm_head")
    if cfg.tie_word_embeddings:
        lm_head = {"name": "lm_head", "status": "tied", "note": "shares model.embed_tokens.weight"}
    elif head is None:
        lm_head = {"name": "lm_head", "status": "missing"}
    else:
        lm_head = {**_layer(ckpt, plan, head), "status": "quantized" if head.scheme.quantized else "unquantized",
                   "on_disk": head.tensors.get("weight") or head.tensors.get("weight_packed")}
    return {
        "path": str(ckpt.path),
        "architecture": cfg.architecture,
        "producer": plan.producer,
        "layers": layers,
        "lm_head": lm_head,
        "kv_cache": plan.kv_cache,
        "kv_scales": len(plan.kv_scales),
        "tied_embeddings": cfg.tie_word_embeddings,
        "summary": {
            "tensors": len(ckpt.tensors),
            "total_bytes": ckpt.total_bytes(),
            "projection_bytes_by_scheme": dict(by_scheme),
            "quantized_share": elems_q / elems_all if elems_all else 0.0,
        },
        "skipped": plan.skipped,
        "notes": plan.notes,
        "problems": [{"layer": p.layer, "message": p.message} for p in plan.problems],
        "loadable": not plan.problems,
    }


# -- text rendering ----------------------------------------------------------------------------------

def _gib(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _rows(layers: list[dict]) -> list[list[str]]:
    """Table rows; identical rows of consecutive decoder layers are collapsed into one (layers 0-31)."""
    groups: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for lay in layers:
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", lay["name"])
        scales = ", ".join(r for r in lay["tensors"] if r not in MAIN_ROLES) or "-"
        cells = (lay["weight_detail"], lay["activation_detail"], scales, lay["fused"] or "-", "; ".join(lay["notes"]))
        key = (m.group(2) if m else lay["name"], cells, bool(m))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(m.group(1)) if m else -1)
    rows = []
    for key in order:
        name, cells, in_layers = key
        if in_layers:
            idx = groups[key]
            name = f"model.layers.{{{index_ranges(idx)}}}.{name}" if len(idx) > 1 else f"model.layers.{idx[0]}.{name}"
        rows.append([name, *cells])
    return rows


def render(rep: dict) -> str:
    head = ["module", "weight", "activation", "scale tensors", "layout", "notes"]
    rows = _rows(rep["layers"])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    lines = [f"{rep['path']}  ({rep['architecture']})", "", fmt.format(*head).rstrip()]
    lines += [fmt.format(*r).rstrip() for r in rows]

    s, prod, lm = rep["summary"], rep["producer"], rep["lm_head"]
    lines += ["", "summary"]
    lines.append(f"  producer        {prod['name']} {prod['version'] or ''} ({prod['algo'] or 'no weight quantization'}; "
                 f"from {prod['source']})" if prod else "  producer        none (no quantization config)")
    for label, n in sorted(s["projection_bytes_by_scheme"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {_gib(n):>14}  {label}")
    lines.append(f"  quantized       {s['quantized_share']:.1%} of projection weights")
    lm_desc = lm["status"] if lm["status"] in ("tied", "missing") else f"{lm['status']} ({lm['scheme']})"
    lines.append(f"  lm_head         {lm_desc}")
    lines.append(f"  KV cache        {rep['kv_cache'] or 'model dtype'} ({rep['kv_scales']} scale tensors)")
    lines.append(f"  tied embeddings {'yes' if rep['tied_embeddings'] else 'no'}")
    lines.append(f"  on disk         {s['tensors']} tensors, {_gib(s['total_bytes'])}")
    if rep["skipped"]:
        reasons: dict[str, int] = defaultdict(int)
        for r in rep["skipped"].values():
            reasons[r] += 1
        lines += ["", "skipped"] + [f"  {n} tensor(s): {r}" for r, n in reasons.items()]
    if rep["notes"]:
        lines += ["", "notes"] + [f"  - {n}" for n in rep["notes"]]
    if rep["problems"]:
        lines += ["", f"problems ({len(rep['problems'])}): this checkpoint does not load as is"]
        lines += [f"  - {p}" for p in group_lines([f"{p['layer']}: {p['message']}" for p in rep["problems"]])]
    else:
        lines += ["", "no problems: loadable"]
    return "\n".join(lines)
