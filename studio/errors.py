"""The errors a person can act on: bad settings, files, references and requests.

Every front end catches `StudioError` and shows its message as it is (the CLI on one line with
exit status 2, the UI next to the button); anything else is a real failure. Each message names
the file, line, field or value that is wrong and what is allowed instead. The kinds below say
which layer refused, so a caller can catch one kind without swallowing the others.
"""


class StudioError(ValueError):
    """A request the studio refuses, with a message that says why and what would work."""


class ConfigError(StudioError):
    """A setting is invalid; the message names the field, the value and what is allowed."""


class UsageError(StudioError):
    """A command line that asks for something impossible (conflicting or missing arguments)."""


class ModelRefError(StudioError):
    """A model reference that cannot be resolved or used as asked."""


class TargetError(StudioError):
    """LoRA targets that match nothing, or match modules LoRA cannot wrap."""


class DataError(StudioError):
    """A dataset that cannot be used; the message starts with file:line where it can."""


class RunError(StudioError):
    """A run cannot be started, resumed, stopped or deleted as asked; the message says why."""


class AdapterError(StudioError):
    """An adapter folder or file that is missing, pickled or not a PEFT LoRA adapter."""


class MergeError(StudioError):
    """A base and adapter that cannot be merged as asked; the message names the tensor or setting."""


class ExportError(StudioError):
    """An export (zip, GGUF) that cannot be written as asked."""


class AnalysisError(StudioError):
    """An analysis cannot run on these inputs; the message names the adapter, module or tensor."""


class PlaygroundError(StudioError):
    """A generation or classification request the playground cannot serve."""
