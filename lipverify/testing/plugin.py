"""pytest plugin (entry point ``pytest11``): ``--lipverify-audit CKPT`` adds an audit test.

Loaded in every pytest run of an environment where lipverify is installed, so importing it
must not import torch; the audit imports everything on first use. The added test passes only
when the audit's verdict is "sound"; its failure message is the audit summary.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lipverify", "lipverify certificate audits")
    group.addoption("--lipverify-audit", metavar="CKPT", default=None,
                    help="add an audit of this checkpoint (lipverify or reference format)")
    group.addoption("--lipverify-audit-dataset", default=None,
                    help="dataset for the audit (default: the checkpoint's, else digits)")
    group.addoption("--lipverify-audit-data-dir", default=None)
    group.addoption("--lipverify-audit-n", type=int, default=20,
                    help="number of points to audit (default 20)")
    group.addoption("--lipverify-audit-attacks", default="quick",
                    choices=("quick", "standard", "minimal-norm"))


class LipverifyAuditItem(pytest.Item):
    """One test: audit a checkpoint and require the verdict "sound"."""

    def __init__(self, *, checkpoint: str, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.checkpoint = checkpoint

    def runtest(self) -> None:
        from lipverify.audits import audit
        from lipverify.checkpoints import load_model
        from lipverify.data import load_dataset

        opt = self.config.getoption
        model = load_model(self.checkpoint)
        meta = getattr(model, "metadata", {}) or {}
        dataset = (opt("lipverify_audit_dataset")
                   or (meta.get("config") or {}).get("dataset") or "digits")
        x, y, _ = load_dataset(dataset, "test", data_dir=opt("lipverify_audit_data_dir"))
        n = opt("lipverify_audit_n")
        report = audit(model, x[:n], y[:n], attacks=opt("lipverify_audit_attacks"))
        if report.verdict != "sound":
            raise AssertionError(report.summary())

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> str:  # type: ignore[override]
        return f"lipverify audit of {self.checkpoint} is not sound:\n{excinfo.value}"

    def reportinfo(self) -> tuple[str, int, str]:
        return self.checkpoint, 0, f"lipverify audit: {self.checkpoint}"


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    ckpt = config.getoption("lipverify_audit")
    if ckpt:
        items.append(LipverifyAuditItem.from_parent(
            session, name=f"lipverify-audit[{ckpt}]", checkpoint=ckpt))
