"""The bottom layer: basics every other package imports (paths, the base-model store, wire types).

Imports flow downward only: trainer -> clients -> server -> valuefn -> common. Nothing here
imports any of those packages.
"""
