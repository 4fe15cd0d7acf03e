"""The one exception type for bad input. Scripts turn it into a one-line message and exit 2."""


class PipelineError(Exception):
    """Bad input or configuration. The message names the problem and the fix, on one line."""
