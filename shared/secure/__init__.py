"""Secure mode's primitives: identity keys (``identity``), secure aggregation (``secagg`` over ``shamir``) and the
distributed noise (``secnoise``). Pure functions but for ``identity``'s key files.
"""
