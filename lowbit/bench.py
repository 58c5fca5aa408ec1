"""The measurements of `lowbit bench` (lowbit/commands/bench.py parses the flags): prefill and decode
rates on the engine, the bytes a decode step reads, copy bandwidth, memory, and transformers' rates
for comparison. `bench(opts)` returns one dict of plain values (the --json output)."""
from __future__ import annotations

import datetime
import statistics
import time

import torch

from .kernels import invariance
from .layers.moe import MoEBlock
from .progress import step


def _ints(text: str, flag: str) -> list[int]:
    from .errors import LowbitError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LowbitError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise LowbitError(f"{flag} needs positive integers, got {text!r}")
    return values



def _load(opts: dict):
    from types import SimpleNamespace

    if opts["synthetic"]:
        from . import synthetic
        from .config import parse_dtype

        return synthetic.build(opts["synthetic"], opts["scheme"], lm_head_quant=opts["lm_head_quant"],
                               device=opts["device"], dtype=parse_dtype(opts["dtype"]) or torch.bfloat16,
                               kv_cache="fp8" if opts["kv_cache_fp8"] else "auto",
                               activation_quant=opts["activation_quant"], use_kernels=not opts["no_kernels"],
                               speculative=opts.get("speculative"),
                               num_speculative_tokens=opts.get("num_speculative_tokens", 1),
                               mtp_agree=opts.get("mtp_agree", False))
    from .commands.generate import load_from_args

    return load_from_args(SimpleNamespace(**opts | {"batch_invariant": False}))  # bench() sets the mode


def _model_config(opts: dict):
    """The ModelConfig of what will be benchmarked, read before building or loading it."""
    from .config import parse_model_config

    if opts["synthetic"]:
        from . import synthetic

        return parse_model_config(synthetic.model_config(opts["synthetic"]))
    from .checkpoint import Checkpoint

    ckpt = Checkpoint(opts["path"])
    return parse_model_config(ckpt.config, where=str(ckpt.path / "config.json"))


DEFAULT_PROMPT_LENS = (512, 2048)


def _lengths(opts: dict, cfg) -> list[int]:
    """The prefill lengths; every length must fit the model's positions, and so must the decode run."""
    from .errors import LowbitError

    room = cfg.max_position_embeddings
    if opts["prompt_lens"] is None:
        lens = [p for p in DEFAULT_PROMPT_LENS if p + 1 <= room] or [room // 2]
    else:
        lens = _ints(opts["prompt_lens"], "--prompt-lens")
        too_long = [p for p in lens if p + 1 > room]
        if too_long:
            raise LowbitError(f"--prompt-lens {','.join(map(str, too_long))} does not fit the model's {room} positions "
                              f"(max_position_embeddings); pass shorter lengths, e.g. --prompt-lens {room // 4},{room // 2}")
    if opts["decode_prompt"] < 1 or opts["new_tokens"] < 1:
        raise LowbitError("--decode-prompt and --new-tokens must be >= 1")
    need = opts["decode_prompt"] + opts["new_tokens"] + 8
    if need > room:
        raise LowbitError(f"--decode-prompt {opts['decode_prompt']} + --new-tokens {opts['new_tokens']} (+8) needs {need} "
                          f"positions, the model has {room} (max_position_embeddings); lower --decode-prompt or "
                          f"--new-tokens")
    return lens


def _params(cfg) -> int:
    """Parameters of a dense decoder of these shapes (for time estimates)."""
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    return cfg.num_layers * per_layer + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)


def _warn_if_slow(opts: dict, cfg, say) -> None:
    dev = opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    n = _params(cfg)
    if str(dev).startswith("cpu") and n > 1e9:
        say(f"warning: {n / 1e9:.1f}B parameters on the CPU: building and timing this takes many minutes "
            f"(try --synthetic tiny, or a GPU)")


