"""Opt-in ``torch.compile`` of a network, compiled once for every batch size and resolution.

``compile_network(net)`` returns a callable that runs ``net`` through ``torch.compile`` with
dynamic shapes and the settings that let torch 2.13 inductor compile ldmkit's UNet, DiT and VAE
that way:

- the batch size and each spatial size get their own symbol, so a square first call does not
  tie height to width (dynamo's "duck sizing") and a batch of 1 does not specialise
  (``backed_size_oblivious``); one graph then serves every later shape;
- 1x1 convolutions are lowered as matrix products (``conv_1x1_as_mm``); with that and
  ``ldmkit.nn.layers.tokens_to_image``, inductor no longer fails with "ValueRangeError:
  Invalid ranges [0:-1]" on the symbolic token count;
- ``freeze=True`` lets inductor treat the weights as constants and pre-pack them (its
  ``freezing`` option, as the eager ``ldmkit.accel.prepack`` does). Frozen weights must not
  change afterwards.

On a CPU, compiling does not beat ldmkit's eager default, which pre-packs its weights too.
A dynamic-shape graph is slower than eager, probably because oneDNN picks a convolution's
packed weight layout for a known input size (SD 1.5 UNet, 256 px, fp32, 2 threads: 0.81x
diffusers after a 447 s compile, against 1.32x for eager). It is meant for GPUs (not
measured here: no GPU was lent), or for ``dynamic=False`` when the shapes are fixed.

Limits (torch 2.13): inductor's convolutions guard the batch size to 2-15, so a batch of 1 and
batches of 16 and more compile once more each; a feature map reduced to a single pixel (a
64 px image in an SD layout) also specialises. Caching wrappers (``ldmkit.accel.cache``) run
the network block by block and do not combine with a compiled one.

The network's packed layers are unpacked first (inductor traces plain layers). The settings
are applied around every call, as dynamo reads them whenever it (re)traces, and they are
process-wide only for the duration of the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ldmkit.accel.prepack import unpack


class CompiledNetwork(nn.Module):
    """``torch.compile(net)`` called under the settings above. A module in place of ``net``:
    ``.net`` is ``net`` (its parameters are this module's), and other attributes (``config``,
    ...) are ``net``'s."""

    def __init__(
        self,
        net: nn.Module | Callable[..., Any],
        *,
        dynamic: bool = True,
        freeze: bool = True,
        backend: str = "inductor",
    ):
        super().__init__()
        if isinstance(net, nn.Module):  # free the eager packed copies: the graph has its own
            unpack(net)  # (a bound method's module keeps them: its packed layers trace plain)
        self.net = net if isinstance(net, nn.Module) else None
        self.dynamic = dynamic
        options = {"freezing": freeze, "conv_1x1_as_mm": True} if backend == "inductor" else None
        compiled = torch.compile(net, dynamic=dynamic, backend=backend, options=options)
        object.__setattr__(self, "_target", net)  # not registered: no second set of parameters
        object.__setattr__(self, "_compiled", compiled)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch.fx.experimental._config as fx_config

        if not self.dynamic:
            return self._compiled(*args, **kwargs)
        with fx_config.patch(use_duck_shape=False, backed_size_oblivious=True):
            return self._compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self.__dict__["_target"], name)


def compile_network(
    net: nn.Module | Callable[..., Any],
    *,
    dynamic: bool = True,
    freeze: bool = True,
    backend: str = "inductor",
) -> CompiledNetwork:
    """``net`` (a module, or a bound method such as ``vae.decode``) compiled as described in
    this module's docstring. The first call compiles (minutes on a CPU); with ``dynamic=True``
    later shapes reuse that graph, with ``dynamic=False`` each new shape compiles again.
    ``backend`` is any ``torch.compile`` backend (``freeze`` only applies to inductor)."""
    return CompiledNetwork(net, dynamic=dynamic, freeze=freeze, backend=backend)
