"""The supervisor of `stella serve` with several workers."""

from __future__ import annotations

import contextlib

from uvicorn.supervisors import Multiprocess


class Workers(Multiprocess):
    """uvicorn's worker supervisor, letting go of the listening socket at shutdown.

    Each worker closes its copy of the socket as it starts draining; the
    supervisor's copy kept it listening, so new connections queued where nobody
    would accept them, then were reset. With it closed too they are refused at
    once, as with one worker, and a load balancer tries another replica.
    """

    def terminate_all(self) -> None:
        """Tell every worker to stop, then stop listening."""
        super().terminate_all()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
