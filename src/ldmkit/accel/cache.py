"""Training-free feature caching, as wrappers around an unmodified network.

Both wrappers are ``nn.Module`` s with the wrapped network's call signature
``net(x, timesteps, context=None, y=None, *, context_mask=None)`` and its ``config``, so they
drop into any ldmkit ``Denoiser`` (``denoiser.net``) or the Stable Diffusion pipeline's
``_CastNet`` (``.unet``) in place of the network. They hold the network (no copy; its
parameters stay shared) and only add cached tensors.

- :class:`DeepCacheUNet`: DeepCache (Ma, Fang & Wang 2024, "DeepCache: Accelerating Diffusion
  Models for Free"). Between two "full" evaluations, reuse the UNet's deep
  feature (the output of the upsampling path just before a shallow skip branch) and recompute
  only the shallow branch: a few encoder blocks and the matching decoder blocks.
- :class:`FirstBlockCacheDiT`: First-Block Cache (FBCache of ParaAttention, a simplification of
  TeaCache, Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
  Model"): always run the first transformer block; when its residual barely changed since the
  last full evaluation, reuse that evaluation's residual of all the other blocks.

:func:`deepcache` and :func:`first_block_cache` are context managers that swap the network
inside a denoiser (or pipeline) for the wrapper and restore it on exit.

Both wrappers are for inference: cached tensors are detached, and a cache is only valid
within one sampling trajectory. It is dropped by ``reset()``, and automatically when the
batch layout (shapes of ``x``, ``context``, ``y``; dtype; device) changes or the noise level
rises above the previous call's (a new trajectory started; this assumes the network's
timestep input grows with the noise, as it does for every ldmkit denoiser: VP ``t``, flow
``1000 t``, EDM ``ln(sigma) / 4``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ldmkit.denoisers.dit import DiT
from ldmkit.denoisers.unet import UNet

_WALK = ("denoiser", "model", "net", "unet", "dit")  # attributes followed to find the network


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _mean_timestep(timesteps: torch.Tensor | float) -> float:
    """The batch's mean timestep as a Python float (one decision per call, CFG halves share t)."""
    return float(torch.as_tensor(timesteps).float().mean())


class _CachingWrapper(nn.Module):
    """Shared part: attribute passthrough, counters and the automatic reset."""

    _inner: str  # name of the attribute holding the wrapped network

    def __init__(self) -> None:
        super().__init__()
        self.full_calls = 0
        self.cached_calls = 0
        self._key: tuple | None = None
        self._last_noise: float | None = None

    @property
    def config(self) -> Any:
        """The wrapped network's config."""
        return self._modules[self._inner].config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get(self._inner)
            if inner is None:
                raise
            return getattr(inner, name)

    def reset(self) -> None:
        """Drop the cache (call before sampling a new image with the same wrapper)."""
        self._key, self._last_noise = None, None
        self._clear()

    def _clear(self) -> None:
        raise NotImplementedError

    def _begin(
        self, x: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None, noise: float
    ) -> None:
        """Reset on a new batch layout or when ``noise`` (grows with sigma) rises: new trajectory."""
        key = (tuple(x.shape), x.dtype, x.device, _shape(context), _shape(y))
        last = self._last_noise
        rising = last is not None and noise > last + 1e-6 * (1.0 + abs(last))
        if key != self._key or rising:
            self.reset()
            self._key = key
        self._last_noise = noise


