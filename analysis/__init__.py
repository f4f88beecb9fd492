"""Computations and figure builders behind the pages; importable without streamlit."""
