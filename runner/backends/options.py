"""Each backend's options and the flag group that fills them (Polygraphy's argument groups).

A `FlagGroup` adds its flags to a parser and parses them back; the registry
(runner/backends/registry.py) gives every backend kind its groups, so a command offers each
option once and a flag of a backend the command does not run is refused, not ignored. Light
imports only: the command line builds its parser without loading onnxruntime, torch's CUDA or
TensorRT.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
from typing import Any

from export.bounds import ORT_THREADS
from export.cli_flags import flag_type
from export.errors import InputError
from runner.backends.ort_threads import SPINNING_CHOICES, OrtThreads
from runner.device import Device, parse_device


class FlagGroup(abc.ABC):
    """A set of flags and what they parse into."""

    title: str
    flags: tuple[str, ...]  # the flags' dests, for the applicability check

    @abc.abstractmethod
    def add_flags(self, parser: argparse.ArgumentParser) -> None: ...

    @abc.abstractmethod
    def parse(self, args: argparse.Namespace) -> dict[str, Any]:
        """The option fields these flags set (keyword arguments of the backend's options)."""

    def given(self, args: argparse.Namespace) -> list[str]:
        """The flags of this group the user set (a value other than the default)."""
        return [f"--{dest.replace('_', '-')}" for dest in self.flags
                if getattr(args, dest, None) not in (None, False, self.defaults().get(dest))]

    def defaults(self) -> dict[str, Any]:
        return {}


class DeviceFlags(FlagGroup):
    """--device (every backend) and --tf32 (float32 matmuls on CUDA)."""

    title = "device"
    flags = ("device", "tf32")

    def add_flags(self, parser):
        parser.add_argument("--device", type=flag_type(parse_device), metavar="cpu|cuda[:N]",
                            help="where the backend runs (default: cpu; trt: cuda). cuda: rank r on GPU r %% "
                                 "count (torchrun: LOCAL_RANK); cuda:N: every rank on GPU N")
        parser.add_argument("--tf32", action="store_true",
                            help="let float32 matmuls on CUDA use TF32 (faster, ~1e-3 relative; off by default "
                                 "so fp32 parity holds)")

    def parse(self, args):
        return {"device": args.device, "tf32": args.tf32}

    def tf32_for(self, args, device: Device | None, options_type: type) -> dict[str, Any]:
        """--tf32 reaches the sides that run on CUDA and have float32 matmuls to change."""
        takes = "tf32" in {f.name for f in dataclasses.fields(options_type)}
        return {"tf32": True} if args.tf32 and takes and device is not None and device.is_cuda else {}


class OrtFlags(FlagGroup):
    title = "onnxruntime backend"
    flags = ("ort_threads", "ort_spinning")

    def add_flags(self, parser):
        parser.add_argument("--ort-threads", type=ORT_THREADS.flag_type,
                            help=f"ort backend: intra-op threads per session (default: the cores, <= 8; at most "
                                 f"{ORT_THREADS.hi}: {ORT_THREADS.reason})")
        parser.add_argument("--ort-spinning", choices=SPINNING_CHOICES, default="auto",
                            help="ort backend: spin the thread pool between steps (auto: when the rank graph is "
                                 "one session)")

    def defaults(self):
        return {"ort_spinning": "auto"}

    def parse(self, args):
        return {"threads": OrtThreads(args.ort_threads, args.ort_spinning)}


def _nonnegative_bytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 bytes")
    return value


class TrtFlags(FlagGroup):
    title = "TensorRT backend"
    flags = ("trt_cuda_graph", "trt_weight_streaming_budget")

    def add_flags(self, parser):
        parser.add_argument("--trt-cuda-graph", action="store_true",
                            help="trt backend: capture static-cache decode steps in a CUDA graph and replay them")
        parser.add_argument("--trt-weight-streaming-budget", type=_nonnegative_bytes, metavar="BYTES",
                            help="trt backend: device bytes for weights of an engine built with weight streaming "
                                 "(default: TensorRT's automatic budget)")

    def parse(self, args):
        return {"cuda_graph": args.trt_cuda_graph, "weight_streaming_budget": args.trt_weight_streaming_budget}


def _check_tf32(device: Device | None, tf32: bool) -> None:
    if tf32 and (device is None or not device.is_cuda):
        raise InputError("tf32 changes float32 matmuls on CUDA only; run on a CUDA device or leave it off")


@dataclasses.dataclass(frozen=True)
class OrtOptions:
    device: Device | None = None  # None: cpu
    tf32: bool = False  # CUDA provider option use_tf32 (onnxruntime's default is on; ours off: parity)
    threads: OrtThreads = OrtThreads()

    def __post_init__(self):
        _check_tf32(self.device, self.tf32)


@dataclasses.dataclass(frozen=True)
class TorchOptions:
    device: Device | None = None  # None: cpu
    tf32: bool = False  # torch.backends.cuda.matmul: TF32 for float32 matmuls

    def __post_init__(self):
        _check_tf32(self.device, self.tf32)


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    device: Device | None = None  # None: cuda (TensorRT runs on GPUs only)
    cuda_graph: bool = False
    weight_streaming_budget: int | None = None

    def __post_init__(self):
        if self.device is not None and not self.device.is_cuda:
            raise InputError(f"--device {self.device}: TensorRT engines run on CUDA GPUs; use --device cuda[:N] "
                             "or --backend ort for the CPU")
