"""Model building, weights resolution and the explicit forwards that reduce tokens or record attention.

Nothing in this package imports streamlit (DESIGN principle 1).
"""
