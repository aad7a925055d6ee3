"""The audit report: one object for people (Markdown, HTML with plots) and machines (JSON).

Guarantee: ``save(dir)`` writes every file atomically (temporary file, then rename), so a
crash never leaves a partial ``report.json``, ``report.md``, ``report.html`` or violation file
under its final name. The report states the tolerance that its verdict used.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipverify.atomic import atomic_write, atomic_write_text

__all__ = ["AuditReport", "VERDICT_EXIT_CODES"]

VERDICT_EXIT_CODES = {"sound": 0, "unsound": 1, "inconclusive": 3}


def _num(v: Any) -> Any:
    """JSON-safe number: inf/nan become strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


@dataclass
class AuditReport:
    """Result of :func:`lipverify.audits.audit`.

    ``verdict`` is "sound", "unsound" or "inconclusive"; ``reasons`` names the check behind it.
    ``lipschitz_lower`` is a genuine lower bound (attained ratios); ``lipschitz_upper`` a
    guaranteed upper bound, or None when no layer-wise bound exists.
    """

    verdict: str
    reasons: list[str]
    violations: list[dict]
    lipschitz_claim: float | None
    lipschitz_lower: float | None
    lipschitz_upper: float | None
    layers: list[dict]
    certified_accuracy: dict
    provenance: dict
    tolerance: float
    gnp: dict | None = None
    attacks: dict | None = None
    samples: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    violation_tensors: list[dict] = field(default_factory=list, repr=False)
    certificate_violations: list[dict] = field(default_factory=list)
    #: ``--execution float32``: the executed verdict and what it rests on (else None)
    execution: dict | None = None

    @property
    def exit_code(self) -> int:
        return VERDICT_EXIT_CODES[self.verdict]

    # -- machine ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "tolerance": self.tolerance,
            "lipschitz_claim": self.lipschitz_claim,
            "lipschitz_lower": self.lipschitz_lower,
            "lipschitz_upper": self.lipschitz_upper,
            "layers": self.layers,
            "certified_accuracy": self.certified_accuracy,
            "violations": self.violations,
            "certificate_violations": self.certificate_violations,
            "executed_verdict": (self.execution or {}).get("executed_verdict"),
            "execution": self.execution,
            "gnp": self.gnp,
            "attacks": self.attacks,
            "warnings": self.warnings,
            "samples": self.samples,
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        def clean(o: Any) -> Any:
            if isinstance(o, dict):
                return {str(k): clean(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return [clean(v) for v in o]
            return _num(o)

        return json.dumps(clean(self.to_dict()), indent=2, sort_keys=False)

    # -- people ----------------------------------------------------------------------------
    def summary(self) -> str:
        """A one-screen text summary."""
        ca = self.certified_accuracy
        lines = [
            f"verdict: {self.verdict.upper()}  (tolerance {self.tolerance:g})",
            *[f"  - {r}" for r in self.reasons],
            f"claimed Lipschitz bound: {_fmt(self.lipschitz_claim)}",
            f"lower bound (attained):  {_fmt(self.lipschitz_lower)}",
            f"upper bound (guaranteed): {_fmt(self.lipschitz_upper)}",
            f"clean accuracy: {_pct(ca.get('clean_accuracy'))}",
        ]
        claimed = ca.get("claimed_certified_accuracy", {})
        for r, v in ca.get("certified_accuracy", {}).items():
            extra = f" (claimed radii: {_pct(claimed[r])})" if r in claimed else ""
            lines.append(f"certified accuracy at r={r}: {_pct(v)}{extra}")
        if ca.get("promise"):
            lines.append(f"  ({ca['promise']})")
        lines.append(f"violations: {len(self.violations)}")
        if self.execution:
            ex = self.execution
            lines.append(f"executed ({ex['execution']}) verdict: "
                         f"{ex['executed_verdict'].upper()}")
            lines += [f"  - {r}" for r in ex["reasons"]]
            if ex.get("price_median") is not None:
                lines.append(f"  price of rounding (r - r_exec)/r: median "
                             f"{ex['price_median']:.3g}, max {ex['price_max']:.3g}; delta "
                             f"median {ex['delta_median']:.3g}")
                lines += [f"  certified accuracy of the float32 model at r={r}: {_pct(v)}"
                          for r, v in (ex.get("certified_accuracy") or {}).items()]
        if self.certificate_violations:
            lines.append(f"certifier radii beyond the guaranteed bound: "
                         f"{len(self.certificate_violations)}")
        if self.attacks:
            q = self.attacks.get("tightness_quantiles") or {}
            if q:
                lines.append("tightness radius/adv-distance quantiles: "
                             + ", ".join(f"{k}={_fmt(v)}" for k, v in q.items()))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_markdown(self, plots: dict[str, str] | None = None) -> str:
        ca = self.certified_accuracy
        md = [
            "# lipverify audit report",
            "",
            f"**Verdict: {self.verdict}** (tolerance τ = {self.tolerance:g})",
            "",
            *[f"- {r}" for r in self.reasons],
            "",
            "## Lipschitz bounds",
            "",
            "| quantity | value |",
            "|---|---|",
            f"| claimed bound | {_fmt(self.lipschitz_claim)} |",
            f"| lower bound (attained, power iteration / ascent / pairs) | "
            f"{_fmt(self.lipschitz_lower)} |",
            f"| upper bound (guaranteed, composed over the captured graph) | "
            f"{_fmt(self.lipschitz_upper)} |",
            "",
        ]
        if self.layers:
            md += ["Each node of the captured graph: its own bound (upper), the bound of its "
                   "value as a function of the input (cumulative), and the rule used.", "",
                   "| node | kind | lower | upper | cumulative | rule |",
                   "|---|---|---|---|---|---|"]
            md += [
                f"| {lb['name']} | {lb['kind']} | {_fmt(lb.get('lower'))} | "
                f"{_fmt(lb.get('upper'))} | {_fmt(lb.get('cumulative'))} | "
                f"{_cell(lb.get('method', ''))} |"
                for lb in self.layers
            ]
            md.append("")
        claimed = ca.get("claimed_certified_accuracy", {})
        md += ["## Certified accuracy", "",
               "| r | vouched: radius / (1 + τ) > r | claimed: radius > r |", "|---|---|---|",
               f"| clean | {_pct(ca.get('clean_accuracy'))} | |"]
        md += [f"| {r} | {_pct(v)} | {_pct(claimed.get(r))} |"
               for r, v in ca.get("certified_accuracy", {}).items()]
        if ca.get("promise"):
            md += ["", ca["promise"]]
        md.append("")
        if self.certificate_violations:
            md += ["## Certifier radii beyond the guaranteed bound", "",
                   "| index | radius | supported radius | pred | model pred |",
                   "|---|---|---|---|---|"]
            md += [f"| {v['index']} | {_fmt(v['radius'])} | {_fmt(v['supported_radius'])} | "
                   f"{v['pred']} | {v['model_pred']} |" for v in self.certificate_violations]
            md.append("")
        if self.gnp:
            md += ["## Gradient-norm preservation", "",
                   f"worst deviation of a singular value from 1: "
                   f"{_fmt(self.gnp.get('worst_deviation'))} (tolerance "
                   f"{_fmt(self.gnp.get('tolerance'))})", ""]
        if self.attacks:
            md += ["## Attacks at the certified radii", "",
                   f"suite: `{self.attacks.get('settings', {}).get('suite')}`; points attacked: "
                   f"{self.attacks.get('n_attacked')}; violations: {len(self.violations)}", ""]
            q = self.attacks.get("tightness_quantiles") or {}
            if q:
                md += ["tightness (certified radius / smallest adversarial distance): "
                       + ", ".join(f"{k} = {_fmt(v)}" for k, v in q.items()), ""]
        if self.violations:
            md += ["## Violations", "", "| # | index | kind | attack | distance | radius |",
                   "|---|---|---|---|---|---|"]
            md += [f"| {i} | {v['index']} | {v.get('kind', 'real')} | {v['attack']} | "
                   f"{_fmt(v['distance'])} | {_fmt(v['radius'])} |"
                   for i, v in enumerate(self.violations)]
            md.append("")
        if self.execution:
            ex = self.execution
            md += [f"## Execution in {ex['execution']}", "",
                   f"executed verdict: **{ex['executed_verdict'].upper()}**", "",
                   *[f"- {r}" for r in ex["reasons"]], ""]
            if ex.get("price_median") is not None:
                md += [f"price of rounding (r - r_exec) / r: median {_fmt(ex['price_median'])}, "
                       f"max {_fmt(ex['price_max'])}; margin error bound delta: median "
                       f"{_fmt(ex['delta_median'])}, max {_fmt(ex['delta_max'])}", "",
                       "dominant ops: " + ", ".join(
                           f"{o['op']} ({_fmt(o['median_share'])})"
                           for o in ex.get("dominant_ops") or []), ""]
                md += [f"certified accuracy of the float32 model (executed radii) at r = {r}: "
                       f"{_pct(v)}" for r, v in (ex.get("certified_accuracy") or {}).items()]
                md.append("")
            md += ["assumptions: " + "; ".join(ex.get("assumptions", [])), ""]
        if self.warnings:
            md += ["## Warnings", "", *[f"- {w}" for w in self.warnings], ""]
        for name, fname in (plots or {}).items():
            md += [f"![{name}]({fname})", ""]
        md += ["## Provenance", "", "```json", json.dumps(self.provenance, indent=2,
                                                          default=str), "```", ""]
        return "\n".join(md)

    def to_html(self, pngs: dict[str, bytes] | None = None) -> str:
        body = _markdown_to_html(self.to_markdown())
        imgs = "".join(
            f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
            f'{base64.b64encode(b).decode()}"/><figcaption>{html.escape(n)}</figcaption></figure>'
            for n, b in (pngs or {}).items()
        )
        color = {"sound": "#1a7f37", "unsound": "#cf222e"}.get(self.verdict, "#9a6700")
        marker = "<h2>Provenance</h2>"
        if marker in body:
            head, tail = body.split(marker, 1)
            body = f"{head}<h2>Plots</h2>{imgs}{marker}{tail}"
        else:
            body += f"<h2>Plots</h2>{imgs}"
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>lipverify audit</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
            f".verdict{{color:{color};font-size:1.6em;font-weight:bold}}"
            "figure{display:inline-block;margin:1em}img{max-width:440px}"
            "pre{background:#f6f8fa;padding:1em;overflow:auto}</style></head><body>"
            f"<p class='verdict'>{html.escape(self.verdict.upper())}</p>{body}</body></html>"
        )

    def plots(self) -> dict[str, bytes]:
        """PNG plots: certified accuracy vs radius, radius vs adversarial distance, layers."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out: dict[str, bytes] = {}

        def png(fig: Any) -> bytes:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
            plt.close(fig)
            return buf.getvalue()

        radii = sorted(s["radius"] for s in self.samples if s.get("radius") is not None)
        if self.samples:
            correct = [s for s in self.samples if s.get("label") is None or s["label"] == s["pred"]]
            rad = [s["radius"] for s in correct]
            grid = [i * max(radii[-1] if radii else 0, 1e-3) / 50 for i in range(51)]
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot(grid, [sum(r > g for r in rad) / len(self.samples) for g in grid])
            ax.set_xlabel("l2 radius (pixels)")
            ax.set_ylabel("certified accuracy")
            ax.set_title("Certified accuracy against radius")
            ax.grid(alpha=0.3)
            out["certified_accuracy.png"] = png(fig)
            pts = [(s["radius"], s["min_adv_distance"]) for s in self.samples
                   if s.get("min_adv_distance") is not None
                   and math.isfinite(s["min_adv_distance"])]
            fig, ax = plt.subplots(figsize=(5, 3.5))
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, s=10)
                hi = max(max(xs), max(ys))
                ax.plot([0, hi], [0, hi], "r--", label="distance = radius (violation below)")
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no adversarial example found", ha="center",
                        transform=ax.transAxes)
            ax.set_xlabel("certified radius")
            ax.set_ylabel("smallest adversarial distance found")
            ax.set_title("Certificate against attacks")
            ax.grid(alpha=0.3)
            out["radius_vs_attack.png"] = png(fig)
        if self.layers:
            fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(self.layers)), 3.5))
            idx = range(len(self.layers))
            up = [lb.get("upper") if lb.get("upper") is not None else float("nan")
                  for lb in self.layers]
            lo = [lb.get("lower") if lb.get("lower") is not None else float("nan")
                  for lb in self.layers]
            ax.plot(idx, up, "v", label="upper (guaranteed)")
            ax.plot(idx, lo, "^", label="lower (power iteration)")
            ax.set_xticks(list(idx), [lb["name"] for lb in self.layers], rotation=70,
                          fontsize=6)
            ax.set_yscale("log")
            ax.set_ylabel("operator norm")
            ax.set_title("Per-node Lipschitz bounds")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            out["layer_bounds.png"] = png(fig)
        return out

    def save(self, directory: str | Path) -> Path:
        """Write report.json, report.md, report.html (plots embedded) and violations/NNNN.pt
        (the folder always exists; records left by an earlier report there are removed)."""
        import torch

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        pngs = self.plots()
        vdir = d / "violations"
        vdir.mkdir(exist_ok=True)  # present (and empty) when nothing was found
        keep = {f"{i:04d}.pt" for i in range(len(self.violation_tensors))}
        for old in vdir.glob("[0-9][0-9][0-9][0-9].pt"):  # records of an earlier report here
            if old.name not in keep:
                old.unlink()
        for i, v in enumerate(self.violation_tensors):
            buf = io.BytesIO()
            torch.save(v, buf)
            atomic_write(d / "violations" / f"{i:04d}.pt", lambda f, b=buf: f.write(b.getvalue()))
        atomic_write_text(d / "report.json", self.to_json())
        atomic_write_text(d / "report.md", self.to_markdown())
        atomic_write_text(d / "report.html", self.to_html(pngs))
        return d


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _cell(text: Any) -> str:
    """Table-cell text: a literal '|' (as in ||A||) would split the cell."""
    return str(text).replace("||", "\u2016").replace("|", "\u00a6")


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _markdown_to_html(md: str) -> str:
    """Tiny Markdown subset (headings, lists, tables, code blocks, bold) to HTML."""
    out: list[str] = []
    in_table = in_code = in_list = False
    for line in md.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("!["):
            continue  # images are embedded separately
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


def _inline(text: str) -> str:
    text = html.escape(text)
    parts = text.split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
