"""The errors that stop a training run on purpose, and their exit codes (``bifrost train``; README "What happens
when things go wrong")."""

EXIT_NON_FINITE = 3
EXIT_SAVE_FAILED = 4
EXIT_WORKDIR_LOCKED = 5
EXIT_NO_INTACT_CHECKPOINT = 6


class TrainingStopped(RuntimeError):
    """A run stopped on purpose; ``bifrost train`` prints the message and exits with ``exit_code``."""

    exit_code = 1


class NonFiniteError(TrainingStopped):
    exit_code = EXIT_NON_FINITE
