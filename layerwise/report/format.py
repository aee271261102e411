"""How the report writes its figures: an estimate with its 95% CI, a p-value, one number of a kind."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MISSING = "Not available in this study."  # what a section without its data says


def fmt_estimate(est: Mapping | None, kind: str = "metric") -> str:
    """"0.0712 [0.0650, 0.0771]", "93.1% [90.2%, 95.8%]" (kind "pct") or "3.41x [3.30x, 3.52x]"
    (kind "speed"); "-" when missing; "disturbed (not a result)" for a timing the bench guard rejected."""
    if est and est.get("status") == "disturbed":
        return "disturbed (not a result)"
    if not est or est.get("mean") is None:
        return "-"
    text = fmt_number(est["mean"], kind)
    ci = est.get("ci95")
    if ci is not None and len(ci) == 2 and all(np.isfinite(float(c)) for c in ci):
        text += f" [{fmt_number(ci[0], kind)}, {fmt_number(ci[1], kind)}]"
    return text


def fmt_p(p: float | None) -> str:
    """"0.032", "0.0041", "<1e-04" or "-"."""
    if p is None or not np.isfinite(float(p)):
        return "-"
    p = float(p)
    return "<1e-04" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def fmt_number(x, kind: str = "metric") -> str:
    """One figure: "0.0712", "93.1%" (pct), "3.41x" (speed), "12.5" (minutes); "n/a" when not finite."""
    x = float(x)
    if not np.isfinite(x):
        return "n/a"
    return {"pct": f"{100 * x:.1f}%", "speed": f"{x:.2f}x", "minutes": f"{x:.1f}"}.get(kind, f"{x:.4f}")
