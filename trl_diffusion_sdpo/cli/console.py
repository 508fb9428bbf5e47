"""What the command line prints, set up for its own process: the package's INFO messages (the start summary, the
data report), third-party noise filtered by its exact message, progress bars only on a terminal, and an error a user
can fix as one line.

The command line owns its process, so it may set other libraries' switches there (:func:`quiet_command_line`, called
once on its entry path, :func:`trl_diffusion_sdpo.cli.main.run`). Written to a file (``> train.log 2>&1``) a tqdm bar
is a line of ``\\r`` redraws, and nested bars (diffusers' loading bar around transformers' weight-loading bar) add
cursor-up escape codes (``ESC[A``): off a terminal the command line turns the libraries' bars off (diffusers',
transformers', the Hub's and ``datasets``' ``Generating train split``); the pipelines the package samples set their
own bar off. Whether the output is a terminal is :func:`~trl_diffusion_sdpo.io.console.on_terminal`'s answer, which
the trainer reads too.

Imported from Python, nothing here runs by itself: the package changes no setting of another library.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

from ..config.extras import ExtraNotInstalled
from ..config.messages import OutputExistsError, command_line
from ..io.console import on_terminal

__all__: list[str] = []  # nothing here is imported by users; the command line imports its names directly

# The command line's switch and variable that show the traceback of an error a user can fix (one line otherwise).
DEBUG_FLAG = "--debug"
DEBUG_ENV = "TRL_DIFFUSION_SDPO_DEBUG"
_TRUE = {"1", "true", "yes", "on"}

# The package's errors a user can fix that live in modules not every command imports (the data, the checkpoints, the
# Hub, the run lock), by name with their exit status: an error of a module never imported was never raised, so
# user_error_status looks a class up only where its module is loaded.
HEAVY_USER_ERRORS = {
    "trl_diffusion_sdpo.data.errors:DataError": 1,
    "trl_diffusion_sdpo.io.checkpoints:CheckpointError": 2,
    "trl_diffusion_sdpo.io.checkpoints:CheckpointSaveError": 2,
    "trl_diffusion_sdpo.io.hub:HubPushError": 2,
    "trl_diffusion_sdpo.io.run_lock:RunLockedError": 2,
}

# Messages that say nothing a user can act on, by the logger that emits them and their exact text.
NOISE: dict[str, tuple[re.Pattern[str], ...]] = {
    # transformers without torchvision falls back to the PIL image processors it loads for pipelines' safety
    # checkers and feature extractors (diffusers imports them with every Stable Diffusion pipeline).
    "transformers.utils.import_utils": (
        re.compile(
            r"`(\w+)ImageProcessor` requires torchvision \(not installed\); falling back to `\1ImageProcessorPil` "
            r"for backward compatibility\. Install torchvision to use the default backend, or import "
            r"`\1ImageProcessorPil` directly to silence this warning\.$"
        ),
    ),
    # Every load of a LoRA trained here: its adapters are the denoiser's only, so diffusers finds none for the text
    # encoders it also looks in.
    "diffusers.loaders.lora_base": (
        re.compile(r"No LoRA keys associated to \w+ found with the prefix='text_encoder(_\d)?'\."),
    ),
    # torchao (the [quantization] extra), imported by transformers' and diffusers' quantizers with TrainingArguments:
    # its optional CUDA kernels that do not load on this machine, its enums registered the way torch now deprecates,
    # and diffusers' note on torchao versions it cannot read checkpoints of (this package quantizes on load).
    "torchao": (re.compile(r"Failed to load .*\.so: Could not load this library: .*$"),),
    "torch.utils._pytree": (
        re.compile(r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile .*$"),
    ),
    "diffusers.quantizers.torchao.torchao_quantizer": (
        re.compile(r"Unable to import `torchao` Tensor objects\. This may affect loading checkpoints .*$"),
    ),
    # DeepSpeed, which accelerate imports with every trainer where it is installed, on a machine where torch sees no
    # GPU (its own logger, which does not propagate): the start summary names the device the run trains on.
    "DeepSpeed": (
        re.compile(
            r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it\.$"
        ),
    ),
}


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[re.Pattern[str], ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


def filter_known_noise() -> None:
    """Drop the :data:`NOISE` messages (once per logger, however often it is called)."""
    for name, patterns in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))


def quiet_progress_bars() -> None:
    """Turn off, for the whole process, the loading bars of diffusers (pipeline components), transformers (weights)
    and the Hub (downloads), and ``datasets``' bars (``Generating train split``, ``map``): the command line's own
    process only."""
    import datasets
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()


def quiet_library_warnings() -> None:
    """Show only the errors of diffusers and transformers, for the whole process: the command line's own process
    only, for a command whose output is its own report (the demo)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def quiet_command_line(progress_bars: bool = True, own_report: bool = False) -> bool:
    """What the command line does first, for its own process: drop the :data:`NOISE` messages and, off a terminal,
    the libraries' progress bars (``progress_bars=False``: leave them, and the libraries unimported, for a command
    that draws none, such as a ``--help``). A command whose output is its own report and bars (``own_report``: the
    demo) also has the libraries' bars off on a terminal and their warnings below errors dropped. Whether the output
    is a terminal (where the command's own bars may show)."""
    filter_known_noise()
    terminal = on_terminal()
    if own_report:
        quiet_library_warnings()
    if own_report or (progress_bars and not terminal):
        quiet_progress_bars()
    return terminal


