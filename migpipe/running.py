"""run_trio: how a command (and the demo, and tests) runs its trio code, trio imported only then
(it is a tenth of a second of the start of every command that needs no event loop)."""

from migpipe.errors import MigpipeError, leaves


def run_trio(function, *args) -> object:
    """trio.run, with an exception group from the nursery reduced to its first real error."""
    import trio

    try:
        return trio.run(function, *args, strict_exception_groups=True)
    except BaseExceptionGroup as group:
        errors = list(leaves(group))
        for leaf in errors:
            if isinstance(leaf, MigpipeError | KeyboardInterrupt):
                raise leaf from None
        raise errors[0] from None
