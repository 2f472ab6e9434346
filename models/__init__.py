"""Networks, the parametric face model, the renderer and the reconstruction model.

Nothing is imported eagerly: import the submodule you need (``models.bfm``,
``models.networks``, ``models.renderer``, ``models.facerecon``).
"""
