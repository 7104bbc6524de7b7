"""What this CPU runs natively: its instruction-set flags, and the precisions they make fast.

- **bf16**: AVX512_BF16 (bf16 dot products) or AMX-BF16. Without them bf16 is emulated: PyTorch's autocast ran
  80–120× slower than fp32 on an AVX2-only EPYC, and OpenVINO falls back to f32.
- **int8**: AVX512_VNNI / AVX-VNNI / AMX-INT8 (int8 dot products); AVX2 alone runs int8 too, with more
  instructions per product.

Linux reads ``/proc/cpuinfo``; elsewhere no flags are known and only fp32 is called native.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(path: str = "/proc/cpuinfo") -> list[str]:
    """The flags of FLAGS_OF_INTEREST this CPU has (empty where /proc/cpuinfo does not exist)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in FLAGS_OF_INTEREST if flag in have]
    except OSError:
        pass
    return []


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class CpuPrecisions:
    """Which precisions run natively here, and the flags that say so."""

    model: str
    flags: tuple[str, ...]
    bf16: tuple[str, ...] = field(default=())   # the flags that make bf16 native (empty: emulated)
    int8: tuple[str, ...] = field(default=())   # the flags with int8 dot products (empty: AVX2 at best)

    @property
    def native_bf16(self) -> bool:
        return bool(self.bf16)

    def describe(self) -> str:
        parts = ["fp32"]
        parts.append(f"bf16 ({', '.join(self.bf16)})" if self.bf16 else "bf16: no (no AVX512_BF16/AMX: emulated, slow)")
        parts.append(f"int8 ({', '.join(self.int8)})" if self.int8 else "int8 (no VNNI: AVX2 instructions)")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"model": self.model, "flags": list(self.flags), "bf16": list(self.bf16), "int8": list(self.int8)}


def cpu_precisions(flags: list[str] | None = None) -> CpuPrecisions:
    flags = cpu_flags() if flags is None else list(flags)
    return CpuPrecisions(model=cpu_model(), flags=tuple(flags), bf16=tuple(f for f in BF16_FLAGS if f in flags),
                         int8=tuple(f for f in INT8_FLAGS if f in flags))
