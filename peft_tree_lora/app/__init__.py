"""The command line and the main job: what a user runs, above the tuner and the integrations."""

import logging


class _WithoutKernelsHubNotice(logging.Filter):
    """bitsandbytes' CPU backend warns at import, on every command, that it could not download an optional kernel
    from the Hub (it needs the `kernels` package and a network). Its built-in fallback computes the same results, so
    in our commands' logs the line is noise; every other bitsandbytes message is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_WithoutKernelsHubNotice())