def log_to_console() -> None:
    """Show the package's messages on stderr: INFO on the main process, WARNING on the others (``RANK``), unless
    logging is already configured (a handler on the root logger)."""
    package = logging.getLogger("trl_diffusion_sdpo")
    package.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    if logging.getLogger().hasHandlers() or package.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package.addHandler(handler)


def debug_requested(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without :data:`DEBUG_FLAG`, and whether tracebacks were asked for (the flag or :data:`DEBUG_ENV`)."""
    rest = [word for word in argv if word != DEBUG_FLAG]
    return rest, len(rest) != len(argv) or os.environ.get(DEBUG_ENV, "").strip().lower() in _TRUE


def user_error_status(error: BaseException) -> int | None:
    """The exit status of an error a user can fix: 1 for the data (:class:`~.data.errors.DataError`), 2 for the
    rest (an option, a config value, a folder, a missing extra: the package's own error classes, or a ValueError,
    KeyError or FileNotFoundError the package raised with its message); ``None`` for anything else, a bug whose
    traceback is the report."""
    for cls, status in _loaded_user_errors():
        if isinstance(error, cls):
            return status
    if isinstance(error, ExtraNotInstalled | OutputExistsError):
        return 2
    if isinstance(error, ValueError | KeyError | FileNotFoundError | NotADirectoryError) and _raised_by_the_package(
        error
    ):
        return 2
    return None


def _loaded_user_errors() -> Iterator[tuple[type, int]]:
    """The classes of :data:`HEAVY_USER_ERRORS` whose modules are imported, each with its exit status."""
    for target, status in HEAVY_USER_ERRORS.items():
        module, _, name = target.partition(":")
        if module in sys.modules:
            yield getattr(sys.modules[module], name), status


def _raised_by_the_package(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is the package's code: a message it wrote for users."""
    frames = traceback.extract_tb(error.__traceback__)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package, above cli/
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(package + os.sep)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (a KeyError's without the quotes its ``str`` adds)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def run_command(prog: str, command: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``command`` as the command line does: an error a user can fix (:func:`user_error_status`) ends it with
    ``prog: error: <one line>`` on stderr and its exit status, no traceback; ``debug`` re-raises it (the traceback).
    Advice in messages names flags while it runs (:func:`~trl_diffusion_sdpo.config.messages.advice`)."""
    try:
        with command_line():
            return command() or 0
    except Exception as error:
        status = None if debug else user_error_status(error)
        if status is None:
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return status
