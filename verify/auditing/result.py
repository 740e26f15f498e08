"""The verdict of an audit (:class:`AuditResult`) and its JSON and JUnit forms."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from verify._verdict import FAIL, PASS, record
from verify.algorithms import ALGORITHMS
from verify.auditing.diagnosis import Diagnosis

__all__ = ["AuditResult", "TensorCheck"]

# ---------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------


@dataclass
class TensorCheck:
    """One differentiated tensor: worst entry of ``|got - reference|`` relative to the gradient's scale."""

    name: str
    shape: tuple[int, ...]
    status: str
    error: float
    where: str
    reference: float
    got: float
    missing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return record(self)


def _g(x: float) -> str:
    return f"{x:.12g}"


@dataclass
class AuditResult:
    """The verdict of an audit.

    Attributes:
        status: ``"pass"`` (verified) or ``"fail"`` (mismatch).
        algorithm, backend: what was audited.
        problem: the generated problem (sizes, tasks, hyper-parameters, seed).
        tolerance: the relative tolerance of the reference comparisons, and
            ``tolerance_reason`` where it comes from.
        loss: the meta-loss comparison (None for Reptile).
        tensors: per-tensor worst relative errors against the reference.
        independent: the claimed gradient against directional derivatives of
            the function's own meta-loss (None where the algorithm's direction
            is not a gradient: FOMAML, Reptile).
        which_side: the sentence saying which side is wrong.
        diagnosis: the named bug (None when verified or unexplained).
    """

    status: str
    algorithm: str
    backend: str
    problem: str
    seed: int
    tolerance: float
    tolerance_reason: str
    condition: float
    loss: dict[str, Any] | None
    tensors: list[TensorCheck]
    independent: dict[str, Any] | None
    which_side: str
    diagnosis: Diagnosis | None
    source: str
    notes: list[str] = field(default_factory=list)
    title: str = ""
    seconds: float = 0.0
    #: the precision of the audit (``"float64"``, or ``"float32"`` with ``dtype="float32"``)
    dtype: str = "float64"
    #: what precision explains (float32 constants in the function, a float32 meta-loss, the float32
    #: floor of ``dtype="float32"``); '' when nothing
    precision: str = ""
    #: the declared approximation the gradient was verified against ("" for the exact meta-gradient)
    approximation: str = ""
    #: the declared approximation's distance from the exact meta-gradient: ``relative``, ``cosine``
    distance_from_exact: dict[str, float] | None = None

    def _distance_text(self) -> str:
        d = self.distance_from_exact or {}
        return (f"distance from exact {d.get('relative', float('nan')):.3g} "
                f"(cosine {d.get('cosine', float('nan')):.4f})")

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def worst(self) -> TensorCheck | None:
        return max(self.tensors, key=lambda t: t.error) if self.tensors else None

    def _row_quantity(self) -> str:
        """What the algorithm's function returns (the row's ``quantity``: meta-gradient, gradient, direction)."""
        row = ALGORITHMS.get(self.algorithm)
        return row.quantity if row is not None else "meta-gradient"

    def headline(self) -> str:
        """The one-line chex-style message."""
        a = self.algorithm
        tol = f"(tol {self.tolerance:.1e}, {self.dtype})"
        if self.passed:
            w = self.worst
            err = w.error if w else 0.0
            if self.approximation:
                return (f"{a} meta-gradient matches the declared approximation {self.approximation}: worst rel "
                        f"{err:.1e} {tol}; {self._distance_text()}")
            extra = " up to float32 constants in the function (see precision)" if \
                self.precision.startswith("float32 constants") else ""
            return f"{a} meta-gradient verified{extra}: worst rel {err:.1e} {tol}"
        if self.loss and self.loss["status"] == FAIL:
            return (f"{a} meta-loss mismatch: reference={_g(self.loss['reference'])} got={_g(self.loss['got'])} "
                    f"rel={self.loss['error']:.1e} {tol}")
        bad = [t for t in self.tensors if t.status == FAIL]
        if bad:
            w = max(bad, key=lambda t: t.error)
            what = self._row_quantity()
            return f"{a} {what} mismatch: {w.where} reference={_g(w.reference)} got={_g(w.got)} rel={w.error:.1e} {tol}"
        ind = self.independent or {}
        return (f"{a} meta-gradient inconsistent with its own meta-loss: {ind.get('reason', '')}")

    def report(self) -> str:
        """The full human-readable verdict (what the CLI prints and the pytest plugin fails with)."""
        lines = [self.headline()]
        head = f"metaverify audit of {self.algorithm} ({self.backend})" + (f": {self.title}" if self.title else "")
        lines.append(f"{head}: {'VERIFIED' if self.passed else 'MISMATCH'}")
        lines.append(f"  problem: {self.problem}")
        lines.append(f"  gradients from: {self.source}")
        lines.append(f"  tolerance: {self.tolerance:.2e} relative ({self.tolerance_reason})")
        if self.approximation:
            lines.append(f"  declared approximation: {self.approximation}: its {self._distance_text()}; "
                         "the checks below are against it")
        if self.loss:
            L = self.loss
            own_tol = (f" (tol {L['tolerance']:.1e}: {L['why']})" if L.get("why") else "")
            lines.append(f"  meta-loss: reference={_g(L['reference'])} got={_g(L['got'])} rel={L['error']:.1e} "
                         f"-> {L['status']}{own_tol}")
        what = "direction" if self._row_quantity() == "direction" else "meta-gradient"
        lines.append(f"  {what} vs reference (per tensor, worst entry, relative to the largest reference entry):")
        width = max((len(t.name) for t in self.tensors), default=4)
        for t in self.tensors:
            flag = " (no gradient: None)" if t.missing else ""
            lines.append(f"    {t.name:<{width}} {str(list(t.shape)):<10} rel={t.error:.1e} at {t.where}: "
                         f"reference={_g(t.reference)} got={_g(t.got)} -> {t.status}{flag}")
        if self.independent:
            ind = self.independent
            lines.append(f"  {what} vs {ind['method']} derivatives of the function's own meta-loss "
                         f"({ind.get('budget', 'thorough')}): {ind['status']} (error {ind['error']:.1e}, "
                         f"tol {ind['tolerance']:.1e}): {ind['reason']}")
        if self.which_side:
            lines.append(f"  verdict: {self.which_side}")
        if self.precision:
            lines.append(f"  precision: {self.precision}")
        if not self.passed:
            if self.diagnosis is not None:
                lines.append(f"  diagnosis: {self.diagnosis}".replace("\n", "\n  "))
            elif self.precision:
                lines.append("  diagnosis: precision (see the precision line)")
            else:
                lines.append("  diagnosis: unexplained mismatch (no variant of the catalogue matches within the "
                             "tolerance)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def to_dict(self) -> dict[str, Any]:
        """The ``result.audit`` object of the versioned JSON schema (``docs/audit.md``).

        With a declared approximation two keys follow ``status``... ``seconds``: ``approximation``
        (its label) and ``distance_from_exact`` (``relative``, ``cosine``); absent otherwise.
        """
        out = record(
            self, ("status", "algorithm", "backend", "title", "problem", "seed", "dtype", "precision", "tolerance",
                   "tolerance_reason", "condition", "gradient_source", "meta_loss", "tensors", "independent",
                   "which_side", "diagnosis", "unexplained", "headline", "notes", "seconds"),
            gradient_source=self.source, meta_loss=self.loss,
            unexplained=(not self.passed) and self.diagnosis is None and not self.precision,
            headline=self.headline(), seconds=round(self.seconds, 3),
        )
        if self.approximation:
            out |= record(self, ("approximation", "distance_from_exact"))
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **({"indent": 2} | kwargs))

    def junit_cases(self) -> list[dict[str, Any]]:
        """One JUnit test case per check (meta-loss, each tensor, the independent check)."""
        cls = f"metaverify.audit.{self.backend}.{self.algorithm}"
        detail = self.report()
        cases = []
        if self.loss:
            cases.append({"classname": cls, "name": "meta-loss", "status": self.loss["status"],
                          "message": f"meta-loss rel={self.loss['error']:.1e} (tol {self.tolerance:.1e})",
                          "detail": detail})
        for t in self.tensors:
            cases.append({"classname": cls, "name": t.name, "status": t.status,
                          "message": f"{t.where} reference={_g(t.reference)} got={_g(t.got)} rel={t.error:.1e} "
                                     f"(tol {self.tolerance:.1e})", "detail": detail})
        if self.independent:
            st = self.independent["status"]
            cases.append({"classname": cls, "name": "finite differences of own meta-loss",
                          "status": st if st in (PASS, FAIL) else "skipped",
                          "message": self.independent["reason"][:300], "detail": detail})
        if self.approximation:
            cases.insert(0, {"classname": cls, "name": f"declared approximation {self.approximation}",
                             "status": self.status, "message": f"verified against the declared approximation "
                             f"{self.approximation}; {self._distance_text()}", "detail": detail})
        if cases:
            cases[0]["seconds"] = self.seconds
        return cases

