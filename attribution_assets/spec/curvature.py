"""The EK-FAC / K-FAC curvature passes (:class:`CurvatureSpec`, section ``curvature``)."""

from __future__ import annotations

from dataclasses import dataclass

from attribution_assets.spec.checks import _check_int


@dataclass(frozen=True)
class CurvatureSpec:
    """How the curvature passes of ``scoring.preconditioner: ekfac | kfac`` draw their labels
    (``engine.preconditioning.curvature``; which labels and their seed: ``scoring.kfac_labels``,
    ``scoring.kfac_seed``).

    ``label_samples``: label sequences sampled per document (``kfac_labels: sampled``); the
    pseudo-gradients' outer products (the factor ``S``, EK-FAC's eigenvalues) are averaged over
    them, one backward pass each. 1 (default) is the papers' single draw; more draws bring the
    sampled Fisher closer to its expectation over the labels, the Gauss-Newton matrix.
    """

    label_samples: int = 1

    def __post_init__(self):
        _check_int(self, "label_samples", 1, note=" (label draws per document)")
