"""Keep libraries' own start-up chatter off the user's terminal.

diffusers imports bitsandbytes whenever it is installed (it is, with the
``bnb`` extra), and bitsandbytes' import looks up a CPU kernel on the Hugging
Face Hub and logs a warning when it cannot: a foreign line on every command,
and seconds of start-up. The CLI never asks diffusers to quantize, so it tells
diffusers that bitsandbytes is absent; ``--optimizer adamw8bit`` imports it
itself, with its kernel warning filtered (e4t never uses that kernel). The
library API leaves both alone: a program embedding e4t may quantize.
"""

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
CPU_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"


class _DropCpuKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CPU_KERNEL_WARNING)


_done = False


def quiet_heavy_imports() -> None:
    """Call before a command first imports diffusers (this imports torch)."""
    global _done
    if _done:
        return
    _done = True
    logging.getLogger(BITSANDBYTES_CPU_LOGGER).addFilter(_DropCpuKernelWarning())
    import e4tcli.models.loading  # noqa: F401  (sets the libraries' log levels before their first import)

    try:
        import diffusers.utils.import_utils as diffusers_imports
    except ImportError:
        return
    diffusers_imports._bitsandbytes_available = False
