"""The errors a user is told in one line, and the exit status each ends a command with.

Every error that is the user's to fix (a bad flag, an unusable manifest, spec or ``--out``, an object store that
stays unreachable) derives from ``UserError`` and carries its exit status; the command line maps errors to exit
statuses in one place (``flows/cli.py``, ``main``) and prints ``ipaflow: <message>`` without a traceback.

| status | meaning |
| --- | --- |
| 0 | every row rendered, or skipped as already done |
| 1 | some rows failed (each has a record saying why), or the run stopped part-way |
| 2 | nothing ran: a usage error, an unusable manifest, spec folder or ``--out``, an ``--out`` in use |
| 3 | the output's storage stayed unreachable past the retries; what was written is safe, re-run to resume |
| 4 | the run lost its lease on ``--out`` (paused past its ttl, taken over) and stopped; re-run to resume |
| 130 | interrupted (Ctrl-C); re-run to resume |
| 143 | terminated (SIGTERM); re-run to resume |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_NOTHING_RAN = 2
EXIT_STORAGE_UNREACHABLE = 3
EXIT_LEASE_LOST = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class UserError(Exception):
    """An error told in one line (its message), ending the command with ``exit_code``; no traceback."""

    exit_code: int = EXIT_NOTHING_RAN
