"""Keep libraries' own start-up chatter off the user's terminal.

diffusers imports bitsandbytes whenever it is installed (it is, with the
``bnb`` extra), and bitsandbytes' import looks up a CPU kernel on the Hugging
Face Hub and logs a warning when it cannot: a foreign line on every command,
and seconds of start-up. peft (which diffusers imports when it is installed)
imports bitsandbytes too. The CLI never quantizes, so it tells diffusers that
bitsandbytes is absent and makes its import fail for peft (``sys.modules``
entry ``None``); ``--optimizer adamw8bit`` lifts that and imports it itself,
with its kernel warning filtered (e4t never uses that kernel). The library API
leaves all of this alone: a program embedding e4t may quantize.
"""

import importlib.util
import logging
import sys

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
    if "bitsandbytes" not in sys.modules and importlib.util.find_spec("bitsandbytes") is not None:
        sys.modules["bitsandbytes"] = None  # an import of it raises ImportError, which peft handles
    import e4tcli.models.loading  # noqa: F401  (sets the libraries' log levels before their first import)

    try:
        import diffusers.utils.import_utils as diffusers_imports
    except ImportError:
        return
    diffusers_imports._bitsandbytes_available = False
