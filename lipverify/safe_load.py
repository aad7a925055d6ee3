"""Safe loading of tensor files, below every other lipverify module (layers use it too).

``torch.load(weights_only=True)`` only: a file that asks for code (a global, a call) is
refused with a one-line :class:`~lipverify.errors.CheckpointError`, and nothing in it runs.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from lipverify.errors import CheckpointError

__all__ = ["safe_torch_load"]


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for unsafe or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            # torch's notes about pickle protocols are not for users; the error below is.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, e) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError,
            IndexError, TypeError, AttributeError, UnicodeDecodeError, MemoryError,
            OverflowError, AssertionError) as e:
        raise CheckpointError(
            f"{path}: truncated, corrupt or not a checkpoint ({_short(e)})"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure of the unpickler is a bad file
        raise CheckpointError(f"{path}: unreadable checkpoint ({_short(e)})") from None


# Messages of torch's weights-only unpickler when a file asks for code (a global, a call).
_CODE_MARKERS = ("Unsupported global", "GLOBAL ", "reduce for unrecognized function",
                 "Can only create new object", "Can only build", "is blocked")


def _unpickling_error(path: Path, e: BaseException) -> CheckpointError:
    """Tell a file that asks for code apart from one that is merely corrupt."""
    text = str(e)
    if any(m in text for m in _CODE_MARKERS):
        found = re.search(r"GLOBAL ([A-Za-z0-9_.]{1,80})", text)
        what = f" (it calls {found.group(1)})" if found else ""
        return CheckpointError(
            f"{path}: refused, the file needs arbitrary unpickling{what}, which could run code; "
            "nothing in it was executed. Re-save it as plain tensors and dicts"
        )
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return CheckpointError(
        f"{path}: corrupt or not a checkpoint: the weights-only unpickler cannot read it "
        f"({(detail[0] if detail else type(e).__name__)[:120]}); nothing in it was executed"
    )


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {text[0]}" if text else type(e).__name__)[:200]
