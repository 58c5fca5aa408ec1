"""The scheme vocabulary shared by the whole code base (config parsing, loader, kernels, quantize).

A Scheme says *what* a Linear-like module holds; the scheme units in lowbit/quant/methods/ say how
to load and run it. Schemes are frozen, hashable values: two shards with equal Schemes can be fused.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

WEIGHT_FORMATS = ("bf16", "fp16", "fp32", "fp8", "nvfp4", "int4", "int8", "mxfp8")
FLOAT_FORMATS = ("bf16", "fp16", "fp32")
GRANULARITIES = ("tensor", "channel", "group", "block")
ACTIVATION_FORMATS = ("none", "fp8", "nvfp4", "int8", "mxfp8")  # mxfp8: parsed and reported, not runnable yet
FORMATS = ("modelopt", "compressed-tensors")  # on-disk spellings of the same schemes
KV_CACHE_FORMATS = ("fp8",)  # quantized KV caches a checkpoint may declare (None: the model dtype)


@dataclass(frozen=True)
class Scheme:
    weight: str = "bf16"  # one of WEIGHT_FORMATS
    granularity: str | None = None  # weight-scale granularity, one of GRANULARITIES (None: unquantized)
    group_size: int | None = None  # group: elements per scale along K (nvfp4: 16)
    block: tuple[int, int] | None = None  # block granularity: (rows, cols), e.g. (128, 128)
    symmetric: bool = True  # False: int weights carry zero points
    packed: bool = False  # compressed-tensors pack-quantized: ints packed into int32 words (W4A16/W8A16)
    activation: str = "none"  # one of ACTIVATION_FORMATS
    act_dynamic: bool = False  # True: scales computed at run time (per token / per block)
    act_granularity: str | None = None  # tensor | token | group
    act_symmetric: bool = True
    fmt: str | None = None  # 'modelopt' | 'compressed-tensors': which tensor names are on disk
    algo: str | None = None  # producer's name for it (ModelOpt quant_algo, CT preset), for display

    def __post_init__(self):
        if self.weight not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {self.weight!r}; known: {', '.join(WEIGHT_FORMATS)}")
        if self.activation not in ACTIVATION_FORMATS:
            raise ValueError(f"unknown activation format {self.activation!r}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}")

    @property
    def quantized(self) -> bool:
        return self.weight not in FLOAT_FORMATS

    @property
    def bits(self) -> float:
        return {"bf16": 16, "fp16": 16, "fp32": 32, "fp8": 8, "mxfp8": 8, "nvfp4": 4, "int4": 4, "int8": 8}[self.weight]

    def weight_label(self) -> str:
        if not self.quantized:
            return self.weight
        g = self.granularity or ""
        if g == "group":
            g = f"g{self.group_size}"
        elif g == "block" and self.block:
            g = f"b{self.block[0]}x{self.block[1]}"
        sym = "" if self.symmetric else "-asym"
        return f"{self.weight}-{g}{sym}" if g else self.weight

    def activation_label(self) -> str:
        if self.activation == "none":
            return "none"
        kind = "dynamic" if self.act_dynamic else "static"
        gran = f"-{self.act_granularity}" if self.act_granularity else ""
        return f"{self.activation}-{kind}{gran}"

    def label(self) -> str:
        return f"W:{self.weight_label()} A:{self.activation_label()}"

    def weight_only(self) -> "Scheme":
        return replace(self, activation="none", act_dynamic=False, act_granularity=None)


def unquantized(dtype_name: str = "bf16") -> Scheme:
    return Scheme(weight=dtype_name)


# safetensors dtype strings -> our names for unquantized tensors
ST_FLOAT_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
