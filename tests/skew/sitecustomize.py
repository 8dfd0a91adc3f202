"""Test helper: shift this process's wall clock by ``CONSENT_TEST_CLOCK_SKEW`` seconds.

Put this folder on ``PYTHONPATH`` of a subprocess (tests only): Python imports ``sitecustomize``
at start-up, before any other module, so every ``time.time()``, ``time.time_ns()`` and
``datetime.now()`` in the process (arq's and the project's alike) reads the shifted clock, as on
a machine whose clock is off. The monotonic clock and the machine's clock are left alone.
"""

from __future__ import annotations

import datetime as _datetime
import os
import time as _time

_SKEW = float(os.environ.get("CONSENT_TEST_CLOCK_SKEW") or 0.0)

if _SKEW:
    _real_time = _time.time
    _real_time_ns = _time.time_ns

    def _skewed_time() -> float:
        return _real_time() + _SKEW

    def _skewed_time_ns() -> int:
        return _real_time_ns() + int(_SKEW * 1_000_000_000)

    class _SkewedDatetime(_datetime.datetime):
        @classmethod
        def now(cls, tz: _datetime.tzinfo | None = None) -> _SkewedDatetime:
            return cls.fromtimestamp(_skewed_time(), tz)

        @classmethod
        def today(cls) -> _SkewedDatetime:
            return cls.fromtimestamp(_skewed_time())

    _time.time = _skewed_time
    _time.time_ns = _skewed_time_ns
    _datetime.datetime = _SkewedDatetime  # type: ignore[misc]
