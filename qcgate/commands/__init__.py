"""The `qcgate` sub-commands, one module per area, each with a ``register(subparsers)`` function.

They are the top of the package: a command module may import any layer below it (and
``qcgate.commands.common``), and no package below imports a command module.
"""
