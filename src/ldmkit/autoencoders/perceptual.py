"""LPIPS perceptual distance (Zhang et al., 2018, Eq. 1) with a VGG16 backbone.

No weights ship with ldmkit: :func:`load_perceptual` reads a local file. Expected keys
(``LPIPS().state_dict()``, 36 tensors; this is what :func:`save_perceptual` writes):

* ``net.features.{i}.weight`` / ``net.features.{i}.bias`` for
  ``i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)``: the VGG16 conv layers, named and
  numbered exactly as in torchvision's ``vgg16().features`` (rename ``features.*`` from a
  torchvision checkpoint to ``net.features.*``).
* ``lin{k}.model.1.weight`` for ``k in 0..4``, shape ``[1, C_k, 1, 1]``: the learned 1x1
  layers, named exactly as in the ``lpips`` package's ``weights/v0.1/vgg.pth``.

So a usable file is torchvision's VGG16 features plus lpips's lin weights in one safetensors
file. The input shift/scale constants are fixed and not stored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["LPIPS", "load_perceptual", "save_perceptual"]

logger = logging.getLogger("ldmkit.autoencoders")
_notice_logged = False

# torchvision VGG16 "D" configuration, truncated after conv5_3's ReLU (index 29).
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Indices into ``features`` of the ReLUs after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3.
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class _VGG16Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU()]
                in_ch = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
        return taps


class _Lin(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # Index 0 is Dropout in the lpips package; Identity keeps the ``model.1`` key name.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        # LPIPS lin weights are non-negative; clamping keeps the distance >= 0 for any file.
        return F.conv2d(x, self.model[1].weight.clamp_min(0))


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance for images in ``[-1, 1]``; returns ``[N]`` distances.

    ``d(x, y) = sum_l mean_hw || w_l * (f_l(x) - f_l(y)) ||^2`` where ``f_l`` are channel-wise
    unit-normalised VGG16 activations. Parameters never require grad and the module stays in
    eval mode, but gradients flow to the inputs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False
        )
        self.net = _VGG16Features()
        for k, ch in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{k}", _Lin(ch))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for k, (a, b) in enumerate(zip(fx, fy, strict=True)):
            # vector_norm has a zero-safe backward (sqrt of a sum does not).
            a = a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + 1e-10)
            b = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10)
            total = total + getattr(self, f"lin{k}")((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total


def load_perceptual(path: str | Path | None, *, allow_pickle: bool = False) -> LPIPS | None:
    """Build :class:`LPIPS` from local weights, or return ``None`` when ``path`` is ``None``.

    ``.safetensors`` files load directly. ``.pt``/``.pth`` files need ``allow_pickle=True`` and
    are then read with ``torch.load(weights_only=True)``. All keys listed in the module
    docstring must be present and no others; otherwise a ``KeyError`` names them.
    """
    global _notice_logged
    if path is None:
        if not _notice_logged:
            logger.info("no perceptual weights path given: the perceptual (LPIPS) loss is off")
            _notice_logged = True
        return None
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"perceptual weights not found: {path}")
        state = load_file(str(path))
    elif suffix in (".pt", ".pth"):
        if not allow_pickle:
            raise ValueError(
                f"refusing to load pickle-based weights {path}; convert them to .safetensors "
                "or pass allow_pickle=True"
            )
        if not path.is_file():
            raise FileNotFoundError(f"perceptual weights not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported perceptual weights format {suffix!r}: {path}")

    module = LPIPS()
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"perceptual weights {path} do not match LPIPS-VGG16: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    module.load_state_dict(state)
    return module


def save_perceptual(module: LPIPS, path: str | Path) -> None:
    """Write ``module``'s weights to a ``.safetensors`` file readable by :func:`load_perceptual`."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
