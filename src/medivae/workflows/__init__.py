"""Application workflows: what ``api`` calls to evaluate, score, synthesize, traverse a run folder.

Each opens a run (:mod:`medivae.runfolder.run`), loads its data, calls the pure functions of
:mod:`medivae.evaluation`, then saves (``results.json`` through :mod:`medivae.runfolder.results`, CSV, PNG).
Layers: data -> models -> losses -> train -> run -> evaluation -> workflows -> api -> commands/cli.
"""
