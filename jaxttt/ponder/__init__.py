"""PonderTTT: chunk-level TTT-Linear fast weights on a frozen trunk, with budgeted SKIP/UPDATE_k.

Dimension letters (beyond the model glossary in jaxttt.model.transformer): C chunks, J TTT
mini-batches per chunk, M tokens per mini-batch, A actions, F policy features.
"""
