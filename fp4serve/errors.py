"""Exception types every layer raises; the server maps them to HTTP status codes."""


class Fp4ServeError(Exception):
    """Base class of fp4serve's own errors."""


class InvalidRequestError(Fp4ServeError, ValueError):
    """The request is malformed or exceeds a limit (HTTP 400). `param` names the offending field
    (e.g. "temperature", "stop_token_ids"), which the server reports as OpenAI's `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CheckpointError(Fp4ServeError):
    """A model directory or weight file is missing, malformed or does not match the model."""


class UnsupportedModelError(Fp4ServeError):
    """The architecture or a config feature is not implemented."""


class ConfigError(Fp4ServeError, ValueError):
    """Engine flags are inconsistent (e.g. the cache cannot hold one max-length sequence)."""


class BenchError(Fp4ServeError):
    """A benchmark input is unusable: a workload file, an endpoint that cannot be reached, a result file."""
