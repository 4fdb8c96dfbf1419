"""Bad-input cases of the tune class (issue 20), merged into ``bad_inputs.CASES``.

Same form as ``bad_inputs.CASES``: name -> (builder(root) -> CLI argv, a fragment the first
error line must contain).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {}
