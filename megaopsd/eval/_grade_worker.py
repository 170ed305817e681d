"""The grading worker process (started by ``megaopsd.eval.grading.Grader``; not a user command).

Protocol: after importing math-verify it writes ``{"ready": true}``; then, for each request
line ``{"answer": str, "reference": str}`` on stdin, it writes one line
``{"correct": bool, "status": "graded" | "error"}``. It exits at EOF on stdin.

stdout carries only the protocol: file descriptor 1 is pointed at stderr, so anything a
library prints cannot corrupt a reply.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys


def _protocol_stream():
    """A private copy of stdout for replies; fd 1 (print, C libraries) goes to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--soft-timeout", type=int, default=0)
    parser.add_argument("--memory-limit-mb", type=int, default=0)
    args = parser.parse_args(argv)
    if args.memory_limit_mb > 0:
        limit = args.memory_limit_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = _protocol_stream()
    # math-verify logs every timeout and parse failure as a warning; the verdict carries it.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    from megaopsd.eval.grading import STATUS_ERROR, STATUS_GRADED, verify_answer

    verify_answer("1", "1", soft_timeout_s=args.soft_timeout)  # import and warm up before "ready"
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            correct = verify_answer(request["answer"], request["reference"], soft_timeout_s=args.soft_timeout)
            reply = {"correct": correct, "status": STATUS_GRADED}
        except Exception:  # math-verify raises many types on odd input; MemoryError is one of them
            reply = {"correct": False, "status": STATUS_ERROR}
        out.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
