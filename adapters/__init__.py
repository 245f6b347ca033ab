"""Adapters that bolt LayerLock onto host frameworks; installed as ``layerlock_plugin.adapters``.

Each host framework is imported only inside its own module here; a missing one raises
:class:`layerlock_plugin.errors.MissingDependencyError` naming the pip extra to install.
"""
