"""Cluster side of tlctl: code that runs inside Ray (backbones, data, training, storage).

Never imports `orchestrator` or `typer`.
"""
