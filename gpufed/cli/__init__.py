"""`gpufed`: the command line, one module per command group for developers and operators.

Tables for people, `-o json` / `-o yaml` for scripts. Configuration from flags, then the
environment (GPUFED_ENDPOINT, GPUFED_TOKEN), then a config file (~/.config/gpufed/config.toml or
GPUFED_CONFIG) with `endpoint = "..."` and `token = "..."`.

Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 no capacity, 5 not allowed
(unauthenticated or permission denied), 6 unavailable, 7 invalid argument.
"""

from gpufed.cli.main import build_parser, entrypoint, main

__all__ = ["build_parser", "entrypoint", "main"]
