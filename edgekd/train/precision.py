"""Precision policies: what `precision: fp32|bf16|fp16|fp8` means on the device at hand, honestly labelled.

| precision | CUDA                                                  | CPU                                        |
|-----------|-------------------------------------------------------|--------------------------------------------|
| fp32      | native                                                | native                                     |
| bf16      | autocast bfloat16 (native)                            | autocast bfloat16: native with AVX512-BF16 |
|           |                                                       | or AMX (x86) or BF16 (Arm) instructions,   |
|           |                                                       | otherwise emulated and slower than fp32    |
| fp16      | autocast float16 + gradient scaler (native)           | weights and activations rounded to fp16,   |
|           |                                                       | computed in fp32 (simulated: fp16 conv is  |
|           |                                                       | ~12x slower than fp32 on this kind of CPU) |
| fp8       | e4m3 quantise-dequantise of conv/linear weights (per  | the same quantise-dequantise, computed in  |
|           | output channel) and inputs (per tensor, delayed amax  | fp32 (simulated)                           |
|           | scaling), straight-through gradients, bf16 compute    |                                            |
|           | (simulated fp8 storage; no fp8 matmul kernels used)   |                                            |

Fake quantisation swaps the class of each Conv2d/Linear for a subclass with the same parameters, so
state-dict keys are unchanged and a checkpoint rebuilds as a plain fp32 model (the learnt fp8 scales
are saved beside the weights for the fp8 export).
"""

from __future__ import annotations

import contextlib
import logging
import platform
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgekd.errors import RecipeError

FP8_MAX = 448.0  # largest finite float8 e4m3fn value
AMAX_HISTORY = 16  # steps of activation amax kept for delayed scaling


# ----- quantisers (straight-through: forward rounds, backward passes the gradient unchanged) ------------

def _straight_through(x: Tensor, rounded: Tensor) -> Tensor:
    return x + (rounded - x).detach()


def fp16_round(x: Tensor) -> Tensor:
    return _straight_through(x, x.to(torch.float16).to(x.dtype))


