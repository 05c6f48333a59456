"""The two TensorRT flavours llama405 builds and runs engines with — one table, read by the
builder (engines/) and the TensorRT backend (runner/), which must agree on it.

- `tensorrt`: TensorRT >= 10.16 on an NVIDIA GPU, the deployment target (H100/H200, FP8 on SM90).
  It builds for the GPU it runs on, so a build needs that GPU.
- `rtx`: TensorRT-RTX (PyPI `tensorrt-rtx-cu13-libs` + `tensorrt-rtx-cu13-bindings`, module
  `tensorrt_rtx_bindings`). Same parser and Python API names; it builds ahead of time for the
  compute capabilities it is given (`IBuilderConfig.num_compute_capabilities` +
  `set_compute_capability`) without any GPU, and its runtime JIT-compiles on the user's RTX /
  Ampere+ GPU. It has no SM90 target: it cannot make an H100 engine.

What TensorRT-RTX 1.7 does on a machine without a GPU (measured, docs/engines.md): parse, build
and serialize work; the timing cache is not used; STRIP_PLAN fails (its Myelin backend needs
CUDA); `deserialize_cuda_engine` returns None (no CUDA driver). An FP8 graph builds only for
targets with FP8 tensor cores ("Cannot compile for target(s) sm80, sm86, because the model
contains HW-specific datatypes: fp8_e4m3").
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from types import ModuleType

from export.engines_record import EnginesSection
from export.errors import InputError
from export.quantization import Quantization


@dataclasses.dataclass(frozen=True)
class TrtFlavour:
    name: str                          # --trt value; the manifest's engines.flavour
    module: str                        # the Python module of its builder, parser and runtime
    title: str
    min_version: tuple[int, ...]
    pip: str                           # how to install it
    builds_without_gpu: bool
    targets: tuple[str, ...] = ()      # ahead-of-time compute capabilities ("sm89"); () = the build GPU
    default_targets: tuple[str, ...] = ()
    fp8_targets: tuple[str, ...] = ()  # targets with FP8 tensor cores

    def import_module(self) -> ModuleType | None:
        """The flavour's module, or None where it is absent, a stub, or broken."""
        if importlib.util.find_spec(self.module) is None:
            return None
        try:
            module = importlib.import_module(self.module)
        except Exception:  # noqa: BLE001 — a stub wheel or missing native library fails in many ways
            return None
        return module if hasattr(module, "Builder") else None

    def installed_but_unusable(self) -> bool:
        return importlib.util.find_spec(self.module) is not None and self.import_module() is None

    def resolve_targets(self, requested: str | None, quant: Quantization) -> tuple[str, ...]:
        """--target text ("sm89,sm120") -> targets, or the default set (FP8-capable ones for a
        scheme on FP8 tensor cores)."""
        if not self.targets:
            if requested:
                raise InputError(f"--target {requested}: --trt {self.name} builds for the GPU it runs on; "
                                 "ahead-of-time targets need --trt rtx")
            return ()
        if not requested:
            return self.fp8_targets if quant.fp8_tensor_cores else self.default_targets
        wanted = [t.strip().lower() for t in requested.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in self.targets]
        if unknown or not wanted:
            raise InputError(f"--target {requested}: {self.title} targets {', '.join(self.targets)} "
                             f"(no {', '.join(unknown) or 'target given'}); an H100 (sm90) engine needs --trt tensorrt")
        if quant.fp8_tensor_cores:
            no_fp8 = [t for t in wanted if t not in self.fp8_targets]
            if no_fp8:
                raise InputError(f"--target {requested}: an FP8 engine will not be able to run on {', '.join(no_fp8)} "
                                 f"(no FP8 tensor cores); choose from {', '.join(self.fp8_targets)}")
        return tuple(dict.fromkeys(wanted))


FLAVOURS: dict[str, TrtFlavour] = {
    "tensorrt": TrtFlavour(
        name="tensorrt", module="tensorrt", title="TensorRT", min_version=(10, 16),
        pip="TensorRT >= 10.16 (pip install '.[gpu]')", builds_without_gpu=False),
    "rtx": TrtFlavour(
        name="rtx", module="tensorrt_rtx_bindings", title="TensorRT-RTX", min_version=(1, 7),
        pip="TensorRT-RTX (pip install '.[rtx]': tensorrt-rtx-cu13-libs and -bindings 1.7.1.116)", builds_without_gpu=True,
        targets=("sm75", "sm80", "sm86", "sm89", "sm120", "sm121"),
        default_targets=("sm80", "sm86", "sm89", "sm120"), fp8_targets=("sm89", "sm120", "sm121")),
}


def flavour(name: str) -> TrtFlavour:
    if name not in FLAVOURS:
        raise InputError(f"--trt {name!r}: choose one of {', '.join(FLAVOURS)}")
    return FLAVOURS[name]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(text))[:3])


def cuda_devices() -> list[tuple[str, tuple[int, int]]]:
    """(name, compute capability) of every visible CUDA GPU; [] on a CPU-only machine."""
    import torch
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]


def why_engines_cannot_run(section: EnginesSection) -> str | None:
    """Why this machine cannot run the engines a manifest "engines" section describes, or None."""
    chosen = flavour(section.flavour)
    devices = cuda_devices()
    if not devices:
        return f"{chosen.title} engines need an NVIDIA GPU and this machine has none"
    if chosen.targets:
        have = {f"sm{a}{b}" for _, (a, b) in devices}
        if not have & set(section.targets):
            return (f"the {chosen.title} engines target {', '.join(section.targets)}; this machine's GPUs are "
                    f"{', '.join(sorted(have))}")
        return None
    sms = {f"{a}.{b}" for _, (a, b) in devices}
    if section.gpu and not {g.sm for g in section.gpu} & sms:
        built = ", ".join(f"{g.name} (SM{g.sm})" for g in section.gpu)
        return (f"the engines were built on {built}; TensorRT engines run only on that GPU architecture, this "
                f"machine has SM{', SM'.join(sorted(sms))}")
    return None
