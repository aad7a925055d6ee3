"""lipverify.audits: are a model's certificates sound?

* :mod:`~lipverify.audits.lipschitz`: guaranteed upper and attained lower bounds on the
  Lipschitz constant of the claimed map (lipverify's layer routes, and the orchestration);
  :mod:`~lipverify.audits.capture` captures the map as a checked ATen graph,
  :mod:`~lipverify.audits.graph` bounds it op by op and by named patterns,
  :mod:`~lipverify.audits.lemmas` holds the residual lemmas,
  :mod:`~lipverify.audits.operators` the numerical operator norms and
  :mod:`~lipverify.audits.lower` the attained lower bounds.
* :mod:`~lipverify.audits.gnp`: gradient-norm preservation of each GNP layer, within a tolerance.
* :mod:`~lipverify.audits.attack_audit`: attacks at the certified radii (counterexamples only).
* :mod:`~lipverify.audits.runner`: :func:`audit`, which combines them into a verdict.
* :mod:`~lipverify.audits.report`: :class:`AuditReport` (JSON, Markdown, HTML with plots).

Importing this package imports no attack library; attacks load when they run.
"""

from lipverify.audits.capture import snapshot
from lipverify.audits.report import AuditReport
from lipverify.audits.runner import audit

__all__ = ["audit", "AuditReport", "snapshot"]
