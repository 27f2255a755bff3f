"""What happens when a Triton kernel cannot be built or launched on the user's GPU: torch takes over.

Under LRS_KERNELS=auto a failure is reported once per kernel (with the reason and how to silence it) and the
torch path computes the same thing from then on; under LRS_KERNELS=triton the user asked for the kernels,
so the error is raised.
"""

from __future__ import annotations

import os
import warnings

_WARNED: set[str] = set()


def strict() -> bool:
    """Whether the user asked for the Triton kernels explicitly (no fallback)."""
    return os.environ.get("LRS_KERNELS", "auto").strip().lower() == "triton"


def failed(kernel: str, error: Exception) -> None:
    """Raise `error` when strict, else warn once for `kernel` that the torch path takes over."""
    if strict():
        raise error
    if kernel in _WARNED:
        return
    _WARNED.add(kernel)
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    warnings.warn(f"lrs: the Triton {kernel} kernel failed ({type(error).__name__}: {reason}); using the torch path "
                  "for it from now on. Set LRS_KERNELS=torch to skip the Triton kernels.", RuntimeWarning, stacklevel=3)
