"""Monotone operator equilibrium networks (MonDEQ): parameterizations, splitting solvers, implicit
backward, classifier, checkpoint importers, quantization and bit-error certificates (design.md §5).

``spectral`` is the one home of ``mu(W)``, ``L(W)``, ``||.||_2`` and the per-frequency blocks;
``certificates`` (quantization) and ``bit_certificates`` (bit errors; the only importer of
``qmargin.faults``) build on it.

Imports only ``qmargin.quant`` / ``qmargin.faults`` / ``qmargin.errors`` of qmargin.
"""

from qmargin.deq.bit_certificates import (
    BitErrorCertificate,
    BitFlipCertificate,
    bit_error_pattern,
    bit_flip_perturbation_bounds,
    certify_under_bit_errors,
    code_bit_deltas,
    max_certified_bit_flips,
)
from qmargin.deq.certificates import (
    Certificate,
    DisplacementBound,
    SolverRates,
    certify,
    conv_displacement_bound,
    conv_frequency_blocks,
    conv_residual_error_bound,
    displacement_bound,
    fb_rate,
    lipschitz_constant,
    monotonicity_margin,
    pr_rate,
    residual_error_bound,
    solver_rates,
    spectral_norm,
    sym_max_eigenvalue,
)
from qmargin.deq.classifier import MonDEQClassifier
from qmargin.deq.importers import (
    detect_format,
    load_companion_2026,
    load_mondeq_checkpoint,
    load_reference_2020,
    load_reference_2020_conv,
    read_state_dict,
)
from qmargin.deq.layer import MonDEQLayer, implicit_equilibrium
from qmargin.deq.monotone import (
    MonotoneConv,
    MonotoneLinear,
    MonotoneMultiConv,
    MonotoneParameterization,
    assemble_fc_W,
    check_m,
)
from qmargin.deq.operators import ConvOperator, DenseOperator, Operator
from qmargin.deq.solvers import (
    ConvergenceError,
    SolverStats,
    default_alpha,
    fixed_point_residual,
    solve,
    solve_adjoint,
)
from qmargin.deq.spectral import conv_blocks, margin_and_lipschitz

__all__ = [
    "monotonicity_margin",
    "lipschitz_constant",
    "spectral_norm",
    "sym_max_eigenvalue",
    "conv_frequency_blocks",
    "Certificate",
    "certify",
    "SolverRates",
    "solver_rates",
    "fb_rate",
    "pr_rate",
    "DisplacementBound",
    "displacement_bound",
    "residual_error_bound",
    "conv_displacement_bound",
    "conv_residual_error_bound",
    "code_bit_deltas",
    "bit_flip_perturbation_bounds",
    "BitFlipCertificate",
    "max_certified_bit_flips",
    "BitErrorCertificate",
    "bit_error_pattern",
    "certify_under_bit_errors",
    "MonotoneParameterization",
    "MonotoneLinear",
    "MonotoneConv",
    "MonotoneMultiConv",
    "assemble_fc_W",
    "Operator",
    "DenseOperator",
    "ConvOperator",
    "conv_blocks",
    "margin_and_lipschitz",
    "SolverStats",
    "ConvergenceError",
    "default_alpha",
    "fixed_point_residual",
    "solve",
    "solve_adjoint",
    "MonDEQLayer",
    "implicit_equilibrium",
    "MonDEQClassifier",
    "read_state_dict",
    "check_m",
    "detect_format",
    "load_reference_2020",
    "load_reference_2020_conv",
    "load_companion_2026",
    "load_mondeq_checkpoint",
]
