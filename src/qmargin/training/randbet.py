"""RandBET (random bit error training, Stutz et al., MLSys 2021) and weight clipping (design.md §3).

One RandBET step on a mini-batch ``(x, y)`` with objective ``L`` (loss plus any auxiliary loss):

    g = 0.5 * ( dL(Q(w)) / dw  +  dL(Q~(w)) / dw )

where ``Q(w) = w_hat`` is the fake-quantized weight (design.md §1) and ``Q~(w)`` is the same weight
after random bit errors at rate ``p_train`` hit its stored codes: ``w_tilde = dequant(flip(codes))``.
The error pattern is fresh at every step, a pure function of ``(run seed, step)``. The perturbed
forward pass computes with exactly ``w_tilde``; its gradient reaches the float weights through the
straight-through estimator, as if

    w_used = w_hat + (w_tilde - w_hat).detach()

(:class:`_StraightThrough` gives ``w_tilde`` bit-exactly in the forward pass and the identity in the
backward pass, so the STE of ``fake_quantize`` — including its zero gradient outside ``[-w_max,
w_max]`` — applies unchanged).

How the perturbed forward is wired (no change to :mod:`qmargin.quant`): the codes are corrupted by
:func:`qmargin.faults.inject` on a frozen copy of the stored form, read back as ``w_tilde`` and
restored; then, for the perturbed pass only, each quantized module's ``quantized_tensor`` method is
shadowed by an instance attribute that returns ``_StraightThrough(w_hat, w_tilde)``. Every module
that follows the quantized-module protocol computes its forward pass through ``quantized_tensor``;
a module that does not (and so would silently train on clean weights) is detected and reported.

BatchNorm running statistics (all module buffers) are restored after the perturbed pass, so they
track the clean network; the float weights are never modified by the perturbation.

Weight clipping is the projection ``w <- clamp(w, -w_max, w_max)`` after every optimizer step,
together with ``QuantSpec.w_max = w_max`` (quantizer scale ``w_max / qmax``).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.quant import QuantizedTensors, quantized_modules

__all__ = [
    "Injector",
    "Objective",
    "RandBET",
    "RandBETOutput",
    "corrupted_weights",
    "substituted_weights",
    "straight_through",
    "clip_weights_",
    "fault_injector",
]

Injector = Callable[[nn.Module, int], AbstractContextManager[Any]]
"""``injector(model, seed)``: a context manager that corrupts the stored codes of ``model``'s quantized
tensors with the error pattern of ``seed`` on entry and restores them on exit."""

Objective = Callable[[nn.Module], tuple[Tensor, Tensor]]
"""``objective(model) -> (loss, logits)`` on the current mini-batch (auxiliary losses included)."""


class _StraightThrough(torch.autograd.Function):
    """Forward: ``target`` (bit-exact). Backward: the incoming gradient goes to ``w_hat`` unchanged."""

    @staticmethod
    def forward(ctx: Any, w_hat: Tensor, target: Tensor) -> Tensor:
        return target.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def straight_through(w_hat: Tensor, target: Tensor) -> Tensor:
    """``w_hat + (target - w_hat).detach()`` without rounding: value ``target``, gradient to ``w_hat``."""
    if w_hat.shape != target.shape:
        raise ValueError(f"straight_through: shapes differ, {tuple(w_hat.shape)} vs {tuple(target.shape)}")
    return _StraightThrough.apply(w_hat, target.detach().to(w_hat.dtype))


def fault_injector(ber: float, **error_model_kwargs: Any) -> Injector:
    """The default :data:`Injector`: :func:`qmargin.faults.inject` with ``BitErrorModel(ber=ber, ...)``."""
    from qmargin.faults import BitErrorModel, inject

    error_model = BitErrorModel(ber=ber, **error_model_kwargs)

    def injector(model: nn.Module, seed: int) -> AbstractContextManager[Any]:
        return inject(model, error_model, seed)

    return injector


def _modules_and_tensors(model: nn.Module) -> list[tuple[str, QuantizedTensors, str]]:
    return [(name, m, t) for name, m in quantized_modules(model) for t in m.quant_specs]


def _key(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


@torch.no_grad()
def corrupted_weights(model: nn.Module, injector: Injector, seed: int) -> dict[str, Tensor]:
    """``w_tilde = dequant(corrupted codes)`` of every quantized tensor, keyed ``"layer.tensor"``.

    The stored form is computed from the current float weights (``freeze``), corrupted by
    ``injector(model, seed)``, read and restored; the model is left unfrozen and its codes untouched.
    Tensors the injector does not hit come back equal to their clean ``w_hat``.
    """
    entries = _modules_and_tensors(model)
    was_frozen = {name: m.frozen for name, m, _ in entries}
    out: dict[str, Tensor] = {}
    try:
        for _, m, _t in entries:
            if not m.frozen:
                m.freeze()
        with injector(model, seed):
            for name, m, t in entries:
                out[_key(name, t)] = m.stored(t).dequantize().clone()
    finally:
        for name, m, _ in entries:
            if not was_frozen[name] and m.frozen:
                m.unfreeze()
    return out


@contextmanager
def substituted_weights(model: nn.Module, values: Mapping[str, Tensor]) -> Iterator[dict[str, int]]:
    """Within the block, the quantized tensor ``"layer.tensor"`` of ``model`` computes with ``values[...]``.

    The forward value is exactly ``values[key]``; the gradient passes straight through to the
    fake-quantized tensor ``w_hat`` (hence, by the STE, to the float weight). Yields a dict counting how
    often each substituted tensor was read, so a caller can check that the forward pass really used
    it. Implemented by shadowing ``quantized_tensor`` with an instance attribute, removed on exit.
    """
    entries = {_key(name, t): (m, t) for name, m, t in _modules_and_tensors(model)}
    unknown = sorted(set(values) - set(entries))
    if unknown:
        raise KeyError(f"no quantized tensor {unknown[0]!r} in the model")
    by_module: dict[int, tuple[QuantizedTensors, dict[str, str]]] = {}
    for key in values:
        m, t = entries[key]
        by_module.setdefault(id(m), (m, {}))[1][t] = key
    reads = dict.fromkeys(values, 0)
    patched: list[QuantizedTensors] = []
    try:
        for m, names in by_module.values():
            if m.frozen:
                raise RuntimeError("substituted_weights needs unfrozen (training) modules")
            if "quantized_tensor" in m.__dict__:
                raise RuntimeError(f"{type(m).__name__}.quantized_tensor is already substituted")
            original = type(m).quantized_tensor

            def shadow(self: QuantizedTensors, name: str, _orig=original, _names=names) -> Tensor:
                w_hat = _orig(self, name)
                key = _names.get(name)
                if key is None:
                    return w_hat
                reads[key] += 1
                return straight_through(w_hat, values[key])

            object.__setattr__(m, "quantized_tensor", types.MethodType(shadow, m))
            patched.append(m)
        yield reads
    finally:
        for m in patched:
            m.__dict__.pop("quantized_tensor", None)


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


@dataclass(frozen=True)
class RandBETOutput:
    """What one RandBET step computed (losses are detached)."""

    loss: Tensor
    """Objective on the clean quantized weights."""
    loss_err: Tensor
    """Objective on the bit-flipped weights."""
    logits: Tensor
    """Logits of the clean pass (detached), for accuracy bookkeeping."""


class RandBET:
    """Error-injection training step: clean and bit-flipped forward, gradients averaged.

    Args:
        ber: training bit error rate ``p_train`` (every stored bit flips with this probability).
        seed: run seed; the pattern of global step ``k`` (0-based) is a pure function of ``(seed, k)``.
        injector: how codes are corrupted (default: :func:`fault_injector` at ``ber``).
        seed_fn: ``seed_fn(seed, step) -> int`` (default:
            ``qmargin.faults.functional.derive_seed(seed, "randbet", str(step))``).
    """

    def __init__(
        self,
        ber: float,
        seed: int,
        *,
        injector: Injector | None = None,
        seed_fn: Callable[[int, int], int] | None = None,
    ) -> None:
        if not 0.0 < ber <= 0.5:
            raise ValueError(f"RandBET needs 0 < ber <= 0.5, got {ber}")
        self.ber = float(ber)
        self.seed = int(seed)
        self.injector = injector if injector is not None else fault_injector(self.ber)
        if seed_fn is None:
            from qmargin.faults.functional import derive_seed

            def seed_fn(s: int, step: int) -> int:
                return derive_seed(s, "randbet", str(step))

        self.seed_fn = seed_fn

    def pattern_seed(self, step: int) -> int:
        """Seed of the error pattern used at global step ``step``."""
        return int(self.seed_fn(self.seed, int(step)))

    def backward(self, model: nn.Module, objective: Objective, step: int) -> RandBETOutput:
        """Accumulate ``0.5 * (grad L(w_hat) + grad L(w_tilde))`` into the ``.grad`` of the parameters.

        The caller zeroes gradients before and steps the optimizer after. Float weights and module
        buffers are the same after the call as after a clean forward/backward.
        """
        if not any(True for _ in quantized_modules(model)):
            raise ValueError("RandBET needs a model with quantized layers (bits 1..8)")
        loss, logits = objective(model)
        (0.5 * loss).backward()
        w_tilde = corrupted_weights(model, self.injector, self.pattern_seed(step))
        with _buffers_restored(model), substituted_weights(model, w_tilde) as reads:
            loss_err, _ = objective(model)
            unused = sorted(k for k, n in reads.items() if n == 0)
            if unused:
                raise RuntimeError(
                    f"RandBET: the forward pass never read quantized tensor {unused[0]!r} through "
                    "quantized_tensor(); its bit errors would be ignored"
                )
            (0.5 * loss_err).backward()
        return RandBETOutput(loss.detach(), loss_err.detach(), logits.detach())


@torch.no_grad()
def clip_weights_(model: nn.Module, w_max: float) -> int:
    """Project weights onto ``[-w_max, w_max]`` in place: ``w <- clamp(w, -w_max, w_max)``.

    Hits every float tensor behind a quantized tensor (``float_tensor(name)`` for ``name`` in
    ``quant_specs``, when it is a leaf parameter; derived tensors such as an assembled MonDEQ ``W``
    cannot be projected and are clipped by the quantizer's range instead) and the weight of every
    float ``nn.Linear`` / ``nn.Conv2d``. Returns the number of tensors projected.
    """
    if not w_max > 0:
        raise ValueError(f"w_max must be positive, got {w_max}")
    seen: set[int] = set()
    for _, m, t in _modules_and_tensors(model):
        p = m.float_tensor(t)
        if isinstance(p, nn.Parameter) and id(p) not in seen:
            p.clamp_(-w_max, w_max)
            seen.add(id(p))
    for mod in model.modules():
        if isinstance(mod, nn.Linear | nn.Conv2d) and not isinstance(mod, QuantizedTensors):
            p = mod.weight
            if id(p) not in seen:
                p.clamp_(-w_max, w_max)
                seen.add(id(p))
    return len(seen)
