"""Comparing personas: set algebra on packed bits (:mod:`.algebra`, torch-free) and whether a
persona works in a model (:mod:`.evaluate`, the paper's protocols).
"""
