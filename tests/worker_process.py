"""Run one real worker process from the CONSENT_* environment, with test-sized timings.

Used by the tests that need workers in processes of their own (several at once, SIGKILL).
Usage: python tests/worker_process.py [--job-timeout S] [--sweep-every S] [--retry-base S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consent_flow import Settings
from consent_flow.engine.refresh import RetryPolicy
from consent_flow.logging import configure_logging
from workers import ConsentWorker, worker_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job-timeout", type=float, default=5)
    parser.add_argument("--sweep-every", type=int, default=1)
    parser.add_argument("--cleanup-every", type=int, default=30)
    parser.add_argument("--retry-base", type=float, default=0.2)
    parser.add_argument("--queue", default=None)
    args = parser.parse_args()
    settings = Settings.from_env(require_provider=True, require_keys=True)
    if args.queue:
        settings = settings.with_changes(queue_name=args.queue)
    configure_logging("json")
    assert settings.redis_url
    options = worker_settings(
        settings,
        settings.redis_url,
        job_timeout=args.job_timeout,
        sweep_every=args.sweep_every,
        cleanup_every=args.cleanup_every,
        retry=RetryPolicy(base=args.retry_base, cap=5.0),
    )
    ConsentWorker(**options).run()


if __name__ == "__main__":
    main()
