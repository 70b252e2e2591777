"""Benchmarks, importable as ``dpsn.bench`` (``dpsn bench NAME``) and runnable as scripts
(``python bench/NAME.py``). Each prints a table and writes JSON (and plots) to ``bench/results/``.
"""
