"""The ``headswap`` verbs that drive ``models/`` alone, each module adding its verbs to a parser.

``checkpoints`` (archs, inspect, merge, slice, convert) and ``training`` (demo-data, finetune)
import nothing from ``service/``; ``service/cli.py`` composes the ``headswap`` command from
them and ``serve``. Each module's ``add_parsers(sub)`` takes ``ArgumentParser.add_subparsers()``'s
result, and every verb's function ``cmd_*(args)`` returns the exit status. Both parse without
torch: the verbs that need it import it when they run.
"""
