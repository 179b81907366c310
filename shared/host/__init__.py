"""The long-lived process that hosts the roles: the command line and client config (``runner``), the standard-library
supervisor (``supervisor``), the worker that runs the roles (``worker``), the shared environments (``envs``).

Standard library only, here and in ``runner``, ``supervisor`` and ``envs``: the supervisor imports this package.
"""
