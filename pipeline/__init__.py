"""The runs built on the models: test.py's folder run, its ranks, image sets and video.

Modules (each one concern):

* :mod:`pipeline.settings`: the frozen settings a run takes (ModelSpec, LoaderSpec, OutputSpec, RunSpec).
* :mod:`pipeline.runtime`: device resolution and :class:`pipeline.runtime.SetupError` (test.py and train.py).
* :mod:`pipeline.run`: :func:`pipeline.run.run_folder`, a loop over the stages below.
* :mod:`pipeline.scan`: scan stage (the folder, ``--skip_existing``) and the results folder's checks.
* :mod:`pipeline.loader`: load stage (DataLoader of aligned crops).
* :mod:`pipeline.model`: the model built from a ModelSpec, and the device's warm-up threads.
* :mod:`pipeline.render`: render stage (face model and renderer -> per-face numpy payloads).
* :mod:`pipeline.outputs`: the output registry (one entry per output) and the writers' config.
* :mod:`pipeline.extra_arrays`: per-face arrays made on the device for the UV texture and the report.
* :mod:`pipeline.summary`: what a run did (RunSummary) and its report.
* :mod:`pipeline.workers`: worker, writer, batch and prefetch sizing; DataLoader worker set-up.
* :mod:`pipeline.ranks`: one process, torchrun's ranks, or one spawned process per GPU.
* :mod:`pipeline.image_sets`, :mod:`pipeline.confidence`: one identity from several photos.
* :mod:`pipeline.video`: video frames detected and reconstructed.

Layering: pipeline sits above models, util and data (it may import them) and below options and
the CLI scripts; nothing in models, util or data imports pipeline.
"""