class DeepCacheUNet(_CachingWrapper):
    """DeepCache (Ma et al. 2024) around an ldmkit :class:`~ldmkit.denoisers.unet.UNet`.

    Split. With ``N = len(unet.output_blocks)`` (= ``len(unet.input_blocks)``), output block
    ``j`` consumes the skip of input block ``N - 1 - j``. The shallow branch ``branch = b``
    (0 <= b < N) is input blocks ``0..b`` and output blocks ``N-1-b..N-1`` (the paper's
    skip branch ``m``). The cached deep feature is the ``h`` that enters output block
    ``N - 1 - b`` before its concatenation with the skip of input block ``b``: the output of
    output block ``N - 2 - b`` (of ``middle_block`` when ``b = N - 1``). ``b = 0`` (the
    paper's best-speed choice) keeps only the stem conv and the last output block.

    Calls. A full call runs the plain ``unet.forward`` (so its output is bit-identical) with a
    forward hook that stores the deep feature (the paper's cache step). A cached call runs the
    shallow encoder, takes the stored feature in place of everything deeper, and runs the
    shallow decoder blocks (the paper's retrieve step, partial inference).

    Schedule (the paper's uniform 1:N strategy). Every network evaluation counts as one call: a
    Heun step is two, a CFG batch of cond + uncond is one. The first call of a trajectory and
    every ``interval``-th call after the last full one are full; the others are cached, but
    only for calls inside the window ``start <= progress <= end``; outside it every call is
    full (and refreshes the cache). ``progress`` comes from the noise level, not from a call
    count, so it needs no knowledge of the sampler: ``(t0 - t) / (t0 - t1)`` clamped to [0, 1]
    for the call's mean timestep ``t``, with ``timestep_range = (t0, t1)`` the timesteps of the
    noisiest and the cleanest noise levels. The default ``(1000, 0)`` suits VP models trained
    on 1000 steps (progress = fraction of the uniform timestep range) and flow models with
    ``t_scale = 1000``; :func:`deepcache` takes it from the denoiser (its ``noise_input`` at
    ``sigma_max`` and ``sigma_min``). ``interval = 1`` never caches.

    Args:
        unet: the network (held, not copied).
        interval: one full call every ``interval`` calls (the paper's N).
        branch: index of the shallow skip branch (see Split).
        start, end: window of progress in [0, 1] where caching is allowed.
        timestep_range: ``(t0, t1)`` as above.

    Attributes:
        full_calls, cached_calls: counts since construction.
    """

    _inner = "unet"

    def __init__(
        self,
        unet: UNet,
        *,
        interval: int = 3,
        branch: int = 0,
        start: float = 0.0,
        end: float = 1.0,
        timestep_range: tuple[float, float] = (1000.0, 0.0),
    ) -> None:
        super().__init__()
        if not isinstance(unet, UNet):
            raise TypeError(f"DeepCacheUNet wraps an ldmkit UNet, got {type(unet).__name__}")
        n = len(unet.output_blocks)
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if not 0 <= branch < n:
            raise ValueError(f"branch must be in [0, {n - 1}] for this UNet, got {branch}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
        t0, t1 = (float(v) for v in timestep_range)
        if t0 == t1:
            raise ValueError("timestep_range needs two different timesteps")
        self.unet = unet
        self.interval, self.branch, self.start, self.end = interval, branch, start, end
        self.timestep_range = (t0, t1)
        self._feature: torch.Tensor | None = None
        self._since_full = 0

    def extra_repr(self) -> str:
        return (
            f"interval={self.interval}, branch={self.branch}, start={self.start}, "
            f"end={self.end}, timestep_range={self.timestep_range}"
        )

    def _clear(self) -> None:
        self._feature, self._since_full = None, 0

    @property
    def deep_module(self) -> nn.Module:
        """The block whose output is the cached deep feature."""
        k = len(self.unet.output_blocks) - 2 - self.branch
        return self.unet.output_blocks[k] if k >= 0 else self.unet.middle_block

    def progress(self, timesteps: torch.Tensor | float) -> float:
        """Sampling progress of a call, 0 (noisiest) .. 1 (cleanest), from its timesteps."""
        t0, t1 = self.timestep_range
        return (t0 - _mean_timestep(timesteps)) / (t0 - t1)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same contract as ``UNet.forward``; full or cached according to the schedule."""
        p = self.progress(timesteps)
        self._begin(x, context, y, -p)
        inside = self.start <= min(max(p, 0.0), 1.0) <= self.end
        if inside and self._feature is not None and self._since_full < self.interval - 1:
            self._since_full += 1
            self.cached_calls += 1
            return self._partial(x, timesteps, context, y, context_mask)
        self._since_full = 0
        self.full_calls += 1
        return self._full(x, timesteps, context, y, context_mask)

    def _full(self, x, timesteps, context, y, context_mask) -> torch.Tensor:
        """The plain UNet; a forward hook stores the deep feature (DeepCache: cache)."""
        if self.interval == 1:  # nothing would ever read the cache
            return self.unet(x, timesteps, context, y, context_mask=context_mask)
        store: dict[str, torch.Tensor] = {}

        def grab(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            store["h"] = output

        handle = self.deep_module.register_forward_hook(grab)
        try:
            out = self.unet(x, timesteps, context, y, context_mask=context_mask)
        finally:
            handle.remove()
        self._feature = store["h"].detach()
        return out

    def _partial(self, x, timesteps, context, y, context_mask) -> torch.Tensor:
        """Shallow encoder, cached deep feature, shallow decoder (DeepCache: retrieve)."""
        unet, b = self.unet, self.branch
        unet._check_inputs(x, context, y)
        emb = unet.embed(timesteps, y, x)
        h, skips = x, []
        for block in unet.input_blocks[: b + 1]:  # input blocks 0..b
            h = unet._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._feature  # replaces input blocks b+1.., the middle and output blocks ..N-2-b
        for block in unet.output_blocks[len(unet.output_blocks) - 1 - b :]:
            h = torch.cat([h, skips.pop()], dim=1)
            # as in UNet.forward: an Upsample goes to the next skip's size (odd sizes)
            size = tuple(skips[-1].shape[2:]) if skips else None
            h = unet._run(block, h, emb, context, context_mask, size)
        return unet.out(h)


class FirstBlockCacheDiT(_CachingWrapper):
    """First-Block Cache (ParaAttention's FBCache, after TeaCache, Liu et al. 2024) for a DiT.

    Every call embeds the input and runs ``dit.blocks[0]``; its residual
    ``r1 = block0(tokens) - tokens`` is compared with ``r1`` of the last *full* call by the
    relative L1 change ``mean|r1 - r1_ref| / mean|r1_ref|`` (one number for the whole batch,
    so CFG's cond and uncond halves decide together). Below ``threshold`` the call reuses the
    stored residual of the remaining blocks, ``tokens = block0(tokens) + R``; otherwise it runs
    all blocks and stores ``R = out(blocks[1:]) - block0(tokens)`` and ``r1_ref = r1``.
    Comparing with the last full call rather than the previous call (as ParaAttention does)
    bounds the accumulated drift: many small steps cannot reuse one ``R`` indefinitely.
    ``threshold = 0`` never reuses and equals ``DiT.forward`` bit for bit. Gradient
    checkpointing is not applied (inference only).

    Attributes:
        full_calls, cached_calls: counts since construction.
        last_change: the relative L1 change measured on the last call (nan if none).
    """

    _inner = "dit"

    def __init__(self, dit: DiT, *, threshold: float = 0.05) -> None:
        super().__init__()
        if not isinstance(dit, DiT):
            raise TypeError(f"FirstBlockCacheDiT wraps an ldmkit DiT, got {type(dit).__name__}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.dit, self.threshold = dit, float(threshold)
        self.last_change = float("nan")
        self._first: torch.Tensor | None = None
        self._rest: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"

    def _clear(self) -> None:
        self._first, self._rest = None, None

    def _relative_change(self, r1: torch.Tensor) -> float:
        if self._first is None:
            return float("inf")
        num = float((r1 - self._first).abs().mean())
        den = float(self._first.abs().mean())
        return num / den if den > 0 else (0.0 if num == 0 else float("inf"))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same contract as ``DiT.forward``; the blocks after the first may be skipped."""
        dit, c = self.dit, self.dit.config
        p = c.patch_size
        if x.ndim != 4 or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"DiT expects [B, C, H, W] with H, W multiples of {p}, got {x.shape}")
        if (context is None) != (c.context_dim is None):
            raise ValueError(
                f"context is required iff the DiT has cross-attention ({c.context_dim})"
            )
        self._begin(x, context, y, _mean_timestep(timesteps))
        # the embedding steps of DiT.forward (Peebles & Xie 2023, Sec. 3.2)
        b, _, h, w = x.shape
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(b)
        cond = dit._condition(timesteps, y, b)
        tokens = dit.x_embedder(x).flatten(2).transpose(1, 2)
        tokens = tokens + dit.position_embedding(h // p, w // p, tokens)
        # FBCache: the first block always runs; its residual decides
        first = dit.blocks[0](tokens, cond, context, context_mask)
        r1 = first - tokens
        self.last_change = self._relative_change(r1) if self.threshold > 0 else float("nan")
        if self.threshold > 0 and self.last_change < self.threshold:
            tokens = first + self._rest  # reuse the remaining blocks' residual
            self.cached_calls += 1
        else:
            tokens = first
            for block in dit.blocks[1:]:
                tokens = block(tokens, cond, context, context_mask)
            self._first, self._rest = r1.detach(), (tokens - first).detach()
            self.full_calls += 1
        out = dit.final_layer(tokens, cond)  # [B, gh * gw, p * p * C], then unpatchify
        out = out.reshape(b, h // p, w // p, p, p, dit.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, dit.out_channels, h, w)


def _find_slot(root: Any, kind: type) -> tuple[Any, str, list[Any]]:
    """(parent, attribute name, objects walked) of the first ``kind`` module reached from
    ``root`` through the attributes in ``_WALK`` (depth first, in that order)."""
    if isinstance(root, kind | _CachingWrapper):
        raise TypeError(
            f"pass the object holding the {kind.__name__} (a Denoiser, CFGDenoiser, _CastNet "
            "or pipeline), so its attribute can be swapped; or wrap the network directly"
        )

    def walk(obj: Any, chain: list[Any], depth: int) -> tuple[Any, str, list[Any]] | None:
        for name in _WALK:
            child = getattr(obj, name, None)
            if child is None or child is obj:
                continue
            if isinstance(child, _CachingWrapper):
                raise RuntimeError(f"{type(obj).__name__}.{name} is already a caching wrapper")
            if isinstance(child, kind):
                return obj, name, chain
            if depth < 4 and (found := walk(child, [*chain, child], depth + 1)):
                return found
        return None

    found = walk(root, [root], 0)
    if found is None:
        raise ValueError(f"no {kind.__name__} found under .{'/.'.join(_WALK)} of {type(root)}")
    return found


def _timestep_range(chain: Sequence[Any]) -> tuple[float, float] | None:
    """``(noise_input(sigma_max), noise_input(sigma_min))`` of the first Denoiser on the path."""
    for obj in chain:
        if all(hasattr(obj, a) for a in ("noise_input", "sigma_min", "sigma_max")):
            tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, nn.Module) else []
            device = tensors[0].device if tensors else None
            sigmas = torch.tensor([obj.sigma_max, obj.sigma_min], device=device)
            t0, t1 = obj.noise_input(sigmas).tolist()
            return float(t0), float(t1)
    return None


@contextmanager
def _swapped(root: Any, kind: type, make: Any, options: dict[str, Any]) -> Iterator[Any]:
    parent, name, _ = _find_slot(root, kind)
    original = getattr(parent, name)
    wrapper = make(original, **options)
    setattr(parent, name, wrapper)
    try:
        yield wrapper
    finally:
        setattr(parent, name, original)


@contextmanager
def deepcache(obj: Any, **options: Any) -> Iterator[DeepCacheUNet]:
    """Swap the ldmkit ``UNet`` inside ``obj`` for a :class:`DeepCacheUNet` while in the block.

    ``obj`` is a ``Denoiser`` (swaps ``.net``), the SD pipeline's ``pipe.denoiser`` (swaps
    ``.net.unet`` of its ``_CastNet``), a ``CFGDenoiser`` or a pipeline (followed through
    ``.denoiser``/``.model``/``.net``/``.unet``). ``options`` go to ``DeepCacheUNet``; unless
    given, ``timestep_range`` is that of the first denoiser found on the way. Yields the
    wrapper (counters, ``reset()``); the original network is put back on exit.

    Example::

        with deepcache(denoiser, interval=3, end=0.9) as cached:
            x = SAMPLERS["dpmpp_2m"](CFGDenoiser(denoiser, cond, uncond, 5.0), x, sigmas)
    """
    if "timestep_range" not in options:
        _, _, chain = _find_slot(obj, UNet)
        found = _timestep_range(chain)
        if found is not None:
            options = {**options, "timestep_range": found}
    with _swapped(obj, UNet, DeepCacheUNet, options) as wrapper:
        yield wrapper


@contextmanager
def first_block_cache(obj: Any, **options: Any) -> Iterator[FirstBlockCacheDiT]:
    """Swap the ldmkit ``DiT`` inside ``obj`` (found as in :func:`deepcache`) for a
    :class:`FirstBlockCacheDiT` with ``options`` while in the block; yields the wrapper."""
    with _swapped(obj, DiT, FirstBlockCacheDiT, options) as wrapper:
        yield wrapper


__all__ = ["DeepCacheUNet", "FirstBlockCacheDiT", "deepcache", "first_block_cache"]
