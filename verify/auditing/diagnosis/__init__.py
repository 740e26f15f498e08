"""The diagnosis catalogue: known-wrong meta-gradients, computed analytically from the reference.

* :mod:`.catalogue`: the entries (:data:`CATALOGUE`), candidates, the :class:`Diagnosis`, comparisons;
* :mod:`.core`: the candidates of a problem, the layers, :func:`diagnose`;
* one module per family, named by the rows (``Algorithm.diagnosis``): :mod:`.gradient`
  (the inner-loop family), :mod:`.implicit` (iMAML), :mod:`.backbone` (R2-D2, LR-D2,
  ProtoNet, MatchingNet).
"""

from verify.auditing.diagnosis.catalogue import CATALOGUE, Candidate, Diagnosis, Entry, match_error
from verify.auditing.diagnosis.core import candidates, diagnose

__all__ = ["CATALOGUE", "Candidate", "Diagnosis", "Entry", "candidates", "diagnose", "match_error"]
