"""The exceptions peftkit raises on bad input.

Every message says what was wrong, shows the value, lists the valid choices where there are any, and says
how to fix it. Each class also derives from the built-in exception Hugging Face peft raises in the same situation,
so ``except ValueError`` (or ``RuntimeError``, ``TypeError``) written against peft keeps working:

    peft raises ValueError       config values, unknown / duplicate adapters, targets, missing checkpoints,
                                 per-row adapter_names, merge refusals (deleting a merged adapter...)
    peft raises RuntimeError     a checkpoint whose tensors do not fit the model (load_state_dict's size mismatch)
    Python raises TypeError      a config field of the wrong type
"""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class of every error peftkit raises on purpose."""


class ConfigError(PeftkitError, ValueError):
    """A method config holds an invalid value (all problems are listed in one message)."""


class ConfigTypeError(ConfigError, TypeError):
    """A config field holds a value of the wrong type (``lora_alpha="16"``); every such field is listed at once."""


class TargetNotFoundError(ConfigError):
    """`target_modules` (or another name pattern) matched no module of the model."""


class AdapterNotFoundError(PeftkitError, ValueError):
    """An adapter name that is not loaded on this model."""


class AdapterNameError(PeftkitError, ValueError):
    """An adapter name that is empty, reserved, or could escape the checkpoint folder."""


class CheckpointError(PeftkitError, ValueError, RuntimeError):
    """A checkpoint that is missing, corrupt, or was saved for another model."""


class MergeError(PeftkitError, ValueError, RuntimeError):
    """A merge or unmerge that the method cannot do, or that the current state does not allow."""


class RoutingError(PeftkitError, ValueError):
    """Per-row ``adapter_names=`` that cannot be honoured."""


def choices(values) -> str:
    """Format valid choices for an error message: 'a', 'b', 'c'."""
    return ", ".join(repr(v) for v in sorted(values))
