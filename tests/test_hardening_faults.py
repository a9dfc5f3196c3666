"""Library contract of qmargin.faults under bad input: seed ranges and nested inject contexts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qmargin.errors import ConfigError, SeedError
from qmargin.faults import (
    BitErrorModel,
    InjectionOrderError,
    check_seed,
    derive_seed,
    flip_random_bits,
    inject,
    make_generator,
    sample_bit_sites,
    sample_flips,
    sample_stuck_bits,
    stuck_at,
)
from qmargin.quant import QuantSpec, freeze_model, quantize_model, quantized_modules

# --------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------
BAD_SEEDS = [-1, -(2**63), 2**63, 2**63 + 5, 2**64, True, False, 1.0, "1", None, torch.tensor(1)]
CODES = torch.zeros(10, dtype=torch.int8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def make_net(bits: int = 4) -> Net:
    net = Net()
    quantize_model(net, QuantSpec(bits))
    return net.eval()


SEED_USERS = {
    "derive_seed": lambda s: derive_seed(s, "fc", "weight"),
    "make_generator": make_generator,
    "sample_bit_sites": lambda s: sample_bit_sites(100, 4, 0.1, seed=s),
    "sample_bit_sites p=0": lambda s: sample_bit_sites(100, 4, 0.0, seed=s),
    "sample_bit_sites p=1": lambda s: sample_bit_sites(100, 4, 1.0, seed=s),
    "sample_flips": lambda s: sample_flips(CODES, 4, p01=0.1, p10=0.2, seed=s),
    "sample_stuck_bits": lambda s: sample_stuck_bits(100, 4, rate_0=0.1, seed=s),
    "flip_random_bits": lambda s: flip_random_bits(CODES, 4, 0.1, seed=s),
    "stuck_at": lambda s: stuck_at(CODES, 4, 0.1, 1, seed=s),
    "inject": lambda s: inject(make_net(), BitErrorModel(ber=0.1), seed=s).__enter__(),
}


@pytest.mark.parametrize("user", list(SEED_USERS), ids=list(SEED_USERS))
@pytest.mark.parametrize("seed", BAD_SEEDS, ids=repr)
def test_seeds_outside_range_are_refused(user, seed):
    with pytest.raises(SeedError, match=r"\[0, 2\*\*63\)"):
        SEED_USERS[user](seed)


def test_seed_error_is_a_config_error_and_value_error():
    assert issubclass(SeedError, ConfigError) and issubclass(SeedError, ValueError)


@pytest.mark.parametrize("seed", [0, 1, 2**31, 2**63 - 1])
def test_seeds_in_range_work_and_patterns_are_unchanged(seed):
    assert check_seed(seed) == seed
    for user in SEED_USERS:
        if user != "inject":
            SEED_USERS[user](seed)
    # make_generator(s) is torch's manual_seed(s), as before, for every valid s
    a = torch.rand(5, generator=make_generator(seed))
    b = torch.rand(5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)


def test_seeds_equal_modulo_2_63_no_longer_alias():
    sites = sample_bit_sites(1000, 4, 0.1, seed=5)
    assert len(sites) > 0
    with pytest.raises(SeedError):
        sample_bit_sites(1000, 4, 0.1, seed=5 + 2**63)
    with pytest.raises(SeedError):
        make_generator(-1)  # was 2**63 - 1


def test_inject_refuses_bad_seed_before_touching_the_model():
    net = make_net()
    with pytest.raises(SeedError), inject(net, BitErrorModel(ber=0.1), seed=-3):
        pass
    assert not any(m.frozen for _, m in quantized_modules(net))


# --------------------------------------------------------------------------------------------
# nested inject contexts
# --------------------------------------------------------------------------------------------
def codes(net: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{t}": m.codes(t).clone() for n, m in quantized_modules(net) for t in m.quant_specs}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


EM = BitErrorModel(ber=0.3)


@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
def test_nested_in_order_restores_each_level_exactly(frozen):
    net = make_net()
    if frozen:
        freeze_model(net)
    clean = codes(net)
    with inject(net, EM, seed=1):
        level1 = codes(net)
        assert not same(level1, clean)
        with inject(net, EM, seed=2):
            assert not same(codes(net), level1)
            with inject(net, BitErrorModel(ber=0.3, layers="fc2"), seed=3):
                pass
        assert same(codes(net), level1)
    assert same(codes(net), clean)
    assert all(m.frozen == frozen for _, m in quantized_modules(net))


@pytest.mark.parametrize("frozen", [False, True], ids=["unfrozen", "frozen"])
def test_out_of_order_exit_raises_and_leaves_codes_clean(frozen):
    net = make_net()
    if frozen:
        freeze_model(net)
    clean = codes(net)
    a = inject(net, EM, seed=1)
    b = inject(net, EM, seed=2)
    a.__enter__()
    b.__enter__()
    with pytest.raises(InjectionOrderError, match="out of order|reverse order"):
        a.__exit__(None, None, None)
    assert same(codes(net), clean)
    with pytest.raises(InjectionOrderError, match="already undone"):
        b.__exit__(None, None, None)
    assert same(codes(net), clean)
    assert all(m.frozen == frozen for _, m in quantized_modules(net))
    with inject(net, EM, seed=1):  # the stacks are empty again: a fresh injection works
        pass
    assert same(codes(net), clean)


def test_out_of_order_exit_of_a_middle_context_restores_the_outer_state():
    net = make_net()
    clean = codes(net)
    a, b, c = (inject(net, EM, seed=s) for s in (1, 2, 3))
    a.__enter__()
    after_a = codes(net)
    b.__enter__()
    c.__enter__()
    with pytest.raises(InjectionOrderError, match=r"seeds \[3\]"):
        b.__exit__(None, None, None)
    assert same(codes(net), after_a)  # b and c undone, a still active
    a.__exit__(None, None, None)
    assert same(codes(net), clean)
    with pytest.raises(InjectionOrderError):
        c.__exit__(None, None, None)
    assert same(codes(net), clean)


def test_contexts_on_disjoint_tensors_may_exit_in_any_order():
    net = make_net()
    clean = codes(net)
    a = inject(net, BitErrorModel(ber=0.3, layers="fc1"), seed=1)
    b = inject(net, BitErrorModel(ber=0.3, layers="fc2"), seed=2)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # no shared codes: not an ordering error
    assert torch.equal(net.fc1.codes("weight"), clean["fc1.weight"]) and net.fc2.frozen
    b.__exit__(None, None, None)
    assert same(codes(net), clean)


@pytest.mark.parametrize("where", ["inner", "outer", "both"])
def test_exceptions_inside_nested_blocks_restore_exactly(where):
    net = make_net()
    clean = codes(net)
    with pytest.raises(RuntimeError, match="boom"), inject(net, EM, seed=1):
        level1 = codes(net)
        try:
            with inject(net, EM, seed=2):
                if where in ("inner", "both"):
                    raise RuntimeError("boom")
        except RuntimeError:
            assert same(codes(net), level1)
            if where == "inner":
                raise
        raise RuntimeError("boom")
    assert same(codes(net), clean)
    assert not any(m.frozen for _, m in quantized_modules(net))


def test_exception_while_entering_leaves_codes_clean():
    net = make_net()
    freeze_model(net)
    clean = codes(net)
    bad = BitErrorModel(ber=0.3, protected_bits=(6,))  # fc1 is fine, 4-bit codes have no bit 6
    with pytest.raises(ConfigError, match="protected bits"), inject(net, bad, seed=0):
        pass
    assert same(codes(net), clean)
    with inject(net, EM, seed=0):  # nothing left on the stacks
        pass
    assert same(codes(net), clean)


def test_out_of_order_with_a_tied_tensor():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a.weight

    net = Tied()
    quantize_model(net, QuantSpec(4))
    freeze_model(net)
    clean = net.a.weight_codes.clone()
    outer = inject(net, BitErrorModel(ber=0.3, layers="a"), seed=1)
    inner = inject(net, BitErrorModel(ber=0.3, layers="b"), seed=2)  # same stored tensor via its alias
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(InjectionOrderError):
        outer.__exit__(None, None, None)
    assert torch.equal(net.a.weight_codes, clean) and net.a.weight_codes is net.b.weight_codes
    with pytest.raises(InjectionOrderError):
        inner.__exit__(None, None, None)
    assert torch.equal(net.b.weight_codes, clean)
