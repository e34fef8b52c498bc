"""The exception tree of imgworker and the exit codes the CLI maps them to.

    ImgworkerError
    ├── ConfigError            bad configuration value or file (fatal, exit 2)
    ├── StateError             corrupt state or results file in the state directory (fatal, exit 7)
    ├── AlreadyRunning         another run holds the state directory's lock (fatal, exit 8)
    ├── StoreError             anything the object store did
    │   ├── StoreUnavailable   transient: connection refused, timeout, 5xx
    │   ├── ObjectMissing      permanent for that key: NoSuchKey / 404
    │   └── StoreFatal         fatal at start: credentials, bucket, TLS, endpoint
    └── AlgoError              anything the algorithm service did
        ├── AlgoTransient      retry: 5xx, 429, timeout, refused, malformed body, a local OSError
        ├── AlgoPermanent      do not retry: other 4xx
        └── ImageGone          the service could not fetch the image (404)

Third-party exceptions are translated into these where they enter
(``store.py`` for minio/urllib3, ``algo_client.py`` for requests).

A run that ends normally exits 0, or ``ALGO_UNAVAILABLE`` (9) when images ended ``failed_algo``
(``no_healthy_endpoint``) or the algorithm service answered none of the calls made: a service
manager must not take a run whose service was down for a success.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes; each fatal cause has its own."""

    OK = 0
    """The run ended (``--duration``, ``--until-idle``, a signal) and the algorithm service answered."""
    UNEXPECTED = 1
    """An unexpected error (a bug), with its traceback on stderr."""
    CONFIG = 2
    """Configuration: a bad value, file or flag, or an optional extra the command needs is not installed."""
    STORE_CREDENTIALS = 3
    """The store refused the credentials at start."""
    STORE_BUCKET = 4
    """The bucket does not exist."""
    STORE_UNREACHABLE = 5
    """The store could not be reached at start."""
    STORE_TLS = 6
    """TLS with the store failed at start (a plain-HTTP store with ``store.secure``, an unknown CA)."""
    STATE = 7
    """The state file or the results file cannot be trusted: ``imgworker repair``."""
    LOCKED = 8
    """Another run holds the state directory."""
    ALGO_UNAVAILABLE = 9
    """The run ended, but images failed for want of a healthy algorithm endpoint, or no call was answered."""
    UNANSWERED = 10
    """``imgworker top --once``: none of the addresses answered."""
    INTERRUPTED = 130
    """Interrupted (Ctrl-C) before a run took over its own stop handling, or stopped while a cluster host still
    waited for the NATS server at start."""


class ImgworkerError(Exception):
    """Base of every error imgworker raises on purpose."""

    exit_code: ExitCode = ExitCode.UNEXPECTED


class ConfigError(ImgworkerError):
    """A configuration value, file or flag is invalid."""

    exit_code = ExitCode.CONFIG


class StateError(ImgworkerError):
    """The state file or the results file cannot be trusted; ``imgworker repair`` may help."""

    exit_code = ExitCode.STATE


class AlreadyRunning(ImgworkerError):
    """Another imgworker run holds the lock of this state directory."""

    exit_code = ExitCode.LOCKED


class StoreError(ImgworkerError):
    """The object store failed an operation."""


class StoreUnavailable(StoreError):
    """Transient: the store could not be reached or answered 5xx."""


class ObjectMissing(StoreError):
    """The object does not exist (NoSuchKey / 404)."""


class StoreFatal(StoreError):
    """A start-up problem no retry will fix; carries its own exit code."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class AlgoError(ImgworkerError):
    """The algorithm service call failed; ``cause`` is a short machine-readable tag."""

    def __init__(self, cause: str, detail: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause


class AlgoTransient(AlgoError):
    """Worth retrying: 5xx, 429, timeout, refused connection, malformed answer."""


class AlgoPermanent(AlgoError):
    """Not worth retrying: a 4xx other than 404 and 429."""


class ImageGone(AlgoError):
    """The algorithm service answered 404: it could not fetch the image."""
