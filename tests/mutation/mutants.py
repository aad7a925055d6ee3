"""Planted soundness bugs and the tests that must catch each (``nox -s mutation``).

A mutant is one or more exact text replacements in files of the repository. Each ``old``
snippet must occur exactly once in its file (checked before every run: a snippet that moved
or changed is an error, so this list is maintained along with the code). ``tests`` are pytest
node ids (``file::test_function``); the mutant is *killed* only when every one of them has at
least one failing case with the mutant applied, and all of them pass on the unmutated copy.

To add a mutant for new soundness code: append a ``Mutant`` with a short, stable ``old``
snippet (a line or less that the edit needs), the ``new`` text, why it is a plausible bug, and
the fast tests that catch it; then run ``python tests/mutation/run.py NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Edit", "Mutant", "MUTANTS"]


@dataclass(frozen=True)
class Edit:
    """Replace the only occurrence of ``old`` in ``path`` (relative to the repository root)."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


G = "tests/test_soundness_guards.py::"

MUTANTS: tuple[Mutant, ...] = (
    # -- the three survivors of issue 19 ------------------------------------------------------
    Mutant(
        "lln-top9",
        "LLN radius over the 9 highest-logit other classes only (all of them with 10 classes)",
        (Edit("lipverify/certificates.py",
              'return ratio.masked_fill(~other, float("inf")).min(1).values',
              'top = logits.topk(min(10, logits.shape[1]), 1).indices\n'
              '    return ratio.masked_fill(~other, float("inf")).gather(1, top).min(1).values'),),
        (G + "test_lln_radius_is_the_min_over_all_other_classes",
         G + "test_lln_model_certificates_use_all_classes"),
    ),
    Mutant(
        "verdict-ignores-upper-bound",
        "'sound' no longer needs a guaranteed upper bound at or below claim (1 + tau)",
        (Edit("audits/verdict.py", "elif upper is None:", "elif False:"),
         Edit("audits/verdict.py", "elif not upper <= limit:", "elif False:")),
        (G + "test_model_without_a_guaranteed_bound_is_inconclusive",
         G + "test_bound_above_the_claim_without_a_counterexample_is_inconclusive"),
    ),
    Mutant(
        "conv-circular-grid",
        "zero-padded nn.Conv2d bounded on the circular n grid instead of n + k - 1",
        (Edit("audits/lipschitz.py", "grid = (h + dh * (kh - 1), w + dw * (kw - 1))",
              "grid = (h, w)"),),
        (G + "test_conv_fft_bound_covers_the_zero_padded_norm_on_odd_grids",),
    ),
    Mutant(
        "soc-a-circular-grid",
        "SOC's a >= ||A|| computed on the circular n grid instead of n + k - 1",
        (Edit("audits/lipschitz.py", "grid = (n + k - 1, m + k - 1)", "grid = (n, m)"),),
        (G + "test_soc_bound_on_a_covers_the_zero_padded_norm_on_odd_grids",),
    ),
    # -- the graph auditor (issues 13 and 14) ------------------------------------------------
    Mutant(
        "graph-conv-circular-grid",
        "a zero-padded conv in the graph bounded on the circular n grid, not n + k - 1",
        (Edit("audits/operators.py",
              "n = tuple(-(-(int(grid[i]) + k_eff[i] - 1) // s[i]) * s[i] for i in range(2))",
              "n = tuple(-(-int(grid[i]) // s[i]) * s[i] for i in range(2))"),),
        ("tests/test_graph_bounds.py::test_zero_padded_conv_is_not_bounded_on_the_circular_grid",),
    ),
    Mutant(
        "sdp-no-adjoint-check",
        "the SDP lemma applied when the transposed conv's filter differs from the first",
        (Edit("audits/graph.py",
              "if lin.weight.shape != weight.shape or not torch.equal(lin.weight, weight):",
              "if lin.weight.shape != weight.shape:"),),
        ("tests/test_families.py::test_a_block_that_only_looks_like_sll_is_not_given_the_lemma",),
    ),
    Mutant(
        "sdp-factor-one",
        "the SDP lemma's factor max(1, c n^2 - 1) replaced by 1",
        (Edit("audits/lemmas.py", "return max(1.0, v - 1.0) if c >= 0 else 1.0 - v",
              "return 1.0"),),
        ("tests/test_families.py::test_sdp_lemma_matches_the_exact_jacobian_of_a_cpl_block",),
    ),
    # -- the two narrow catches, and the dropped term in both paths ---------------------------
    Mutant(
        "soc-tail-0.9a",
        "SOC's tail bound 1 + sum_{i>T} a^i/i! evaluated at 0.9 a",
        (Edit("audits/operators.py", "1.0 + _exp_tail(a, terms)",
              "1.0 + _exp_tail(0.9 * a, terms)"),),
        (G + "test_soc_series_bound_covers_dense_skew_series",
         G + "test_soc_layer_bound_with_few_terms_covers_the_exact_norm"),
    ),
    Mutant(
        "taylor-term-dropped-fast",
        "the fast SOC series (eval, train, dense operators) stops at power T - 1",
        (Edit("lipverify/layers/soc_fast.py", "for i in range(1, terms + 1):",
              "for i in range(1, terms):"),),
        (G + "test_soc_eval_output_is_the_truncated_taylor_series",
         G + "test_soc_train_output_is_the_truncated_taylor_series"),
    ),
    Mutant(
        "taylor-term-dropped-both",
        "the fast and the plain (reference) SOC series both stop at power T - 1: they agree",
        (Edit("lipverify/layers/soc_fast.py", "for i in range(1, terms + 1):",
              "for i in range(1, terms):"),
         Edit("lipverify/layers/soc.py", "for i in range(1, terms + 1):",
              "for i in range(1, terms):")),
        (G + "test_soc_eval_output_is_the_truncated_taylor_series",
         G + "test_soc_train_output_is_the_truncated_taylor_series"),
    ),
    # -- five more plausible soundness bugs ---------------------------------------------------
    Mutant(
        "ortho-radius-without-sqrt2",
        "orthogonal-last-layer radius (f_y - f_j) / L instead of / (sqrt(2) L)",
        (Edit("lipverify/certificates.py", "(math.sqrt(2.0) * lipschitz)", "lipschitz"),),
        (G + "test_ortho_radius_is_the_exact_distance_for_an_orthogonal_linear_model",),
    ),
    Mutant(
        "certified-at-r-inclusive",
        "certified accuracy counts radius >= r instead of radius > r",
        (Edit("lipverify/certificates.py", "(rad > r)", "(rad >= r)"),),
        (G + "test_certified_means_radius_strictly_greater_than_r",),
    ),
    Mutant(
        "upper-safety-deflates",
        "the float-safety margin of upper bounds applied with the wrong sign",
        (Edit("audits/operators.py", "return value * (1.0 + SAFETY)",
              "return value * (1.0 - SAFETY)"),),
        (G + "test_upper_bounds_carry_the_safety_margin",
         G + "test_normalization_bound_and_claim_use_the_smallest_std"),
    ),
    Mutant(
        "normalize-bound-max-std",
        "the audit bounds per-channel normalization by 1/max(std) (the reference code's factor)",
        (Edit("audits/lipschitz.py", "1.0 / std.abs().min()", "1.0 / std.abs().max()"),),
        (G + "test_normalization_bound_and_claim_use_the_smallest_std",),
    ),
    Mutant(
        "lower-safety-inflates",
        "the float-safety factor of attained lower bounds inflates instead of deflating",
        (Edit("audits/lipschitz.py", "v * (1 - LOWER_SAFETY) for k, v in lower_by.items()",
              "v * (1 + LOWER_SAFETY) for k, v in lower_by.items()"),),
        (G + "test_lower_bound_is_deflated_below_an_exactly_known_constant",),
    ),
    # -- extra --------------------------------------------------------------------------------
    Mutant(
        "normalize-claim-max-std",
        "a LipConvNet claims 1/max(std) for per-channel std",
        (Edit("lipverify/models.py", "return 1.0 / float(self.std.min())",
              "return 1.0 / float(self.std.max())"),),
        (G + "test_normalization_bound_and_claim_use_the_smallest_std",),
    ),
    Mutant(
        "eval-terms-default-11",
        "SOC evaluates one Taylor power fewer by default than the paper's T = 12",
        (Edit("lipverify/layers/soc.py", "eval_terms: int = 12,", "eval_terms: int = 11,"),),
        (G + "test_soc_default_terms_are_the_papers",),
    ),
    # -- float32 execution certificates (issue 15) ---------------------------------------------
    Mutant(
        "exec-winograd-allowed",
        "a convolution dispatched to NNPACK (Winograd/FFT) is bounded as a direct one",
        (Edit("lipverify/execution.py", "            if backend not in _DIRECT_CONV:",
              "            if False:"),),
        ("tests/test_execution.py::test_refuses_reduced_precision_settings_and_winograd_kernels",),
    ),
    Mutant(
        "exec-radius-one-delta",
        "the executed radius subtracts the margin error bound once, not twice",
        (Edit("lipverify/execution.py",
              "        r = (margins - 2 * bound.delta) / (math.sqrt(2.0) * lip)",
              "        r = (margins - bound.delta) / (math.sqrt(2.0) * lip)"),),
        ("tests/test_execution.py::test_certify_float32_radii_are_smaller_and_the_default_stays_real",),
    ),
    Mutant(
        "exec-flip-inside-rhat-not-an-error",
        "a float32 flip inside the executed radius is not reported as an auditor error",
        (Edit("audits/verdict.py", "            if v[\"distance\"] < r_hat:",
              "            if False:"),),
        ("tests/test_execution.py::test_an_executed_flip_inside_the_executed_radius_is_an_auditor_error",),
    ),
)
