"""The one exception type for mistakes a user can fix (bad config, data, paths)."""


class UserError(ValueError):
    """A problem with the user's input. Launchers print its message as one paragraph and exit 2.

    The message names the file, row, field or option at fault and says what was expected.
    """


class TrainingHalted(RuntimeError):
    """Training stopped itself to protect the weights (e.g. repeated non-finite rewards or losses).

    Launchers print its message as one paragraph and exit 3.
    """
