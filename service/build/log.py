"""TensorRT's log messages, captured for the manifest and for error reports.

The builder and the runtime are each given a `_CapturedLog`'s logger; the build
reads errors and layer lines from it, and the manifest keeps a trimmed copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import types

    import tensorrt as trt

# The builder log of a large model runs to thousands of lines; the manifest keeps a
# readable slice: INFO and above, each line cut, the head and tail of the whole.
_LOG_LINE_CHARS = 400
_LOG_MAX_LINES = 400
_LOG_SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO")


@dataclass(frozen=True)
class _LogLine:
    severity: str
    message: str


class _CapturedLog:
    """Every builder message, captured through a trt.ILogger subclass."""

    def __init__(self, trt_module: types.ModuleType) -> None:
        self.lines: list[_LogLine] = []
        lines = self.lines

        # The base class comes from whichever library is installed, so the subclass
        # is made here. TensorRT may log from its own threads; list.append is atomic.
        class Logger(trt_module.ILogger):  # type: ignore[name-defined]
            def __init__(self) -> None:
                trt_module.ILogger.__init__(self)

            def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
                lines.append(_LogLine(severity.name, msg))

        self.logger: trt.ILogger = Logger()

    def errors(self) -> str:
        return " | ".join(
            line.message for line in self.lines if line.severity in ("INTERNAL_ERROR", "ERROR")
        )

    def first_error(self) -> str | None:
        errors = [m for m in self.lines if m.severity in ("INTERNAL_ERROR", "ERROR")]
        return errors[0].message if errors else None

    def matching(self, text: str) -> list[str]:
        return [line.message for line in self.lines if text in line.message]

    def split_lines(self) -> Iterator[tuple[str, str]]:
        """(severity, text) per physical line: some messages span many lines."""
        for line in self.lines:
            for text in line.message.splitlines():
                yield line.severity, text

    def trimmed(self) -> list[str]:
        kept = [
            f"{severity}: {text[:_LOG_LINE_CHARS]}"
            for severity, text in self.split_lines()
            if severity in _LOG_SEVERITIES and text.strip()
        ]
        if len(kept) <= _LOG_MAX_LINES:
            return kept
        half = _LOG_MAX_LINES // 2
        return [*kept[:half], f"... {len(kept) - 2 * half} lines left out ...", *kept[-half:]]