def fp8_weight_scale(weight: Tensor) -> Tensor:
    """Per-output-channel scale (dim 0) mapping each channel's amax to the e4m3 maximum."""
    amax = weight.detach().abs().flatten(1).amax(dim=1).float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def fp8_quantize_dequantize(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale rounded to float8 e4m3fn (saturating), times scale; straight-through gradient."""
    shape = [-1] + [1] * (x.dim() - 1) if scale.numel() > 1 else [1] * x.dim()
    s = scale.to(x.dtype).reshape(shape) if scale.numel() > 1 else scale.to(x.dtype)
    scaled = (x / s).clamp(-FP8_MAX, FP8_MAX)
    rounded = scaled.to(torch.float8_e4m3fn).to(x.dtype) * s
    return _straight_through(x, rounded)


class _ActivationScale:
    """Per-tensor input scale from the amax of the last AMAX_HISTORY training steps (delayed scaling)."""

    def __init__(self) -> None:
        self.history: list[float] = []

    def scale(self, x: Tensor, training: bool) -> Tensor:
        if training or not self.history:
            self.history = (self.history + [float(x.detach().abs().max())])[-AMAX_HISTORY:]
        amax = max(self.history)
        return torch.tensor(amax / FP8_MAX if amax > 0 else 1.0, device=x.device)


# ----- fake-quantised layers ----------------------------------------------------------------------------

class _FakeQuant:
    """Mixed into Conv2d/Linear by swapping __class__; `fake_mode` is fp16 or fp8."""

    fake_mode: str

    def _quantized(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.fake_mode == "fp16":
            return fp16_round(x), fp16_round(self.weight)
        x_scale = self._input_scale.scale(x, self.training)
        return fp8_quantize_dequantize(x, x_scale), fp8_quantize_dequantize(self.weight, fp8_weight_scale(self.weight))


class FakeQuantConv2d(_FakeQuant, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        x, weight = self._quantized(x)
        return self._conv_forward(x, weight, self.bias)


class FakeQuantLinear(_FakeQuant, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        x, weight = self._quantized(x)
        return F.linear(x, weight, self.bias)


_FAKE = {nn.Conv2d: FakeQuantConv2d, nn.Linear: FakeQuantLinear}


def add_fake_quant(model: nn.Module, mode: str) -> list[str]:
    """Make every Conv2d/Linear of `model` round its weights and inputs; returns their names."""
    names = []
    for name, module in model.named_modules():
        fake = _FAKE.get(type(module))
        if fake is not None:
            module.__class__ = fake
            module.fake_mode = mode
            module._input_scale = _ActivationScale()
            names.append(name)
    return names


def amax_histories(model: nn.Module) -> dict[str, list[float]]:
    """The fp8 input-scale histories, so a resumed run scales exactly as an uninterrupted one."""
    return {name: list(m._input_scale.history) for name, m in model.named_modules() if isinstance(m, _FakeQuant)}


def load_amax_histories(model: nn.Module, histories: dict[str, list[float]]) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _FakeQuant) and name in histories:
            module._input_scale.history = list(histories[name])


def fp8_scales(model: nn.Module) -> dict[str, Tensor]:
    """The weight scales (per output channel) of an fp8-trained model, keyed by parameter name."""
    return {f"{name}.weight": fp8_weight_scale(m.weight).cpu() for name, m in model.named_modules()
            if isinstance(m, _FakeQuant) and m.fake_mode == "fp8"}


# ----- policies -----------------------------------------------------------------------------------------

@dataclass
class PrecisionPolicy:
    mode: str
    device_type: str
    native: bool
    detail: str
    autocast_dtype: torch.dtype | None = None
    fake_quant: str | None = None  # "fp16" or "fp8": layers round their inputs and weights
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)
    warning: str | None = None  # logged once when a run starts with this policy: it will be slow here

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def prepare(self, model: nn.Module) -> None:
        if self.fake_quant:
            add_fake_quant(model, self.fake_quant)

    def backward_and_step(self, loss: Tensor, optimizer: torch.optim.Optimizer, clip_norm: float | None = None) -> None:
        """Backward and one optimizer step; with clip_norm, the global gradient norm is clipped first (on the
        unscaled gradients when a gradient scaler is in use)."""
        if self.scaler is None:
            loss.backward()
            _clip(optimizer, clip_norm)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip_norm is not None:
            self.scaler.unscale_(optimizer)
            _clip(optimizer, clip_norm)
        self.scaler.step(optimizer)
        self.scaler.update()

    def describe(self) -> dict:
        return {"mode": self.mode, "native": self.native, "detail": self.detail}


def _clip(optimizer: torch.optim.Optimizer, clip_norm: float | None) -> None:
    if clip_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_norm)


_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware: AVX512-BF16 or AMX on x86, the BF16 extension on Arm.

    Without them oneDNN still runs bf16 autocast, converting to fp32 around every op, which is slower
    than plain fp32."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # absent from older torch
        check = getattr(torch.cpu, name, None)
        if check is not None and check():
            return True
    if platform.machine().lower() in _X86:
        return False  # oneDNN calls bf16 "supported" on any AVX-512 core, emulated: no evidence here
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _bf16_policy(device: torch.device) -> PrecisionPolicy:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RecipeError("precision bf16: this GPU has no bfloat16 support", hint="use fp16 or fp32")
    if device.type == "cuda" or cpu_has_native_bf16():
        return PrecisionPolicy("bf16", device.type, True, "autocast bfloat16, fp32 master weights and loss",
                               autocast_dtype=torch.bfloat16)
    return PrecisionPolicy("bf16", device.type, False,
                           "autocast bfloat16, emulated: this CPU has no AVX512-BF16/AMX (or Arm BF16) "
                           "instructions, so it runs slower than fp32 here; fp32 master weights and loss",
                           autocast_dtype=torch.bfloat16,
                           warning="precision bf16 is emulated on this CPU (no AVX512-BF16/AMX or Arm BF16 "
                                   "instructions): expect it to train slower than precision fp32")


def make_policy(mode: str, device: torch.device) -> PrecisionPolicy:
    cuda = device.type == "cuda"
    if mode == "fp32":
        return PrecisionPolicy("fp32", device.type, True, "fp32 weights and arithmetic")
    if mode == "bf16":
        return _bf16_policy(device)
    if mode == "fp16" and cuda:
        return PrecisionPolicy("fp16", "cuda", True, "autocast float16 with a gradient scaler",
                               autocast_dtype=torch.float16, scaler=torch.amp.GradScaler("cuda"))
    if mode == "fp16":
        return PrecisionPolicy("fp16", "cpu", False, "simulated: weights and conv/linear inputs rounded to fp16, "
                               "computed in fp32 (fp16 arithmetic is far slower than fp32 on CPUs)",
                               fake_quant="fp16")
    if mode == "fp8":
        compute = "bf16 autocast" if cuda else "fp32"
        return PrecisionPolicy("fp8", device.type, False,
                               f"simulated: e4m3 quantise-dequantise of conv/linear weights (per channel) and inputs "
                               f"(per tensor, amax history {AMAX_HISTORY}), straight-through gradients, {compute} "
                               f"compute", autocast_dtype=torch.bfloat16 if cuda else None, fake_quant="fp8")
    raise RecipeError(f"precision {mode!r} is not one of fp32, bf16, fp16, fp8")


def bitsandbytes_module():
    """bitsandbytes, or a RecipeError saying how to get a version that runs here."""
    from importlib import metadata

    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        raise RecipeError("train.optimizer adam8bit needs bitsandbytes, which is not installed",
                          hint="pip install 'bitsandbytes>=0.50' (part of edgekd[train])") from None
    major, minor = (int(part) for part in version.split(".")[:2])
    if not torch.cuda.is_available() and (major, minor) < (0, 50):
        raise RecipeError(f"bitsandbytes {version} has no CPU 8-bit optimizers and there is no CUDA device",
                          hint="pip install 'bitsandbytes>=0.50'")
    # bitsandbytes warns on first use that optional 4-bit CPU kernels are missing; edgekd uses none of them.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def int8_linear_layers(module: nn.Module, bitsandbytes) -> int:
    """Hold every nn.Linear under `module` in bitsandbytes' 8-bit form (Linear8bitLt, int8 weights), for
    evaluation; returns how many layers were converted."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            int8 = bitsandbytes.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                                has_fp16_weights=False, threshold=0.0)
            int8.weight = bitsandbytes.nn.Int8Params(child.weight.data.clone(), requires_grad=False,
                                                     has_fp16_weights=False)
            if child.bias is not None:
                int8.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, name, int8.to(child.weight.device))
            count += 1
        else:
            count += int8_linear_layers(child, bitsandbytes)
    return count
