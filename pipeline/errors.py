"""The one exception type for mistakes a user can fix (bad config, data, paths)."""


class UserError(ValueError):
    """A problem with the user's input. Launchers print its message as one paragraph and exit 2.

    The message names the file, row, field or option at fault and says what was expected.
    """


class SharedUserError(UserError):
    """A UserError every rank raises alike (agreed over ranks by a collective): rank 0 alone prints
    it. Any other UserError is printed by the rank that raised it, as only that rank may know."""


class TrainingHalted(RuntimeError):
    """Training stopped itself to protect the weights (e.g. repeated non-finite rewards or losses).

    Launchers print its message as one paragraph and exit 3.
    """


class Preempted(RuntimeError):
    """A stop signal (SIGTERM, SIGUSR1) arrived; the stage checkpointed and stopped.

    Launchers exit with PREEMPTED_EXIT_CODE, so a job script can tell "requeue me" from a failure.
    """


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL in sysexits.h: a temporary failure, retrying is expected


class CheckpointError(TrainingHalted):
    """A checkpoint could not be written (e.g. the disk filled up); the previous one is intact."""
