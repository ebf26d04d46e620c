"""The folder ``ckptd sidecar`` puts first on its child's PYTHONPATH.

It holds ``sitecustomize.py``, which Python's ``site`` module imports at start-up in every
process of the child's tree. This ``__init__`` only makes the folder package data; nothing
imports ``ckptd._hook`` as a package.
"""
