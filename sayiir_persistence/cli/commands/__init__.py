"""The subcommands, a module per group; each ``cmd_*`` function runs one (see ``cli/parser.py``).

- ``migrate``: ``migrate`` and ``demo``, the commands that create what they work on;
- ``inspect``: ``list``, ``show``, ``claims``, which only read;
- ``signals``: ``cancel``, ``pause`` and ``resume``;
- ``retry``: ``retry``;
- ``prune``: ``prune``.
"""