def bench(opts: dict) -> dict:
    """Every measurement for one model; a dict of plain values (the JSON output)."""
    from . import parallel

    batches = _ints(opts["batches"], "--batches")
    rank, tp = parallel.current()
    say = step if rank == 0 else (lambda msg: None)
    cfg = _model_config(opts)
    prompt_lens = _lengths(opts, cfg)
    _warn_if_slow(opts, cfg, say)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = _allocated()
    if opts["synthetic"]:  # a checkpoint's load reports itself (commands/generate.py load_from_args)
        say(f"building the synthetic {opts['synthetic']} ({opts['scheme']})")
    t0 = time.perf_counter()
    model = _load(opts)
    dev = model.device
    say(f"ready on {dev} in {time.perf_counter() - t0:.1f} s; measuring copy bandwidth")
    res = {"model": opts["synthetic"] or opts["path"], "scheme": _scheme_label(model), "tp": tp,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": _triton_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "cuda_graphs": not opts["no_graphs"] and dev.type == "cuda"}
    res["copy_gbps"] = copy_bandwidth(dev) / 1e9
    res["weight_bytes_per_step"] = step_weight_bytes(model)
    res["disk_bytes"] = model.report.bytes_read
    res["gpu_model_bytes"] = (_allocated() - before) if dev.type == "cuda" else model.weight_bytes()
    res["memory_vs_disk"] = res["gpu_model_bytes"] * tp / max(1, res["disk_bytes"])  # all ranks together
    if dev.type == "cuda":  # the load's own transient (e.g. quantizing a synthetic model) is reported apart
        res["load_peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    with invariance.scope(False):
        res["prefill"], res["decode"] = rates(model, opts, prompt_lens, batches, res["copy_gbps"], say)
        say(f"Model.generate: batch 1, {opts['new_tokens']} tokens")
        ids = torch.randint(3, model.config.vocab_size, (opts["decode_prompt"],)).tolist()
        spec, model.speculative = model.speculative, None  # plain decoding here; speculation is timed below
        try:
            plain = timed_generate(model, ids, opts["new_tokens"])
        finally:
            model.speculative = spec
        res["generate_b1_tok_s"] = opts["new_tokens"] / plain[0]
        if spec is not None:
            say(f"speculative ({spec.method}, {spec.num_tokens} drafts/step) vs plain: batch 1, "
                f"{opts['new_tokens']} tokens")
            res["speculative"] = speculative_rate(model, ids, opts["new_tokens"], plain)
    if opts.get("batch_invariant"):  # the same measurements with the mode on (fresh engines and graphs)
        with invariance.scope(True):
            pre, dec = rates(model, opts, prompt_lens, batches, res["copy_gbps"], say, " (batch-invariant)")
        res["batch_invariant"] = {"prefill": pre, "decode": dec}
    if dev.type == "cuda":
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
    res["notes"] = sorted({n for d in _decode_results(res) for n in d.pop("notes")})
    del model
    if opts["compare_hf"]:
        say("transformers (bf16): the same shapes")
        res["hf"] = hf_rates(opts, prompt_lens, dev)
        b1 = res["decode"].get("1")
        if b1:
            res["speedup_vs_hf_b1"] = b1["tok_s"] / res["hf"]["decode_b1_tok_s"]
    return res


# ------------------------------------------------------------------ measurements
def rates(model, opts: dict, prompt_lens: list[int], batches: list[int], copy_gbps: float, say,
          label: str = "") -> tuple[dict, dict]:
    """Prefill rates by prompt length and decode rates by batch size, as the mode now is."""
    prefill, decode = {}, {}
    for p in prompt_lens:
        say(f"prefill: {p} tokens, batch 1{label}")
        prefill[str(p)] = prefill_rate(model, p)
    for b in batches:
        say(f"decode: batch {b}, {opts['new_tokens']} steps after a {opts['decode_prompt']}-token prompt{label}")
        decode[str(b)] = decode_rate(model, b, opts["decode_prompt"], opts["new_tokens"], not opts["no_graphs"],
                                     step_weight_bytes(model, b), copy_gbps)
    return prefill, decode


def _decode_results(res: dict) -> list[dict]:
    return list(res["decode"].values()) + list(res.get("batch_invariant", {}).get("decode", {}).values())


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _scheme_label(model) -> str:
    heads = {g.parts[0].method.scheme.label() for n, g in model.net.named_modules()
             if n.endswith("mlp.down_proj") and hasattr(g, "parts")}
    head = model.net.lm_head
    head_label = "tied embedding" if head is None else head.parts[0].method.scheme.label()
    return f"{', '.join(sorted(heads))}; lm_head {head_label}"


def copy_bandwidth(dev, nbytes: int | None = None) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median of 10)."""
    nbytes = nbytes or (2**30 if dev.type == "cuda" else 2**25)
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        _sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def step_weight_bytes(model, batch: int = 1) -> int:
    """Bytes of weights one decode step of `batch` sequences reads: every projection and norm, the
    head (the tied embedding when there is no separate head), not the embedding rows it looks up.
    A MoE layer's experts count only as far as the step touches them: with top-k of E experts and
    routing spread evenly, `batch` tokens touch a share 1 - (1 - k/E)^batch of them (k/E at batch 1)."""
    net = model.net
    experts: dict[int, float] = {}  # id(parameter) -> share of its bytes read
    for m in net.modules():
        if isinstance(m, MoEBlock):
            share = 1 - (1 - m.routing.top_k / m.experts.num_experts) ** batch
            for p in m.experts.parameters():
                experts[id(p)] = share
    total = 0.0
    for name, p in net.named_parameters():
        if (name == "model.embed_tokens.weight" and net.lm_head is not None) or name.startswith("mtp."):
            continue  # (a plain decode step does not run the MTP head)
        total += p.numel() * p.element_size() * experts.get(id(p), 1.0)
    return int(total + sum(b.numel() * b.element_size() for b in net.buffers()))


def prefill_rate(model, length: int) -> dict:
    from .engine import Engine
    from .sampling import SamplingParams

    engine = Engine(model, 1, length + 1, cuda_graphs=False, prefix_caching=False)  # every run computes it all
    ids = torch.randint(3, model.config.vocab_size, (length,)).tolist()
    times = []
    for i in range(4):
        slot = engine.acquire()
        _sync(model.device)
        t0 = time.perf_counter()
        engine.prefill(slot, ids, SamplingParams()).get()
        if i:
            times.append(time.perf_counter() - t0)
        engine.release(slot)
    t = statistics.median(times)
    return {"tok_s": length / t, "ms": 1000 * t}


def decode_rate(model, batch: int, prompt: int, steps: int, graphs: bool, weight_bytes: int, copy_gbps: float) -> dict:
    from .engine import Engine
    from .sampling import SamplingParams

    greedy = SamplingParams()
    engine = Engine(model, batch, prompt + steps + 8, cuda_graphs=graphs)
    slots = [engine.acquire() for _ in range(batch)]
    for s in slots:
        engine.prefill(s, torch.randint(3, model.config.vocab_size, (prompt,)).tolist(), greedy)
    engine.capture([batch])
    for _ in range(3):  # warm-up steps (compilation, cuBLAS heuristics)
        engine.decode(slots, greedy)
    _sync(model.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = engine.decode(slots, greedy)
    last.get()
    _sync(model.device)
    t = (time.perf_counter() - t0) / steps
    kv_bytes = batch * engine.cache.read_bytes(prompt + 3 + steps / 2)  # mean context over the timed steps
    gbps = (weight_bytes + kv_bytes) / t / 1e9
    out = {"tok_s": batch / t, "ms_per_step": 1000 * t, "kv_bytes_per_step": int(kv_bytes), "gbps": gbps,
           "share_of_copy_bw": gbps / copy_gbps, "cuda_graphs": engine.cuda_graphs, "notes": engine.notes}
    return out


def timed_generate(model, ids: list[int], steps: int):
    """(seconds, run) of one batch-1 Model.stream of `steps` greedy tokens after `ids` (host loop,
    detokenization-free, pipelined), after an identical warm-up run: the engine it needs (sized by
    the run itself: speculation needs room for its drafts) is built, compiled and captured outside
    the timing."""
    model.generate([ids], max_new_tokens=steps, ignore_eos=True)
    _sync(model.device)
    t0 = time.perf_counter()
    run = model.stream([ids], max_new_tokens=steps, ignore_eos=True)
    for _ in run:
        pass
    _sync(model.device)
    return time.perf_counter() - t0, run


def speculative_rate(model, ids: list[int], steps: int, plain) -> dict:
    """Batch-1 greedy generation with the model's speculation against plain decoding of the same
    prompt (`plain`: timed_generate's (seconds, run) with speculation off): tokens/s of both, the
    speed-up, the acceptance rate (accepted / drafted tokens), the tokens gained per verify step, and
    whether both gave the same tokens (they must)."""
    spec = model.speculative
    (t_plain, plain_run), (t_spec, run) = plain, timed_generate(model, ids, steps)
    st = run.spec_stats
    out = {"method": spec.method, "num_speculative_tokens": spec.num_tokens,
           "acceptance_rate": st["acceptance_rate"], "drafted": st["drafted"], "accepted": st["accepted"],
           "tokens_per_step": (steps - 1) / max(1, st["steps"]),  # the first token comes from the prefill
           "plain_tok_s": steps / t_plain, "tok_s": steps / t_spec, "speedup": t_plain / t_spec,
           "identical": run.results[0].output_ids == plain_run.results[0].output_ids}
    agree = [n for n in model.report.notes if n.startswith("MTP weights drawn to agree")]
    if agree:
        out["construction"] = agree[0]
    return out


def hf_rates(opts: dict, prompt_lens: list[int], dev) -> dict:
    """transformers in bf16 with random weights of the same shapes: prefill and batch-1 decode."""
    import transformers

    if opts["synthetic"]:
        from . import synthetic

        raw = dict(synthetic.model_config(opts["synthetic"]))
        cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    else:
        cfg = transformers.AutoConfig.from_pretrained(opts["path"])
        if hasattr(cfg, "quantization_config"):  # same shapes, plain bf16 weights
            del cfg.quantization_config
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(dev).eval()
    out = {"version": transformers.__version__, "prefill": {}}
    with torch.inference_mode():
        for p in prompt_lens:
            ids = torch.randint(3, cfg.vocab_size, (1, p), device=dev)
            times = []
            for i in range(3):
                _sync(dev)
                t0 = time.perf_counter()
                hf(ids, logits_to_keep=1)
                _sync(dev)
                if i:
                    times.append(time.perf_counter() - t0)
            out["prefill"][str(p)] = {"tok_s": p / statistics.median(times)}
        ids = torch.randint(3, cfg.vocab_size, (1, opts["decode_prompt"]), device=dev)
        n = opts["hf_new_tokens"]

        def gen(k):
            _sync(dev)
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
            _sync(dev)
            return time.perf_counter() - t0

        gen(2)
        out["decode_b1_tok_s"] = (n - 1) / (gen(n) - gen(1))
    del hf
    return out


# ------------------------------------------------------------------ output
def format_table(r: dict) -> str:
    gb = 1e9
    lines = [f"{r['model']}  [{r['scheme']}]  tp={r['tp']}",
             f"{r['device']}  torch {r['torch']}  triton {r['triton']}  {r['date']}",
             f"copy bandwidth (read+write): {r['copy_gbps']:.0f} GB/s; weights read per decode step: "
             f"{r['weight_bytes_per_step'] / gb:.2f} GB -> roofline {r['copy_gbps'] * gb / r['weight_bytes_per_step']:.0f} "
             f"steps/s",
             f"memory: model {r['gpu_model_bytes'] / gb:.2f} GB{' per rank' if r['tp'] > 1 else ''}; all ranks "
             f"{r['memory_vs_disk']:.2f}x its {r['disk_bytes'] / gb:.2f} GB on disk" + (
                 f"; peak {r['peak_gpu_bytes'] / gb:.2f} GB running, {r['load_peak_gpu_bytes'] / gb:.2f} GB loading"
                 if "peak_gpu_bytes" in r else ""),
             "", f"{'prefill tokens':>14} {'tok/s':>10} {'ms':>9}"]
    lines += [f"{p:>14} {v['tok_s']:>10.0f} {v['ms']:>9.2f}" for p, v in r["prefill"].items()]
    lines += ["", f"{'decode batch':>14} {'tok/s':>10} {'ms/step':>9} {'GB/s':>8} {'of copy BW':>10} {'graphs':>6}"]
    lines += [f"{b:>14} {v['tok_s']:>10.1f} {v['ms_per_step']:>9.3f} {v['gbps']:>8.0f} {v['share_of_copy_bw']:>10.0%} "
              f"{'yes' if v['cuda_graphs'] else 'no':>6}" for b, v in r["decode"].items()]
    if "batch_invariant" in r:  # the mode's rates beside the default's
        bi = r["batch_invariant"]
        lines += ["", "batch-invariant mode (--batch-invariant): rate with the mode on / off"]
        lines += [f"{'prefill ' + p:>14} {v['tok_s']:>10.0f} tok/s {v['tok_s'] / r['prefill'][p]['tok_s']:>6.2f}x"
                  for p, v in bi["prefill"].items()]
        lines += [f"{'decode b' + b:>14} {v['tok_s']:>10.1f} tok/s {v['tok_s'] / r['decode'][b]['tok_s']:>6.2f}x"
                  for b, v in bi["decode"].items()]
    lines.append(f"\nModel.generate, batch 1: {r['generate_b1_tok_s']:.1f} tok/s")
    if "speculative" in r:
        s = r["speculative"]
        lines.append(f"speculative {s['method']} ({s['num_speculative_tokens']} drafts/step), batch 1: "
                     f"{s['tok_s']:.1f} tok/s vs {s['plain_tok_s']:.1f} plain = {s['speedup']:.2f}x; acceptance "
                     f"{s['acceptance_rate']:.0%} ({s['accepted']}/{s['drafted']}), {s['tokens_per_step']:.2f} "
                     f"tokens/step; tokens {'identical to' if s['identical'] else 'DIFFERENT from'} plain decoding")
        if "construction" in s:
            lines.append(f"  ({s['construction']})")
    if "hf" in r:
        hf = r["hf"]
        pre = ", ".join(f"{p}: {v['tok_s']:.0f}" for p, v in hf["prefill"].items())
        lines.append(f"transformers bf16: decode batch 1 {hf['decode_b1_tok_s']:.1f} tok/s; prefill tok/s {pre}")
        if "speedup_vs_hf_b1" in r:
            lines.append(f"lowbit / transformers, decode batch 1: {r['speedup_vs_hf_b1']:.1f}x")
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
