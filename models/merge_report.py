"""What a merge took: the report ``merge_state`` returns and ``IncompatibleCheckpointError`` carries.

Plain data without torch, apart from ``models/merge.py`` that computes it, so that the error
type (``models/errors.py``) can name it without importing the merge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShapeMismatch:
    key: str
    target_shape: list[int]
    source_shape: list[int]


@dataclass(frozen=True)
class MergeReport:
    """What a merge took. Buffers (BatchNorm running stats) count as state like parameters.

    ``target_fraction`` is the share of the target's tensor elements replaced;
    ``source_fraction`` the share of the source's tensors used.
    """

    merged: list[str]
    shape_mismatched: list[ShapeMismatch]
    missing: list[str]
    unexpected: list[str]
    target_fraction: float
    source_fraction: float
    strip_prefixes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["strip_prefixes"]
        return data

    def misfits(self) -> str | None:
        """What keeps the source from filling the target exactly ("1 missing, 0 unexpected, 2 shape
        mismatches"), or None when every key of each is in the other with its shape."""
        if not (self.missing or self.unexpected or self.shape_mismatched):
            return None
        return (f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.shape_mismatched)} shape mismatches")

    def summary(self) -> dict[str, Any]:
        """Counts and fractions only: small enough for logs and checkpoint metadata."""
        return {
            "merged": len(self.merged),
            "shape_mismatched": len(self.shape_mismatched),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "target_fraction": round(self.target_fraction, 6),
            "source_fraction": round(self.source_fraction, 6),
        }


def format_report(report: MergeReport) -> str:
    """A human table of the report, as ``headswap merge`` prints it."""
    lines = [
        f"merged            {len(report.merged):6d} tensors",
        f"shape mismatched  {len(report.shape_mismatched):6d}",
        f"missing in source {len(report.missing):6d}",
        f"unexpected        {len(report.unexpected):6d}",
        f"target replaced   {report.target_fraction:8.2%} of elements",
        f"source used       {report.source_fraction:8.2%} of tensors",
    ]
    for m in report.shape_mismatched:
        lines.append(f"  ~ {m.key}: target {m.target_shape} <- source {m.source_shape}")
    lines += [f"  - missing {k}" for k in report.missing[:20]]
    if len(report.missing) > 20:
        lines.append(f"  - ... {len(report.missing) - 20} more missing")
    lines += [f"  + unexpected {k}" for k in report.unexpected[:20]]
    if len(report.unexpected) > 20:
        lines.append(f"  + ... {len(report.unexpected) - 20} more unexpected")
    return "\n".join(lines)
