"""Every speed and cost benchmark of the project behind one command: ``python -m analysis.bench``.

Each benchmark module exposes ``measure(quick=False, progress=None) -> list[dict]`` (one dict per figure:
figure, value, unit, target, passed, detail) and a ``main()``; ``analysis.bench.suite`` runs them all.
"""
